"""The admin API client: the CLI, the console menu and the SSH shell all talk to the Factory through it."""

from __future__ import annotations

import hashlib
import itertools
import os
import select
import socket
import typing
from typing import Any, Iterator

import msgspec

from appliance.ipc import schema as S
from appliance.ipc.channel import ProtocolViolation, SyncChannel


class ClientError(Exception):
    """One line for the operator; `code` is the Factory's refusal code when there was one."""

    def __init__(self, message: str, code: str = "client"):
        super().__init__(message)
        self.code = code


class AdminClient:
    """One admin-socket connection. With `session` (a token from `login`) it resumes that officer
    session right after the handshake; otherwise call `login` (or only use the public requests:
    status, activate)."""

    def __init__(self, home: str, timeout: float | None = 600, session: str | None = None):
        self.home = home
        self.session: str | None = None
        self.officer: str | None = None
        self.roles: list[str] = []
        path = os.path.join(home, "run", "admin.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ClientError(f"Donjon is not running at {home} (start it with `donjon run --home {home}`)", "not-running") from None
        except PermissionError:
            sock.close()
            raise ClientError(f"permission denied on {path}: run as root or as a member of the admin group", "auth") from None
        self.chan = SyncChannel(sock, "admin", S.AdminReply)
        self._ids = itertools.count(1)
        # (officer, password, otp) of a login refused because the CA was not activated yet: tried
        # again if a request is then refused for want of a session (activation happened meanwhile).
        self.deferred_login: tuple[str, str, str | None] | None = None
        try:
            self.chan.handshake()
        except (ProtocolViolation, OSError):
            sock.close()  # a refused (or not yet ready) appliance must not leak the socket
            raise ClientError("the appliance refused the connection (not root, owner or admin group, "
                              "or too many connections open from this process or user)", "auth") from None
        if session is not None:
            try:
                self.resume(session)
            except ClientError:
                self.close()
                raise

    def login(self, officer: str, password: str, otp: str | None = None) -> str:
        """Authenticate; the session is bound to this connection. Returns the session token (kept on the client)."""
        d = self.call(S.ALogin, officer=officer, password=password, otp=otp or None)
        self.session, self.officer, self.roles = d["token"], d["officer"], d["roles"]
        return self.session

    def resume(self, token: str) -> dict[str, Any]:
        """Attach an existing session to this connection."""
        d = self.call(S.AResume, token=token)
        self.session, self.officer, self.roles = token, d["officer"], d["roles"]
        return d

    def logout(self) -> None:
        self.call(S.ALogout)
        self.session, self.officer, self.roles = None, None, []

    def close(self) -> None:
        self.chan.sock.close()

    def dropped(self) -> bool:
        """True when the appliance closed this connection (one without a session that stayed idle past
        the admin socket's deadline): a long-lived face (the console) then reconnects."""
        try:
            readable, _, _ = select.select([self.chan.sock], [], [], 0)
            return bool(readable) and self.chan.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *a) -> None:
        self.close()

    def _send(self, cls, **kw) -> int:
        rid = next(self._ids)
        try:
            self.chan.send(cls(id=rid, **kw))
        except ProtocolViolation as e:
            raise ClientError(str(e), "bad-request") from None
        except OSError as e:
            raise ClientError(f"lost the connection to the appliance: {e.strerror or e}") from None
        return rid

    def _recv(self, rid: int) -> Any:
        try:
            m = self.chan.recv()
        except (ProtocolViolation, OSError) as e:
            raise ClientError(f"lost the connection to the appliance: {e}") from None
        if getattr(m, "id", None) != rid:
            raise ClientError("the appliance answered out of order")
        if isinstance(m, S.Refused):
            raise ClientError(m.reason, m.code)
        return m

    def _request(self, cls, kw: dict[str, Any]) -> tuple[int, Any]:
        """Send one request, take its first answer (after the deferred login, if it turns out to be due)."""
        rid = self._send(cls, **kw)
        try:
            return rid, self._recv(rid)
        except ClientError as e:
            # Only the Factory's "login-required" refusal is the cue: a wrong PIN or share ("auth") is not.
            if e.code != "login-required" or self.deferred_login is None or self.session is not None:
                raise
        officer, password, otp = self.deferred_login
        self.deferred_login = None
        self.login(officer, password, otp)
        rid = self._send(cls, **kw)
        return rid, self._recv(rid)

    def call(self, cls, **kw) -> dict[str, Any]:
        """The reply as a document: a typed reply (checked strictly on decode) becomes its fields."""
        _, m = self._request(cls, kw)
        if isinstance(m, S.Reply):
            return m.data
        if not isinstance(m, typing.get_args(S.TypedReply)):
            raise ClientError(f"unexpected answer {type(m).__name__}")
        doc = msgspec.to_builtins(m)
        del doc["t"], doc["id"]
        return doc

    def issue(self, **kw) -> S.IssueReply:
        _, m = self._request(S.AIssue, kw)
        if not isinstance(m, S.IssueReply):
            raise ClientError(f"unexpected answer {type(m).__name__}")
        return m

    def stream(self, cls, **kw) -> Iterator[bytes]:
        rid, m = self._request(cls, kw)
        while True:
            if not isinstance(m, S.BlobChunk):
                raise ClientError(f"unexpected answer {type(m).__name__}")
            if m.data:
                yield m.data
            if m.last:
                return
            m = self._recv(rid)


# ---------------------------------------------------------------- the CLI's stored session


def session_file(home: str) -> str:
    """Where `donjon login` keeps the token for this user and this appliance (0600): DONJON_SESSION_FILE,
    else $XDG_CACHE_HOME/donjon/session-<hash of the home path> (~/.cache by default)."""
    explicit = os.environ.get("DONJON_SESSION_FILE")
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    h = hashlib.sha256(os.path.realpath(home).encode()).hexdigest()[:16]
    return os.path.join(cache, "donjon", f"session-{h}")


def load_session(home: str) -> str | None:
    token = os.environ.get("DONJON_SESSION")
    if token:
        return token.strip()
    try:
        with open(session_file(home), encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def save_session(home: str, token: str | None) -> None:
    """Store (or, with None, forget) the session token; a cache that cannot be written is not an error."""
    path = session_file(home)
    try:
        if token is None:
            os.unlink(path)
            return
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.rename(tmp, path)
    except OSError:
        pass


def connect(home: str, timeout: float | None = 600) -> AdminClient:
    """A client carrying this user's session: DONJON_SESSION or the stored token; if there is none or it
    expired and DONJON_OFFICER + DONJON_PASSWORD (+ DONJON_OTP) are set (scripts, tests), a new login,
    stored for the next commands. Without any, only the public requests (status, activate) work."""
    c = AdminClient(home, timeout)
    officer, password = os.environ.get("DONJON_OFFICER"), os.environ.get("DONJON_PASSWORD")
    token = load_session(home)
    if token:
        try:
            c.resume(token)
            if not officer or c.officer == officer:
                return c
        except ClientError as e:
            if e.code != "auth":
                c.close()
                raise
    if officer and password:
        try:
            save_session(home, c.login(officer, password, os.environ.get("DONJON_OTP")))
        except ClientError as e:
            if e.code != "inactive":  # before activation only the public requests work anyway
                c.close()
                raise
            c.deferred_login = (officer, password, os.environ.get("DONJON_OTP"))
    return c

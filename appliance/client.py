"""The admin API client: the CLI, the console menu and the SSH shell all talk to the Factory through it."""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any, Iterator

from appliance.ipc import schema as S
from appliance.ipc.channel import ProtocolViolation, SyncChannel


class ClientError(Exception):
    """One line for the operator; `code` is the Factory's refusal code when there was one."""

    def __init__(self, message: str, code: str = "client"):
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(self, home: str, timeout: float | None = 600):
        self.home = home
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
        try:
            self.chan.handshake()
        except (ProtocolViolation, OSError):
            raise ClientError("the appliance refused the connection (not root, owner or admin group?)", "auth") from None

    def close(self) -> None:
        self.chan.sock.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *a) -> None:
        self.close()

    def _send(self, cls, **kw) -> int:
        rid = next(self._ids)
        self.chan.send(cls(id=rid, **kw))
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

    def call(self, cls, **kw) -> dict[str, Any]:
        m = self._recv(self._send(cls, **kw))
        if not isinstance(m, S.Reply):
            raise ClientError(f"unexpected answer {type(m).__name__}")
        return m.data

    def issue(self, **kw) -> S.IssueReply:
        m = self._recv(self._send(S.AIssue, **kw))
        if not isinstance(m, S.IssueReply):
            raise ClientError(f"unexpected answer {type(m).__name__}")
        return m

    def stream(self, cls, **kw) -> Iterator[bytes]:
        rid = self._send(cls, **kw)
        while True:
            m = self._recv(rid)
            if not isinstance(m, S.BlobChunk):
                raise ClientError(f"unexpected answer {type(m).__name__}")
            if m.data:
                yield m.data
            if m.last:
                return

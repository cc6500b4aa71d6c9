"""Officers: password and TOTP checks, per-peer slow-down, break-glass unlock, sessions, the permission check, dual control."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import trio
from cryptography.hazmat.primitives import hashes

from appliance.ipc import schema as S

from .cmdb import Cmdb
from .errors import FactoryError
from .permissions import PUBLIC, ROLES
from .store import Store

MIN_PASSWORD = 12
ARGON = {"m": 47104, "t": 1, "p": 1}  # OWASP's first Argon2id setting: 46 MiB, one pass
TOTP_STEP = 30
# At most this many Argon2id runs at once, whoever asks: each takes 46 MiB, and 40 parallel failed
# logins once took the Factory (whose death stops the appliance) from 105 MB to 1.58 GB.
KDF_CONCURRENCY = 2
# After max_login_failures consecutive failures from one peer (uid), its next attempt waits 1 s after
# the last failure, then 2, 4, ... up to this; a stranger slows down himself, never locks an account.
MAX_PEER_DELAY = 900
REFUSED = "login refused: wrong officer name, password or code"  # the one answer, whatever was wrong


def tag_of(req) -> str:
    return type(req).__struct_config__.tag


# ---------------------------------------------------------------- passwords and TOTP


def _argon2(password: str, salt: bytes, m: int, t: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    return Argon2id(salt=salt, length=32, iterations=t, lanes=p, memory_cost=m).derive(password.encode())


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    d = _argon2(password, salt, **ARGON)
    return f"argon2id$m={ARGON['m']},t={ARGON['t']},p={ARGON['p']}${salt.hex()}${d.hex()}"


def check_password(stored: str, password: str) -> bool:
    try:
        alg, params, salt, digest = stored.split("$")
        kv = dict(x.split("=") for x in params.split(","))
        if alg != "argon2id":
            return False
        d = _argon2(password, bytes.fromhex(salt), int(kv["m"]), int(kv["t"]), int(kv["p"]))
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(d, bytes.fromhex(digest))


_DUMMY = None


def dummy_check(password: str) -> None:
    """Spend the same KDF time for an unknown officer, so that names cannot be probed by timing."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password(secrets.token_urlsafe(16))
    check_password(_DUMMY, password)


def totp_code(secret: bytes, step: int) -> str:
    from cryptography.hazmat.primitives.twofactor.totp import TOTP
    return TOTP(secret, 6, hashes.SHA1(), TOTP_STEP, enforce_key_length=False).generate(step * TOTP_STEP).decode()


def totp_match(secret: bytes, code: str, now: float, last_step: int) -> int | None:
    """The time step the code belongs to (one step of clock skew either way), never one already used."""
    cur = int(now) // TOTP_STEP
    for step in (cur, cur - 1, cur + 1):
        if step > last_step and hmac.compare_digest(totp_code(secret, step), code):
            return step
    return None


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise FactoryError("policy", f"a password has at least {MIN_PASSWORD} characters")


def check_roles(roles) -> tuple[str, ...]:
    rs = tuple(sorted(set(roles)))
    if not rs or any(r not in ROLES for r in rs):
        raise FactoryError("bad-request", f"roles are among {', '.join(ROLES)}")
    if "auditor" in rs and len(rs) > 1:
        raise FactoryError("policy", "the auditor role is exclusive of the others")
    return rs


# ---------------------------------------------------------------- sessions


@dataclass
class Session:
    officer: str
    roles: frozenset[str]
    token_hash: bytes
    created: float
    last_used: float
    login_seq: int = 0  # the audit record of the login: a ceremony checks its witnesses logged in during it


@dataclass
class Conn:
    """One admin-socket connection: who is at the other end (SO_PEERCRED) and its session, if any."""

    who: str
    session: Session | None = None
    uid: int = -1  # SO_PEERCRED: failed logins are slowed down per peer user

    @property
    def actor(self) -> str:
        return f"officer:{self.session.officer} {self.who}" if self.session else f"admin:{self.who}"


@dataclass
class Peer:
    """Failed logins of one peer user, and the lock that runs its logins one at a time (so that parallel
    attempts cannot outrun the slow-down)."""

    failures: int = 0
    last: float = 0.0
    noted: float = -1.0  # the wait window already audited (one record per window, not per attempt)
    lock: trio.Lock = field(default_factory=trio.Lock)

    def wait(self, free: int, now: float) -> float:
        if self.failures < free:
            return 0.0
        return max(0.0, self.last + min(2.0 ** (self.failures - free), MAX_PEER_DELAY) - now)


class TableRow(Protocol):
    """What the permission check reads of a row of the admin-request table (admin.AdminOp)."""

    allowed: frozenset[str] | None
    guard: str | None
    self_service: bool


class OfficersHost(Protocol):
    """What the officers use of their owner (the Factory) besides the store: its configuration, profiles,
    the audit write, events and the break-glass share check. Named here, not imported from service.py:
    restore.py checks passwords with this module's functions, and service.py leads back to restore.py."""

    cfg: S.FactoryConfig
    profiles: dict[str, Any]

    def _require_active(self) -> Cmdb: ...
    async def audit(self, actor: str, action: str, obj: str, outcome: str, detail: str = "") -> None: ...
    async def send_event(self, ev: S.Event) -> None: ...
    def check_shares(self, shares: Any, uid: int) -> Any: ...


@dataclass
class Officers:
    f: OfficersHost
    store: Store
    table: dict[type, TableRow]  # admin.TABLE, given by main.py: this module does not import admin.py (no import circle)
    sessions: dict[bytes, Session] = field(default_factory=dict)
    peers: dict[int, Peer] = field(default_factory=dict)
    kdf: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(KDF_CONCURRENCY))

    @property
    def cfg(self) -> S.FactoryConfig:
        return self.f.cfg

    # ------------------------------------------------------------ authentication

    def _session_of(self, conn: Conn) -> Session | None:
        s = conn.session
        if s is None:
            return None
        now = time.monotonic()
        if self.sessions.get(s.token_hash) is not s or now - s.last_used > self.cfg.session_idle_seconds:
            self.sessions.pop(s.token_hash, None)
            conn.session = None
            raise FactoryError("auth", "the session expired: log in again (donjon login)")
        s.last_used = now
        return s

    def end_sessions(self, officer: str) -> None:
        for h, s in list(self.sessions.items()):
            if s.officer == officer:
                del self.sessions[h]

    async def login(self, conn: Conn, req: S.ALogin) -> dict[str, Any]:
        self.f._require_active()
        peer = self.peers.setdefault(conn.uid, Peer())
        async with peer.lock:
            wait = peer.wait(self.cfg.max_login_failures, time.monotonic())
            if wait > 0:
                if peer.noted != peer.last:
                    peer.noted = peer.last
                    await self.f.audit(f"login:{req.officer} {conn.who}", "login", req.officer, "refused",
                                       f"peer slowed down after {peer.failures} failed logins: {math.ceil(wait)} s to wait")
                raise FactoryError("auth", f"login refused: too many failed logins from this user: try again in {math.ceil(wait)} s")
            try:
                result = await self._login(conn, req)
            except FactoryError as e:
                if e.reason == REFUSED:
                    peer.failures += 1
                    peer.last = time.monotonic()
                raise
            peer.failures = 0
            return result

    async def _login(self, conn: Conn, req: S.ALogin) -> dict[str, Any]:
        db = self.f._require_active()
        name = req.officer
        actor = f"login:{name} {conn.who}"
        row = await self.store.run(self.store.officer_login_row, name)
        # Unknown, locked or wrong: the same KDF time and the same answer, so that names cannot be probed.
        if row is None:
            await trio.to_thread.run_sync(dummy_check, req.password, limiter=self.kdf)
            await self.f.audit(actor, "login", name, "refused", "no such officer")
            raise FactoryError("auth", REFUSED)
        roles, pwhash, totp, totp_last, failures, locked = row
        if locked:
            await trio.to_thread.run_sync(dummy_check, req.password, limiter=self.kdf)
            await self.f.audit(actor, "login", name, "refused", "officer locked out")
            raise FactoryError("auth", REFUSED)
        ok = await trio.to_thread.run_sync(check_password, pwhash, req.password, limiter=self.kdf)
        step = None
        why = "wrong password"
        if ok and totp is not None:
            step = totp_match(totp, req.otp, time.time(), totp_last) if req.otp else None
            if step is None:
                ok = False
                why = "missing, wrong or replayed TOTP code"
        if not ok:
            limit = self.cfg.max_login_failures

            def fail():
                with db.tx():
                    n = self.store.officer_failed(name)
                    db.audit(actor, "login", name, "refused", f"{why} (consecutive failure {n} on this account)")
                    return n
            n = await self.store.run(fail)
            if n == limit:  # an alert, not a lockout: whoever tries is slowed down, the account stays usable
                await self.f.send_event(S.Event(kind="login-lockout", detail=f"officer {name} has {n} consecutive failed logins (no lockout: the peers are slowed down)"))
            raise FactoryError("auth", REFUSED)
        token = secrets.token_urlsafe(32)
        th = hashlib.sha256(token.encode()).digest()

        def good():
            with db.tx():
                self.store.officer_logged_in(name, step or 0)
                return db.audit(actor, "login", name, "ok", roles)
        login_seq = await self.store.run(good)
        now = time.monotonic()
        s = Session(name, frozenset(roles.split(",")), th, now, now, login_seq)
        self.sessions[th] = s
        conn.session = s
        return {"token": token, "officer": name, "roles": sorted(s.roles), "idle_seconds": self.cfg.session_idle_seconds}

    async def resume(self, conn: Conn, token: str) -> dict[str, Any]:
        th = hashlib.sha256(token.encode()).digest()
        s = self.sessions.get(th)
        if s is None or time.monotonic() - s.last_used > self.cfg.session_idle_seconds:
            self.sessions.pop(th, None)
            raise FactoryError("auth", "no such session, or it expired: log in again (donjon login)")
        s.last_used = time.monotonic()
        conn.session = s
        return {"officer": s.officer, "roles": sorted(s.roles)}

    async def logout(self, conn: Conn) -> dict[str, Any]:
        s = conn.session
        if s is not None:
            self.sessions.pop(s.token_hash, None)
            conn.session = None
            await self.f.audit(f"officer:{s.officer} {conn.who}", "logout", s.officer, "ok")
        return {"logged_out": s is not None}

    # ------------------------------------------------------------ the permission check

    async def bootstrap(self) -> bool:
        """True while the CMDB holds no officer: only the first administrator may be created."""
        if not self.store.active:
            return False
        return not await self.store.run(self.store.officers_exist)

    async def authorise(self, conn: Conn, req) -> None:
        """Refuse (typed, audited) what this connection's officer may not do."""
        op = tag_of(req)
        obj = str(getattr(req, "name", None) or getattr(req, "ca", None) or getattr(req, "request", None) or "-")
        row = self.table.get(type(req))
        if row is None:
            await self.f.audit(conn.actor, op, obj, "denied", "not in the admin-request table")
            raise FactoryError("denied", f"{op}: not a permitted operation")
        allowed = row.allowed
        if allowed is PUBLIC:
            return
        s = self._session_of(conn)
        if s is None:
            if op == "officer-add" and await self.bootstrap():
                if tuple(req.roles) != ("administrator",):
                    await self.f.audit(conn.actor, op, req.name, "denied", "bootstrap: the first officer is an administrator")
                    raise FactoryError("denied", "no officer exists yet: the first one must be an administrator only (--role administrator)")
                return
            if not self.store.active:
                raise FactoryError("inactive", "the CA is not activated yet (run `donjon activate`)")
            await self.f.audit(conn.actor, op, obj, "denied", "no officer session")
            if await self.bootstrap():
                raise FactoryError("denied", "no officer exists yet: create the first administrator with "
                                             "`donjon officer add NAME --role administrator`")
            raise FactoryError("login-required", "log in first (donjon login --officer NAME)")
        if s.roles & allowed:
            return
        if row.self_service and getattr(req, "name", None) == s.officer:
            return
        await self.f.audit(conn.actor, op, obj, "denied", f"roles {','.join(sorted(s.roles))} may not {op}")
        raise FactoryError("denied", f"officer {s.officer} ({', '.join(sorted(s.roles))}) may not {op}: "
                                     f"it needs the {' or '.join(sorted(allowed))} role")

    # ------------------------------------------------------------ officer management

    async def add(self, req: S.AOfficerAdd | S.InitOfficer, actor: str) -> dict[str, Any]:
        db = self.f._require_active()
        roles = check_roles(req.roles)
        check_new_password(req.password)
        pw = await trio.to_thread.run_sync(hash_password, req.password, limiter=self.kdf)
        now = int(time.time())

        def w():
            with db.tx():
                if self.store.officer_exists(req.name):
                    db.audit(actor, "officer-add", req.name, "refused", "exists")
                    return False
                self.store.officer_add(req.name, ",".join(roles), pw, now)
                db.audit(actor, "officer-add", req.name, "ok", ",".join(roles))
                return True
        if not await self.store.run(w):
            raise FactoryError("exists", f"officer {req.name!r} already exists")
        return {"name": req.name, "roles": list(roles)}

    async def _update(self, name: str, action: str, actor: str, change: Callable[[], bool], detail: str = "") -> None:
        """Run one of the store's officer changes (it says whether the officer exists), audited."""
        db = self.f._require_active()

        def w():
            with db.tx():
                if not change():
                    db.audit(actor, action, name, "refused", "no such officer")
                    return False
                db.audit(actor, action, name, "ok", detail)
                return True
        if not await self.store.run(w):
            raise FactoryError("not-found", f"no officer named {name!r}")

    async def remove(self, name: str, actor: str) -> dict[str, Any]:
        self.f._require_active()
        if await self.store.run(self.store.other_administrators, name) == 0:
            await self.f.audit(actor, "officer-remove", name, "refused", "the last administrator")
            raise FactoryError("policy", "refusing to remove the last administrator")
        await self._update(name, "officer-remove", actor, lambda: self.store.officer_remove(name))
        self.end_sessions(name)
        return {"removed": name}

    async def passwd(self, name: str, password: str, actor: str) -> dict[str, Any]:
        check_new_password(password)
        pw = await trio.to_thread.run_sync(hash_password, password, limiter=self.kdf)
        now = int(time.time())
        await self._update(name, "officer-passwd", actor, lambda: self.store.officer_set_password(name, pw, now))
        return {"name": name, "password": "changed"}

    async def unlock(self, name: str, actor: str) -> dict[str, Any]:
        await self._update(name, "officer-unlock", actor, lambda: self.store.officer_unlock(name))
        return {"name": name, "locked": False}

    async def unlock_shares(self, conn: Conn, req: S.AOfficerUnlockShares) -> dict[str, Any]:
        """Break-glass: a quorum of activation shares (the custodians, not an officer) unlocks an officer,
        and may set a new password, when no administrator can log in. Audited; every peer's slow-down ends."""
        self.f._require_active()
        actor = f"break-glass:quorum-of-shares {conn.who}"
        try:
            self.f.check_shares(req.shares, conn.uid)
        except FactoryError as e:
            await self.f.audit(actor, "officer-unlock", req.name, "refused", f"break-glass: {e.reason}")
            raise
        pw = None
        if req.password is not None:
            check_new_password(req.password)
            pw = await trio.to_thread.run_sync(hash_password, req.password, limiter=self.kdf)
        now = int(time.time())
        await self._update(req.name, "officer-unlock", actor, lambda: self.store.officer_unlock(req.name, pw, now),
                           "break-glass: authorised by a quorum of activation shares" + ("; new password set" if pw else ""))
        if pw:
            self.end_sessions(req.name)
        self.peers.clear()
        return {"name": req.name, "locked": False, "password": "changed" if pw else "unchanged"}

    async def totp(self, name: str, enable: bool, actor: str) -> dict[str, Any]:
        secret = os.urandom(20) if enable else None
        await self._update(name, "officer-totp", actor, lambda: self.store.officer_set_totp(name, secret), "on" if enable else "off")
        if not enable:
            return {"name": name, "totp": False}
        b32 = base64.b32encode(secret).decode().rstrip("=")
        return {"name": name, "totp": True, "secret": b32,
                "uri": f"otpauth://totp/Donjon:{name}?secret={b32}&issuer=Donjon&algorithm=SHA1&digits=6&period={TOTP_STEP}"}

    async def list(self) -> dict[str, Any]:
        self.f._require_active()
        rows = await self.store.run(self.store.officer_rows)
        return {"officers": [{"name": n, "roles": r.split(","), "totp": bool(t), "failures": fl, "locked": bool(lk), "created": c}
                             for n, r, t, fl, lk, c in rows]}

    # ------------------------------------------------------------ dual control

    async def guard(self, req, conn: Conn, row: TableRow) -> str | None:
        """The dual-control operation name this request falls under, or None when it runs at once."""
        if self.cfg.dual_approvals <= 1 or conn.session is None:
            return None  # no policy, or the bootstrap administrator (no officer exists to approve)
        name = row.guard
        if row.self_service and getattr(req, "name", None) == conn.session.officer and "administrator" not in conn.session.roles:
            name = None  # an officer's own password or second factor
        if name == "revoke-ca" and not await self._is_ca_cert(req.ca, req.serial):  # lifting a CA's hold too
            name = None
        return name if name in self.cfg.dual_operations else None

    async def _is_ca_cert(self, ca: str, serial: bytes) -> bool:
        self.f._require_active()
        profile = await self.store.run(self.store.cert_profile, ca, serial)
        prof = self.f.profiles.get(profile) if profile else None
        return prof is not None and prof.kind in ("root-ca", "sub-ca")

    async def propose(self, req, operation: str, conn: Conn) -> dict[str, Any]:
        db = self.f._require_active()
        s = conn.session
        now = int(time.time())
        summary = _summary(req)
        blob = msgspec.msgpack.encode(req)

        def w():
            with db.tx():
                pid = self.store.pending_add(operation, summary, blob, s.officer, now, now + self.cfg.dual_expiry_seconds)
                db.audit(conn.actor, "dual-control", f"request#{pid}", "pending",
                         f"{operation}: {summary}; 1 of {self.cfg.dual_approvals} approvals")
                return pid
        pid = await self.store.run(w)
        return {"pending": pid, "operation": operation, "summary": summary, "approvals": 1,
                "required": self.cfg.dual_approvals, "expires": now + self.cfg.dual_expiry_seconds}

    async def pending_list(self, open_only: bool) -> dict[str, Any]:
        self.f._require_active()
        await self._expire()

        def q():
            out = []
            for pid, op, summ, who, created, expires, state, result in self.store.pending_rows(open_only):
                approvers = self.store.approvers(pid)
                out.append({"id": pid, "operation": op, "summary": summ, "requester": who, "created": created,
                            "expires": expires, "state": state, "approvals": approvers, "required": self.cfg.dual_approvals,
                            "result": json.loads(result) if result else None})
            return out
        return {"pending": await self.store.run(q)}

    async def _expire(self) -> None:
        db = self.f._require_active()
        now = int(time.time())

        def w():
            with db.tx():
                for pid, op in self.store.pending_expired(now):
                    self.store.pending_expire(pid)
                    db.audit("factory:dual-control", "dual-control", f"request#{pid}", "expired", f"{op}: approvals expired")
        await self.store.run(w)

    async def approve(self, request_id: int, conn: Conn, execute) -> dict[str, Any]:
        """Record this officer's approval; the M-th distinct one runs the request with `execute(req, actor)`."""
        db = self.f._require_active()
        await self._expire()
        s = conn.session
        pending = await self.store.run(self.store.pending_row, request_id)
        if pending is None:
            raise FactoryError("not-found", f"no pending request #{request_id}")
        operation, blob, requester, state = pending
        obj = f"request#{request_id}"
        if state != "open":
            await self.f.audit(conn.actor, "approve", obj, "refused", f"request is {state}")
            raise FactoryError("exists" if state in ("done", "failed", "running") else "policy", f"request #{request_id} is {state}")
        req = msgspec.msgpack.decode(blob, type=S.AdminRequest)
        row = self.table.get(type(req))
        allowed = (row.allowed if row is not None else None) or frozenset()
        if not s.roles & allowed:
            await self.f.audit(conn.actor, "approve", obj, "denied", f"roles {','.join(sorted(s.roles))} may not approve {operation}")
            raise FactoryError("denied", f"officer {s.officer} may not approve {operation} (needs {', '.join(sorted(allowed))})")
        m = self.cfg.dual_approvals
        now = int(time.time())

        def w():
            with db.tx():
                if self.store.approved_by(request_id, s.officer):
                    db.audit(conn.actor, "approve", obj, "refused", "already approved by this officer")
                    return None
                self.store.approval_add(request_id, s.officer, now)
                approvers = self.store.approvers(request_id)
                run = len(approvers) >= m
                if run:
                    run = self.store.pending_start(request_id)
                db.audit(conn.actor, "approve", obj, "ok", f"{operation}: {len(approvers)} of {m} approvals"
                         + ("; running it" if run else ""))
                return approvers, run
        r = await self.store.run(w)
        if r is None:
            raise FactoryError("exists", f"officer {s.officer} already approved request #{request_id}: another officer must")
        approvers, run = r
        if not run:
            return {"request": request_id, "approvals": len(approvers), "required": m, "executed": False}
        actor = f"officer:{requester} approved-by:{','.join(a for a in approvers if a != requester)} {conn.who}"
        try:
            result = await execute(req, actor)
        except FactoryError as e:
            await self._close(request_id, "failed", {"code": e.code, "reason": e.reason})
            raise
        except Exception:
            await self._close(request_id, "failed", {"code": "internal", "reason": "internal error"})
            raise
        await self._close(request_id, "done", result)
        return {"request": request_id, "approvals": len(approvers), "required": m, "executed": True, "result": result}

    async def _close(self, request_id: int, state: str, result: dict[str, Any]) -> None:
        db = self.f._require_active()

        def w():
            with db.tx():
                # The request may hold a password: keep only its summary once it has run.
                self.store.pending_close(request_id, state, json.dumps(result, default=str))
                db.audit("factory:dual-control", "dual-control", f"request#{request_id}", state, json.dumps(result, default=str)[:500])
        await self.store.run(w)


def _summary(req) -> str:
    d = msgspec.structs.asdict(req)
    d.pop("id", None)
    if "password" in d:
        d["password"] = "***"
    for k, v in list(d.items()):
        if isinstance(v, bytes):
            d[k] = v.hex() if len(v) <= 20 else f"<{len(v)} bytes sha256={hashlib.sha256(v).hexdigest()[:16]}>"
    return f"{tag_of(req)} " + " ".join(f"{k}={v}" for k, v in d.items() if v not in (None, ()))[:900]

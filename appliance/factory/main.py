"""The Factory role: its links and the admin socket server (SO_PEERCRED gate); requests are served by admin.py's table."""

from __future__ import annotations

import re
import socket
import struct
import traceback
from typing import Annotated

import apsw
import msgspec
import trio

from appliance import roles
from appliance.ceremonyspec import CeremonySpec
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, LinkClosed, ProtocolViolation, Undecodable
from appliance.ipc.links import FACTORY_CIS, FACTORY_DIST, FACTORY_GATEWAY, FACTORY_KGS, FACTORY_OCSP

from . import admin
from .checkpoints import Checkpoints
from .kgs import KgsLink
from .cis_link import CisLink
from .cmdb import CmdbError
from .cmp import CmpHost, CmpService
from .gateway import GatewayHost, GatewayService
from .officers import Conn, Officers
from .service import Factory, FactoryError, _log
from .tier import Tier

SO_PEERGROUPS = 59
MAX_ADMIN_CONNECTIONS = 64
# Idle connections must not starve the admin socket: a peer sends its Hello within HANDSHAKE_SECONDS,
# a connection without an officer session sends each request within IDLE_SECONDS, and one process
# (pid) or one non-root user (uid) holds only so many connections; beyond, new ones are closed at once.
# Root and the other members of the admin group draw on separate totals: no member can starve root.
HANDSHAKE_SECONDS = 5.0
IDLE_SECONDS = 120.0
MAX_PER_PID = 16  # a ceremony holds one connection per officer present
MAX_PER_UID = 16


def peer_ids(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid


class AdminGate:
    """Connection accounting for the admin socket: caps per pid, per non-root uid, and a total for root
    and another for everyone else (root is the appliance's own operator account: never starved by a
    member of the admin group)."""

    def __init__(self, total: int = MAX_ADMIN_CONNECTIONS, per_pid: int = MAX_PER_PID, per_uid: int = MAX_PER_UID):
        self.total, self.per_pid, self.per_uid = total, per_pid, per_uid
        self.n = 0
        self.pools = {True: 0, False: 0}  # root?, open connections
        self.pids: dict[int, int] = {}
        self.uids: dict[int, int] = {}
        self.warned: set[int] = set()

    def admit(self, pid: int, uid: int) -> str | None:
        """None when admitted (call release later), else why the connection is closed."""
        if self.pools[uid == 0] >= self.total:
            return f"{self.total} admin connections open" + (" by root" if uid == 0 else " by members of the admin group")
        if self.pids.get(pid, 0) >= self.per_pid:
            return f"{self.per_pid} connections from pid {pid}"
        if uid != 0 and self.uids.get(uid, 0) >= self.per_uid:
            return f"{self.per_uid} connections from uid {uid}"
        self.n += 1
        self.pools[uid == 0] += 1
        self.pids[pid] = self.pids.get(pid, 0) + 1
        self.uids[uid] = self.uids.get(uid, 0) + 1
        return None

    def release(self, pid: int, uid: int) -> None:
        self.n -= 1
        self.pools[uid == 0] -= 1
        for d, k in ((self.pids, pid), (self.uids, uid)):
            d[k] -= 1
            if not d[k]:
                del d[k]
        if uid not in self.uids:
            self.warned.discard(uid)

    def warn_once(self, uid: int) -> bool:
        """Log a refusal once per burst of one user, not once per connection (a flood must not flood the log)."""
        if uid in self.warned:
            return False
        self.warned.add(uid)
        return True
AUTO_ACTIVATION_WAIT = 60  # seconds an admin request waits for the activation from the PIN file


def peer_allowed(sock: socket.socket, cfg: S.FactoryConfig) -> tuple[bool, str]:
    """The admin socket admits root, the developer-mode owner, and members of the admin group."""
    pid, uid, gid = peer_ids(sock)
    who = f"uid={uid} pid={pid}"
    if uid == 0 or (cfg.dev_uid is not None and uid == cfg.dev_uid):
        return True, who
    if cfg.admin_gid is not None:
        if gid == cfg.admin_gid:
            return True, who
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
            if cfg.admin_gid in groups:
                return True, who
        except OSError:
            pass
    return False, who


async def handle_admin(stream: trio.SocketStream, f: Factory) -> None:
    sock = stream.socket
    ok, who = peer_allowed(sock, f.cfg)  # type: ignore[arg-type]
    conn = Conn(who, uid=peer_ids(sock)[1])  # type: ignore[arg-type]
    chan = Channel(stream, "admin", S.AdminRequest)
    try:
        if not ok:
            await f.audit(conn.actor, "connect", "admin-socket", "refused", "not root, owner or admin group")
            return
        with trio.move_on_after(HANDSHAKE_SECONDS) as hs:
            await chan.handshake()
        if hs.cancelled_caught:
            return  # a peer that does not say Hello in time holds no slot
        while True:
            if conn.session is None:
                with trio.move_on_after(IDLE_SECONDS) as idle:
                    req = await recv_admin(chan, f, conn)
                if idle.cancelled_caught:
                    return
            else:
                req = await recv_admin(chan, f, conn)
            if isinstance(req, S.Hello):
                raise ProtocolViolation("second Hello")
            if f.auto_activation is not None and not isinstance(req, (S.AStatus, S.AActivate, S.AActivateShares)):
                # Right after a start the PIN-file activation is under way: wait for it (bounded)
                # rather than answer "log in first" or "not activated" to a script that races it.
                with trio.move_on_after(AUTO_ACTIVATION_WAIT):
                    await f.auto_activation.wait()
            try:
                await f.officers.authorise(conn, req)
                await admin.serve(chan, req, f, conn)
            except FactoryError as e:
                await chan.send(S.Refused(id=req.id, code=e.code, reason=e.reason))
            except CmdbError as e:
                await chan.send(S.Refused(id=req.id, code="internal", reason=str(e)))
            except apsw.Error as e:
                # The CMDB refused a write (disk full, read-only, I/O error): the action's transaction,
                # its audit record included, was rolled back, so nothing happened.
                _log(f"CMDB error: {type(e).__name__}: {e}")
                await chan.send(S.Refused(id=req.id, code="internal", reason=f"audit storage failure ({type(e).__name__}): nothing was done"))
            except Exception:  # noqa: BLE001 - any other failure is one request's, logged; the Factory serves on
                _log("internal error:\n" + traceback.format_exc(limit=8))
                await chan.send(S.Refused(id=req.id, code="internal", reason="internal error in the Factory (see its log)"))
    except ProtocolViolation as e:
        # An admin client is not a peer role: drop the connection, keep serving the others.
        if not isinstance(e, LinkClosed):  # a client that hung up is no news
            _log(f"admin client {who}: {e}")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


class _Envelope(msgspec.Struct):
    """What a refusal needs of a request that did not decode: its tag and id (other fields skipped)."""

    t: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    id: S.ReqId | None = None


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?) - at `\$\.?(?P<path>[^`]*)`$")


def bad_request_reason(tag: str, detail: str) -> str:
    """One line naming the request, the field and what is wrong with it (from msgspec's message)."""
    m = _MSGSPEC_PATH.match(detail)
    what, path = (m.group("what"), m.group("path")) if m else (detail, "")
    what = re.sub(r"^Expected `\w+` ", "must be ", what).replace("Invalid enum value", "invalid value")
    if path == "t":
        return f"unknown request {tag!r}"
    return f"{tag or 'request'}: {path or 'message'}: {what}"[:4000]


async def recv_admin(chan: Channel, f: Factory, conn: Conn):
    """The next admin request; well-framed requests with invalid values are refused (typed) on the way."""
    while True:
        try:
            return await chan.recv()
        except Undecodable as e:
            await refuse_undecodable(chan, e, f, conn)


async def refuse_undecodable(chan: Channel, e: Undecodable, f: Factory, conn: Conn) -> None:
    """A well-framed admin request with a value the schema refuses: a typed refusal, audited, link kept.
    A frame that is not even a request with an id is no client of ours: the connection is dropped."""
    try:
        env = msgspec.msgpack.decode(e.body, type=_Envelope)
    except (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError):
        raise e from None
    if env.id is None or env.t == "hello":
        raise e
    tag = env.t[:64]
    reason = bad_request_reason(tag, e.detail)
    try:
        await f.audit(conn.actor, tag or "request", "-", "refused", reason)
    except apsw.Error as ae:  # the refusal still goes out: nothing was done either way
        _log(f"CMDB error while auditing a bad request: {type(ae).__name__}: {ae}")
    await chan.send(S.Refused(id=env.id, code="bad-request", reason=reason))


async def main(fds: dict[str, int], drop) -> None:
    await roles.serve("factory", fds, drop, lambda sup, cfg: _setup(fds, sup, cfg))


async def _setup(fds: dict[str, int], sup: Channel, cfg: S.FactoryConfig) -> roles.Body:
    admin_sock = socket.socket(fileno=fds["admin"]) if "admin" in fds else None
    import apsw  # noqa: F401 - load the SQLite3MC extension before the privilege drop
    from policy import profiles as profmod
    profiles = profmod.load_profiles(dict(cfg.profiles))
    # "factory-cis" is the primary CIS (keys, CRLs, activation); "factory-cis.N" are more signers.
    names = sorted((k for k in fds if k.split(".")[0] == FACTORY_CIS.name), key=lambda k: (k != FACTORY_CIS.name, k))
    signers = [CisLink(Channel.from_fd(fds[k], FACTORY_CIS.name, FACTORY_CIS.up), k.removeprefix("factory-"), cfg.cis_deadline_seconds)
               for k in names]

    async def send_event(ev):
        await sup.send(ev)

    f: Factory = None  # type: ignore[assignment] - made after the drop, once every CIS link is up
    endpoints: dict[str, trio.CancelScope] = {}
    nursery: list[trio.Nursery] = []  # the skeleton's, once serving
    gateway: list[GatewayService] = []  # made with the Factory

    async def connect() -> None:  # every CIS link is up before Ready
        nonlocal f
        async with trio.open_nursery() as hs:
            for link in signers:
                hs.start_soon(link.chan.handshake)
        f = Factory(cfg, signers[0], send_event, profiles, signers)
        f.sup_send = sup.send
        f.officers = Officers(f, f.store, admin.TABLE)
        f.checkpoints = Checkpoints(f.store, f.cis, cfg.checkpoint_seconds, f.send_event)
        f.tier = Tier(f.store, f.cis, f.profiles, dict(cfg.ca_profiles), f.ocsp.publish, f.dist.enqueue_object, f.send_event,
                      f.dist.poke, cfg.home, cfg.calendar_warn_remaining, cfg.calendar_warn_hours)
        gateway.append(GatewayService(GatewayHost(f.store, cfg, f.profiles, f.issue, f.issuance.issue_one, f.revoke, f.check_issuer,
                                                  f.ca_chain, f.audit)))
        f.cmp = CmpService(CmpHost(f.store, f.profiles, f.issuance.issue_one, f.revoke, f.check_issuer, f.ca_chain, f.audit))
        gateway[0].extra = f.cmp.answer  # CMP's messages on the gateway link
        f.estscep = gateway[0].estscep  # officers decide EST/SCEP enrolments waiting for approval through the admin API
        from policy.cards import load_card_profile_text
        card_profiles = {n: load_card_profile_text(n, t, profiles) for n, t in cfg.card_profiles.items()}
        f.kgs = KgsLink(f.store, f.issue, card_profiles)  # type: ignore[attr-defined] - the KGS link's end (appliance/factory/kgs.py)

    async def cis_liveness(link: CisLink) -> None:
        state = "responsive" if link.responsive else "unresponsive"
        _log(f"{link.name} is {state}" + ("" if link.responsive else f" (no answer in {link.deadline:g} s)"))
        await sup.send(S.Event(kind=f"cis-{state}", detail=link.name))

    async def serve_distribution(fd: int, scope: trio.CancelScope) -> None:
        with scope:
            chan = Channel.from_fd(fd, FACTORY_DIST.name, FACTORY_DIST.up)
            try:
                await chan.handshake()
                f.dist.attach(chan)
                await f.dist.receive(chan)
            except LinkClosed:
                pass  # the agent stopped (the supervisor reports a death and restarts it with a new link)
            except ProtocolViolation as e:
                _log(f"distribution link: {e}")  # the supervisor restarts the agent with a new link
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                if f.dist.link is chan:
                    f.dist.attach(None)
                await chan.aclose()

    def start_distribution(fd: int) -> None:
        if "distribution" in endpoints:
            endpoints["distribution"].cancel()
        endpoints["distribution"] = trio.CancelScope()
        nursery[0].start_soon(serve_distribution, fd, endpoints["distribution"])

    async def serve_gateway(fd: int, scope: trio.CancelScope) -> None:
        with scope:
            chan = Channel.from_fd(fd, FACTORY_GATEWAY.name, FACTORY_GATEWAY.up)
            try:
                await gateway[0].serve(chan)
            except LinkClosed:
                pass  # the gateway stopped (the supervisor restarts it with a new link)
            except ProtocolViolation as e:
                _log(f"gateway link: {e}")  # a gateway that sends what it may not is cut off; it is restarted
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await chan.aclose()

    async def serve_kgs(fd: int, scope: trio.CancelScope) -> None:
        with scope:
            chan = Channel.from_fd(fd, FACTORY_KGS.name, FACTORY_KGS.up)
            try:
                await f.kgs.serve(chan)  # type: ignore[attr-defined]
            except LinkClosed:
                pass  # the KGS stopped (the supervisor restarts it with a new link)
            except ProtocolViolation as e:
                _log(f"KGS link: {e}")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await chan.aclose()

    def start_gateway(fd: int) -> None:
        if "gateway" in endpoints:
            endpoints["gateway"].cancel()
        endpoints["gateway"] = trio.CancelScope()
        nursery[0].start_soon(serve_gateway, fd, endpoints["gateway"])

    def start_kgs(fd: int) -> None:
        if "kgs" in endpoints:
            endpoints["kgs"].cancel()
        endpoints["kgs"] = trio.CancelScope()
        nursery[0].start_soon(serve_kgs, fd, endpoints["kgs"])

    async def serve_endpoint(fd: int, role: str, scope: trio.CancelScope) -> None:
        with scope:
            chan = Channel.from_fd(fd, FACTORY_OCSP.name, FACTORY_OCSP.up)
            try:
                await f.ocsp.serve_endpoint(chan, role)
            except LinkClosed:
                pass  # the endpoint stopped (the supervisor reports a death and restarts it with a new link)
            except ProtocolViolation as e:
                _log(f"OCSP endpoint link ({role}): {e}")  # the supervisor restarts it with a new link
            finally:
                if f.ocsp_feeds.get(role) is chan:
                    del f.ocsp_feeds[role]
                await chan.aclose()

    def start_endpoint(fd: int, role: str) -> None:
        if role in endpoints:
            endpoints[role].cancel()
        endpoints[role] = trio.CancelScope()
        nursery[0].start_soon(serve_endpoint, fd, role, endpoints[role])

    async def serve(n: trio.Nursery) -> None:
        nursery.append(n)
        for link in signers:
            n.start_soon(link.run)
            n.start_soon(link.watch, cis_liveness)
        # Two pipeline workers per signer: one commits while the other's batch is being signed.
        for i in range(2 * len(signers)):
            n.start_soon(f.issuance_worker, signers[i % len(signers)])
        n.start_soon(f.crl_scheduler)
        n.start_soon(f.ocsp.run)
        n.start_soon(f.ocsp.renewal)
        n.start_soon(f.tenants.run)
        n.start_soon(f.status_reporter, sup.send)
        n.start_soon(f.dist.dispatcher)
        n.start_soon(f.dist.committer)
        n.start_soon(f.dist.fetcher)
        n.start_soon(f.dist.fetch_results)
        n.start_soon(f.checkpoints.scheduler)
        n.start_soon(f.tier.run)
        if FACTORY_DIST.name in fds:
            start_distribution(fds[FACTORY_DIST.name])
        if FACTORY_GATEWAY.name in fds:
            start_gateway(fds[FACTORY_GATEWAY.name])
        if FACTORY_KGS.name in fds:
            start_kgs(fds[FACTORY_KGS.name])
        for key in sorted(k for k in fds if k.split(".")[0] == FACTORY_OCSP.name):
            start_endpoint(fds[key], "ocsp" + key[len(FACTORY_OCSP.name):])  # factory-ocsp.1 -> ocsp.1
        if admin_sock is not None:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(admin_sock))
            gate = AdminGate()

            async def serve_one(stream):
                pid, uid, _ = peer_ids(stream.socket)  # type: ignore[arg-type]
                why = gate.admit(pid, uid)
                if why is not None:  # closed at once, never queued behind idle connections
                    if gate.warn_once(uid):
                        _log(f"admin socket: refusing connections of uid={uid} pid={pid}: {why}")
                    await stream.aclose()
                    return
                try:
                    await handle_admin(stream, f)
                finally:
                    gate.release(pid, uid)
            n.start_soon(trio.serve_listeners, serve_one, [listener])

    async def control(m) -> None:
        if isinstance(m, S.OcspStats):
            f.ocsp_stats = m
        elif isinstance(m, S.ConfigSetDone):
            f.sup_reply(m)
        elif isinstance(m, S.NewLink) and m.link == FACTORY_DIST.name:
            start_distribution(sup.take_fd())
        elif isinstance(m, S.NewLink) and m.link == FACTORY_GATEWAY.name:
            start_gateway(sup.take_fd())
        elif isinstance(m, S.NewLink) and m.link == FACTORY_KGS.name:
            start_kgs(sup.take_fd())
        elif isinstance(m, S.NewLink):
            start_endpoint(sup.take_fd(), m.role)
        elif isinstance(m, S.AutoActivate):
            try:
                await f.activate(m.pin, "supervisor:pin-file")
            except FactoryError as e:
                await sup.send(S.Event(kind="activation-failed", detail=e.reason))
            finally:
                if f.auto_activation is not None:
                    f.auto_activation.set()
        elif isinstance(m, S.CheckRestoreOfficers):
            from . import restore
            try:
                names = await restore.check_officers(f.cis, f.cfg.home, f.cfg.cipher, m)
                await sup.send(S.Event(kind="restore-officers-ok", detail=",".join(names)))
            except FactoryError as e:
                await sup.send(S.Event(kind="restore-officers-refused", detail=e.reason[:4000]))
        elif isinstance(m, S.Ceremony):
            try:
                spec = msgspec.msgpack.decode(m.spec, type=CeremonySpec)
                await f.activate(m.pin, "ceremony")
                for o in m.officers:
                    await f.officers.add(o, "ceremony")
                made = await f.ceremony(spec, "ceremony")
                for name in made:
                    await f.generate_crl(name, "ceremony")
                await sup.send(S.Event(kind="ceremony-done", detail=" ".join(made)))
            except (FactoryError, msgspec.ValidationError) as e:
                await sup.send(S.Event(kind="ceremony-failed", detail=str(e)[:4000]))
        else:
            raise ProtocolViolation(f"unexpected {type(m).__name__} from the supervisor")

    def close() -> None:
        if f.db is not None:
            f.db.close()
            f.reader.close()

    return roles.Body(serve=serve, connect=connect, control=control, close=close)

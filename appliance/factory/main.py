"""The Factory role: its links, the admin socket server (SO_PEERCRED gate) and request dispatch."""

from __future__ import annotations

import os
import socket
import struct
import sys
import traceback

import msgspec
import trio

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation

from .cis_link import CisLink
from .cmdb import CmdbError
from .service import Factory, FactoryError, _log

SO_PEERGROUPS = 59
MAX_ADMIN_CONNECTIONS = 64


def peer_allowed(sock: socket.socket, cfg: S.FactoryConfig) -> tuple[bool, str]:
    """The admin socket admits root, the developer-mode owner, and members of the admin group."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
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
    actor = f"admin:{who}"
    chan = Channel(stream, "admin", S.AdminRequest)
    try:
        if not ok:
            await f.audit(actor, "connect", "admin-socket", "refused", "not root, owner or admin group")
            return
        await chan.handshake()
        while True:
            req = await chan.recv()
            if isinstance(req, S.Hello):
                raise ProtocolViolation("second Hello")
            try:
                await dispatch(chan, req, f, actor)
            except FactoryError as e:
                await chan.send(S.Refused(id=req.id, code=e.code, reason=e.reason))
            except CmdbError as e:
                await chan.send(S.Refused(id=req.id, code="internal", reason=str(e)))
            except Exception:
                _log("internal error:\n" + traceback.format_exc(limit=8))
                await chan.send(S.Refused(id=req.id, code="internal", reason="internal error in the Factory (see its log)"))
    except ProtocolViolation as e:
        # An admin client is not a peer role: drop the connection, keep serving the others.
        if not isinstance(e, type(None)) and "peer closed" not in str(e):
            _log(f"admin client {who}: {e}")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def dispatch(chan: Channel, req, f: Factory, actor: str) -> None:
    rid = req.id

    async def reply(**data):
        await chan.send(S.Reply(id=rid, data=data))

    if isinstance(req, S.AStatus):
        await reply(**await f.status())
    elif isinstance(req, S.AActivate):
        await reply(**await f.activate(req.pin, actor))
    elif isinstance(req, S.ACaList):
        await reply(cas=await f.ca_list())
    elif isinstance(req, S.ACaShow):
        row = await f.ca_row(req.name)
        await reply(**f._ca_doc(*row))
    elif isinstance(req, S.ACaExport):
        chain = await f.ca_chain(req.name)
        await reply(chain=[c.hex() for c in chain])
    elif isinstance(req, S.ACaCreate):
        await reply(**await f.create_ca(req, parent=req.parent, actor=actor))
    elif isinstance(req, S.ACaSignCsr):
        await reply(**await f.sign_csr_ca(req, actor))
    elif isinstance(req, S.AIssue):
        await chan.send(await f.issue(req, actor))
    elif isinstance(req, S.ACertShow):
        await reply(**await f.cert_get(req.ca, int.from_bytes(req.serial, 'big')))
    elif isinstance(req, S.ACertList):
        await reply(certs=await f.cert_list(req.ca, req.limit))
    elif isinstance(req, S.ARevoke):
        await reply(**await f.revoke(req, actor))
    elif isinstance(req, S.ACrlGenerate):
        if req.kind == "crl":
            number, count, digest = await f.generate_crl(req.ca, actor)
        else:
            number, count, digest = await f.generate_serials_list(req.ca, actor)
        async for chunk in f.crl_chunks(req.ca, number, "crls" if req.kind == "crl" else "serials_lists"):
            await chan.send(S.BlobChunk(id=rid, data=chunk, last=False))
        await chan.send(S.BlobChunk(id=rid, data=b"", last=True))
    elif isinstance(req, S.ACrlExport):
        async for chunk in f.crl_chunks(req.ca, req.number, "crls" if req.kind == "crl" else "serials_lists"):
            await chan.send(S.BlobChunk(id=rid, data=chunk, last=False))
        await chan.send(S.BlobChunk(id=rid, data=b"", last=True))
    elif isinstance(req, S.AAuditExport):
        data = await f.audit_export()
        for i in range(0, len(data), 1 << 20):
            await chan.send(S.BlobChunk(id=rid, data=data[i:i + (1 << 20)], last=False))
        await chan.send(S.BlobChunk(id=rid, data=b"", last=True))
    elif isinstance(req, S.AOcspResponderCert):
        await reply(**await f.ocsp_responder_cert(req.ca, req.validity_days, actor))
    elif isinstance(req, (S.AOcspTenantAdd, S.AOcspTenantUpdate, S.AOcspTenantRemove, S.AOcspTenantList,
                          S.AOcspTenantCsr, S.AOcspTenantCrl, S.AOcspTenantSerials)):
        await reply(**await f.tenants.admin(req, actor))
    elif isinstance(req, S.AOcspStatus):
        await reply(**await f.ocsp_status())
    elif isinstance(req, S.ADistStatus):
        f._require_active()
        await reply(**await f.dist.status())
    elif isinstance(req, S.ADistList):
        f._require_active()
        await reply(jobs=await f.run_db(f.dist.list_jobs, req.state, req.rule, req.limit))
    elif isinstance(req, S.ADistRetry):
        f._require_active()
        await reply(requeued=await f.dist.retry(req.rule, req.job, actor))
    elif isinstance(req, S.AReconcile):
        db = f._require_active()
        rows = await f.run_db(lambda: db.db.execute(
            "SELECT seq, ts, object, detail FROM audit WHERE action='reconcile' ORDER BY seq").fetchall())
        await reply(voided=[{"seq": r[0], "ts": r[1], "object": r[2], "detail": r[3]} for r in rows])
    else:
        raise FactoryError("bad-request", f"unsupported request {type(req).__name__}")


async def main(fds: dict[str, int], drop) -> None:
    sup = Channel.from_fd(fds["sup-factory"], "sup-factory", S.SupToFactory, accept_fds=True)
    await sup.handshake()
    cfg = await sup.recv()
    if not isinstance(cfg, S.FactoryConfig):
        raise ProtocolViolation("expected FactoryConfig")
    admin_sock = socket.socket(fileno=fds["admin"]) if "admin" in fds else None
    import apsw  # noqa: F401 - load the SQLite3MC extension before the privilege drop
    from policy import profiles as profmod
    profiles = profmod.load_profiles(dict(cfg.profiles))
    drop()
    # "factory-cis" is the primary CIS (keys, CRLs, activation); "factory-cis.N" are more signers.
    names = sorted((k for k in fds if k.split(".")[0] == "factory-cis"), key=lambda k: (k != "factory-cis", k))
    signers = [CisLink(Channel.from_fd(fds[k], "factory-cis", S.CisToFactory)) for k in names]
    async with trio.open_nursery() as hs:
        for link in signers:
            hs.start_soon(link.chan.handshake)

    async def send_event(ev):
        await sup.send(ev)

    f = Factory(cfg, signers[0], send_event, profiles, signers)
    async with trio.open_nursery() as n:
        for link in signers:
            n.start_soon(link.run)
        # Two pipeline workers per signer: one commits while the other's batch is being signed.
        for i in range(2 * len(signers)):
            n.start_soon(f.issuance_worker, signers[i % len(signers)])
        n.start_soon(f.crl_scheduler)
        n.start_soon(f.ocsp.run)
        n.start_soon(f.tenants.run)
        n.start_soon(f.status_reporter, sup.send)
        n.start_soon(f.dist.dispatcher)
        n.start_soon(f.dist.committer)
        n.start_soon(f.dist.fetcher)
        n.start_soon(f.dist.fetch_results)
        endpoints: dict[str, trio.CancelScope] = {}

        async def serve_distribution(fd: int, scope: trio.CancelScope) -> None:
            with scope:
                chan = Channel.from_fd(fd, "factory-distribution", S.DistToFactory)
                try:
                    await chan.handshake()
                    f.dist.attach(chan)
                    await f.dist.receive(chan)
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
            n.start_soon(serve_distribution, fd, endpoints["distribution"])
        if "factory-distribution" in fds:
            start_distribution(fds["factory-distribution"])

        async def serve_endpoint(fd: int, role: str, scope: trio.CancelScope) -> None:
            with scope:
                chan = Channel.from_fd(fd, "factory-ocsp", S.OcspToFactory)
                try:
                    await f.ocsp.serve_endpoint(chan, role)
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
            n.start_soon(serve_endpoint, fd, role, endpoints[role])
        for key in sorted(k for k in fds if k.split(".")[0] == "factory-ocsp"):
            start_endpoint(fds[key], "ocsp" + key[len("factory-ocsp"):])  # factory-ocsp.1 -> ocsp.1
        if admin_sock is not None:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(admin_sock))
            limiter = trio.CapacityLimiter(MAX_ADMIN_CONNECTIONS)

            async def serve_one(stream):
                async with limiter:
                    await handle_admin(stream, f)
            n.start_soon(trio.serve_listeners, serve_one, [listener])
        await sup.send(S.Ready(role="factory", pid=os.getpid()))
        while True:
            m = await sup.recv()
            if isinstance(m, S.Shutdown):
                n.cancel_scope.cancel()
                break
            if isinstance(m, S.OcspStats):
                f.ocsp_stats = m
            elif isinstance(m, S.NewLink) and m.link == "factory-distribution":
                start_distribution(sup.take_fd())
            elif isinstance(m, S.NewLink):
                start_endpoint(sup.take_fd(), m.role)
            elif isinstance(m, S.AutoActivate):
                try:
                    await f.activate(m.pin, "supervisor:pin-file")
                except FactoryError as e:
                    await sup.send(S.Event(kind="activation-failed", detail=e.reason))
            elif isinstance(m, S.Ceremony):
                try:
                    spec = msgspec.msgpack.decode(m.spec, type=S.CeremonySpec)
                    await f.activate(m.pin, "ceremony")
                    made = await f.ceremony(spec, "ceremony")
                    for name in made:
                        await f.generate_crl(name, "ceremony")
                    await sup.send(S.Event(kind="ceremony-done", detail=" ".join(made)))
                except (FactoryError, msgspec.ValidationError) as e:
                    await sup.send(S.Event(kind="ceremony-failed", detail=str(e)[:4000]))
            else:
                raise ProtocolViolation(f"unexpected {type(m).__name__} from the supervisor")
    if f.db is not None:
        f.db.close()
        f.reader.close()
    print(f"donjon[factory {os.getpid()}]: stopped cleanly", file=sys.stderr, flush=True)

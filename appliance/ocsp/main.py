"""The OCSP/CRL endpoint role: serve the store over HTTP, apply the Factory's feed, report counters.

Start (appliance.roles.serve): handshake with the supervisor, OcspConfig, open the store (serving from
disk at once), wrap the inherited listening socket, drop(), Ready. The Factory link is opened after Ready and
fed concurrently: the endpoint serves what it holds whether or not the Factory (or the CA) is up.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time

import trio

# Everything used after drop() is imported before it (Landlock, seccomp).
from appliance import roles
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation

from . import http, request, responder, store, tenants  # noqa: F401 - imported before the drop
from .http import Endpoint, HttpConfig, Stats
from .live import LiveSigner
from .store import Store, prepare_responses
from .tenants import Tenants, read_crl, read_serials
from hsm.token import Token, TokenError
from policy.tenants import CrlRefused

STATS_EVERY = 10.0


def _log(msg: str) -> None:
    print(f"donjon[ocsp {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def listener_from_fd(fd: int) -> trio.SocketListener:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def stats_message(st: Store, stats: Stats) -> S.OcspStats:
    return S.OcspStats(requests=stats.requests, good=stats.good, revoked=stats.revoked,
                       unauthorized=stats.unauthorized, malformed=stats.malformed, errors=stats.errors,
                       responses_held=st.responses_held(), oldest_this_update=st.oldest_this_update())


class Feed:
    """The Factory link as seen by the HTTP side: push a tenant CRL and wait for the verdict."""

    def __init__(self):
        self.chan: Channel | None = None
        self.ids = 0
        self.waiting: dict[int, trio.MemorySendChannel] = {}

    async def push_crl(self, tenant: str, der: bytes | bytearray) -> str:
        if self.chan is None:
            return "unavailable: the Factory is not connected; try again later"
        self.ids += 1
        rid = self.ids
        send, recv = trio.open_memory_channel(1)
        self.waiting[rid] = send
        try:
            chunk = 4 * 1024 * 1024
            view = memoryview(der)  # slices of the held body, not copies (msgspec encodes a view as bytes)
            for i in range(0, max(len(der), 1), chunk):
                await self.chan.send(S.TenantCrlPush(id=rid, tenant=tenant, data=view[i:i + chunk], last=i + chunk >= len(der)))
            m = await recv.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return "unavailable: the Factory link closed; try again later"
        finally:
            self.waiting.pop(rid, None)
        return m.outcome

    def answered(self, msg: S.TenantPushResult) -> None:
        w = self.waiting.pop(msg.id, None)
        if w is not None:
            w.send_nowait(msg)


async def apply_tenant(tn: Tenants, msg, events: list[S.Event], fac: Channel | None, live: LiveSigner | None) -> None:
    """One tenant message of the feed: durable before visible, checked again here (defence in depth)."""
    def event(kind: str, detail: str) -> None:
        events.append(S.Event(kind=kind, detail=detail[:4000]))
        _log(detail)

    if isinstance(msg, S.TenantConfig):
        try:
            t = await trio.to_thread.run_sync(tn.configure, msg)
        except (CrlRefused, ValueError) as e:
            raise ProtocolViolation(f"factory-ocsp: tenant {msg.tenant}: bad configuration: {e}") from None
        if live is not None:
            try:
                live.install_tenant(t.signer_key, msg.responder_label, msg.responder_cert, t.ca)
            except (TokenError, ValueError) as e:
                event("responder-rejected", f"tenant {msg.tenant}: {e}")
    elif isinstance(msg, S.TenantRemove):
        await trio.to_thread.run_sync(tn.remove, msg.tenant)
        if live is not None:
            live.responders.pop(f"tenant/{msg.tenant}", None)
    elif isinstance(msg, S.TenantSync):
        for name in await trio.to_thread.run_sync(tn.keep_only, set(msg.tenants)):
            if live is not None:
                live.responders.pop(f"tenant/{name}", None)
    elif isinstance(msg, (S.TenantCrl, S.TenantSerials)):
        t = tn.by_name.get(msg.tenant)
        if t is None:
            raise ProtocolViolation(f"factory-ocsp: data for tenant {msg.tenant}, never configured")
        kind = "crl" if isinstance(msg, S.TenantCrl) else "serials"
        try:
            whole = tn.chunk(kind, msg.tenant, msg.data, msg.last)
            if whole is None:
                return
            if kind == "crl":
                if whole == t.crl_der:
                    return
                crl = await trio.to_thread.run_sync(read_crl, t.ca, whole)
                await trio.to_thread.run_sync(tn.set_crl, msg.tenant, whole, crl)
                _log(f"tenant {msg.tenant}: CRL #{crl.number} in use ({len(crl.revoked)} revoked, nextUpdate {crl.next_update})")
            elif not msg.present:
                await trio.to_thread.run_sync(tn.set_serials, msg.tenant, None, None)
            else:
                serials = await trio.to_thread.run_sync(read_serials, t.ca, whole)
                await trio.to_thread.run_sync(tn.set_serials, msg.tenant, whole, serials)
        except CrlRefused as e:
            event("tenant-crl-rejected", f"tenant {msg.tenant}: {kind} refused by the endpoint: {e}")
    elif isinstance(msg, S.TenantKeyRequest):
        if live is None:
            await fac.send(S.Refused(id=msg.id, code="hsm", reason="the endpoint has no token for responder keys"))
            return
        try:
            label, spki, csr = live.generate_tenant(msg.tenant, f"{msg.tenant} OCSP Responder")
        except TokenError as e:
            await fac.send(S.Refused(id=msg.id, code="hsm", reason=str(e)))
            return
        await fac.send(S.TenantCsr(id=msg.id, tenant=msg.tenant, label=label, spki=spki, csr=csr))


TENANT_MSGS = (S.TenantConfig, S.TenantRemove, S.TenantSync, S.TenantCrl, S.TenantSerials, S.TenantKeyRequest)


async def apply(st: Store, msg, events: list[S.Event], fac: Channel | None = None, live: LiveSigner | None = None,
                tn: Tenants | None = None, feed_state: Feed | None = None) -> None:
    """One feed message, durable before it is visible. Blocking work runs in a worker thread;
    the store's dicts are only changed here, in the trio thread."""
    if isinstance(msg, S.PublishCa):
        try:
            await trio.to_thread.run_sync(st.publish_ca, msg.ca, msg.cert)
        except ValueError:
            raise ProtocolViolation(f"factory-ocsp: PublishCa {msg.ca}: not a certificate") from None
    elif isinstance(msg, S.PublishResponses):
        ca = st.cas.get(msg.ca)
        if ca is None:
            raise ProtocolViolation(f"factory-ocsp: responses for {msg.ca}, a CA never published")
        ok, bad = await trio.to_thread.run_sync(prepare_responses, ca.hashes, msg.responses)
        plan = st.plan(msg.ca, ok, msg.seq)
        await trio.to_thread.run_sync(plan.write)
        st.commit(plan, msg.seq)
        if bad:
            events.append(S.Event(kind="ocsp-rejected", detail=(
                f"{msg.ca}: {len(bad)} published response(s) refused, first serial {bad[0].serial:x} "
                f"({bad[0].alg}): {bad[0].why}")[:4000]))
        if st.needs_compaction(msg.ca):
            built = await trio.to_thread.run_sync(st.build_compaction, msg.ca)
            st.finish_compaction(built)
    elif isinstance(msg, S.PublishCrl):
        try:
            await trio.to_thread.run_sync(functools.partial(st.crl_chunk, msg.ca, msg.number, msg.data, msg.last,
                                                            shard=msg.shard, delta=msg.delta))
        except KeyError:
            raise ProtocolViolation(f"factory-ocsp: CRL for {msg.ca}, a CA never published") from None
        except ValueError as e:
            events.append(S.Event(kind="crl-rejected", detail=f"{msg.ca} #{msg.number}: {e}"[:4000]))
    elif isinstance(msg, S.ResponderKeyRequest):
        if live is None:
            await fac.send(S.Refused(id=msg.id, code="hsm", reason="the endpoint has no token for responder keys"))
            return
        try:
            label, spki = live.generate(msg.ca)  # in the trio thread: the one PKCS#11 caller
        except TokenError as e:
            await fac.send(S.Refused(id=msg.id, code="hsm", reason=str(e)))
            return
        await fac.send(S.ResponderKey(id=msg.id, ca=msg.ca, label=label, spki=spki))
    elif isinstance(msg, S.ResponderCert):
        if live is None:
            raise ProtocolViolation("factory-ocsp: a responder certificate, but no token")
        try:
            live.install(msg.ca, msg.label, msg.cert)
            _log(f"delegated responder {msg.label} active for {msg.ca}")
        except (TokenError, ValueError) as e:
            events.append(S.Event(kind="responder-rejected", detail=f"{msg.ca}: {e}"[:4000]))
    elif isinstance(msg, TENANT_MSGS) and tn is not None:
        await apply_tenant(tn, msg, events, fac, live)
    elif isinstance(msg, S.TenantPushResult) and feed_state is not None:
        feed_state.answered(msg)
    else:
        raise ProtocolViolation(f"factory-ocsp: unexpected {type(msg).__name__}")


async def feed(fd: int, st: Store, sup: Channel, live: LiveSigner | None = None, tn: Tenants | None = None,
               feed_state: Feed | None = None) -> None:
    fac = Channel.from_fd(fd, "factory-ocsp", S.FactoryToOcsp)
    await fac.handshake()
    await fac.send(S.OcspResume(seq=st.max_seq()))
    if feed_state is not None:
        feed_state.chan = fac
    events: list[S.Event] = []
    while True:
        msg = await fac.recv()  # LinkClosed is a ProtocolViolation: the supervisor restarts us with a new link
        await apply(st, msg, events, fac, live, tn, feed_state)
        for ev in events:
            await sup.send(ev)
        events.clear()


async def report(sup: Channel, st: Store, stats: Stats) -> None:
    while True:
        await trio.sleep(STATS_EVERY)
        await sup.send(stats_message(st, stats))


async def main(fds: dict[str, int], drop) -> None:
    await roles.serve("ocsp", fds, drop, lambda sup, cfg: _setup(fds, sup, cfg))


async def _setup(fds: dict[str, int], sup: Channel, cfg: S.OcspConfig) -> roles.Body:
    """Before the drop: open the store (serving from disk at once), wrap the inherited listener,
    map and log into the endpoint's own token."""
    st = Store.open(cfg.store_dir)
    listener = listener_from_fd(fds["listen"])
    stats = Stats()
    live = None
    if cfg.token_module and cfg.token_pin:
        # The endpoint's own token (delegated responder keys only): mapped and logged in before the drop.
        if cfg.softhsm_conf:
            os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
        token = Token(cfg.token_module, cfg.token_label)
        try:
            token.login(cfg.token_pin)
            live = LiveSigner(token, cfg.store_dir)
            live.load()
        except TokenError as e:
            _log(f"no live signing: {e}")
    tn = Tenants(cfg.store_dir)
    tn.load(time.time(), _log)
    if live is not None:
        for t in tn.by_name.values():
            try:
                live.install_tenant(t.signer_key, t.responder_label, t.responder_cert, t.ca)
            except (TokenError, ValueError) as e:
                _log(f"tenant {t.name}: responder not usable: {e}")
    feed_state = Feed()
    endpoint = Endpoint(st, HttpConfig(max_connections=cfg.max_connections, read_timeout=cfg.read_timeout,
                                       max_age=cfg.max_age, max_per_source=cfg.max_per_source,
                                       head_timeout=cfg.head_timeout), stats, live=live, tenants=tn, push=feed_state.push_crl,
                        unissued_default=cfg.unissued_default, unissued=dict(cfg.unissued))

    async def serve(n: trio.Nursery) -> None:
        _log(f"serving {st.responses_held()} responses for {len(st.cas)} CAs and {len(tn.by_name)} CRL-fed tenants from {cfg.store_dir}")
        await n.start(endpoint.serve, listener)
        if "factory-ocsp" in fds:
            n.start_soon(feed, fds["factory-ocsp"], st, sup, live, tn, feed_state)
        n.start_soon(report, sup, st, stats)

    return roles.Body(serve=serve, close=st.close)

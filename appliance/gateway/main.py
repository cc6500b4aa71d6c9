"""The gateway role: its HTTPS listener and route table, its TLS identity, its Factory link.

Start (appliance.roles.serve): GatewayConfig, log into its own token, load its TLS identity and the
protocol packages, wrap the inherited listener, drop(), Ready. Serving begins once it holds a server
certificate: at the first start it asks the Factory for one (the CA must be active), and renews it
when two thirds of its lifetime have passed.
"""

from __future__ import annotations

import os
import socket
import ssl  # noqa: F401 - imported before the drop
import sys
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from appliance import roles
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel

from .factory_link import FactoryLink, FactoryUnavailable
from .netpolicy import NetPolicy
from .server import GatewayServer, HttpConfig, Route, Stats, not_implemented
from .tls import TlsIdentity
from hsm.token import Token, TokenError

STATS_EVERY = 10.0
TLS_RETRY = 5.0  # seconds between asks for a server certificate while the Factory refuses (CA inactive)
# Body caps per protocol: JWS-wrapped CSRs are a few KiB; CMP/EST/SCEP messages carry a CSR or a CMS.
ACME_BODY_CAP = 64 * 1024
PLACEHOLDERS = {"cmp": ("/.well-known/cmp", 256 * 1024), "est": ("/.well-known/est/", 256 * 1024), "scep": ("/scep", 256 * 1024)}


def _log(msg: str) -> None:
    print(f"donjon[gateway {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    """What a protocol package gets: the configuration, the Factory, its token, the network policy."""

    cfg: S.GatewayConfig
    factory: FactoryLink
    token: Token | None
    net: NetPolicy
    stats: Stats
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # tasks to run while serving
    closers: list[Callable[[], None]] = field(default_factory=list)  # on Shutdown
    orders_open: Callable[[], int] = lambda: 0  # for the statistics (SNMP)
    tls: TlsIdentity | None = None  # its TLS identity (EST asks for client certificates through it)
    tls_changed: Callable[[], None] = lambda: None  # rebuild the TLS context (new client-certificate anchors)


def routes(ctx: Context) -> list[Route]:
    """The route table: each enabled protocol's routes, placeholders (501) for the others."""
    out: list[Route] = []
    if "acme" in ctx.cfg.protocols and ctx.cfg.acme is not None:
        from .acme import service as acme  # imported here, before the drop (routes() runs in setup)
        out += acme.routes(ctx, ACME_BODY_CAP)
    else:
        out.append(Route("/acme/", not_implemented("ACME")))
    if "cmp" in ctx.cfg.protocols:
        from .cmp import route as cmp  # imported here, before the drop (routes() runs in setup)
        out += cmp.routes(ctx)
    if {"est", "scep"} & set(ctx.cfg.protocols) and ctx.cfg.estscep is not None:
        from . import estscep  # imported here, before the drop
        out += estscep.routes(ctx)
    for proto, (prefix, cap) in PLACEHOLDERS.items():
        if not any(r.prefix == prefix for r in out):
            out.append(Route(prefix, not_implemented(proto.upper()), body_cap=cap))
    return out


async def ensure_tls(ctx: Context, tls: TlsIdentity, server: GatewayServer, ready: trio.Event) -> None:
    """Hold a valid server certificate: ask the Factory when there is none or it is due."""
    await ctx.factory.ready.wait()
    wait = 0.25  # right after a start the CA is being activated: ask again soon, then every TLS_RETRY
    while True:
        if tls.due():
            try:
                label, spki, key_pem = tls.new_key()
                reply = await ctx.factory.request(lambda i: S.GwTlsRequest(id=i, ca=ctx.cfg.tls_ca, spki=spki,
                                                                         names=ctx.cfg.tls_names))
            except (FactoryUnavailable, TokenError) as e:
                reply = S.GwRefused(id=0, code="busy", reason=str(e))
            if isinstance(reply, S.GwIssued):
                tls.install(label, key_pem, reply.cert, list(reply.chain))
                server.ssl_context = tls.context()
                _log(f"server certificate {reply.serial.hex()} for {', '.join(ctx.cfg.tls_names)} in use")
                ready.set()
            else:
                wait = min(TLS_RETRY, wait * 2)
                if ctx.token is not None:
                    try:
                        ctx.token.delete(label)
                    except Exception:  # noqa: BLE001 - an unused object in its own token
                        pass
                if not ready.is_set() and wait >= TLS_RETRY:
                    _log(f"no server certificate yet: {getattr(reply, 'reason', reply)}; asking again in {wait:g} s")
                await trio.sleep(wait)
                continue
        elif server.ssl_context is None:
            server.ssl_context = tls.context()
            ready.set()
        await trio.sleep(min(3600.0, max(TLS_RETRY, (tls.not_after - tls.not_before) / 100)))


async def report(sup: Channel, stats: Stats, orders_open: Callable[[], int]) -> None:
    while True:
        await trio.sleep(STATS_EVERY)
        await sup.send(S.GatewayStats(requests=stats.requests, errors=stats.errors, issued=stats.issued,
                                      refused=stats.refused, orders_open=orders_open()))


async def main(fds: dict[str, int], drop) -> None:
    await roles.serve("gateway", fds, drop, lambda sup, cfg: _setup(fds, sup, cfg))


async def _setup(fds: dict[str, int], sup: Channel, cfg: S.GatewayConfig) -> roles.Body:
    """Before the drop: its token (logged in), its TLS identity, the protocol packages, the listener."""
    token = None
    if cfg.token_module and cfg.token_pin:
        if cfg.softhsm_conf:
            os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
        token = Token(cfg.token_module, cfg.token_label)
        token.login(cfg.token_pin)  # a TokenError ends the role: it cannot serve HTTPS without its key
    tls = TlsIdentity(token, cfg.store_dir)
    tls.load()
    sock = socket.socket(fileno=fds["gateway-listen"])
    sock.setblocking(False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    stats = Stats()
    ctx = Context(cfg=cfg, factory=FactoryLink(), token=token, net=NetPolicy(cfg.validation_networks), stats=stats, tls=tls)
    table = routes(ctx)
    server = GatewayServer(HttpConfig(max_connections=cfg.max_connections, read_timeout=cfg.read_timeout,
                                      head_timeout=cfg.head_timeout, max_per_source=cfg.max_per_source), stats, table)

    def tls_changed() -> None:
        if tls.key_pem is not None:
            server.ssl_context = tls.context()
    ctx.tls_changed = tls_changed

    async def serve(n: trio.Nursery) -> None:
        ready = trio.Event()
        if "factory-gateway" in fds:
            n.start_soon(ctx.factory.run, fds["factory-gateway"])
        n.start_soon(ensure_tls, ctx, tls, server, ready)
        n.start_soon(report, sup, stats, ctx.orders_open)
        for task in ctx.background:
            n.start_soon(task)
        await ready.wait()
        _log(f"serving {', '.join(cfg.protocols)} at {cfg.base_url}")
        await n.start(server.serve, listener)

    def close() -> None:
        for c in ctx.closers:
            c()

    return roles.Body(serve=serve, close=close)

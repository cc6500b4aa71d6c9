"""The gateway's HTTPS server: the shared hardened HTTP server, TLS, and a route table by path prefix."""

from __future__ import annotations

import contextvars
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from appliance.httpserve import HttpServer, Reply, _Fail, _plain

__all__ = ["GatewayServer", "HttpConfig", "Reply", "Request", "Route", "Stats", "tls_info"]

_source: contextvars.ContextVar[str] = contextvars.ContextVar("source", default="")
_tls: contextvars.ContextVar[trio.SSLStream | None] = contextvars.ContextVar("tls", default=None)


def tls_info() -> tuple[bytes | None, bytes | None]:
    """The current connection's verified client certificate (DER) and tls-unique (None on TLS 1.3,
    which has no tls-unique), for EST's client-certificate authentication and channel binding."""
    stream = _tls.get()
    if stream is None:
        return None, None
    try:
        peer = stream.getpeercert(binary_form=True)
        unique = stream.get_channel_binding("tls-unique") if stream.version() != "TLSv1.3" else None
    except (ValueError, AttributeError, ssl.SSLError):
        return None, None
    return peer or None, unique


@dataclass
class HttpConfig:
    max_connections: int = 1024
    read_timeout: float = 10.0
    header_cap: int = 8 * 1024
    body_cap: int = 8 * 1024  # the small-body class of the in-flight cap (see httpserve._reserve)
    inflight_cap: int = 32 * 1024 * 1024
    head_timeout: float = 5.0
    max_per_source: int = 64


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    refused_connections: int = 0
    busy: int = 0
    evicted: int = 0
    issued: int = 0
    refused: int = 0


@dataclass(frozen=True)
class Request:
    method: bytes
    target: bytes
    path: str
    headers: dict[bytes, bytes]
    body: bytes
    source: str  # the client's IP address


@dataclass(frozen=True)
class Route:
    prefix: str
    handler: Callable[[Request], Awaitable[Reply]]
    body_cap: int = 0
    methods: tuple[bytes, ...] = (b"GET", b"HEAD", b"POST")


class GatewayServer(HttpServer):
    """Routes are matched by the longest prefix; a request no route takes is a 404."""

    log_name = "gateway"

    def __init__(self, cfg: HttpConfig, stats: Stats, routes: list[Route], ssl_context: ssl.SSLContext | None = None):
        super().__init__(cfg, stats)
        self.routes = sorted(routes, key=lambda r: -len(r.prefix))
        self.ssl_context = ssl_context

    def match(self, target: bytes) -> Route | None:
        path = target.split(b"?", 1)[0].decode("latin-1")
        for r in self.routes:
            if path.startswith(r.prefix) or path == r.prefix.rstrip("/"):
                return r
        return None

    def route_cap(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> int:
        r = self.match(target)
        if r is None:
            raise _Fail(404, _plain(404, close=True))
        if method not in r.methods:
            raise _Fail(405, _plain(405, close=True, extra=[(b"allow", b", ".join(r.methods))]))
        return r.body_cap

    async def handle(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytearray) -> Reply:
        self.stats.requests += 1
        r = self.match(target)
        if r is None:
            return _plain(404)
        path = target.split(b"?", 1)[0].decode("latin-1")
        try:
            return await r.handler(Request(method, target, path, headers, bytes(body), _source.get()))
        except Exception as e:  # noqa: BLE001 - a handler's bug is one request's 500, never its text
            self.stats.errors += 1
            print(f"donjon[gateway]: handler error on {r.prefix}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
            return _plain(500, close=True)

    def new_stream(self, conn: socket.socket) -> trio.abc.Stream:
        assert self.ssl_context is not None
        tcp = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        tls = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        _tls.set(tls)  # this connection's task: handle() reads it through tls_info()
        return tls

    async def _close(self, stream) -> None:
        """TLS has no half-close: the connection is closed by the caller (close_notify, then the socket)."""
        await trio.lowlevel.checkpoint()

    async def serve_connection(self, conn: socket.socket, src: bytes) -> None:
        try:
            _source.set(conn.getpeername()[0])
        except (OSError, IndexError, TypeError):
            _source.set("")
        await super().serve_connection(conn, src)


def not_implemented(protocol: str) -> Callable[[Request], Awaitable[Reply]]:
    """The placeholder of a protocol whose package has not plugged its routes in yet."""
    async def handler(req: Request) -> Reply:
        return Reply(501, [(b"content-type", b"text/plain; charset=utf-8")], f"{protocol} is not offered by this gateway yet\n".encode())
    return handler

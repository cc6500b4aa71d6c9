"""The hardened HTTP/1.x server the endpoint and the gateway share (h11 on trio): connections in all
and per source, eviction of slow heads, header and per-route body caps decided from the head before
any body byte is read, a cap on bodies in flight, head and request deadlines, CL+TE refused, close on
any error. A subclass gives `route_cap` (a request's body cap from its head; raise _Fail to refuse)
and `handle` (the answer); `wrap` may put TLS around a connection."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Callable

import h11
import trio

HEADER_CAP = 8 * 1024
CHUNK = 64 * 1024
FAST_READ = 16 * 1024  # a request is a few hundred bytes: a smaller read buffer costs less per call
DRAIN_LIMIT = 256 * 1024  # bytes read and dropped while closing gracefully
# ... in small reads: trio holds what a read returned across a scheduling round, and a thousand
# connections refused in a burst, each draining 64 KiB at a time, held 64 MiB between them.
DRAIN_READ = 4 * 1024
DRAIN_TIME = 1.0
INFLIGHT_CAP = 32 * 1024 * 1024
HEAD_TIMEOUT = 5.0  # seconds from the connection (or the previous answer) to a complete request head
MAX_PER_SOURCE = 64  # concurrent connections from one IPv4 address or IPv6 /64
ACCEPT_BATCH = 256  # connections accepted per wake-up before the others run again
# At max_connections, a new connection evicts the one that has waited longest for a request head, if
# that wait is this long: many sources (an IPv6 /48 holds 65,536 /64s) cannot hold every slot with
# slow heads, while a client that sends its request at once is never evicted.
EVICT_AFTER = 1.0
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | memoryview = b""
    close: bool = False
    wire: bytes | None = None  # the header lines (after Date, before the blank line) serialised once, for a reply served many times


class _Fail(Exception):
    """An HTTP-level refusal: answer `status` (or `reply`) and close."""

    def __init__(self, status: int, reply: Reply | None = None):
        self.status = status
        self.reply = reply or _plain(status, close=True)


class _Held:
    """One connection's share: bytes of its current body counted against the in-flight cap, and
    whether it was evicted (closed to make room while it waited for a request head)."""

    __slots__ = ("evicted", "n")

    def __init__(self) -> None:
        self.n = 0
        self.evicted = False

_REASONS = {200: b"OK", 304: b"Not Modified", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            413: b"Content Too Large", 415: b"Unsupported Media Type", 422: b"Unprocessable Content", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


_date_cache: dict[int, bytes] = {}


def _http_date(ts: float) -> bytes:
    """RFC 7231 date, each second formatted once: Date, and the Last-Modified and Expires of the
    held responses (they share a few thisUpdate/nextUpdate values)."""
    sec = int(ts)
    d = _date_cache.get(sec)
    if d is None:
        if len(_date_cache) >= 4096:
            _date_cache.clear()
        d = _date_cache[sec] = formatdate(sec, usegmt=True).encode()
    return d


def _plain(status: int, close: bool = False, extra: list | None = None) -> Reply:
    body = _REASONS.get(status, b"Error") + b"\n"
    return Reply(status, [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])], body, close)

class _Closed(Exception):
    """The connection cannot carry a response any more."""


class HttpServer:
    """Connection handling shared by every HTTP role; `cfg` has max_connections, max_per_source,
    header_cap, body_cap (the small-body class), inflight_cap, head_timeout and read_timeout; `stats`
    counts errors, refused_connections, busy and evicted."""

    log_name = "http"  # log prefix and configuration section named in refusals

    def __init__(self, cfg, stats, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.stats = stats
        self.clock = clock
        self.active = 0
        self.sources: dict[bytes, int] = {}  # open connections per source (see source_key)
        self.inflight = 0  # bytes of request bodies reserved (see _reserve)
        self._refusal_note = 0.0  # when over-limit refusals were last logged
        self._heads: dict[_Held, tuple[trio.CancelScope, float]] = {}  # waiting for a request head, oldest first

    def route_cap(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> int:
        """The body cap of a request from its head alone (0: no body); raise _Fail to refuse it unread."""
        return 0

    async def handle(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytearray) -> Reply:
        return _plain(404)

    def new_stream(self, conn: socket.socket) -> trio.abc.Stream:
        """The stream an accepted connection's requests are read from (the endpoint drives the socket
        directly, the gateway puts TLS around it)."""
        return trio.SocketStream(trio.socket.from_stdlib_socket(conn))

    async def _connection(self, stream: trio.abc.Stream, held: _Held) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.cfg.header_cap)
        await self._h11_connection(stream, conn, trio.current_time(), held)

    async def serve(self, listener: trio.SocketListener, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept in batches, a plain accept() each and no scheduling round between them: a flood that
        reconnects as fast as it is closed must not fill the accept queue in front of everyone else
        (the queue is FIFO: a normal client waits behind all of it). A connection its client already
        closed is dropped here; the limits are checked by serve_connection."""
        lsock = socket.socket(fileno=os.dup(listener.socket.fileno()))  # a plain socket: accept() without a checkpoint each
        lsock.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(lsock)
                    for _ in range(ACCEPT_BATCH):
                        try:
                            conn, peer = lsock.accept()
                        except BlockingIOError:
                            break
                        except OSError as e:
                            if e.errno in _ACCEPT_CAPACITY:  # out of descriptors or memory: let connections end
                                await trio.sleep(0.1)
                            break  # ECONNABORTED and the like: the next poll
                        conn.setblocking(False)
                        try:
                            if conn.recv(1, socket.MSG_PEEK) == b"":  # closed by the client already: costs nothing
                                conn.close()
                                continue
                        except BlockingIOError:
                            pass  # open, nothing sent yet
                        except OSError:
                            conn.close()  # reset by the client
                            continue
                        src = source_key(peer[0]) if isinstance(peer, tuple) else b""
                        nursery.start_soon(self.serve_connection, conn, src)
        finally:
            lsock.close()
            await trio.aclose_forcefully(listener)  # as trio.serve_listeners does

    async def serve_connection(self, conn: socket.socket, src: bytes) -> None:
        """One accepted connection: over a limit, closed at once with nothing read (the limits are
        checked here, once the connections that ended before it have been counted out)."""
        evicted = False
        for _ in range(3):
            n = self.sources.get(src, 0)
            if self.active < self.cfg.max_connections and n < self.cfg.max_per_source:
                break
            if n < self.cfg.max_per_source and not evicted:
                evicted = self._evict_oldest()
            # Connections accepted in the same batch that the client had already closed (or the one
            # just evicted) end within a scheduling round or two: let them be counted out first.
            await trio.lowlevel.checkpoint()
        else:
            self._refused(n >= self.cfg.max_per_source)
            conn.close()
            return
        self.active += 1
        self.sources[src] = n + 1
        stream = self.new_stream(conn)
        held = _Held()
        try:
            await self._connection(stream, held)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError, _Closed):
            pass
        except Exception as e:  # noqa: BLE001 - the worker outlives any connection
            self.stats.errors += 1
            print(f"donjon[{self.log_name}]: connection handler error: {type(e).__name__}", file=sys.stderr, flush=True)
        finally:
            self._release(held)
            self.active -= 1
            left = self.sources[src] - 1
            if left:
                self.sources[src] = left
            else:
                del self.sources[src]
            await trio.aclose_forcefully(stream)

    def _refused(self, per_source: bool) -> None:
        """Count a connection closed over a limit; say so in the log at most once a minute (an
        operator behind a proxy or a NAT sees why, a flood does not flood the log)."""
        self.stats.refused_connections += 1
        now = time.monotonic()
        if now - self._refusal_note >= 60.0:
            self._refusal_note = now
            which = (f"{self.log_name}.max-connections-per-source ({self.cfg.max_per_source})" if per_source
                     else f"{self.log_name}.max-connections ({self.cfg.max_connections})")
            print(f"donjon[{self.log_name}]: connections closed over {which}; {self.stats.refused_connections} so far",
                  file=sys.stderr, flush=True)

    def _evict_oldest(self) -> bool:
        """Close the connection that has waited longest for a request head, if for EVICT_AFTER."""
        for held, (scope, since) in self._heads.items():
            if trio.current_time() - since < EVICT_AFTER:
                return False
            del self._heads[held]
            held.evicted = True
            scope.cancel()
            self.stats.evicted += 1
            return True
        return False

    def _reserve(self, held: _Held, n: int) -> None:
        """Count `n` more bytes of the current body against the in-flight cap, before reading them."""
        cap = self.cfg.inflight_cap
        if held.n + n > self.cfg.body_cap:
            cap -= cap // 4  # the quarter kept for OCSP-sized bodies
        if self.inflight + n > cap:
            self.stats.busy += 1
            raise _Fail(503, _plain(503, close=True, extra=[(b"retry-after", b"5")]))
        self.inflight += n
        held.n += n

    def _release(self, held: _Held) -> None:
        self.inflight -= held.n
        held.n = 0

    async def _send(self, stream, data: bytes | memoryview) -> None:
        if data:
            with trio.fail_after(self.cfg.read_timeout):  # a client that does not read is dropped too
                await stream.send_all(data)

    async def _h11_connection(self, stream: trio.abc.Stream, conn: h11.Connection, start: float, held: _Held) -> None:
        while True:
            fail: Reply | None = None
            got = None
            with trio.move_on_at(start + min(self.cfg.head_timeout, self.cfg.read_timeout)) as scope:
                self._heads[held] = (scope, start)
                try:
                    got = await self._read_request(conn, stream, scope, start, held)
                except _Fail as f:
                    fail = f.reply
                except h11.RemoteProtocolError as e:
                    fail = _plain(431 if e.error_status_hint == 431 else 400, close=True)
                finally:
                    self._heads.pop(held, None)
            if scope.cancelled_caught:
                if held.evicted or (conn.their_state is h11.IDLE and not conn.trailing_data[0]):
                    return  # an idle keep-alive connection, or evicted: close quietly
                fail = _plain(408, close=True)
            if fail is not None:
                await self._respond(conn, stream, fail)
                await self._close(stream)
                return
            if got is None:
                return  # closed by the client (possibly before any request: costs nothing)
            req, headers, body = got
            try:
                reply = await self.handle(req.method, req.target, headers, body)
            except Exception as e:  # noqa: BLE001 - mapped to 500, never shown
                self.stats.errors += 1
                print(f"donjon[{self.log_name}]: handler error: {type(e).__name__}", file=sys.stderr, flush=True)
                reply = _plain(500, close=True)
            del body, got
            self._release(held)
            await self._respond(conn, stream, reply, head=req.method == b"HEAD")
            if reply.close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                await self._close(stream)
                return
            conn.start_next_cycle()
            start = trio.current_time()

    async def _read_request(self, conn: h11.Connection, stream, scope: trio.CancelScope, start: float, held: _Held):
        """(request, headers, body), or None if the client closed first. The route's body cap, and
        a tenant push's authorisation, are decided when the head is in, before any body byte is
        asked for; the declared length is reserved against the in-flight cap then too."""
        req = None
        headers: dict[bytes, bytes] = {}
        body = bytearray()
        got = 0
        cap = 0
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await self._send(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                # Small reads but for a push's admitted body: what follows a head is not read before its
                # route allows it, and a read is held across a scheduling round (see DRAIN_READ).
                data = await stream.receive_some(CHUNK if cap > CHUNK else FAST_READ)
                conn.receive_data(data)
                del data
                continue
            if isinstance(ev, h11.ConnectionClosed):
                return None
            if isinstance(ev, h11.Request):
                req = ev
                names = [k for k, _ in ev.headers]
                size = len(ev.method) + len(ev.target) + 12 + sum(len(k) + len(v) + 4 for k, v in ev.headers)
                if size > self.cfg.header_cap:
                    raise _Fail(431)
                if b"content-length" in names and b"transfer-encoding" in names:
                    raise _Fail(400)  # request smuggling shape: refuse, whatever h11 would do
                for k, v in ev.headers:
                    headers[k] = v if k not in headers else headers[k] + b", " + v
                self._heads.pop(held, None)  # the head is in: no longer evictable
                cap = self.route_cap(ev.method, ev.target, headers)
                declared = int(headers.get(b"content-length", b"0"))  # h11 checked it is one number
                if declared > cap:
                    raise _Fail(413)
                if declared:
                    self._reserve(held, declared)
                    body = bytearray(declared)  # filled in place: a growing buffer would be copied as it grows
                scope.deadline = start + self.cfg.read_timeout  # the head is in: the body has what is left
            elif isinstance(ev, h11.Data):
                end = got + len(ev.data)
                if end > cap:
                    raise _Fail(413)
                if end > held.n:  # a chunked body: counted as it arrives
                    self._reserve(held, end - held.n)
                body[got:end] = ev.data
                got = end
            elif isinstance(ev, h11.EndOfMessage):
                del body[got:]  # nothing, unless the client closed early (h11 then raises first)
                return req, headers, body  # not copied: a push's body is held once

    async def _respond(self, conn: h11.Connection, stream, reply: Reply, head: bool = False) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [(b"date", _http_date(self.clock())), *reply.headers, (b"content-length", b"%d" % len(reply.body))]
        if reply.close:
            headers.append((b"connection", b"close"))
        try:
            out = [conn.send(h11.Response(status_code=reply.status, headers=headers, reason=_REASONS.get(reply.status, b"")))]
            if not head and reply.status != 304:
                if len(reply.body) <= CHUNK:  # an OCSP answer: head, body and end in one write
                    out.append(conn.send(h11.Data(data=reply.body)))
                else:
                    await self._send(stream, b"".join(out))
                    out = []
                    view = memoryview(reply.body)
                    for i in range(0, len(view), CHUNK):
                        await self._send(stream, conn.send(h11.Data(data=view[i:i + CHUNK])))
            out.append(conn.send(h11.EndOfMessage()))
            await self._send(stream, b"".join(out))
        except h11.LocalProtocolError:
            raise _Closed() from None

    async def _close(self, stream) -> None:
        """Half-close, then read and drop what the client still sends (bounded), so that the
        kernel does not answer unread data with a RST that could destroy our response."""
        try:
            await stream.send_eof()
            with trio.move_on_after(DRAIN_TIME):
                dropped = 0
                while dropped < DRAIN_LIMIT:
                    n = len(await stream.receive_some(DRAIN_READ))
                    if not n:
                        break
                    dropped += n
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass



def source_key(host: str) -> bytes:
    """What per-source limits count by: an IPv4 address, or the /64 of an IPv6 one (a single host
    may hold a whole /64); an IPv4-mapped address as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return b""  # not an IP socket (a test's socketpair): one source
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped.packed if ip.ipv4_mapped else ip.packed[:8]
    return ip.packed


"""The endpoint's HTTP/1.0 and 1.1 server (h11 on trio): routing, caching headers, and the bounds
h11 leaves to us — connections (in all and per source), header and per-route body caps decided from
the head before any body byte is read, a cap on the bytes of bodies in flight, head and request
deadlines, CL+TE, close on any error.

Routes: POST / and /ocsp (application/ocsp-request); GET /ocsp/<b64> and /<b64>; GET
/crl/<ca>.crl; GET /ca/<ca>.crt; GET /health; PUT or POST /tenant/<name>/crl (a tenant's CRL,
application/pkix-crl, `Authorization: Bearer <secret>` checked before the body is read, forwarded to
the Factory which verifies it). Handlers never raise into the server: every
exception becomes a 500 with a fixed body, and no exception text is ever sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import sys
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable

import h11
import trio

from appliance.httpserve import (  # noqa: F401 - the shared server; names kept importable from here
    ACCEPT_BATCH, CHUNK, DRAIN_LIMIT, DRAIN_READ, DRAIN_TIME, EVICT_AFTER, FAST_READ, HEAD_TIMEOUT, HEADER_CAP,
    INFLIGHT_CAP, MAX_PER_SOURCE, HttpServer, Reply, _Closed, _Fail, _Held, _http_date, _plain, _REASONS, source_key)

from .request import MalformedRequest, decode_get_path
from .responder import HOT_MAX, Answer, Responder
from .store import Store

# Body cap of an OCSP POST: 32 CertIDs (request.MAX_CERT_IDS) with SHA-512 issuer hashes fit; a
# usual request is under 100 bytes. Routes that take no body get none (route_cap).
BODY_CAP = 8 * 1024

_CA_PATH = re.compile(rb"^/(crl|ca)/([A-Za-z0-9][A-Za-z0-9._-]{0,63})\.(crl|crt|json)$")
_SHARD_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})-(0|[1-9][0-9]{0,2}|delta)$")
_SHARD_DELTA = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})-(0|[1-9][0-9]{0,2})-delta$")
_TENANT_PATH = re.compile(rb"^/tenant/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/crl$")
PUSH_CAP = 8 * 1024 * 1024  # body cap of a pushed tenant CRL (read only once its bearer secret is checked)
PUSH_TIMEOUT = 30.0
# Bytes of request bodies held at once by one endpoint process, all connections together (INFLIGHT_CAP):
# bodies larger than an OCSP request (tenant pushes) may take three quarters of it (three full pushes),
# so that they never starve OCSP. A request that would go over is answered 503 before its body is read.
OCSP_REQUEST = b"application/ocsp-request"
OCSP_RESPONSE = b"application/ocsp-response"


@dataclass
class HttpConfig:
    max_connections: int = 1024
    read_timeout: float = 10.0
    max_age: int = 3600
    header_cap: int = HEADER_CAP
    body_cap: int = BODY_CAP  # an OCSP POST
    push_cap: int = PUSH_CAP
    inflight_cap: int = INFLIGHT_CAP
    head_timeout: float = HEAD_TIMEOUT
    max_per_source: int = MAX_PER_SOURCE


@dataclass
class Stats:
    requests: int = 0
    good: int = 0
    revoked: int = 0
    unauthorized: int = 0
    malformed: int = 0
    errors: int = 0
    push_refused: int = 0  # tenant CRL pushes refused (bad secret, or the Factory refused the CRL)
    refused_connections: int = 0  # closed at once: over max_connections or the per-source limit
    busy: int = 0  # requests answered 503 because the bodies in flight were at their cap
    evicted: int = 0  # connections closed at max_connections while they waited for a request head

    def count(self, answer: Answer) -> None:
        self.requests += 1
        if answer.outcome in ("good", "revoked", "unauthorized", "malformed"):
            setattr(self, answer.outcome, getattr(self, answer.outcome) + 1)
        elif answer.outcome in ("error", "trylater"):
            self.errors += 1




def _etag_matches(header: bytes, etag: bytes) -> bool:
    for tag in header.split(b","):
        tag = tag.strip()
        if tag == b"*" or tag.removeprefix(b"W/") == etag:
            return True
    return False


def _not_modified(headers: dict[bytes, bytes], etag: bytes, last_modified: int) -> bool:
    """RFC 9110 §13.2.2: If-None-Match wins over If-Modified-Since when both are present."""
    inm = headers.get(b"if-none-match")
    if inm is not None:
        return _etag_matches(inm, etag)
    ims = headers.get(b"if-modified-since")
    if ims is not None:
        try:
            return last_modified <= parsedate_to_datetime(ims.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
    return False


class Endpoint(HttpServer):
    """Routing and answers (sans-IO: `route`) plus the fast path in front of the shared server."""

    log_name = "ocsp"

    def __init__(self, store: Store, cfg: HttpConfig, stats: Stats | None = None,
                 clock: Callable[[], float] = time.time, live=None, tenants=None, push=None,
                 unissued_default: str = "unauthorized", unissued: dict[str, str] | None = None):
        super().__init__(cfg, stats or Stats(), clock)
        self.store = store
        self.tenants = tenants
        self.push = push  # async (tenant, der) -> "accepted" | reason: the Factory's verdict
        self.responder = Responder(store, clock, live, tenants, unissued_default, unissued)
        # Replies of held answers (POST, and GET without a condition) built once per answer (headers, ETag,
        # serialised lines): used while the answer is the one the responder returns and its nextUpdate is at
        # least max-age away (max-age is then the configured one, whatever the second). Bounded like the
        # responder's cache.
        self._wire: dict[bytes, tuple[Answer, Reply]] = {}
        # Parsed request heads by their exact bytes (clients repeat theirs): _parse_head is a pure function
        # of them. The headers dicts are shared: nothing downstream changes them.
        self._heads_seen: dict[bytes, tuple] = {}

    async def handle(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytearray) -> Reply:
        if target.startswith(b"/tenant/"):
            return await self.tenant_push(method, target, headers, body)
        return self.route(method, target, headers, bytes(body))  # a few KiB at most

    # ---------------------------------------------------------------- routing (sans-IO)

    def route(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> Reply:
        path = target.split(b"?", 1)[0]
        if method == b"POST":
            if path not in (b"/", b"/ocsp"):
                return _plain(405 if self._is_get_route(path) else 404, extra=[(b"allow", b"GET, HEAD")])
            ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if ctype != OCSP_REQUEST:
                return _plain(415)
            return self._ocsp(body, headers, post=True)
        if method not in (b"GET", b"HEAD"):
            return _plain(405, extra=[(b"allow", b"GET, HEAD, POST")])
        if path == b"/health":
            n = self.store.responses_held()
            text = f"ok: {n} OCSP responses held for {len(self.store.cas)} CAs\n".encode()
            return Reply(200, [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")], text)
        m = _CA_PATH.match(path)
        if m and (m.group(1), m.group(3)) in ((b"crl", b"crl"), (b"ca", b"crt")):
            return self._ca_file(m.group(1), m.group(2).decode(), headers)
        if m and (m.group(1), m.group(3)) == (b"crl", b"json"):
            return self._shard_list(m.group(2).decode())
        if path in (b"/", b"/ocsp", b"/ocsp/") or m:
            return _plain(404)
        try:
            der = decode_get_path(target)
        except MalformedRequest:
            if path.startswith(b"/ocsp/"):
                return self._ocsp(b"", headers, post=False)  # asked as OCSP: answered as OCSP
            return _plain(404)
        return self._ocsp(der, headers, post=False)

    def route_cap(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> int:
        """The body cap of a request's route, from its head alone: an OCSP POST a few KiB, a tenant
        push its own larger cap once authorised (a refusal raises _Fail before any body byte is
        read), every other route none."""
        path = target.split(b"?", 1)[0]
        if path.startswith(b"/tenant/"):
            refusal = self.tenant_refusal(method, target, headers)
            if refusal is not None:
                raise _Fail(refusal.status, refusal)
            return self.cfg.push_cap
        if method == b"POST" and path in (b"/", b"/ocsp"):
            return self.cfg.body_cap
        return 0

    def tenant_refusal(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> Reply | None:
        """The answer to a tenant push that is refused on its head (route, method, bearer secret,
        content type), or None: the body may be read. The secret's SHA-256 is compared in constant
        time, and an unknown tenant costs the same and looks the same."""
        m = _TENANT_PATH.match(target.split(b"?", 1)[0])
        if m is None:
            return _plain(404, close=True)
        if method not in (b"PUT", b"POST"):
            return _plain(405, close=True, extra=[(b"allow", b"PUT, POST")])
        name = m.group(1).decode()
        t = self.tenants.by_name.get(name) if self.tenants is not None else None
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        token = token.strip()
        if t is not None:
            ok = t.secret_ok(token)
        else:
            hmac.compare_digest(hashlib.sha256(token).digest(), bytes(32))  # the same work as for a tenant
            ok = False
        if scheme.lower() != b"bearer" or not ok:
            self.stats.push_refused += 1
            return _plain(401, close=True, extra=[(b"www-authenticate", b'Bearer realm="donjon"')])  # an unknown tenant looks the same
        ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if ctype != b"application/pkix-crl":
            return _plain(415, close=True)
        if self.push is None:
            return _plain(503, close=True)
        return None

    async def tenant_push(self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes | bytearray) -> Reply:
        """PUT/POST /tenant/<name>/crl, once its body is read: the CRL itself is verified by the
        Factory, whose one-line verdict is the answer."""
        refusal = self.tenant_refusal(method, target, headers)  # already passed before the body: cheap
        if refusal is not None:
            return refusal
        m = _TENANT_PATH.match(target.split(b"?", 1)[0])
        assert m is not None and self.push is not None  # tenant_refusal checked both
        name = m.group(1).decode()
        try:
            with trio.fail_after(PUSH_TIMEOUT):
                outcome = await self.push(name, body)
        except trio.TooSlowError:
            return _plain(503)
        text = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
        if outcome == "accepted":
            return Reply(200, text, b"accepted\n")
        if outcome.startswith("unavailable:"):
            return Reply(503, text, outcome.encode("utf-8", "replace")[:400] + b"\n")
        self.stats.push_refused += 1
        return Reply(422, text, outcome.encode("utf-8", "replace")[:400] + b"\n")

    @staticmethod
    def _is_get_route(path: bytes) -> bool:
        return path == b"/health" or _CA_PATH.match(path) is not None

    def _ocsp(self, der: bytes, headers: dict[bytes, bytes], post: bool) -> Reply:
        answer = self.responder.answer(der)
        self.stats.count(answer)
        base = [(b"content-type", OCSP_RESPONSE)]
        if not answer.successful or not answer.cacheable:  # errors, and live answers (a nonce is unique)
            return Reply(200, base + [(b"cache-control", b"no-store")], answer.der)
        now = self.clock()
        plain = post or (b"if-none-match" not in headers and b"if-modified-since" not in headers)  # no 304 to decide
        if plain and answer.next_update - now >= self.cfg.max_age:
            w = self._wire.get(answer.der)
            if w is not None and w[0] is answer:
                return w[1]
        max_age = max(0, min(int(answer.next_update - now), self.cfg.max_age))
        etag = b'"' + hashlib.sha256(answer.der).hexdigest().encode() + b'"'
        cache = [
            (b"last-modified", _http_date(answer.this_update)),
            (b"expires", _http_date(answer.next_update)),
            (b"cache-control", b"max-age=%d, public, no-transform, must-revalidate" % max_age),
            (b"etag", etag),
        ]
        if not post and _not_modified(headers, etag, answer.this_update):
            return Reply(304, cache)
        if plain and max_age == self.cfg.max_age:
            hdrs = base + cache
            reply = Reply(200, hdrs, answer.der, wire=b"".join(k + b": " + v + b"\r\n" for k, v in hdrs) +
                          b"content-length: %d\r\n" % len(answer.der))
            if len(self._wire) >= HOT_MAX:
                self._wire.clear()
            self._wire[answer.der] = (answer, reply)
            return reply
        return Reply(200, base + cache, answer.der)

    def _shard_list(self, name: str) -> Reply:
        """/crl/<ca>.json: the URL of every CRL shard of a sharded CA, as CCADB asks ("JSON array of partitioned CRLs")."""
        ca = self.store.cas.get(name)
        if ca is None or not ca.shards:
            return _plain(404)
        body = json.dumps([ca.shards[k][4] for k in sorted(ca.shards)]).encode() + b"\n"
        return Reply(200, [(b"content-type", b"application/json"), (b"cache-control", b"no-cache")], body)

    def _ca_file(self, kind: bytes, name: str, headers: dict[bytes, bytes]) -> Reply:
        ca = self.store.cas.get(name)
        sd = _SHARD_DELTA.match(name) if ca is None and kind == b"crl" else None
        if sd and self.store.cas.get(sd.group(1)) is not None:  # /crl/<ca>-<k>-delta.crl: shard k's delta
            d = self.store.cas[sd.group(1)].shard_deltas.get(int(sd.group(2)))
            got = d + ("",) if d else None
            if got is None:
                return _plain(404)
            _, body, etag, mtime, _ = got
            hdrs = [(b"etag", etag.encode()), (b"last-modified", _http_date(mtime)), (b"cache-control", b"no-cache")]
            if _not_modified(headers, etag.encode(), mtime):
                return Reply(304, hdrs)
            return Reply(200, [(b"content-type", b"application/pkix-crl")] + hdrs, body)
        if ca is None and kind == b"crl" and (sm := _SHARD_NAME.match(name)):  # /crl/<ca>-<k>.crl: one shard
            ca = self.store.cas.get(sm.group(1))
            if sm.group(2) == "delta":  # /crl/<ca>-delta.crl: its delta CRL
                got = ca.delta + ("",) if ca is not None and ca.delta else None
            else:
                got = ca.shards.get(int(sm.group(2))) if ca is not None else None
            if got is None:
                return _plain(404)
            _, body, etag, mtime, _ = got
            hdrs = [(b"etag", etag.encode()), (b"last-modified", _http_date(mtime)), (b"cache-control", b"no-cache")]
            if _not_modified(headers, etag.encode(), mtime):
                return Reply(304, hdrs)
            return Reply(200, [(b"content-type", b"application/pkix-crl")] + hdrs, body)
        if ca is None:
            return _plain(404)
        if kind == b"crl":
            if ca.crl is None:
                return _plain(404)
            body, etag, mtime, ctype = ca.crl, ca.crl_etag, ca.crl_mtime, b"application/pkix-crl"
        else:
            body, etag, mtime, ctype = ca.cert, ca.cert_etag, ca.cert_mtime, b"application/pkix-cert"
        hdrs = [(b"etag", etag.encode()), (b"last-modified", _http_date(mtime)), (b"cache-control", b"no-cache")]
        if _not_modified(headers, etag.encode(), mtime):
            return Reply(304, hdrs)
        return Reply(200, [(b"content-type", ctype)] + hdrs, body)

    # ---------------------------------------------------------------- connections (trio)

    def new_stream(self, conn: socket.socket) -> "_RawStream":
        return _RawStream(conn)  # the socket driven directly: see _RawStream

    async def _connection(self, stream: trio.abc.Stream, held: _Held) -> None:
        """The fast path first (the request shapes OCSP clients send, parsed by hand, strictly);
        at the first request that is anything else, h11 takes the connection over, with the bytes
        already read, and keeps it. Each request: its head within head_timeout and all of it within
        read_timeout, counted from the connection or from the previous answer."""
        buf = bytearray()
        raw = type(stream) is _RawStream
        while True:
            got = None
            start = trio.current_time()
            if raw and self._arrived(stream, buf):  # type: ignore[arg-type]
                # All of the request is here (the usual case under load): read without waiting, so no deadline.
                try:
                    got = await self._read_fast(stream, buf, None, start, held)
                except _Fail as f:
                    got = f
                scope = None
            else:
                with trio.move_on_at(start + min(self.cfg.head_timeout, self.cfg.read_timeout)) as scope:
                    self._heads[held] = (scope, start)
                    try:
                        got = await self._read_fast(stream, buf, scope, start, held)
                    except _Fail as f:
                        got = f
                    finally:
                        self._heads.pop(held, None)
            if scope is not None and scope.cancelled_caught:
                if not buf or held.evicted:
                    return  # an idle keep-alive connection, or evicted: close quietly
                await self._send(stream, _raw_reply(_plain(408, close=True), self.clock(), False, False))
                await self._close(stream)
                return
            if isinstance(got, _Fail):
                await self._send(stream, _raw_reply(got.reply, self.clock(), True, False))
                await self._close(stream)
                return
            if got is None:
                return  # closed by the client (possibly before any request: costs nothing)
            if got is _FALLBACK:
                self._release(held)  # h11 reserves again for the same request
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.cfg.header_cap)
                conn.receive_data(bytes(buf))
                del buf  # h11 holds those bytes now
                await self._h11_connection(stream, conn, start, held)
                return
            method, target, headers, body, keep_alive = got
            try:
                reply = self.route(method, target, headers, body)
            except Exception as e:  # noqa: BLE001 - mapped to 500, never shown
                self.stats.errors += 1
                print(f"donjon[ocsp]: handler error: {type(e).__name__}", file=sys.stderr, flush=True)
                reply = _plain(500, close=True)
            del got, body
            self._release(held)
            close = reply.close or not keep_alive
            head = method == b"HEAD" or reply.status == 304
            if head or len(reply.body) <= CHUNK:  # an OCSP answer: one write
                data = _raw_reply(reply, self.clock(), close, head)
                sent = stream.send_now(data) if type(stream) is _RawStream else 0
                if sent < len(data):
                    await self._send(stream, memoryview(data)[sent:])  # the rest, under the send deadline
                else:
                    await stream.sent()  # taken at once: no deadline to set (the fairness count still applies)
            else:  # a large CRL: the head, then the held body itself, piece by piece (no copy per client)
                await self._send(stream, _raw_reply(reply, self.clock(), close, True))
                view = memoryview(reply.body)
                for i in range(0, len(view), CHUNK):
                    await self._send(stream, view[i:i + CHUNK])
            if close:
                await self._close(stream)
                return

    def _arrived(self, stream: "_RawStream", buf: bytearray) -> bool:
        """Whether a whole request in a head already seen is in `buf`, after one read that does not wait
        if it is not yet. The bytes read stay in `buf` either way; _read_fast decides everything."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            data = stream.receive_now(FAST_READ)
            if not data:
                return False
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
        parsed = self._heads_seen.get(bytes(buf[:end]))
        return parsed is not None and len(buf) >= end + 4 + parsed[3]

    async def _read_fast(self, stream, buf: bytearray, scope: trio.CancelScope | None, start: float, held: _Held):
        """One request in the common shape: (method, target, headers, body, keep_alive); None if
        the client closed before sending anything; _FALLBACK for anything else (h11 decides). The
        request's bytes are removed from `buf`, what follows them (pipelining) stays."""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                if end > self.cfg.header_cap:
                    return _FALLBACK
                break
            if len(buf) > self.cfg.header_cap:
                return _FALLBACK
            data = await stream.receive_some(FAST_READ)
            if not data:
                return _FALLBACK if buf else None
            buf += data
        head = bytes(buf[:end])
        parsed = self._heads_seen.get(head)
        if parsed is None:
            parsed = _parse_head(head, self.cfg.body_cap)
            if parsed is None:
                return _FALLBACK
            if len(self._heads_seen) >= _HEADS_SEEN_MAX:
                self._heads_seen.clear()
            self._heads_seen[head] = parsed
        method, target, headers, length, keep_alive = parsed
        begin = end + 4
        self._heads.pop(held, None)  # the head is in: no longer evictable
        if length:
            if length > self.route_cap(method, target, headers):
                raise _Fail(413)  # a POST elsewhere than OCSP: no body read, as on the h11 path
            self._reserve(held, length)
            if scope is not None:
                scope.deadline = start + self.cfg.read_timeout  # the head is in: the body has what is left
        while len(buf) < begin + length:
            data = await stream.receive_some(FAST_READ)
            if not data:
                return _FALLBACK  # h11 sees the truncated body and the close
            buf += data
        body = bytes(buf[begin:begin + length])
        del buf[:begin + length]
        return method, target, headers, body, keep_alive

_FALLBACK = object()
_HEADS_SEEN_MAX = 256

# Operations that complete at once (no wait) before a connection yields to the others anyway: a client
# whose pipelined requests are always there cannot hold the process, and its deadlines still apply.
_YIELD_EVERY = 8


class _RawStream:
    """The connection's socket driven directly (non-blocking calls, trio only to wait for readiness):
    trio's SocketStream adds a scheduling round to every call that completes at once, which is most of
    the cost of a small answer. Same contract as the parts of trio.abc.Stream the endpoint uses."""

    __slots__ = ("_dry", "_quick", "sock")

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._quick = 0
        self._dry = False  # receive_now just found nothing: the next receive_some waits first

    async def _count(self) -> None:
        self._quick += 1
        if self._quick >= _YIELD_EVERY:
            self._quick = 0
            await trio.lowlevel.checkpoint()

    def receive_now(self, max_bytes: int) -> bytes | None:
        """What has arrived, without waiting: None if nothing yet (b"" at the end of the stream)."""
        try:
            return self.sock.recv(max_bytes)
        except BlockingIOError:
            self._dry = True
            return None
        except OSError as e:
            raise trio.BrokenResourceError from e

    async def receive_some(self, max_bytes: int) -> bytes:
        if self._dry:  # nothing was there a moment ago: wait before asking again
            self._dry = False
            self._quick = 0
            await trio.lowlevel.wait_readable(self.sock)
        while True:
            try:
                data = self.sock.recv(max_bytes)
            except BlockingIOError:
                self._quick = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as e:
                raise trio.BrokenResourceError from e
            await self._count()
            return data

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                self._quick = 0
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as e:
                raise trio.BrokenResourceError from e
            view = view[n:]
        await self._count()

    def send_now(self, data: bytes) -> int:
        """As much of `data` as the socket takes without waiting (a small answer: all of it); then sent()."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise trio.BrokenResourceError from e

    async def sent(self) -> None:
        await self._count()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            raise trio.BrokenResourceError from e

    async def aclose(self) -> None:
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)  # wakes any waiter before the fd number is reused
            self.sock.close()
        await trio.lowlevel.checkpoint()


_REQUEST_LINE = re.compile(rb"^(GET|POST|HEAD) (/[\x21-\x7e]*) HTTP/1\.([01])$")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_VALUE = re.compile(rb"^[\x20-\x7e]*$")
_FAST_HEADERS = {b"host", b"content-type", b"content-length", b"connection", b"accept", b"user-agent",
                 b"if-none-match", b"if-modified-since", b"cache-control", b"pragma", b"accept-encoding"}


def _parse_head(head: bytes, body_cap: int):
    """The strict subset of HTTP/1.x the fast path answers: GET/HEAD/POST, an origin-form target,
    known headers once each with plain values, Host on 1.1, Content-Length exactly on POST, no
    Transfer-Encoding, Expect or tenant push. Anything else: None (h11 and the checks around it
    decide, as for any request). Returns (method, target, headers, body length, keep-alive)."""
    lines = head.split(b"\r\n")
    m = _REQUEST_LINE.match(lines[0])
    if m is None:
        return None
    method, target, minor = m.group(1), m.group(2), m.group(3)
    if target.startswith(b"/tenant/"):
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        name = name.lower()
        if not sep or name not in _FAST_HEADERS or name in headers or not _TOKEN.match(name):
            return None
        value = value.strip(b" \t")
        if not _VALUE.match(value):
            return None
        headers[name] = value
    if minor == b"1" and not headers.get(b"host"):
        return None
    cl = headers.get(b"content-length")
    if method == b"POST":
        if cl is None or not cl.isdigit() or len(cl) > 9 or int(cl) > body_cap:
            return None
        length = int(cl)
    else:
        if cl not in (None, b"0"):
            return None
        length = 0
    conn = headers.get(b"connection", b"").lower()
    if conn not in (b"", b"close", b"keep-alive"):
        return None
    # h11 keeps HTTP/1.0 connections for one request only; the fast path does the same.
    keep_alive = minor == b"1" and conn != b"close"
    return method, target, headers, length, keep_alive


def _raw_reply(reply: Reply, now: float, close: bool, head: bool) -> bytes:
    """A response serialised as h11 would (HTTP/1.1 status line, lower-case names, Content-Length)."""
    if reply.wire is not None and not head and not reply.close:
        return b"".join((b"HTTP/1.1 %d %s\r\ndate: " % (reply.status, _REASONS.get(reply.status, b"")), _http_date(now),
                         b"\r\n", reply.wire, b"Connection: close\r\n\r\n" if close else b"\r\n", reply.body))
    out = [b"HTTP/1.1 %d %s\r\ndate: %s\r\n" % (reply.status, _REASONS.get(reply.status, b""), _http_date(now))]
    for k, v in reply.headers:
        out.append(k + b": " + v + b"\r\n")
    out.append(b"content-length: %d\r\n" % len(reply.body))
    if reply.close:
        out.append(b"connection: close\r\n")
    elif close:
        out.append(b"Connection: close\r\n")  # what h11 adds for a connection it will not keep
    out.append(b"\r\n")
    if not head and reply.status != 304:
        out.append(bytes(reply.body))
    return b"".join(out)


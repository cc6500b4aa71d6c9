"""HTTP hardening of the endpoint on a real socket on 127.0.0.1 (server in a trio thread)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ocsp.http import Endpoint, HttpConfig
from appliance.ocsp.store import Store
from tests.unit.test_ocsp_pki import cert_id_request, make_ca, published


class Server:
    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10)

    def _run(self):
        async def main():
            self.token = trio.lowlevel.current_trio_token()
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
            async with trio.open_nursery() as n:
                self.scope = n.cancel_scope
                await n.start(self.endpoint.serve, listener)
                self._ready.set()
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self):
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def raw(port: int, data: bytes, timeout: float = 5.0, shut: bool = False) -> tuple[bytes, float]:
    """Send `data`, read until the server closes (bounded); returns (bytes, seconds to close)."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = bytearray()
        try:
            while len(out) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return bytes(out), time.monotonic() - t


def health(port: int) -> bytes:
    out, took = raw(port, b"GET /health HTTP/1.0\r\n\r\n", timeout=5)
    assert out.startswith(b"HTTP/1.1 200") or out.startswith(b"HTTP/1.0 200"), out
    assert took < 2.0
    return out


@pytest.fixture(scope="module")
def pki():
    return make_ca("issuing")


@pytest.fixture
def server(tmp_path, pki):
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", pki.der)
    st.publish_responses("issuing", [published(pki, 7)], seq=1)
    srv = Server(Endpoint(st, HttpConfig(max_connections=8, read_timeout=0.5, max_age=300)))
    yield srv
    srv.stop()
    st.close()


def test_keep_alive_and_http10(server, pki):
    req = cert_id_request(pki, [7])
    post = (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n\r\n" % len(req)) + req
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for _ in range(3):  # three requests on one connection
            s.sendall(post)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200") and b"application/ocsp-response" in head
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += s.recv(65536)
    out, _ = raw(server.port, b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")  # openssl-style: 1.0, Host without port
    assert b"ok: 1 OCSP responses held" in out


def test_cl_and_te_is_refused(server):
    out, took = raw(server.port, b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                                 b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"connection: close" in out.lower()
    assert took < 2.0  # closed by the server, not by our timeout
    health(server.port)


def test_big_header_is_refused(server):
    out, took = raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20480 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431") or out.startswith(b"HTTP/1.1 400"), out[:40]
    assert took < 2.0
    # The same, trickled in small pieces (h11's own cap applies while the head is incomplete).
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(40):
                s.sendall(b"X-A: " + b"b" * 500 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 431") or data.startswith(b"HTTP/1.1 400") or data == b""
    health(server.port)


def test_huge_content_length_without_body_hits_the_deadline(server):
    out, took = raw(server.port, b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                                 b"Content-Length: 6000\r\n\r\nabc", timeout=10)  # under the OCSP body cap
    assert 0.4 <= took < 3.0, took
    assert out == b"" or out.startswith(b"HTTP/1.1 408")
    out, took = raw(server.port, b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                                 b"Content-Length: 99999999\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and took < 2.0  # over the body cap: refused at once
    health(server.port)


def test_connect_and_close_costs_nothing(server):
    for _ in range(200):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    t = time.monotonic()
    health(server.port)
    assert time.monotonic() - t < 1.0
    for _ in range(100):
        if server.endpoint.active == 0:
            break
        time.sleep(0.02)
    assert server.endpoint.active == 0


def test_max_connections(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(8)]
    try:
        for _ in range(100):
            if server.endpoint.active == 8:
                break
            time.sleep(0.02)
        assert server.endpoint.active == 8
        out, took = raw(server.port, b"GET /health HTTP/1.0\r\n\r\n")
        assert out == b"" and took < 1.0  # over the limit: closed at once
    finally:
        for s in idle:
            s.close()
    for _ in range(100):
        if server.endpoint.active == 0:
            break
        time.sleep(0.02)
    health(server.port)


def test_handler_errors_are_500_without_text(tmp_path, pki):
    class Broken(Endpoint):
        def route(self, *a):
            raise RuntimeError("secret detail")

    st = Store.open(str(tmp_path / "s2"))
    srv = Server(Broken(st, HttpConfig(read_timeout=0.5)))
    try:
        out, _ = raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 500") and b"secret" not in out and b"RuntimeError" not in out
        assert srv.endpoint.stats.errors == 1
    finally:
        srv.stop()
        st.close()


def test_routes_and_methods(server):
    assert raw(server.port, b"DELETE /health HTTP/1.0\r\n\r\n")[0].startswith(b"HTTP/1.1 405")
    assert raw(server.port, b"GET /nothing.here HTTP/1.0\r\n\r\n")[0].startswith(b"HTTP/1.1 404")
    out = raw(server.port, b"POST /ocsp HTTP/1.0\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\nx")[0]
    assert out.startswith(b"HTTP/1.1 415")
    out = raw(server.port, b"GET /ocsp/MAA= HTTP/1.0\r\n\r\n")[0]
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\x30\x03\x0a\x01\x01")  # malformedRequest
    head = raw(server.port, b"HEAD /ca/issuing.crt HTTP/1.0\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")


_METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"G\x00T", b""])
_TARGETS = st.sampled_from([b"/", b"/ocsp", b"/ocsp/MAA=", b"/health", b"/crl/issuing.crl", b"/ca/x.crt", b"*", b"/%%"])
_HEADERS = st.lists(st.sampled_from([b"Host: x", b"Content-Length: 3", b"Content-Length: -1", b"Transfer-Encoding: chunked",
                                     b"Content-Type: application/ocsp-request", b"Expect: 100-continue", b"Connection: close",
                                     b"If-None-Match: *", b"If-Modified-Since: garbage", b": empty", b"X: \x00\xff"]), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=_METHODS, target=_TARGETS, version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x"]),
       headers=_HEADERS, body=st.binary(max_size=200), noise=st.binary(max_size=64))
def test_fuzz_raw_requests_never_kill_the_server(server, method, target, version, headers, body, noise):
    data = method + b" " + target + b" " + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body + noise
    raw(server.port, data, timeout=3, shut=True)
    assert server.thread.is_alive()
    health(server.port)  # the next normal request still works


def test_after_fuzz_normal_request_works(server):
    raw(server.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, timeout=3, shut=True)  # a TLS hello
    health(server.port)


def _no_date(out: bytes) -> bytes:
    return b"\r\n".join(ln for ln in out.split(b"\r\n") if not ln.lower().startswith(b"date:"))


def test_fast_path_answers_exactly_as_h11(server, pki):
    """The hand-written fast path and h11 (forced by a header the fast path does not take) send the
    same bytes for the common requests."""
    req = cert_id_request(pki, [7])
    import base64
    b64 = base64.b64encode(req)
    cases = [
        b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n%s\r\n" % (len(req), b"%s") + req,
        b"POST / HTTP/1.0\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n%s\r\n" % (len(req), b"%s") + req,
        b"GET /ocsp/" + b64 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n",
        b"GET /" + b64 + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n%s\r\n",
        b"GET /ca/issuing.crt HTTP/1.0\r\n%s\r\n",
        b"HEAD /health HTTP/1.0\r\n%s\r\n",
        b"GET /nothing HTTP/1.0\r\n%s\r\n",
        b"GET /ocsp/MAA= HTTP/1.0\r\n%s\r\n",
        b"POST /ocsp HTTP/1.0\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n%s\r\nx",
    ]
    for c in cases:
        fast, _ = raw(server.port, c.replace(b"%s", b""), shut=True)
        slow, _ = raw(server.port, c.replace(b"%s", b"X-Force-H11: 1\r\n"), shut=True)
        assert fast and _no_date(fast) == _no_date(slow), (c, fast, slow)


_HEAD_LINES = st.lists(st.sampled_from([
    b"Host: x", b"host:x", b"Content-Length: 3", b"Content-Length: 03", b"Content-Length: 3 ", b"Content-Length:+3",
    b"Content-Type: application/ocsp-request", b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade",
    b"Accept: */*", b"User-Agent: t", b"If-None-Match: \"x\"", b"host: x", b" Host: x", b"Host : x", b"Host: a\tb",
    b"Host: \x7f", b"Transfer-Encoding: chunked", b"Cache-Control: no-cache"]), max_size=5)


@settings(max_examples=500, deadline=None)
@given(line=st.sampled_from([b"GET / HTTP/1.1", b"POST /ocsp HTTP/1.1", b"POST /ocsp HTTP/1.0", b"HEAD /x HTTP/1.0",
                             b"GET /a b HTTP/1.1", b"GET http://x/ HTTP/1.1", b"get / HTTP/1.1", b"GET / HTTP/1.2",
                             b"GET /\xff HTTP/1.1", b"POST /tenant/x/crl HTTP/1.1"]),
       lines=_HEAD_LINES, body=st.binary(max_size=8))
def test_fast_path_takes_only_what_h11_reads_the_same(line, lines, body):
    import h11
    from appliance.ocsp.http import _parse_head
    head = b"\r\n".join([line, *lines])
    parsed = _parse_head(head, 1024)
    if parsed is None:
        return
    method, target, headers, length, keep_alive = parsed
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n" + body[:length].ljust(length, b"z"))
    ev = conn.next_event()  # h11 must accept it, as the same request
    assert isinstance(ev, h11.Request) and ev.method == method and ev.target == target
    assert {k: v for k, v in ev.headers} == headers
    if length:
        data = conn.next_event()
        assert isinstance(data, h11.Data) and len(data.data) == length
    assert isinstance(conn.next_event(), h11.EndOfMessage)

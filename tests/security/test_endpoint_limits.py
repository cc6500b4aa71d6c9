"""The endpoint's limits against unauthenticated and slow clients, on a real socket on 127.0.0.1
(the server in a trio thread): auth before body, per-route body caps, the cap on bodies in flight,
per-source connection limits and the request-head deadline."""

from __future__ import annotations

import hashlib
import select
import socket
import time

import pytest

from appliance.ipc import schema as S
from appliance.ocsp.http import PUSH_CAP, Endpoint, HttpConfig, source_key
from appliance.ocsp.store import Store
from appliance.ocsp.tenants import Tenants
from tests.unit.test_ocsp_http import Server, health, raw
from tests.unit.test_ocsp_pki import cert_id_request, make_ca, make_crl, published

SECRET = b"s3cret-push-token-0123456789"
MiB = 1024 * 1024


class FakeFactory:
    """A fake of the Factory end of the push link (no Factory in a unit test; the real one is
    exercised in test_endpoint_flood.py): records what reached it, answers `accepted`."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int]] = []

    async def push(self, tenant: str, der: bytes) -> str:
        self.got.append((tenant, len(der)))
        return "accepted"


@pytest.fixture(scope="module")
def pki():
    return make_ca("issuing"), make_ca("partner")


def _endpoint(tmp_path, pki, **cfg) -> tuple[Endpoint, FakeFactory, Store]:
    ca, partner = pki
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", ca.der)
    st.publish_responses("issuing", [published(ca, 7)], seq=1)
    tn = Tenants(str(tmp_path / "store"))
    tn.configure(S.TenantConfig(tenant="partner", ca_cert=partner.der, unissued="unknown",
                                push_secret_sha256=hashlib.sha256(SECRET).digest(), responder_label=None,
                                responder_cert=None))
    fake = FakeFactory()
    return Endpoint(st, HttpConfig(**cfg), tenants=tn, push=fake.push), fake, st


@pytest.fixture
def served(tmp_path, pki):
    ep, fake, st = _endpoint(tmp_path, pki, max_connections=64, read_timeout=3.0, head_timeout=3.0)
    srv = Server(ep)
    yield srv, fake
    srv.stop()
    st.close()


def _push_head(name: str = "partner", secret: bytes | None = SECRET, length: int = 8 * MiB,
               ctype: bytes = b"application/pkix-crl", method: bytes = b"PUT", extra: bytes = b"") -> bytes:
    auth = b"Authorization: Bearer " + secret + b"\r\n" if secret is not None else b""
    return (method + b" /tenant/" + name.encode() + b"/crl HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype + b"\r\n"
            + auth + extra + b"Content-Length: %d\r\n\r\n" % length)


def _open(port: int, data: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    if data:
        s.sendall(data)
    return s


def _answer(s: socket.socket) -> bytes:
    """The first response head the server sends on `s` (b"" if it closes first)."""
    out = b""
    try:
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def _wait(cond, bound: float = 5.0) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_push_is_refused_on_its_head_before_any_body_byte(served, pki):
    """Wrong or missing secret, unknown tenant, wrong type or method: answered from the head alone,
    at once (no body was sent: the old code waited for it), nothing reached the Factory."""
    srv, fake = served
    ep = srv.endpoint
    cases = [
        (_push_head(secret=b"wrong-secret-0123456789"), b"401"),
        (_push_head(secret=None), b"401"),
        (_push_head(name="nobody"), b"401"),  # an unknown tenant looks the same
        (_push_head(secret=b"wrong", extra=b"Expect: 100-continue\r\n"), b"401"),
        (_push_head(ctype=b"application/octet-stream"), b"415"),
        (_push_head(method=b"DELETE"), b"405"),
        (_push_head(length=PUSH_CAP + 1), b"413"),  # authorised, but over the push cap
        (_push_head(secret=b"wrong", length=PUSH_CAP + 1), b"401"),  # authentication first
    ]
    for head, status in cases:
        t = time.monotonic()
        with _open(srv.port, head) as s:
            out = _answer(s)
        assert out.startswith(b"HTTP/1.1 " + status), (head, out)
        assert b"100 Continue" not in out and b"connection: close" in out.lower()
        assert time.monotonic() - t < 2.0  # answered, not timed out (read_timeout is 3 s)
    assert fake.got == [] and ep.inflight == 0
    assert ep.stats.push_refused == 5
    # The right secret: the body is asked for (100 Continue) and reaches the Factory.
    crl = make_crl(pki[1], 1)
    with _open(srv.port, _push_head(length=len(crl), extra=b"Expect: 100-continue\r\n")) as s:
        assert _answer(s).startswith(b"HTTP/1.1 100")
        s.sendall(crl)
        out = _answer(s)
    assert out.startswith(b"HTTP/1.1 200"), out
    assert fake.got == [("partner", len(crl))] and ep.inflight == 0
    health(srv.port)


def test_each_route_has_its_own_body_cap(served, pki):
    srv, fake = served
    ocsp = b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n\r\n"
    for head, status in [
        (ocsp % (8 * 1024 + 1), b"413"),  # an OCSP request is a few hundred bytes
        (ocsp % 60000, b"413"),
        (ocsp.replace(b"%d", b"9" * 19), b"413"),
        (ocsp.replace(b"%d", b"9" * 5000), b"400"),  # more digits than int() takes: refused by h11, no error
        (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2001\r\n" + b"a" * 0x2001 + b"\r\n0\r\n\r\n", b"413"),  # chunked: counted as it arrives
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n", b"413"),  # no body on a GET route
        (b"POST /health HTTP/1.0\r\nContent-Type: application/ocsp-request\r\nContent-Length: 10\r\n\r\n", b"413"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", b"413"),
    ]:
        out, took = raw(srv.port, head, timeout=5)
        assert out.startswith(b"HTTP/1.1 " + status), (head[:80], out[:60])
        assert took < 2.0
    req = cert_id_request(pki[0], [7])
    out, _ = raw(srv.port, (ocsp % len(req)) + req, shut=True)
    assert out.startswith(b"HTTP/1.1 200") and b"application/ocsp-response" in out
    assert srv.endpoint.inflight == 0 and fake.got == [] and srv.endpoint.stats.errors == 0


def test_bodies_in_flight_are_capped(served, pki):
    """Authorised pushes that declare 8 MiB each: three fit in the pushes' share of the in-flight cap,
    the fourth is answered 503 before its body is read; OCSP requests still pass (their own share);
    once a push finishes, its bytes are free again."""
    srv, fake = served
    ep = srv.endpoint
    held = [_open(srv.port, _push_head(length=8 * MiB)) for _ in range(3)]
    try:
        _wait(lambda: ep.inflight == 24 * MiB)
        with _open(srv.port, _push_head(length=8 * MiB)) as s:
            out = _answer(s)
        assert out.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in out.lower(), out
        assert ep.stats.busy == 1
        req = cert_id_request(pki[0], [7])
        post = b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n\r\n" % len(req)
        assert raw(srv.port, post + req, shut=True)[0].startswith(b"HTTP/1.1 200")
        held[0].sendall(b"\0" * (8 * MiB))  # one push completes (the fake Factory accepts anything)
        assert _answer(held[0]).startswith(b"HTTP/1.1 200")
        _wait(lambda: ep.inflight == 16 * MiB)
        with _open(srv.port, _push_head(length=8 * MiB)) as s:
            _wait(lambda: ep.inflight == 24 * MiB)  # its room is back
    finally:
        for s in held:
            s.close()
    _wait(lambda: ep.inflight == 0 and ep.active == 0)
    assert fake.got == [("partner", 8 * MiB)]


def test_per_source_connection_limit(tmp_path, pki):
    ep, _, st = _endpoint(tmp_path, pki, max_connections=64, max_per_source=4, read_timeout=3.0, head_timeout=3.0)
    srv = Server(ep)
    try:
        idle = [_open(srv.port, source="127.0.0.2") for _ in range(4)]
        _wait(lambda: ep.active == 4)
        with _open(srv.port, b"GET /health HTTP/1.0\r\n\r\n", source="127.0.0.2") as s:
            assert _answer(s) == b""  # the fifth from that address: closed at once
        assert ep.stats.refused_connections == 1
        for src in ("127.0.0.1", "127.0.0.3"):  # other sources are served meanwhile
            with _open(srv.port, b"GET /health HTTP/1.0\r\n\r\n", source=src) as s:
                assert _answer(s).startswith(b"HTTP/1.1 200")
        idle.pop().close()
        _wait(lambda: ep.active == 3)
        with _open(srv.port, b"GET /health HTTP/1.0\r\n\r\n", source="127.0.0.2") as s:
            assert _answer(s).startswith(b"HTTP/1.1 200")  # room again for that source
        for s in idle:
            s.close()
        _wait(lambda: ep.active == 0 and not ep.sources)
    finally:
        srv.stop()
        st.close()


def test_source_key_groups_an_ipv6_64_and_unmaps_ipv4():
    assert source_key("192.0.2.1") == bytes([192, 0, 2, 1]) == source_key("::ffff:192.0.2.1")
    assert source_key("192.0.2.1") != source_key("192.0.2.2")
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:ffff:ffff:1") == source_key("2001:db8::2%eth0")
    assert source_key("2001:db8::1") != source_key("2001:db8:0:1::1")
    assert source_key("") == b""


def test_request_head_deadline(tmp_path, pki):
    """A head trickled byte by byte is cut at head_timeout (not read_timeout), an idle connection
    closed quietly at head_timeout; a body may still take up to read_timeout."""
    ep, _, st = _endpoint(tmp_path, pki, max_connections=64, head_timeout=0.5, read_timeout=4.0)
    srv = Server(ep)
    try:
        t = time.monotonic()
        with _open(srv.port) as s:
            out = b""
            try:
                for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    s.sendall(bytes([b]))
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            out = _answer(s)
        took = time.monotonic() - t
        assert out.startswith(b"HTTP/1.1 408"), out
        assert 0.4 < took < 3.0, took  # cut near 0.5 s, well before the 4 s read_timeout
        t = time.monotonic()
        with _open(srv.port) as s:
            assert s.recv(10) == b""  # idle: closed quietly
        assert 0.4 < time.monotonic() - t < 3.0
        # A POST whose head arrives at once and whose body takes 1.5 s (past the head deadline): answered.
        req = cert_id_request(pki[0], [7])
        with _open(srv.port, b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(req)) as s:
            for i in range(0, len(req), len(req) // 3 + 1):
                time.sleep(0.5)
                s.sendall(req[i:i + len(req) // 3 + 1])
            assert _answer(s).startswith(b"HTTP/1.1 200")
        health(srv.port)
    finally:
        srv.stop()
        st.close()


def test_limits_are_configured_and_checked(tmp_path):
    """`ocsp.max-connections-per-source` and `ocsp.head-timeout`: defaults from the shipped
    donjon.toml, bad values refused with the file, line and key."""
    from appliance import config as C
    (tmp_path / "donjon.toml").write_text(C.DEFAULT_TOML)
    o = C.load(str(tmp_path)).ocsp
    assert (o.max_connections_per_source, o.head_timeout, o.read_timeout) == (64, 5.0, 10.0)
    for line, key in (("max-connections-per-source = 0", "max-connections-per-source"), ("head-timeout = -1", "head-timeout")):
        (tmp_path / "donjon.toml").write_text(f"[ocsp]\n{line}\n")
        with pytest.raises(C.ConfigError) as e:
            C.load(str(tmp_path))
        assert "line 2" in str(e.value) and key in str(e.value) and "\n" not in str(e.value)


def _closed(socks: list[socket.socket]) -> list[socket.socket]:
    """Those the server closed without a word (bounded wait for the close to arrive)."""
    time.sleep(0.2)
    r, _, _ = select.select(socks, [], [], 0)
    for s in r:
        assert s.recv(100) == b""
    return r


def test_at_the_connection_limit_the_oldest_slow_head_makes_room(tmp_path, pki):
    """Many sources (here 8, one slot each) holding every slot with heads that never complete: a new
    client evicts the one that waited longest (over EVICT_AFTER) and is answered; connections that
    have just arrived are never evicted (the next one is refused instead)."""
    ep, _, st = _endpoint(tmp_path, pki, max_connections=8, max_per_source=1, head_timeout=30.0, read_timeout=30.0)
    srv = Server(ep)
    try:
        slow = [_open(srv.port, b"GET /health HTTP/1.1\r\n", source=f"127.0.1.{i}") for i in range(8)]
        _wait(lambda: ep.active == 8)
        time.sleep(1.2)  # past EVICT_AFTER
        with _open(srv.port, b"GET /health HTTP/1.0\r\n\r\n", source="127.0.2.1") as s:
            assert _answer(s).startswith(b"HTTP/1.1 200")  # the old code: closed at once
        assert ep.stats.evicted == 1 and len(_closed(slow)) == 1  # one of them, closed quietly (no 408)
        _wait(lambda: ep.active == 7)  # the other seven still wait for their heads
        for s in slow:
            s.close()
        _wait(lambda: ep.active == 0 and not ep._heads)
        # All slots just taken: nothing old enough to evict, the newcomer is refused.
        young = [_open(srv.port, source=f"127.0.4.{i}") for i in range(8)]
        _wait(lambda: ep.active == 8)
        with _open(srv.port, b"GET /health HTTP/1.0\r\n\r\n", source="127.0.2.3") as s:
            assert _answer(s) == b""
        assert ep.stats.evicted == 1
        for s in young:
            s.close()
    finally:
        srv.stop()
        st.close()

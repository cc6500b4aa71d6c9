"""The endpoint's caches of what it already answered (responder answers, POST replies, request heads):
a cached answer is always the answer the rules give now, byte for byte, on a mutation corpus too."""

from __future__ import annotations

import base64
import random
import time
import urllib.parse

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ocsp import responder as responder_mod
from appliance.ocsp.http import Endpoint, HttpConfig, _raw_reply
from appliance.ocsp.responder import MALFORMED, TRY_LATER, Responder, error_response
from appliance.ocsp.store import Store
from appliance.ocsp.tenants import Tenants
from tests.unit.test_ocsp_pki import cert_id_request, make_ca, mutate, published


@pytest.fixture(scope="module")
def ca():
    return make_ca("issuing")


@pytest.fixture
def store(tmp_path, ca):
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", ca.der)
    yield st
    st.close()


def _post(ep: Endpoint, der: bytes, now: float) -> bytes:
    """The whole wire answer of a keep-alive POST, as the fast path sends it."""
    return _raw_reply(ep.route(b"POST", b"/ocsp", {b"content-type": b"application/ocsp-request"}, der), now, False, False)


def _get(ep: Endpoint, der: bytes, now: float, headers: dict | None = None, close: bool = False) -> bytes:
    target = b"/ocsp/" + urllib.parse.quote(base64.b64encode(der).decode(), safe="").encode()
    return _raw_reply(ep.route(b"GET", target, headers or {}, b""), now, close, False)


def test_a_revocation_a_republication_and_a_compaction_are_seen_at_once(store, ca, tmp_path):
    now = int(time.time())
    good = published(ca, 0x10)
    store.publish_responses("issuing", [good], seq=1)
    clock = [float(now)]
    ep = Endpoint(store, HttpConfig(max_age=300), clock=lambda: clock[0])
    req = cert_id_request(ca, [0x10])
    first, again = ep.responder.answer(req), ep.responder.answer(req)
    assert first.der == good[4] and again is first  # the second one from the cache
    w1 = _post(ep, req, now)
    assert w1 == _post(ep, req, now) and w1.endswith(good[4]) and b"max-age=300," in w1
    g1 = _get(ep, req, now)
    assert g1 == w1 == _get(ep, req, now)  # a GET without a condition: the same prebuilt reply
    assert _get(ep, req, now, close=True).endswith(b"Connection: close\r\n\r\n" + good[4])
    etag = [ln for ln in g1.split(b"\r\n") if ln.startswith(b"etag: ")][0][6:]
    assert _get(ep, req, now, {b"if-none-match": etag}).startswith(b"HTTP/1.1 304 ")  # conditions still decided
    assert _get(ep, req, now, {b"if-none-match": b'"other"'}) == w1
    # Revoked: the next answer, POST or GET, is the new response.
    revoked = published(ca, 0x10, status="revoked", revoked_at=now - 1, reason=x509.ReasonFlags.key_compromise)
    store.publish_responses("issuing", [revoked], seq=2)
    a = ep.responder.answer(req)
    assert (a.outcome, a.der) == ("revoked", revoked[4])
    assert _post(ep, req, now).endswith(revoked[4])
    assert ep.route(b"GET", b"/ocsp/" + base64.b64encode(req), {}, b"").body == revoked[4]
    # Compaction moves the bytes: still the same answers.
    store.compact("issuing")
    assert ep.responder.answer(req).der == revoked[4] and _post(ep, req, now).endswith(revoked[4])
    # The same name published with another certificate: its old CertIDs are no longer served.
    other = make_ca("issuing")
    store.publish_ca("issuing", other.der)
    assert ep.responder.answer(req).outcome == "unauthorized"


def test_a_cached_answer_is_never_served_past_its_next_update_nor_with_a_stale_max_age(store, ca):
    good = published(ca, 0x20)
    store.publish_responses("issuing", [good], seq=1)
    nu = good[3]
    clock = [float(nu - 3600)]
    ep = Endpoint(store, HttpConfig(max_age=600), clock=lambda: clock[0])
    req = cert_id_request(ca, [0x20])
    assert b"max-age=600," in _post(ep, req, clock[0])
    clock[0] = nu - 100.5  # closer than max-age: the age is counted down, not the cached one
    assert b"max-age=100," in _post(ep, req, clock[0])
    clock[0] = nu - 700  # back to a whole max-age away: the prebuilt reply again
    assert b"max-age=600," in _post(ep, req, clock[0])
    clock[0] = nu  # at nextUpdate: tryLater, never the held answer
    a = ep.responder.answer(req)
    assert (a.outcome, a.der) == ("trylater", error_response(TRY_LATER))
    assert _post(ep, req, clock[0]).endswith(error_response(TRY_LATER))


def test_a_tenant_taking_an_issuer_drops_the_cache(tmp_path, store, ca):
    from appliance.ipc import schema as S
    good = published(ca, 0x30)
    store.publish_responses("issuing", [good], seq=1)
    tn = Tenants(str(tmp_path / "store"))
    r = Responder(store, clock=time.time, tenants=tn)
    req = cert_id_request(ca, [0x30])
    assert r.answer(req).der == good[4] and r.answer(req).der == good[4]
    tn.configure(S.TenantConfig(tenant="t", ca_cert=ca.der, unissued="unauthorized", push_secret_sha256=None,
                                responder_label=None, responder_cert=None))
    assert r.answer(req).outcome == "unauthorized"  # the tenant's rules now: no responder, so unauthorized
    tn.remove("t")
    assert r.answer(req).der == good[4]


def test_nonce_and_error_answers_are_not_kept_and_the_cache_is_bounded(store, ca, monkeypatch):
    store.publish_responses("issuing", [published(ca, s) for s in range(1, 9)], seq=1)
    monkeypatch.setattr(responder_mod, "HOT_MAX", 4)
    r = Responder(store, clock=time.time)
    with_nonce = cert_id_request(ca, [1], nonce=b"n" * 16)
    assert r.answer(with_nonce).outcome == "good"
    for bad in (b"\x30\x00", cert_id_request(ca, [0x99]), cert_id_request(ca, [1, 2])):
        assert r.answer(bad).outcome in ("malformed", "unauthorized")
    assert r._hot == {}  # a later responder key changes a nonce request's answer; errors are not worth keeping
    for s in range(1, 9):
        r.answer(cert_id_request(ca, [s]))
        assert len(r._hot) <= 4


# ---------------------------------------------------------------- mutation corpus: cached == decided afresh


_FUZZ: dict = {}


def _fuzz_setup(tmp_path_factory):
    if not _FUZZ:
        ca = make_ca("issuing")
        st = Store.open(str(tmp_path_factory.mktemp("hot") / "store"))
        st.publish_ca("issuing", ca.der)
        st.publish_responses("issuing", [published(ca, s) for s in (1, 2, 0x7F, 0x80, 0x1234)], seq=1)
        st.publish_responses("issuing", [published(ca, s, alg="sha256") for s in (1, 0x80)], seq=2)
        seeds = [cert_id_request(ca, [s], alg) for s in (1, 0x80, 0x1234) for alg in ("sha1", "sha256")]
        seeds += [cert_id_request(ca, [1], nonce=b"abcdefgh"), cert_id_request(ca, [1, 2])]
        now = time.time()
        _FUZZ.update(store=st, seeds=seeds, warm=Endpoint(st, HttpConfig(max_age=300), clock=lambda: now), now=now)
    return _FUZZ


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    yield _fuzz_setup(tmp_path_factory)
    if _FUZZ:
        _FUZZ["store"].close()
        _FUZZ.clear()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(0, 7), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                                              st.sampled_from(["flip", "set", "cut", "insert"])), max_size=3))
def test_fuzz_cached_answers_equal_fresh_ones(fuzz, k, edits):
    """Each mutated request is asked twice of one long-lived endpoint (the second from its caches when
    the first was kept) and once of a new one: the three wire answers are the same bytes, and what is not
    an OCSP request of ours is malformedRequest."""
    der, now = mutate(fuzz["seeds"][k % len(fuzz["seeds"])], edits), fuzz["now"]
    warm = fuzz["warm"]
    fresh = Endpoint(fuzz["store"], HttpConfig(max_age=300), clock=lambda: now)
    a, b, c = _post(warm, der, now), _post(warm, der, now), _post(fresh, der, now)
    assert a == b == c
    if der:
        assert _get(warm, der, now) == _get(warm, der, now) == _get(Endpoint(fuzz["store"], HttpConfig(max_age=300),
                                                                              clock=lambda: now), der, now)
    assert fresh.responder._decide(der) == warm.responder.answer(der)
    if der and fresh.responder.answer(der).outcome == "malformed":
        assert c.endswith(b"\r\n\r\n" + error_response(MALFORMED))


def test_the_cache_holds_across_many_distinct_requests(store, ca):
    serials = random.Random(5).sample(range(1, 10_000), 40)
    store.publish_responses("issuing", [published(ca, s) for s in serials], seq=1)
    ep = Endpoint(store, HttpConfig(max_age=300))
    reqs = {s: cert_id_request(ca, [s]) for s in serials}
    for _ in range(3):
        for s, q in reqs.items():
            a = ep.responder.answer(q)
            assert a.outcome == "good" and ocsp.load_der_ocsp_response(a.der).serial_number == s


# ---------------------------------------------------------------- on a real socket: requests that are all here, and those that are not


def _answers(s, n: int) -> list[bytes]:
    """n HTTP answers read off a keep-alive connection (bodies by Content-Length), bounded."""
    out, buf = [], b""
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return out
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(buf) < length:
            chunk = s.recv(65536)
            if not chunk:
                return out
            buf += chunk
        out.append(head + b"\r\n\r\n" + buf[:length])
        buf = buf[length:]
    return out


def test_pipelined_split_and_stalled_requests_on_one_connection(tmp_path, ca):
    import socket

    from tests.unit.test_ocsp_http import Server
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", ca.der)
    held = {s: published(ca, s) for s in (5, 6, 7)}
    st.publish_responses("issuing", list(held.values()), seq=1)
    srv = Server(Endpoint(st, HttpConfig(max_connections=8, read_timeout=0.5, max_age=300)))
    try:
        def post(serial: int) -> bytes:
            q = cert_id_request(ca, [serial])
            return b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n\r\n" % len(q) + q
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(post(5) + post(6) + post(7) + post(5))  # pipelined: answered in order, heads parsed once
            got = _answers(s, 4)
            assert [g.split(b"\r\n\r\n", 1)[1] for g in got] == [held[5][4], held[6][4], held[7][4], held[5][4]]
            assert all(g.startswith(b"HTTP/1.1 200 OK\r\n") and b"max-age=300," in g for g in got)
            whole = post(6)
            for cut in (10, len(whole) - 20, len(whole) - 1):  # a known head with its body late; an unknown head in pieces
                s.sendall(whole[:cut])
                time.sleep(0.05)
                s.sendall(whole[cut:])
                assert _answers(s, 1)[0].endswith(held[6][4])
            s.sendall(whole[:-3])  # stalls: the request deadline still holds after answers taken without one
            t = time.monotonic()
            rest = s.recv(65536)
            assert rest.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 3
            s.settimeout(3)
            assert s.recv(65536) == b""  # then closed
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(post(7)[:-1])
            s.shutdown(socket.SHUT_WR)  # a body cut short by the client: no answer for it, the connection closed
            got = s.recv(65536)
            assert not got.startswith(b"HTTP/1.1 200"), got
    finally:
        srv.stop()
        st.close()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    from tests.unit.test_ocsp_http import Server
    ca = make_ca("issuing")
    st = Store.open(str(tmp_path_factory.mktemp("live") / "store"))
    st.publish_ca("issuing", ca.der)
    st.publish_responses("issuing", [published(ca, s) for s in (5, 6)], seq=1)
    srv = Server(Endpoint(st, HttpConfig(max_connections=16, read_timeout=0.5, max_age=300)))
    yield srv, ca
    srv.stop()
    st.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2))
def test_fuzz_a_request_already_all_here_is_answered_as_the_first_time(live_server, k, edits):
    """Mutated whole requests (head or body), each sent twice on new connections: the second time its head
    is known and it is read without a deadline; the answers are the same bytes but for Date."""
    import socket

    from tests.unit.test_ocsp_http import _no_date, raw
    srv, ca = live_server
    q = cert_id_request(ca, [5 + k % 2])
    heads = [b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n\r\n",
             b"POST / HTTP/1.0\r\nContent-Type: application/ocsp-request\r\nContent-Length: %d\r\n\r\n"]
    data = bytearray(heads[k // 2] % len(q) + q)
    for pos, val in edits:
        data[pos % len(data)] = val
    first, _ = raw(srv.port, bytes(data), timeout=3, shut=True)
    second, _ = raw(srv.port, bytes(data), timeout=3, shut=True)
    assert _no_date(first) == _no_date(second)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=3):
        pass  # the server still takes connections

"""The endpoint's store and the responder's decisions (sans-IO, injectable clock)."""

from __future__ import annotations

import os
import random
import time

import pytest
from cryptography import x509

from appliance.ocsp.responder import MALFORMED, TRY_LATER, UNAUTHORIZED, Responder, error_response
from appliance.ocsp.store import Prepared, Store
from tests.unit.test_ocsp_pki import cert_id_request, make_ca, make_crl, published


@pytest.fixture(scope="module")
def ca():
    return make_ca("issuing")


@pytest.fixture
def store(tmp_path, ca):
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", ca.der)
    yield st
    st.close()


def test_error_responses_are_bare_statuses():
    assert error_response(MALFORMED) == bytes.fromhex("3003 0a01 01")
    assert error_response(UNAUTHORIZED) == bytes.fromhex("3003 0a01 06")


def test_decisions(store, ca):
    now = int(time.time())
    good, revoked = published(ca, 0x10), published(ca, 0x11, status="revoked", revoked_at=now - 5,
                                                   reason=x509.ReasonFlags.key_compromise)
    assert store.publish_responses("issuing", [good, revoked], seq=1) == (2, [])
    r = Responder(store, clock=lambda: now)
    a = r.answer(cert_id_request(ca, [0x10]))
    assert (a.outcome, a.der) == ("good", good[4])
    assert r.answer(cert_id_request(ca, [0x11], nonce=b"12345678")).outcome == "revoked"
    # Never issued, or not published with this CertID hash: unauthorized, never good.
    for req in (cert_id_request(ca, [0x12]), cert_id_request(ca, [0x10], "sha256")):
        a = r.answer(req)
        assert (a.outcome, a.der) == ("unauthorized", error_response(UNAUTHORIZED))
    other = make_ca("other")
    assert r.answer(cert_id_request(other, [0x10])).outcome == "unauthorized"  # an issuer we do not serve
    assert r.answer(cert_id_request(ca, [0x10, 0x11])).outcome == "unauthorized"  # several CertIDs: live signing later
    assert r.answer(b"\x30\x00").der == error_response(MALFORMED)
    # Past nextUpdate: never served.
    late = Responder(store, clock=lambda: good[3] + 1)
    a = late.answer(cert_id_request(ca, [0x10]))
    assert (a.outcome, a.der) == ("trylater", error_response(TRY_LATER))


def test_rejects_responses_that_do_not_match(store, ca):
    other = make_ca("other")
    wrong_issuer = published(other, 0x20)
    s, alg, tu, nu, der = published(ca, 0x21)
    wrong_serial = ((0x22).to_bytes(1, "big"), alg, tu, nu, der)
    wrong_hash = (s, "sha256", tu, nu, der)
    stored, bad = store.publish_responses("issuing", [wrong_issuer, wrong_serial, wrong_hash, (s, alg, tu, nu, b"\x30\x03junk")])
    assert stored == 0 and len(bad) == 4
    assert store.responses_held() == 0


def test_persistence_replacement_and_crl_order(tmp_path, ca):
    path = str(tmp_path / "store")
    st = Store.open(path)
    st.publish_ca("issuing", ca.der)
    now = int(time.time())
    first = published(ca, 0x30, this_update=now - 100)
    st.publish_responses("issuing", [first, published(ca, 0x31, alg="sha256")], seq=5)
    newer = published(ca, 0x30, status="revoked", this_update=now - 50, revoked_at=now - 60)
    older = published(ca, 0x30, this_update=now - 200)
    assert st.publish_responses("issuing", [newer], seq=6)[0] == 1
    assert st.publish_responses("issuing", [older], seq=7)[0] == 0  # older: ignored
    crl5, crl4, crl6 = make_crl(ca, 5), make_crl(ca, 4), make_crl(ca, 6)
    assert st.crl_chunk("issuing", 5, crl5[:10], False) is False
    assert st.crl_chunk("issuing", 5, crl5[10:], True) is True
    assert st.crl_chunk("issuing", 4, crl4, True) is False
    with pytest.raises(ValueError):
        st.crl_chunk("issuing", 9, crl6, True)  # the DER says 6
    answers = {s: Responder(st).answer(cert_id_request(ca, [s], alg)).der for s, alg in ((0x30, "sha1"), (0x31, "sha256"))}
    st.close()

    st = Store.open(path)
    assert answers[0x30] == newer[4]
    for (s, alg), der in zip(((0x30, "sha1"), (0x31, "sha256")), answers.values()):
        assert Responder(st).answer(cert_id_request(ca, [s], alg)).der == der
    assert st.cas["issuing"].crl == crl5 and st.cas["issuing"].crl_number == 5
    assert st.max_seq() == 6 and st.responses_held() == 2
    assert st.crl_chunk("issuing", 6, crl6, True) is True
    st.close()
    assert Store.open(path).cas["issuing"].crl_number == 6


def test_torn_tail_is_cut(tmp_path, ca):
    path = str(tmp_path / "store")
    st = Store.open(path)
    st.publish_ca("issuing", ca.der)
    st.publish_responses("issuing", [published(ca, 0x40)], seq=1)
    st.publish_responses("issuing", [published(ca, 0x41), published(ca, 0x42)], seq=2)
    st.close()
    idx = os.path.join(path, "issuing", "responses.0.idx")
    with open(idx, "r+b") as f:  # the last message's last entry is torn: that message is not complete
        f.truncate(os.path.getsize(idx) - 10)
    st = Store.open(path)
    assert st.max_seq() == 1  # the Factory will resend seq 2
    assert st.responses_held() == 2  # 0x40 and 0x41 (0x42 lost, resent)
    st.publish_responses("issuing", [published(ca, 0x42)], seq=2)
    st.close()
    assert Store.open(path).responses_held() == 3


def test_compaction_keeps_answers(tmp_path, ca):
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", ca.der)
    der = published(ca, 0x50)[4]
    for rnd in range(3):
        batch = [Prepared("sha1", s, 0, 1000 + rnd, 2**33, der) for s in range(5000)]
        p = st.plan("issuing", batch, rnd + 1)
        p.write()
        st.commit(p, rnd + 1)
    assert st.cas["issuing"].dead == 10000 and not st.needs_compaction("issuing")
    st.compact("issuing")
    assert st.cas["issuing"].dead == 0 and st.responses_held() == 5000
    assert st.get(st.cas["issuing"], "sha1", 4999).der == der
    st.close()
    st = Store.open(str(tmp_path / "store"))
    assert st.responses_held() == 5000 and st.max_seq() == 3 and st.cas["issuing"].gen == 1
    assert sorted(os.listdir(tmp_path / "store" / "issuing")) == ["CURRENT", "ca.der", "responses.1.dat", "responses.1.idx"]


def test_scale_200k(tmp_path, ca):
    """Not asserted: prints the load time and RSS growth (1M measured by hand: see the report)."""
    st = Store.open(str(tmp_path / "store"))
    st.publish_ca("issuing", ca.der)
    der = published(ca, 1)[4] + b"\0" * 100
    rnd = random.Random(1)
    n = 200_000
    for i in range(0, n, 8192):
        p = st.plan("issuing", [Prepared("sha1", rnd.getrandbits(127), 0, 1000, 2**33, der) for _ in range(min(8192, n - i))], i + 1)
        p.write()
        st.commit(p, i + 1)
    st.close()

    def rss() -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) // 1024

    before = rss()
    t = time.perf_counter()
    st = Store.open(str(tmp_path / "store"))
    took = time.perf_counter() - t
    print(f"\nstore: {st.responses_held()} responses loaded in {took:.2f}s, RSS +{rss() - before} MB")
    assert st.responses_held() == n
    st.close()

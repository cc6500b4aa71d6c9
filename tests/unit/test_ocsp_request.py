"""OCSP request parsing: openssl-made requests, GET path variants, and malformed input (only
MalformedRequest may come out, whatever the bytes)."""

from __future__ import annotations

import base64
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ocsp.request import MAX_CERT_IDS, MalformedRequest, decode_get_path, parse_request
from policy.ocsp import issuer_hashes
from tests.unit.test_ocsp_pki import cert_id_request, make_ca, mutate

DATA = Path(__file__).resolve().parents[1] / "data" / "ocsp"


@pytest.fixture(scope="module")
def ca_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ocsp-req")
    ca = make_ca("issuing")
    return ca, ca.pem(d / "ca.pem"), d


def _openssl_req(ca_pem: Path, out: Path, *args: str) -> bytes:
    digest = [a for a in args if a == "-sha256"]  # openssl wants the digest before -issuer/-serial
    subprocess.run(["openssl", "ocsp", *digest, "-issuer", str(ca_pem), *[a for a in args if a != "-sha256"],
                    "-reqout", str(out)], check=True, capture_output=True, timeout=20)
    return out.read_bytes()


def test_openssl_sha1_no_nonce(ca_files):
    ca, pem, d = ca_files
    req = parse_request(_openssl_req(pem, d / "a.der", "-serial", "0x1234", "-no_nonce"))
    assert req.nonce is None and len(req.cert_ids) == 1
    cid = req.cert_ids[0]
    assert (cid.hash, cid.serial) == ("sha1", 0x1234)
    assert (cid.name_hash, cid.key_hash) == issuer_hashes(ca.der)["sha1"]  # our hashes agree with openssl's


def test_openssl_sha256_two_serials_and_nonce(ca_files):
    ca, pem, d = ca_files
    req = parse_request(_openssl_req(pem, d / "b.der", "-sha256", "-serial", "0x1234", "-serial", "0x99"))
    assert [c.serial for c in req.cert_ids] == [0x1234, 0x99]
    assert all(c.hash == "sha256" and (c.name_hash, c.key_hash) == issuer_hashes(ca.der)["sha256"] for c in req.cert_ids)
    assert req.nonce is not None and len(req.nonce) == 16


def test_nonce_with_one_serial(ca_files):
    _, pem, d = ca_files
    req = parse_request(_openssl_req(pem, d / "c.der", "-serial", "0x01"))
    assert req.nonce and req.cert_ids[0].serial == 1


def test_get_path_variants(ca_files):
    ca, _, _ = ca_files
    # Search serials until the base64 holds '/' and '+' (and so '//' sometimes): the router must keep them.
    seen: set[str] = set()
    # All-ones serials first: their bytes make '/' runs in the base64 wherever the alignment falls.
    for serial in [*range(1, 9), *(2 ** k - 1 for k in range(8, 41, 4)), *range(9, 5000)]:
        der = cert_id_request(ca, [serial])
        b64 = base64.b64encode(der).decode()
        new = {c for c in ("/", "+", "//") if c in b64} - seen
        if serial > 8 and not new:
            continue  # every variant for the first serials and for each that brings a new character, not for all
        for path in (f"/ocsp/{b64}", f"/{b64}", "/ocsp/" + urllib.parse.quote(b64, safe=""), "/" + urllib.parse.quote(b64, safe=""),
                     "/ocsp/" + b64.replace("/", "%2f").replace("+", "%2B").replace("=", "%3D"),
                     "/ocsp/" + b64.rstrip("="), "/ocsp/" + base64.urlsafe_b64encode(der).decode()):
            assert decode_get_path(path) == der, path
            assert decode_get_path(path.encode()) == der
        seen |= {c for c in ("/", "+", "//") if c in b64}
        if len(seen) == 3:
            break
    assert seen == {"/", "+", "//"}


@pytest.mark.parametrize("path", ["/", "/ocsp/", "/ocsp/%%%", "/ocsp/a", "/ocsp/!!!!", "ocsp/MAA=", "/ocsp/" + "A" * 300000])
def test_get_path_garbage(path):
    with pytest.raises(MalformedRequest):
        decode_get_path(path)


def test_limits(ca_files):
    ca, _, _ = ca_files
    assert len(parse_request(cert_id_request(ca, list(range(1, MAX_CERT_IDS + 1)))).cert_ids) == MAX_CERT_IDS
    for bad in (cert_id_request(ca, list(range(1, MAX_CERT_IDS + 2))), cert_id_request(ca, []),
                cert_id_request(ca, [1]) + b"\x00", b"", b"\x30" * 70000, cert_id_request(ca, [-5])):
        with pytest.raises(MalformedRequest):
            parse_request(bad)


def test_malformed_corpus_files():
    files = sorted(DATA.glob("bad-*.der"))
    assert files, "tests/data/ocsp/make.py writes the corpus"
    for f in files:
        with pytest.raises(MalformedRequest):
            parse_request(f.read_bytes())


def _valid_requests():
    ca = make_ca("fuzz")
    return [cert_id_request(ca, [1]), cert_id_request(ca, [2**126 + 5, 7], "sha256", nonce=b"n" * 16),
            cert_id_request(ca, [0x1234], nonce=b"x")]


_SEEDS = _valid_requests()


def _check(data: bytes) -> None:
    try:
        req = parse_request(data)
    except MalformedRequest:
        return
    assert 1 <= len(req.cert_ids) <= MAX_CERT_IDS


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    _check(data)
    _check(b"\x30" + bytes([len(data) & 0x7F]) + data)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["flip", "set", "cut", "insert", "dup"])), min_size=1, max_size=4))
def test_fuzz_mutated_der(seed, edits):
    _check(mutate(seed, edits))


# ---------------------------------------------------------------- the hand-read fast path

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from appliance.ocsp.request import _fast, _parse  # noqa: E402


def _certid_request(alg: str, null: bool, nh: bytes, kh: bytes, serial: int) -> bytes:
    from asn1crypto import ocsp as a
    algo = {"algorithm": alg}
    if null:
        from asn1crypto import core as c
        algo["parameters"] = c.Null()
    return a.OCSPRequest({"tbs_request": {"request_list": [{"req_cert": {
        "hash_algorithm": algo, "issuer_name_hash": nh, "issuer_key_hash": kh, "serial_number": serial}}]}}).dump()


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["sha1", "sha256"]), st.booleans(), st.data(), st.integers(0, 2**160 - 1))
def test_fast_path_reads_what_the_full_parser_reads(alg, null, data, serial):
    hl = 20 if alg == "sha1" else 32
    nh, kh = data.draw(st.binary(min_size=hl, max_size=hl)), data.draw(st.binary(min_size=hl, max_size=hl))
    der = _certid_request(alg, null, nh, kh, serial)
    fast = _fast(der)
    assert fast is not None and fast == _parse(der)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_fast_path_never_accepts_what_the_full_parser_refuses(data):
    der = bytearray(_certid_request("sha1", True, b"\x01" * 20, b"\x02" * 20, 0x1234567890))
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    fast = _fast(bytes(der))
    if fast is not None:
        assert fast == _parse(bytes(der))  # _parse raising here would fail the test

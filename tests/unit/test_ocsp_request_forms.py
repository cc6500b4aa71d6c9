"""OCSP request encodings real clients send (issue 11 item 8): Botan writes the default `version`
out explicitly. OpenSSL's responder answers it; so must ours, without loosening anything else."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from asn1crypto import ocsp as a_ocsp
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ocsp.request import MalformedRequest, parse_request
from policy.ocsp import issuer_hashes
from tests.data.ocsp.make import CORPUS, GOOD_CORPUS, KH, NH, botan
from tests.unit.test_ocsp_pki import make_ca, make_leaf

DATA = Path(__file__).resolve().parents[1] / "data" / "ocsp"


def test_corpus_files_match_make_py():
    for name, data in GOOD_CORPUS.items():
        assert (DATA / f"good-{name}.der").read_bytes() == data, name
    for name, data in CORPUS.items():
        assert (DATA / f"bad-{name}.der").read_bytes() == data, name


def test_botan_form_is_read_like_the_der_form():
    sha1 = parse_request((DATA / "good-botan-sha1.der").read_bytes())
    assert sha1.nonce is None and [(c.hash, c.name_hash, c.key_hash, c.serial) for c in sha1.cert_ids] == [("sha1", NH, KH, 0x1234)]
    sha256 = parse_request((DATA / "good-botan-sha256.der").read_bytes())
    assert [(c.hash, c.serial) for c in sha256.cert_ids] == [("sha256", 0x1234)]


@pytest.mark.parametrize("name", ["explicit-version-not-minimal", "explicit-version-long-length",
                                  "explicit-version-2", "explicit-version-trailing-data"])
def test_only_the_exact_explicit_v1_is_admitted(name):
    with pytest.raises(MalformedRequest):
        parse_request((DATA / f"bad-{name}.der").read_bytes())


def test_openssl_responder_and_ours_answer_the_botan_request(tmp_path):
    """The same Botan-form request for a real certificate: `openssl ocsp` as a responder answers it
    (the behaviour to match), and our parser yields that certificate's CertID."""
    ca = make_ca("botan")
    leaf = make_leaf(ca, 0x5EED1234)
    nh, kh = issuer_hashes(ca.der)["sha1"]
    der = botan(nh=nh, kh=kh, serial=leaf.serial_number)
    (tmp_path / "req.der").write_bytes(der)
    ca.pem(tmp_path / "ca.pem")
    (tmp_path / "ca.key").write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    expiry = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    (tmp_path / "index.txt").write_text(f"V\t{expiry}\t\t{leaf.serial_number:X}\tunknown\t/CN=leaf.example.org\n")
    subprocess.run(["openssl", "ocsp", "-index", str(tmp_path / "index.txt"), "-CA", str(tmp_path / "ca.pem"),
                    "-rsigner", str(tmp_path / "ca.pem"), "-rkey", str(tmp_path / "ca.key"),
                    "-reqin", str(tmp_path / "req.der"), "-respout", str(tmp_path / "resp.der"), "-nmin", "5"],
                   check=True, capture_output=True, timeout=30)
    text = subprocess.run(["openssl", "ocsp", "-respin", str(tmp_path / "resp.der"), "-resp_text", "-noverify"],
                          check=True, capture_output=True, timeout=30).stdout.decode()
    assert "Response Status: successful" in text and "Cert Status: good" in text, text
    assert f"Serial Number: {leaf.serial_number:X}" in text, text
    req = parse_request(der)
    assert [(c.hash, c.name_hash, c.key_hash, c.serial) for c in req.cert_ids] == [("sha1", nh, kh, leaf.serial_number)]


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(GOOD_CORPUS.values())), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                                               min_size=1, max_size=3))
def test_fuzz_around_the_explicit_version_form(seed, edits):
    """Mutations of the admitted form: a request, or MalformedRequest, nothing else; an accepted
    mutation still has the explicit v1 exactly, or is plain DER."""
    data = bytearray(seed)
    for pos, val in edits:
        data[pos % len(data)] = val
    try:
        req = parse_request(bytes(data))
    except MalformedRequest:
        return
    assert len(req.cert_ids) == 1
    data = bytes(data)
    assert a_ocsp.OCSPRequest.load(data).dump(force=True) == data or data[4:9] == b"\xa0\x03\x02\x01\x00"

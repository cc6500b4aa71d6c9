"""EST message handling (appliance/gateway/est.py): routes, Basic credentials, CSR bodies, channel binding, answers."""

from __future__ import annotations

import base64
import email
import random
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from appliance.gateway import est


def _csr(cn: str = "router-1", challenge: bytes | None = None, san: str | None = None, key=None) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if challenge is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(key, hashes.SHA256())


def _body(csr: x509.CertificateSigningRequest) -> bytes:
    return base64.encodebytes(csr.public_bytes(Encoding.DER))


def test_routes():
    assert est.route("/.well-known/est/simpleenroll") == est.Route(None, "simpleenroll")
    assert est.route("/.well-known/est/iot/cacerts") == est.Route("iot", "cacerts")
    for bad in ("/.well-known/est/", "/.well-known/est/nope", "/.well-known/est/a/b/cacerts", "/.well-known/est/../cacerts",
                "/.well-known/est/%2e%2e/cacerts", "/acme/cacerts"):
        with pytest.raises(est.EstError) as e:
            est.route(bad)
        assert e.value.status == 404
    assert est.method_allowed("cacerts", "GET") and not est.method_allowed("cacerts", "POST")
    assert est.method_allowed("simpleenroll", "POST") and not est.method_allowed("simpleenroll", "GET")


def test_basic_credentials():
    h = "Basic " + base64.b64encode(b"dev-7:pa:ss").decode()
    assert est.basic_credentials(h) == ("dev-7", "pa:ss")
    for bad in (None, "", "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
                "Basic " + base64.b64encode(b":pw").decode(), "Basic " + "A" * 2000,
                "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):
        assert est.basic_credentials(bad) is None


def test_read_csr():
    csr = _csr()
    assert est.read_csr(_body(csr), "application/pkcs10") == csr
    assert est.read_csr(_body(csr), None) == csr  # RFC 8951: the header may be absent
    cases = [(b"A" * (est.MAX_BODY + 1), "application/pkcs10", 413), (_body(csr), "text/plain", 415),
             (b"not base64 !", "application/pkcs10", 400), (base64.b64encode(b"\x30\x03\x02\x01\x01"), None, 400)]
    der = bytearray(csr.public_bytes(Encoding.DER))
    der[-2] ^= 1  # breaks the signature
    cases.append((base64.b64encode(bytes(der)), None, 400))
    for body, ctype, status in cases:
        with pytest.raises(est.EstError) as e:
            est.read_csr(body, ctype)
        assert e.value.status == status


def test_channel_binding():
    tls_unique = b"\x01\x02" * 6
    bound = _csr(challenge=base64.b64encode(tls_unique))
    assert est.check_channel_binding(bound, tls_unique, required=True) is True
    assert est.check_channel_binding(_csr(), tls_unique, required=False) is False
    for csr, tu, req, text in ((_csr(), tls_unique, True, "requires"), (bound, b"\x09" * 12, False, "does not match"),
                               (bound, None, False, "TLS 1.3")):
        with pytest.raises(est.EstError) as e:
            est.check_channel_binding(csr, tu, required=req)
        assert e.value.status == 400 and text in e.value.text


def test_reenroll_keeps_names():
    key = ec.generate_private_key(ec.SECP256R1())
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "router-1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("r1.example")]), critical=False).sign(key, hashes.SHA256()))
    est.check_reenroll(_csr("router-1", san="r1.example"), cert)
    for csr, text in ((_csr("router-2", san="r1.example"), "subject"), (_csr("router-1", san="evil.example"), "subjectAltName"),
                      (_csr("router-1"), "subjectAltName")):
        with pytest.raises(est.EstError) as e:
            est.check_reenroll(csr, cert)
        assert text in e.value.text


def _self_signed(cn: str) -> bytes:
    import datetime
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(7)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
            .public_bytes(Encoding.DER))


def test_answers_read_by_openssl(tmp_path):
    a, b = _self_signed("A"), _self_signed("B")
    (tmp_path / "p7.b64").write_bytes(est.certs_only_b64([a, b]))
    out = subprocess.run(["openssl", "base64", "-d", "-in", str(tmp_path / "p7.b64"), "-out", str(tmp_path / "p7.der")], check=True)
    out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "p7.der"), "-print_certs", "-noout"],
                         capture_output=True, text=True, check=True)
    assert "subject=CN = A" in out.stdout and "subject=CN = B" in out.stdout
    (tmp_path / "attrs.b64").write_bytes(est.csrattrs_b64(["p256", "rsa2048"]))
    subprocess.run(["openssl", "base64", "-d", "-in", str(tmp_path / "attrs.b64"), "-out", str(tmp_path / "attrs.der")], check=True)
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "attrs.der")], capture_output=True, text=True, check=True)
    assert "challengePassword" in out.stdout and "ecdsa-with-SHA256" in out.stdout and "sha256WithRSAEncryption" in out.stdout
    key = ec.generate_private_key(ec.SECP256R1())
    pk8 = key.private_bytes(Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ctype, body = est.serverkeygen_body(pk8, [a], "est-boundary-1")
    msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["application/pkcs8", "application/pkcs7-mime"]
    assert base64.b64decode(parts[0].get_payload()) == pk8


def test_fuzz_bodies_never_crash():
    """Bounded mutation fuzz of EST bodies and headers: only EstError, never another exception."""
    rng = random.Random(7030)
    seed = _body(_csr(challenge=b"c2VjcmV0", san="x.example"))
    refused = 0
    for _ in range(500):
        body = bytearray(seed if rng.random() < 0.5 else base64.b64decode(seed))
        for _ in range(rng.randint(1, 5)):
            pos = rng.randrange(max(1, len(body)))
            body[pos:pos + rng.randint(0, 3)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 3)))
        try:
            csr = est.read_csr(bytes(body), "application/pkcs10")
            est.check_channel_binding(csr, b"x" * 12, required=False)
        except est.EstError:
            refused += 1
        est.basic_credentials("Basic " + base64.b64encode(bytes(body[:40])).decode())
        try:
            est.route("/.well-known/est/" + bytes(body[:12]).decode("latin-1"))
        except est.EstError:
            pass
    assert refused > 400

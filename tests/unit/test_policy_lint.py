"""pkilint in-process: clean documents give no findings, broken ones do, garbage never crashes."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from policy.lint import lint_certificate, lint_crl, lint_ocsp_response
from policy.profiles import builtin_profiles

P = builtin_profiles()
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
KEY = ec.generate_private_key(ec.SECP256R1())
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lint CA"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Donjon")])
SKI = x509.SubjectKeyIdentifier.from_public_key(KEY.public_key())


def _ca() -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(SKI, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(SKI.digest, None, None), critical=False)
        .sign(KEY, hashes.SHA256())
    )


CA = _ca()


def test_crl_from_cryptography_builder_is_clean():
    revoked = [
        x509.RevokedCertificateBuilder()
        .serial_number(n)
        .revocation_date(NOW - dt.timedelta(hours=1))
        .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
        .build()
        for n in (0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321)
    ]
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(NAME)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=7))
        .add_extension(x509.CRLNumber(42), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(SKI.digest, None, None), critical=False)
    )
    for r in revoked:
        b = b.add_revoked_certificate(r)
    crl = b.sign(KEY, hashes.SHA256())
    assert lint_crl(crl.public_bytes(serialization.Encoding.DER)) == []


def test_crl_without_crl_number_is_flagged():
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(NAME)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=7))
        .sign(KEY, hashes.SHA256())
    )
    findings = lint_crl(crl.public_bytes(serialization.Encoding.DER))
    assert findings and any("crl" in f.lower() for f in findings)


def test_ocsp_response_is_clean():
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(NAME)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .sign(KEY, hashes.SHA256())
    )
    resp = (
        ocsp.OCSPResponseBuilder()
        .add_response(leaf, CA, hashes.SHA1(), ocsp.OCSPCertStatus.GOOD, NOW, NOW + dt.timedelta(days=1), None, None)
        .responder_id(ocsp.OCSPResponderEncoding.HASH, CA)
        .sign(KEY, hashes.SHA256())
    )
    assert lint_ocsp_response(resp.public_bytes(serialization.Encoding.DER)) == []


def test_clean_ca_certificate():
    assert lint_certificate(CA.public_bytes(serialization.Encoding.DER), P["root-ca"]) == []


def test_broken_certificate_has_findings():
    # An end-entity certificate with an empty subject and no SAN (RFC 5280 4.1.2.6).
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(NAME)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=30))
        .sign(KEY, hashes.SHA256())
    )
    findings = lint_certificate(bad.public_bytes(serialization.Encoding.DER), P["tls-client"])
    assert findings
    assert all(f.split(": ", 1)[1].split(" ", 1)[0] in ("FATAL", "ERROR", "WARNING") for f in findings)


def test_chain_lint_catches_a_wrong_issuer():
    other_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(NAME)
        .public_key(other_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.AuthorityKeyIdentifier(SKI.digest, None, None), critical=False)
        .sign(other_key, hashes.SHA256())  # not signed by CA
    )
    findings = lint_certificate(
        leaf.public_bytes(serialization.Encoding.DER), P["tls-client"], CA.public_bytes(serialization.Encoding.DER)
    )
    assert any(f.startswith("chain: ") for f in findings)


def test_garbage_is_a_finding_not_a_crash():
    for blob in (b"", b"\x30\x03\x02\x01\x00", b"not der"):
        assert lint_certificate(blob, P["tls-client"])
        assert lint_crl(blob)
        assert lint_ocsp_response(blob)

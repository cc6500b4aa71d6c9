"""OCSP CertID issuer hashes (RFC 6960 §4.1.1): pure, shared by the CIS that signs and the endpoint that looks up."""

from __future__ import annotations

import hashlib

from asn1crypto import x509 as _x509

HASHES = ("sha1", "sha256")


def issuer_hashes(cert_der: bytes) -> dict[str, tuple[bytes, bytes]]:
    """{alg: (issuerNameHash, issuerKeyHash)} for CertIDs naming this CA as the issuer: the hash of
    the DER subject Name, and the hash of the subjectPublicKey BIT STRING's contents."""
    cert = _x509.Certificate.load(cert_der)
    name_der = cert["tbs_certificate"]["subject"].dump()
    key_bits = cert["tbs_certificate"]["subject_public_key_info"]["public_key"].contents[1:]  # skip unused-bits byte
    return {alg: (hashlib.new(alg, name_der).digest(), hashlib.new(alg, key_bits).digest()) for alg in HASHES}

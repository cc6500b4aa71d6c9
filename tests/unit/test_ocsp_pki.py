"""A small software-key PKI for the OCSP endpoint's tests (no tests here: helpers only).

CAs and leaves are made with cryptography; responses are pre-signed with OCSPResponseBuilder the
way the CIS pre-produces them (add_response_by_hash, one SingleResponse, signed by the CA key).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from policy.ocsp import issuer_hashes

UTC = dt.timezone.utc
_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


@dataclass
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def pem(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def make_ca(name: str = "issuing", cn: str | None = None) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Donjon Test"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn or f"Donjon Test {name} CA")])
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Ca(name, key, cert)


def make_leaf(ca: Ca, serial: int, cn: str = "leaf.example.org") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca.key, hashes.SHA256()))


def sign_response(ca: Ca, serial: int, *, alg: str = "sha1", status: str = "good", this_update: int | None = None,
                  next_update: int | None = None, revoked_at: int | None = None,
                  reason: x509.ReasonFlags | None = None) -> bytes:
    now = int(dt.datetime.now(UTC).timestamp())
    tu = now - 60 if this_update is None else this_update
    nu = tu + 86400 if next_update is None else next_update
    name_hash, key_hash = issuer_hashes(ca.der)[alg]
    cert_status = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
                   "unknown": ocsp.OCSPCertStatus.UNKNOWN}[status]
    b = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=name_hash, issuer_key_hash=key_hash, serial_number=serial, algorithm=_HASH[alg](),
        cert_status=cert_status, this_update=dt.datetime.fromtimestamp(tu, UTC),
        next_update=dt.datetime.fromtimestamp(nu, UTC),
        revocation_time=dt.datetime.fromtimestamp(revoked_at or tu, UTC) if status == "revoked" else None,
        revocation_reason=reason if status == "revoked" else None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def published(ca: Ca, serial: int, **kw) -> tuple[bytes, str, int, int, bytes]:
    """A PublishResponses item (serial big-endian bytes, hash, thisUpdate, nextUpdate, DER)."""
    der = sign_response(ca, serial, **kw)
    s = ocsp.load_der_ocsp_response(der)
    return (serial.to_bytes((serial.bit_length() + 7) // 8 or 1, "big"), kw.get("alg", "sha1"),
            int(s.this_update_utc.timestamp()), int(s.next_update_utc.timestamp()), der)


def make_crl(ca: Ca, number: int, revoked: list[tuple[int, int]] = ()) -> bytes:
    now = dt.datetime.now(UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(now - dt.timedelta(minutes=1))
         .next_update(now + dt.timedelta(days=7)).add_extension(x509.CRLNumber(number), critical=False))
    for serial, when in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(dt.datetime.fromtimestamp(when, UTC)).build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def cert_id_request(ca: Ca, serials: list[int], alg: str = "sha1", nonce: bytes | None = None) -> bytes:
    """An OCSPRequest built with asn1crypto (cryptography's builder takes one certificate only)."""
    from asn1crypto import ocsp as a_ocsp
    name_hash, key_hash = issuer_hashes(ca.der)[alg]
    reqs = [{"req_cert": {"hash_algorithm": {"algorithm": alg}, "issuer_name_hash": name_hash,
                          "issuer_key_hash": key_hash, "serial_number": s}} for s in serials]
    tbs = {"request_list": reqs}
    if nonce is not None:
        tbs["request_extensions"] = [{"extn_id": "nonce", "extn_value": nonce}]
    return a_ocsp.OCSPRequest({"tbs_request": tbs}).dump()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mutate(seed: bytes, edits) -> bytes:
    """`seed` with the fuzzers' edits applied in turn: (position, value, op), op one of flip (one bit),
    set (one byte), cut (the rest), insert (one byte), dup (repeat up to 15 bytes in place)."""
    data = bytearray(seed)
    for pos, val, op in edits:
        if not data:
            break
        i = pos % len(data)
        if op == "flip":
            data[i] ^= 1 << (val % 8)
        elif op == "set":
            data[i] = val
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = bytes([val])
        elif op == "dup":
            data[i:i] = data[i:i + (val % 16)]
        else:
            raise ValueError(f"unknown edit {op!r}")
    return bytes(data)

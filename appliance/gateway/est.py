"""EST (RFC 7030) messages, sans-IO: routes, bodies in (base64 PKCS#10, Basic credentials), answers out."""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

PREFIX = "/.well-known/est/"
OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen")
MAX_BODY = 16 * 1024  # one base64 CSR; larger bodies are refused before they are read
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")

CT_PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"
CT_CSRATTRS = "application/csrattrs"


class EstError(Exception):
    """A refusal with its HTTP status; the text is one line, safe to send and to audit."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Route:
    label: str | None  # the optional CA label segment (RFC 7030 §3.2.2)
    operation: str


def route(path: str) -> Route:
    """/.well-known/est/[label/]operation, nothing else."""
    if not path.startswith(PREFIX):
        raise EstError(404, "not an EST path")
    parts = path[len(PREFIX):].split("?", 1)[0].split("/")
    if len(parts) == 2 and _LABEL.fullmatch(parts[0]) and parts[1] in OPERATIONS:
        return Route(parts[0], parts[1])
    if len(parts) == 1 and parts[0] in OPERATIONS:
        return Route(None, parts[0])
    raise EstError(404, "unknown EST operation")


def method_allowed(op: str, method: str) -> bool:
    return method == ("GET" if op in ("cacerts", "csrattrs") else "POST")


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """user and password of an `Authorization: Basic` header, or None when absent or malformed."""
    if not authorization or len(authorization) > 1024:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or len(user) > 128 or len(password) > 256:
        return None
    return user, password


def read_csr(body: bytes, content_type: str | None) -> x509.CertificateSigningRequest:
    """The body of simpleenroll/simplereenroll/serverkeygen: base64 DER PKCS#10 (RFC 7030 §4.2.1;
    RFC 8951 allows the encoding header to be absent). The signature is checked here."""
    if len(body) > MAX_BODY:
        raise EstError(413, "request body too large")
    if content_type is not None and content_type.split(";")[0].strip().lower() != "application/pkcs10":
        raise EstError(415, "the body must be application/pkcs10")
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EstError(400, "the body is not base64") from None
    try:
        csr = x509.load_der_x509_csr(der)
        if csr.public_bytes(Encoding.DER) != der:
            raise ValueError("not DER")
        good = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - every decoder failure on hostile input is "malformed"
        raise EstError(400, "the body is not a PKCS#10 request") from None
    if not good:
        raise EstError(400, "the request's signature does not verify")
    return csr


def challenge_password(csr: x509.CertificateSigningRequest) -> bytes | None:
    try:
        v = csr.attributes.get_attribute_for_oid(x509.oid.AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None
    except Exception:  # noqa: BLE001
        raise EstError(400, "the challengePassword attribute is malformed") from None
    return v if isinstance(v, bytes) else str(v).encode()


def check_channel_binding(csr: x509.CertificateSigningRequest, tls_unique: bytes | None, required: bool) -> bool:
    """RFC 7030 §3.5: a client that proves the CSR was made for this TLS session puts base64(tls-unique)
    in challengePassword. Checked when present; when `required`, a CSR without it is refused. True when
    the binding was checked. (tls-unique exists only up to TLS 1.2; on TLS 1.3 a bound CSR is refused.)"""
    pw = challenge_password(csr)
    if pw is None:
        if required:
            raise EstError(400, "this EST server requires the CSR to be bound to the TLS session (tls-unique)")
        return False
    if tls_unique is None:
        raise EstError(400, "the CSR carries a channel binding but this TLS session has no tls-unique (TLS 1.3)")
    if not hmac.compare_digest(pw.strip(), base64.b64encode(tls_unique)):
        raise EstError(400, "the CSR's channel binding does not match this TLS session")
    return True


def check_reenroll(csr: x509.CertificateSigningRequest, current: x509.Certificate) -> None:
    """RFC 7030 §4.2.2: the subject and subjectAltName must be those of the certificate being renewed."""
    if csr.subject != current.subject:
        raise EstError(400, "re-enrolment must keep the subject of the current certificate")
    try:
        old = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        old = None
    try:
        new = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        new = None
    except Exception:  # noqa: BLE001
        raise EstError(400, "the request's extensions are malformed") from None
    if old != new:
        raise EstError(400, "re-enrolment must keep the subjectAltName of the current certificate")


def certs_only_b64(certs: list[bytes]) -> bytes:
    """A degenerate certs-only PKCS#7, base64 as EST sends it (RFC 7030 §4.1.3, §4.2.3)."""
    der = pkcs7.serialize_certificates([x509.load_der_x509_certificate(c) for c in certs], Encoding.DER)
    return _b64_lines(der)


def _b64_lines(der: bytes) -> bytes:
    b = base64.b64encode(der)
    return b"\r\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + b"\r\n"


class _CsrAttrs(core.SequenceOf):
    _child_spec = core.ObjectIdentifier


_SIG_OIDS = {"sha256_rsa": "1.2.840.113549.1.1.11", "ecdsa_sha256": "1.2.840.10045.4.3.2"}


def csrattrs_b64(key_types: list[str]) -> bytes:
    """CsrAttrs (RFC 7030 §4.5.2) as OIDs: the challengePassword (channel binding) and the signature
    algorithms of the key types the profile allows. A plain SEQUENCE OF OID, which every client reads."""
    oids = ["1.2.840.113549.1.9.7"]
    if any(k.startswith("rsa") for k in key_types):
        oids += [_SIG_OIDS["sha256_rsa"]]
    if any(k.startswith("p") for k in key_types):
        oids += [_SIG_OIDS["ecdsa_sha256"]]
    return _b64_lines(_CsrAttrs(oids).dump())


def serverkeygen_body(pkcs8_der: bytes, chain: list[bytes], boundary: str) -> tuple[str, bytes]:
    """RFC 7030 §4.4.2: multipart/mixed with the private key (application/pkcs8, returned over the
    TLS channel, unencrypted, as the RFC allows when the client asked for no key encryption) and the
    certificate (certs-only PKCS#7)."""
    parts = [
        ("application/pkcs8", _b64_lines(pkcs8_der)),
        (CT_PKCS7_CERTS, certs_only_b64(chain)),
    ]
    out = b""
    for ctype, body in parts:
        out += (f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode() + body
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/mixed; boundary={boundary}", out

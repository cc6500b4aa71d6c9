"""Delegated OCSP responder certificates, pure: the one check the Factory (tenant responders) and the endpoint (every responder it installs) make."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class ResponderRefused(ValueError):
    """The certificate must not be used as this responder's; the message is one line for the operator and the audit log."""


def check_responder_cert(der: bytes, key_spki: bytes, issuer: x509.Certificate | None = None,
                         now: float | None = None) -> tuple[x509.Certificate, bool]:
    """A responder certificate for the key `key_spki` (SubjectPublicKeyInfo DER): it certifies that key,
    carries id-kp-OCSPSigning, was issued by `issuer` (when given: a tenant CA; a local CA's is checked
    by the CIS that signed it) and is valid at `now` (when given). Returns it and whether it carries
    id-pkix-ocsp-nocheck. ResponderRefused otherwise."""
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # noqa: BLE001 - cryptography raises several types on bad DER or an unknown key type
        raise ResponderRefused("the responder certificate is not a DER or PEM X.509 certificate") from None
    if spki != key_spki:
        raise ResponderRefused("the responder certificate does not certify the key of the latest `tenant csr`"
                               if issuer is not None else "the responder certificate does not certify the token key")
    if issuer is not None:
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception:  # noqa: BLE001 - ValueError, TypeError, InvalidSignature
            raise ResponderRefused("the responder certificate is not issued by the tenant CA") from None
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = ()  # type: ignore[assignment]
    except ValueError:  # a malformed extension: cryptography parses extensions lazily
        raise ResponderRefused("the responder certificate has a malformed extension") from None
    if x509.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise ResponderRefused("the responder certificate lacks the id-kp-OCSPSigning extended key usage")
    if now is not None and not cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp():
        raise ResponderRefused("the responder certificate is not valid now")
    try:
        cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
        nocheck = True
    except x509.ExtensionNotFound:
        nocheck = False
    return cert, nocheck

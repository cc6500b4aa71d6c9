"""CRL-fed OCSP tenants, pure: check another CA's CRL before it is used, and read an issued-serials list.

Shared by the Factory (which accepts or refuses a CRL, whatever path it came by) and the OCSP
endpoint (which checks again what it loads from its own store). No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from policy import serials as serials_list

SKEW = 300  # seconds: a thisUpdate this far in the future is tolerated (clock skew between the CAs)
MAX_CRL = 64 << 20  # bytes of DER accepted from any intake path
MAX_SERIAL_BITS = 160

# RFC 5280 CRLReason codes by cryptography's ReasonFlags (the value 7 is unused).
REASON_CODES = {
    x509.ReasonFlags.unspecified: 0, x509.ReasonFlags.key_compromise: 1, x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3, x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5, x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8, x509.ReasonFlags.privilege_withdrawn: 9, x509.ReasonFlags.aa_compromise: 10,
}


class CrlRefused(Exception):
    """The CRL must not be used; the message is one line for the operator and the audit log."""


@dataclass(frozen=True)
class TenantCrl:
    """A checked full CRL: serial -> (revocation time, CRLReason code or None)."""

    number: int
    this_update: int
    next_update: int
    revoked: dict[int, tuple[int, int | None]]


def check_ca_cert(der: bytes) -> x509.Certificate:
    """A tenant CA certificate: a CA that may sign CRLs."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except Exception:  # noqa: BLE001 - cryptography raises several types on bad DER
        raise CrlRefused("the CA certificate is not a DER or PEM X.509 certificate") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            raise CrlRefused("the certificate is not a CA certificate (basicConstraints cA is false)")
    except x509.ExtensionNotFound:
        raise CrlRefused("the certificate is not a CA certificate (no basicConstraints)") from None
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.crl_sign:
            raise CrlRefused("the CA certificate's key usage does not allow cRLSign")
    except x509.ExtensionNotFound:
        pass
    if not isinstance(cert.public_key(), (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                                          ed448.Ed448PublicKey)):
        raise CrlRefused("the CA certificate's key type is not supported")
    return cert


def _ts(dt) -> int:
    return int(dt.timestamp())


def check_crl(ca: x509.Certificate, der: bytes, now: float, current: tuple[int, int] | None = None,
              clock: bool = True) -> TenantCrl:
    """Verify a full CRL of CA `ca`: signature, issuer, freshness (thisUpdate not in the future
    beyond SKEW, nextUpdate present and not past), a CRL number not lower than `current`'s
    (number, thisUpdate) and not an older issue of the same number. Delta, indirect and
    reason-partitioned CRLs are refused: "not on this CRL" must mean "not revoked". `clock=False`
    skips the two freshness checks (a stored CRL reloaded: staleness is decided when answering)."""
    if not der or len(der) > MAX_CRL:
        raise CrlRefused("empty or oversize CRL")
    try:
        crl = x509.load_der_x509_crl(der)
        exts = crl.extensions
    except Exception:  # noqa: BLE001 - truncated, BER, garbage: cryptography raises several types
        raise CrlRefused("not a DER X.509 CRL (truncated or damaged?)") from None
    if crl.issuer != ca.subject:
        raise CrlRefused("the CRL's issuer is not the tenant CA")
    try:
        ok = crl.is_signature_valid(cast(CertificateIssuerPublicKeyTypes, ca.public_key()))  # other types: TypeError below
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        ok = False
    if not ok:
        raise CrlRefused("the CRL's signature does not verify with the tenant CA's key")
    try:
        number = exts.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise CrlRefused("the CRL has no CRL number") from None
    if any(isinstance(e.value, x509.DeltaCRLIndicator) for e in exts):
        raise CrlRefused("a delta CRL is not a full CRL")
    for e in exts:
        if isinstance(e.value, x509.IssuingDistributionPoint):
            idp = e.value
            if idp.indirect_crl or idp.only_some_reasons or idp.only_contains_attribute_certs:
                raise CrlRefused("a partitioned or indirect CRL cannot answer for every certificate")
    this_update = _ts(crl.last_update_utc)
    if crl.next_update_utc is None:
        raise CrlRefused("the CRL has no nextUpdate")
    next_update = _ts(crl.next_update_utc)
    if clock and this_update > now + SKEW:
        raise CrlRefused("the CRL's thisUpdate is in the future")
    if clock and next_update <= now:
        raise CrlRefused("the CRL is stale (its nextUpdate has passed)")
    if next_update <= this_update:
        raise CrlRefused("the CRL's nextUpdate is not after its thisUpdate")
    if current is not None:
        cur_number, cur_this = current
        if number < cur_number:
            raise CrlRefused(f"CRL number {number} is lower than the current {cur_number}")
        if number == cur_number and this_update < cur_this:
            raise CrlRefused(f"an older issue of CRL number {number}")
    revoked: dict[int, tuple[int, int | None]] = {}
    try:
        for entry in crl:
            reason = None
            for ext in entry.extensions:
                if isinstance(ext.value, x509.CRLReason):
                    reason = REASON_CODES.get(ext.value.reason)
                elif isinstance(ext.value, x509.CertificateIssuer):
                    raise CrlRefused("an indirect CRL entry (certificateIssuer) cannot be served")
            if reason == 8:  # delta CRLs only: in a full CRL clients read it as revoked or as not; never guess
                raise CrlRefused("a full CRL with a removeFromCRL entry (RFC 5280: delta CRLs only) is ambiguous")
            revoked[entry.serial_number] = (_ts(entry.revocation_date_utc), reason)
    except CrlRefused:
        raise
    except Exception:  # noqa: BLE001 - a damaged entry: the whole CRL is refused
        raise CrlRefused("a CRL entry does not decode") from None
    return TenantCrl(number, this_update, next_update, revoked)


_HEX = re.compile(r"^(?:0x)?[0-9a-fA-F:]+$")


def parse_issued_serials(data: bytes, ca: x509.Certificate | None = None) -> frozenset[int]:
    """The issued-serials list (our open counterpart of a Certificate Issuance List). Either the signed
    DER list a Donjon CA publishes (policy/serials.py; with `ca`, its issuer and signature are checked),
    or a plain text file, one hexadecimal serial a line (colons allowed, `#` comments and blank lines
    ignored) for a CA that publishes nothing better. The one place that reads the format."""
    if data[:1] == b"\x30" and len(data) > 1 and data[1] & 0x80:  # a SEQUENCE of 128+ bytes, never text
        return _signed_serials(data, ca)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CrlRefused("the issued-serials list is neither a signed list nor ASCII text") from None
    out = set()
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        digits = line.removeprefix("0x").replace(":", "")
        if not _HEX.match(line) or not digits:
            raise CrlRefused(f"issued-serials list, line {i}: not a hexadecimal serial")
        v = int(digits, 16)
        if v <= 0 or v.bit_length() > MAX_SERIAL_BITS:
            raise CrlRefused(f"issued-serials list, line {i}: a serial is positive and at most 20 octets")
        out.add(v)
    return frozenset(out)


def _signed_serials(data: bytes, ca: x509.Certificate | None) -> frozenset[int]:
    try:
        lst = serials_list.decode(data)
    except ValueError as e:
        raise CrlRefused(f"the signed issued-serials list does not decode: {e}") from None
    if ca is not None:
        if lst.issuer_der != ca.subject.public_bytes():
            raise CrlRefused("the signed issued-serials list names another issuer")
        pub = ca.public_key()
        try:
            h = serials_list.hash_for(lst.signature_oid)
            if isinstance(pub, rsa.RSAPublicKey):
                pub.verify(lst.signature, lst.tbs, padding.PKCS1v15(), h)
            elif isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(lst.signature, lst.tbs, ec.ECDSA(h))
            elif isinstance(pub, ed25519.Ed25519PublicKey):
                pub.verify(lst.signature, lst.tbs)
            else:
                raise CrlRefused("the tenant CA's key type cannot verify the list")
        except (InvalidSignature, ValueError, TypeError):
            raise CrlRefused("the signed issued-serials list does not verify against the tenant CA") from None
    return lst.serials

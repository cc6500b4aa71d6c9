"""Two tiers: a CA's own PKCS#10 request, the checks of a CA certificate signed elsewhere, the CRL calendar bundle."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from policy.certs import subject_name
from policy.errors import PolicyError
from policy.profiles import EKU_NAMES, Profile

MAX_CHAIN = 8  # intermediates between a CA certificate and its trust anchor
MAX_BUNDLE = 4 * 1024 * 1024  # a calendar bundle (12 CRLs of a root: a few KiB; room for big ones)
MAX_PERIODS = 120
BUNDLE_FORMAT = "donjon-crl-calendar/1"


# ---------------------------------------------------------------- the CA's own request


def ca_request_builder(subject: tuple[tuple[str, str], ...], profile: Profile,
                       path_length: int | None) -> x509.CertificateSigningRequestBuilder:
    """The PKCS#10 request of a CA key: its subject (ordered as its certificate will be) and the CA
    extensions it asks for (basicConstraints CA with its path length, keyCertSign + cRLSign)."""
    if profile.kind != "sub-ca":
        raise PolicyError("profile", "sub-ca", f"profile {profile.name!r} is not a subordinate-CA profile")
    if path_length is not None and profile.path_length is not None and path_length > profile.path_length:
        raise PolicyError("path_length", "profile", f"profile {profile.name} allows at most {profile.path_length}")
    name = subject_name(subject, profile)
    if not name.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        raise PolicyError("subject", "cn", "a CA request needs a CN")
    pl = path_length if path_length is not None else profile.path_length
    return (x509.CertificateSigningRequestBuilder().subject_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=pl), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True))


# ---------------------------------------------------------------- installing a CA certificate signed elsewhere


def _load(der: bytes, what: str) -> x509.Certificate:
    try:
        c = x509.load_der_x509_certificate(der)
        c.extensions  # noqa: B018 - parse them now: a malformed extension is named here, not later
        return c
    except Exception:  # noqa: BLE001 - cryptography raises several types on hostile DER (FIELD-NOTES)
        raise PolicyError(what, "der", f"the {what} is not a readable X.509 certificate") from None


def _spki(c: x509.Certificate) -> bytes:
    return c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _ext(c: x509.Certificate | x509.CertificateRevocationList, cls):
    try:
        return c.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _valid_now(c: x509.Certificate, what: str, now: _dt.datetime) -> None:
    if c.not_valid_before_utc > now:
        raise PolicyError("validity", "not-yet", f"the {what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if c.not_valid_after_utc < now:
        raise PolicyError("validity", "expired", f"the {what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _is_ca(c: x509.Certificate, what: str) -> x509.BasicConstraints:
    bc = _ext(c, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise PolicyError("ca", "basic-constraints", f"the {what} is not a CA certificate (basicConstraints cA is not set)")
    ku = _ext(c, x509.KeyUsage)
    if ku is None or not ku.key_cert_sign:
        raise PolicyError("ca", "key-usage", f"the {what}'s key usage does not include keyCertSign")
    return bc


def _signed_by(child: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        child.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - a name mismatch, a bad signature or an unsupported algorithm: all "does not verify"
        raise PolicyError("chain", "signature", f"the {what} does not verify with its issuer "
                          f"{issuer.subject.rfc4514_string()[:120]!r}") from None


def check_install(cert_der: bytes, chain_ders: list[bytes], anchor_der: bytes, token_spki: bytes, now: _dt.datetime,
                  allows: list[Profile], may_issue_cas: bool) -> x509.Certificate:
    """Every check before a CA certificate signed elsewhere is kept beside its key; a refusal names the
    check (`key`, `ca`, `validity`, `chain`, `constraints`). `allows`: the profiles its policy lets it
    issue; `may_issue_cas`: that policy includes CA profiles."""
    if len(chain_ders) > MAX_CHAIN:
        raise PolicyError("chain", "length", f"at most {MAX_CHAIN} intermediate certificates")
    cert = _load(cert_der, "certificate")
    if _spki(cert) != token_spki:
        raise PolicyError("key", "token-key", "the certificate's public key is not the CA's key in the token")
    bc = _is_ca(cert, "certificate")
    ku = _ext(cert, x509.KeyUsage)
    if not ku.crl_sign:
        raise PolicyError("ca", "key-usage", "the certificate's key usage does not include cRLSign: its CRLs would not verify")
    if _ext(cert, x509.SubjectKeyIdentifier) is None:
        raise PolicyError("ca", "ski", "the certificate has no subjectKeyIdentifier (RFC 5280 §4.2.1.2: required in CA certificates)")
    if cert.subject == cert.issuer:
        try:
            cert.verify_directly_issued_by(cert)
            selfsigned = True
        except Exception:  # noqa: BLE001 - not a valid self-signature: the chain check below names it
            selfsigned = False
        if selfsigned:
            raise PolicyError("chain", "self-signed", "the certificate is self-signed: install the certificate the parent signed")
    _valid_now(cert, "certificate", now)
    anchor = _load(anchor_der, "trust anchor")
    if anchor.subject != anchor.issuer:
        raise PolicyError("chain", "anchor", "the trust anchor is not a self-signed root certificate")
    _signed_by(anchor, anchor, "trust anchor")
    _is_ca(anchor, "trust anchor")
    _valid_now(anchor, "trust anchor", now)
    path = [cert] + [_load(d, f"chain certificate {i + 1}") for i, d in enumerate(chain_ders)]
    if path[-1].subject == anchor.subject and _spki(path[-1]) == _spki(anchor) and len(path) > 1:
        path.pop()  # the anchor given in the chain as well: counted once
    path.append(anchor)
    for i in range(len(path) - 1):
        child, issuer = path[i], path[i + 1]
        what = "certificate" if i == 0 else f"chain certificate {i}"
        if child.issuer != issuer.subject:
            raise PolicyError("chain", "issuer-name", f"the {what}'s issuer is not the subject of the next certificate "
                              f"(the chain must be in order, up to the trust anchor)")
        _signed_by(child, issuer, what)
        if i + 1 < len(path) - 1:
            _is_ca(issuer, f"chain certificate {i + 1}")
            _valid_now(issuer, f"chain certificate {i + 1}", now)
        ipl = _is_ca(issuer, "trust anchor" if i + 1 == len(path) - 1 else f"chain certificate {i + 1}").path_length
        # RFC 5280 §4.2.1.9: the CA certificates below this issuer (the new CA's included) count against its pathLen.
        if ipl is not None and i + 1 > ipl:
            raise PolicyError("constraints", "path-length", f"the pathLenConstraint {ipl} of the "
                              f"{'trust anchor' if i + 1 == len(path) - 1 else f'chain certificate {i + 1}'} forbids this CA")
    # What its profiles will issue must get through its own constraints (and the chain's).
    if may_issue_cas and bc.path_length == 0:
        raise PolicyError("constraints", "path-length", "the certificate's pathLenConstraint 0 forbids the CA profiles its "
                          "policy allows (ask for a larger path length, or a policy without CA profiles)")
    for c in path[:-1]:
        eku = _ext(c, x509.ExtendedKeyUsage)
        if eku is not None and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            have = {o.dotted_string for o in eku}
            for p in allows:
                missing = [n for n in p.extended_key_usage if EKU_NAMES[n] not in have]
                if missing:
                    raise PolicyError("constraints", "extended-key-usage", f"profile {p.name!r} issues {', '.join(missing)}, "
                                      "which the extended key usage of the CA's chain does not allow")
        nc = _ext(c, x509.NameConstraints)
        if nc is not None:
            for g in list(nc.permitted_subtrees or ()) + list(nc.excluded_subtrees or ()):
                if not isinstance(g, x509.DNSName):
                    raise PolicyError("constraints", "name-constraints", "name constraints other than dNSName subtrees "
                                      f"({type(g).__name__}): Donjon cannot check its issuance against them")
    return cert


# ---------------------------------------------------------------- the offline root's CRL calendar


class CalendarEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    number: int
    this_update: int
    next_update: int
    sha256: str
    der: str  # base64


class Bundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    ca: str
    every_seconds: int
    overlap_seconds: int
    signed_at: int
    root: str  # the root certificate, base64 DER
    crls: list[CalendarEntry]


def encode_bundle(ca: str, root_der: bytes, every: int, overlap: int, signed_at: int,
                  crls: list[tuple[int, int, int, bytes]]) -> bytes:
    """One file: the manifest (each CRL's number, window and SHA-256) with the CRLs themselves."""
    entries = [CalendarEntry(n, tu, nu, hashlib.sha256(d).hexdigest(), base64.b64encode(d).decode()) for n, tu, nu, d in crls]
    return msgspec.json.format(msgspec.json.encode(Bundle(BUNDLE_FORMAT, ca, every, overlap, signed_at,
                                                          base64.b64encode(root_der).decode(), entries)), indent=1)


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    ext = _ext(crl, x509.CRLNumber)
    if ext is None:
        raise PolicyError("calendar", "crl-number", "a CRL of the calendar has no CRL number")
    return ext.crl_number


def parse_bundle(data: bytes, known_root: bytes | None = None) -> tuple[str, bytes, list[tuple[int, int, int, bytes]]]:
    """Check a calendar bundle completely (format, manifest, every CRL's signature by the root, windows
    and numbers in order). Returns (CA name, root DER, [(number, thisUpdate, nextUpdate, DER)]).
    `known_root`: the root certificate the loader trusts; the bundle's must be that one."""
    if len(data) > MAX_BUNDLE:
        raise PolicyError("calendar", "size", f"a calendar bundle is at most {MAX_BUNDLE} bytes")
    try:
        b = msgspec.json.decode(data, type=Bundle)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise PolicyError("calendar", "format", "not a Donjon CRL calendar bundle (manifest unreadable)") from None
    if b.format != BUNDLE_FORMAT:
        raise PolicyError("calendar", "format", f"unknown bundle format {b.format[:40]!r}")
    if not 1 <= len(b.crls) <= MAX_PERIODS:
        raise PolicyError("calendar", "periods", f"a calendar holds 1 to {MAX_PERIODS} CRLs")
    try:
        root_der = base64.b64decode(b.root, validate=True)
    except ValueError:
        raise PolicyError("calendar", "format", "the root certificate is not base64") from None
    if known_root is not None and root_der != known_root:
        raise PolicyError("calendar", "root", f"the bundle's root certificate is not the trusted root of {b.ca[:64]!r}")
    root = _load(root_der, "root certificate")
    out: list[tuple[int, int, int, bytes]] = []
    prev_number, prev_tu = 0, 0
    for i, e in enumerate(b.crls):
        try:
            der = base64.b64decode(e.der, validate=True)
        except ValueError:
            raise PolicyError("calendar", "format", f"CRL {i + 1} is not base64") from None
        if hashlib.sha256(der).hexdigest() != e.sha256:
            raise PolicyError("calendar", "manifest", f"CRL {i + 1}: its SHA-256 differs from the manifest")
        try:
            crl = x509.load_der_x509_crl(der)
            ok = crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
            tu = int(crl.last_update_utc.timestamp())
            nu = crl.next_update_utc
        except Exception:  # noqa: BLE001 - hostile DER: any parser error is "unreadable"
            raise PolicyError("calendar", "crl", f"CRL {i + 1} is not a readable CRL") from None
        if crl.issuer != root.subject or not ok:
            raise PolicyError("calendar", "signature", f"CRL {i + 1} (number {e.number}) is not signed by the root certificate")
        number = _crl_number(crl)
        if nu is None:
            raise PolicyError("calendar", "next-update", f"CRL number {number} has no nextUpdate")
        if (number, tu, int(nu.timestamp())) != (e.number, e.this_update, e.next_update):
            raise PolicyError("calendar", "manifest", f"CRL {i + 1}: number or window differ from the manifest")
        if number <= prev_number or tu <= prev_tu:
            raise PolicyError("calendar", "order", f"CRL number {number}: numbers and thisUpdates must increase")
        out.append((number, tu, e.next_update, der))
        prev_number, prev_tu = number, tu
    return b.ca, root_der, out


def calendar_windows(start: int, periods: int, every: int, overlap: int) -> list[tuple[int, int]]:
    """(thisUpdate, nextUpdate) of each pre-signed period: consecutive, each valid `overlap` past the next one's start."""
    if not 1 <= periods <= MAX_PERIODS:
        raise PolicyError("periods", "range", f"1 to {MAX_PERIODS} periods")
    if every < 3600:
        raise PolicyError("every", "range", "a period lasts at least one hour")
    if not 0 <= overlap <= every:
        raise PolicyError("overlap", "range", "the overlap is between 0 and one period")
    return [(start + i * every, start + (i + 1) * every + overlap) for i in range(periods)]

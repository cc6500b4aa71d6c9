"""Building to-be-signed certificates from a profile, an issuer and a request, checking every constraint."""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import cast

from asn1crypto import core as _asn1core
from asn1crypto import keys as _asn1keys
from asn1crypto import x509 as _asn1x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID

from policy import crl as _crl
from policy.csr import ATTR_OIDS, check_dns_name, check_names, check_public_key
from policy.errors import PolicyError
from policy.profiles import EKU_NAMES, KEY_USAGES, Profile

# RFC 5280 4.1.2.2: at most 20 octets, positive. 159 bits keeps the sign bit clear.
_MAX_SERIAL_BITS = 159
# Stable RFC 4514-ish order, most significant first.
_SUBJECT_ORDER = ("DC", "C", "ST", "L", "O", "OU", "CN", "serialNumber", "emailAddress")
_RSA_ONLY_USAGES = ("key_encipherment", "data_encipherment")
_EC_ONLY_USAGES = ("key_agreement",)
_EKU_OIDS = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
    "smartcardLogon": ExtendedKeyUsageOID.SMARTCARD_LOGON,
}
assert set(_EKU_OIDS) == set(EKU_NAMES)
# asn1crypto string class -> cryptography tag, so an issuer name is re-encoded byte for byte.
_STRING_TYPES = {
    _asn1core.UTF8String: _ASN1Type.UTF8String,
    _asn1core.PrintableString: _ASN1Type.PrintableString,
    _asn1core.IA5String: _ASN1Type.IA5String,
    _asn1core.TeletexString: _ASN1Type.T61String,
    _asn1core.BMPString: _ASN1Type.BMPString,
    _asn1core.UniversalString: _ASN1Type.UniversalString,
    _asn1core.VisibleString: _ASN1Type.VisibleString,
}


@dataclass(frozen=True)
class IssuerInfo:
    name_der: bytes  # issuer's subject Name, DER
    key_type: str
    spki_der: bytes  # issuer public key (for AKI)
    not_before: _dt.datetime  # issuer cert validity (tz-aware UTC)
    not_after: _dt.datetime
    path_length: int | None  # issuer's pathLenConstraint; None = unlimited
    permitted_dns: tuple[str, ...] = ()  # issuer name constraints (dNSName subtrees); empty = none
    excluded_dns: tuple[str, ...] = ()
    crl_url: str | None = None
    ocsp_url: str | None = None
    ca_issuers_url: str | None = None
    crl_shards: int = 1  # >1: the CRL DP names the certificate's shard (policy.crl.shard_url), fixed at issuance
    delta_crls: bool = False  # a CA publishing delta CRLs: freshestCRL names the delta of the certificate's CRL (or shard)


@dataclass(frozen=True)
class IssueSpec:
    profile: Profile
    public_key_der: bytes
    subject: tuple[tuple[str, str], ...]
    sans: tuple[tuple[str, str], ...]
    serial: int
    not_before: _dt.datetime
    not_after: _dt.datetime
    path_length: int | None = None  # requested pathLen for CA profiles
    permitted_dns: tuple[str, ...] = ()  # name constraints to put in a CA certificate


def signature_hash(key_type: str) -> hashes.HashAlgorithm | None:
    """The digest a CA key of this type signs with (None: the algorithm hashes itself, Ed25519)."""
    if key_type in ("rsa2048", "rsa3072", "p256"):
        return hashes.SHA256()
    if key_type in ("rsa4096", "p384"):
        return hashes.SHA384()
    if key_type == "ed25519":
        return None
    raise PolicyError("issuer.key_type", "value", f"unknown key type {key_type!r}")


# ------------------------------------------------------------------------------------------ helpers


def _utc(field: str, t: _dt.datetime) -> _dt.datetime:
    if not isinstance(t, _dt.datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise PolicyError(field, "timezone", "times must be timezone-aware")
    # Certificates carry whole seconds; truncating only ever shortens a validity.
    return t.astimezone(_dt.timezone.utc).replace(microsecond=0)


def name_from_der(name_der: bytes, field: str = "issuer.name") -> x509.Name:
    """An x509.Name that re-encodes to exactly these bytes (so issuer == subject, binary)."""
    try:
        parsed = _asn1x509.Name.load(bytes(name_der), strict=True)
        rdns = []
        for rdn in parsed.chosen:
            attrs = []
            for atv in rdn:
                oid = x509.ObjectIdentifier(atv["type"].dotted)
                val = atv["value"]
                inner = val.chosen if isinstance(val, _asn1core.Choice) else val
                # asn1crypto subclasses string types per attribute (DC is an IA5String subclass).
                tag = next((_STRING_TYPES[c] for c in type(inner).__mro__ if c in _STRING_TYPES), None)
                if tag is None:
                    raise ValueError("unsupported string type")
                attrs.append(x509.NameAttribute(oid, inner.native, _type=tag))
            rdns.append(x509.RelativeDistinguishedName(attrs))
        name = x509.Name(rdns)
        ok = name.public_bytes() == bytes(name_der)
    except Exception:  # noqa: BLE001 - the issuer name comes from our own store, but be strict
        raise PolicyError(field, "der", "issuer name is not a DER Name we can reproduce") from None
    if not ok:
        raise PolicyError(field, "der", "issuer name does not re-encode identically")
    return name


def _key_id(spki_der: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING value."""
    spki = _asn1keys.PublicKeyInfo.load(spki_der)
    return hashlib.sha1(spki["public_key"].contents[1:]).digest()  # drop the unused-bits octet


def _dns_within(name: str, base: str) -> bool:
    """RFC 5280 4.2.1.10 dNSName matching: 'example.com' covers itself and subdomains, '.example.com' only subdomains."""
    name = name.lower().rstrip(".")
    if name.startswith("*."):
        # A wildcard stands for one label we do not know: test a label no real name equals.
        name = "\x00" + name[1:]
    base = base.lower().rstrip(".")
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base)
    if name == base:
        return True
    return name.endswith("." + base)


def _check_name_constraints(name: str, issuer: IssuerInfo, field: str) -> None:
    if issuer.permitted_dns and not any(_dns_within(name, b) for b in issuer.permitted_dns):
        raise PolicyError(field, "name-constraints", f"{name!r} is outside the issuer's permitted names")
    for b in issuer.excluded_dns:
        # A wildcard whose base is above an excluded subtree would cover names in it.
        if _dns_within(name, b) or (name.startswith("*.") and _dns_within(b.lstrip("."), name[2:])):
            raise PolicyError(field, "name-constraints", f"{name!r} is in the issuer's excluded names")


def _looks_like_dns(value: str) -> bool:
    try:
        check_dns_name(value)
        return True
    except PolicyError:
        return False


def subject_name(subject: tuple[tuple[str, str], ...], profile: Profile) -> x509.Name:
    """The subject a certificate of this profile will carry (fixed attributes added, in order)."""
    return _ordered_subject(subject, profile)


def _ordered_subject(subject: tuple[tuple[str, str], ...], profile: Profile) -> x509.Name:
    present = {a for a, _ in subject}
    full = list(subject) + [(r.attr, r.value) for r in profile.subject if r.presence == "fixed" and r.attr not in present and r.value is not None]  # fixed rows always carry a value
    full.sort(key=lambda av: _SUBJECT_ORDER.index(av[0]))  # stable: repeated DCs keep their order
    return x509.Name([x509.NameAttribute(ATTR_OIDS[a], v) for a, v in full])


def _key_usage(profile: Profile, public_key: object) -> x509.KeyUsage:
    usages = set(profile.key_usage)
    if not isinstance(public_key, rsa.RSAPublicKey):
        usages -= set(_RSA_ONLY_USAGES)
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        usages -= set(_EC_ONLY_USAGES)
    if not usages:
        raise PolicyError("public_key", "key-usage", f"this key type can do none of {', '.join(profile.key_usage)}")
    args = {k: k in usages for k in KEY_USAGES}
    return x509.KeyUsage(encipher_only=False, decipher_only=False, **args)


def _san(sans: tuple[tuple[str, str], ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for t, v in sans:
        if t == "dns":
            out.append(x509.DNSName(v))
        elif t == "ip":
            out.append(x509.IPAddress(ipaddress.ip_address(v)))
        elif t == "email":
            out.append(x509.RFC822Name(v))
        else:
            out.append(x509.UniformResourceIdentifier(v))
    return out


# ---------------------------------------------------------------------------------------- build


def _check_validity(spec: IssueSpec, issuer: IssuerInfo | None) -> tuple[_dt.datetime, _dt.datetime]:
    nb = _utc("validity.not_before", spec.not_before)
    na = _utc("validity.not_after", spec.not_after)
    if na <= nb:
        raise PolicyError("validity", "order", "not_after must be later than not_before")
    # RFC 5280 validity is inclusive of both ends: the period is (na - nb) + 1 second.
    if na - nb + _dt.timedelta(seconds=1) > _dt.timedelta(days=spec.profile.max_validity_days):
        raise PolicyError("validity", "profile-max", f"longer than {spec.profile.max_validity_days} days (profile {spec.profile.name})")
    if issuer is not None:
        if nb < _utc("issuer.not_before", issuer.not_before):
            raise PolicyError("validity.not_before", "issuer", "starts before the issuer's certificate is valid")
        if na > _utc("issuer.not_after", issuer.not_after):
            raise PolicyError("validity.not_after", "issuer", "ends after the issuer's certificate expires")
    return nb, na


def _check_path(spec: IssueSpec, issuer: IssuerInfo | None) -> int | None:
    profile = spec.profile
    if not profile.ca:
        if spec.path_length is not None:
            raise PolicyError("path_length", "not-ca", "only CA certificates take a path length")
        if spec.permitted_dns:
            raise PolicyError("name_constraints", "not-ca", "only CA certificates take name constraints")
        return None
    if spec.path_length is not None:
        if isinstance(spec.path_length, bool) or not isinstance(spec.path_length, int) or spec.path_length < 0:
            raise PolicyError("path_length", "value", "path length must be a non-negative integer")
        if profile.path_length is not None and spec.path_length > profile.path_length:
            raise PolicyError("path_length", "profile", f"profile {profile.name} allows at most {profile.path_length}")
    path_length = spec.path_length if spec.path_length is not None else profile.path_length
    if issuer is None:
        if profile.kind != "root-ca":
            raise PolicyError("issuer", "required", f"profile {profile.name} is not self-signed")
        return path_length
    if profile.kind == "root-ca":
        raise PolicyError("issuer", "self-signed", "a root certificate is self-signed")
    if issuer.path_length is not None:
        if issuer.path_length == 0:
            raise PolicyError("path_length", "issuer-zero", "the issuer's pathLenConstraint 0 forbids issuing CA certificates")
        if path_length is None or path_length >= issuer.path_length:
            raise PolicyError("path_length", "issuer", f"path length must be below the issuer's ({issuer.path_length})")
    return path_length


def build_tbs(spec: IssueSpec, issuer: IssuerInfo | None) -> x509.CertificateBuilder:
    """Check a request against its profile and issuer, and return the unsigned certificate."""
    profile = spec.profile
    if isinstance(spec.serial, bool) or not isinstance(spec.serial, int) or spec.serial <= 0:
        raise PolicyError("serial", "positive", "the serial number must be a positive integer")
    if spec.serial.bit_length() > _MAX_SERIAL_BITS:
        raise PolicyError("serial", "length", "the serial number must encode in at most 20 octets")
    nb, na = _check_validity(spec, issuer)
    check_public_key(spec.public_key_der, profile.key_types)
    # check_public_key (above) admits only certificate key types; the cast says so to the type checker
    public_key = cast(CertificatePublicKeyTypes, serialization.load_der_public_key(spec.public_key_der))
    subject_t = tuple(spec.subject)
    sans = check_names(subject_t, tuple(spec.sans), profile)
    subject = _ordered_subject(subject_t, profile)
    path_length = _check_path(spec, issuer)

    for d in spec.permitted_dns:
        if d.startswith("."):
            check_dns_name(d[1:], "name_constraints", allow_wildcard=False)
        else:
            check_dns_name(d, "name_constraints", allow_wildcard=False)
    if issuer is not None:
        for t, v in sans:
            if t == "dns":
                _check_name_constraints(v, issuer, "san")
        for a, v in subject_t:
            if a == "CN" and _looks_like_dns(v):
                _check_name_constraints(v, issuer, "subject.CN")
        for d in spec.permitted_dns:
            _check_name_constraints(d.lstrip("."), issuer, "name_constraints")
        issuer_name = name_from_der(issuer.name_der)
        try:
            aki_id = _key_id(issuer.spki_der)
        except Exception:  # noqa: BLE001
            raise PolicyError("issuer.spki", "der", "malformed issuer public key") from None
    else:
        issuer_name = subject
        aki_id = _key_id(spec.public_key_der)
    if not subject.rdns and not sans:
        raise PolicyError("subject", "empty", "neither a subject nor a subject alternative name")

    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(spec.serial)
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=profile.ca, path_length=path_length if profile.ca else None), critical=True)
        .add_extension(_key_usage(profile, public_key), critical=True)
    )
    if profile.extended_key_usage:
        ekus = [_EKU_OIDS.get(e) or x509.ObjectIdentifier(e) for e in profile.extended_key_usage]
        b = b.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if not profile.cabf:  # the BRs advise against an SKI in subscriber certificates; RFC 5280 wants one
        # TLS BRs 7.1.2.7.6: SKI is NOT RECOMMENDED in subscriber certificates (pkilint warns);
        # RFC 5280 wants it everywhere else.
        b = b.add_extension(x509.SubjectKeyIdentifier(_key_id(spec.public_key_der)), critical=False)
    b = b.add_extension(x509.AuthorityKeyIdentifier(aki_id, None, None), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(_san(sans)), critical=not subject.rdns)
    if profile.crl_dp and issuer is not None and issuer.crl_url:
        url = _crl.shard_url(issuer.crl_url, _crl.shard_of(spec.serial, issuer.crl_shards), issuer.crl_shards)
        dp = x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)
        b = b.add_extension(x509.CRLDistributionPoints([dp]), critical=False)
        if issuer.delta_crls:  # the delta of the certificate's own CRL (its shard's: the same scope)
            fresh = x509.DistributionPoint([x509.UniformResourceIdentifier(_crl.delta_url(url))], None, None, None)
            b = b.add_extension(x509.FreshestCRL([fresh]), critical=False)
    if profile.aia and issuer is not None:
        ads = []
        if issuer.ocsp_url:
            ads.append(x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(issuer.ocsp_url)))
        if issuer.ca_issuers_url:
            ads.append(x509.AccessDescription(x509.AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(issuer.ca_issuers_url)))
        if ads:
            b = b.add_extension(x509.AuthorityInformationAccess(ads), critical=False)
    if profile.policies:
        pols = [x509.PolicyInformation(x509.ObjectIdentifier(p), None) for p in profile.policies]
        b = b.add_extension(x509.CertificatePolicies(pols), critical=False)
    if profile.ocsp_nocheck:
        b = b.add_extension(x509.OCSPNoCheck(), critical=False)
    if spec.permitted_dns:
        b = b.add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName(d) for d in spec.permitted_dns], excluded_subtrees=None),
            critical=True,
        )
    return b


__all__ = ["IssuerInfo", "IssueSpec", "build_tbs", "signature_hash", "name_from_der"]

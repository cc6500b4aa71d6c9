"""Checks on what a requester sends: public keys (goodkey-style), CSRs, subject names and SANs."""

from __future__ import annotations

import ipaddress
import math
import re
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from policy.errors import PolicyError
from policy.names import check_name_text
from policy.profiles import KEY_TYPES, Profile

# Larger inputs are refused before any parser sees them: an RSA-4096 CSR with 100 SANs is ~8 KiB.
MAX_CSR_BYTES = 64 * 1024
MAX_SANS = 100

ATTR_OIDS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "DC": NameOID.DOMAIN_COMPONENT,
}
_OID_ATTRS = {v: k for k, v in ATTR_OIDS.items()}
# RFC 5280 Appendix A upper bounds (ub-*), in characters; DC is one DNS label.
ATTR_MAX_LEN = {
    "CN": 64,
    "O": 64,
    "OU": 64,
    "C": 2,
    "L": 128,
    "ST": 128,
    "emailAddress": 255,
    "serialNumber": 64,
    "DC": 63,
}
# Attributes that may repeat (DC=example,DC=com); every other one at most once.
MULTI_VALUED_ATTRS = ("DC",)

_RSA_SIZES = {2048: "rsa2048", 3072: "rsa3072", 4096: "rsa4096"}
_FERMAT_ROUNDS = 100  # as Let's Encrypt goodkey


def _small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return [i for i in range(limit) if sieve[i]]


# One gcd against the product of all primes < 10000 replaces ~1200 trial divisions.
_SMALL_PRIME_PRODUCT = math.prod(_small_primes(10000))


@dataclass(frozen=True)
class CsrInfo:
    public_key_der: bytes  # SubjectPublicKeyInfo DER
    key_type: str  # one of KEY_TYPES
    subject: tuple[tuple[str, str], ...]  # (attr short name, value), in CSR order
    sans: tuple[tuple[str, str], ...]  # (type in dns/ip/email/uri, value)


# --------------------------------------------------------------------------------------------- keys


def _fermat_factorable(n: int) -> bool:
    a = math.isqrt(n)
    if a * a == n:
        return True
    a += 1
    for _ in range(_FERMAT_ROUNDS):
        b2 = a * a - n
        b = math.isqrt(b2)
        if b * b == b2:
            return True
        a += 1
    return False


def key_type_of(key: object) -> str:
    """The KEY_TYPES name of a public key object; PolicyError if it is none of them."""
    if isinstance(key, rsa.RSAPublicKey):
        t = _RSA_SIZES.get(key.key_size)
        if t is None:
            raise PolicyError("public_key", "size", f"RSA-{key.key_size} is not a supported size")
        return t
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "p256"
        if isinstance(key.curve, ec.SECP384R1):
            return "p384"
        raise PolicyError("public_key", "curve", f"curve {key.curve.name} is not supported")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise PolicyError("public_key", "algorithm", "public key algorithm is not supported")


def check_public_key(spki_der: bytes, allowed: tuple[str, ...]) -> str:
    """Return the key type of a SubjectPublicKeyInfo, or refuse a weak or disallowed key."""
    if not isinstance(spki_der, (bytes, bytearray)) or not spki_der:
        raise PolicyError("public_key", "der", "malformed public key: empty")
    try:
        key = serialization.load_der_public_key(bytes(spki_der))
        # A key whose re-encoding differs was not DER (BER, trailing data, odd parameters).
        canonical = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # noqa: BLE001 - anything a parser raises on hostile bytes means "malformed"
        raise PolicyError("public_key", "der", "malformed or unsupported public key") from None
    if canonical != bytes(spki_der):
        raise PolicyError("public_key", "der", "public key is not canonically encoded")
    key_type = key_type_of(key)
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        if nums.e != 65537:
            raise PolicyError("public_key", "exponent", f"RSA public exponent must be 65537, not {nums.e}")
        if math.gcd(nums.n, _SMALL_PRIME_PRODUCT) != 1:
            raise PolicyError("public_key", "small-factor", "RSA modulus has a small prime factor")
        if _fermat_factorable(nums.n):
            raise PolicyError("public_key", "fermat", "RSA modulus is Fermat-factorable (p and q too close)")
    if key_type not in allowed:
        raise PolicyError("public_key", "key-type", f"{key_type} keys are not allowed by this profile")
    return key_type


# ----------------------------------------------------------------------------------- names, SANs

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PRINTABLE_RE = re.compile(r"^[A-Za-z0-9 '()+,\-./:=?]+$")  # ASN.1 PrintableString alphabet
_EMAIL_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


def check_dns_name(value: str, field: str = "san", allow_wildcard: bool = True) -> None:
    """LDH labels, total <= 253, '*' only as the whole leftmost label of a name with >= 2 more labels."""
    if not isinstance(value, str) or not value:
        raise PolicyError(field, "dns", "empty DNS name")
    if len(value) > 253 or not value.isascii():
        raise PolicyError(field, "dns", "DNS name too long or not ASCII (use the xn-- form)")
    labels = value.lower().split(".")
    if labels[0] == "*":
        if not allow_wildcard:
            raise PolicyError(field, "wildcard", "wildcards are not allowed here")
        if len(labels) < 3:
            raise PolicyError(field, "wildcard", f"wildcard too broad in {value!r}")
        labels = labels[1:]
    for label in labels:
        if "*" in label:
            raise PolicyError(field, "wildcard", f"wildcard only as the whole leftmost label: {value!r}")
        if not _LABEL_RE.match(label):
            raise PolicyError(field, "dns", f"{value!r} is not a valid DNS name")
    if len(labels) < 2:
        raise PolicyError(field, "dns", f"{value!r} is not a fully qualified DNS name")
    if labels[-1].isdigit():
        raise PolicyError(field, "dns", f"{value!r} looks like an IP address, not a DNS name")


def check_ip(value: str, field: str = "san") -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise PolicyError(field, "ip", f"{value!r} is not an IP address") from None


def check_email(value: str, field: str = "san") -> None:
    if not isinstance(value, str) or value.count("@") != 1:
        raise PolicyError(field, "email", "an email address is local@domain")
    local, domain = value.split("@")
    if not _EMAIL_LOCAL_RE.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise PolicyError(field, "email", f"{value!r} has an invalid local part")
    try:
        check_dns_name(domain, field, allow_wildcard=False)
    except PolicyError:
        raise PolicyError(field, "email", f"{value!r} has an invalid domain") from None


def check_uri(value: str, field: str = "san") -> None:
    if not isinstance(value, str) or not value or len(value) > 2048 or not value.isascii():
        raise PolicyError(field, "uri", "URI empty, too long or not ASCII")
    if any(c <= " " or c == "\x7f" for c in value):
        raise PolicyError(field, "uri", "URI contains spaces or control characters")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise PolicyError(field, "uri", f"{value!r} is not a URI") from None
    if not re.match(r"^[a-z][a-z0-9+.-]*$", parts.scheme) or not (parts.netloc or parts.path):
        raise PolicyError(field, "uri", f"{value!r} is not an absolute URI")
    if parts.scheme in STRICT_URI_SCHEMES and not strict_uri_ok(value):
        what = "SPIFFE ID" if parts.scheme == "spiffe" else "URN (RFC 8141; urn:uuid: takes a UUID)"
        raise PolicyError(field, "uri", f"{value[:80]!r} is not a valid {what}")


# URI schemes whose syntax Donjon checks itself (pkilint's URL validator knows only web URLs and
# refuses them): a URI SAN of these schemes must match the grammar below exactly.
_SPIFFE = re.compile(r"^spiffe://[a-z0-9._-]{1,255}(/[A-Za-z0-9._-]+)*$")  # SPIFFE-ID §2: no port, query, fragment
_URN = re.compile(r"^urn:[A-Za-z0-9][A-Za-z0-9-]{0,30}[A-Za-z0-9]:[A-Za-z0-9()+,\-.:=@;$_!*'%/~&]+$")  # RFC 8141 (no r-/q-/f-components)
_UUID = re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)  # RFC 9562
STRICT_URI_SCHEMES = ("spiffe", "urn")


def strict_uri_ok(value: str) -> bool:
    """True for a URI of an allow-listed non-web scheme that matches its own grammar exactly."""
    low = value[:7].lower()
    if low.startswith("spiffe:"):
        return bool(_SPIFFE.match(value)) and len(value) <= 2048 and not value.startswith("spiffe:///")
    if low.startswith("urn:"):
        if value[4:9].lower() == "uuid:":
            return bool(_UUID.match(value))
        return bool(_URN.match(value)) and not value[4:].lower().startswith("urn:")
    return False


def check_subject_value(attr: str, value: str) -> None:
    """Value rules that do not depend on the profile: length bounds and string alphabets."""
    field = f"subject.{attr}"
    if not isinstance(value, str) or not value:
        raise PolicyError(field, "empty", "empty value")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise PolicyError(field, "charset", "control characters are not allowed")
    if value != value.strip():
        raise PolicyError(field, "charset", "leading or trailing spaces are not allowed")
    if len(value) > ATTR_MAX_LEN[attr]:
        raise PolicyError(field, "length", f"longer than {ATTR_MAX_LEN[attr]} characters (RFC 5280)")
    if attr == "C" and not re.match(r"^[A-Z]{2}$", value):
        raise PolicyError(field, "country", "C is exactly two upper-case letters (ISO 3166)")
    if attr == "serialNumber" and not _PRINTABLE_RE.match(value):
        raise PolicyError(field, "charset", "serialNumber must be a PrintableString")
    if attr == "emailAddress":
        check_email(value, field)
    if attr == "DC" and not _LABEL_RE.match(value.lower()):
        raise PolicyError(field, "charset", "DC is one DNS label")


def check_subject(subject: tuple[tuple[str, str], ...], profile: Profile) -> None:
    """Refuse a subject the profile does not allow (fixed attributes may be absent)."""
    seen: set[str] = set()
    for attr, value in subject:
        rule = profile.rule(attr)
        if rule is None:
            raise PolicyError(f"subject.{attr}", "not-allowed", f"{attr} is not allowed by profile {profile.name}")
        if attr in seen and attr not in MULTI_VALUED_ATTRS:
            raise PolicyError(f"subject.{attr}", "repeated", f"{attr} appears more than once")
        seen.add(attr)
        check_subject_value(attr, value)
        if not profile.allow_confusable_names:
            check_name_text(f"subject.{attr}", value)
        if rule.presence == "fixed" and value != rule.value:
            raise PolicyError(f"subject.{attr}", "fixed", f"{attr} is fixed to {rule.value!r} by the profile")
    for rule in profile.subject:
        if rule.presence == "required" and rule.attr not in seen:
            raise PolicyError(f"subject.{rule.attr}", "required", f"{rule.attr} is required by profile {profile.name}")


def check_sans(sans: tuple[tuple[str, str], ...], profile: Profile) -> tuple[tuple[str, str], ...]:
    """Refuse SANs the profile does not allow; return them with IP addresses in canonical text form."""
    if len(sans) > MAX_SANS:
        raise PolicyError("san", "count", f"more than {MAX_SANS} subject alternative names")
    out: list[tuple[str, str]] = []
    for typ, value in sans:
        if typ not in profile.san_types:
            raise PolicyError("san", "type", f"SAN type {typ!r} is not allowed by profile {profile.name}")
        if typ == "dns":
            check_dns_name(value)
        elif typ == "ip":
            value = check_ip(value)
        elif typ == "email":
            check_email(value)
        elif typ == "uri":
            check_uri(value)
        item = (typ, value.lower() if typ == "dns" else value)
        if any(o[0] == item[0] and (o[1].lower() if typ == "dns" else o[1]) == item[1] for o in out):
            raise PolicyError("san", "duplicate", f"SAN {typ}:{value} appears twice")
        out.append((typ, value))
    if profile.san_required and not out:
        raise PolicyError("san", "required", f"profile {profile.name} requires a subject alternative name")
    return tuple(out)


def check_cn_in_sans(subject: tuple[tuple[str, str], ...], sans: tuple[tuple[str, str], ...], profile: Profile) -> None:
    """For TLS server profiles a CN is deprecated but tolerated if it repeats one of the SANs."""
    if "serverAuth" not in profile.extended_key_usage:
        return
    names = {v.lower() for t, v in sans if t in ("dns", "ip")}
    for attr, value in subject:
        if attr == "CN":
            cn = value.lower()
            try:
                cn = str(ipaddress.ip_address(cn))
            except ValueError:
                pass
            if cn not in names:
                raise PolicyError("subject.CN", "cn-not-in-san", "the CN must be one of the SANs")


def check_names(subject: tuple[tuple[str, str], ...], sans: tuple[tuple[str, str], ...], profile: Profile) -> tuple[tuple[str, str], ...]:
    """Subject, SANs and their relation; returns the normalised SANs."""
    check_subject(subject, profile)
    sans = check_sans(sans, profile)
    check_cn_in_sans(subject, sans, profile)
    if not subject and not sans and not any(r.presence == "fixed" for r in profile.subject):
        raise PolicyError("subject", "empty", "neither a subject nor a subject alternative name")
    return sans


# -------------------------------------------------------------------------------------------- CSR

_ALLOWED_CSR_EXTENSIONS = (
    x509.SubjectAlternativeName,
    x509.KeyUsage,
    x509.ExtendedKeyUsage,
    x509.BasicConstraints,
    x509.SubjectKeyIdentifier,  # certmonger sends it; ignored (the CIS derives the identifier from the key)
)


def _general_name(gn: object) -> tuple[str, str]:
    if isinstance(gn, x509.DNSName):
        return ("dns", gn.value)
    if isinstance(gn, x509.IPAddress):
        if not isinstance(gn.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise PolicyError("san", "ip", "an IP SAN is an address, not a network")
        return ("ip", str(gn.value))
    if isinstance(gn, x509.RFC822Name):
        return ("email", gn.value)
    if isinstance(gn, x509.UniformResourceIdentifier):
        return ("uri", gn.value)
    raise PolicyError("san", "type", f"SAN type {type(gn).__name__} is not supported")


def _parse(der: bytes):
    """Everything we need out of the CSR, as plain data, with every parser error mapped to 'malformed'."""
    try:
        # cryptography warns (UserWarning) on over-long attributes while parsing; we refuse those
        # ourselves with a precise rule, and a warning must not escape as noise or, under
        # warnings-as-errors, turn into a misleading "malformed".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _parse_inner(der)
    except PolicyError:
        raise
    except x509.DuplicateExtension:
        raise PolicyError("csr.extensions", "duplicate", "an extension appears twice") from None
    except Exception:  # noqa: BLE001 - x509 raises ValueError, InvalidVersion, UnsupportedGeneralNameType, ...
        raise PolicyError("csr", "der", "malformed certificate request") from None


# Signatures by broken hashes: a collision lets one proof of possession stand for another request.
_WEAK_SIGNATURE_OIDS = {
    "1.2.840.113549.1.1.5": "SHA-1",  # sha1WithRSAEncryption
    "1.3.14.3.2.29": "SHA-1",  # sha1WithRSASignature (OIW)
    "1.2.840.10045.4.1": "SHA-1",  # ecdsa-with-SHA1
    "1.2.840.10040.4.3": "SHA-1",  # dsa-with-sha1
    "1.2.840.113549.1.1.4": "MD5",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.2": "MD2",  # md2WithRSAEncryption
}


def _weak_hash(csr: x509.CertificateSigningRequest) -> str | None:
    weak = _WEAK_SIGNATURE_OIDS.get(csr.signature_algorithm_oid.dotted_string)
    if weak is None and csr.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS:
        try:
            h = csr.signature_hash_algorithm
        except Exception:  # noqa: BLE001 - unknown PSS parameters: the signature check decides
            h = None
        weak = {"sha1": "SHA-1", "md5": "MD5"}.get(h.name if h is not None else "")
    return weak


def _parse_inner(der: bytes):
    csr = x509.load_der_x509_csr(der)
    # cryptography parses lazily: touch everything here so hostile bytes fail inside the try.
    pub = csr.public_key()
    spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    weak = _weak_hash(csr)
    sig_ok = weak is None and csr.is_signature_valid
    rdns = [[(a.oid, a.value) for a in rdn] for rdn in csr.subject.rdns]
    exts = [(e.oid, e.critical, e.value) for e in csr.extensions]
    sans: list[object] = []
    for _, _, v in exts:
        if isinstance(v, x509.SubjectAlternativeName):
            sans = list(v)
    return csr, pub, spki, (sig_ok, weak), rdns, exts, sans


def check_csr(der: bytes, profile: Profile) -> CsrInfo:
    """Check a DER CSR against a profile: well-formed, proof of possession, key, extensions, names."""
    if not isinstance(der, (bytes, bytearray)) or not der:
        raise PolicyError("csr", "der", "malformed certificate request: empty")
    if len(der) > MAX_CSR_BYTES:
        raise PolicyError("csr", "size", f"certificate request larger than {MAX_CSR_BYTES} bytes")
    der = bytes(der)
    _csr, _pub, spki, (sig_ok, weak), rdns, exts, san_names = _parse(der)
    if weak is not None:
        raise PolicyError("csr", "signature-algorithm", f"{weak} signature refused: sign the request with SHA-256 or better")
    if not sig_ok:
        raise PolicyError("csr", "signature", "the request signature does not verify (no proof of possession)")
    key_type = check_public_key(spki, profile.key_types)

    seen_oids: set[x509.ObjectIdentifier] = set()
    for oid, critical, value in exts:
        if oid in seen_oids:  # cryptography raises first today; keep the rule if that ever changes
            raise PolicyError("csr.extensions", "duplicate", f"extension {oid.dotted_string} appears twice")
        seen_oids.add(oid)
        if not isinstance(value, _ALLOWED_CSR_EXTENSIONS):
            raise PolicyError(
                "csr.extensions",
                "critical-unknown" if critical else "unknown",
                f"extension {oid.dotted_string} is not accepted in a request",
            )
        # A CA's own request (ca request, openssl req -addext basicConstraints=CA:TRUE) asks for what a
        # sub-CA profile makes anyway; any other profile never makes a CA out of a request.
        if isinstance(value, x509.BasicConstraints) and value.ca and profile.kind != "sub-ca":
            raise PolicyError("csr.extensions", "basic-constraints", "a request may not ask for a CA certificate")

    subject: list[tuple[str, str]] = []
    for rdn in rdns:
        if len(rdn) != 1:
            raise PolicyError("subject", "multi-valued-rdn", "multi-valued RDNs are not accepted")
        oid, value = rdn[0]
        attr = _OID_ATTRS.get(oid)
        if attr is None:
            raise PolicyError(f"subject.{oid.dotted_string}", "not-allowed", "subject attribute not supported")
        if not isinstance(value, str):
            raise PolicyError(f"subject.{attr}", "charset", "attribute value is not a string")
        subject.append((attr, value))
    subject_t = tuple(subject)

    sans = tuple(_general_name(gn) for gn in san_names)
    if not san_names and x509.SubjectAlternativeName.oid in seen_oids:
        raise PolicyError("san", "empty", "empty subjectAltName extension")
    sans = check_names(subject_t, sans, profile)
    return CsrInfo(public_key_der=spki, key_type=key_type, subject=subject_t, sans=sans)


__all__ = ["CsrInfo", "KEY_TYPES", "check_public_key", "check_csr"]

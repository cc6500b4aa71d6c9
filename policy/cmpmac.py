"""CMP message protection, pure: MACs (RFC 9810 §5.1.3.1 PasswordBasedMac, RFC 9481 §6.1 PBMAC1) and signature checks (RFC 9481 §3)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import load_der_public_key

# Digest and HMAC names by OID (RFC 9481 §2 and §6.2; hmac-sha1 is OpenSSL 3.0's default PBM MAC and still a sound MAC).
DIGESTS = {"1.3.14.3.2.26": "sha1", "2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512"}
HMACS = {
    "1.3.6.1.5.5.8.1.2": "sha1",
    "1.2.840.113549.2.7": "sha1",
    "1.2.840.113549.2.9": "sha256",
    "1.2.840.113549.2.10": "sha384",
    "1.2.840.113549.2.11": "sha512",
}
KINDS = ("pbm", "pbmac1")
# Bounds a hostile sender cannot push past: the iteration count is the CPU it makes us spend per message.
MIN_ITERATIONS = 100
MAX_ITERATIONS = 100_000
MAX_SALT = 64
MIN_SALT = 8
MIN_SECRET = 16


class MacSpecError(ValueError):
    """The MAC parameters are outside what Donjon accepts (one line, safe to show)."""


@dataclass(frozen=True)
class MacSpec:
    """What a CMP MAC needs besides the secret: kind, salt, iterations, digest/PRF and HMAC names, key length (PBMAC1)."""

    kind: str
    salt: bytes
    iterations: int
    owf: str  # PBM: the one-way function; PBMAC1: the PBKDF2 PRF's digest
    mac: str  # the HMAC's digest
    key_len: int = 0  # PBMAC1 only

    def check(self) -> None:
        if self.kind not in KINDS:
            raise MacSpecError(f"unknown MAC kind {self.kind!r}")
        if not MIN_SALT <= len(self.salt) <= MAX_SALT:
            raise MacSpecError(f"MAC salt of {len(self.salt)} bytes (must be {MIN_SALT}..{MAX_SALT})")
        if not MIN_ITERATIONS <= self.iterations <= MAX_ITERATIONS:
            raise MacSpecError(f"MAC iteration count {self.iterations} (must be {MIN_ITERATIONS}..{MAX_ITERATIONS})")
        if self.owf not in DIGESTS.values() or self.mac not in DIGESTS.values():
            raise MacSpecError("unsupported MAC digest")
        if self.kind == "pbmac1" and not 16 <= self.key_len <= 64:
            raise MacSpecError(f"PBMAC1 key length {self.key_len} (must be 16..64)")


_HASHES: dict[str, hashes.HashAlgorithm] = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


def derive_key(spec: MacSpec, secret: bytes) -> bytes:
    spec.check()
    if spec.kind == "pbm":
        # RFC 9810 §5.1.3.1: BASEKEY = OWF^iterationCount(password || salt).
        key = secret + spec.salt
        for _ in range(spec.iterations):
            key = hashlib.new(spec.owf, key).digest()
        return key
    return PBKDF2HMAC(algorithm=_HASHES[spec.owf], length=spec.key_len, salt=spec.salt, iterations=spec.iterations).derive(secret)


def compute(spec: MacSpec, secret: bytes, data: bytes) -> bytes:
    """The MAC of `data` (DER of the ProtectedPart) under `secret`."""
    return hmac.new(derive_key(spec, secret), data, spec.mac).digest()


def verify(spec: MacSpec, secret: bytes, data: bytes, value: bytes) -> bool:
    try:
        return hmac.compare_digest(compute(spec, secret, data), value)
    except MacSpecError:
        return False


# Signature algorithms accepted for protection and POPO (RFC 9481 §3): OID → (key kind, hash).
SIG_ALGS: dict[str, tuple[str, type[hashes.HashAlgorithm] | None]] = {
    "1.2.840.10045.4.3.2": ("ec", hashes.SHA256), "1.2.840.10045.4.3.3": ("ec", hashes.SHA384), "1.2.840.10045.4.3.4": ("ec", hashes.SHA512),
    "1.2.840.113549.1.1.11": ("rsa", hashes.SHA256), "1.2.840.113549.1.1.12": ("rsa", hashes.SHA384), "1.2.840.113549.1.1.13": ("rsa", hashes.SHA512),
    "1.3.101.112": ("ed25519", None), "1.3.101.113": ("ed448", None),
}


class VerifyError(ValueError):
    """A signature that does not verify or cannot be checked."""


def verify_signature(spki_or_cert: x509.Certificate | bytes, alg_oid: str, signature: bytes, data: bytes) -> None:
    """Check `signature` over `data` with the key of a certificate or a DER SubjectPublicKeyInfo; VerifyError if not."""
    if alg_oid not in SIG_ALGS:
        raise VerifyError(f"signature algorithm {alg_oid} not accepted")
    kind, h = SIG_ALGS[alg_oid]
    try:
        key = spki_or_cert.public_key() if isinstance(spki_or_cert, x509.Certificate) else load_der_public_key(spki_or_cert)
        if kind == "ec" and isinstance(key, ec.EllipticCurvePublicKey) and h is not None:
            key.verify(signature, data, ec.ECDSA(h()))
        elif kind == "rsa" and isinstance(key, rsa.RSAPublicKey) and h is not None:
            if key.key_size < 2048:
                raise VerifyError("RSA key under 2048 bits")
            key.verify(signature, data, padding.PKCS1v15(), h())
        elif kind == "ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif kind == "ed448" and isinstance(key, ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            raise VerifyError("signature algorithm does not match the key")
    except InvalidSignature as exc:
        raise VerifyError("signature does not verify") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise VerifyError("public key unusable") from exc

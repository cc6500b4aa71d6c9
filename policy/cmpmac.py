"""CMP MAC-based protection (RFC 9810 §5.1.3.1 PasswordBasedMac, RFC 9481 §6.1 PBMAC1): pure key derivation and MAC."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

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


_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def derive_key(spec: MacSpec, secret: bytes) -> bytes:
    spec.check()
    if spec.kind == "pbm":
        # RFC 9810 §5.1.3.1: BASEKEY = OWF^iterationCount(password || salt).
        key = secret + spec.salt
        for _ in range(spec.iterations):
            key = hashlib.new(spec.owf, key).digest()
        return key
    return PBKDF2HMAC(algorithm=_HASHES[spec.owf](), length=spec.key_len, salt=spec.salt, iterations=spec.iterations).derive(secret)


def compute(spec: MacSpec, secret: bytes, data: bytes) -> bytes:
    """The MAC of `data` (DER of the ProtectedPart) under `secret`."""
    return hmac.new(derive_key(spec, secret), data, spec.mac).digest()


def verify(spec: MacSpec, secret: bytes, data: bytes, value: bytes) -> bool:
    try:
        return hmac.compare_digest(compute(spec, secret, data), value)
    except MacSpecError:
        return False

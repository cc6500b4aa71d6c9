"""JWS (RFC 7515 flattened JSON) and JWK (RFC 7517/7638) as ACME uses them: ES256, ES384, RS256, EdDSA; strict and bounded."""

# Written on pyca/cryptography rather than taking josepy: ACME needs one serialisation (flattened
# JSON), four algorithms and the thumbprint, and every parse here must refuse oversize or odd input
# with a typed error that becomes an RFC 7807 problem (josepy raises a zoo of exception types and
# accepts algorithms ACME forbids, e.g. HS256 on the outer JWS).

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_JWS = 64 * 1024
MAX_FIELD = 48 * 1024
ALGS = ("ES256", "ES384", "RS256", "EdDSA")
_EC = {"P-256": (ec.SECP256R1, 32, "ES256", hashes.SHA256), "P-384": (ec.SECP384R1, 48, "ES384", hashes.SHA384)}


class JoseError(Exception):
    """`kind` is the ACME error type it maps to (malformed, badSignatureAlgorithm, badPublicKey)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def b64d(s: Any, what: str = "value", limit: int = MAX_FIELD) -> bytes:
    if not isinstance(s, str) or len(s) > limit:
        raise JoseError("malformed", f"{what}: not a base64url string")
    if "=" in s or "+" in s or "/" in s:
        raise JoseError("malformed", f"{what}: base64url without padding expected")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        raise JoseError("malformed", f"{what}: not base64url") from None


def b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _json_obj(raw: bytes, what: str) -> dict:
    try:
        v = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise JoseError("malformed", f"{what}: not JSON") from None
    if not isinstance(v, dict):
        raise JoseError("malformed", f"{what}: not a JSON object")
    return v


def _int(s: Any, what: str) -> int:
    return int.from_bytes(b64d(s, what, 2048), "big")


@dataclass(frozen=True)
class Jwk:
    """A public key from a JWK; `thumbprint` is RFC 7638 (SHA-256, base64url)."""

    key: Any
    canonical: str  # the RFC 7638 members, sorted, no whitespace
    alg_ok: tuple[str, ...]

    @property
    def thumbprint(self) -> str:
        return b64e(hashlib.sha256(self.canonical.encode()).digest())

    def to_dict(self) -> dict:
        return json.loads(self.canonical)

    def spki(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_jwk(d: Any) -> Jwk:
    if not isinstance(d, dict):
        raise JoseError("malformed", "jwk: not an object")
    kty = d.get("kty")
    try:
        if kty == "EC":
            crv = d.get("crv")
            if crv not in _EC:
                raise JoseError("badPublicKey", f"jwk: curve {str(crv)[:20]!r} not supported (P-256, P-384)")
            curve, size, alg, _ = _EC[crv]
            x, y = b64d(d.get("x"), "jwk.x", 200), b64d(d.get("y"), "jwk.y", 200)
            if len(x) != size or len(y) != size:
                raise JoseError("badPublicKey", "jwk: coordinates of the wrong length")
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve()).public_key()
            canon = {"crv": crv, "kty": "EC", "x": d["x"], "y": d["y"]}
            algs: tuple[str, ...] = (alg,)
        elif kty == "RSA":
            n, e = _int(d.get("n"), "jwk.n"), _int(d.get("e"), "jwk.e")
            if n.bit_length() < 2048 or n.bit_length() > 8192:
                raise JoseError("badPublicKey", "jwk: RSA keys of 2048 to 8192 bits only")
            if e < 3 or e % 2 == 0 or e.bit_length() > 32:
                raise JoseError("badPublicKey", "jwk: bad RSA exponent")
            key = rsa.RSAPublicNumbers(e, n).public_key()
            canon = {"e": d["e"], "kty": "RSA", "n": d["n"]}
            algs = ("RS256",)
        elif kty == "OKP":
            if d.get("crv") != "Ed25519":
                raise JoseError("badPublicKey", "jwk: OKP keys on Ed25519 only")
            x = b64d(d.get("x"), "jwk.x", 100)
            if len(x) != 32:
                raise JoseError("badPublicKey", "jwk: Ed25519 key of the wrong length")
            key = ed25519.Ed25519PublicKey.from_public_bytes(x)
            canon = {"crv": "Ed25519", "kty": "OKP", "x": d["x"]}
            algs = ("EdDSA",)
        else:
            raise JoseError("badPublicKey", f"jwk: key type {str(kty)[:20]!r} not supported")
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise JoseError("badPublicKey", "jwk: not a valid public key") from None
    return Jwk(key, json.dumps(canon, sort_keys=True, separators=(",", ":")), algs)


def jwk_of_key(key: Any) -> Jwk | None:
    """The JWK of a certificate's public key (revocation by certificate key), or None if unsupported."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name)
        if crv is None:
            return None
        n = key.public_numbers()
        size = _EC[crv][1]
        return parse_jwk({"kty": "EC", "crv": crv, "x": b64e(n.x.to_bytes(size, "big")), "y": b64e(n.y.to_bytes(size, "big"))})
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers()
        return parse_jwk({"kty": "RSA", "n": b64e(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
                          "e": b64e(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big"))})
    if isinstance(key, ed25519.Ed25519PublicKey):
        return parse_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64e(key.public_bytes_raw())})
    return None


@dataclass(frozen=True)
class Jws:
    protected: dict
    protected_b64: str
    payload: bytes  # b"" for POST-as-GET
    payload_b64: str
    signature: bytes
    alg: str
    nonce: str | None
    url: str
    jwk: Jwk | None
    kid: str | None

    def payload_json(self) -> dict:
        if self.payload == b"":
            raise JoseError("malformed", "a payload is required")
        return _json_obj(self.payload, "payload")

    def verify(self, key: Jwk) -> None:
        if self.alg not in key.alg_ok:
            raise JoseError("badSignatureAlgorithm", f"{self.alg} does not go with this key (want {', '.join(key.alg_ok)})")
        data = f"{self.protected_b64}.{self.payload_b64}".encode()
        k = key.key
        try:
            if self.alg in ("ES256", "ES384"):
                size = 32 if self.alg == "ES256" else 48
                if len(self.signature) != 2 * size:
                    raise InvalidSignature()
                r = int.from_bytes(self.signature[:size], "big")
                s = int.from_bytes(self.signature[size:], "big")
                k.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256() if size == 32 else hashes.SHA384()))
            elif self.alg == "RS256":
                k.verify(self.signature, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                k.verify(self.signature, data)
        except (InvalidSignature, ValueError, TypeError):
            raise JoseError("malformed", "JWS signature does not verify") from None


def parse_jws(body: bytes, outer: bool = True) -> Jws:
    """A flattened JSON JWS (RFC 8555 §6.2): one signature, protected header with alg, url, and
    (outer) nonce, and exactly one of jwk and kid. Nothing is verified yet but the shape."""
    if len(body) > MAX_JWS:
        raise JoseError("malformed", "JWS too large")
    doc = _json_obj(body, "JWS")
    if set(doc) - {"protected", "payload", "signature", "header"} or "signatures" in doc:
        raise JoseError("malformed", "a flattened JWS with one signature expected")
    if "header" in doc:
        raise JoseError("malformed", "unprotected header not allowed")
    pb64, payload_b64, sig_b64 = doc.get("protected"), doc.get("payload"), doc.get("signature")
    if not isinstance(pb64, str) or not isinstance(payload_b64, str) or not isinstance(sig_b64, str):
        raise JoseError("malformed", "protected, payload and signature must be strings")
    prot = _json_obj(b64d(pb64, "protected"), "protected header")
    payload = b64d(payload_b64, "payload") if payload_b64 else b""
    sig = b64d(sig_b64, "signature", 2048)
    alg = prot.get("alg")
    if not isinstance(alg, str) or alg not in ALGS:
        raise JoseError("badSignatureAlgorithm", f"alg {str(alg)[:20]!r} not supported (want {', '.join(ALGS)})")
    url = prot.get("url")
    if not isinstance(url, str) or len(url) > 2048:
        raise JoseError("malformed", "protected header: url missing")
    nonce = prot.get("nonce")
    if outer and (not isinstance(nonce, str) or len(nonce) > 256):
        raise JoseError("badNonce", "protected header: nonce missing")
    if not outer and nonce is not None:
        raise JoseError("malformed", "the inner JWS must not have a nonce")
    has_jwk, has_kid = "jwk" in prot, "kid" in prot
    if has_jwk == has_kid:
        raise JoseError("malformed", "protected header: exactly one of jwk and kid")
    jwk = parse_jwk(prot["jwk"]) if has_jwk else None
    kid = prot.get("kid")
    if has_kid and (not isinstance(kid, str) or len(kid) > 2048):
        raise JoseError("malformed", "protected header: kid must be a URL")
    if "b64" in prot or "crit" in prot:
        raise JoseError("malformed", "protected header: b64 and crit are not allowed")
    return Jws(prot, pb64, payload, payload_b64, sig, alg, nonce if outer else None, url, jwk, kid if has_kid else None)


def key_authorization(token: str, jwk: Jwk) -> str:
    return f"{token}.{jwk.thumbprint}"

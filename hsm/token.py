"""The one PKCS#11 connection of a process: login session, keys by label, signing, reconnect.

Not thread-safe by design: SoftHSM crashes with two concurrent callers (python-pkcs11 initialises
with NULL, which turns SoftHSM's locking off). The CIS serialises every call through one
CapacityLimiter(1); nothing else in Donjon imports pkcs11.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

_CURVES = {"p256": ("secp256r1", ec.SECP256R1()), "p384": ("secp384r1", ec.SECP384R1())}
_RSA_BITS = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096}
_ED25519_PARAMS = bytes.fromhex("06032b6570")  # DER OID 1.3.101.112
_CURVE_BY_PARAMS = {
    bytes.fromhex("06082a8648ce3d030107"): "p256",
    bytes.fromhex("06052b81040022"): "p384",
    _ED25519_PARAMS: "ed25519",
}
WRAP_LABEL = "donjon-cmdb-wrap"
POLICY_APP = "donjon-ca-policy"  # CKA_APPLICATION of the data object holding a CA's issuance policy

# Errors after which the token connection is rebuilt (token storage gone, session lost).
_RECONNECT = (
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.TokenNotRecognised,
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.NoSuchToken,
)


class TokenError(Exception):
    """Domain error of the HSM layer: the message is safe to show an operator."""


class ObjectMissing(TokenError):
    """An expected key or certificate is not found: maybe the token storage went away and came back,
    and SoftHSM only sees it again after the library is re-initialised."""


@dataclass
class CaKey:
    label: str
    key_type: str
    private: Any
    spki: bytes


class Token:
    def __init__(self, module: str, label: str):
        self.module = module
        self.label = label
        self._lib: Any = None
        self._session: Any = None
        self._pin: str | None = None
        self._keys: dict[str, CaKey] = {}

    # ------------------------------------------------------------ connection

    def load(self) -> None:
        """Map and initialise the PKCS#11 module (before the privilege drop)."""
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.module)
            except pkcs11.exceptions.PKCS11Error as e:
                raise TokenError(f"cannot load the PKCS#11 module {self.module}: {e}") from None

    def login(self, pin: str) -> None:
        try:
            self.load()
            token = self._lib.get_token(token_label=self.label)
            self._session = token.open(user_pin=pin, rw=True)
        except pkcs11.exceptions.PinIncorrect:
            raise TokenError("wrong PIN") from None
        except pkcs11.exceptions.NoSuchToken:
            raise TokenError(f"no token labelled {self.label!r} in {self.module}") from None
        except pkcs11.exceptions.PKCS11Error as e:
            raise TokenError(f"cannot log into token {self.label!r}: {type(e).__name__}") from None
        self._pin = pin
        self._keys.clear()

    def logout(self) -> None:
        """Close the login session (every session of this process logs out with it)."""
        if self._session is not None:
            try:
                self._session.close()
            except pkcs11.exceptions.PKCS11Error:
                pass
        self._session = None
        self._pin = None
        self._keys.clear()

    def so_session(self, so_pin: str):
        """A read-write session of the Security Officer (no user may be logged in: call logout first)."""
        try:
            return self._lib.get_token(token_label=self.label).open(so_pin=so_pin, rw=True)
        except pkcs11.exceptions.PinIncorrect:
            raise TokenError("wrong SO PIN") from None
        except pkcs11.exceptions.PKCS11Error as e:
            raise TokenError(f"cannot log the SO into token {self.label!r}: {type(e).__name__}") from None

    @property
    def session(self):
        return self._session

    def module_info(self) -> tuple[str, str]:
        """(library manufacturer, library description) of the loaded PKCS#11 module."""
        self.load()
        return str(self._lib.manufacturer_id).strip(), str(self._lib.library_description).strip()

    @property
    def active(self) -> bool:
        """Activated once with a good PIN (the session itself may need a reconnect)."""
        return self._pin is not None

    def reconnect(self) -> None:
        """Re-initialise the library, log in again, forget cached handles (keys are re-found by label)."""
        if self._pin is None:
            raise TokenError("token not activated")
        try:
            self._lib.reinitialize()
        except pkcs11.exceptions.PKCS11Error:
            pass
        self._session = None
        pin, self._pin = self._pin, None
        try:
            self.login(pin)
        finally:
            self._pin = pin  # still activated: the next call tries again

    def call(self, fn, *args):
        """Run fn(*args) once; on a connection-level failure reconnect and retry once."""
        if self._pin is None:
            raise TokenError("the CA is not activated")
        if self._session is None:
            self.reconnect()
        try:
            return fn(*args)
        except (*_RECONNECT, ObjectMissing):
            self.reconnect()
            return fn(*args)

    def probe(self) -> None:
        """A live look into the token (the wrapping key must be there): raises if it is unavailable."""
        self._wrapping_key(create=False)

    def token_info(self) -> str:
        t = self._session.token
        return f"{t.label} serial={t.serial.decode() if isinstance(t.serial, bytes) else t.serial} model={t.model}"

    # ------------------------------------------------------------ keys

    def generate(self, label: str, key_type: str) -> bytes:
        s = self._session
        if self._find_private(label) is not None:
            raise TokenError(f"a key labelled {label!r} already exists")
        # Extractable only under a KEK the SO marked trusted (SoftHSM2 enforces CKA_WRAP_WITH_TRUSTED,
        # and only the SO can set CKA_TRUSTED): `donjon keys backup` is then the one way out, wrapped.
        priv_t = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True,
                  Attribute.SIGN: True, Attribute.TOKEN: True, Attribute.PRIVATE: True}
        pub_t = {Attribute.VERIFY: True, Attribute.TOKEN: True}
        if key_type in _RSA_BITS:
            s.generate_keypair(KeyType.RSA, _RSA_BITS[key_type], label=label, store=True,
                               public_template={**pub_t, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                               private_template=priv_t)
        elif key_type in _CURVES:
            params = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type][0])}, local=True)
            params.generate_keypair(label=label, store=True, public_template=pub_t, private_template=priv_t)
        elif key_type == "ed25519":
            params = s.create_domain_parameters(KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_PARAMS}, local=True)
            params.generate_keypair(label=label, store=True, mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                                    public_template=pub_t, private_template=priv_t)
        else:
            raise TokenError(f"unsupported key type {key_type}")
        return self.key(label).spki

    def delete(self, label: str) -> None:
        found = False
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE, ObjectClass.DATA):
            for obj in list(self._session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})):
                obj.destroy()
                found = True
        self._keys.pop(label, None)
        if not found:
            raise TokenError(f"no key labelled {label!r}")

    def _find_private(self, label: str):
        objs = list(self._session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
        if len(objs) > 1:
            raise TokenError(f"several private keys labelled {label!r}: refusing to guess")
        return objs[0] if objs else None

    def key(self, label: str) -> CaKey:
        k = self._keys.get(label)
        if k is not None:
            return k
        priv = self._find_private(label)
        if priv is None:
            raise ObjectMissing(f"no key labelled {label!r} in the token")
        pub = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
        if priv.key_type == KeyType.RSA:
            n = int.from_bytes(pub[Attribute.MODULUS], "big")
            e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
            pk = rsa.RSAPublicNumbers(e, n).public_key()
            key_type = {2048: "rsa2048", 3072: "rsa3072", 4096: "rsa4096"}.get(pk.key_size)
            if key_type is None:
                raise TokenError(f"key {label!r}: unsupported RSA size {pk.key_size}")
        else:
            key_type = _CURVE_BY_PARAMS.get(bytes(pub[Attribute.EC_PARAMS]))
            if key_type is None:
                raise TokenError(f"key {label!r}: unsupported curve")
            point = _unwrap_octet_string(bytes(pub[Attribute.EC_POINT]))
            if key_type == "ed25519":
                pk = ed25519.Ed25519PublicKey.from_public_bytes(point)
            else:
                pk = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[key_type][1], point)
        spki = pk.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        k = CaKey(label, key_type, priv, spki)
        self._keys[label] = k
        return k

    # ------------------------------------------------------------ CA certificates kept beside their key

    def store_certificate(self, label: str, der: bytes, subject_der: bytes) -> None:
        self._session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.LABEL: label,
            Attribute.SUBJECT: subject_der,
            Attribute.VALUE: der,
        })

    def certificates(self, label: str) -> list[bytes]:
        objs = self._session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label})
        return [bytes(o[Attribute.VALUE]) for o in objs]

    def store_policy(self, label: str, data: bytes) -> None:
        """Write a CA's issuance policy once, beside its key; never modifiable afterwards."""
        self._session.create_object({
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.MODIFIABLE: False,
            Attribute.LABEL: label,
            Attribute.APPLICATION: POLICY_APP,
            Attribute.VALUE: data,
        })

    def policy(self, label: str) -> bytes | None:
        objs = list(self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label,
                                                Attribute.APPLICATION: POLICY_APP}))
        if len(objs) > 1:
            raise TokenError(f"several issuance policies for {label!r}: refusing to guess")
        return bytes(objs[0][Attribute.VALUE]) if objs else None

    # ------------------------------------------------------------ signing

    def sign(self, key: CaKey, data: bytes, hash_alg: hashes.HashAlgorithm | None) -> bytes:
        """Sign `data` (the whole to-be-signed structure)."""
        if key.key_type.startswith("rsa"):
            mech = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS, "sha512": Mechanism.SHA512_RSA_PKCS}[hash_alg.name]
            return key.private.sign(data, mechanism=mech)
        if key.key_type == "ed25519":
            return key.private.sign(data, mechanism=Mechanism.EDDSA)
        return self.sign_digest(key, hashlib.new(hash_alg.name, data).digest(), hash_alg)

    def sign_digest(self, key: CaKey, digest: bytes, hash_alg: hashes.HashAlgorithm) -> bytes:
        """Sign a precomputed digest (streamed CRLs). Not available for Ed25519 (pure EdDSA)."""
        if key.key_type.startswith("rsa"):
            return key.private.sign(_DIGEST_INFO[hash_alg.name] + digest, mechanism=Mechanism.RSA_PKCS)
        if key.key_type in _CURVES:
            raw = key.private.sign(digest, mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        raise TokenError("digest signing is not possible with Ed25519")

    # ------------------------------------------------------------ CMDB key wrapping

    def _wrapping_key(self, create: bool):
        try:
            return self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=WRAP_LABEL)
        except pkcs11.exceptions.NoSuchKey:
            if not create:
                raise ObjectMissing("the CMDB wrapping key is missing from the token") from None
        return self._session.generate_key(KeyType.AES, 256, label=WRAP_LABEL, store=True, template={
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True,  # as CA keys (generate)
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.TOKEN: True, Attribute.PRIVATE: True})

    def new_db_key(self) -> tuple[bytes, bytes]:
        """Create a random 256-bit database key; return it with its AES-GCM encryption under the HSM key."""
        wk = self._wrapping_key(create=True)
        db_key = os.urandom(32)
        nonce = os.urandom(12)
        ct = wk.encrypt(db_key, mechanism=Mechanism.AES_GCM, mechanism_param=pkcs11.mechanisms.GCMParams(nonce, b"donjon-cmdb-v1"))
        return db_key, b"\x01" + nonce + ct

    def unwrap_db_key(self, blob: bytes) -> bytes:
        if len(blob) != 1 + 12 + 32 + 16 or blob[0] != 1:
            raise TokenError("the wrapped CMDB key file is malformed")
        wk = self._wrapping_key(create=False)
        try:
            key = wk.decrypt(blob[13:], mechanism=Mechanism.AES_GCM, mechanism_param=pkcs11.mechanisms.GCMParams(blob[1:13], b"donjon-cmdb-v1"))
        except pkcs11.exceptions.PKCS11Error:
            raise TokenError("the wrapped CMDB key does not decrypt under this token's wrapping key") from None
        return bytes(key)


_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _unwrap_octet_string(v: bytes) -> bytes:
    """EC_POINT is a DER OCTET STRING per PKCS#11; some modules return the raw point."""
    if v and v[0] == 0x04 and len(v) > 2:
        n = v[1]
        if n < 0x80 and n == len(v) - 2:
            return v[2:]
        if n == 0x81 and v[2] == len(v) - 3:
            return v[3:]
    return v


def make_private_key(token: Token, key: CaKey):
    """A cryptography private-key object whose sign() goes to the HSM, for cryptography's builders."""
    if key.key_type.startswith("rsa"):
        return _make(rsa.RSAPrivateKey, token, key)
    if key.key_type == "ed25519":
        return _make(ed25519.Ed25519PrivateKey, token, key)
    return _make(ec.EllipticCurvePrivateKey, token, key)


def _make(base, token: Token, key: CaKey):
    pub = serialization.load_der_public_key(key.spki)

    def sign(self, data, *args):
        if base is rsa.RSAPrivateKey:
            pad, alg = args
            if not isinstance(pad, padding.PKCS1v15):
                raise TokenError("only PKCS#1 v1.5 signatures are supported")
            return token.sign(key, data, alg)
        if base is ec.EllipticCurvePrivateKey:
            return token.sign(key, data, args[0].algorithm)
        return token.sign(key, data, None)

    def unsupported(self, *a, **k):
        raise TokenError("operation not available on an HSM key")

    ns: dict[str, Any] = {name: unsupported for name in getattr(base, "__abstractmethods__", ())}
    ns.update(sign=sign, public_key=lambda self: pub)
    if base is rsa.RSAPrivateKey:
        ns["key_size"] = property(lambda self: pub.key_size)
    if base is ec.EllipticCurvePrivateKey:
        ns["curve"] = property(lambda self: pub.curve)
        ns["key_size"] = property(lambda self: pub.curve.key_size)
    return type(f"Hsm{base.__name__}", (base,), ns)()

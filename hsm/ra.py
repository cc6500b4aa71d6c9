"""The SCEP RA's decryption key in a role's own token: generated for decryption only, used for RSA key transport."""

from __future__ import annotations

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from .token import Token, TokenError


def generate_decryption_key(token: Token, label: str, bits: int = 2048) -> bytes:
    """An RSA key that can decrypt and nothing else (CKA_SIGN false: the RA signs with another key,
    RFC 8894 §3.1 allows the two to differ and we keep them apart). Returns its SPKI."""
    return _generate(token, label, bits, decrypt=True)


def generate_signing_key(token: Token, label: str, bits: int = 2048) -> bytes:
    """An RSA key that can sign and nothing else (CKA_DECRYPT false: SoftHSM's default would allow it)."""
    return _generate(token, label, bits, decrypt=False)


def _generate(token: Token, label: str, bits: int, decrypt: bool) -> bytes:
    s = token._session
    if list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})):
        raise TokenError(f"a key labelled {label!r} already exists")
    pub, _ = s.generate_keypair(
        KeyType.RSA, bits, label=label, store=True,
        public_template={Attribute.ENCRYPT: decrypt, Attribute.VERIFY: not decrypt, Attribute.TOKEN: True,
                         Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.DECRYPT: decrypt,
                          Attribute.SIGN: not decrypt, Attribute.UNWRAP: False, Attribute.TOKEN: True,
                          Attribute.PRIVATE: True})
    n = int.from_bytes(pub[Attribute.MODULUS], "big")
    e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
    return rsa.RSAPublicNumbers(e, n).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def decrypt(token: Token, label: str, ciphertext: bytes) -> bytes:
    """RSA PKCS#1 v1.5 decryption in the token. Any failure raises TokenError (the caller treats
    it like a wrong key: implicit rejection, no padding oracle)."""
    def run() -> bytes:
        objs = list(token._session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
        if len(objs) != 1:
            raise TokenError(f"no single decryption key labelled {label!r}")
        return bytes(objs[0].decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS))
    try:
        return token.call(run)
    except (pkcs11.exceptions.PKCS11Error, AttributeError):  # AttributeError: the key has no CKA_DECRYPT
        raise TokenError("decryption failed") from None

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


_DIGEST_INFO = {  # DER DigestInfo prefixes (RFC 8017 §9.2 note 1): SHA-1 and MD5 only when configured for old devices
    "md5": bytes.fromhex("3020300c06082a864886f70d020505000410"),
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def sign(token: Token, label: str, data: bytes, digest: str) -> bytes:
    """RSA PKCS#1 v1.5 over `data` with the named digest (hashed here, signed raw in the token)."""
    import hashlib
    if digest not in _DIGEST_INFO:
        raise TokenError(f"unsupported digest {digest}")
    block = _DIGEST_INFO[digest] + hashlib.new(digest, data).digest()
    key = token.key(label)
    return token.call(lambda: bytes(key.private.sign(block, mechanism=Mechanism.RSA_PKCS)))


def generate_transport_ec(token: Token) -> bytes:
    """EST server-side key generation (RFC 7030 §4.4): a P-256 key made by the token as a session
    object that may be extracted (it is returned to the client: the RFC allows it over the TLS
    channel), read out as PKCS#8 DER and destroyed. Never a token object, never a CA's token."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    from pkcs11.util.ec import encode_named_curve_parameters

    def run() -> bytes:
        s = token._session
        params = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                                            local=True)
        pub, priv = params.generate_keypair(store=False, public_template={Attribute.TOKEN: False},
                                            private_template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                                              Attribute.EXTRACTABLE: True, Attribute.SIGN: True})
        try:
            value = int.from_bytes(bytes(priv[Attribute.VALUE]), "big")
        finally:
            priv.destroy()
            pub.destroy()
        key = ec.derive_private_key(value, ec.SECP256R1())
        return key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    try:
        return token.call(run)
    except pkcs11.exceptions.PKCS11Error as e:
        raise TokenError(f"key generation failed: {type(e).__name__}") from None

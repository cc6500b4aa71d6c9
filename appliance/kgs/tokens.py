"""The KGS's PKCS#11 work: its own HSM token (archival and sealing keys, HSM-generated keys) and the card reader's tokens.

Not thread-safe (SoftHSM with python-pkcs11's NULL C_Initialize has no locking): the role runs every
call through one CapacityLimiter(1). With SoftHSM2 the card reader and the HSM are one library
instance (one SOFTHSM2_CONF per process): the "cards" are the other tokens of the KGS's tokendir and
the blank card is SoftHSM's free slot; with a real reader they are two modules.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import encode_named_curve_parameters

ARCHIVE_LABEL = "kgs-archive"  # wraps archived keys: never leaves the HSM
SEAL_LABEL = "kgs-seal"  # seals transport secrets and PUKs stored in the CMDB (AES-GCM)
SLOT_IDS = {"auth": b"\x01", "sign": b"\x02", "enc": b"\x03"}  # CKA_ID per slot, as PIV-like cards number them
_CURVES = {"p256": ("secp256r1", ec.SECP256R1()), "p384": ("secp384r1", ec.SECP384R1())}
_RSA_BITS = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096}
_ATTR_OIDS = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
              "C": NameOID.COUNTRY_NAME, "serialNumber": NameOID.SERIAL_NUMBER, "L": NameOID.LOCALITY_NAME,
              "ST": NameOID.STATE_OR_PROVINCE_NAME, "emailAddress": NameOID.EMAIL_ADDRESS}
# python-pkcs11 adds every capability attribute to an unwrap template; a private key refuses the
# public-key ones (AttributeTypeInvalid): DEFAULT drops them.
_NO_PUBLIC_CAPS = {a: DEFAULT for a in (A.ENCRYPT, A.VERIFY, A.WRAP, A.DERIVE)}
# Errors that mean the card (or its reader) went away.
GONE = (pkcs11.exceptions.DeviceRemoved, pkcs11.exceptions.TokenNotPresent, pkcs11.exceptions.TokenNotRecognised,
        pkcs11.exceptions.DeviceError, pkcs11.exceptions.SessionHandleInvalid, pkcs11.exceptions.SessionClosed,
        pkcs11.exceptions.NoSuchToken, pkcs11.exceptions.GeneralError, pkcs11.exceptions.ObjectHandleInvalid)


class CardError(Exception):
    """Domain error of the card and HSM layer: the message is safe to show an operator."""


class CardGone(CardError):
    """The card (token) disappeared from the reader."""


def _pad_label(label: str) -> bytes:
    return label.encode("utf-8")[:32].ljust(32, b" ")


def _der_prefix(der: bytes) -> bytes:
    """The first DER TLV of `der` (SoftHSM's AES_KEY_WRAP_PAD leaves block padding after the PKCS#8)."""
    if len(der) < 2 or der[0] != 0x30:
        raise CardError("the unwrapped key is not DER")
    n = der[1]
    if n < 0x80:
        return der[:2 + n]
    k = n & 0x7F
    if not 1 <= k <= 3 or len(der) < 2 + k:
        raise CardError("the unwrapped key is not DER")
    return der[:2 + k + int.from_bytes(der[2:2 + k], "big")]


def _point(v: bytes) -> bytes:
    """EC_POINT is a DER OCTET STRING per PKCS#11; some modules return the raw point."""
    if v and v[0] == 0x04 and len(v) > 2:
        if v[1] < 0x80 and v[1] == len(v) - 2:
            return v[2:]
        if v[1] == 0x81 and v[2] == len(v) - 3:
            return v[3:]
    return v


def public_key_of(pub) -> Any:
    """The cryptography public key of a PKCS#11 public key object."""
    if pub.key_type == KeyType.RSA:
        return rsa.RSAPublicNumbers(int.from_bytes(pub[A.PUBLIC_EXPONENT], "big"), int.from_bytes(pub[A.MODULUS], "big")).public_key()
    params = bytes(pub[A.EC_PARAMS])
    for curve, obj in _CURVES.values():
        if params == encode_named_curve_parameters(curve):
            return ec.EllipticCurvePublicKey.from_encoded_point(obj, _point(bytes(pub[A.EC_POINT])))
    raise CardError("unsupported curve on the card")


def _signer(priv, pub):
    """A cryptography private key whose sign() goes to the token (for the CSR builder)."""
    base = rsa.RSAPrivateKey if isinstance(pub, rsa.RSAPublicKey) else ec.EllipticCurvePrivateKey

    def sign(self, data, *args):
        if base is rsa.RSAPrivateKey:
            pad, alg = args
            if not isinstance(pad, padding.PKCS1v15) or not isinstance(alg, hashes.SHA256):
                raise CardError("only PKCS#1 v1.5 with SHA-256")
            return bytes(priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
        digest = hashlib.new(args[0].algorithm.name, data).digest()
        raw = bytes(priv.sign(digest, mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def unsupported(self, *a, **k):
        raise CardError("operation not available on a token key")

    ns: dict[str, Any] = {n: unsupported for n in getattr(base, "__abstractmethods__", ())}
    ns.update(sign=sign, public_key=lambda self: pub)
    if base is rsa.RSAPrivateKey:
        ns["key_size"] = property(lambda self: pub.key_size)
    else:
        ns["curve"] = property(lambda self: pub.curve)
        ns["key_size"] = property(lambda self: pub.curve.key_size)
    return type("TokenKey", (base,), ns)()


def make_csr(priv, pub, subject: list[tuple[str, str]], emails: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> bytes:
    """A PKCS#10 request signed with the token key (its proof of possession for the Factory)."""
    name = x509.Name([x509.NameAttribute(_ATTR_OIDS[k], v) for k, v in subject if k in _ATTR_OIDS])
    b = x509.CertificateSigningRequestBuilder().subject_name(name)
    sans: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emails] + [x509.DNSName(d) for d in dns]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algo = hashes.SHA256() if isinstance(pub, rsa.RSAPublicKey) or pub.curve.key_size == 256 else hashes.SHA384()
    return b.sign(_signer(priv, pub), algo).public_bytes(serialization.Encoding.DER)


class Tokens:
    """The HSM login session (kept for the life of the process) and card sessions opened per step."""

    def __init__(self, card_module: str, hsm_module: str, hsm_label: str):
        self.card_module, self.hsm_module, self.hsm_label = card_module, hsm_module, hsm_label
        self.lib: Any = None
        self.card_lib: Any = None
        self.hsm: Any = None
        self._pin = ""
        self._init_token: Any = None

    def open(self, pin: str) -> None:
        """Load both modules and log into the KGS token (before the privilege drop); make its keys once."""
        self._pin = pin
        self.lib = pkcs11.lib(self.hsm_module)
        self.card_lib = self.lib if os.path.realpath(self.card_module) == os.path.realpath(self.hsm_module) else pkcs11.lib(self.card_module)
        # C_InitToken is not in python-pkcs11: call the module's export (the same mapping, dlopen is refcounted).
        f = ctypes.CDLL(self.card_module).C_InitToken
        f.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        f.restype = ctypes.c_ulong
        self._init_token = f
        self._login()

    def ensure_keys(self) -> None:
        """Make the archival and sealing keys once, after the privilege drop: SoftHSM writes each object
        as a file, and one written as root would be unreadable to the KGS's own user."""
        for label, caps in ((ARCHIVE_LABEL, {A.WRAP: True, A.UNWRAP: True, A.ENCRYPT: False, A.DECRYPT: False}),
                            (SEAL_LABEL, {A.WRAP: False, A.UNWRAP: False, A.ENCRYPT: True, A.DECRYPT: True})):
            if not list(self.hsm.get_objects({A.CLASS: ObjectClass.SECRET_KEY, A.LABEL: label})):
                self.hsm.generate_key(KeyType.AES, 256, label=label, store=True, template={
                    A.SENSITIVE: True, A.EXTRACTABLE: False, A.TOKEN: True, A.PRIVATE: True, **caps})

    def _login(self) -> None:
        self.hsm = self.lib.get_token(token_label=self.hsm_label).open(rw=True, user_pin=self._pin)

    def reconnect(self) -> None:
        """After a card vanished: SoftHSM sees its storage again only once re-initialised."""
        try:
            self.lib.reinitialize()
            if self.card_lib is not self.lib:
                self.card_lib.reinitialize()
        finally:
            self._login()

    def _key(self, label: str):
        return self.hsm.get_key(object_class=ObjectClass.SECRET_KEY, label=label)

    # ------------------------------------------------------------ sealing (secrets the CMDB keeps for the KGS)

    def seal(self, data: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        ct = self._key(SEAL_LABEL).encrypt(data, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=pkcs11.mechanisms.GCMParams(nonce, b"donjon-kgs-v1|" + context))
        return b"\x01" + nonce + bytes(ct)

    def unseal(self, blob: bytes, context: bytes) -> bytes:
        if len(blob) < 1 + 12 + 16 or blob[0] != 1:
            raise CardError("a sealed secret is malformed")
        try:
            return bytes(self._key(SEAL_LABEL).decrypt(blob[13:], mechanism=Mechanism.AES_GCM,
                                                       mechanism_param=pkcs11.mechanisms.GCMParams(blob[1:13], b"donjon-kgs-v1|" + context)))
        except pkcs11.exceptions.PKCS11Error:
            raise CardError("a sealed secret does not open under this KGS's key (another record's?)") from None

    # ------------------------------------------------------------ the reader

    def _tokens(self) -> list:
        """The tokens in the readers; one that fails to answer (pulled out, storage gone) is left out."""
        out = []
        for s in self.card_lib.get_slots(token_present=True):
            try:
                out.append(s.get_token())
            except GONE:
                continue
        return out

    def find_card(self, label: str):
        """The initialised token labelled so, or None."""
        found = [t for t in self._tokens() if t.flags & TokenFlag.TOKEN_INITIALIZED and t.label == label]
        if len(found) > 1:
            raise CardError(f"several cards labelled {label!r} in the readers: refusing to guess")
        return found[0] if found else None

    def init_card(self, label: str, so_pin: str, user_pin: str) -> str:
        """Initialise the card labelled so (ours, from an interrupted run: its SO PIN is ours) or a blank
        one; set its user PIN. Returns the token serial. A card of that label we cannot re-initialise is
        someone else's: refused."""
        tok = self.find_card(label)
        if tok is not None:
            slot_id = tok.slot.slot_id
        else:
            blank = [t for t in self._tokens() if not t.flags & TokenFlag.TOKEN_INITIALIZED]
            if not blank:
                raise CardError("no blank card in the readers")
            slot_id = blank[0].slot.slot_id
        so = so_pin.encode()
        rv = self._init_token(slot_id, so, len(so), _pad_label(label))
        if rv != 0:
            if tok is not None:
                raise CardError(f"card {label!r} is not blank and not one this KGS started (C_InitToken 0x{rv:x}): refused")
            raise CardError(f"the card does not initialise (C_InitToken 0x{rv:x})")
        # A new token in SoftHSM appears in a new slot: the module must list slots again.
        self.card_lib.reinitialize()
        if self.card_lib is self.lib:
            self._login()
        tok = self.find_card(label)
        if tok is None:
            raise CardGone(f"card {label!r} vanished after initialisation")
        with tok.open(rw=True, so_pin=so_pin) as s:
            s.init_pin(user_pin)
        return str(tok.serial.decode() if isinstance(tok.serial, bytes) else tok.serial).strip()

    def card(self, label: str):
        tok = self.find_card(label)
        if tok is None:
            raise CardGone(f"card {label!r} is not in the readers")
        return tok

    def card_is_empty(self, label: str, user_pin: str) -> bool:
        with self.card(label).open(user_pin=user_pin) as s:
            return not list(s.get_objects())

    def clear_slot(self, s, slot: str) -> None:
        for obj in list(s.get_objects({A.ID: SLOT_IDS[slot]})):
            obj.destroy()

    def card_keys(self, s, slot: str):
        """(private, public) key objects of a slot on an open card session, or None."""
        privs = list(s.get_objects({A.CLASS: ObjectClass.PRIVATE_KEY, A.ID: SLOT_IDS[slot]}))
        pubs = list(s.get_objects({A.CLASS: ObjectClass.PUBLIC_KEY, A.ID: SLOT_IDS[slot]}))
        return (privs[0], pubs[0]) if len(privs) == 1 and len(pubs) == 1 else None

    def generate_on_card(self, s, slot: str, key_type: str):
        """A key pair made by the card itself: sensitive, never extractable."""
        ident, label = SLOT_IDS[slot], slot
        priv_t = {A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True, A.TOKEN: True, A.PRIVATE: True,
                  A.DECRYPT: slot == "enc" and key_type in _RSA_BITS}
        pub_t = {A.VERIFY: True, A.TOKEN: True}
        if key_type in _RSA_BITS:
            pub, priv = s.generate_keypair(KeyType.RSA, _RSA_BITS[key_type], id=ident, label=label, store=True,
                                           public_template={**pub_t, A.PUBLIC_EXPONENT: b"\x01\x00\x01"}, private_template=priv_t)
        else:
            params = s.create_domain_parameters(KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type][0])}, local=True)
            pub, priv = params.generate_keypair(id=ident, label=label, store=True, public_template=pub_t, private_template=priv_t)
        return priv, pub

    def generate_archived(self, s, slot: str, key_type: str, subject, emails) -> tuple[bytes, bytes]:
        """An RSA key made in the HSM, wrapped under the archival key, then put on the card through a
        one-time transport key (unwrapped by the card, never in this process's memory in clear).
        Returns (archive blob, PKCS#10 request signed by the HSM copy before it is destroyed)."""
        pub, priv = self.hsm.generate_keypair(KeyType.RSA, _RSA_BITS[key_type], store=False,
                                              public_template={A.PUBLIC_EXPONENT: b"\x01\x00\x01", A.TOKEN: False},
                                              private_template={A.TOKEN: False, A.SENSITIVE: True, A.EXTRACTABLE: True,
                                                                A.SIGN: True, A.DECRYPT: True})
        transport = None
        card_transport = None
        try:
            csr = make_csr(priv, public_key_of(pub), subject, emails)
            blob = bytes(self._key(ARCHIVE_LABEL).wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            transport = self.hsm.generate_key(KeyType.AES, 256, store=False, template={
                A.TOKEN: False, A.SENSITIVE: False, A.EXTRACTABLE: True, A.WRAP: True, A.UNWRAP: False, A.ENCRYPT: False, A.DECRYPT: False})
            wrapped = bytes(transport.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            card_transport = s.create_object({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.TOKEN: False,
                                              A.VALUE: bytes(transport[A.VALUE]), A.UNWRAP: True})
            card_transport.unwrap_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, wrapped, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                                      id=SLOT_IDS[slot], label=slot, store=True, template={
                                          **_NO_PUBLIC_CAPS, A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True,
                                          A.EXTRACTABLE: False, A.DECRYPT: True, A.SIGN: True, A.UNWRAP: False})
            s.create_object({A.CLASS: ObjectClass.PUBLIC_KEY, A.KEY_TYPE: KeyType.RSA, A.TOKEN: True, A.ID: SLOT_IDS[slot],
                             A.LABEL: slot, A.MODULUS: bytes(pub[A.MODULUS]), A.PUBLIC_EXPONENT: bytes(pub[A.PUBLIC_EXPONENT]),
                             A.ENCRYPT: True, A.VERIFY: True})
            return blob, csr
        finally:
            for obj in (card_transport, transport, priv, pub):
                if obj is not None:
                    try:
                        obj.destroy()
                    except pkcs11.exceptions.PKCS11Error:
                        pass

    def write_cert(self, s, slot: str, der: bytes) -> None:
        cert = x509.load_der_x509_certificate(der)
        for obj in list(s.get_objects({A.CLASS: ObjectClass.CERTIFICATE, A.ID: SLOT_IDS[slot]})):
            obj.destroy()
        s.create_object({A.CLASS: ObjectClass.CERTIFICATE, A.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509, A.TOKEN: True,
                         A.PRIVATE: False, A.ID: SLOT_IDS[slot], A.LABEL: slot, A.VALUE: der,
                         A.SUBJECT: cert.subject.public_bytes(), A.ISSUER: cert.issuer.public_bytes(),
                         A.SERIAL_NUMBER: cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")})

    def set_pins(self, label: str, transport_so: str, transport_user: str, pin: str, puk: str) -> None:
        """Transport PINs -> the holder's PIN and the issuer's PUK (SO PIN). Idempotent: a PIN already
        changed by an interrupted run is recognised by logging in with the new one."""
        tok = self.card(label)
        for so, old, new in ((False, transport_user, pin), (True, transport_so, puk)):
            kw = "so_pin" if so else "user_pin"
            try:
                with tok.open(rw=True, **{kw: old}) as s:
                    s.set_pin(old, new)
            except pkcs11.exceptions.PinIncorrect:
                with tok.open(rw=True, **{kw: new}):
                    pass  # already set by the interrupted run

    def reset_pin(self, label: str, puk: str, pin: str) -> None:
        """The PUK flow: log in as SO with the PUK, give the card a new user PIN."""
        with self.card(label).open(rw=True, so_pin=puk) as s:
            s.init_pin(pin)

    # ------------------------------------------------------------ recovery and server-side keys

    def recover_pkcs12(self, blob: bytes, cert_der: bytes, name: str, password: str) -> bytes:
        """Unwrap an archived key in the HSM and export it, under a one-time key, into a PKCS#12."""
        key = self._key(ARCHIVE_LABEL).unwrap_key(
            ObjectClass.PRIVATE_KEY, KeyType.RSA, blob, mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
            template={**_NO_PUBLIC_CAPS, A.TOKEN: False, A.SENSITIVE: True, A.EXTRACTABLE: True, A.DECRYPT: True,
                      A.SIGN: False, A.UNWRAP: False})
        der = self._export(key)
        priv = serialization.load_der_private_key(der, None)
        cert = x509.load_der_x509_certificate(cert_der)
        if priv.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CardError("the archived key does not match the certificate")
        enc = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(200000)
               .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA256()).build(password.encode()))
        return pkcs12.serialize_key_and_certificates(name.encode(), priv, cert, None, enc)  # type: ignore[arg-type]

    def _export(self, key) -> bytes:
        """PKCS#8 of an extractable session key, through a one-time AES key (then destroyed)."""
        t = self.hsm.generate_key(KeyType.AES, 256, store=False, template={
            A.TOKEN: False, A.SENSITIVE: False, A.EXTRACTABLE: True, A.WRAP: True, A.UNWRAP: False, A.ENCRYPT: False, A.DECRYPT: False})
        try:
            wrapped = bytes(t.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            return _der_prefix(aes_key_unwrap_with_padding(bytes(t[A.VALUE]), wrapped))
        finally:
            t.destroy()
            key.destroy()

    def server_keygen(self, key_type: str, subject, emails, dns, archive: bool) -> tuple[bytes, bytes, bytes | None]:
        """A key made in the HSM for a protocol client: (CSR, PKCS#8, archive blob or None)."""
        if key_type in _RSA_BITS:
            pub, priv = self.hsm.generate_keypair(KeyType.RSA, _RSA_BITS[key_type], store=False,
                                                  public_template={A.PUBLIC_EXPONENT: b"\x01\x00\x01", A.TOKEN: False},
                                                  private_template={A.TOKEN: False, A.SENSITIVE: True, A.EXTRACTABLE: True, A.SIGN: True})
        elif key_type in _CURVES:
            params = self.hsm.create_domain_parameters(KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type][0])}, local=True)
            pub, priv = params.generate_keypair(store=False, public_template={A.TOKEN: False},
                                                private_template={A.TOKEN: False, A.SENSITIVE: True, A.EXTRACTABLE: True, A.SIGN: True})
        else:
            raise CardError(f"server-side keys are RSA or EC, not {key_type}")
        try:
            csr = make_csr(priv, public_key_of(pub), list(subject), tuple(emails), tuple(dns))
            blob = bytes(self._key(ARCHIVE_LABEL).wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD)) if archive else None
        except BaseException:
            priv.destroy()
            raise
        finally:
            pub.destroy()
        return csr, self._export(priv), blob

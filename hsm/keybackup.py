"""CA key backup under a custodian-split KEK and recovery onto a fresh token (RFC 5649 key wrap).

What SoftHSM2 2.6.1 does, measured (tests/integration/test_keybackup.py keeps it true):
- Mechanisms: CKM_AES_KEY_WRAP (0x2109) and CKM_AES_KEY_WRAP_PAD (0x210A, RFC 5649) are offered;
  CKM_AES_KEY_WRAP_KWP (0x210B, the v2.40 name of the same RFC) is not. We use CKM_AES_KEY_WRAP_PAD.
- CKA_WRAP_WITH_TRUSTED is enforced: C_WrapKey of such a key under a KEK without CKA_TRUSTED answers
  CKR_KEY_NOT_WRAPPABLE. CKA_TRUSTED can be set only by the SO (a user gets CKR_ATTRIBUTE_READ_ONLY),
  and an SO may create only public objects: the KEK is a public token object that lives for the
  few milliseconds of the wrap and is destroyed at once (and at the next backup if a crash left it).
- CKA_EXTRACTABLE never goes from false to true, and CKA_WRAP_WITH_TRUSTED cannot be set on an
  existing key (both CKR_ATTRIBUTE_READ_ONLY): keys made before this change cannot be backed up and
  are refused by name, with the way out (a successor key).
- Ed25519 private keys are not wrappable in 2.6.1 (CKR_KEY_NOT_WRAPPABLE): refused by name.
- C_UnwrapKey refuses python-pkcs11's default template (capabilities that do not apply to the class):
  the templates below name exactly the attributes of each class.

The KEK's value leaves the token once, into this process, to be split into Shamir shares (policy.shamir,
as quorum activation); on recovery the shares are combined here and the KEK goes straight back into
the new token as a session object. No CA, audit or CMDB-wrapping key is ever in clear outside a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any, Callable

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism, ObjectClass
from pkcs11.constants import DEFAULT

from policy import shamir
from policy.errors import PolicyError

from .token import WRAP_LABEL, CaKey, Token, TokenError

FORMAT = "donjon-key-backup/1"
KEK_LABEL = "donjon-backup-kek"
MECHANISM = "CKM_AES_KEY_WRAP_PAD (RFC 5649)"
MAX_BLOB = 192 * 1024
_MAC_INFO = b"donjon-key-backup-mac/1"
_KEY_TYPES = {"p256": KeyType.EC, "p384": KeyType.EC, "rsa2048": KeyType.RSA, "rsa3072": KeyType.RSA, "rsa4096": KeyType.RSA}
_CURVE_OIDS = {"p256": bytes.fromhex("06082a8648ce3d030107"), "p384": bytes.fromhex("06052b81040022")}
# Attributes python-pkcs11 would add as false for every class; unset, the token applies its defaults.
_NO_CAPS = {a: DEFAULT for a in (A.ENCRYPT, A.DECRYPT, A.WRAP, A.UNWRAP, A.SIGN, A.VERIFY, A.DERIVE)}


class BackupRefused(TokenError):
    """A key backup or recovery refused before anything was written: the message says why."""


def check_module(token: Token) -> None:
    manufacturer, description = token.module_info()
    if "softhsm" not in f"{manufacturer} {description}".lower():
        raise BackupRefused(f"the PKCS#11 module is {description!r} by {manufacturer!r}, not SoftHSM2: back its keys up "
                            "with the vendor's own scheme (its backup or cloning to a backup device under the HSM's "
                            "security officers); donjon keys backup covers the embedded SoftHSM2 token only")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    if not isinstance(s, str) or len(s) > MAX_BLOB:
        raise BackupRefused("the key backup is malformed")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise BackupRefused("the key backup is malformed") from None


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


def _mac(kek: bytes, doc: dict[str, Any]) -> str:
    return hmac.new(hmac.new(kek, _MAC_INFO, "sha256").digest(), _canonical(doc), "sha256").hexdigest()


def manifest_sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------- backup


def _wrappable(label: str, obj, key_type: str | None) -> str | None:
    """Why this key cannot be backed up, or None."""
    if key_type == "ed25519":
        return f"{label}: an Ed25519 key, which SoftHSM2 2.6.1 cannot wrap (CKR_KEY_NOT_WRAPPABLE)"
    if not obj[A.EXTRACTABLE]:
        return (f"{label}: made before key backup existed (CKA_EXTRACTABLE false, which PKCS#11 never lets become "
                "true): it cannot leave this token; make a successor key now (it will be backed up) or use the HSM's own backup")
    if not obj[A.WRAP_WITH_TRUSTED]:
        return f"{label}: extractable without CKA_WRAP_WITH_TRUSTED: refusing to treat it as a Donjon key"
    return None


def backup(token: Token, so_pin: str, labels: list[str], audit_label: str, threshold: int, n: int,
           rand: Callable[[int], bytes] = os.urandom) -> tuple[bytes, list[str]]:
    """The backup blob (JSON: manifest, wrapped keys, certificates, policies, MAC) and n share texts."""
    check_module(token)
    if not 2 <= threshold <= n <= shamir.MAX_SHARES:
        raise BackupRefused(f"need 2 <= threshold <= shares <= {shamir.MAX_SHARES} (got {threshold} of {n})")
    plan: list[tuple[str, str]] = [(label, "ca") for label in labels]
    if list(token.session.get_objects({A.CLASS: ObjectClass.PRIVATE_KEY, A.LABEL: audit_label})):
        plan.append((audit_label, "audit"))
    why = []
    for label, _ in plan:
        k = token.key(label)
        reason = _wrappable(label, k.private, k.key_type)
        if reason:
            why.append(reason)
    wk = token.session.get_key(object_class=ObjectClass.SECRET_KEY, label=WRAP_LABEL)
    reason = _wrappable(WRAP_LABEL, wk, None)
    if reason:
        why.append(reason)
    if why:
        raise BackupRefused("key backup refused: " + "; ".join(why))
    pin = token._pin  # noqa: SLF001 - the CIS logs back in as itself after the SO's turn
    assert pin is not None
    token.logout()  # the SO cannot log in while the user is
    try:
        so = token.so_session(so_pin)
        try:
            for old in list(so.get_objects({A.CLASS: ObjectClass.SECRET_KEY, A.LABEL: KEK_LABEL})):
                old.destroy()  # a KEK a crash left behind
            kek_obj = so.generate_key(KeyType.AES, 256, label=KEK_LABEL, store=True, template={
                A.TRUSTED: True, A.WRAP: True, A.UNWRAP: False, A.ENCRYPT: False, A.DECRYPT: False,
                # readable once, to be split (PKCS#11 hides the value of a non-extractable key too)
                A.SENSITIVE: False, A.EXTRACTABLE: True, A.PRIVATE: False, A.TOKEN: True})
            kek = bytes(kek_obj[A.VALUE])
        finally:
            so.close()
    finally:
        token.login(pin)
    try:
        kek_obj = token.session.get_key(object_class=ObjectClass.SECRET_KEY, label=KEK_LABEL)
        entries = []
        for label, role in plan:
            k = token.key(label)
            entries.append({
                "label": label, "role": role, "class": "private", "key_type": k.key_type, "spki": _b64(k.spki),
                "spki_sha256": hashlib.sha256(k.spki).hexdigest(),
                "wrapped": _b64(bytes(kek_obj.wrap_key(k.private, mechanism=Mechanism.AES_KEY_WRAP_PAD))),
                "certificates": [_b64(c) for c in token.certificates(label)],
                "policy": _b64(p) if (p := token.policy(label)) is not None else None,
            })
        wk = token.session.get_key(object_class=ObjectClass.SECRET_KEY, label=WRAP_LABEL)
        entries.append({"label": WRAP_LABEL, "role": "cmdb-wrap", "class": "secret", "key_type": "aes256", "spki": None,
                        "spki_sha256": None, "wrapped": _b64(bytes(kek_obj.wrap_key(wk, mechanism=Mechanism.AES_KEY_WRAP_PAD))),
                        "certificates": [], "policy": None})
    finally:
        for o in list(token.session.get_objects({A.CLASS: ObjectClass.SECRET_KEY, A.LABEL: KEK_LABEL})):
            o.destroy()
    texts = shamir.split_pin(kek.hex(), threshold, n, rand)
    doc: dict[str, Any] = {"format": FORMAT, "created": int(time.time()), "token": token.token_info(),
                           "mechanism": MECHANISM, "threshold": threshold, "shares": n,
                           "share_set": shamir.parse_share(texts[0])[0], "keys": entries}
    doc["mac"] = _mac(kek, doc)
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", texts


# ---------------------------------------------------------------- recovery


def parse_blob(blob: bytes) -> dict[str, Any]:
    """The backup's document, shape-checked (the MAC is checked once the KEK is known)."""
    if len(blob) > MAX_BLOB:
        raise BackupRefused("the key backup is too large")
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise BackupRefused("not a Donjon key backup (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupRefused(f"not a Donjon key backup (format {FORMAT})")
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys or not isinstance(doc.get("mac"), str):
        raise BackupRefused("the key backup is malformed")
    for e in keys:
        if not isinstance(e, dict) or not isinstance(e.get("label"), str) or e.get("class") not in ("private", "secret"):
            raise BackupRefused("the key backup is malformed")
    return doc


def kek_from_shares(texts: list[str], doc: dict[str, Any]) -> bytes:
    try:
        value = shamir.combine_pin(list(texts))
    except PolicyError as e:
        raise BackupRefused(f"key recovery refused: {e.message}") from None
    try:
        kek = bytes.fromhex(value)
    except ValueError:
        raise BackupRefused("key recovery refused: these shares are not key-backup shares") from None
    if len(kek) != 32:
        raise BackupRefused("key recovery refused: these shares are not key-backup shares")
    if not hmac.compare_digest(_mac(kek, doc), doc["mac"]):
        raise BackupRefused("key recovery refused: the backup's MAC does not verify under the KEK of these shares "
                            "(the backup was altered, or the shares belong to another backup)")
    return kek


def _private_template(label: str | None, token_obj: bool) -> dict:
    return {**_NO_CAPS, A.SIGN: True, A.SENSITIVE: True, A.EXTRACTABLE: False, A.PRIVATE: True,
            A.TOKEN: token_obj, **({A.LABEL: label} if label else {})}


def _secret_template(label: str | None, token_obj: bool) -> dict:
    return {**_NO_CAPS, A.ENCRYPT: True, A.DECRYPT: True, A.SENSITIVE: True, A.EXTRACTABLE: False, A.PRIVATE: True,
            A.TOKEN: token_obj, **({A.LABEL: label} if label else {})}


def _unwrap(kek_obj, e: dict[str, Any], token_obj: bool):
    wrapped = _unb64(e["wrapped"])
    try:
        if e["class"] == "secret":
            return kek_obj.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                                      template=_secret_template(e["label"] if token_obj else None, token_obj))
        kt = _KEY_TYPES.get(e.get("key_type"))
        if kt is None:
            raise BackupRefused(f"{e['label']}: key type {e.get('key_type')!r} cannot be recovered")
        return kek_obj.unwrap_key(ObjectClass.PRIVATE_KEY, kt, wrapped, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                                  template=_private_template(e["label"] if token_obj else None, token_obj))
    except pkcs11.exceptions.PKCS11Error as ex:
        raise BackupRefused(f"{e['label']}: does not unwrap under the KEK ({type(ex).__name__}): nothing was written") from None


def _check_pair(token: Token, e: dict[str, Any], priv) -> None:
    """The unwrapped private key signs, and the manifest's public key verifies it: the same key as before."""
    spki = _unb64(e["spki"])
    if hashlib.sha256(spki).hexdigest() != e.get("spki_sha256"):
        raise BackupRefused(f"{e['label']}: the public key does not match its hash in the manifest")
    digest = hashlib.sha256(b"donjon key recovery check " + e["label"].encode()).digest()
    sig = token.sign_digest(CaKey(e["label"], e["key_type"], priv, spki), digest, hashes.SHA256())
    pub = serialization.load_der_public_key(spki)
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            raise BackupRefused(f"{e['label']}: unsupported public key")
    except Exception as ex:  # noqa: BLE001 - InvalidSignature or a malformed key: the same refusal
        if isinstance(ex, BackupRefused):
            raise
        raise BackupRefused(f"{e['label']}: the unwrapped key does not match the public key in the manifest") from None


def _public_template(e: dict[str, Any]) -> dict:
    pub = serialization.load_der_public_key(_unb64(e["spki"]))
    t: dict = {A.CLASS: ObjectClass.PUBLIC_KEY, A.LABEL: e["label"], A.TOKEN: True, A.VERIFY: True, A.PRIVATE: False}
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        t.update({A.KEY_TYPE: KeyType.RSA, A.MODULUS: nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big"),
                  A.PUBLIC_EXPONENT: nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")})
    else:
        point = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)  # type: ignore[union-attr]
        t.update({A.KEY_TYPE: KeyType.EC, A.EC_PARAMS: _CURVE_OIDS[e["key_type"]],
                  A.EC_POINT: bytes([0x04, len(point)]) + point})  # DER OCTET STRING (points here are < 128 bytes)
    return t


def recover(token: Token, blob: bytes, texts: list[str]) -> list[str]:
    """Unwrap every key of the backup into this (logged-in, fresh) token; the labels recovered.
    Everything is checked with session objects first: a refusal leaves the token as it was."""
    check_module(token)
    doc = parse_blob(blob)
    kek = kek_from_shares(texts, doc)
    s = token.session
    for e in doc["keys"]:
        if list(s.get_objects({A.LABEL: e["label"]})):
            raise BackupRefused(f"key recovery refused: the token already holds an object labelled {e['label']!r}: "
                                "recover onto a fresh token")
    kek_obj = s.create_object({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.VALUE: kek, A.TOKEN: False,
                               A.UNWRAP: True, A.WRAP: False, A.SENSITIVE: True, A.EXTRACTABLE: False})
    del kek
    try:
        for e in doc["keys"]:  # dry run: session objects only, gone with the session
            obj = _unwrap(kek_obj, e, token_obj=False)
            if e["class"] == "private":
                _check_pair(token, e, obj)
                _public_template(e)
            obj.destroy()
        made: list = []
        try:
            for e in doc["keys"]:
                made.append(_unwrap(kek_obj, e, token_obj=True))
                if e["class"] == "private":
                    made.append(s.create_object(_public_template(e)))
                    for c in e.get("certificates") or []:
                        from cryptography import x509
                        der = _unb64(c)
                        token.store_certificate(e["label"], der, x509.load_der_x509_certificate(der).subject.public_bytes())
                    if e.get("policy"):
                        token.store_policy(e["label"], _unb64(e["policy"]))
        except BaseException:
            for o in made:
                try:
                    o.destroy()
                except pkcs11.exceptions.PKCS11Error:
                    pass
            for e in doc["keys"]:
                for o in list(s.get_objects({A.LABEL: e["label"]})):
                    try:
                        o.destroy()
                    except pkcs11.exceptions.PKCS11Error:
                        pass  # a policy object is not destroyable by design; the token was fresh
            raise
    finally:
        kek_obj.destroy()
    return [e["label"] for e in doc["keys"]]

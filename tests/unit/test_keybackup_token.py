"""Key backup and recovery against real SoftHSM2 tokens (hsm/keybackup.py), and what SoftHSM2 enforces."""

from __future__ import annotations

import json
import os
import subprocess

import pkcs11
import pytest

from tests.conftest import softhsm_reload
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism

from hsm import keybackup
from hsm.token import WRAP_LABEL, Token, TokenError, make_private_key
from policy import shamir

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN, SO_PIN = "user-pin-1234", "so-pin-12345"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory):
    """One SoftHSM2 configuration with fresh tokens: the appliance's, the recovery's, an older appliance's."""
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in ("kb-main", "kb-fresh", "kb-old"):  # all before the library is loaded: it lists tokens once
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", PIN],
                       check=True, capture_output=True)
    softhsm_reload(MODULE)
    yield d
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def _self_signed(token: Token, label: str) -> bytes:
    from datetime import datetime, timedelta, timezone

    from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
    k = token.key(label)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, label)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(load_der_public_key(k.spki))
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(make_private_key(token, k), hashes.SHA256()))
    der = cert.public_bytes(Encoding.DER)
    token.store_certificate(label, der, name.public_bytes())
    return der


def _labels(token: Token) -> list[str]:
    return sorted(str(o[A.LABEL]) for o in token.session.get_objects({}))


@pytest.fixture(scope="module")
def main(softhsm):
    """The appliance token: two CA keys (P-384, RSA-2048) with certificates, the audit key, the CMDB key."""
    t = Token(MODULE, "kb-main")
    t.login(PIN)
    t.generate("root", "p384")
    t.generate("issuing", "rsa2048")
    t.generate("donjon-audit", "p256")
    t.new_db_key()
    certs = {label: _self_signed(t, label) for label in ("root", "issuing")}
    t.store_policy("root", b"policy-of-root")
    yield t, certs
    t.logout()


def test_softhsm_enforces_trusted_wrapping(main):
    """The facts hsm/keybackup.py's docstring writes down, checked on the real module."""
    t, _ = main
    s = t.session
    mechs = set(s.token.slot.get_mechanisms())
    assert Mechanism.AES_KEY_WRAP_PAD in mechs and Mechanism.AES_KEY_WRAP in mechs  # RFC 5649 and RFC 3394
    assert getattr(Mechanism, "AES_KEY_WRAP_KWP", None) not in mechs  # 0x210B: not in SoftHSM2 2.6
    priv = t.key("root").private
    assert priv[A.EXTRACTABLE] and priv[A.WRAP_WITH_TRUSTED] and priv[A.SENSITIVE]
    kek = s.generate_key(KeyType.AES, 256, store=False, template={A.WRAP: True, A.UNWRAP: True})
    with pytest.raises(pkcs11.exceptions.KeyNotWrappable):  # an untrusted KEK may not wrap a CA key
        kek.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    with pytest.raises(pkcs11.exceptions.AttributeReadOnly):  # only the SO may mark a key trusted
        s.generate_key(KeyType.AES, 256, store=False, template={A.TRUSTED: True, A.WRAP: True})
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):  # and the value of a CA key is never readable
        priv[A.VALUE]


def test_old_and_ed25519_keys_are_refused_by_name(softhsm):
    """A key made before this change (CKA_EXTRACTABLE false) and an Ed25519 key: refused, named, and
    no KEK is left behind."""
    t = Token(MODULE, "kb-old")
    t.login(PIN)
    try:
        t.new_db_key()
        t.generate("edca", "ed25519")
        t.session.generate_keypair(KeyType.RSA, 2048, label="oldca", store=True,
                                   public_template={A.VERIFY: True, A.TOKEN: True, A.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                                   private_template={A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True, A.TOKEN: True,
                                                     A.PRIVATE: True})
        old = t.key("oldca").private
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):  # PKCS#11 never lets it become extractable
            old[A.EXTRACTABLE] = True
        with pytest.raises(keybackup.BackupRefused) as e:
            keybackup.backup(t, SO_PIN, ["oldca", "edca"], "donjon-audit", 2, 3)
        msg = str(e.value)
        assert "oldca: made before key backup existed" in msg and "edca: an Ed25519 key" in msg
        assert keybackup.KEK_LABEL not in _labels(t)
        assert t.active  # still logged in: nothing was done
    finally:
        t.logout()


def test_wrong_so_pin_refused_and_the_cis_stays_logged_in(main):
    t, _ = main
    with pytest.raises(TokenError, match="wrong SO PIN"):
        keybackup.backup(t, "not-the-so-pin", ["root", "issuing"], "donjon-audit", 2, 3)
    assert t.active and keybackup.KEK_LABEL not in _labels(t)
    t.key("root")  # the session works again


def test_backup_then_recover_onto_a_fresh_token(main, softhsm):
    t, certs = main
    blob, texts = keybackup.backup(t, SO_PIN, ["root", "issuing"], "donjon-audit", 3, 5)
    assert len(texts) == 5 and keybackup.KEK_LABEL not in _labels(t)  # the trusted KEK is gone at once
    doc = json.loads(blob)
    assert doc["mechanism"] == keybackup.MECHANISM and doc["threshold"] == 3
    assert [(e["label"], e["role"]) for e in doc["keys"]] == [("root", "ca"), ("issuing", "ca"), ("donjon-audit", "audit"),
                                                              (WRAP_LABEL, "cmdb-wrap")]
    db_key, wrapped_db_key = t.new_db_key()  # (the same wrapping key encrypts a fresh database key)
    spki = {e["label"]: e["spki_sha256"] for e in doc["keys"]}

    fresh = Token(MODULE, "kb-fresh")
    fresh.login(PIN)
    try:
        before = _labels(fresh)
        # Refusals, each leaving the fresh token exactly as it was.
        altered = list(texts[:3])
        set_id, m, x, y = shamir.parse_share(altered[1])
        body = f"DJS1-{set_id}-{m}-{x}-{bytes([y[0] ^ 1]) .hex()}{y[1:].hex()}"
        altered[1] = f"{body}-{shamir._check(body)}"  # a well-formed share with other data
        tampered = json.loads(blob)
        tampered["keys"][0]["spki_sha256"] = "00" * 32
        swapped = json.loads(blob)
        swapped["keys"][0]["wrapped"], swapped["keys"][1]["wrapped"] = swapped["keys"][1]["wrapped"], swapped["keys"][0]["wrapped"]
        for bad_blob, shares, why in [
            (blob, texts[:2], "3 shares are needed, 2 given"),
            (blob, altered, "do not combine to a valid secret"),
            (json.dumps(tampered).encode(), texts[:3], "MAC does not verify"),
            (json.dumps(swapped).encode(), texts[2:], "MAC does not verify"),
            (b"\x00junk", texts[:3], "not a Donjon key backup"),
        ]:
            with pytest.raises(keybackup.BackupRefused, match=why):
                keybackup.recover(fresh, bad_blob, list(shares))
            assert _labels(fresh) == before

        got = keybackup.recover(fresh, blob, [texts[4], texts[0], texts[2]])
        assert got == ["root", "issuing", "donjon-audit", WRAP_LABEL]
        for label in ("root", "issuing"):
            k = fresh.key(label)
            assert keybackup.hashlib.sha256(k.spki).hexdigest() == spki[label]
            assert fresh.certificates(label) == [certs[label]]
            assert not k.private[A.EXTRACTABLE] and k.private[A.SENSITIVE]  # non-extractable again
        assert fresh.policy("root") == b"policy-of-root"
        assert fresh.unwrap_db_key(wrapped_db_key) == db_key  # the CMDB key unwraps in the new token
        # A signature by the recovered root verifies under the old certificate's key.
        cert = x509.load_der_x509_certificate(certs["root"])
        sig = fresh.sign(fresh.key("root"), b"after recovery", hashes.SHA384())
        cert.public_key().verify(sig, b"after recovery", ec.ECDSA(hashes.SHA384()))
        # Recovering twice into the same token is refused, nothing doubled.
        n = len(_labels(fresh))
        with pytest.raises(keybackup.BackupRefused, match="already holds"):
            keybackup.recover(fresh, blob, texts[:3])
        assert len(_labels(fresh)) == n
    finally:
        fresh.logout()


def test_a_vendor_module_is_told_to_use_its_own_scheme(main, monkeypatch):
    """A FAKE vendor module: no second PKCS#11 implementation is installed here, so the loaded module's
    identity (what C_GetInfo reports) is replaced with a YubiHSM's."""
    t, _ = main
    assert t.module_info()[0] == "SoftHSM"  # the real one, as C_GetInfo reports it
    monkeypatch.setattr(Token, "module_info", lambda self: ("Yubico (www.yubico.com)", "YubiHSM PKCS#11 Library"))
    with pytest.raises(keybackup.BackupRefused, match="not SoftHSM2: back its keys up with the vendor's own scheme"):
        keybackup.backup(t, SO_PIN, ["root"], "donjon-audit", 2, 3)


def test_blob_parser_fuzz():
    """Bounded mutation fuzz of the blob parser: only BackupRefused, never another exception."""
    import random
    rnd = random.Random(15)
    base = json.dumps({"format": keybackup.FORMAT, "mac": "00", "keys": [{"label": "a", "class": "private", "wrapped": "AA=="}]}).encode()
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 6)):
            op = rnd.random()
            i = rnd.randrange(len(b) + 1)
            if op < 0.4 and b:
                b[min(i, len(b) - 1)] = rnd.randrange(256)
            elif op < 0.7:
                b[i:i] = bytes([rnd.randrange(256)])
            elif b:
                del b[min(i, len(b) - 1)]
        try:
            doc = keybackup.parse_blob(bytes(b))
            keybackup.kek_from_shares(["DJS1-x"], doc)
        except keybackup.BackupRefused:
            pass

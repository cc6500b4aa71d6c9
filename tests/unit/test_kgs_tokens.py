"""The KGS's PKCS#11 layer on a real SoftHSM2 token: server-side keys, archive blobs, recovery, sealing, key injection onto a card."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import softhsm_reload
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import pkcs12
from pkcs11 import Attribute as A
from pkcs11 import ObjectClass

from appliance.kgs import tokens as T
from appliance.kgs.letter import pin_letter

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("kgs-token")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "donjon-kgs", "--so-pin", "12345678", "--pin", "1234"],
                   check=True, capture_output=True)
    softhsm_reload(MODULE)
    t = T.Tokens(MODULE, MODULE, "donjon-kgs")
    t.open("1234")
    t.ensure_keys()
    yield t
    t.lib.finalize()  # one C_Initialize per process: leave SoftHSM for the next test's own configuration
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def _spki(k) -> bytes:
    return k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_server_side_key(tok, key_type):
    csr_der, pkcs8, blob = tok.server_keygen(key_type, [("CN", "device-17")], (), ("device-17.example.org",), True)
    csr = x509.load_der_x509_csr(csr_der)
    key = serialization.load_der_private_key(pkcs8, None)
    assert csr.is_signature_valid and _spki(csr.public_key()) == _spki(key.public_key())
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["device-17.example.org"]
    assert blob and pkcs8 not in blob  # wrapped, not the key in clear
    # nothing of it stays in the HSM: only the two KGS keys are token objects, and no session key is left over
    assert sorted(o[A.LABEL] for o in tok.hsm.get_objects({A.TOKEN: True})) == [T.ARCHIVE_LABEL, T.SEAL_LABEL]
    assert list(tok.hsm.get_objects({A.CLASS: ObjectClass.PRIVATE_KEY})) == []
    with pytest.raises(T.CardError):
        tok.server_keygen("ed25519", [("CN", "x")], (), (), False)


def test_archival_key_never_leaves_and_recovery_checks_the_certificate(tok, tmp_path):
    ak = tok._key(T.ARCHIVE_LABEL)
    assert ak[A.SENSITIVE] and not ak[A.EXTRACTABLE] and ak[A.NEVER_EXTRACTABLE]
    csr_der, pkcs8, blob = tok.server_keygen("rsa2048", [("CN", "alice")], (), (), True)
    key = serialization.load_der_private_key(pkcs8, None)
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    p12 = tok.recover_pkcs12(blob, cert.public_bytes(serialization.Encoding.DER), "alice", "one-time")
    k, c, _ = pkcs12.load_key_and_certificates(p12, b"one-time")
    assert _spki(k.public_key()) == _spki(key.public_key()) and c == cert
    msg = key.public_key().encrypt(b"mail", padding.PKCS1v15())
    assert k.decrypt(msg, padding.PKCS1v15()) == b"mail"
    _, other, blob2 = tok.server_keygen("rsa2048", [("CN", "bob")], (), (), True)
    with pytest.raises(T.CardError, match="does not match"):
        tok.recover_pkcs12(blob2, cert.public_bytes(serialization.Encoding.DER), "alice", "x")
    with pytest.raises(T.pkcs11.exceptions.PKCS11Error):  # a blob that is not ours never unwraps
        tok.recover_pkcs12(bytes(len(blob)), cert.public_bytes(serialization.Encoding.DER), "alice", "x")


def test_sealed_secrets_are_bound_to_their_record(tok):
    s = tok.seal(b"123456", b"pins|b1|e-1")
    assert tok.unseal(s, b"pins|b1|e-1") == b"123456" and b"123456" not in s
    with pytest.raises(T.CardError):
        tok.unseal(s, b"pins|b1|e-2")  # a compromised Factory cannot move a secret to another record
    with pytest.raises(T.CardError):
        tok.unseal(s[:-1] + bytes([s[-1] ^ 1]), b"pins|b1|e-1")


def test_card_initialise_inject_and_pins(tok):
    serial = tok.init_card("CARD-1", "so-transport", "user-transport")
    assert serial and tok.find_card("CARD-1") is not None
    with tok.card("CARD-1").open(rw=True, user_pin="user-transport") as s:
        blob, csr = tok.generate_archived(s, "enc", "rsa2048", [("CN", "carol")], ("carol@example.org",))
        priv, pub = tok.card_keys(s, "enc")
        assert not priv[A.EXTRACTABLE] and priv[A.SENSITIVE]
        assert _spki(T.public_key_of(pub)) == _spki(x509.load_der_x509_csr(csr).public_key())
    with pytest.raises(T.CardError, match="not blank"):
        tok.init_card("CARD-1", "another-so-pin", "x")  # someone else's card is never wiped
    tok.set_pins("CARD-1", "so-transport", "user-transport", "123456", "87654321")
    tok.set_pins("CARD-1", "so-transport", "user-transport", "123456", "87654321")  # a rerun after a crash
    tok.reset_pin("CARD-1", "87654321", "654321")
    with tok.card("CARD-1").open(user_pin="654321") as s:
        assert tok.card_keys(s, "enc") is not None


def test_pin_letter_is_a_pdf_with_the_pin_below_the_tear_off(tmp_path):
    pdf = pin_letter(sender="Card office", name="Dana (R&D) \\ Ops", address=("1 rue de la Paix", "75002 Paris"),
                     card_label="EMP-1", token_serial="abc", pin="024680")
    (tmp_path / "l.pdf").write_bytes(pdf)
    text = subprocess.run(["pdftotext", "-layout", str(tmp_path / "l.pdf"), "-"], capture_output=True, text=True, check=True).stdout
    assert "Dana (R&D) \\ Ops" in text and "75002 Paris" in text
    assert text.index("tear off here") < text.index("PIN: 024680")

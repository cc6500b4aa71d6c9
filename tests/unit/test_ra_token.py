"""The SCEP RA keys in a real SoftHSM2 token: a decrypt-only key and a sign-only key, never one for both."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from tests.conftest import softhsm_reload
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsm import ra
from hsm.token import Token, TokenError

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Token:
    # one token per module: python-pkcs11 initialises SoftHSM once per process (a second login fails)
    tmp_path = tmp_path_factory.mktemp("ra-token")
    monkeypatch = pytest.MonkeyPatch()
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    pin = secrets.token_hex(8)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "ra-test", "--so-pin", secrets.token_hex(8),
                    "--pin", pin], check=True, capture_output=True, timeout=30)
    softhsm_reload(MODULE)
    t = Token(MODULE, "ra-test")
    t.login(pin)
    yield t
    monkeypatch.undo()


def test_decrypt_key_decrypts_and_cannot_sign(token):
    spki = ra.generate_decryption_key(token, "scep-ra-decrypt")
    pub = load_der_public_key(spki)
    cek = secrets.token_bytes(16)
    assert ra.decrypt(token, "scep-ra-decrypt", pub.encrypt(cek, padding.PKCS1v15())) == cek
    with pytest.raises(TokenError):
        ra.decrypt(token, "scep-ra-decrypt", b"\x00" * 256)  # bad padding: an error, never a plaintext
    with pytest.raises(TokenError):
        ra.generate_decryption_key(token, "scep-ra-decrypt")
    with pytest.raises(AttributeError):  # CKA_SIGN is false: python-pkcs11 gives the key no sign()
        token.sign(token.key("scep-ra-decrypt"), b"data", hashes.SHA256())
    # the signing key signs and cannot decrypt
    sign_spki = ra.generate_signing_key(token, "scep-ra-sign")
    sig = token.sign(token.key("scep-ra-sign"), b"data", hashes.SHA256())
    load_der_public_key(sign_spki).verify(sig, b"data", padding.PKCS1v15(), hashes.SHA256())
    ct = load_der_public_key(sign_spki).encrypt(cek, padding.PKCS1v15())
    with pytest.raises(TokenError):
        ra.decrypt(token, "scep-ra-sign", ct)


def test_sign_digests_and_transport_key(token):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_private_key
    pub = load_der_public_key(token.key("scep-ra-sign").spki)
    for name, h in (("sha256", hashes.SHA256()), ("sha512", hashes.SHA512()), ("sha1", hashes.SHA1())):
        pub.verify(ra.sign(token, "scep-ra-sign", b"attrs", name), b"attrs", padding.PKCS1v15(), h)
    with pytest.raises(TokenError):
        ra.sign(token, "scep-ra-sign", b"attrs", "sha3_256")
    k1, k2 = ra.generate_transport_ec(token), ra.generate_transport_ec(token)
    assert k1 != k2 and isinstance(load_der_private_key(k1, None), ec.EllipticCurvePrivateKey)
    assert len(list(token._session.get_objects({}))) == 4  # the two RA key pairs only: nothing left behind

"""A test-side SCEP requester (a fake client, named as such): builds pkiMessages and opens CertReps.

The real clients (micromdm's scepclient, certmonger's scep-submit) judge the gateway in the
integration tests; this one exists to craft what they never send (weak algorithms, wrong keys, fuzz).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

from asn1crypto import algos, cms, x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding as sympad
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES  # only when configured for old devices
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from appliance.gateway import scep

_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha512": hashes.SHA512, "md5": hashes.MD5}


def self_signed(key: rsa.RSAPrivateKey, cn: str, *, ca: bool = False, key_usage: str = "") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if key_usage:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=key_usage == "sign", content_commitment=False, key_encipherment=key_usage == "decrypt",
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
            decipher_only=False), critical=True)
    return b.sign(key, hashes.SHA256())


class SoftRa:
    """RA keys in memory (the unit tests' stand-in for the gateway token's two keys)."""

    def __init__(self) -> None:
        self.sign_key = rsa.generate_private_key(65537, 2048)
        self.decrypt_key = rsa.generate_private_key(65537, 2048)
        self.sign_cert = self_signed(self.sign_key, "RA sign", key_usage="sign")
        self.decrypt_cert = self_signed(self.decrypt_key, "RA decrypt", key_usage="decrypt")

    def sign(self, data: bytes, digest: str) -> bytes:
        return self.sign_key.sign(data, padding.PKCS1v15(), _HASH[digest]())

    def decrypt(self, ciphertext: bytes) -> bytes:
        return self.decrypt_key.decrypt(ciphertext, padding.PKCS1v15())


def csr(key: rsa.RSAPrivateKey, cn: str, challenge: str | None = None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if challenge is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


@dataclass
class Requester:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, cn: str = "device") -> Requester:
        k = rsa.generate_private_key(65537, 2048)
        return cls(k, self_signed(k, cn))

    def message(self, mtype: str, payload: bytes, recipient: x509.Certificate, *, digest: str = "sha256",
                cipher: str = "aes128_cbc", tid: str | None = None, nonce: bytes | None = None,
                raw_envelope: bytes | None = None) -> bytes:
        env = raw_envelope if raw_envelope is not None else envelope(payload, recipient, cipher)
        attrs = cms.CMSAttributes([
            scep._a("content_type", "data"),
            scep._a("message_digest", hashlib.new(digest, env).digest()),
            scep._a("scep_message_type", mtype),
            scep._a("scep_transaction_id", tid or hashlib.sha256(self.cert.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()),
            scep._a("scep_sender_nonce", nonce or os.urandom(16)),
        ])
        sig = self.key.sign(b"\x31" + attrs.dump()[1:], padding.PKCS1v15(), _HASH[digest]())
        cert = ax509.Certificate.load(self.cert.public_bytes(Encoding.DER))
        si = cms.SignerInfo({
            "version": "v1",
            "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
                "issuer": cert.issuer, "serial_number": cert.serial_number})}),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest}),
            "signed_attrs": attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
            "signature": sig,
        })
        sd = cms.SignedData({
            "version": "v1", "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest})],
            "encap_content_info": {"content_type": "data", "content": env},
            "certificates": [cert], "signer_infos": [si],
        })
        return cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()

    def open(self, rep: bytes, ra_sign: x509.Certificate) -> dict:
        """Verify a CertRep against the RA signing certificate and decrypt its content."""
        ci = cms.ContentInfo.load(rep)
        sd = ci["content"]
        si = sd["signer_infos"][0]
        attrs = si["signed_attrs"]
        digest = si["digest_algorithm"]["algorithm"].native
        ra_sign.public_key().verify(si["signature"].native, b"\x31" + attrs.dump()[1:], padding.PKCS1v15(), _HASH[digest]())
        out = {a["type"].native: a["values"][0].native for a in attrs}
        content = sd["encap_content_info"]["content"].native
        assert out["message_digest"] == hashlib.new(digest, content or b"").digest()
        if content:
            env = cms.ContentInfo.load(content)["content"]
            ri = env["recipient_infos"][0].chosen
            cek = self.key.decrypt(ri["encrypted_key"].native, padding.PKCS1v15())
            eci = env["encrypted_content_info"]
            alg = eci["content_encryption_algorithm"]
            block = algorithms.AES if alg["algorithm"].native.startswith("aes") else TripleDES
            dec = Cipher(block(cek), modes.CBC(alg["parameters"].native)).decryptor()
            padded = dec.update(eci["encrypted_content"].native) + dec.finalize()
            un = sympad.PKCS7(block.block_size).unpadder()
            inner = cms.ContentInfo.load(un.update(padded) + un.finalize())["content"]
            out["certs"] = [c.chosen.dump() for c in inner["certificates"] or []]
            out["crls"] = [c.chosen.dump() for c in inner["crls"] or []]
            out["cipher"] = alg["algorithm"].native
        return out


def envelope(data: bytes, recipient: x509.Certificate, cipher: str) -> bytes:
    """EnvelopedData to `recipient` with any cipher, weak ones included (the gateway must refuse those)."""
    key_len = {"aes128_cbc": 16, "aes256_cbc": 32, "tripledes_3key": 24, "des": 8}[cipher]
    if cipher == "des":
        # cryptography has no single DES: build the structure with a 3DES-encrypted body; the
        # gateway refuses by algorithm before it decrypts.
        block, cek = TripleDES, os.urandom(24)
    else:
        block = algorithms.AES if cipher.startswith("aes") else TripleDES
        cek = os.urandom(key_len)
    iv = os.urandom(block.block_size // 8)
    pad = sympad.PKCS7(block.block_size).padder()
    enc = Cipher(block(cek), modes.CBC(iv)).encryptor()
    ct = enc.update(pad.update(data) + pad.finalize()) + enc.finalize()
    rc = ax509.Certificate.load(recipient.public_bytes(Encoding.DER))
    ri = cms.RecipientInfo({"ktri": cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": cms.RecipientIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": rc.issuer, "serial_number": rc.serial_number})}),
        "key_encryption_algorithm": cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"}),
        "encrypted_key": recipient.public_key().encrypt(cek, padding.PKCS1v15()),
    })})
    env = cms.EnvelopedData({
        "version": "v0", "recipient_infos": [ri],
        "encrypted_content_info": {"content_type": "data",
                                   "content_encryption_algorithm": {"algorithm": cipher, "parameters": iv},
                                   "encrypted_content": ct},
    })
    return cms.ContentInfo({"content_type": "enveloped_data", "content": env}).dump()

"""SCEP message handling (appliance/gateway/scep.py) against a crafted requester: verify, decrypt, answer, refuse."""

from __future__ import annotations

import base64
import random

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.serialization import Encoding

from appliance.gateway import scep
from tests.scepmsg import Requester, SoftRa, csr, self_signed


@pytest.fixture(scope="module")
def ra() -> SoftRa:
    return SoftRa()


@pytest.fixture(scope="module")
def dev() -> Requester:
    return Requester.new("device-1")


def test_caps_and_cacert(ra):
    caps = scep.Algorithms().caps().split()
    assert {"AES", "SHA-256", "POSTPKIOperation", "Renewal"} <= set(caps)
    assert "DES3" not in caps and "SHA-1" not in caps
    assert {"DES3", "SHA-1"} <= set(scep.Algorithms(allow_des=True, allow_weak_digest=True).caps().split())
    ca = self_signed(ra.sign_key, "CA", ca=True).public_bytes(Encoding.DER)
    assert scep.ca_cert_response([ca], []) == ("application/x-x509-ca-cert", ca)
    ctype, body = scep.ca_cert_response([ca], [ra.decrypt_cert.public_bytes(Encoding.DER), ra.sign_cert.public_bytes(Encoding.DER)])
    assert ctype == "application/x-x509-ca-ra-cert"
    certs = [c.chosen.dump() for c in cms.ContentInfo.load(body)["content"]["certificates"]]
    # a SET OF: DER sorts it, so clients pick the RA certificates by key usage, not by position
    assert sorted(certs) == sorted([ra.decrypt_cert.public_bytes(Encoding.DER), ra.sign_cert.public_bytes(Encoding.DER), ca])


def test_pkcsreq_roundtrip(ra, dev):
    msg = dev.message(scep.PKCS_REQ, csr(dev.key, "device-1", "s3cret"), ra.decrypt_cert, tid="T1", nonce=b"n" * 16)
    req = scep.parse(msg, ra, scep.Algorithms())
    assert (req.name, req.transaction_id, req.sender_nonce, req.challenge) == ("PKCSReq", "T1", b"n" * 16, "s3cret")
    assert req.csr is not None and req.csr.subject.rfc4514_string() == "CN=device-1"
    assert req.signer_cert == dev.cert and req.digest == "sha256" and req.cipher == "aes128_cbc"
    issued = self_signed(dev.key, "device-1").public_bytes(Encoding.DER)
    rep = dev.open(scep.cert_rep(req, ra, scep.SUCCESS, certs=[issued]), ra.sign_cert)
    assert rep["scep_message_type"] == "3" and rep["scep_pki_status"] == "0"
    assert rep["scep_recipient_nonce"] == b"n" * 16 and rep["scep_transaction_id"] == "T1"
    assert rep["certs"] == [issued] and rep["cipher"] == "aes128_cbc"
    # GET form: base64 in the query, bounded
    assert scep.decode_get_message(base64.b64encode(msg).decode()) == msg
    with pytest.raises(scep.Malformed):
        scep.decode_get_message("A" * (scep.MAX_MESSAGE * 2))


def test_failure_and_pending_replies(ra, dev):
    req = scep.parse(dev.message(scep.PKCS_REQ, csr(dev.key, "d"), ra.decrypt_cert, cipher="aes256_cbc"), ra, scep.Algorithms())
    rep = dev.open(scep.cert_rep(req, ra, scep.FAILURE, fail_info=scep.BAD_REQUEST, text="wrong challenge"), ra.sign_cert)
    assert (rep["scep_pki_status"], rep["scep_fail_info"], rep["scep_fail_info_text"]) == ("2", "2", "wrong challenge")
    assert "certs" not in rep
    rep = dev.open(scep.cert_rep(req, ra, scep.PENDING), ra.sign_cert)
    assert rep["scep_pki_status"] == "3" and "scep_fail_info" not in rep


def test_poll_getcert_getcrl_payloads(ra, dev):
    from asn1crypto import x509 as ax509
    issuer = ax509.Name.build({"common_name": "CA"})
    subject = ax509.Name.build({"common_name": "device-1"})
    poll = scep.IssuerAndSubject({"issuer": issuer, "subject": subject}).dump()
    req = scep.parse(dev.message(scep.CERT_POLL, poll, ra.decrypt_cert), ra, scep.Algorithms())
    assert (req.name, req.issuer_der, req.subject_der) == ("CertPoll", issuer.dump(), subject.dump())
    ias = cms.IssuerAndSerialNumber({"issuer": issuer, "serial_number": 12345}).dump()
    for t, name in ((scep.GET_CERT, "GetCert"), (scep.GET_CRL, "GetCRL")):
        req = scep.parse(dev.message(t, ias, ra.decrypt_cert), ra, scep.Algorithms())
        assert (req.name, req.serial, req.issuer_der) == (name, 12345, issuer.dump())


def test_weak_algorithms_refused_unless_configured(ra, dev):
    body = csr(dev.key, "d")
    for kwargs, text in (({"cipher": "tripledes_3key"}, "content encryption"), ({"cipher": "des"}, "content encryption"),
                         ({"digest": "sha1"}, "digest sha1"), ({"digest": "md5"}, "digest md5")):
        with pytest.raises(scep.ScepError) as e:
            scep.parse(dev.message(scep.PKCS_REQ, body, ra.decrypt_cert, **kwargs), ra, scep.Algorithms())
        assert e.value.fail_info == scep.BAD_ALG and text in e.value.text
        assert scep.request_of(e.value) is not None  # answerable with a CertRep FAILURE badAlg
    old = scep.Algorithms(allow_des=True, allow_weak_digest=True)
    req = scep.parse(dev.message(scep.PKCS_REQ, body, ra.decrypt_cert, cipher="tripledes_3key", digest="sha1"), ra, old)
    assert (req.cipher, req.digest) == ("tripledes_3key", "sha1")
    rep = dev.open(scep.cert_rep(req, ra, scep.SUCCESS, certs=[dev.cert.public_bytes(Encoding.DER)]), ra.sign_cert)
    assert rep["cipher"] == "tripledes_3key"


def test_tampering_refused(ra, dev):
    msg = dev.message(scep.PKCS_REQ, csr(dev.key, "d"), ra.decrypt_cert)
    # a flipped byte in the envelope breaks messageDigest; one in the signature breaks the signature
    ci = cms.ContentInfo.load(msg)
    for mutate in ("content", "signature"):
        c2 = cms.ContentInfo.load(msg)
        sd = c2["content"]
        if mutate == "content":
            env = bytearray(sd["encap_content_info"]["content"].native)
            env[-1] ^= 1
            sd["encap_content_info"]["content"] = bytes(env)
        else:
            sig = bytearray(sd["signer_infos"][0]["signature"].native)
            sig[5] ^= 1
            sd["signer_infos"][0]["signature"] = bytes(sig)
        with pytest.raises(scep.Malformed):
            scep.parse(c2.dump(force=True), ra, scep.Algorithms())
    assert ci  # the original still parses
    # encrypted to someone else (the signing certificate, not the decryption one): badMessageCheck
    with pytest.raises(scep.ScepError) as e:
        scep.parse(dev.message(scep.PKCS_REQ, csr(dev.key, "d"), ra.sign_cert), ra, scep.Algorithms())
    assert e.value.fail_info == scep.BAD_MESSAGE_CHECK
    # a CSR whose own signature is bad (another key signed it)
    other = Requester.new("x")
    bad = bytearray(csr(other.key, "d"))
    bad[-3] ^= 1
    with pytest.raises(scep.ScepError) as e:
        scep.parse(dev.message(scep.PKCS_REQ, bytes(bad), ra.decrypt_cert), ra, scep.Algorithms())
    assert e.value.fail_info in (scep.BAD_MESSAGE_CHECK, scep.BAD_REQUEST)
    with pytest.raises(scep.Malformed):
        scep.parse(b"\x30" * (scep.MAX_MESSAGE + 1), ra, scep.Algorithms())


def test_wrong_rsa_padding_is_no_oracle(ra, dev):
    """A key-transport block that does not decrypt fails exactly like a wrong content (implicit rejection):
    the content is decrypted under a random key, so it fails the CBC padding check (255 times in 256) or,
    when the random padding happens to be valid, the content check after it - never a distinct refusal.
    Several tampered blocks, so the test does not depend on one 1-in-256 draw."""
    msg = cms.ContentInfo.load(dev.message(scep.PKCS_REQ, csr(dev.key, "d"), ra.decrypt_cert))
    env = cms.ContentInfo.load(msg["content"]["encap_content_info"]["content"].native)
    refusals = []
    for fill in (1, 2, 3, 4, 5, 6):
        env["content"]["recipient_infos"][0].chosen["encrypted_key"] = bytes([fill]) * 256
        tampered = env.dump(force=True)
        try:
            inner, _ = scep._decrypt_envelope(tampered, ra, scep.Algorithms())
        except scep.ScepError as e:
            refusals.append((e.fail_info, e.text))
            continue
        assert inner != csr(dev.key, "d")  # random key: never the device's content
        refusals.append("padding passed by chance")
    assert set(refusals) <= {(scep.BAD_MESSAGE_CHECK, "the envelope does not decrypt"), "padding passed by chance"}
    assert refusals.count((scep.BAD_MESSAGE_CHECK, "the envelope does not decrypt")) >= 3


def test_fuzz_never_crashes(ra, dev):
    """Bounded mutation fuzz of a valid pkiMessage and of its envelope: only Malformed or ScepError."""
    rng = random.Random(8894)
    seed = dev.message(scep.PKCS_REQ, csr(dev.key, "d", "pw"), ra.decrypt_cert)
    env = cms.ContentInfo.load(seed)["content"]["encap_content_info"]["content"].native
    outcomes = {"ok": 0, "malformed": 0, "refused": 0}
    for i in range(400):
        base = bytearray(seed if i % 2 else env)
        for _ in range(rng.randint(1, 6)):
            if len(base) < 2:
                break
            op = rng.randrange(4)
            pos = rng.randrange(len(base))
            if op == 0:
                base[pos] = rng.randrange(256)
            elif op == 1:
                del base[pos:pos + rng.randint(1, 40)]
            elif op == 2:
                base[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                base = base[:pos]
        try:
            # odd rounds: the whole message; even ones: a mutated envelope inside a well-signed message
            msg = bytes(base) if i % 2 else dev.message(scep.PKCS_REQ, b"", ra.decrypt_cert, raw_envelope=bytes(base))
            scep.parse(msg, ra, scep.Algorithms())
            outcomes["ok"] += 1
        except scep.Malformed:
            outcomes["malformed"] += 1
        except scep.ScepError:
            outcomes["refused"] += 1
    assert outcomes["malformed"] > 100 and outcomes["refused"] > 100, outcomes

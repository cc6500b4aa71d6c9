"""The CMP layer judged by the real `openssl cmp` (OpenSSL 3.0): every command, MAC and signature protection,
implicit and explicit confirmation, polling, refusals with PKIFailureInfo, replay, and each result checked by
`openssl verify`. The issuing side is FakeIssuer (tests/unit/cmp_harness.py); test_cmp_gateway.py runs the real one."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder, encoder
from pyasn1_alt_modules import rfc5280, rfc8018, rfc9810

from appliance.gateway.cmp import pkimsg as P
from appliance.gateway.cmp.server import CmpServer
from policy import cmpmac
from tests.unit.cmp_harness import CMC_RA, FakeIssuer, Listener, _name, der, make_cert, openssl_cmp, pem, write_key


class Pki:
    def __init__(self, d: Path) -> None:
        self.d = d
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = make_cert("CMP Test CA", self.ca_key, _name("CMP Test CA"), self.ca_key, ca=True)
        self.gw_key = ec.generate_private_key(ec.SECP256R1())
        self.gw = make_cert("Donjon CMP", self.gw_key, self.ca.subject, self.ca_key)
        self.ra_key = ec.generate_private_key(ec.SECP256R1())
        self.ra = make_cert("CMP RA", self.ra_key, self.ca.subject, self.ca_key, eku=[CMC_RA])
        (d / "ca.pem").write_bytes(pem(self.ca))
        (d / "gw.pem").write_bytes(pem(self.gw))
        (d / "ra.pem").write_bytes(pem(self.ra))
        write_key(d / "ra.key", self.ra_key)
        for n in ("k1", "k2", "k3"):
            write_key(d / f"{n}.key", ec.generate_private_key(ec.SECP256R1()))

    def responder(self) -> P.Responder:
        from cryptography.x509 import SubjectKeyIdentifier

        alg = rfc5280.AlgorithmIdentifier()
        alg["algorithm"] = rfc5280.univ.ObjectIdentifier("1.2.840.10045.4.3.2")
        return P.Responder(cert_der=der(self.gw), subject_der=self.gw.subject.public_bytes(),
                           ski=self.gw.extensions.get_extension_for_class(SubjectKeyIdentifier).value.digest,
                           sig_alg_der=bytes(encoder.encode(alg)), chain_der=(der(self.ca),))

    async def sign(self, data: bytes) -> bytes:
        return self.gw_key.sign(data, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    pki = Pki(d)
    issuer = FakeIssuer(pki.ca_key, pki.ca, secrets={"4711": b"correct horse battery staple", "4712": b"another secret 0123456789"})
    server = CmpServer(pki.responder(), pki.sign, issuer)
    lst = Listener(server)
    yield d, pki, issuer, server, f"127.0.0.1:{lst.port}"
    lst.close()


def base(url: str, d: Path) -> list[str]:
    return ["-server", url, "-path", "/.well-known/cmp", "-srvcert", str(d / "gw.pem"), "-recipient", "/CN=CMP Test CA"]


def mac(ref: str = "4711", secret: str = "correct horse battery staple") -> list[str]:
    return ["-ref", ref, "-secret", f"pass:{secret}"]


def fail_bits(msg: rfc9810.PKIMessage) -> set[int]:
    return {i for i, b in enumerate(msg["body"]["error"]["pKIStatusInfo"]["failInfo"]) if b}


def verify(d: Path, cert: Path) -> None:
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(d / "ca.pem"), str(cert)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith(": OK"), r.stdout + r.stderr


@pytest.mark.slow  # the same flows run on the real appliance in tests/integration/test_cmp.py (just cmp-slow)
def test_ir_mac_implicit_confirm_cr_ra_signature_p10cr_kur_rr(env):
    d, pki, issuer, server, url = env
    # ir, MAC (PasswordBasedMac, OpenSSL's default hmac-sha1 and hmac-sha256), implicit confirmation.
    r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-newkey", str(d / "k1.key"), "-subject", "/CN=device-1",
                    "-implicit_confirm", "-certout", str(d / "ir.pem"), "-reqout", str(d / "ir.der"))
    assert r.returncode == 0, r.stderr
    verify(d, d / "ir.pem")
    assert x509.load_pem_x509_certificate((d / "ir.pem").read_bytes()).subject.rfc4514_string() == "CN=device-1"
    assert issuer.calls[-1] == "enrol ir mac:4711 None" and not issuer.confirmed  # implicit: no certConf
    r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-mac", "hmacWithSHA256", "-newkey", str(d / "k1.key"), "-subject", "/CN=device-1b",
                    "-certout", str(d / "ir2.pem"))
    assert r.returncode == 0, r.stderr
    verify(d, d / "ir2.pem")
    assert issuer.confirmed[-1] == (x509.load_pem_x509_certificate((d / "ir2.pem").read_bytes()).serial_number, True)  # explicit certConf
    # cr signed by an RA certificate.
    r = openssl_cmp("-cmd", "cr", *base(url, d), "-cert", str(d / "ra.pem"), "-key", str(d / "ra.key"), "-newkey", str(d / "k2.key"),
                    "-subject", "/CN=device-2", "-implicit_confirm", "-certout", str(d / "cr.pem"))
    assert r.returncode == 0, r.stderr
    verify(d, d / "cr.pem")
    assert issuer.calls[-1].startswith("enrol cr signature:")
    # p10cr with MAC.
    subprocess.run(["openssl", "req", "-new", "-key", str(d / "k3.key"), "-subj", "/CN=device-3", "-out", str(d / "p10.csr")], check=True)
    r = openssl_cmp("-cmd", "p10cr", *base(url, d), *mac(), "-csr", str(d / "p10.csr"), "-implicit_confirm", "-certout", str(d / "p10.pem"))
    assert r.returncode == 0, r.stderr
    verify(d, d / "p10.pem")
    # kur signed with the certificate being updated, to a new key.
    r = openssl_cmp("-cmd", "kur", *base(url, d), "-cert", str(d / "ir.pem"), "-key", str(d / "k1.key"), "-newkey", str(d / "k2.key"),
                    "-implicit_confirm", "-certout", str(d / "kur.pem"))
    assert r.returncode == 0, r.stderr
    verify(d, d / "kur.pem")
    new = x509.load_pem_x509_certificate((d / "kur.pem").read_bytes())
    assert new.subject.rfc4514_string() == "CN=device-1" and issuer.calls[-1].startswith("enrol kur signature:")
    # rr signed with the certificate's own key, with a reason code.
    r = openssl_cmp("-cmd", "rr", *base(url, d), "-cert", str(d / "kur.pem"), "-key", str(d / "k2.key"), "-oldcert", str(d / "kur.pem"), "-revreason", "1")
    assert r.returncode == 0, r.stderr
    assert issuer.revoked[new.serial_number] == 1
    # rr with MAC for a certificate the CA never issued: rp with rejection.
    bogus = make_cert("nobody", ec.generate_private_key(ec.SECP256R1()), pki.ca.subject, pki.ca_key)
    (d / "bogus.pem").write_bytes(pem(bogus))
    r = openssl_cmp("-cmd", "rr", *base(url, d), *mac(), "-oldcert", str(d / "bogus.pem"))
    assert r.returncode != 0 and "rejection" in r.stderr and "badCertId" in r.stderr


@pytest.mark.slow  # the same flows run on the real appliance in tests/integration/test_cmp.py (just cmp-slow)
def test_genm_ca_certs_and_root_update(env):
    d, pki, issuer, server, url = env
    r = openssl_cmp("-cmd", "genm", *base(url, d), *mac(), "-infotype", "caCerts", "-rspout", str(d / "genp.der"))
    assert r.returncode == 0, r.stderr
    assert "id-it-caCerts" in r.stderr
    msg, _ = decoder.decode((d / "genp.der").read_bytes(), asn1Spec=rfc9810.PKIMessage())
    itav = msg["body"]["genp"][0]
    certs, _ = decoder.decode(bytes(itav["infoValue"]), asn1Spec=rfc9810.CaCertsValue())
    (d / "genp-ca.der").write_bytes(bytes(encoder.encode(certs[0])))
    r2 = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.pem"), str(d / "ca.pem")], capture_output=True, text=True)
    assert r2.returncode == 0 and x509.load_der_x509_certificate((d / "genp-ca.der").read_bytes()) == pki.ca
    r = openssl_cmp("-cmd", "genm", *base(url, d), "-cert", str(d / "ra.pem"), "-key", str(d / "ra.key"), "-infotype", "rootCaKeyUpdate")
    assert r.returncode == 0 and "id-it-rootCaKeyUpdate" in r.stderr, r.stderr


@pytest.mark.slow  # the same flows run on the real appliance in tests/integration/test_cmp.py (just cmp-slow)
def test_polling_approval_and_refusal(env):
    d, pki, issuer, server, url = env
    # A dual-control profile: ip "waiting", then pollReq/pollRep until the (fake) officer decides at the second poll.
    # (OpenSSL 3.0 cannot send id-it-certProfile, so the fake sends every request of this test to that profile.)
    tid_before = len(issuer.pending)
    issuer_pending_mode = {"next": "approve"}
    orig = issuer.enrol

    async def dual(op, req, cred, profile, old):
        return await orig(op, req, cred, "dual-control", old)

    issuer.enrol = dual  # type: ignore[method-assign]
    polls = {"n": 0}
    orig_poll = issuer.poll

    async def poll(rid, cred):
        polls["n"] += 1
        if polls["n"] >= 2:
            req, _ = issuer.pending[rid]
            issuer.pending[rid] = (req, issuer_pending_mode["next"])
        return await orig_poll(rid, cred)

    issuer.poll = poll  # type: ignore[method-assign]
    try:
        r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-newkey", str(d / "k3.key"), "-subject", "/CN=approved", "-certout", str(d / "poll.pem"))
        assert r.returncode == 0, r.stderr
        assert "received POLLREP" in r.stderr and polls["n"] == 2
        verify(d, d / "poll.pem")
        issuer_pending_mode["next"] = "refuse"
        polls["n"] = 0
        r = openssl_cmp("-cmd", "cr", *base(url, d), *mac(), "-newkey", str(d / "k3.key"), "-subject", "/CN=refused", "-certout", str(d / "no.pem"))
        assert r.returncode != 0 and "rejection" in r.stderr and "notAuthorized" in r.stderr and "refused by an officer" in r.stderr, r.stderr
        assert not (d / "no.pem").exists() and len(issuer.pending) == tid_before + 2
    finally:
        del issuer.enrol, issuer.poll


def test_refusals(env):
    d, pki, issuer, server, url = env
    n = len(issuer.issued)
    # Wrong secret, unknown reference.
    for args in (mac(secret="wrong secret, quite long"), mac(ref="9999")):
        r = openssl_cmp("-cmd", "ir", *base(url, d), *args, "-newkey", str(d / "k1.key"), "-subject", "/CN=x", "-certout", str(d / "x.pem"), "-implicit_confirm")
        assert r.returncode != 0 and "badMessageCheck" in r.stderr and "MAC does not verify" in r.stderr, r.stderr
    # Unprotected request.
    r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-unprotected_requests", "-newkey", str(d / "k1.key"), "-subject", "/CN=x", "-certout", str(d / "x.pem"))
    assert r.returncode != 0 and "unprotected requests are refused" in r.stderr
    # ir signed by a certificate that is not an RA (the device's own): refused by the issuer.
    k1 = serialization.load_pem_private_key((d / "k1.key").read_bytes(), None)
    (d / "dev9.pem").write_bytes(pem(make_cert("device-9", k1, pki.ca.subject, pki.ca_key)))
    r = openssl_cmp("-cmd", "ir", *base(url, d), "-cert", str(d / "dev9.pem"), "-key", str(d / "k1.key"), "-newkey", str(d / "k3.key"),
                    "-subject", "/CN=x", "-certout", str(d / "x.pem"), "-implicit_confirm")
    assert r.returncode != 0 and "notAuthorized" in r.stderr
    # A signer certificate from another CA.
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = make_cert("Other CA", other_key, _name("Other CA"), other_key, ca=True)
    k = ec.generate_private_key(ec.SECP256R1())
    write_key(d / "stranger.key", k)
    (d / "stranger.pem").write_bytes(pem(make_cert("stranger", k, other.subject, other_key, eku=[CMC_RA])))
    r = openssl_cmp("-cmd", "cr", *base(url, d), "-cert", str(d / "stranger.pem"), "-key", str(d / "stranger.key"), "-newkey", str(d / "k3.key"),
                    "-subject", "/CN=x", "-certout", str(d / "x.pem"), "-implicit_confirm")
    assert r.returncode != 0 and "signerNotTrusted" in r.stderr
    # No proof of possession.
    r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-newkey", str(d / "k1.key"), "-subject", "/CN=x", "-certout", str(d / "x.pem"), "-popo", "-1", "-implicit_confirm")
    assert r.returncode != 0 and "badPOP" in r.stderr
    assert len(issuer.issued) == n


def test_replayed_request_refused(env):
    d, pki, issuer, server, url = env
    r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-newkey", str(d / "k1.key"), "-subject", "/CN=once", "-implicit_confirm",
                    "-reqout", str(d / "once.der"), "-certout", str(d / "once.pem"))
    assert r.returncode == 0, r.stderr
    n = len(issuer.issued)
    # The same message again (same transactionID and senderNonce), and with a fresh transactionID but the old nonce.
    r = openssl_cmp("-cmd", "ir", *base(url, d), *mac(), "-reqin", str(d / "once.der"), "-newkey", str(d / "k1.key"), "-subject", "/CN=once",
                    "-certout", str(d / "x.pem"))
    assert r.returncode != 0 and "transactionIdInUse" in r.stderr, r.stderr
    req = (d / "once.der").read_bytes()
    replayed = trio.run(server.handle, req)
    out, _ = decoder.decode(replayed, asn1Spec=rfc9810.PKIMessage())
    assert out["body"].getName() == "error" and fail_bits(out) == {P.TRANSACTION_ID_IN_USE}
    assert len(issuer.issued) == n


def _pbmac1_ir(pki: Pki | x509.Name, ref: bytes, secret: bytes, *, iterations: int = 1000, tamper: bool = False,
               claim_iterations: int | None = None, subject: str = "pbmac1-device") -> bytes:
    """An ir protected with PBMAC1 (RFC 9481 §6.1.2), which OpenSSL 3.0's client cannot send: built here from its parts."""
    from datetime import datetime, timezone

    from pyasn1.type import univ, useful

    k = ec.generate_private_key(ec.SECP256R1())
    spki_der = k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = rfc9810.PKIBody()
    crm = body["ir"].componentType.clone()
    crm["certReq"]["certReqId"] = 0
    tmpl = crm["certReq"]["certTemplate"]
    tmpl["subject"]["rdnSequence"] = decoder.decode(_name(subject).public_bytes(), asn1Spec=rfc5280.Name())[0]["rdnSequence"]
    spki, _ = decoder.decode(spki_der, asn1Spec=rfc5280.SubjectPublicKeyInfo())
    tmpl["publicKey"]["algorithm"] = spki["algorithm"]
    tmpl["publicKey"]["subjectPublicKey"] = spki["subjectPublicKey"]
    sig = k.sign(bytes(encoder.encode(crm["certReq"])), ec.ECDSA(hashes.SHA256()))
    crm["popo"]["signature"]["algorithmIdentifier"]["algorithm"] = univ.ObjectIdentifier("1.2.840.10045.4.3.2")
    crm["popo"]["signature"]["signature"] = univ.BitString.fromOctetString(sig)
    body["ir"].append(crm)
    h = rfc9810.PKIHeader()
    h["pvno"] = 2
    recipient = pki if isinstance(pki, x509.Name) else pki.ca.subject
    h["sender"]["directoryName"]["rdnSequence"] = decoder.decode(_name(subject).public_bytes(), asn1Spec=rfc5280.Name())[0]["rdnSequence"]
    h["recipient"]["directoryName"]["rdnSequence"] = decoder.decode(recipient.public_bytes(), asn1Spec=rfc5280.Name())[0]["rdnSequence"]
    h["messageTime"] = h["messageTime"].clone(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%SZ"))
    kdf = rfc8018.PBKDF2_params()
    salt = os.urandom(16)
    kdf["salt"]["specified"] = salt
    kdf["iterationCount"] = claim_iterations or iterations  # a hostile client may claim a CPU-burning count
    kdf["keyLength"] = 32
    kdf["prf"]["algorithm"] = rfc8018.id_hmacWithSHA256
    params = rfc8018.PBMAC1_params()
    params["keyDerivationFunc"]["algorithm"] = rfc8018.id_PBKDF2
    params["keyDerivationFunc"]["parameters"] = univ.Any(encoder.encode(kdf))
    params["messageAuthScheme"]["algorithm"] = rfc8018.id_hmacWithSHA256
    h["protectionAlg"]["algorithm"] = rfc8018.id_PBMAC1
    h["protectionAlg"]["parameters"] = univ.Any(encoder.encode(params))
    h["senderKID"] = h["senderKID"].clone(ref)
    h["transactionID"] = h["transactionID"].clone(os.urandom(16))
    h["senderNonce"] = h["senderNonce"].clone(os.urandom(16))
    part = rfc9810.ProtectedPart()
    part["header"] = h
    part["body"] = body
    spec = cmpmac.MacSpec(kind="pbmac1", salt=salt, iterations=iterations, owf="sha256", mac="sha256", key_len=32)
    value = cmpmac.compute(spec, secret, bytes(encoder.encode(part)))
    if tamper:
        value = bytes([value[0] ^ 1]) + value[1:]
    msg = rfc9810.PKIMessage()
    msg["header"] = h
    msg["body"] = body
    msg["protection"] = msg["protection"].clone(univ.BitString.fromOctetString(value))
    assert useful  # GeneralizedTime comes through h["messageTime"]
    return bytes(encoder.encode(msg))


def test_pbmac1_protection(env):
    d, pki, issuer, server, url = env
    ok = trio.run(server.handle, _pbmac1_ir(pki, b"4712", b"another secret 0123456789"))
    msg, _ = decoder.decode(ok, asn1Spec=rfc9810.PKIMessage())
    assert msg["body"].getName() == "ip" and int(msg["body"]["ip"]["response"][0]["status"]["status"]) == 0
    cert = x509.load_der_x509_certificate(P._inner(bytes(encoder.encode(msg["body"]["ip"]["response"][0]["certifiedKeyPair"]["certOrEncCert"]["certificate"]))))
    assert cert.subject.rfc4514_string() == "CN=pbmac1-device"
    # The response is signed by the gateway's CMP key: verify it as a client would.
    part = rfc9810.ProtectedPart()
    part["header"], part["body"] = msg["header"], msg["body"]
    pki.gw.public_key().verify(msg["protection"].asOctets(), bytes(encoder.encode(part)), ec.ECDSA(hashes.SHA256()))
    for bad in (_pbmac1_ir(pki, b"4712", b"another secret 0123456789", tamper=True), _pbmac1_ir(pki, b"4712", b"another secret 0123456789", claim_iterations=10**7)):
        msg, _ = decoder.decode(trio.run(server.handle, bad), asn1Spec=rfc9810.PKIMessage())
        assert msg["body"].getName() == "error"
        assert fail_bits(msg) in ({P.BAD_MESSAGE_CHECK}, {P.BAD_ALG})


def test_fuzzed_messages_never_crash(env):
    """Bounded mutation fuzz of real openssl requests: every answer is a signed CMP error or a normal reply, never an exception."""
    _fuzz(env, 60)


@pytest.mark.slow
def test_fuzzed_messages_long(env):
    """The same fuzz at 5,000 mutations (just cmp-slow)."""
    _fuzz(env, 5000)


def _fuzz(env, count: int) -> None:
    d, pki, issuer, server, url = env
    seeds = [(d / n).read_bytes() for n in ("ir.der", "once.der") if (d / n).exists()]
    seeds.append(_pbmac1_ir(pki, b"4712", b"another secret 0123456789"))
    rnd = random.Random(1234)
    n = len(issuer.issued)

    async def run() -> None:
        for i in range(count):
            s = bytearray(rnd.choice(seeds))
            for _ in range(rnd.randint(1, 4)):
                if not s:
                    break
                op = rnd.random()
                pos = rnd.randrange(len(s))
                if op < 0.5:
                    s[pos] = rnd.randrange(256)
                elif op < 0.7:
                    del s[pos: pos + rnd.randint(1, 8)]
                elif op < 0.85:
                    s[pos:pos] = os.urandom(rnd.randint(1, 8))
                else:
                    s = s[:pos]
            if i % 40 == 0:
                s = bytearray(b"\x30\x84\xff\xff\xff\xff" + os.urandom(20))  # a huge length
            out = await server.handle(bytes(s))
            msg, rest = decoder.decode(out, asn1Spec=rfc9810.PKIMessage())
            assert not rest and msg["body"].getName() in ("error", "ip")

    trio.run(run)
    assert len(issuer.issued) <= n + 1  # a mutation that lands in ignored bytes is an honest new request at most

"""The Factory's CMP checks against a compromised gateway: a real encrypted CMDB (Store, migrations), the
CmpService re-checking every claim. The CIS is replaced by FakeSigner (named: it signs with a software CA
key and stores through the real Store, as the pipeline does); the real CIS runs in tests/integration/test_cmp.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import msgspec
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.factory.cmp import CmpHost, CmpService
from appliance.factory.errors import FactoryError
from appliance.factory.store import Store
from appliance.ipc import schema as S
from policy import cmpmac
from policy.profiles import builtin_profiles


class FakeSigner:
    """Stands in for Issuance.issue_one (a fake: software CA key, no CIS) but stores through the real Store."""

    def __init__(self, store: Store, ca_key, ca_cert: x509.Certificate) -> None:
        self.store, self.ca_key, self.ca_cert, self.calls = store, ca_key, ca_cert, 0

    async def issue_one(self, ca, item, serial, actor, action, request, detail=""):
        self.calls += 1
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(",".join(f"{k}={v}" for k, v in item.subject)))
                .issuer_name(self.ca_cert.subject).public_key(serialization.load_der_public_key(item.spki)).serial_number(serial)
                .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(self.ca_key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)

        def w():
            self.store.reserve([(serial, ca, request)])
            with self.store.tx():
                self.store.store_issued(serial, ca, item.profile, cert.subject.rfc4514_string(), 0, 2**31, der, request,
                                        hashlib.sha256(item.spki).digest(), "")
                self.store.audit_in_tx(actor, action, f"{ca}/{serial:x}", "ok", detail)
        await self.store.run(w)
        return cert


@pytest.fixture
def svc(tmp_path):
    store = Store()
    trio.run(store.open, str(tmp_path / "cmdb"), os.urandom(32), "chacha20", True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=Test Issuing")).issuer_name(x509.Name.from_rfc4514_string("CN=Test Issuing"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))

    def add():
        with store.tx():
            store.add_ca("issuing", "p256", None, "root-ca", ca.public_bytes(serialization.Encoding.DER), "")
    trio.run(store.run, add)
    signer = FakeSigner(store, ca_key, ca)
    audits: list[tuple] = []

    async def audit(*a):
        audits.append(a)

    async def check_issuer(*a):
        return None

    async def ca_chain(name):
        return [ca.public_bytes(serialization.Encoding.DER)]

    async def revoke(req, actor):
        return {"revoked": True}

    s = CmpService(CmpHost(store, builtin_profiles(), signer.issue_one, revoke, check_issuer, ca_chain, audit))
    s.signer, s.audits = signer, audits  # type: ignore[attr-defined]
    yield s
    for c in (store.db, store.reader):
        c.close()


def _spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _evidence(ref: str, secret: bytes, protected: bytes, *, wrong: bool = False) -> S.CmpEvidence:
    spec = cmpmac.MacSpec(kind="pbm", salt=b"s" * 16, iterations=500, owf="sha256", mac="sha256")
    mac = cmpmac.compute(spec, b"not it" if wrong else secret, protected)
    return S.CmpEvidence(kind="mac", ref=ref, protected=protected, protection=mac,
                         mac=S.CmpMacParams(kind="pbm", salt=spec.salt, iterations=500, owf="sha256", mac="sha256"))


def test_a_compromised_gateway_gets_no_more_than_the_credential_allows(svc):
    async def run():
        cred = await svc.credential_add(S.ACmpCredentialAdd(id=1, ca="issuing", profile="tls-client", subject="CN=dev1", uses=2), "officer:oper x")
        secret = cred.secret.encode()
        k = ec.generate_private_key(ec.SECP256R1())
        spki = _spki(k)
        content = spki[2:] if spki[1] < 0x80 else spki[3:]
        protected = b"\x30\x82" + b"header..." + content  # what the client MACed: it contains the key
        ok = S.CmpEnroll(id=1, op="ir", evidence=_evidence(cred.ref, secret, protected), spki=spki, subject=(("CN", "dev1"),))
        # A key the client never sent (not in the protected bytes): refused, nothing signed.
        other = _spki(ec.generate_private_key(ec.SECP256R1()))
        r = await svc.enrol(S.CmpEnroll(id=2, op="ir", evidence=ok.evidence, spki=other, subject=(("CN", "dev1"),)))
        assert isinstance(r, S.GwRefused) and r.code == "unauthorized" and "protected part" in r.reason
        # Another subject than the credential's, a wrong MAC, kur under a MAC, an unknown reference: refused.
        r = await svc.enrol(S.CmpEnroll(id=3, op="ir", evidence=ok.evidence, spki=spki, subject=(("CN", "admin"),)))
        assert isinstance(r, S.GwRefused) and "subject" in r.reason
        r = await svc.enrol(S.CmpEnroll(id=4, op="ir", evidence=_evidence(cred.ref, secret, protected, wrong=True), spki=spki, subject=(("CN", "dev1"),)))
        assert isinstance(r, S.GwRefused) and r.code == "unauthorized" and "wrong MAC" in r.reason
        r = await svc.enrol(S.CmpEnroll(id=5, op="kur", evidence=ok.evidence, spki=spki, subject=(("CN", "dev1"),)))
        assert isinstance(r, S.GwRefused) and r.code == "unauthorized"
        r = await svc.enrol(S.CmpEnroll(id=6, op="ir", evidence=_evidence("nope", secret, protected), spki=spki, subject=(("CN", "dev1"),)))
        assert isinstance(r, S.GwRefused) and "unknown reference" in r.reason
        assert svc.signer.calls == 0
        # The honest request: issued, counted; the second use too; a third is refused (uses are atomic).
        for i in (7, 8):
            r = await svc.enrol(msgspec.structs.replace(ok, id=i))
            assert isinstance(r, S.GwIssued), r
        r = await svc.enrol(ok)
        assert isinstance(r, S.GwRefused) and "used up" in r.reason and svc.signer.calls == 2
        # Revocation under the MAC: only what this credential obtained.
        mine = x509.load_der_x509_certificate(r_issued(svc))
        rr = await svc.revoke(S.CmpRevoke(id=9, issuer=svc.signer.ca_cert.subject.public_bytes(), serial=b"\x01", reason=None, evidence=ok.evidence))
        assert isinstance(rr, S.GwRefused)  # serial 1 is the CA's, not this credential's
        rr = await svc.revoke(S.CmpRevoke(id=10, issuer=svc.signer.ca_cert.subject.public_bytes(),
                                          serial=mine.serial_number.to_bytes((mine.serial_number.bit_length() + 7) // 8, "big"), reason=1,
                                          evidence=ok.evidence))
        assert isinstance(rr, S.GwRevoked)
        # Every refusal is audited, naming the protocol and the reference.
        refused = [a for a in svc.audits if a[3] == "refused"]
        assert len(refused) >= 6 and all(a[0].startswith("gateway/cmp:") for a in refused)

    trio.run(run)


def r_issued(svc) -> bytes:
    row = svc.h.store.require_active().db.execute("SELECT c.der FROM cmp_issued i JOIN certs c ON c.serial=i.serial LIMIT 1").fetchone()
    return bytes(row[0])


def test_approval_needs_a_second_officer_and_a_mac_lock(svc):
    async def run():
        cred = await svc.credential_add(S.ACmpCredentialAdd(id=1, ca="issuing", profile="tls-client", approval=True), "officer:oper x")
        k = ec.generate_private_key(ec.SECP256R1())
        spki = _spki(k)
        protected = b"hdr" + spki[2:]
        ev = _evidence(cred.ref, cred.secret.encode(), protected)
        r = await svc.enrol(S.CmpEnroll(id=1, op="ir", evidence=ev, spki=spki, subject=(("CN", "waits"),)))
        assert isinstance(r, S.GwPending) and svc.signer.calls == 0
        with pytest.raises(FactoryError, match="dual control"):
            await svc.decide(int(r.request_id), True, "", "oper", "officer:oper x")
        await svc.decide(int(r.request_id), True, "", "oper2", "officer:oper2 y")
        p = await svc.poll(S.CmpPoll(id=2, request_id=r.request_id, evidence=ev))
        assert isinstance(p, S.GwIssued) and svc.signer.calls == 1
        # Ten wrong MACs lock the reference; the right one is refused after them.
        for _ in range(10):
            assert not (await svc.mac_check(S.CmpCheck(id=3, evidence=_evidence(cred.ref, b"x", protected, wrong=True)))).ok
        c = await svc.mac_check(S.CmpCheck(id=4, evidence=ev))
        assert not c.ok and "locked" in c.reason

    trio.run(run)

"""The LDAP publisher against a real slapd: a certificate goes in as a new entry (one add) or as a value of
the entry that exists, exactly once whatever is replayed, and in the order the jobs come."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from appliance.distribution.publish import Job, PublishError, publisher_for
from appliance.ipc import schema as S
from tests.servers import ADMIN_DN, ADMIN_PW, BASE, Slapd

# ldap3 (imported by the publisher, as in the agent) still uses pyasn1's old names
pytestmark = pytest.mark.filterwarnings("ignore:tagMap is deprecated:DeprecationWarning",
                                        "ignore:typeMap is deprecated:DeprecationWarning")


def _cert(cn: str, serial: int) -> bytes:
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(serial).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(k, hashes.SHA256()).public_bytes(Encoding.DER))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    d = Slapd(tmp_path_factory.mktemp("slapd"))
    d.start()
    yield d
    d.stop()


def test_add_first_then_value_exactly_once_in_order(slapd):
    rule = S.DistRule(name="dir", url=slapd.url, publish=("certs",), bind_dn=ADMIN_DN, secret=ADMIN_PW,
                      dn=f"cn={{CN}},ou=people,{BASE}", entry_classes=("applicationProcess", "pkiUser"))
    pub = publisher_for(rule)
    a, b = _cert("Alice", 1), _cert("Alice", 2)

    def job(action: str, data: bytes, cn: str = "Alice") -> Job:
        return Job(action=action, ca="issuing", ca_root=False, issuer=b"", subject={"CN": cn}, number=0, data=data)

    dn = f"cn=Alice,ou=people,{BASE}"
    try:
        pub.publish(job("cert", a))  # a new entry (and its parent ou=people, made on the way)
        assert slapd.search(dn, "userCertificate;binary") == [a]
        pub.publish(job("cert", b))  # the entry exists: the value is added to it
        pub.publish(job("cert", a))  # a replay (at-least-once delivery): no second copy
        pub.publish(job("cert", b))
        assert sorted(slapd.search(dn, "userCertificate;binary")) == sorted([a, b])
        pub.publish(job("uncert", a))  # in order: the removal after the additions
        pub.publish(job("uncert", a))  # replayed removal: still fine
        assert slapd.search(dn, "userCertificate;binary") == [b]
        pub.publish(job("cert", a))  # published again after its removal: back, once
        assert sorted(slapd.search(dn, "userCertificate;binary")) == sorted([a, b])
        # Garbage for a certificate attribute is the directory's refusal, a one-line error, not a crash.
        with pytest.raises(PublishError):
            pub.publish(job("cert", b"\x30\x03\x02\x01\x01", cn="Mallory"))
        assert slapd.search(f"cn=Mallory,ou=people,{BASE}", "userCertificate;binary") == []
    finally:
        pub.close()


def _ca() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pipeline CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(k, hashes.SHA256()))
    return k, cert.public_bytes(Encoding.DER)


def _leaf(ca_key, ca_der: bytes, cn: str, serial: int) -> bytes:
    ca = x509.load_der_x509_certificate(ca_der)
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(ec.generate_private_key(ec.SECP256R1()).public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()).public_bytes(Encoding.DER))


def test_a_run_of_new_entries_goes_pipelined_and_decides_as_one_by_one(slapd):
    """publish_run sends a run of new certificate entries at once, then reads their answers: the outcomes
    and the directory's end state are those of one publish after another, whatever the run meets: a
    missing parent, an entry that exists, the same entry twice, a removal in between, a job refused."""
    ca_key, ca_der = _ca()
    ou = "ou=pipeline"
    rule = S.DistRule(name="dir", url=slapd.url, publish=("certs",), bind_dn=ADMIN_DN, secret=ADMIN_PW,
                      dn=f"cn={{CN}},{ou},{BASE}", entry_classes=("applicationProcess", "pkiUser"))
    pub = publisher_for(rule)
    certs = {(cn, i): _leaf(ca_key, ca_der, cn, 100 + 10 * i + n) for n, cn in enumerate("ABCDEFG") for i in range(3)}

    def job(action: str, cn: str, i: int = 0, data: bytes | None = None) -> Job:
        return Job(action=action, ca="issuing", ca_root=False, issuer=ca_der, subject={"CN": cn}, number=0,
                   data=certs[(cn, i)] if data is None else data)

    def values(cn: str) -> list[bytes]:
        return sorted(slapd.search(f"cn={cn},{ou},{BASE}", "userCertificate;binary"))

    runs: list[int] = []  # the sizes of the runs that went pipelined
    pipeline = pub._pipeline
    pub._pipeline = lambda group: runs.append(len(group)) or pipeline(group)  # type: ignore[method-assign]
    try:
        # New entries under a parent that does not exist yet (each add answers noSuchObject: one by one then).
        assert pub.publish_run([job("cert", cn) for cn in "ABC"]) == [None, None, None]
        assert [values(cn) for cn in "ABC"] == [[certs[(cn, 0)]] for cn in "ABC"]
        # New entries, an entry that exists (its value added), the same entry twice in one run (the run is
        # cut there: in order), a removal in between, a replay of something already there.
        run = [job("cert", "D"), job("cert", "A", 1), job("cert", "E"), job("cert", "D", 1), job("uncert", "B"),
               job("cert", "F"), job("cert", "C"), job("cert", "G")]
        assert pub.publish_run(run) == [None] * len(run)
        assert values("A") == sorted([certs[("A", 0)], certs[("A", 1)]])
        assert values("B") == [] and values("C") == [certs[("C", 0)]]
        assert values("D") == sorted([certs[("D", 0)], certs[("D", 1)]])
        assert values("E") == [certs[("E", 0)]] and values("F") == [certs[("F", 0)]] and values("G") == [certs[("G", 0)]]
        assert runs == [3, 3, 3], runs  # A-C; D, A, E (cut at D again); F, C, G (D again alone, the removal alone)
        # A job that does not verify in the middle of a run: those before it published, it refused
        # (permanent, one line), nothing after it attempted.
        run = [job("cert", "A", 2), job("cert", "B", 2), job("cert", "C", 2, data=certs[("C", 1)][:-5]), job("cert", "E", 2)]
        out = pub.publish_run(run)
        assert out[:2] == [None, None] and len(out) == 3 and isinstance(out[2], PublishError) and out[2].permanent
        assert certs[("B", 2)] in values("B") and certs[("C", 1)] not in values("C") and certs[("E", 2)] not in values("E")
    finally:
        pub.close()
    # A directory refusal inside a pipelined run (an attribute its schema does not know): the first job
    # refused, permanent, nothing of the run stored.
    bad = S.DistRule(name="bad", url=slapd.url, publish=("certs",), bind_dn=ADMIN_DN, secret=ADMIN_PW,
                     dn=f"cn={{CN}},{ou},{BASE}", entry_classes=("applicationProcess", "pkiUser"),
                     entry_attributes={"noSuchAttributeType": "{CN}"})
    pub = publisher_for(bad)
    try:
        out = pub.publish_run([job("cert", cn, 0, data=_leaf(ca_key, ca_der, cn, 900 + n)) for n, cn in enumerate(["H", "I", "J"])])
        assert len(out) == 1 and isinstance(out[0], PublishError) and out[0].permanent and "(17)" in str(out[0]), out
        assert [values(cn) for cn in "HIJ"] == [[], [], []]
    finally:
        pub.close()
    # The directory gone: the run's first job fails, not permanent (the round rules resend it all), both
    # when it cannot be reached and when it closes a connection that was open: the adds are written
    # without an error then, and the answers never come (this once spun reading nothing, for ever).
    pub = publisher_for(rule)
    try:
        assert pub.publish_run([job("cert", cn, 0, data=_leaf(ca_key, ca_der, cn, 940 + n)) for n, cn in enumerate("MN")]) == [None, None]
        slapd.stop()
        for first in (960, 970):  # the open connection closed by the directory, then a refused connection
            got: list = []
            t = threading.Thread(target=lambda: got.append(pub.publish_run(
                [job("cert", cn, 0, data=_leaf(ca_key, ca_der, cn, first + n)) for n, cn in enumerate("KL")])), daemon=True)
            t.start()
            t.join(30)
            assert not t.is_alive(), "publish_run hangs on a directory that went away"
            out = got[0]
            assert len(out) == 1 and isinstance(out[0], PublishError) and not out[0].permanent, out
    finally:
        pub.close()
        slapd.start()

"""The LDAP publisher against a real slapd: a certificate goes in as a new entry (one add) or as a value of
the entry that exists, exactly once whatever is replayed, and in the order the jobs come."""

from __future__ import annotations

import datetime as dt

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

"""CA state from the real encrypted CMDB (issue 11 item 3: revoked, expired, a parent's either), the
v7 back-fill of certificate facts, and the uniqueness profile options (item 15)."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.factory.cmdb import Cmdb, cert_facts, serial_bytes
from appliance.factory.service import ca_state
from policy.errors import PolicyError
from policy.profiles import builtin_profiles, load_profile_text

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _cert(cn: str, issuer: str, key, signer, days: float, serial: int, san: str | None = None) -> bytes:
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
         .serial_number(serial).not_valid_before(NOW - dt.timedelta(days=400)).not_valid_after(NOW + dt.timedelta(days=days)))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san), x509.DNSName("a.example")]), False)
    return b.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def db(tmp_path):
    d = Cmdb(str(tmp_path / "cmdb.sqlite"), os.urandom(32), create=True)
    yield d
    d.close()


def test_ca_state_revoked_expired_and_inherited(db):
    root_k, k = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cas = [("root", None, _cert("root", "root", root_k, root_k, 3000, 1)),
           ("old", "root", _cert("old", "root", k, root_k, -1, 2)),  # expired yesterday
           ("gone", "root", _cert("gone", "root", k, root_k, 300, 3)),  # revoked below
           ("child", "gone", _cert("child", "gone", k, k, 100, 4)),  # valid, but under a revoked CA
           ("fine", "root", _cert("fine", "root", k, root_k, 300, 5))]
    with db.tx():
        for name, parent, der in cas:
            db.db.execute("INSERT INTO cas(name, key_label, key_type, parent, profile, cert, created) VALUES (?,?,?,?,?,?,?)",
                          (name, name, "p256", parent, "sub-ca", der, 0))
        db.db.execute("INSERT INTO serials VALUES (?,?,?,?,?)", (serial_bytes(3), "root", "issued", 0, None))
        db.db.execute("INSERT INTO certs(serial, ca, profile, subject, not_before, not_after, issued_at, der) VALUES (?,?,?,?,?,?,?,?)",
                      (serial_bytes(3), "root", "sub-ca", "CN=gone", 0, 2**40 - 1, 0, cas[2][2]))
        db.db.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", ("root", serial_bytes(3), 1700000000, 2, None, 20))
    now = time.time()
    assert ca_state(db.db, "root", now) == ("active", "") and ca_state(db.db, "fine", now) == ("active", "")
    state, why = ca_state(db.db, "old", now)
    assert state == "expired" and "the certificate of CA 'old' expired on" in why
    state, why = ca_state(db.db, "gone", now)
    assert state == "revoked" and "2023-11-14" in why and "reason 2" in why
    state, why = ca_state(db.db, "child", now)
    assert state == "revoked" and "its parent CA 'gone'" in why
    assert ca_state(db.db, "nope", now)[0] == "awaiting certificate"


def test_v7_backfill_fills_spki_hash_and_sans(db):
    k = ec.generate_private_key(ec.SECP256R1())
    der = _cert("leaf", "ca", k, k, 10, 9, san="spiffe://example.org/w")
    h, sans = cert_facts(der)
    assert sans == "uri:spiffe://example.org/w dns:a.example" and len(h) == 32
    with db.tx():
        db.db.execute("INSERT INTO cas(name, key_label, key_type, parent, profile, cert, created) VALUES ('ca','ca','p256',NULL,'root-ca',?,0)", (der,))
        db.db.execute("INSERT INTO serials VALUES (?,?,?,?,?)", (serial_bytes(9), "ca", "issued", 0, None))
        db.db.execute("INSERT INTO certs(serial, ca, profile, subject, not_before, not_after, issued_at, der) VALUES (?,?,?,?,?,?,?,?)",
                      (serial_bytes(9), "ca", "tls-client", "CN=leaf", 0, 1, 0, der))
        from appliance.factory.cmdb import _backfill_v7
        _backfill_v7(db.db)
    assert db.db.execute("SELECT spki_sha256, sans FROM certs").fetchone() == (h, sans)


def test_uniqueness_options_are_off_by_default_and_typed():
    assert not any(p.unique_subject or p.unique_key for p in builtin_profiles().values())
    base = 'kind = "end-entity"\nkey_types = ["p256"]\nkey_usage = ["digital_signature"]\nmax_validity_days = 30\n' \
           '[[subject]]\nattr = "CN"\npresence = "required"\n'
    p = load_profile_text("dev", "unique_subject = true\nunique_key = true\n" + base)
    assert p.unique_subject and p.unique_key
    with pytest.raises(PolicyError, match="unique_key"):
        load_profile_text("dev", 'unique_key = "yes"\n' + base)

"""removeFromCRL is no revocation reason (RFC 5280 §5.3.1: delta CRLs only): refused by the CLI's
parser, never encoded in a full CRL, a tenant's full CRL carrying it refused, old CMDB rows migrated."""

from __future__ import annotations

import os

import pytest
from cryptography import x509

from appliance import adminops as ops
from appliance.factory import cmdb
from appliance.factory.cmdb import SCHEMA_VERSION, Cmdb
from policy import crl as C
from policy.tenants import CrlRefused, check_crl
from tests.unit.test_ocsp_pki import make_ca
from tests.unit.test_policy_tenants import NOW, crl


def test_cli_parser_refuses_remove_from_crl_and_says_what_to_do():
    with pytest.raises(ops.OpError, match="removeFromCRL is not a revocation reason.*donjon unrevoke"):
        ops.parse_reason("removeFromCRL")
    assert "removeFromCRL" not in ops.REASONS and ops.parse_reason("certificateHold") == 6


def test_full_crl_encoder_refuses_reason_8():
    with pytest.raises(ValueError, match=r"removeFromCRL \(8\) is allowed in delta CRLs only"):
        C.encode_entries([(5, 1_700_000_000, 8, None)])
    # entry_length sizes delta entries too, where removeFromCRL belongs: only the full encoder refuses it
    assert C.entry_length(5, 1_700_000_000, 8, None) == C.entry_length(5, 1_700_000_000, 1, None)
    assert 8 not in C.REASONS.values()


def test_tenant_full_crl_with_remove_from_crl_is_refused_not_half_read():
    ca = make_ca("t")
    der = crl(ca, 3, [(5, x509.ReasonFlags.key_compromise), (6, x509.ReasonFlags.remove_from_crl)])
    with pytest.raises(CrlRefused, match="removeFromCRL"):
        check_crl(ca.cert, der, NOW.timestamp())


def test_migration_keeps_old_remove_from_crl_rows_revoked_with_exact_lengths(tmp_path, monkeypatch):
    """A CMDB written by an older version holds reason-8 rows: after the upgrade they are revoked,
    reason unspecified, with the entry length the encoder now produces, and queued for OCSP."""
    path, key = str(tmp_path / "cmdb"), os.urandom(32)
    with monkeypatch.context() as m:  # a real v7 CMDB: the later migrations are not run at creation
        m.setattr(cmdb, "SCHEMA_VERSION", 7)
        db = Cmdb(path, key, create=True)
    t = 1_700_000_000
    rows = [(0x1234, 8, None), (0x99AA, 8, t - 86400), (0x77, 1, None)]
    with db.tx():
        db.db.execute("INSERT INTO cas(name, key_label, key_type, profile, cert, created) VALUES ('ca','l','p256','sub-ca',x'00',0)")
        for serial, reason, inv in rows:
            sb = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
            db.db.execute("INSERT INTO serials VALUES (?, 'ca', 'issued', 0, NULL)", (sb,))
            db.db.execute("INSERT INTO certs VALUES (?, 'ca', 'tls-server', 'CN=x', 0, ?, 0, x'00', NULL, NULL, NULL)", (sb, t + 10**6))
            old_len = C.entry_length(serial, t, 1 if reason == 8 else reason, inv)  # reason 8 was as long as 1
            db.db.execute("INSERT INTO revocations VALUES ('ca', ?, ?, ?, ?, ?)", (sb, t, reason, inv, old_len))
        db.db.execute("DELETE FROM ocsp_queue")
        assert db.db.execute("PRAGMA user_version").fetchone()[0] == 7
    db.close()
    db = Cmdb(path, key)  # runs migration 8
    assert db.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    got = {int.from_bytes(s, "big"): (r, ln) for s, r, ln in db.db.execute("SELECT serial, reason, entry_len FROM revocations")}
    assert got == {0x1234: (None, C.entry_length(0x1234, t, None, None)),
                   0x99AA: (None, C.entry_length(0x99AA, t, None, t - 86400)),
                   0x77: (1, C.entry_length(0x77, t, 1, None))}
    queued = {int.from_bytes(s, "big") for (s,) in db.db.execute("SELECT serial FROM ocsp_queue")}
    assert queued == {0x1234, 0x99AA}
    # And the CRL built from the migrated rows has exactly the declared length.
    entries = [(s, t, r, t - 86400 if s == 0x99AA else None) for s, (r, _) in sorted(got.items())]
    assert len(C.encode_entries(entries)) == sum(ln for _, ln in got.values())
    db.close()

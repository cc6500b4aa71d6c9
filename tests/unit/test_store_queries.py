"""The named queries issue 13 moved into the storage layer (store/: tenants, enrolment secrets, CA life, OCSP,
gateway, CMP, distribution, officers and dual control), each against a real encrypted CMDB in tmp_path."""

from __future__ import annotations

import json
import os

import pytest
import trio

from appliance.factory.cmdb import serial_bytes
from appliance.factory.store import Store

KEY = os.urandom(32)
S1, S2, S3 = (serial_bytes((1 << 64) + i) for i in (1, 2, 3))


@pytest.fixture
def st(tmp_path):
    """A store with CA `root` (and `sub` under it) and three certificates of root: S1, S2 (revoked), S3."""
    s = Store()
    trio.run(s.open, str(tmp_path / "cmdb.sqlite"), KEY, "chacha20", True)
    with s.tx():
        s.add_ca("root", "ec-p256", None, "root-ca", b"root-der", "")
        s.add_ca("sub", "ec-p256", "root", "sub-ca", b"sub-der", "")
    for i, sb in enumerate((S1, S2, S3)):
        serial = int.from_bytes(sb, "big")
        s.reserve([(serial, "root", None)])
        with s.tx():
            s.store_issued(serial, "root", "ocsp-responder" if i == 0 else "tls-server", f"CN=s{i}", 1, 1000 + i, b"der%d" % i,
                           None, bytes([i]) * 32, "")
    with s.tx():
        s.add_revocation("root", S2, 50, 1, None, 20)
    yield s
    for c in (s.db, s.reader):
        if c is not None:
            c.close()


def _count(st: Store, q: str, args: tuple = ()) -> int:
    return st.db.db.execute(q, args).fetchone()[0]


def test_tenant_queries(st):
    with st.tx():
        st.tenant_add("t1", b"ca", json.dumps(["http://x/"]), 3600, "unknown", None, 7)
        st.tenant_add("a0", b"ca0", "[]", 60, "revoked", b"h" * 32, 8)
    assert [r[0] for r in st.tenant_rows()] == ["a0", "t1"]  # by name
    row = st.tenant_row("t1")
    assert row is not None and row[:6] == ("t1", b"ca", '["http://x/"]', 3600, "unknown", None) and row[15] == 0
    assert st.tenant_row("nope") is None and st.tenant_crl_and_serials("nope") == (None, None)
    assert st.tenant_crl_is("t1", b"crl") is False  # no CRL yet: NULL compares as not equal
    with st.tx():
        st.tenant_set_refusal("t1", "123 fetch: bad signature")
        st.tenant_set_crl("t1", 5, 100, 200, b"crl", "cli:alice", 150)
        st.tenant_set_serials("t1", b"serials")
        st.tenant_set_key("t1", "lbl", b"spki")
        st.tenant_update("t1", {"refresh_seconds": 60, "unissued": "revoked"})
    row = st.tenant_row("t1")
    assert row[3:5] == (60, "revoked") and row[6:8] == ("lbl", b"spki") and row[10:15] == (5, 100, 200, "cli:alice", 150)
    assert row[15] == 1 and row[16] is None  # serials present; the accepted CRL cleared the last refusal
    assert st.tenant_crl_is("t1", b"crl") and not st.tenant_crl_is("t1", b"other")
    assert st.tenant_crl_and_serials("t1") == (b"crl", b"serials")
    # A column name goes into the SQL text: only the settable ones pass, and nothing is written otherwise.
    for bad in ({"crl_der": b"x"}, {"name=name; --": 1}, {}):
        with pytest.raises(ValueError):
            with st.tx():
                st.tenant_update("t1", bad)
    assert st.tenant_crl_and_serials("t1") == (b"crl", b"serials")
    with st.tx():
        st.tenant_set_serials("t1", None)
        st.tenant_remove("a0")
    assert st.tenant_row("t1")[15] == 0 and st.tenant_row("a0") is None
    assert sorted(st.ca_certs()) == [("root", b"root-der"), ("sub", b"sub-der")]


def test_enrol_secret_queries(st):
    with st.tx():
        st.enrol_secret_add("est-1", "est", b"d1", "root", "tls-server", "*.example", 2, 500, 10, "officer:alice", True)
        st.enrol_secret_add("scep-1", "scep", b"d2", "root", "tls-server", None, 1, 500, 11, "officer:bob", False)
    assert st.enrol_secret_exists("est-1") and not st.enrol_secret_exists("x")
    assert st.enrol_secret_ref(b"d1", "est") == "est-1" and st.enrol_secret_ref(b"d1", "scep") is None
    assert st.enrol_secret_by_digest(b"d1") == ("est-1", "est", "root", "tls-server", "*.example", 2, 500, 0, 1, "officer:alice")
    assert st.enrol_secret_by_digest(b"nope") is None
    with st.tx():
        assert st.enrol_secret_use("est-1", -1) and not st.enrol_secret_use("x", -1)
        assert st.enrol_secret_use("est-1", +1)
        assert st.enrol_secret_revoke("scep-1") and not st.enrol_secret_revoke("scep-1")  # once only
    rows = st.enrol_secret_rows()
    assert [r[0] for r in rows] == ["est-1", "scep-1"] and rows[0][5] == 2 and rows[1][8] == 1


def test_ca_life_queries(st):
    assert not st.ca_requested("next") and st.ca_successor("root") is None and st.latest_base_crl("root") is None
    with st.tx() as c:
        c.execute("INSERT INTO ca_requests VALUES ('next', 'new', NULL, 'ec-p256', 'sub-ca', '', x'00', 1)")
        c.execute("INSERT INTO ca_requests VALUES ('root2', 'renew', NULL, 'ec-p256', 'sub-ca', '', x'00', 1)")
        c.execute("INSERT INTO ca_successors VALUES ('sub', 'root', 1)")
        c.executemany("INSERT INTO crl_log_marks VALUES ('root', ?, ?, 0)", [(0, 3), (0, 7), (1, 9)])
    assert st.ca_requested("next") and not st.ca_requested("root2")  # a renewal is not a CA awaiting its certificate
    assert st.ca_successor("sub") == "root"
    assert st.latest_base_crl("root") == 7  # full CRLs only (shard 0), the newest


def test_ocsp_queries(st):
    # the three issued certificates are queued; none has a response yet
    keys = st.ocsp_due_keys(now=0, batch=10)
    assert sorted(keys) == [("root", S1), ("root", S2), ("root", S3)] and len(st.ocsp_due_keys(0, 2)) == 2
    assert st.ocsp_cert_state("root", S2) == (1001, 50, 1, None) and st.ocsp_cert_state("root", S1) == (1000, None, None, None)
    assert st.ocsp_cert_state("root", b"\x7f") is None and st.ocsp_last_seq() == 0
    with st.tx():
        st.ocsp_put("root", S1, 0, 100, 200, 150, 1, b"r1", None)
        st.ocsp_put("root", S2, 1, 100, 200, 300, 2, None, b"r2")
    assert st.ocsp_last_seq() == 2 and st.ocsp_cert_state("root", S2)[3] == 100
    assert st.ocsp_due_keys(now=149, batch=10) == [("root", S3)]  # dequeued; S1 not due before its refresh time
    assert sorted(st.ocsp_due_keys(now=150, batch=10)) == [("root", S1), ("root", S3)]
    assert st.ocsp_after(0, 10) == [("root", S1, 100, 200, b"r1", None, 1), ("root", S2, 100, 200, None, b"r2", 2)]
    assert [r[6] for r in st.ocsp_after(1, 10)] == [2] and st.ocsp_after(2, 10) == []
    with st.tx():
        st.ocsp_retire("root", S1)
        st.ocsp_retire("root", S3)
    assert [r[1] for r in st.ocsp_after(0, 10)] == [S2] and st.ocsp_due_keys(10**9, 10) == [("root", S2)]
    assert st.latest_responders() == [("root", 1000)]
    with st.tx() as c:
        c.execute("INSERT INTO calendar_roots VALUES ('offline', x'01', 1)")
        c.executemany("INSERT INTO crls VALUES (?, ?, 1, 2, 0, x'', x'')", [("root", 4), ("root", 5), ("root-delta", 6),
                                                                             ("root-1", 2), ("root-1", 3)])
        c.execute("INSERT INTO crl_shard_numbers VALUES ('root', 1, 3), ('root', 2, 0)")
    assert sorted(st.published_cas()) == [("offline", b"\x01"), ("root", b"root-der"), ("sub", b"sub-der")]
    assert st.latest_crl_number("root") == 5 and st.latest_crl_number("root-delta") == 6 and st.latest_crl_number("sub") is None
    assert st.latest_shard_crls("root") == [(1, 3)]  # shard 2 has no CRL yet


def test_gateway_queries(st):
    with st.tx():
        st.eab_add("kid1", b"k" * 32, "officer:alice", 5, "tls-server", "*.example")
        st.eab_add("kid0", b"j" * 32, "officer:bob", 6, "", "")
    assert st.eab_key("kid1") == (b"k" * 32, "tls-server", "*.example", None, None) and st.eab_key("x") is None
    with st.tx():
        st.eab_bind("kid1", "acct-1", 9)
        st.eab_revoke("kid0", 10)
    assert [r[0] for r in st.eab_rows()] == ["kid1", "kid0"]  # oldest first
    assert st.eab_row("kid1")[5:] == ("acct-1", None) and st.eab_row("kid0")[6] == 10 and st.eab_row("x") is None
    with st.tx():
        st.gateway_issued_add("root", S1, "acme", "acct-1", None)
        st.gateway_issued_add("root", S1, "acme", "acct-2", "old-id")  # replaced, not doubled
        st.gateway_state_put("nonces", "n1", b"v1")
    assert st.gateway_issued_to("root", S1) == "acct-2" and st.gateway_issued_to("root", S2) is None
    assert st.gateway_state_get("nonces", "n1") == b"v1" and st.gateway_state_get("nonces", "n2") is None
    with st.tx():
        st.gateway_state_put("nonces", "n1", None)
    assert st.gateway_state_get("nonces", "n1") is None


def test_waiting_enrolment_queries(st):
    with st.tx():
        st.enrol_secret_add("s1", "est", b"d1", "root", "tls-server", None, 1, 500, 1, "officer:alice", True)
        st.waiting_add("w1", "est", "est-secret:s1", b"h1", b"req", "root", "tls-server", "est CN=a", 10)
        st.waiting_add("w2", "est", "est-secret:s1", b"h1", b"req2", "root", "tls-server", "est CN=a", 11)
        st.waiting_add("w3", "scep", "scep-secret:zz", b"h3", b"req3", "root", "tls-server", "scep CN=b", 12)
    assert st.waiting_for("est-secret:s1", b"h1") == "w2" and st.waiting_for("est-secret:s1", b"h3") is None  # the newest
    assert st.waiting_outcome("w1") == ("waiting", None, None, "root") and st.waiting_outcome("x") is None
    assert st.waiting_to_decide("w1") == ("waiting", b"req", "est-secret:s1", "root", "officer:alice")
    assert st.waiting_to_decide("w3")[4] is None  # no secret under that reference: no maker to exclude
    with st.tx():
        assert st.waiting_claim("w1", "officer:bob") and not st.waiting_claim("w1", "officer:carol")  # one decision
        st.waiting_issued("w1", b"cert")
        assert st.waiting_reject("w2", "officer:bob", "no") and not st.waiting_reject("w2", "officer:bob", "again")
        st.waiting_refused("w3", "approved, but refused by policy: x")
    assert st.waiting_outcome("w1") == ("issued", b"cert", None, "root") and st.waiting_to_decide("w1")[1] == b""
    assert st.waiting_outcome("w2")[::2] == ("rejected", "no") and st.waiting_outcome("w3")[0] == "rejected"
    assert [r[0] for r in st.waiting_rows()] == ["w3", "w2", "w1"] and st.waiting_rows(only_open=True) == []
    assert [r[0] for r in st.waiting_rows(rid="w2")] == ["w2"] and st.waiting_rows(rid="x") == []


def test_cmp_queries(st):
    with st.tx():
        st.cmp_credential_add("0001", "secret", b"pw", None, "root", "tls-server", "CN=dev", True, 2, 5, "officer:alice", 99)
        st.cmp_credential_add("ra-1", "ra", None, b"ra-der", "root", "tls-server", None, False, -1, 6, "officer:bob", 99)
    assert st.cmp_credential_exists("0001") and not st.cmp_credential_exists("x")
    assert st.cmp_secret("0001") == (b"pw", "root", "tls-server", "CN=dev", 1, 2, 99, 0, None, "officer:alice")
    assert st.cmp_secret("ra-1") is None and st.cmp_ra("0001") is None  # looked up by kind too
    assert st.cmp_ra("ra-1") == ("root", "tls-server", None, 0, 99, None, "officer:bob", b"ra-der")
    with st.tx():
        st.cmp_failure("0001")
        st.cmp_failure("0001")
    assert st.cmp_secret("0001")[7] == 2
    with st.tx():
        st.cmp_reset_failures("0001")
        assert st.cmp_take_use("0001") and st.cmp_take_use("0001") and not st.cmp_take_use("0001")  # two uses, no third
        st.cmp_give_back_use("0001")
        assert not st.cmp_take_use("ra-1")  # uncounted (-1): nothing to take
        st.cmp_give_back_use("ra-1")  # ... and nothing to give back
    assert st.cmp_secret("0001")[5:8] == (1, 99, 0) and st.cmp_ra("ra-1") is not None
    assert [r[6] for r in st.cmp_credential_rows()] == [1, -1]
    with st.tx():
        assert st.cmp_credential_revoke("ra-1", 50) and not st.cmp_credential_revoke("ra-1", 51)
        r1 = st.cmp_request_add("0001", "root", "tls-server", b"spki", "CN=dev", "", 7)
        r2 = st.cmp_request_add("0001", "root", "tls-server", b"spki2", "CN=dev2", "dns:a", 8)
    assert r2 == r1 + 1 and st.cmp_ra("ra-1")[5] == 50
    assert st.cmp_request_to_decide(r1) == ("0001", "root", "tls-server", b"spki", "CN=dev", "", "waiting", "officer:alice")
    assert [r[0] for r in st.cmp_request_rows(True)] == [r2, r1] and st.cmp_request_to_decide(999) is None
    with st.tx():
        st.cmp_request_close(r1, "issued", "officer:bob", "", S1)
        st.cmp_request_close(r1, "rejected", "officer:carol", "late", None)  # decided already: no change
        st.cmp_request_close(r2, "rejected", "officer:bob", "no", None)
    assert st.cmp_request_outcome(r1) == ("0001", "root", "issued", "", b"der0")  # with the certificate
    assert st.cmp_request_outcome(r2) == ("0001", "root", "rejected", "no", None) and st.cmp_request_rows(True) == []
    with st.tx():
        st.cmp_issued_add("root", S1, "0001")
    assert st.cmp_issued_by_serial(S1) == ("root", "0001") and st.cmp_issued_ref("root", S1) == "0001"
    assert st.cmp_issued_by_serial(S3) is None and st.cmp_issued_ref("sub", S1) is None
    assert st.issued_by_serial(S1) == ("root", "ocsp-responder", b"der0", None)
    assert st.issued_by_serial(S2) == ("root", "tls-server", b"der1", S2) and st.issued_by_serial(b"\x7f") is None


def test_dist_queries(st):
    with st.tx():
        for rule, action, ref, number in [("ldap", "ca-cert", None, 0), ("ldap", "crl", None, 3), ("ldap", "crl", None, 4),
                                          ("ldap", "crl", b"-delta", 5), ("gone", "cert", S1, 0), ("ldap", "cert", S3, 0)]:
            st.dist_job_add(rule, action, "root", ref, number, 100)
        st.dist_park_unconfigured(["ldap"])
    assert st.dist_backlog() == {"ldap": 5}
    assert st.dist_ever("ldap", "crl", "root") and st.dist_ever("ldap", "crl", "root", b"-delta")
    assert not st.dist_ever("ldap", "crl", "root", b"-1") and not st.dist_ever("ldap", "crl", "sub")
    pend = st.dist_pending("ldap", 0, 10)
    assert [p[1] for p in pend] == ["ca-cert", "crl", "crl", "crl", "cert"] and st.dist_pending("ldap", pend[2][0], 10) == pend[3:]
    crl3, crl4, delta = pend[1], pend[2], pend[3]
    assert st.dist_newer_pending("ldap", "crl", "root", None, 3) and not st.dist_newer_pending("ldap", "crl", "root", None, 4)
    assert not st.dist_newer_pending("ldap", "crl", "root", b"-delta", 5)  # a delta is superseded by a newer delta only
    with st.tx():
        st.dist_supersede([crl3[0]], 200)
        st.dist_done(crl4[0], 201)
        st.dist_failed(delta[0], 202, "ldap down", park=False)
        st.dist_failed(pend[0][0], 203, "refused", park=True)
        st.audit_in_tx("factory:distribution", "dist-park", "ldap/1", "failed", "x")
    assert st.dist_job(delta[0]) == (1, "ldap", "crl", "root") and st.dist_job(10**6) is None
    assert sorted(st.dist_counts()) == [("gone", "parked", 1, 100), ("ldap", "parked", 1, 100), ("ldap", "pending", 2, 100)]
    assert st.dist_last_done("ldap") == 201 and st.dist_last_done("gone") is None
    assert st.dist_last_error("ldap") == ("refused", 203) and st.dist_last_error("gone") == ("rule no longer configured", None)
    assert [j[0] for j in st.dist_jobs("parked", None, 10)] == [5, pend[0][0]] and st.dist_jobs("parked", "gone", 1)[0][1] == "gone"
    with st.tx():
        assert st.dist_unpark("ldap", None) == 1 and st.dist_unpark(None, 5) == 1 and st.dist_unpark(None, None) == 0
        st.dist_prune(201)  # superseded at 200: gone; done at 201: kept
    assert st.dist_backlog() == {"ldap": 3, "gone": 1} and [j[0] for j in st.dist_jobs("done", None, 10)] == [crl4[0]]
    assert st.dist_jobs("superseded", None, 10) == [] and st.dist_pending("ldap", 0, 10)[0][0] == pend[0][0]
    # what a job publishes
    assert sorted(st.ca_names()) == ["root", "sub"]
    assert st.ca_cert_and_parent("sub") == (b"sub-der", "root") and st.ca_cert_and_parent("x") is None
    assert st.cert_der("root", S3) == b"der2" and st.cert_der("sub", S3) is None
    assert st.unrevoked_certs("root") == [(S1, "ocsp-responder"), (S3, "tls-server")]
    assert st.latest_checkpoint() is None and st.latest_serials_list_number("root") is None
    with st.tx() as c:
        c.execute("INSERT INTO crls VALUES ('root-delta', 5, 1, 2, 0, x'', x'0d')")
        c.execute("INSERT INTO serials_lists VALUES ('root', 2, 1, 2, 0, x'', x'5e')")
        st.add_checkpoint(1, 2, b"head", b"tbs1", b"sig1")
        st.add_checkpoint(3, 4, b"head", b"tbs2", b"sig2")
    assert st.signed_list_der("crl", "root-delta", 5) == b"\x0d" and st.signed_list_der("crl", "root", 5) is None
    assert st.signed_list_der("issued-serials", "root", 2) == b"\x5e" and st.latest_serials_list_number("root") == 2
    assert st.latest_checkpoint() == (b"tbs2", b"sig2")
    with pytest.raises(KeyError):  # a table name goes into the SQL text: only the two kinds of signed list
        st.signed_list_der("certs", "root", 1)


def test_officer_queries(st):
    with st.tx():
        st.officer_add("alice", "administrator", "argon2id$a", 10)
        st.officer_add("bob", "operator,administrator", "argon2id$b", 11)
        st.officer_add("carol", "auditor", "argon2id$c", 12)
    assert st.officers_exist() and st.officer_exists("bob") and not st.officer_exists("x")
    assert st.officer_login_row("alice") == ("administrator", "argon2id$a", None, 0, 0, 0) and st.officer_login_row("x") is None
    with st.tx():
        assert st.officer_failed("alice") == 1 and st.officer_failed("alice") == 2
        st.officer_logged_in("bob", 40)
        st.officer_logged_in("bob", 39)  # an older step never moves the replay floor back
    assert st.officer_login_row("alice")[4] == 2 and st.officer_login_row("bob")[3] == 40
    assert st.other_administrators("alice") == 1 and st.other_administrators("bob") == 1 and st.other_administrators("carol") == 2
    with st.tx():
        assert st.officer_set_totp("carol", b"secret") and not st.officer_set_totp("x", None)
        assert st.officer_set_password("carol", "argon2id$new", 20)
        st.db.db.execute("UPDATE officers SET locked=1, failures=9 WHERE name='alice'")
        assert st.officer_unlock("alice")
        assert st.officer_unlock("carol", "argon2id$glass", 30) and not st.officer_unlock("x")
    assert st.officer_login_row("alice")[4:] == (0, 0) and st.officer_login_row("carol")[:3] == ("auditor", "argon2id$glass", b"secret")
    assert st.officer_rows() == [("alice", "administrator", 0, 0, 0, 10), ("bob", "operator,administrator", 0, 0, 0, 11),
                                 ("carol", "auditor", 1, 0, 0, 12)]
    with st.tx():
        assert st.officer_remove("carol") and not st.officer_remove("carol")
    assert [r[0] for r in st.officer_rows()] == ["alice", "bob"]


def test_dual_control_queries(st):
    with st.tx():
        p1 = st.pending_add("revoke-ca", "revoke ca=sub", b"req1", "alice", 100, 200)
        p2 = st.pending_add("officer-add", "officer-add name=x password=***", b"req2", "bob", 101, 150)
    assert st.pending_row(p1) == ("revoke-ca", b"req1", "alice", "open") and st.pending_row(999) is None
    assert st.approvers(p1) == ["alice"] and st.approved_by(p1, "alice") and not st.approved_by(p1, "bob")
    assert [r[0] for r in st.pending_rows(True)] == [p2, p1]
    assert st.pending_expired(149) == [] and st.pending_expired(150) == [(p2, "officer-add")]
    with st.tx():
        st.pending_expire(p2)
        st.approval_add(p1, "bob", 100)  # the same second as alice's: the order they came in decides
        assert st.pending_start(p1) and not st.pending_start(p1)  # runs once
    assert st.approvers(p1) == ["alice", "bob"] and st.pending_row(p2)[1::2] == (b"", "expired")
    with st.tx():
        st.pending_close(p1, "done", json.dumps({"revoked": "sub"}))
    assert st.pending_row(p1) == ("revoke-ca", b"", "alice", "done")  # the request (a password?) dropped
    assert st.pending_rows(False)[1][6:] == ("done", '{"revoked": "sub"}') and st.pending_rows(True) == []
    assert _count(st, "SELECT count(*) FROM approvals") == 3

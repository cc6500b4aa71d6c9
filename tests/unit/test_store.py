"""The Factory storage layer against a real encrypted CMDB in tmp_path: serials, issued certificates,
voids, CRL numbering (also across a reopen), revocation pages, the activation check."""

from __future__ import annotations

import os

import apsw
import pytest
import trio

from appliance.factory.cmdb import CmdbError, serial_bytes
from appliance.factory.errors import FactoryError
from appliance.factory.store import Store

KEY = os.urandom(32)


def _open(path: str, create: bool = False) -> Store:
    st = Store()
    trio.run(st.open, path, KEY, "chacha20", create)
    return st


def _close(st: Store) -> None:
    for c in (st.db, st.reader):
        if c is not None:
            c.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "cmdb.sqlite")


@pytest.fixture
def st(path):
    s = _open(path, create=True)
    with s.tx():
        s.add_ca("root", "ec-p256", None, "root-ca", b"root-der", "")
    yield s
    _close(s)


def _issue(st: Store, serial: int, ca: str = "root") -> None:
    st.reserve([(serial, ca, b"csr")])
    with st.tx():
        st.store_issued(serial, ca, "tls-server", f"CN=s{serial:x}", 1, 2, b"der-%x" % serial, b"csr", b"\0" * 32, "")


def _revoke(st: Store, serial: int, reason: int | None = 1) -> None:
    with st.tx() as c:
        c.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", ("root", serial_bytes(serial), 100, reason, None, 20))


def test_inactive_store_refuses_everything():
    s = Store()
    for call in (s.require_active, s.ca_count, lambda: s.reserve([(1 << 64, "root", None)]),
                 lambda: s.next_list_number("root", "crl"), lambda: s.list_page("root", "crl", b"", 10)):
        with pytest.raises(FactoryError) as e:
            call()
        assert e.value.code == "inactive"
    with pytest.raises(FactoryError, match="not activated"):
        trio.run(s.run, lambda: 1)
    trio.run(s.audit, "alice", "x", "y", "ok")  # nothing to write to: a no-op, not an error


def test_reserve_then_store_issued_then_void(st):
    a, b = (1 << 64) + 5, (1 << 64) + 6
    st.reserve([(a, "root", b"csr-a"), (b, "root", None)])
    assert st.serial_state(a) == st.serial_state(b) == "intent"
    with st.tx():
        assert st.store_issued(a, "root", "tls-server", "CN=a", 1, 2, b"der-a", b"csr-a", b"\1" * 32, "a.example") == serial_bytes(a)
    assert st.serial_state(a) == "issued"
    c = st.db.db
    assert c.execute("SELECT subject, der FROM certs WHERE serial=?", (serial_bytes(a),)).fetchone() == ("CN=a", b"der-a")
    assert c.execute("SELECT count(*) FROM ocsp_queue WHERE serial=?", (serial_bytes(a),)).fetchone()[0] == 1
    # An issued serial is not an open intent: storing it twice fails and the transaction rolls back whole.
    with pytest.raises(CmdbError, match="not an open intent"):
        with st.tx():
            st.store_issued(a, "root", "tls-server", "CN=a", 1, 2, b"der-a", None, b"\1" * 32, "")
    st.void([b], "alice", "issue", "the CIS refused")
    assert st.serial_state(b) == "void"
    with pytest.raises(CmdbError, match="not an open intent"):  # a voided serial never becomes a certificate
        with st.tx():
            st.store_issued(b, "root", "tls-server", "CN=b", 1, 2, b"der-b", None, b"\2" * 32, "")
    last = c.execute("SELECT actor, action, object, outcome, detail FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    assert last == ("alice", "issue", f"{b:x}", "refused", "the CIS refused")
    assert c.execute("SELECT count(*) FROM certs").fetchone()[0] == 1


def test_a_serial_is_never_reserved_twice(st):
    s = (1 << 64) + 7
    st.reserve([(s, "root", None)])
    st.void([s], "factory", "issue", "refused")
    assert st.serial_state(s) == "void"  # spent in every state: void here, intent and issued below
    with pytest.raises(apsw.ConstraintError):
        st.reserve([((1 << 64) + 8, "root", None), (s, "root", None)])
    # The whole batch failed: the good serial before the duplicate was not reserved either.
    assert st.serial_state((1 << 64) + 8) is None
    st.reserve([((1 << 64) + 10, "root", None)])
    _issue(st, (1 << 64) + 9)
    for spent in ((1 << 64) + 9, (1 << 64) + 10):
        with pytest.raises(apsw.ConstraintError):
            st.reserve([(spent, "root", None)])


def test_reconcile_voids_open_intents_with_an_audit_record(st):
    _issue(st, (1 << 64) + 1)
    st.reserve([((1 << 64) + 2, "root", None)])
    assert st.reconcile("factory") == 1
    assert st.serial_state((1 << 64) + 1) == "issued" and st.serial_state((1 << 64) + 2) == "void"
    assert st.db.db.execute("SELECT outcome FROM audit WHERE action='reconcile'").fetchall() == [("voided",)]
    assert st.reconcile("factory") == 0


def test_list_numbers_are_never_reused_also_across_a_reopen(path, st):
    assert [st.next_list_number("root", "crl") for _ in range(3)] == [1, 2, 3]
    assert st.next_list_number("root", "issued-serials") == 1  # its own counter
    with pytest.raises(FactoryError, match="no CA named"):
        st.next_list_number("nobody", "crl")
    with st.tx():
        st.store_signed_list("crl", "root", 2, 10, 20, 0, [b"ab", b"cd"], 4)
        # Given back only when it is the latest and nothing is stored under it (the CIS refused to sign).
        assert not st.give_back_list_number("root", "crl", 2)
        assert st.give_back_list_number("root", "crl", 3)
    assert st.next_list_number("root", "crl") == 3
    assert st.next_list_number("root", "crl") == 4
    with st.tx():
        assert not st.give_back_list_number("root", "crl", 3)  # a later number is out: 3 stays spent
    # Number 4 was handed out and never stored nor given back (say the CIS stopped answering and may
    # yet sign): it is spent for good, also after a reopen.
    _close(st)
    again = _open(path)
    try:
        assert again.next_list_number("root", "crl") == 5
        assert again.next_list_number("root", "issued-serials") == 2
        with pytest.raises(apsw.ConstraintError):  # a number already stored cannot be stored again
            with again.tx():
                again.store_signed_list("crl", "root", 2, 10, 20, 0, [b"x"], 1)
    finally:
        _close(again)


def test_store_signed_list_streams_and_hashes(st):
    import hashlib
    n = st.next_list_number("root", "crl")
    with st.tx():
        digest = st.store_signed_list("crl", "root", n, 10, 20, 7, [b"pre", b"x" * 5000, b"suf"], 5006)
    assert digest == hashlib.sha256(b"pre" + b"x" * 5000 + b"suf").digest()
    row = st.db.db.execute("SELECT entries, sha256, der FROM crls WHERE ca='root' AND number=?", (n,)).fetchone()
    assert row == (7, digest, b"pre" + b"x" * 5000 + b"suf")
    with pytest.raises(CmdbError, match="announced"):  # fewer bytes than announced: nothing stored
        with st.tx():
            st.store_signed_list("crl", "root", n + 1, 10, 20, 0, [b"ab"], 3)
    assert st.db.db.execute("SELECT count(*) FROM crls").fetchone()[0] == 1


def test_revocation_pages_in_serial_order_from_one_snapshot(st):
    serials = [(1 << 64) + i * 7919 for i in range(25)]
    for s in reversed(serials):
        _issue(st, s)
        _revoke(st, s)
    assert st.list_snapshot_begin("root", "crl") == (25, 25 * 20)
    st.list_snapshot_end()
    pages = st.revocation_pages("root", 10)
    first = next(pages)
    assert [len(first)] == [10] and first[0] == (serial_bytes(serials[0]), 100, 1, None)
    _issue(st, (1 << 70))  # written while the reader is in its snapshot: not in this list
    _revoke(st, (1 << 70))
    rest = [r for p in pages for r in p]
    got = [int.from_bytes(r[0], "big") for r in first + rest]
    assert got == serials
    # The next snapshot sees it; the issued-serials list counts every issued serial, revoked or not.
    assert st.list_snapshot_begin("root", "crl")[0] == 26
    assert [r[0] for r in st.list_page("root", "issued-serials", serial_bytes(serials[-1]), 10)] == [serial_bytes(1 << 70)]
    st.list_snapshot_end()
    count, length = st.list_snapshot_begin("root", "issued-serials")
    st.list_snapshot_end()
    assert count == 26 and length == sum(len(serial_bytes(s)) + 2 + (serial_bytes(s)[0] >= 0x80) for s in serials + [1 << 70])


def test_ca_rows_and_audit_on_the_db_thread(st):
    with st.tx():
        st.add_ca("sub", "rsa-3072", "root", "sub-ca", b"sub-der", "")
    assert st.ca_count() == 2
    assert st.ca_row("sub") == ("sub", "rsa-3072", "root", "sub-ca", b"sub-der")
    assert st.ca_row("nope") is None and st.ca_policy_row("nope") is None
    assert [r[0] for r in st.ca_rows()] == ["root", "sub"]
    with pytest.raises(apsw.ConstraintError):
        with st.tx():
            st.add_ca("sub", "rsa-3072", "root", "sub-ca", b"other", "")
    trio.run(st.audit, "bob", "ca-show", "sub", "ok")
    assert st.db.db.execute("SELECT actor, action FROM audit ORDER BY seq DESC LIMIT 1").fetchone() == ("bob", "ca-show")


def test_checkpoint_rows_audit_head_and_a_consistent_copy(path, st, tmp_path):
    from appliance.factory.cmdb import Cmdb
    from policy.audit import GENESIS
    assert st.audit_head() == (0, GENESIS)  # an empty log
    trio.run(st.audit, "alice", "login", "alice", "ok")
    seq, head = st.audit_head()
    assert seq == 1 and head != GENESIS and st.audit_moved_since_checkpoint()
    with st.tx():
        st.add_checkpoint(seq, 5, head, b"tbs-1", b"sig-1")
        st.audit_in_tx("factory", "audit-checkpoint", f"seq={seq}", "ok")
    assert not st.audit_moved_since_checkpoint()  # the checkpoint's own record does not count
    trio.run(st.audit, "bob", "login", "bob", "ok")
    assert st.audit_moved_since_checkpoint()
    with st.tx():
        st.add_checkpoint(seq + 2, 6, st.audit_head()[1], b"tbs-2", b"sig-2")
    assert st.checkpoints() == [(b"tbs-1", b"sig-1"), (b"tbs-2", b"sig-2")]
    assert st.checkpoints(latest_only=True) == [(b"tbs-2", b"sig-2")]
    # The backup copy: the WAL folded in, the encrypted pages as they are, opening with the same key.
    with open(tmp_path / "copy.sqlite", "wb") as out:
        n, sha, cseq, chead = st.copy_consistent(path, out, 4096)
    assert (cseq, chead) == st.audit_head() and n == os.path.getsize(tmp_path / "copy.sqlite")
    assert b"SQLite format 3" not in (tmp_path / "copy.sqlite").read_bytes()[:100]  # still encrypted
    copy = Cmdb(str(tmp_path / "copy.sqlite"), KEY)
    try:
        assert copy.db.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 2
    finally:
        copy.close()


def test_crls_due_and_stored_lists_read_back_in_pieces(st):
    with st.tx():
        st.add_ca("sub", "ec-p256", "root", "sub-ca", b"sub-der", "")
    assert st.crls_due(1000) == {"root", "sub"}  # none signed yet
    with st.tx():
        st.store_signed_list("crl", "root", 1, 1000, 2000, 0, [b"0123456789"], 10)
    assert st.crls_due(1499) == {"sub"} and st.crls_due(1500) == {"root", "sub"}  # half of the validity gone
    rowid, size = st.signed_list_blob("crls", "root", None)
    assert size == 10 and st.read_blob("crls", rowid, 3, 4) == b"3456"
    assert st.signed_list_blob("crls", "root", 2) is None and st.signed_list_blob("serials_lists", "root", None) is None
    with pytest.raises(ValueError, match="no signed-list table"):  # a table name is never taken from outside
        st.signed_list_blob("audit; --", "root", None)


def test_cert_row_and_ocsp_summary(st):
    s = (1 << 64) + 42
    _issue(st, s)
    assert st.cert_row("root", s) == ("tls-server", f"CN=s{s:x}", 1, 2, st.cert_row("root", s)[4], b"der-%x" % s, None, None)
    _revoke(st, s, reason=4)
    assert st.cert_row("root", s)[6:] == (100, 4)
    assert st.cert_row("root", s + 1) is None and st.cert_row("sub", s) is None
    assert st.ocsp_summary() == ([], {"root": 1})  # queued at issuance, no response signed yet
    with st.tx() as c:
        c.execute("INSERT INTO ocsp VALUES (?,?,?,?,?,?,?,?,?)", ("root", serial_bytes(s), 1, 10, 20, 15, 1, None, None))
    assert st.ocsp_summary() == ([("root", 1, 1, 10, 20, 15)], {"root": 1})


def test_named_queries_of_the_split_factory(st):
    """cert_list filters (LIKE wildcards literal), uniqueness lookups, revocation rows, status counts,
    reconciled intents: the queries the Factory's modules ask by name instead of writing SQL."""
    a, b, c = (1 << 64) + 21, (1 << 64) + 22, (1 << 64) + 23
    st.reserve([(a, "root", None), (b, "root", None), (c, "root", None)])
    with st.tx():
        st.store_issued(a, "root", "tls-server", "CN=www_1%", 1, 2**33, b"der-a", None, b"\1" * 32, "www.example.org")
        st.store_issued(b, "root", "user-auth", "CN=wwwX1", 1, 2, b"der-b", None, b"\2" * 32, "")
    rows = st.cert_list(None, None, "_1%", None, None, None, 10, now=100)
    assert [r[3] for r in rows] == ["CN=www_1%"]  # `_` and `%` matched literally, not as wildcards
    assert {r[3] for r in st.cert_list("root", None, None, None, "expired", None, 10, now=100)} == {"CN=wwwX1"}
    assert [r[2] for r in st.cert_list(None, "user-auth", None, None, None, None, 10, now=100)] == ["user-auth"]
    assert len(st.cert_list(None, None, None, "example.org", "valid", 30, 10, now=2**33 - 86400)) == 1
    assert st.cert_list(None, None, None, None, None, None, 1, now=100)[0][3] in ("CN=www_1%", "CN=wwwX1")  # limit
    assert st.cert_with_key(b"\1" * 32) == ("root", serial_bytes(a)) and st.cert_with_key(b"\7" * 32) is None
    assert st.valid_cert_for_other_key("root", "CN=www_1%", b"\3" * 32, 100) == serial_bytes(a)
    assert st.valid_cert_for_other_key("root", "CN=www_1%", b"\1" * 32, 100) is None  # same key: not another
    assert st.cert_profile("root", serial_bytes(a)) == "tls-server" and st.cert_profile("root", serial_bytes(c)) is None
    with st.tx():
        st.add_revocation("root", serial_bytes(a), 50, 6, None, 20)
    assert st.revocation("root", serial_bytes(a)) == (50, 6, None)
    assert st.valid_cert_for_other_key("root", "CN=www_1%", b"\3" * 32, 100) is None  # revoked: no longer valid
    with st.tx():
        st.change_revocation("root", serial_bytes(a), 1, 40, 25)
    assert st.revocation("root", serial_bytes(a)) == (50, 1, 40)  # the date of the hold is kept
    assert [r[5] is not None for r in st.cert_list(None, None, "www_1", None, "revoked", None, 10, now=100)] == [True]
    with st.tx():
        st.delete_revocation("root", serial_bytes(a))
    assert st.revocation("root", serial_bytes(a)) is None
    q = st.db.db.execute("SELECT count(*) FROM ocsp_queue WHERE serial=?", (serial_bytes(a),)).fetchone()[0]
    assert q == 1  # each change queued its OCSP response (once: the queue is a set)
    cas, certs, revoked, n_audit, head = st.status_counts()
    assert (cas, certs, revoked) == (["root"], 2, 0) and head is None and n_audit == 0
    assert st.ca_report_rows() == [("root", "ec-p256", b"root-der", 0, None, 2, 0)]
    assert st.ca_name_taken("root") and not st.ca_name_taken("other")
    assert st.reconcile("factory") == 1  # c: an intent left open
    assert [r[2] for r in st.reconciled()] == [f"root/{c:x}"]
    assert st.status_counts()[3] == 1 and len(st.status_counts()[4]) == 64


def test_ceremony_queries_read_the_audit_chain(st):
    with st.tx():
        begin = st.audit_in_tx("officer:alice x", "ceremony-begin", "m-1", "ok", "window from login seq=1")
        w = st.audit_in_tx("officer:bob y", "ceremony-witness", f"ceremony#{begin}", "ok", "m-1; login seq=2")
        st.audit_in_tx("officer:eve z", "ceremony-witness", f"ceremony#{begin}", "refused", "late")
        op = st.audit_in_tx("officer:bob y", "ca-create", "x", "ok", "")
    assert st.ceremony_opening(begin) == ("m-1", "window from login seq=1") and st.ceremony_opening(w) is None
    assert [(r[0], r[2]) for r in st.ceremony_witnesses(begin)] == [(w, "officer:bob y")]  # refused ones are no witness
    assert [r[0] for r in st.audit_rows_after(begin, 10)] == [w, w + 1, op] and len(st.audit_rows_after(begin, 1)) == 1
    rec = st.audit_record(op)
    assert rec is not None and rec[0] == op and rec[3] == "ca-create" and rec[8] == st.audit_hash(op) and st.audit_hash(10**6) is None
    assert not st.ceremony_recorded(begin)
    with st.tx():
        st.audit_in_tx("officer:bob y", "ceremony", "m-1", "ok", f"transcript sha256=00 begin={begin} bindings sha256=11")
    assert st.ceremony_recorded(begin) and not st.ceremony_recorded(begin + 100)

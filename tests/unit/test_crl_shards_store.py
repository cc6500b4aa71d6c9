"""appliance.factory.crlshards against a real encrypted CMDB: pinned partitions, per-shard numbers, delta entries."""

from __future__ import annotations

import pytest

from appliance.factory.cmdb import serial_bytes
from appliance.factory.crlshards import CrlShards
from appliance.factory.errors import FactoryError
from tests.unit.test_store import _close, _open


@pytest.fixture
def st(tmp_path):
    s = _open(str(tmp_path / "cmdb.sqlite"), create=True)
    with s.tx():
        s.add_ca("sub", "ec-p256", None, "sub-ca", b"sub-der", "")
        s.add_ca("old", "ec-p256", None, "sub-ca", b"old-der", "")
    yield s
    _close(s)


def _issue_sharded(st, sh: CrlShards, serial: int, ca: str = "sub") -> int:
    st.reserve([(serial, ca, b"csr")])
    with st.tx() as c:
        st.store_issued(serial, ca, "tls-server", f"CN=s{serial:x}", 1, 2, b"der-%x" % serial, b"csr", b"\0" * 32, "")
        return sh.cert_issued(c, ca, serial)


def _revoke(st, serial: int, ca: str = "sub", at: int = 100) -> None:
    with st.tx() as c:
        c.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", (ca, serial_bytes(serial), at, 1, None, 20))


def test_partition_numbers_and_pages(st):
    sh = CrlShards(st, {"sub": 4})
    serials = list(range(0x1000, 0x1010))
    assert [_issue_sharded(st, sh, s) for s in serials] == [s % 4 for s in serials]
    for s in serials[::3]:
        _revoke(st, s)
    c = st.db.db
    total = 0
    for k in range(4):
        n, length = sh.shard_count(c, "sub", k)
        rows = sh.shard_page(c, "sub", k, b"", 100)
        assert n == len(rows) and length == 20 * n
        assert all(int.from_bytes(r[0], "big") % 4 == k for r in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
        total += n
    assert total == len(serials[::3])
    # all shards in one pass: what each shard's own count says (a shard with none: zero), another CA's
    # revocations not counted
    _issue_sharded(st, CrlShards(st, {"old": 4}), 0x2001, "old")
    _revoke(st, 0x2001, "old")
    assert sh.shard_counts(c, "sub", 5) == [sh.shard_count(c, "sub", k) for k in range(4)] + [(0, 0)]
    assert sum(n for n, _ in sh.shard_counts(c, "sub", 4)) == total
    page = sh.shard_page(c, "sub", 0, b"", 1)  # paging by serial, as the CRL stream reads
    assert sh.shard_page(c, "sub", 0, page[-1][0], 100) == sh.shard_page(c, "sub", 0, b"", 100)[1:]
    # each shard its own sequence, never handed out twice
    with st.tx() as c:
        assert [sh.next_number(c, "sub", 0) for _ in range(3)] == [1, 2, 3]
        assert sh.next_number(c, "sub", 3) == 1
        with pytest.raises(FactoryError, match="no CRL shard 4"):
            sh.next_number(c, "sub", 4)


def test_shard_count_is_pinned(st):
    st.reserve([(0x2000, "old", b"csr")])
    with st.tx():
        st.store_issued(0x2000, "old", "tls-server", "CN=x", 1, 2, b"der", b"csr", b"\0" * 32, "")
    # a CA that issued certificates naming its single CRL can't be split afterwards
    with pytest.raises(FactoryError, match="already issued certificates"), st.tx() as c:
        CrlShards(st, {"old": 2}).pin(c, "old")
    sh = CrlShards(st, {"sub": 2})
    _issue_sharded(st, sh, 0x3001)
    for wrong in ({"sub": 3}, {}):  # a changed or dropped setting is refused: the certificates name their shard
        with pytest.raises(FactoryError, match="pinned to 2"), st.tx() as c:
            CrlShards(st, wrong).pin(c, "sub")
    # at issuance too: a dropped setting can't issue certificates naming the single CRL of a sharded CA
    with pytest.raises(FactoryError, match="pinned to 2"):
        _issue_sharded(st, CrlShards(st, {}), 0x3003)
    one = CrlShards(st, {})  # a one-shard CA: nothing kept, nothing pinned
    assert _issue_sharded(st, one, 0x2002, "old") is None and _issue_sharded(st, one, 0x2004, "old") is None
    assert st.db.db.execute("SELECT count(*) FROM cert_shards WHERE ca='old'").fetchone()[0] == 0
    for bad in (0, 257, "4"):
        with pytest.raises(FactoryError, match="not a shard count"):
            CrlShards(st, {"sub": bad})  # type: ignore[dict-item]


def test_delta_entries_since_base(st):
    sh = CrlShards(st, {"sub": 2})
    for s in (0x4000, 0x4001, 0x4002, 0x4003):
        _issue_sharded(st, sh, s)
    _revoke(st, 0x4001)  # before deltas are on: nothing logged, no base to mark
    with st.tx() as c:
        assert c.execute("SELECT count(*) FROM revocation_log").fetchone()[0] == 0
        with pytest.raises(FactoryError, match="does not log its revocations"):
            sh.mark_base(c, "sub", 0, 1, sh.log_seq(c))
        sh.enable_deltas(c, "sub")
    _revoke(st, 0x4000)
    with st.tx() as c:
        sh.mark_base(c, "sub", 0, 1, sh.log_seq(c))
        sh.mark_base(c, "sub", 1, 1, sh.log_seq(c))
    _revoke(st, 0x4002, at=200)  # shard 0, after the base
    _revoke(st, 0x4003, at=200)  # shard 1
    with st.tx() as c:  # a hold lifted: removeFromCRL in the delta
        c.execute("DELETE FROM revocations WHERE serial=?", (serial_bytes(0x4000),))
    c = st.db.db
    present, removed = sh.delta_entries(c, "sub", 0, 1)
    assert [r[0] for r in present] == [serial_bytes(0x4002)] and removed == [serial_bytes(0x4000)]
    present, removed = sh.delta_entries(c, "sub", 1, 1)
    assert [r[0] for r in present] == [serial_bytes(0x4003)] and removed == []
    with pytest.raises(FactoryError, match="no full CRL #9"):
        sh.delta_entries(c, "sub", 0, 9)


@pytest.mark.parametrize("shards", [1, 2])
def test_delta_entries_of_certificates_known_only_by_serial(st, shards):
    """A certificate a restore knows only by its serial (recovered_certs), revoked by an officer through the
    store: its changes are logged like any other; the CA's one CRL lists it (a released hold: removeFromCRL),
    a shard never does (its shard is not known from the evidence)."""
    sh = CrlShards(st, {"sub": shards})
    _issue_sharded(st, sh, 0x5000)
    rec, held = serial_bytes(0x5001), serial_bytes(0x5003)
    with st.tx() as c:
        c.executemany("INSERT INTO recovered_certs VALUES ('sub', ?, 999, 1)", [(rec,), (held,)])
        st.add_revocation("sub", held, 50, 6, None, 20, recovered=True)  # on hold before deltas
        sh.enable_deltas(c, "sub")
        for k in range(shards):
            sh.mark_base(c, "sub", k, 1, sh.log_seq(c))
    with st.tx() as c:
        st.add_revocation("sub", rec, 300, 1, None, 20, recovered=True)
        st.delete_revocation("sub", held, recovered=True)
        assert c.execute("SELECT count(*) FROM ocsp_queue WHERE serial IN (?,?)", (rec, held)).fetchone()[0] == 2
    assert st.revocation("sub", rec, recovered=True) == (300, 1, None) and st.revocation("sub", rec) is None
    assert st.recovered_cert("sub", rec) and not st.recovered_cert("sub", serial_bytes(0x5000))
    c = st.db.db
    got = [sh.delta_entries(c, "sub", k, 1) for k in range(shards)]
    # by serial, as every certificate's CRL DP names its shard: 0x5001 and 0x5003 are both in shard 1 of 2
    assert [r[:3] for r in got[-1][0]] == [(rec, 300, 1)] and got[-1][1] == [held]
    assert shards == 1 or got[0] == ([], [])
    with st.tx():  # a hold made permanent: logged again, the new reason read
        st.add_revocation("sub", held, 400, 6, None, 20, recovered=True)
        st.change_revocation("sub", held, 1, None, 20, recovered=True)
    assert st.revocation("sub", held, recovered=True) == (400, 1, None)
    assert [r[:3] for r in sh.delta_entries(c, "sub", shards - 1, 1)[0]] == [(rec, 300, 1), (held, 400, 1)]


def test_shards_carry_revocations_of_certificates_known_only_by_serial(st):
    """A sharded CA's recovered revocations (no cert_shards row: their body is unknown) are counted in and
    paged with the shard their serial names, merged in serial order with the others."""
    sh = CrlShards(st, {"sub": 4})
    issued = list(range(0x6000, 0x6010))
    for s in issued:
        _issue_sharded(st, sh, s)
    for s in issued[::2]:
        _revoke(st, s)
    recovered = [0x6011, 0x6015, 0x6104, 0x60ff01]  # shards 1, 1, 0, 1
    with st.tx():
        for s in recovered:
            st.db.db.execute("INSERT INTO recovered_certs VALUES ('sub', ?, 999, 1)", (serial_bytes(s),))
            st.add_revocation("sub", serial_bytes(s), 100, 1, None, 21, recovered=True)
    c = st.db.db
    counts = sh.shard_counts(c, "sub", 4)
    assert counts == [sh.shard_count(c, "sub", k) for k in range(4)]
    want = {k: sorted([serial_bytes(s) for s in issued[::2] if s % 4 == k] + [serial_bytes(s) for s in recovered if s % 4 == k])
            for k in range(4)}
    for k in range(4):
        assert counts[k][0] == len(want[k])
        assert counts[k][1] == 20 * sum(1 for s in issued[::2] if s % 4 == k) + 21 * sum(1 for s in recovered if s % 4 == k)
        paged, after = [], b""
        while page := sh.shard_page(c, "sub", k, after, 2):  # two at a time: the merge respects the page bounds
            assert len(page) <= 2 and all(len(r) == 4 for r in page)
            paged += [r[0] for r in page]
            after = page[-1][0]
        assert paged == want[k], k
    assert sh.recovered(c, "sub", 1) and sh.recovered(c, "sub", 3) == []


def test_log_pruned_once_every_shard_has_a_later_base(st):
    sh = CrlShards(st, {"sub": 2})
    with st.tx() as c:
        sh.enable_deltas(c, "sub")
    for s in (0x5000, 0x5001):
        _issue_sharded(st, sh, s)
        _revoke(st, s)
    with st.tx() as c:
        sh.mark_base(c, "sub", 0, 1, sh.log_seq(c))
        assert sh.prune_log(c, "sub") == 0  # shard 1 has no base yet: its delta would need the rows
        sh.mark_base(c, "sub", 1, 1, sh.log_seq(c))
        assert sh.prune_log(c, "sub") == 2
    _issue_sharded(st, sh, 0x5004)
    _revoke(st, 0x5004)  # a revocation after both bases stays for the next delta
    with st.tx() as c:
        assert sh.prune_log(c, "sub") == 0
        assert c.execute("SELECT count(*) FROM revocation_log WHERE ca='sub'").fetchone()[0] == 1


def test_ca_names_colliding_with_shards_or_deltas(st):
    from appliance.factory.crlshards import name_collision
    sh = CrlShards(st, {"sub": 4})
    _issue_sharded(st, sh, 0x2000)  # "sub" pinned to 4 shards
    c = st.db.db
    for name in ("sub-0", "sub-3", "sub-17"):  # pinned: refused even if the setting went away
        why = name_collision(c, name, {}, {})
        assert why and "CRL shard name of CA 'sub'" in why and "\n" not in why
    assert "shard name of CA 'next'" in name_collision(c, "next-1", {"next": 2}, {})  # configured, nothing issued yet
    assert "delta CRL name of CA 'old'" in name_collision(c, "old-delta", {}, {"old": 60})
    for name in ("old-1", "sub", "sub-01", "sub-delta", "sub-x", "sub-1a", "next-1", "a-b-c"):  # nothing collides
        assert name_collision(c, name, {"next": 1}, {"old": 60}) is None, name


def test_shards_or_deltas_refused_for_a_ca_whose_names_are_taken(st):
    with st.tx():
        for name in ("new", "new-1", "new-delta", "neu", "neu-01", "neu-x"):
            st.add_ca(name, "ec-p256", None, "sub-ca", f"{name}-der".encode(), "")
    c = st.db.db
    with pytest.raises(FactoryError, match="a CA is named 'new-1', a shard name of new") as e:
        with st.tx():
            CrlShards(st, {"new": 2}).pin(c, "new")
    assert "\n" not in e.value.reason
    assert c.execute("SELECT count(*) FROM crl_partition WHERE ca='new'").fetchone()[0] == 0  # nothing half-done
    with pytest.raises(FactoryError, match="a CA is named 'new-delta', the name of new's delta CRL"):
        with st.tx():
            CrlShards(st, {}).enable_deltas(c, "new")
    with st.tx():  # "neu-01" and "neu-x" are no shard names (shards are neu-0, neu-1, ...); no CA "neu-delta"
        assert CrlShards(st, {"neu": 2}).pin(c, "neu") == 2
        CrlShards(st, {}).enable_deltas(c, "neu")


def test_encoded_entries_counted_per_shard_in_one_pass(st):
    """Store.shard_der_counts: each shard's encoded entries (crl_der) in one scan, as shard_der_ready counts them."""
    with st.tx() as c:
        for serial, shard in ((1, 0), (2, 0), (3, 2), (4, None)):
            c.execute("INSERT INTO crl_der VALUES (?,?,?,?)", ("sub", serial_bytes(serial), b"\x30\x00", shard))
        c.execute("INSERT INTO crl_der VALUES (?,?,?,?)", ("old", serial_bytes(5), b"\x30\x00", 0))
    st.list_snapshot_begin("sub", "crl")
    try:
        assert st.shard_der_counts("sub") == ({0: (2, 4), 2: (1, 2)}, 0)  # no revocation behind them here: totals differ
        assert [st.shard_der_ready("sub", k, n) for k, n in ((0, 2), (1, 0), (2, 1), (0, 3))] == [True, True, True, False]
    finally:
        st.list_snapshot_end()

"""CRL shards and delta CRLs in the CMDB: pinned partitions, each certificate's shard, per-shard numbers, delta entries."""

from __future__ import annotations

import re
from typing import Any

import apsw

from policy import crl as pcrl

from .cmdb import serial_bytes, serial_int
from .errors import FactoryError
from .store import Store

# Entries of one shard (or of the unsharded CA when shard is None), as the CRL stream wants them.
_COUNT_SHARD = ("SELECT count(*), coalesce(sum(r.entry_len), 0) FROM revocations r "
                "JOIN cert_shards s ON s.serial = r.serial WHERE r.ca=? AND s.ca=? AND s.shard=?")
# Every shard's (count, length) in one pass: the CA's revocations in serial order (the outer loop, forced
# by CROSS JOIN), each one's shard looked up by serial, in order too. Counting shard by shard joined the
# other way round made a million lookups into revocations in random order (≈1.9 s at 1M entries).
_COUNT_SHARDS = ("SELECT s.shard, count(*), coalesce(sum(r.entry_len), 0) FROM revocations r "
                 "CROSS JOIN cert_shards s ON s.serial = r.serial WHERE r.ca=?1 AND s.ca=?1 GROUP BY s.shard")
_PAGE_SHARD = ("SELECT r.serial, r.revoked_at, r.reason, r.invalidity FROM cert_shards s "
               "JOIN revocations r ON r.ca = s.ca AND r.serial = s.serial "
               "WHERE s.ca=? AND s.shard=? AND s.serial > ? ORDER BY s.serial LIMIT ?")


def _row(c: apsw.Connection, q: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """The one row an aggregate (or a row just written) query returns."""
    row = c.execute(q, args).fetchone()
    assert row is not None
    return tuple(row)


_SUFFIXED = re.compile(r"^(.+)-(0|[1-9][0-9]*|delta)$")


def name_collision(c: apsw.Connection, name: str, shards_by_ca: dict[str, int], delta_cas: set[str] | dict[str, int]) -> str | None:
    """Why a new CA may not be called `name`, if it would share a CRL file name (and its stored CRLs, its
    endpoint path, its published object) with another CA's shard or delta: <other>-<k>.crl, <other>-delta.crl."""
    m = _SUFFIXED.match(name)
    if m is None:
        return None
    other, suffix = m.group(1), m.group(2)
    if suffix == "delta":
        if other in delta_cas:
            return f"CA name {name!r} is the delta CRL name of CA {other!r} ({other}-delta.crl): choose another"
        sm = re.match(r"^(.+)-(0|[1-9][0-9]*)$", other)  # <ca>-<k>-delta: a shard's delta
        if sm is not None and sm.group(1) in delta_cas and name_collision(c, other, shards_by_ca, delta_cas):
            return f"CA name {name!r} is the delta CRL name of a CRL shard of CA {sm.group(1)!r} ({name}.crl): choose another"
        return None
    row = c.execute("SELECT shards FROM crl_partition WHERE ca=?", (other,)).fetchone()
    if shards_by_ca.get(other, 1) > 1 or (row is not None and int(row[0]) > 1):
        return f"CA name {name!r} is a CRL shard name of CA {other!r} ({name}.crl): choose another"
    return None


def taken_suffix(c: apsw.Connection, ca: str, digits: bool) -> str | None:
    """An existing CA named <ca>-<k> (digits) or <ca>-delta: the file name a shard or delta of `ca` would take."""
    if not digits:
        row = c.execute("SELECT name FROM cas WHERE name=?", (f"{ca}-delta",)).fetchone()
        return str(row[0]) if row else None
    for (name,) in c.execute("SELECT name FROM cas WHERE substr(name, 1, ?) = ?", (len(ca) + 1, ca + "-")):
        if re.fullmatch(r"0|[1-9][0-9]*", name[len(ca) + 1:]):
            return str(name)
    return None


class CrlShards:
    """The partition of each CA's CRL, by serial. `shards_by_ca` is the operator's `crl.shards`; a CA
    missing from it has one shard (a single CRL, exactly as without this module)."""

    def __init__(self, store: Store, shards_by_ca: dict[str, int]):
        for ca, n in shards_by_ca.items():
            if type(n) is not int or not 1 <= n <= 256:
                raise FactoryError("config", f"crl.shards.{ca}: {n!r} is not a shard count (1..256)")
        self.store = store
        self.wanted = dict(shards_by_ca)
        self._pinned: set[str] = set()  # one-shard CAs found pinned (to more: issuance is then refused by pin)
        self._single: set[str] = set()  # one-shard CAs found unpinned: no lookup per issuance

    def shards(self, c: apsw.Connection, ca: str) -> int:
        """The CA's pinned shard count (1 if never pinned)."""
        row = c.execute("SELECT shards FROM crl_partition WHERE ca=?", (ca,)).fetchone()
        return int(row[0]) if row else 1

    def effective(self, c: apsw.Connection, ca: str) -> int:
        """The shard count CRLs are cut by: the pinned one, else the configured one (nothing issued yet)."""
        row = c.execute("SELECT shards FROM crl_partition WHERE ca=?", (ca,)).fetchone()
        return int(row[0]) if row else self.wanted.get(ca, 1)

    def pin(self, c: apsw.Connection, ca: str, issuing: bytes = b"") -> int:
        """Inside tx(), before a certificate of `ca` is issued: fix the CA's shard count. Once certificates
        name their shards, a different count in the configuration is refused (their CRL DPs can't change)."""
        want = self.wanted.get(ca, 1)
        row = c.execute("SELECT shards FROM crl_partition WHERE ca=?", (ca,)).fetchone()
        if row is None:
            # any certificate but the one being issued in this transaction
            issued = c.execute("SELECT 1 FROM certs WHERE ca=? AND serial != ? LIMIT 1", (ca, issuing)).fetchone()
            if issued and want != 1:  # its certificates already point at the single CRL
                raise FactoryError("config", f"crl.shards.{ca} = {want}: CA {ca} already issued certificates "
                                             "naming its single CRL; shards are chosen before the first issuance")
            if want != 1 and (other := taken_suffix(c, ca, digits=True)):
                raise FactoryError("config", f"crl.shards.{ca} = {want}: a CA is named {other!r}, a shard name of "
                                             f"{ca} ({other}.crl): shard another CA or rename")
            c.execute("INSERT INTO crl_partition VALUES (?,?)", (ca, want))
            return want
        if int(row[0]) != want:
            raise FactoryError("config", f"crl.shards.{ca} = {want}, but CA {ca} is pinned to {row[0]} shard(s) "
                                         "(its certificates name them): restore the setting")
        return want

    def cert_issued(self, c: apsw.Connection, ca: str, serial: int) -> int | None:
        """Inside the issuing tx(): keep the certificate's shard with it (the one its CRL DP names).
        A CA with one shard, never pinned otherwise, costs one cached lookup."""
        if self.wanted.get(ca, 1) == 1 and ca not in self._pinned:
            if ca in self._single:
                return None
            row = c.execute("SELECT shards FROM crl_partition WHERE ca=?", (ca,)).fetchone()
            if row is None:  # nothing pins it while this configuration lasts (only a sharded setting does)
                self._single.add(ca)
                return None
            self._pinned.add(ca)
        sb = serial_bytes(serial)
        shard = pcrl.shard_of(serial, self.pin(c, ca, sb))
        c.execute("INSERT INTO cert_shards VALUES (?,?,?)", (sb, ca, shard))
        return shard

    def next_number(self, c: apsw.Connection, ca: str, shard: int) -> int:
        """Inside tx(): the shard's next CRL number, its own sequence, never handed out twice."""
        if not 0 <= shard < self.effective(c, ca):
            raise FactoryError("not-found", f"CA {ca} has no CRL shard {shard}")
        c.execute("INSERT OR IGNORE INTO crl_shard_numbers VALUES (?,?,0)", (ca, shard))
        c.execute("UPDATE crl_shard_numbers SET number = number + 1 WHERE ca=? AND shard=?", (ca, shard))
        return int(_row(c, "SELECT number FROM crl_shard_numbers WHERE ca=? AND shard=?", (ca, shard))[0])

    def recovered(self, c: apsw.Connection, ca: str, shard: int | None = None, after: bytes = b"") -> list[tuple[Any, ...]]:
        """Revocations of certificates known only by their serial (recovered by a restore: no cert_shards row,
        their body being unknown) after serial `after`, in serial order, with their entry length last; of one
        shard if given. Their shard is the one their CRL DP named, by serial as every certificate's
        (policy.crl.shard_of over the pinned count). Few: read whole and placed here, not joined in SQL."""
        rows = [tuple(r) for r in c.execute("SELECT serial, revoked_at, reason, invalidity, entry_len FROM recovered_revocations "
                                            "WHERE ca=? AND serial > ? ORDER BY serial", (ca, after))]
        if shard is None:
            return rows
        n = self.shards(c, ca)
        return [r for r in rows if pcrl.shard_of(serial_int(r[0]), n) == shard]

    def shard_count(self, c: apsw.Connection, ca: str, shard: int) -> tuple[int, int]:
        """(entries, their DER length) of one shard, read in the caller's snapshot."""
        n, length = _row(c, _COUNT_SHARD, (ca, ca, shard))
        rec = self.recovered(c, ca, shard)
        return int(n) + len(rec), int(length) + sum(int(r[4]) for r in rec)

    def shard_counts(self, c: apsw.Connection, ca: str, n: int) -> list[tuple[int, int]]:
        """(entries, their DER length) of each of the CA's n shards, read in the caller's snapshot."""
        got = {int(k): (int(cnt), int(length)) for k, cnt, length in c.execute(_COUNT_SHARDS, (ca,))}
        for r in self.recovered(c, ca):
            k = pcrl.shard_of(serial_int(r[0]), n)
            cnt, length = got.get(k, (0, 0))
            got[k] = (cnt + 1, length + int(r[4]))
        return [got.get(k, (0, 0)) for k in range(n)]

    def shard_page(self, c: apsw.Connection, ca: str, shard: int, after: bytes, limit: int) -> list[tuple[Any, ...]]:
        """The shard's next entries after serial `after`, in serial order (as Store.list_page); recovered
        revocations merged in (bytes order is SQLite's BLOB order, the order `serial > ?` pages by)."""
        rows = [tuple(r) for r in c.execute(_PAGE_SHARD, (ca, shard, after, limit))]
        rec = [r[:4] for r in self.recovered(c, ca, shard, after)]
        return sorted(rows + rec, key=lambda r: bytes(r[0]))[:limit] if rec else rows

    # The reader's snapshot, as Store.list_snapshot_begin / list_page (Store.list_snapshot_end ends it).
    def snapshot_begin(self, ca: str, shard: int) -> tuple[int, int]:
        r = self.store.reader
        if r is None:
            raise FactoryError("inactive", "the CA is not activated")
        r.db.execute("BEGIN")
        try:
            return self.shard_count(r.db, ca, shard)
        except BaseException:
            r.db.execute("ROLLBACK")
            raise

    def snapshot_page(self, ca: str, shard: int, after: bytes, limit: int) -> list[tuple[Any, ...]]:
        assert self.store.reader is not None
        return self.shard_page(self.store.reader.db, ca, shard, after, limit)

    # ------------------------------------------------------------------ delta CRLs

    def enable_deltas(self, c: apsw.Connection, ca: str) -> None:
        """Inside tx(), before the first full CRL a delta will be based on: from now on every change to
        the CA's revocations is logged (before it, a delta could miss a change made during a base's snapshot)."""
        if other := taken_suffix(c, ca, digits=False):
            raise FactoryError("config", f"crl.delta.{ca}: a CA is named {other!r}, the name of {ca}'s delta CRL: rename")
        c.execute("INSERT OR IGNORE INTO crl_delta_cas VALUES (?)", (ca,))

    def log_seq(self, c: apsw.Connection) -> int:
        """Where the revocation log stands in the caller's snapshot (taken with a full CRL's entries)."""
        return int(_row(c, "SELECT coalesce(max(seq), 0) FROM revocation_log")[0])

    def mark_base(self, c: apsw.Connection, ca: str, shard: int, number: int, log_seq: int) -> None:
        """Inside the tx() storing full CRL `number`: remember the log position its entries reflect
        (only for a CA whose changes are logged: no delta can be based on another)."""
        if c.execute("SELECT 1 FROM crl_delta_cas WHERE ca=?", (ca,)).fetchone() is None:
            raise FactoryError("internal", f"CA {ca} does not log its revocations: no delta CRL can be based on its CRL")
        c.execute("INSERT INTO crl_log_marks VALUES (?,?,?,?)", (ca, shard, number, log_seq))

    def delta_entries(self, c: apsw.Connection, ca: str, shard: int, base: int) -> tuple[list[tuple[Any, ...]], list[bytes]]:
        """What changed since full CRL `base`: (entries revoked or changed since, now in the CA's revocations;
        serials whose revocation was removed since: removeFromCRL in the delta). Serial order."""
        row = c.execute("SELECT log_seq FROM crl_log_marks WHERE ca=? AND shard=? AND number=?", (ca, shard, base)).fetchone()
        if row is None:
            raise FactoryError("not-found", f"no full CRL #{base} of {ca} to base a delta on")
        n = self.shards(c, ca)
        changed = sorted({bytes(s) for (s,) in c.execute(
            "SELECT DISTINCT serial FROM revocation_log WHERE ca=? AND seq > ?", (ca, row[0]))
            if pcrl.shard_of(serial_int(s), n) == shard})
        present: list[tuple[Any, ...]] = []
        removed: list[bytes] = []
        for s in changed:
            r = c.execute("SELECT serial, revoked_at, reason, invalidity FROM revocations WHERE ca=? AND serial=?", (ca, s)).fetchone()
            if r is None:  # or one of a certificate known only by its serial (a restore recovered it)
                r = c.execute("SELECT serial, revoked_at, reason, invalidity FROM recovered_revocations WHERE ca=? AND serial=?",
                              (ca, s)).fetchone()
            if r is None:
                removed.append(s)
            else:
                present.append(tuple(r))
        return present, removed

    def prune_log(self, c: apsw.Connection, ca: str) -> int:
        """Inside tx(), after a full CRL is stored: drop log rows every shard's latest base already reflects
        (deltas are cut on the latest base), so the log stays as small as the changes since. Returns rows dropped."""
        n = self.shards(c, ca)
        marks = [c.execute("SELECT log_seq FROM crl_log_marks WHERE ca=? AND shard=? ORDER BY number DESC LIMIT 1",
                           (ca, k)).fetchone() for k in range(n)]
        if any(m is None for m in marks):
            return 0
        c.execute("DELETE FROM revocation_log WHERE ca=? AND seq <= ?", (ca, min(int(m[0]) for m in marks if m)))
        return c.changes()

"""The Factory's storage layer: the DB thread, transactions, the audit write, the activation check, named queries."""

# As Boulder's `sa/`: the rest of the Factory asks for what it wants by name and never writes SQL for
# the tables below. cmdb.py (schema, migrations, the encrypted connection) stays the low layer.
# Named queries are synchronous and run on the DB thread (inside `run`); the ones that write expect
# to be called inside `tx()`, so that they commit with the audit record and the queue rows of the
# caller's transaction, as Cmdb.audit does.

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

import apsw
import trio
from cryptography import x509

from policy import crl as pcrl
from policy.audit import GENESIS

from ..cmdb import Cmdb, CmdbError, serial_bytes, serial_int
from ..errors import FactoryError
from .cas import CaQueries
from .cmp import CmpQueries
from .dist import DistQueries
from .enrolsecrets import EnrolSecretQueries
from .gateway import GatewayQueries
from .ocsp import OcspQueries
from .officers import OfficerQueries
from .tenants import TenantQueries

T = TypeVar("T")

# kind -> (table of signed lists, counter column in cas, audit/queue action)
LISTS = {"crl": ("crls", "crl_number", "crl"), "issued-serials": ("serials_lists", "list_number", "issued-serials")}

_LIST_COUNT = {
    # revocations, and those a restore recovered from published lists for certificates it never saw
    "crl": ("SELECT (SELECT count(*) FROM revocations WHERE ca=?1) + (SELECT count(*) FROM recovered_revocations WHERE ca=?1), "
            "(SELECT coalesce(sum(entry_len), 0) FROM revocations WHERE ca=?1) "
            "+ (SELECT coalesce(sum(entry_len), 0) FROM recovered_revocations WHERE ca=?1)"),
    # INTEGER TLV length: tag + length octet + the octets + a sign octet when the top bit is set
    "issued-serials": ("SELECT count(*), coalesce(sum(length(serial) + 2 + (hex(substr(serial, 1, 1)) >= '80')), 0) "
                       "FROM serials WHERE ca=? AND state='issued'"),
}
# One page of pre-encoded CRL entries as one blob: concatenated in C (no Python object per entry).
_DER_PAGE = ("SELECT CAST(group_concat(der, '' ORDER BY serial) AS BLOB), count(*), max(serial) FROM "
             "(SELECT serial, der FROM crl_der WHERE ca=? AND serial > ? ORDER BY serial LIMIT ?)")
_DER_SHARD_PAGE = ("SELECT CAST(group_concat(der, '' ORDER BY serial) AS BLOB), count(*), max(serial) FROM "
                   "(SELECT serial, der FROM crl_der WHERE ca=? AND shard=? AND serial > ? ORDER BY serial LIMIT ?)")
_LIST_PAGE = {
    "crl": ("SELECT serial, revoked_at, reason, invalidity FROM revocations WHERE ca=?1 AND serial > ?2 UNION ALL "
            "SELECT serial, revoked_at, reason, invalidity FROM recovered_revocations WHERE ca=?1 AND serial > ?2 "
            "ORDER BY serial LIMIT ?3"),
    "issued-serials": "SELECT serial FROM serials WHERE ca=? AND state='issued' AND serial > ? ORDER BY serial LIMIT ?",
}


def _one(c: apsw.Connection, q: str, args: tuple[Any, ...] = ()) -> Any:
    """The row of a query that always yields one (an aggregate, a pragma)."""
    row = c.execute(q, args).fetchone()
    assert row is not None
    return row


def officers_of_file(path: str, key: bytes, cipher: str, names: list[str]) -> dict[str, tuple[str, str, bytes | None, int]]:
    """The named officers (roles, pwhash, totp, locked) of a CMDB file that is not the live one (the backup
    a restore is about to put in place): opened read-only and immutable, nothing written, no WAL."""
    c = apsw.Connection(f"file:{path}?immutable=1", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        c.execute(f"PRAGMA cipher = '{cipher}'")
        if cipher == "chacha20":
            c.execute("PRAGMA kdf_iter = 1")
        c.execute(f"PRAGMA hexkey = '{key.hex()}'")
        try:
            rows = c.execute("SELECT name, roles, pwhash, totp, locked FROM officers WHERE name IN (SELECT value FROM json_each(?))",
                             (json.dumps(names),)).fetchall()
        except (apsw.NotADBError, apsw.SQLError):
            raise CmdbError("the backup's CMDB does not decrypt with this token's key, or has no officers table") from None
        return {str(r[0]): (str(r[1]), str(r[2]), r[3] if isinstance(r[3], bytes) else None, int(r[4] or 0)) for r in rows}
    finally:
        c.close()


def recovered_cert_state(c: apsw.Connection, ca: str, serial: bytes) -> tuple[Any, ...] | None:
    """(not_after, revoked_at, reason, held this_update) of a certificate a restore recovered from published
    evidence only (recovered_certs, migration 17): the shape of the OCSP scheduler's row for a known one."""
    return c.execute("SELECT k.not_after, r.revoked_at, r.reason, o.this_update FROM recovered_certs k "
                     "LEFT JOIN recovered_revocations r ON r.ca = k.ca AND r.serial = k.serial "
                     "LEFT JOIN ocsp o ON o.ca = k.ca AND o.serial = k.serial WHERE k.ca=? AND k.serial=?", (ca, serial)).fetchone()


def inactive(yet: str = "") -> FactoryError:
    return FactoryError("inactive", f"the CA is not activated{yet} (run `donjon activate`)")


# The query modules, one per concern, each a mixin of Store (the public API stays `store.<query>(...)`).
class Store(CaQueries, CmpQueries, DistQueries, EnrolSecretQueries, GatewayQueries, OcspQueries, OfficerQueries, TenantQueries):
    """The CMDB of an active CA (None until activation), its writer thread and its snapshot reader."""

    def __init__(self) -> None:
        self.db: Cmdb | None = None
        self.reader: Cmdb | None = None  # a second connection: long WAL snapshots (CRLs) beside the writer
        self.db_limiter = trio.CapacityLimiter(1)  # one DB thread: Cmdb is not thread-safe
        self.reader_limiter = trio.CapacityLimiter(1)

    # ------------------------------------------------------------ plumbing

    @property
    def active(self) -> bool:
        return self.db is not None

    async def open(self, path: str, key: bytes, cipher: str, create: bool) -> None:
        """Open the writer and the reader (activation). CmdbError if the file or key is wrong."""
        def o() -> tuple[Cmdb, Cmdb]:
            db = Cmdb(path, key, cipher, create=create)
            try:
                return db, Cmdb(path, key, cipher)
            except BaseException:
                db.close()
                raise
        self.db, self.reader = await trio.to_thread.run_sync(o, limiter=self.db_limiter)

    def require_active(self) -> Cmdb:
        if self.db is None:
            raise inactive(" yet")
        return self.db

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the DB thread; refused while the CA is inactive."""
        if self.db is None:
            raise inactive()
        return await trio.to_thread.run_sync(fn, *args, limiter=self.db_limiter)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the reader thread (snapshots that must not hold up the writer)."""
        if self.reader is None:
            raise inactive()
        return await trio.to_thread.run_sync(fn, *args, limiter=self.reader_limiter)

    @contextmanager
    def tx(self) -> Iterator[apsw.Connection]:
        with self.require_active().tx() as c:
            yield c

    def audit_in_tx(self, actor: str, action: str, obj: str, outcome: str, detail: str = "", ts: int | None = None) -> int:
        return self.require_active().audit(actor, action, obj, outcome, detail, ts)

    async def audit(self, actor: str, action: str, obj: str, outcome: str, detail: str = "") -> None:
        """One audit record in its own transaction; nothing to write to while inactive."""
        def w() -> None:
            with self.tx():
                self.audit_in_tx(actor, action, obj, outcome, detail)
        if self.db is not None:
            await self.run(w)

    def audit_head(self) -> tuple[int, bytes]:
        """(seq, hash) of the newest audit record, (0, GENESIS) for an empty log."""
        row = self.require_active().db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def copy_consistent(self, path: str, out: BinaryIO, chunk: int = 1 << 20) -> tuple[int, str, int, bytes]:
        """On the DB thread, so no write can land between the checkpoint and the copy: fold the WAL into
        the main file at `path`, then copy its (still encrypted) pages as they are to `out`.
        Returns (bytes, sha256 hex, audit seq, audit head) of the copy."""
        c = self.require_active().db
        busy, log, done = _one(c, "PRAGMA wal_checkpoint(TRUNCATE)")
        if busy or log != done:
            raise FactoryError("busy", "a reader holds an old snapshot (a CRL is being made?): try the backup again")
        h = hashlib.sha256()
        n = 0
        with open(path, "rb") as src:
            while data := src.read(chunk):
                out.write(data)
                h.update(data)
                n += len(data)
        seq, head = c.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone() or (0, b"")
        return n, h.hexdigest(), seq, head

    # ------------------------------------------------------------ signed audit checkpoints

    def add_checkpoint(self, seq: int, ts: int, head: bytes, tbs: bytes, signature: bytes) -> None:
        """Store a checkpoint the CIS signed (inside tx(), with its audit record)."""
        self.require_active().db.execute("INSERT INTO checkpoints(seq, ts, head, tbs, signature) VALUES (?,?,?,?,?)",
                                         (seq, ts, head, tbs, signature))

    def checkpoints(self, latest_only: bool = False) -> list[tuple[bytes, bytes]]:
        """(tbs, signature) of the stored checkpoints, oldest first (or only the newest)."""
        q = "SELECT tbs, signature FROM checkpoints ORDER BY id" + (" DESC LIMIT 1" if latest_only else "")
        return [(r[0], r[1]) for r in self.require_active().db.execute(q)]

    def audit_moved_since_checkpoint(self) -> bool:
        c = self.require_active().db
        head = _one(c, "SELECT coalesce(max(seq), 0) FROM audit")[0]
        last = _one(c, "SELECT coalesce(max(seq), -1) FROM checkpoints")[0]
        return head > last + 1  # the record of the last checkpoint itself does not count

    # ------------------------------------------------------------ serials and certificates

    def reserve(self, items: list[tuple[int, str, bytes | None]]) -> None:
        """Commit the intents: from here on these serials are spent, whatever happens next. A serial
        already reserved (by anyone, in any state) fails the whole batch: the primary key says so."""
        db = self.require_active()
        now = int(time.time())
        with db.tx():
            for serial, ca, request in items:
                db.db.execute("INSERT INTO serials VALUES (?,?,?,?,?)", (serial_bytes(serial), ca, "intent", now, request))

    def void(self, serials: list[int], actor: str, action: str, reason: str) -> None:
        """Retire serials whose signature was refused, one audit record each, in one transaction."""
        db = self.require_active()
        with db.tx():
            for s in serials:
                self.void_in_tx(s)
                db.audit(actor, action, f"{s:x}", "refused", reason)

    def void_in_tx(self, serial: int) -> None:
        self.require_active().db.execute("UPDATE serials SET state='void' WHERE serial=?", (serial_bytes(serial),))

    def store_issued(self, serial: int, ca: str, profile: str, subject: str, not_before: int, not_after: int,
                     der: bytes, request: bytes | None, spki_sha256: bytes, sans: str) -> bytes:
        """Turn an open intent into an issued certificate and queue its OCSP response (inside tx()).
        Returns the serial's bytes. CmdbError if the serial was not an open intent."""
        c = self.require_active().db
        sb = serial_bytes(serial)
        c.execute("UPDATE serials SET state='issued' WHERE serial=? AND state='intent'", (sb,))
        if c.changes() != 1:
            raise CmdbError(f"serial {serial:x} was not an open intent")
        c.execute("INSERT INTO certs(serial, ca, profile, subject, not_before, not_after, issued_at, der, request, spki_sha256, sans) "
                  "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                  (sb, ca, profile, subject, not_before, not_after, int(time.time()), der, request, spki_sha256, sans))
        c.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, sb))  # a response at once
        return sb

    def serial_state(self, serial: int) -> str | None:
        row = self.require_active().db.execute("SELECT state FROM serials WHERE serial=?", (serial_bytes(serial),)).fetchone()
        return row[0] if row else None

    def reconcile(self, actor: str) -> int:
        """Intents without a certificate (a crash between reservation and storage): void, never reuse."""
        db = self.require_active()
        with db.tx():
            rows: list[Any] = db.db.execute("SELECT serial, ca FROM serials WHERE state='intent'").fetchall()
            for serial, ca in rows:
                db.db.execute("UPDATE serials SET state='void' WHERE serial=?", (serial,))
                db.audit(actor, "reconcile", f"{ca}/{serial_int(serial):x}", "voided",
                         "intent without a stored certificate after a restart: possibly signed, never returned, serial retired")
        return len(rows)

    def cert_row(self, ca: str, serial: int) -> tuple[Any, ...] | None:
        """(profile, subject, not_before, not_after, issued_at, der, revoked_at, reason) of a certificate."""
        row = self.require_active().db.execute(
            "SELECT c.profile, c.subject, c.not_before, c.not_after, c.issued_at, c.der, r.revoked_at, r.reason "
            "FROM certs c LEFT JOIN revocations r ON r.ca=c.ca AND r.serial=c.serial WHERE c.ca=? AND c.serial=?",
            (ca, serial_bytes(serial))).fetchone()
        return tuple(row) if row else None

    def ocsp_summary(self) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
        """Per CA: (ca, responses, revoked, oldest thisUpdate, earliest nextUpdate, next refresh); and
        the responses queued for signing per CA."""
        c = self.require_active().db
        rows = [tuple(r) for r in c.execute("SELECT ca, count(*), sum(status), min(this_update), min(next_update), min(refresh_at) "
                                            "FROM ocsp GROUP BY ca ORDER BY ca")]
        queued = {r[0]: r[1] for r in c.execute("SELECT ca, count(*) FROM ocsp_queue GROUP BY ca")}
        return rows, queued

    def cert_profile(self, ca: str, serial: bytes) -> str | None:
        row = self.require_active().db.execute("SELECT profile FROM certs WHERE ca=? AND serial=?", (ca, serial)).fetchone()
        return row[0] if row else None

    def cert_list(self, ca: str | None, profile: str | None, subject: str | None, san: str | None, status: str | None,
                  expires_within_days: int | None, limit: int, now: int) -> list[tuple[Any, ...]]:
        """(ca, serial, profile, subject, not_after, revoked_at, sans) of matching certificates, newest first;
        subject and san are literal substrings."""
        q = ("SELECT c.ca, c.serial, c.profile, c.subject, c.not_after, r.revoked_at, c.sans FROM certs c "
             "LEFT JOIN revocations r ON r.ca=c.ca AND r.serial=c.serial ")
        where: list[str] = []
        args: list[Any] = []

        def like(s: str) -> str:  # a literal substring: LIKE's wildcards escaped
            return "%" + s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        if ca:
            where.append("c.ca=?")
            args.append(ca)
        if profile:
            where.append("c.profile=?")
            args.append(profile)
        if subject:
            where.append("c.subject LIKE ? ESCAPE '\\'")
            args.append(like(subject))
        if san:
            where.append("c.sans LIKE ? ESCAPE '\\'")
            args.append(like(san))
        if status == "revoked":
            where.append("r.serial IS NOT NULL")
        elif status == "expired":
            where.append("r.serial IS NULL AND c.not_after < ?")
            args.append(now)
        elif status == "valid" or expires_within_days is not None:
            where.append("r.serial IS NULL AND c.not_after >= ?")
            args.append(now)
        if expires_within_days is not None:
            where.append("c.not_after <= ?")
            args.append(now + expires_within_days * 86400)
        if where:
            q += "WHERE " + " AND ".join(where) + " "
        q += "ORDER BY c.issued_at DESC LIMIT ?"
        args.append(limit)
        return [tuple(r) for r in self.require_active().db.execute(q, tuple(args))]

    def cert_with_key(self, spki_sha256: bytes) -> tuple[str, bytes] | None:
        """(ca, serial) of a certificate for this public key, if any."""
        row = self.require_active().db.execute("SELECT ca, serial FROM certs WHERE spki_sha256=? LIMIT 1", (spki_sha256,)).fetchone()
        return (row[0], row[1]) if row else None

    def valid_cert_for_other_key(self, ca: str, subject: str, spki_sha256: bytes, now: int) -> bytes | None:
        """The serial of an unrevoked, unexpired certificate of `ca` for `subject` with another key."""
        row = self.require_active().db.execute(
            "SELECT c.serial FROM certs c LEFT JOIN revocations r ON r.ca=c.ca AND r.serial=c.serial "
            "WHERE c.ca=? AND c.subject=? AND c.not_after >= ? AND r.serial IS NULL AND c.spki_sha256 IS NOT ? LIMIT 1",
            (ca, subject, now, spki_sha256)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------ revocations (inside tx())

    def recovered_cert(self, ca: str, serial: bytes) -> bool:
        """Whether the certificate is one a restore knows only by its serial, from published evidence
        (recovered_certs, migration 17): no body, no profile, still revocable."""
        return self.require_active().db.execute("SELECT 1 FROM recovered_certs WHERE ca=? AND serial=?",
                                                (ca, serial)).fetchone() is not None

    def revocation(self, ca: str, serial: bytes, recovered: bool = False) -> tuple[int, int | None, int | None] | None:
        """(revoked_at, reason, invalidity) of a revoked certificate, or None (`recovered`: of one known
        only by its serial)."""
        table = "recovered_revocations" if recovered else "revocations"
        row = self.require_active().db.execute(f"SELECT revoked_at, reason, invalidity FROM {table} WHERE ca=? AND serial=?",
                                               (ca, serial)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    @staticmethod
    def _recovered_changed(c: apsw.Connection, ca: str, serial: bytes) -> None:
        """A revocation of a certificate known only by its serial changed: logged for delta CRLs (as the
        triggers log `revocations`), its OCSP response queued for re-signing."""
        c.execute("INSERT INTO revocation_log(ca, serial) SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM crl_delta_cas WHERE ca = ?1)",
                  (ca, serial))
        c.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, serial))

    def add_revocation(self, ca: str, serial: bytes, at: int, reason: int | None, invalidity: int | None, entry_len: int,
                       recovered: bool = False) -> None:
        """A new revocation, its OCSP response queued for re-signing. `recovered`: of a certificate known only
        by its serial, kept beside the ones a restore recovered (full CRLs, its shard's and the deltas carry them)."""
        c = self.require_active().db
        if recovered:
            c.execute("INSERT INTO recovered_revocations VALUES (?,?,?,?,?,?,?)", (ca, serial, at, reason, invalidity, entry_len, at))
            self._recovered_changed(c, ca, serial)
            return
        c.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", (ca, serial, at, reason, invalidity, entry_len))
        self._keep_crl_entry(c, ca, serial, at, reason, invalidity, entry_len)
        c.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, serial))

    def change_revocation(self, ca: str, serial: bytes, reason: int | None, invalidity: int | None, entry_len: int,
                          recovered: bool = False) -> None:
        """A held certificate's reason made permanent (its revocation date kept), OCSP queued."""
        c = self.require_active().db
        if recovered:
            c.execute("UPDATE recovered_revocations SET reason=?, invalidity=?, entry_len=? WHERE ca=? AND serial=?",
                      (reason, invalidity, entry_len, ca, serial))
            self._recovered_changed(c, ca, serial)
            return
        c.execute("UPDATE revocations SET reason=?, invalidity=?, entry_len=? WHERE ca=? AND serial=?",
                  (reason, invalidity, entry_len, ca, serial))
        row = c.execute("SELECT revoked_at FROM revocations WHERE ca=? AND serial=?", (ca, serial)).fetchone()
        if row is not None:  # the update's trigger dropped the old entry
            self._keep_crl_entry(c, ca, serial, row[0], reason, invalidity, entry_len)
        c.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, serial))

    @staticmethod
    def _keep_crl_entry(c: apsw.Connection, ca: str, serial: bytes, at: int, reason: int | None, invalidity: int | None,
                        entry_len: int) -> None:
        """The revocation's CRL entry, encoded once now: full CRLs are read as pages of these (migration 19)."""
        try:
            der = pcrl.encode_entries([(serial_int(serial), at, reason, invalidity)])
        except ValueError:
            return  # no fast path for it: the CRL is then encoded entry by entry, which says what is wrong
        if len(der) != entry_len:
            return  # the length declared to the CIS would be wrong: the slow path refuses it as before
        shard = c.execute("SELECT shard FROM cert_shards WHERE serial=? AND ca=?", (serial, ca)).fetchone()
        c.execute("INSERT OR REPLACE INTO crl_der VALUES (?,?,?,?)", (ca, serial, der, shard[0] if shard else None))

    def delete_revocation(self, ca: str, serial: bytes, recovered: bool = False) -> None:
        """A certificateHold released, OCSP queued."""
        c = self.require_active().db
        if recovered:
            c.execute("DELETE FROM recovered_revocations WHERE ca=? AND serial=?", (ca, serial))
            self._recovered_changed(c, ca, serial)
            return
        c.execute("DELETE FROM revocations WHERE ca=? AND serial=?", (ca, serial))
        c.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, serial))

    # ------------------------------------------------------------ status and audit export

    def status_counts(self) -> tuple[list[str], int, int, int, str | None]:
        """(CA names, certificates, revocations, audit records, audit head hex)."""
        c = self.require_active().db
        cas = [r[0] for r in c.execute("SELECT name FROM cas ORDER BY created")]
        certs, revoked = _one(c, "SELECT coalesce(sum(issued), 0), coalesce(sum(revoked), 0) FROM ca_counts")
        n_audit = _one(c, "SELECT count(*) FROM audit")[0]
        head = c.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return cas, certs, revoked, n_audit, head[0].hex() if head else None

    def ca_report_rows(self) -> list[tuple[str, str, bytes, int, int | None, int, int]]:
        """Per CA: (name, key_type, cert DER, CRL number, latest CRL's nextUpdate, issued, revoked)."""
        c = self.require_active().db
        out: list[Any] = []
        for name, key_type, der, crl_number in c.execute("SELECT name, key_type, cert, crl_number FROM cas ORDER BY created").fetchall():
            nu = c.execute("SELECT next_update FROM crls WHERE ca=? ORDER BY number DESC LIMIT 1", (name,)).fetchone()
            # kept by triggers (migration 19): no count over a million rows every few seconds
            counts = c.execute("SELECT issued, revoked FROM ca_counts WHERE ca=?", (name,)).fetchone()
            issued, revoked = (counts[0], counts[1]) if counts else (0, 0)
            out.append((name, key_type, der, crl_number, nu[0] if nu else None, issued, revoked))
        return out

    def report_heads(self) -> tuple[int, int | None, int | None, int | None]:
        """(audit seq, oldest OCSP thisUpdate, earliest OCSP nextUpdate, latest checkpoint time)."""
        c = self.require_active().db
        n_audit = _one(c, "SELECT coalesce(max(seq), 0) FROM audit")[0]
        oldest, earliest = _one(c, "SELECT min(this_update), min(next_update) FROM ocsp")
        cp = _one(c, "SELECT max(ts) FROM checkpoints")[0]
        return n_audit, oldest, earliest, cp

    def reconciled(self) -> list[tuple[int, int, str, str]]:
        """(seq, ts, object, detail) of every intent voided by a reconcile, oldest first."""
        return [(r[0], r[1], r[2], r[3]) for r in self.require_active().db.execute(
            "SELECT seq, ts, object, detail FROM audit WHERE action='reconcile' ORDER BY seq")]

    # ------------------------------------------------------------ ceremonies (records of the audit chain)

    def audit_hash(self, seq: int) -> bytes | None:
        row = self.require_active().db.execute("SELECT hash FROM audit WHERE seq=?", (seq,)).fetchone()
        return row[0] if row else None

    def audit_record(self, seq: int) -> tuple[Any, ...] | None:
        """(seq, ts, actor, action, object, outcome, detail, prev, hash) of one record."""
        row = self.require_active().db.execute(
            "SELECT seq, ts, actor, action, object, outcome, detail, prev, hash FROM audit WHERE seq=?", (seq,)).fetchone()
        return tuple(row) if row else None

    def ceremony_opening(self, seq: int) -> tuple[str, str] | None:
        """(ceremony name, detail) of the ceremony opened at `seq`, or None."""
        row = self.require_active().db.execute(
            "SELECT object, detail FROM audit WHERE seq=? AND action='ceremony-begin' AND outcome='ok'", (seq,)).fetchone()
        return (row[0], row[1]) if row else None

    def ceremony_recorded(self, seq: int) -> bool:
        """The ceremony opened at `seq` already has its transcript record."""
        return self.require_active().db.execute(
            "SELECT 1 FROM audit WHERE seq>? AND action='ceremony' AND detail LIKE ?", (seq, f"% begin={seq} %")).fetchone() is not None

    def ceremony_witnesses(self, seq: int) -> list[tuple[int, bytes, str]]:
        """(seq, hash, actor) of each witness record of the ceremony opened at `seq`."""
        return [(r[0], r[1], r[2]) for r in self.require_active().db.execute(
            "SELECT seq, hash, actor FROM audit WHERE seq>? AND action='ceremony-witness' AND object=? AND outcome='ok' "
            "ORDER BY seq", (seq, f"ceremony#{seq}"))]

    def audit_rows_after(self, seq: int, limit: int) -> list[tuple[int, bytes, str, str, str, str]]:
        """(seq, hash, actor, action, object, outcome) of the records after `seq`, oldest first."""
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in self.require_active().db.execute(
            "SELECT seq, hash, actor, action, object, outcome FROM audit WHERE seq>? ORDER BY seq LIMIT ?", (seq, limit))]

    def checkpoints_by_seq(self) -> list[tuple[int, bytes, bytes]]:
        """(seq, tbs, signature) of every stored checkpoint, oldest first."""
        return [(r[0], r[1], r[2]) for r in self.require_active().db.execute("SELECT seq, tbs, signature FROM checkpoints ORDER BY id")]

    # ------------------------------------------------------------ CAs

    def ca_count(self) -> int:
        return _one(self.require_active().db, "SELECT count(*) FROM cas")[0]

    def add_ca(self, name: str, key_type: str, parent: str | None, profile: str, der: bytes, profiles: str) -> None:
        """A new CA row (inside tx()); its key label is its name."""
        self.require_active().db.execute(
            "INSERT INTO cas(name, key_label, key_type, parent, profile, cert, created, profiles) VALUES (?,?,?,?,?,?,?,?)",
            (name, name, key_type, parent, profile, der, int(time.time()), profiles))

    def ca_row(self, name: str) -> tuple[str, str, str | None, str, bytes] | None:
        """(name, key_type, parent, profile, cert DER) or None."""
        row = self.require_active().db.execute(
            "SELECT name, key_type, parent, profile, cert FROM cas WHERE name=?", (name,)).fetchone()
        return (row[0], row[1], row[2], row[3], row[4]) if row else None

    def ca_rows(self) -> list[tuple[str, str, str | None, str, bytes]]:
        return [(r[0], r[1], r[2], r[3], r[4]) for r in self.require_active().db.execute(
            "SELECT name, key_type, parent, profile, cert FROM cas ORDER BY created, name")]

    def ca_name_taken(self, name: str) -> bool:
        """A CA with this name, or a key with this label, exists."""
        return self.require_active().db.execute("SELECT 1 FROM cas WHERE name=? OR key_label=?", (name, name)).fetchone() is not None

    def ca_policy_row(self, name: str) -> tuple[str | None, str | None] | None:
        """(parent, encoded CaPolicy or None) or None when there is no such CA."""
        row = self.require_active().db.execute("SELECT parent, profiles FROM cas WHERE name=?", (name,)).fetchone()
        return (row[0], row[1]) if row else None

    # ------------------------------------------------------------ CRLs and issued-serials lists

    def next_list_number(self, ca: str, kind: str) -> int:
        """Reserve the next CRL (or issued-serials list) number of a CA, committed before anything is
        signed: a number handed out is never handed out again unless given back (nothing signed)."""
        counter = LISTS[kind][1]
        db = self.require_active()
        with db.tx():
            db.db.execute(f"UPDATE cas SET {counter} = {counter} + 1 WHERE name=?", (ca,))
            row = db.db.execute(f"SELECT {counter} FROM cas WHERE name=?", (ca,)).fetchone()
        if row is None:
            raise FactoryError("not-found", f"no CA named {ca!r}")
        return row[0]

    def give_back_list_number(self, ca: str, kind: str, number: int) -> bool:
        """Inside tx(): undo next_list_number when the CIS refused to sign under `number`, so numbers
        stay without gaps. Only the latest number comes back: once a later one was handed out (or
        this one stored), it stays spent. Returns whether it came back."""
        counter = LISTS[kind][1]
        c = self.require_active().db
        if c.execute(f"SELECT 1 FROM {LISTS[kind][0]} WHERE ca=? AND number=?", (ca, number)).fetchone():
            return False
        c.execute(f"UPDATE cas SET {counter} = {counter} - 1 WHERE name=? AND {counter}=?", (ca, number))
        return c.changes() == 1

    # The three reader calls below bracket one WAL snapshot: a list is consistent however long it streams.
    def list_snapshot_begin(self, ca: str, kind: str) -> tuple[int, int]:
        """Open the snapshot; returns (entries, their total DER length)."""
        r = self._reader()
        r.db.execute("BEGIN")
        try:
            count, length = _one(r.db, _LIST_COUNT[kind], (ca,))
        except BaseException:
            r.db.execute("ROLLBACK")
            raise
        return count, length

    def list_page(self, ca: str, kind: str, after: bytes, limit: int) -> list[tuple[Any, ...]]:
        """The next page of entries (revocations, or issued serials) after serial `after`, in serial order."""
        return [tuple(row) for row in self._reader().db.execute(_LIST_PAGE[kind], (ca, after, limit))]

    def der_pages_ready(self, ca: str) -> bool:
        """In the open snapshot: every entry of the CA's full CRL is kept encoded (crl_der), none recovered by a
        restore: the CRL can be sent as pre-encoded pages (else entry by entry, as before)."""
        r = self._reader().db
        n_rev, n_der, n_rec = _one(r, "SELECT (SELECT count(*) FROM revocations WHERE ca=?1), "
                                      "(SELECT count(*) FROM crl_der WHERE ca=?1), "
                                      "(SELECT count(*) FROM recovered_revocations WHERE ca=?1)", (ca,))
        return n_rev == n_der and n_rec == 0

    def der_page(self, ca: str, after: bytes, limit: int) -> tuple[bytes, int, bytes]:
        """In the open snapshot: (the next `limit` encoded entries after serial `after`, concatenated in serial
        order by SQLite itself, their count, the last serial)."""
        blob, n, last = _one(self._reader().db, _DER_PAGE, (ca, after, limit))
        return (blob or b""), int(n), (last or b"")

    def shard_der_counts(self, ca: str) -> tuple[dict[int, tuple[int, int]], int]:
        """In the open snapshot: each of the CA's shards' encoded entries (count, bytes), from one scan of the
        covering index crl_der_shard, and how many revocations the CA has (ca_counts). When the two totals
        agree, every revocation is encoded in its shard (crl_der rows are made with their revocation, in its
        certificate's pinned shard, and go with it: triggers), so these are the shards' own figures."""
        r = self._reader().db
        got = {int(k): (int(n), int(size)) for k, n, size in r.execute(
            "SELECT shard, count(*), sum(length(der)) FROM crl_der WHERE ca=? AND shard IS NOT NULL GROUP BY shard", (ca,))}
        row = r.execute("SELECT revoked FROM ca_counts WHERE ca=?", (ca,)).fetchone()
        return got, int(row[0]) if row else 0

    def shard_der_ready(self, ca: str, shard: int, count: int) -> bool:
        """In the open snapshot: the shard's `count` revocations are all kept encoded with their shard."""
        n = _one(self._reader().db, "SELECT count(*) FROM crl_der WHERE ca=? AND shard=?", (ca, shard))[0]
        return bool(n == count)

    def shard_der_page(self, ca: str, shard: int, after: bytes, limit: int) -> tuple[bytes, int, bytes]:
        """As der_page, for one CRL shard (its index, crl_der_shard)."""
        blob, n, last = _one(self._reader().db, _DER_SHARD_PAGE, (ca, shard, after, limit))
        return (blob or b""), int(n), (last or b"")

    def list_snapshot_end(self) -> None:
        self._reader().db.execute("COMMIT")

    def revocation_pages(self, ca: str, page: int) -> Iterator[list[tuple[Any, ...]]]:
        """Every revocation of a CA in serial order, `page` at a time, from one snapshot (reader thread)."""
        self.list_snapshot_begin(ca, "crl")
        try:
            after = b""
            while rows := self.list_page(ca, "crl", after, page):
                yield rows
                after = rows[-1][0]
        finally:
            self.list_snapshot_end()

    def store_signed_list(self, kind: str, ca: str, number: int, this_update: int, next_update: int, entries: int,
                          parts: Iterable[bytes], total: int, sha256: bytes | None = None) -> bytes:
        """Write a signed CRL or issued-serials list of `total` bytes from its parts (inside tx()),
        streamed into a blob; returns its SHA-256. A number already stored fails (primary key).
        `sha256` known beforehand goes into the row with it (checked against what is written): setting it
        afterwards rewrites the whole record, a 42 MB CRL read back and written again (≈ 2× its size in memory)."""
        table = LISTS[kind][0]
        c = self.require_active().db
        c.execute(f"INSERT INTO {table} VALUES (?,?,?,?,?,?,zeroblob(?))",
                  (ca, number, this_update, next_update, entries, sha256 or b"", total))
        rowid = c.last_insert_rowid()
        h = hashlib.sha256()
        written = 0
        with c.blob_open("main", table, "der", rowid, True) as blob:
            for p in parts:
                blob.write(p)
                h.update(p)
                written += len(p)
        if written != total:
            raise CmdbError(f"the signed list is {written} bytes, {total} announced")
        digest = h.digest()
        if sha256 is None:
            c.execute(f"UPDATE {table} SET sha256=? WHERE rowid=?", (digest, rowid))
        elif digest != sha256:
            raise CmdbError("the signed list differs from the digest announced with it")
        return digest

    def crls_due(self, now: int) -> set[str]:
        """CAs whose CRL must be signed now: none signed yet, or half of the latest one's validity gone."""
        return {r[0] for r in self.require_active().db.execute(
            "SELECT c.name FROM cas c LEFT JOIN (SELECT ca, max(this_update) tu, max(next_update) nu FROM crls GROUP BY ca) l "
            "ON l.ca = c.name WHERE l.ca IS NULL OR l.tu + (l.nu - l.tu) / 2 <= ?", (now,))}

    def signed_list_blob(self, table: str, ca: str, number: int | None) -> tuple[int, int] | None:
        """(rowid, size) of a stored CRL or issued-serials list (the latest unless a number is given)."""
        if table not in (LISTS["crl"][0], LISTS["issued-serials"][0]):
            raise ValueError(f"no signed-list table {table!r}")  # a table name goes into the SQL text
        q = f"SELECT rowid, length(der) FROM {table} WHERE ca=? " + ("AND number=?" if number else "ORDER BY number DESC LIMIT 1")
        row = self.require_active().db.execute(q, (ca, number) if number else (ca,)).fetchone()
        return (row[0], row[1]) if row else None

    def read_blob(self, table: str, rowid: int, offset: int, n: int) -> bytes:
        """n bytes at offset of a stored list, in one read (a whole stream: blob_stream)."""
        stream = BlobStream(self, table, rowid)
        try:
            return stream.read(offset, n)
        finally:
            stream.close()

    def blob_stream(self, table: str, rowid: int) -> BlobStream:
        """A read handle on a stored list's bytes for a whole stream (see BlobStream)."""
        return BlobStream(self, table, rowid)

    def _reader(self) -> Cmdb:
        if self.reader is None:
            raise inactive()
        return self.reader

    def snapshot_begin(self) -> apsw.Connection:
        """Open a read snapshot on the reader connection (reader thread): the shards of one CRL generation
        are all read from it; whoever reads last ends it (or snapshot_abort on a failure)."""
        r = self._reader().db
        r.execute("BEGIN")
        return r

    def snapshot_abort(self) -> None:
        self._reader().db.execute("ROLLBACK")


class BlobStream:
    """A stored CRL's (or issued-serials list's) bytes read in order through one blob handle, kept open
    between the pieces (each read in the DB thread: `await store.run(stream.read, off, n)`). A fresh handle
    per piece made streaming quadratic: reaching an offset walks the row's overflow-page chain from its
    start, decrypting every page on the way (≈1.9 s of Factory CPU per stream of a 1M-entry, 42 MB CRL).
    The row never changes once written; should the handle be aborted meanwhile (a ROLLBACK on the same
    connection aborts pending reads), the piece is read again through a new handle."""

    def __init__(self, store: Store, table: str, rowid: int):
        self.store, self.table, self.rowid = store, table, rowid
        self.blob: apsw.Blob | None = None

    def read(self, offset: int, n: int) -> bytes:
        for attempt in (0, 1):
            try:
                if self.blob is None:
                    self.blob = self.store.require_active().db.blob_open("main", self.table, "der", self.rowid, False)
                self.blob.seek(offset)
                return self.blob.read(n)
            except apsw.Error:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        blob, self.blob = self.blob, None
        if blob is not None:
            try:
                blob.close()
            except apsw.Error:
                pass


def ca_state(db: apsw.Connection, name: str, now: float) -> tuple[str, str]:
    """A CA's state with its reason: active; revoked or expired (its certificate, or one above it);
    awaiting certificate. DB thread."""
    cur: str | None = name
    while cur is not None:
        row = db.execute("SELECT parent, cert FROM cas WHERE name=?", (cur,)).fetchone()
        if row is None or not row[1]:
            return "awaiting certificate", f"CA {cur!r} has no certificate yet"
        parent, der = row
        cert = x509.load_der_x509_certificate(der)
        whose = f"CA {name!r}" if cur == name else f"its parent CA {cur!r}"
        if cert.not_valid_after_utc.timestamp() < now:
            return "expired", f"the certificate of {whose} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if parent is not None:
            rev = db.execute("SELECT revoked_at, reason FROM revocations WHERE ca=? AND serial=?",
                             (parent, serial_bytes(cert.serial_number))).fetchone()
            if rev is not None:
                at = time.strftime("%Y-%m-%d %H:%M", time.gmtime(rev[0]))
                return "revoked", f"the certificate of {whose} was revoked on {at} UTC (reason {rev[1] or 0})"
        cur = parent
    return "active", ""

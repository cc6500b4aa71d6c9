"""ACME state in the gateway's own folder: accounts, orders, authorizations, certificates; nonces in memory, single-use across restarts."""

# Why here and not in the CMDB: orders, authorizations, challenges and nonces change on almost every
# ACME request; the CMDB (one writer, synchronous=FULL, audit-chained) is kept for what must be
# authoritative: certificates, revocations, EAB keys and their bindings, which credential obtained
# which certificate (the Factory checks revocation-by-account against that, not against this file).
# This is an SQLite file (stdlib sqlite3, WAL, synchronous=FULL): orders survive a gateway restart.
# It holds public data only (account public keys, identifiers, issued certificates).

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, thumbprint TEXT UNIQUE NOT NULL, jwk TEXT NOT NULL,
    status TEXT NOT NULL, contact TEXT NOT NULL, eab_kid TEXT, profiles TEXT NOT NULL DEFAULT '',
    patterns TEXT NOT NULL DEFAULT '', created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (id TEXT PRIMARY KEY, kind TEXT NOT NULL, account INTEGER NOT NULL,
    expires INTEGER NOT NULL, status TEXT NOT NULL, doc TEXT NOT NULL, created INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS objects_account ON objects (account, kind, created);
CREATE TABLE IF NOT EXISTS certs (id TEXT PRIMARY KEY, account INTEGER NOT NULL, order_id TEXT NOT NULL,
    ca TEXT NOT NULL, serial TEXT NOT NULL, ari_id TEXT UNIQUE NOT NULL, not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL, chain TEXT NOT NULL, replaced_by TEXT);
"""
NONCES_HELD = 200_000  # outstanding nonces remembered; the oldest beyond are forgotten (badNonce, the client retries)


class Nonces:
    """A nonce is a sequence number and an HMAC under a key made at each start: one from before a
    restart fails the MAC, one used already is no longer outstanding. Both get badNonce."""

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)
        self.seq = 0
        self.outstanding: OrderedDict[int, None] = OrderedDict()

    def new(self) -> str:
        self.seq += 1
        raw = struct.pack(">Q", self.seq)
        tag = hmac.new(self.key, raw, hashlib.sha256).digest()[:16]
        self.outstanding[self.seq] = None
        if len(self.outstanding) > NONCES_HELD:
            self.outstanding.popitem(last=False)
        return base64.urlsafe_b64encode(raw + tag).rstrip(b"=").decode()

    def use(self, nonce: str) -> bool:
        if not isinstance(nonce, str) or len(nonce) != 32:
            return False
        try:
            raw = base64.urlsafe_b64decode(nonce + "==")
        except (binascii.Error, ValueError):
            return False
        if len(raw) != 24 or not hmac.compare_digest(hmac.new(self.key, raw[:8], hashlib.sha256).digest()[:16], raw[8:]):
            return False
        seq = struct.unpack(">Q", raw[:8])[0]
        if seq not in self.outstanding:
            return False
        del self.outstanding[seq]
        return True


class AcmeStore:
    """Blocking calls, one connection behind a lock: the service runs them in a worker thread."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "acme.sqlite")
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()
        self.open_orders = self.db.execute(
            "SELECT count(*) FROM objects WHERE kind='order' AND status IN ('pending','ready','processing')").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def _tx(self, fn, *args):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(*args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ accounts

    def account_by_thumbprint(self, tp: str) -> dict | None:
        rows = self._q("SELECT id, thumbprint, jwk, status, contact, eab_kid, profiles, patterns, created FROM accounts WHERE thumbprint=?", (tp,))
        return _account(rows[0]) if rows else None

    def account(self, aid: int) -> dict | None:
        rows = self._q("SELECT id, thumbprint, jwk, status, contact, eab_kid, profiles, patterns, created FROM accounts WHERE id=?", (aid,))
        return _account(rows[0]) if rows else None

    def next_account_id(self) -> int:
        """An id for an account about to be made (its URL goes into an EAB binding first)."""
        with self.lock:
            row = self.db.execute("SELECT max(id) FROM accounts").fetchone()
        return (row[0] or 0) + 1 + secrets.randbelow(1000)

    def create_account(self, aid: int, tp: str, jwk: str, contact: list, eab_kid: str | None, profiles: tuple, patterns: tuple) -> dict:
        def w():
            row = self.db.execute("SELECT id FROM accounts WHERE thumbprint=?", (tp,)).fetchone()
            if row:
                return row[0]
            self.db.execute("INSERT INTO accounts VALUES (?,?,?,?,?,?,?,?,?)",
                            (aid, tp, jwk, "valid", json.dumps(contact), eab_kid, " ".join(profiles), " ".join(patterns), int(time.time())))
            return aid
        return self.account(self._tx(w))  # type: ignore[return-value]

    def update_account(self, aid: int, **fields: Any) -> None:
        cols = {"status": "status", "contact": "contact", "jwk": "jwk", "thumbprint": "thumbprint"}
        sets = ", ".join(f"{cols[k]}=?" for k in fields)
        vals = tuple(json.dumps(v) if k == "contact" else v for k, v in fields.items())
        self._tx(lambda: self.db.execute(f"UPDATE accounts SET {sets} WHERE id=?", (*vals, aid)))

    def key_change(self, aid: int, old_tp: str, new_tp: str, new_jwk: str) -> bool:
        """Swap the account key, unless the new key already belongs to an account."""
        def w():
            if self.db.execute("SELECT 1 FROM accounts WHERE thumbprint=?", (new_tp,)).fetchone():
                return False
            n = self.db.execute("UPDATE accounts SET thumbprint=?, jwk=? WHERE id=? AND thumbprint=?",
                                (new_tp, new_jwk, aid, old_tp)).rowcount
            return n == 1
        return self._tx(w)

    # ------------------------------------------------------------ orders and authorizations

    def put(self, kind: str, oid: str, account: int, expires: int, status: str, doc: dict, new: bool = False) -> None:
        def w():
            if new and kind == "order":
                self.open_orders += 1
            elif kind == "order":
                old = self.db.execute("SELECT status FROM objects WHERE id=?", (oid,)).fetchone()
                if old and old[0] in ("pending", "ready", "processing") and status not in ("pending", "ready", "processing"):
                    self.open_orders -= 1
            self.db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?,?)",
                            (oid, kind, account, expires, status, json.dumps(doc, separators=(",", ":")),
                             doc.get("_created", int(time.time()))))
        self._tx(w)

    def put_many(self, items: list[tuple[str, str, int, int, str, dict]]) -> None:
        def w():
            for kind, oid, account, expires, status, doc in items:
                if kind == "order":
                    self.open_orders += 1
                self.db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?,?)",
                                (oid, kind, account, expires, status, json.dumps(doc, separators=(",", ":")), int(time.time())))
        self._tx(w)

    def get(self, kind: str, oid: str) -> dict | None:
        rows = self._q("SELECT doc FROM objects WHERE id=? AND kind=?", (oid, kind))
        return json.loads(rows[0][0]) if rows else None

    def owner(self, oid: str) -> int | None:
        """The account an order or authorization belongs to."""
        rows = self._q("SELECT account FROM objects WHERE id=?", (oid,))
        return rows[0][0] if rows else None

    def orders_of(self, account: int, limit: int = 1000) -> list[str]:
        return [r[0] for r in self._q("SELECT id FROM objects WHERE account=? AND kind='order' AND status IN "
                                       "('pending','ready','processing','valid') ORDER BY created DESC LIMIT ?", (account, limit))]

    def orders_since(self, account: int, since: int) -> int:
        return self._q("SELECT count(*) FROM objects WHERE account=? AND kind='order' AND created>=?", (account, since))[0][0]

    def open_orders_of(self, account: int) -> int:
        return self._q("SELECT count(*) FROM objects WHERE account=? AND kind='order' AND status IN ('pending','ready','processing')",
                       (account,))[0][0]

    def purge(self, now: int, keep: int = 7 * 86400) -> int:
        """Forget orders and authorizations expired for a week (certificates stay)."""
        def w():
            n = self.db.execute("SELECT count(*) FROM objects WHERE kind='order' AND expires<? AND status IN ('pending','ready','processing')",
                                (now,)).fetchone()[0]
            self.open_orders -= n
            self.db.execute("UPDATE objects SET status='invalid' WHERE kind='order' AND expires<? AND status IN ('pending','ready','processing')", (now,))
            return self.db.execute("DELETE FROM objects WHERE expires<?", (now - keep,)).rowcount
        return self._tx(w)

    # ------------------------------------------------------------ certificates

    def add_cert(self, cid: str, account: int, order_id: str, ca: str, serial: str, ari_id: str, nb: int, na: int, chain: str,
                 replaces: str | None) -> None:
        def w():
            self.db.execute("INSERT INTO certs VALUES (?,?,?,?,?,?,?,?,?,NULL)", (cid, account, order_id, ca, serial, ari_id, nb, na, chain))
            if replaces:
                self.db.execute("UPDATE certs SET replaced_by=? WHERE ari_id=?", (cid, replaces))
        self._tx(w)

    def cert(self, cid: str) -> dict | None:
        rows = self._q("SELECT id, account, order_id, ca, serial, ari_id, not_before, not_after, chain, replaced_by FROM certs WHERE id=?", (cid,))
        return _cert(rows[0]) if rows else None

    def cert_by_ari(self, ari_id: str) -> dict | None:
        rows = self._q("SELECT id, account, order_id, ca, serial, ari_id, not_before, not_after, chain, replaced_by FROM certs WHERE ari_id=?", (ari_id,))
        return _cert(rows[0]) if rows else None


def _account(r: tuple) -> dict:
    return {"id": r[0], "thumbprint": r[1], "jwk": r[2], "status": r[3], "contact": json.loads(r[4]), "eab_kid": r[5],
            "profiles": tuple(r[6].split()), "patterns": tuple(r[7].split()), "created": r[8]}


def _cert(r: tuple) -> dict:
    return {"id": r[0], "account": r[1], "order_id": r[2], "ca": r[3], "serial": r[4], "ari_id": r[5], "not_before": r[6],
            "not_after": r[7], "chain": r[8], "replaced_by": r[9]}

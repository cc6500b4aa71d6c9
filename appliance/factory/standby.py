"""A standby CMDB on a second disk that has every acknowledged transaction (issue 15).

Approach: SQLite's session extension (apsw.Session). Each Cmdb.tx() records its changes; right after
COMMIT, and before tx() returns (so before anything is acknowledged), the changeset is applied to the
standby database in its own durable transaction (synchronous=FULL, same cipher and key). Chosen over
copying WAL frames (frames are tied to the primary's checkpoints and salts: shipping them means
re-implementing SQLite's WAL recovery) and over a logical log of our own (every writer would have to
describe its changes): the session extension sees every row any transaction touched, tables with a
primary key (all of the CMDB's), including blobs written in the same transaction.

The standby lives in HOME/cmdb/standby/ (mount the second disk there): cmdb.sqlite and a copy of the
HSM-wrapped key, encrypted like the primary. It is seeded from the primary with SQLite's backup API at
every activation; a changeset that cannot be applied marks it stale and fails that transaction's caller
and every later write (fail closed, as a failing audit store does) until the next activation reseeds it.
`donjon standby promote` puts it in place of a lost primary (appliance/restore.py).
"""

from __future__ import annotations

import os
import shutil

import apsw

from .cmdb import Cmdb, CmdbError
from .errors import _log

FOLDER = "standby"


class StandbyError(CmdbError):
    """The standby could not take a commit: the caller gets an error, the standby is reseeded later."""


class Standby:
    def __init__(self, primary: Cmdb, home: str, key: bytes, cipher: str):
        self.primary = primary
        self.folder = os.path.join(home, FOLDER)
        self.path = os.path.join(self.folder, "cmdb.sqlite")
        self.stale = os.path.join(self.folder, "STALE")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        # Seeded afresh at every activation: a standby left from a run without shipping (or a stale one)
        # is never trusted to match; the copy costs about one backup of the CMDB.
        self._seed(key, cipher)
        shutil.copyfile(os.path.join(home, "cmdb.key"), os.path.join(self.folder, "cmdb.key"))  # the standby alone must do
        self.db = Cmdb(self.path, key, cipher)
        # A changeset holds every row the primary's transaction changed, its triggers' rows included (the
        # per-CA counts, the encoded CRL entries): triggers firing again on the standby would apply them
        # twice and abort the commit. The standby is a replica; it runs no triggers of its own.
        self.db.db.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)

    def _seed(self, key: bytes, cipher: str) -> None:
        """A consistent copy of the primary (backup API, page by page, re-encrypted with the same key)."""
        tmp = self.path + ".seeding"
        for p in (tmp, tmp + "-wal", tmp + "-shm"):
            if os.path.exists(p):
                os.unlink(p)
        old = os.umask(0o077)
        try:
            c = apsw.Connection(tmp)
        finally:
            os.umask(old)
        c.execute(f"PRAGMA cipher = '{cipher}'")
        if cipher == "chacha20":
            c.execute("PRAGMA kdf_iter = 1")
        c.execute(f"PRAGMA hexkey = '{key.hex()}'")
        with c.backup("main", self.primary.db, "main") as b:
            b.step(-1)
        c.close()
        for p in (self.path + "-wal", self.path + "-shm"):
            if os.path.exists(p):
                os.unlink(p)
        os.replace(tmp, self.path)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.exists(self.stale):
            os.unlink(self.stale)
        _log(f"standby seeded: {self.path}")

    # ------------------------------------------------------------ Cmdb.tx() calls these

    def begin(self) -> apsw.Session:
        if os.path.exists(self.stale):  # fail closed, like a failing audit store: nothing unprotected is acknowledged
            raise StandbyError("the standby CMDB missed a commit: writes are refused until it is reseeded "
                               "(restart the appliance; check the standby disk)")
        s = apsw.Session(self.primary.db, "main")
        s.attach()  # every table
        return s

    def abort(self, s: apsw.Session) -> None:
        s.close()

    def ship(self, s: apsw.Session) -> None:
        """Apply the committed transaction's changes to the standby, durably, before tx() returns."""
        try:
            cs = s.changeset()
        finally:
            s.close()
        if not cs:
            return
        try:
            with self.db.tx():
                apsw.Changeset.apply(cs, self.db.db, conflict=lambda *_: apsw.SQLITE_CHANGESET_ABORT)
        except Exception as e:  # noqa: BLE001 - any failure: the standby is behind; say so and reseed later
            with open(self.stale, "w") as f:
                f.write(f"{type(e).__name__}\n")
            raise StandbyError(f"the standby CMDB could not take the commit ({type(e).__name__}): it is reseeded at "
                               "the next activation; this request was not acknowledged") from None


def attach(primary: Cmdb, home: str, key: bytes, cipher: str) -> Standby:
    sb = Standby(primary, home, key, cipher)
    primary.shipper = sb
    return sb

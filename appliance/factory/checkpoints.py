"""Signed audit checkpoints: the CIS signs the chain head with the audit key, on a schedule and on demand."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio

from appliance.ipc import schema as S
from policy import audit as A

from .cis_link import CisRefused
from .service import Factory, FactoryError, _log


class Checkpoints:
    def __init__(self, f: Factory):
        self.f = f
        self._lock = trio.Lock()
        self._cert: bytes | None = None

    async def sign(self, actor: str) -> dict[str, Any]:
        """Sign the current head now; stored and audited with the record that follows it."""
        f = self.f
        db = f._require_active()
        async with self._lock:
            row = await f.run_db(lambda: db.db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone())
            seq, head = (row[0], row[1]) if row else (0, A.GENESIS)
            r = await self.sign_head(seq, head, actor)
            return A.checkpoint_doc(r.tbs, r.signature)

    async def sign_head(self, seq: int, head: bytes, actor: str, note: str = "") -> S.CheckpointSigned:
        """Have the CIS sign a checkpoint of (seq, head) now, check it is the one asked, store and audit
        it. The caller holds self._lock (one checkpoint signing at a time)."""
        f = self.f
        db = f._require_active()
        ts = int(time.time())
        try:
            r = await f.cis.request(S.SignCheckpoint(id=f.cis.new_id(), seq=seq, head=head, time=ts))
        except CisRefused as e:
            await f.audit(actor, "audit-checkpoint", f"seq={seq}", "refused", e.reason)
            raise FactoryError("hsm", e.reason) from None
        try:
            if A.parse_checkpoint_tbs(r.tbs) != (seq, head, ts):
                raise ValueError("different fields")
        except ValueError:
            raise FactoryError("internal", "the CIS signed a checkpoint other than the one asked") from None

        def store():
            with db.tx():
                db.db.execute("INSERT INTO checkpoints(seq, ts, head, tbs, signature) VALUES (?,?,?,?,?)",
                              (seq, ts, head, r.tbs, r.signature))
                db.audit(actor, "audit-checkpoint", f"seq={seq}", "ok", f"head {head.hex()}{note}")
        await f.run_db(store)
        return r

    async def latest(self) -> dict[str, Any] | None:
        db = self.f._require_active()
        row = await self.f.run_db(lambda: db.db.execute(
            "SELECT tbs, signature FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone())
        return A.checkpoint_doc(row[0], row[1]) if row else None

    async def latest_signed_head(self) -> bytes | None:
        """The latest signed checkpoint as bytes (its JSON form, the same as `donjon audit checkpoint --out`):
        what the Distribution agent publishes with each issued-serials list as the rollback anchor."""
        doc = await self.latest()
        return msgspec.json.encode(doc) if doc else None

    async def all(self) -> list[dict[str, Any]]:
        db = self.f._require_active()
        rows = await self.f.run_db(lambda: db.db.execute("SELECT tbs, signature FROM checkpoints ORDER BY id").fetchall())
        return [A.checkpoint_doc(t, s) for t, s in rows]

    async def cert(self) -> bytes:
        if self._cert is None:
            f = self.f
            f._require_active()
            try:
                r = await f.cis.request(S.GetAuditCert(id=f.cis.new_id()))
            except CisRefused as e:
                raise FactoryError("hsm", e.reason) from None
            self._cert = r.cert
        return self._cert

    async def scheduler(self) -> None:
        """Sign the head every `checkpoint_seconds` when it moved since the last checkpoint."""
        every = self.f.cfg.checkpoint_seconds
        if every <= 0:
            return
        while True:
            await trio.sleep(every)
            db = self.f.db
            if db is None:
                continue

            def moved():
                head = db.db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0]
                last = db.db.execute("SELECT coalesce(max(seq), -1) FROM checkpoints").fetchone()[0]
                return head > last + 1  # the record of the last checkpoint itself does not count
            try:
                if await self.f.run_db(moved):
                    await self.sign("factory:checkpoint-scheduler")
            except FactoryError as e:
                _log(f"audit checkpoint failed: {e.reason}")
                await self.f.send_event(S.Event(kind="checkpoint-failed", detail=e.reason[:4000]))

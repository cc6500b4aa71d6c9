"""Signed audit checkpoints: the CIS signs the chain head with the audit key, on a schedule and on demand."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from appliance.ipc import schema as S
from policy import audit as A

from .cis_link import CisLink, CisRefused
from .errors import FactoryError, _log
from .store import Store


class Checkpoints:
    def __init__(self, store: Store, cis: CisLink, every_seconds: int, send_event: Callable[[S.Event], Awaitable[None]]):
        self.store = store
        self.cis = cis  # the primary CIS: it holds the audit key
        self.every = every_seconds
        self.send_event = send_event
        self._lock = trio.Lock()
        self._cert: bytes | None = None

    async def sign(self, actor: str) -> dict[str, Any]:
        """Sign the current head now; stored and audited with the record that follows it."""
        st = self.store
        st.require_active()
        async with self._lock:
            seq, head = await st.run(st.audit_head)
            r = await self.sign_head(seq, head, actor)
            return A.checkpoint_doc(r.tbs, r.signature)

    async def sign_head(self, seq: int, head: bytes, actor: str, note: str = "") -> S.CheckpointSigned:
        """Have the CIS sign a checkpoint of (seq, head) now, check it is the one asked, store and audit
        it. The caller holds self._lock (one checkpoint signing at a time)."""
        st = self.store
        st.require_active()
        ts = int(time.time())
        try:
            r = await self.cis.request(S.SignCheckpoint(id=self.cis.new_id(), seq=seq, head=head, time=ts))
        except CisRefused as e:
            await st.audit(actor, "audit-checkpoint", f"seq={seq}", "refused", e.reason)
            raise FactoryError("hsm", e.reason) from None
        try:
            if A.parse_checkpoint_tbs(r.tbs) != (seq, head, ts):
                raise ValueError("different fields")
        except ValueError:
            raise FactoryError("internal", "the CIS signed a checkpoint other than the one asked") from None

        def keep():
            with st.tx():
                st.add_checkpoint(seq, ts, head, r.tbs, r.signature)
                st.audit_in_tx(actor, "audit-checkpoint", f"seq={seq}", "ok", f"head {head.hex()}{note}")
        await st.run(keep)
        return r

    async def latest(self) -> dict[str, Any] | None:
        st = self.store
        st.require_active()
        rows = await st.run(st.checkpoints, True)
        return A.checkpoint_doc(*rows[0]) if rows else None

    async def latest_signed_head(self) -> bytes | None:
        """The latest signed checkpoint as bytes (its JSON form, the same as `donjon audit checkpoint --out`):
        what the Distribution agent publishes with each issued-serials list as the rollback anchor."""
        doc = await self.latest()
        return msgspec.json.encode(doc) if doc else None

    async def all(self) -> list[dict[str, Any]]:
        st = self.store
        st.require_active()
        rows = await st.run(st.checkpoints, False)
        return [A.checkpoint_doc(t, s) for t, s in rows]

    async def cert(self) -> bytes:
        if self._cert is None:
            self.store.require_active()
            try:
                r = await self.cis.request(S.GetAuditCert(id=self.cis.new_id()))
            except CisRefused as e:
                raise FactoryError("hsm", e.reason) from None
            self._cert = r.cert
        return self._cert

    async def scheduler(self) -> None:
        """Sign the head every `checkpoint_seconds` when it moved since the last checkpoint."""
        every = self.every
        if every <= 0:
            return
        while True:
            await trio.sleep(every)
            st = self.store
            if not st.active:
                continue
            try:
                if await st.run(st.audit_moved_since_checkpoint):
                    await self.sign("factory:checkpoint-scheduler")
            except FactoryError as e:
                _log(f"audit checkpoint failed: {e.reason}")
                await self.send_event(S.Event(kind="checkpoint-failed", detail=e.reason[:4000]))

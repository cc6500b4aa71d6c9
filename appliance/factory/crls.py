"""CRLs and issued-serials lists: numbering, streaming to the CIS, storage, and the scheduler that keeps them fresh."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from appliance.ipc import schema as S

from .checkpoints import Checkpoints
from .cis_link import CisLink, CisUnresponsive
from .crlshards import CrlShards
from .dist import Dist
from .errors import FactoryError, _log
from .issuers import Issuers
from .ocsp import OcspProducer
from .store import Store

CRL_CHUNK = 10000
CRL_CHECK_SECONDS = 60
SERIALS_MIN_INTERVAL = 5.0  # seconds between two issued-serials lists of one CA


class SignedLists:
    def __init__(self, cfg: S.FactoryConfig, store: Store, cis: CisLink, issuers: Issuers, dist: Dist, ocsp: OcspProducer,
                 send_event: Callable[[Any], Awaitable[None]], stats: dict[str, int]):
        self.cfg = cfg
        self.store = store
        self.cis = cis
        self.issuers = issuers
        self.dist = dist
        self.ocsp = ocsp
        self.send_event = send_event
        self.stats = stats
        self.checkpoints: Checkpoints | None = None  # set by main once the CIS link is up
        self._locks: dict[str, trio.Lock] = {}
        self._crl_dirty: set[str] = set()
        self._wake = trio.Event()
        self._serials_dirty: set[str] = set()
        self._serials_last: dict[str, float] = {}
        self.shards = CrlShards(store, dict(cfg.crl_shards))

    def cert_issued(self, ca: str, serial: int | None = None) -> None:
        """DB thread, inside the issuing transaction: the certificate's CRL shard is kept with it, and the
        CA's issued-serials list is due (when wanted)."""
        if serial is not None:
            self.shards.cert_issued(self.store.require_active().db, ca, serial)
        if self.dist.wants_serials(ca):
            self._serials_dirty.add(ca)  # the scheduler is woken by the caller, in the trio thread

    def wake_if_due(self) -> None:
        """Trio thread, after an issuance commit."""
        if self._serials_dirty:
            self._wake.set()

    def revocations_changed(self, ca: str) -> None:
        """A new CRL soon (debounced), fresh OCSP responses, distribution jobs on their way."""
        self._crl_dirty.add(ca)
        self._wake.set()
        self.ocsp.poke()
        self.dist.poke()

    async def generate_crl(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        """Stream the CA's revocations to the CIS and store the signed CRL. Returns (number, entries, sha256)."""
        lock = self._locks.setdefault(ca, trio.Lock())
        async with lock:
            got = await self._generate_signed_list(ca, actor, "crl")
            # A sharded CA keeps its complete CRL (<ca>.crl, as before) and signs every shard beside it
            n = await self.store.run(lambda: self.shards.effective(self.store.require_active().db, ca))
            for k in range(n if n > 1 else 0):
                await self._generate_signed_list(ca, actor, "crl", shard=k)
            return got

    async def generate_serials_list(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        """Stream every serial the CA issued to the CIS and store the signed issued-serials list. A fresh
        signed audit checkpoint comes first: it is published beside the list (the rollback anchor)."""
        lock = self._locks.setdefault("serials:" + ca, trio.Lock())
        async with lock:
            if self.checkpoints is not None:
                try:
                    await self.checkpoints.sign(actor)
                except FactoryError as e:
                    _log(f"no fresh audit checkpoint for the issued-serials list of {ca}: {e.reason}")
            return await self._generate_signed_list(ca, actor, "issued-serials")

    async def _generate_signed_list(self, ca: str, actor: str, kind: str, shard: int | None = None) -> tuple[int, int, bytes]:
        """One streaming path for both signed lists: a CRL (revocations) and the issued-serials list
        (every serial in state 'issued'), read from a WAL snapshot, encoded and signed by the CIS."""
        db = self.store.require_active()
        await self.issuers.ca_row(ca)
        crl = kind == "crl"
        action = kind
        this_update = int(time.time())
        next_update = this_update + self.cfg.crl_validity_hours * 3600

        store = self.store
        sh = self.shards
        # a shard is stored and numbered as "<ca>-<k>", its own sequence (a refused number stays spent)
        name = ca if shard is None else f"{ca}-{shard}"
        if shard is None:
            number = await store.run(store.next_list_number, ca, kind)
        else:
            def take() -> int:
                with db.tx() as c:
                    return sh.next_number(c, ca, shard)
            number = await store.run(take)

        def give_back():
            # Nothing was signed under this number: it is reused, so CRL numbers stay without gaps.
            if shard is None:
                with db.tx():
                    store.give_back_list_number(ca, kind, number)

        if shard is None:
            count, length = await store.read(store.list_snapshot_begin, ca, kind)
        else:
            count, length = await store.read(sh.snapshot_begin, ca, shard)
        mid = self.cis.new_id()
        replies = self.cis.open(mid)
        tmp = tempfile.TemporaryFile(dir=self.cfg.home)
        tbs_hash = hashlib.sha256()
        tbs_len = 0
        signed: S.CrlSigned | None = None
        refused: S.Refused | None = None
        late: CisUnresponsive | None = None
        try:
            async with trio.open_nursery() as n:
                async def sender():
                    try:
                        await self.cis.send(S.CrlBegin(id=mid, ca=ca, crl_number=number, this_update=this_update,
                                                       next_update=next_update, entry_count=count, entries_length=length,
                                                       kind=kind, shard=shard))
                        after = b""
                        while True:
                            rows = await (store.read(store.list_page, ca, kind, after, CRL_CHUNK) if shard is None else
                                          store.read(sh.snapshot_page, ca, shard, after, CRL_CHUNK))
                            if not rows:
                                break
                            after = rows[-1][0]
                            await self.cis.send(S.CrlEntries(id=mid, entries=rows) if crl else
                                                S.SerialEntries(id=mid, serials=[r[0] for r in rows]))
                        await self.cis.send(S.CrlEnd(id=mid))
                    finally:
                        with trio.CancelScope(shield=True):  # the reader's snapshot ends even when the CIS refused
                            await store.read(store.list_snapshot_end)
                n.start_soon(sender)
                while True:
                    try:
                        m = await self.cis.receive(replies)
                    except CisUnresponsive as e:
                        late = e
                        n.cancel_scope.cancel()
                        break
                    if isinstance(m, S.CrlChunk):
                        tbs_hash.update(m.data)
                        tbs_len += len(m.data)
                        await trio.to_thread.run_sync(tmp.write, m.data)
                    elif isinstance(m, S.CrlSigned):
                        signed = m
                        break
                    else:  # Refused: stop the sender; audit and answer outside the cancelled scope
                        refused = m
                        n.cancel_scope.cancel()
                        break
            if late is not None:  # it may yet sign: the number is not given back
                await self.store.audit(actor, action, f"{name}#{number}", "failed", f"{late.reason}; number {number} skipped")
                raise FactoryError(late.code, late.reason)
            if refused is not None:
                await self.store.run(give_back)
                what = "CRL" if crl else "issued-serials list"
                await self.store.audit(actor, action, f"{name}#{number}", "refused", f"{refused.code}: {refused.reason}; number {number} not used")
                raise FactoryError("lint" if refused.code == "lint" else refused.code,
                                   f"the CIS refused to sign {what} #{number} of {name}: {refused.reason}")
            if signed is None:
                raise FactoryError("internal", f"no signed {'CRL' if crl else 'issued-serials list'} from the CIS")
            if tbs_hash.digest() != signed.tbs_sha256:
                raise FactoryError("internal", "the bytes received differ from what the CIS signed")

            def keep():
                total = len(signed.prefix) + tbs_len + len(signed.suffix)

                def parts():
                    yield signed.prefix
                    tmp.seek(0)
                    while chunk := tmp.read(1 << 20):
                        yield chunk
                    yield signed.suffix
                with db.tx():
                    digest = store.store_signed_list(kind, name, number, this_update, next_update, count, parts(), total)
                    if shard is None:  # shards are not yet published by the Distribution agent
                        self.dist.enqueue_object(db.db, action, ca, number)  # published with the same commit
                    db.audit(actor, action, f"{name}#{number}", "ok", f"entries={count} sha256={digest.hex()}")
                return digest
            digest = await self.store.run(keep)
        finally:
            self.cis.close(mid, answered=late is None)
            tmp.close()
        self.dist.poke()
        if crl:
            self.stats["crls"] += 1
            await self.ocsp.publish_crl(ca, number, shard=shard)
        return number, count, digest

    async def crl_scheduler(self) -> None:
        """Sign a new CRL right after revocations (debounced), and re-sign each CA's CRL once half
        of its validity has passed, so that a published CRL never lapses."""
        while True:
            with trio.move_on_after(SERIALS_MIN_INTERVAL if self._serials_dirty else CRL_CHECK_SECONDS):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self.store.active:
                continue
            await trio.sleep(0.2)  # let a burst of revocations land in one CRL
            todo = self._crl_dirty | await self.store.run(self.store.crls_due, int(time.time()))
            self._crl_dirty = set()
            for ca in sorted(todo):
                try:
                    number, count, _ = await self.generate_crl(ca, "factory:crl-scheduler")
                    _log(f"CRL {ca} #{number} signed ({count} entries)")
                except FactoryError as e:
                    self._crl_dirty.add(ca)
                    await self.send_event(S.Event(kind="crl-failed", detail=f"{ca}: {e.reason}"[:4000]))
                if self.dist.wants_serials(ca):
                    self._serials_dirty.add(ca)  # the list is re-signed with each CRL, so it never lapses first
            await self._sign_serials_lists()

    async def _sign_serials_lists(self) -> None:
        """Issued-serials lists for CAs with a destination that wants them: after issuance (at most
        every SERIALS_MIN_INTERVAL seconds per CA) and with every CRL."""
        now = trio.current_time()
        for ca in sorted(self._serials_dirty):
            if now - self._serials_last.get(ca, -1e9) < SERIALS_MIN_INTERVAL:
                continue
            self._serials_dirty.discard(ca)
            self._serials_last[ca] = now
            try:
                number, count, _ = await self.generate_serials_list(ca, "factory:crl-scheduler")
                _log(f"issued-serials list {ca} #{number} signed ({count} serials)")
            except FactoryError as e:
                self._serials_dirty.add(ca)
                await self.send_event(S.Event(kind="crl-failed", detail=f"{ca} issued-serials: {e.reason}"[:4000]))

    async def crl_chunks(self, ca: str, number: int | None = None, table: str = "crls"):
        """Yield the stored CRL (or issued-serials list) DER in 1 MiB pieces (latest unless a number is given)."""
        self.store.require_active()
        row = await self.store.run(self.store.signed_list_blob, table, ca, number)
        if not row:
            what = "CRL" if table == "crls" else "issued-serials list"
            raise FactoryError("not-found", f"no {what} for CA {ca!r} yet")
        rowid, size = row
        off = 0
        while off < size:
            n = min(1 << 20, size - off)
            yield await self.store.run(self.store.read_blob, table, rowid, off, n)
            off += n

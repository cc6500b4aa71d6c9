"""CRLs and issued-serials lists: numbering, streaming to the CIS, storage, and the scheduler that keeps them fresh."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from appliance.ipc import schema as S
from policy import crl as pcrl

from .checkpoints import Checkpoints
from .cis_link import CisLink, CisUnresponsive
from .cmdb import serial_int
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
                 send_event: Callable[[Any], Awaitable[None]], stats: dict[str, int], signers: list[CisLink] | None = None):
        self.cfg = cfg
        self.store = store
        self.cis = cis
        self.signers = signers or [cis]  # every CIS process: a sharded CA's shards are signed on all of them
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
        self.delta = dict(cfg.crl_delta)  # CA -> minutes between delta CRLs
        self._delta_dirty: set[str] = set()
        self._delta_last: dict[str, float] = {}
        self._delta_blocked: dict[str, str] = {}  # CA -> why its deltas can't start (its full CRLs go on)

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
        """A new CRL soon (debounced), fresh OCSP responses, distribution jobs on their way. A CA with
        delta CRLs gets a delta (its full CRL, the base, is re-signed at half its validity)."""
        (self._delta_dirty if ca in self.delta else self._crl_dirty).add(ca)
        self._wake.set()
        self.ocsp.poke()
        self.dist.poke()

    async def generate_crl(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        """Stream the CA's revocations to the CIS and store the signed CRL. Returns (number, entries, sha256)."""
        lock = self._locks.setdefault(ca, trio.Lock())
        async with lock:
            if ca in self.delta:  # log every revocation change from before this base's snapshot on
                def enable() -> None:
                    with self.store.require_active().tx() as c:
                        self.shards.enable_deltas(c, ca)
                try:
                    await self.store.run(enable)
                    self._delta_blocked.pop(ca, None)
                except FactoryError as e:  # a name clash: no deltas, but the full CRL never lapses for it
                    self._delta_blocked[ca] = e.reason
                    await self.send_event(S.Event(kind="crl-failed", detail=f"{ca} delta: {e.reason}"[:4000]))
            # A sharded CA keeps its complete CRL (<ca>.crl, as before) and signs every shard beside it;
            # its shards, not the complete CRL, are the bases of its deltas (one scope each)
            n = await self.store.run(lambda: self.shards.effective(self.store.require_active().db, ca))
            got = await self._generate_signed_list(ca, actor, "crl", base=n == 1)
            if n > 1:
                await self._generate_shards(ca, actor, n)
            return got

    async def _generate_shards(self, ca: str, actor: str, n: int) -> None:
        """Every shard of a sharded CA from one snapshot, signed in parallel: one shard at a time on each CIS
        process (hsm.signers), the pages of all of them read in turn by the one reader. A shard that fails
        leaves the others signed; the first failure is raised once all are done."""
        store, sh = self.store, self.shards

        def begin() -> list[tuple[int, int, bool, int]]:
            r = store.snapshot_begin()
            try:
                out = []
                log_seq = sh.log_seq(r)  # where the revocation log stands in this snapshot: each shard's base mark
                encoded, revoked = store.shard_der_counts(ca)
                if sum(c for c, _ in encoded.values()) == revoked and not sh.recovered(r, ca):
                    # all encoded, each in its shard, none known only by its serial: no join needed
                    return [(*encoded.get(k, (0, 0)), k in encoded, log_seq) for k in range(n)]
                for k, (count, length) in enumerate(sh.shard_counts(r, ca, n)):
                    out.append((count, length, count > 0 and encoded.get(k, (0, 0))[0] == count, log_seq))
                return out
            except BaseException:
                store.snapshot_abort()
                raise
        t0 = trio.current_time()
        opened = await store.read(begin)
        todo = list(range(n))
        errors: list[FactoryError] = []

        async def worker(link: CisLink) -> None:
            while todo:
                k = todo.pop(0)
                try:
                    await self._generate_signed_list(ca, actor, "crl", shard=k, link=link, opened=opened[k])
                except FactoryError as e:
                    errors.append(e)
        try:
            async with trio.open_nursery() as nursery:
                for link in self.signers[:n]:
                    nursery.start_soon(worker, link)
        finally:
            with trio.CancelScope(shield=True):
                await store.read(store.list_snapshot_end)
        _log(f"CRL shards of {ca}: {n} signed in {trio.current_time() - t0:.2f} s "
             f"({sum(o[0] for o in opened)} entries, {len(self.signers[:n])} CIS processes, {len(errors)} failed)")
        if errors:
            raise errors[0]

    async def generate_delta(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        """A delta CRL on the CA's latest full CRL (one signed first if none is a base yet): what changed
        since, removals as removeFromCRL; its number from the same sequence as the base."""
        if ca not in self.delta:
            raise FactoryError("bad-request", f"CA {ca} has no delta CRLs (crl.delta in donjon.toml)")
        if ca in self._delta_blocked:
            raise FactoryError("config", self._delta_blocked[ca])
        db = self.store.require_active()
        n = await self.store.run(lambda: self.shards.effective(db.db, ca))

        def latest_bases() -> list[int | None]:  # per scope: the CA's one CRL (0), or each shard
            return [self.store.latest_base_crl(ca, k) for k in range(n)]
        if None in await self.store.run(latest_bases):
            await self.generate_crl(ca, actor)
            if ca in self._delta_blocked:
                raise FactoryError("config", self._delta_blocked[ca])
        lock = self._locks.setdefault(ca, trio.Lock())
        async with lock:
            bases = await self.store.run(latest_bases)
            if None in bases:
                raise FactoryError("internal", f"no full CRL of {ca} to base a delta on")
            this_update = int(time.time())

            def entries(k: int, base: int) -> list[tuple[Any, ...]]:
                present, removed = self.shards.delta_entries(db.db, ca, k, base)
                rows = present + [(s, this_update, 8, None) for s in removed]  # removeFromCRL: delta CRLs only
                return sorted(rows, key=lambda r: bytes(r[0]))
            self._delta_last[ca] = trio.current_time()
            if n == 1:
                base = bases[0]
                assert base is not None
                return await self._generate_signed_list(ca, actor, "crl", delta=(base, await self.store.run(entries, 0, base)))
            # a sharded CA: one delta per shard, on that shard's base, with its IDP (RFC 5280 §5.2.5)
            got: tuple[int, int, bytes] | None = None
            for k, base in enumerate(bases):
                assert base is not None
                r = await self._generate_signed_list(ca, actor, "crl", shard=k, delta=(base, await self.store.run(entries, k, base)))
                got = got or r
            assert got is not None
            return got

    def delta_name(self, ca: str) -> str:
        """The stored name of the delta `generate_delta` answers with: <ca>-delta, or shard 0's of a sharded CA."""
        return f"{ca}-delta" if self.shards.wanted.get(ca, 1) == 1 else f"{ca}-0-delta"

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

    async def _generate_signed_list(self, ca: str, actor: str, kind: str, shard: int | None = None,
                                    delta: tuple[int, list[tuple[Any, ...]]] | None = None, link: CisLink | None = None,
                                    opened: tuple[int, int, bool, int] | None = None, base: bool = True) -> tuple[int, int, bytes]:
        """One streaming path for both signed lists: a CRL (revocations) and the issued-serials list
        (every serial in state 'issued'), read from a WAL snapshot, encoded and signed by the CIS.
        `opened`: a shard's (count, length, pre-encoded, log position) in a snapshot the caller opened and ends;
        `link`: the CIS process that signs it (the primary by default); `base`: a full CRL deltas may build on
        (not a sharded CA's complete CRL: its shards are)."""
        cis = link or self.cis
        db = self.store.require_active()
        await self.issuers.ca_row(ca)
        crl = kind == "crl"
        action = kind
        this_update = int(time.time())
        next_update = this_update + self.cfg.crl_validity_hours * 3600
        if delta is not None:  # a delta lasts two of its periods (a new one comes every period)
            next_update = min(next_update, this_update + 2 * 60 * self.delta[ca])

        store = self.store
        sh = self.shards
        # a shard is stored and numbered as "<ca>-<k>", its own sequence (a refused number stays spent)
        name = ca if shard is None else f"{ca}-{shard}"
        if delta is not None:  # stored as "<ca>-delta" ("<ca>-<k>-delta"), numbered from its base's sequence (RFC 5280 §5.2.4)
            name = f"{name}-delta"
        # a full CRL deltas build on (its log position is kept with it)
        base_of = crl and base and delta is None and ca in self.delta and ca not in self._delta_blocked
        log_seq = 0
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

        if delta is not None:
            count = len(delta[1])
            length = sum(pcrl.entry_length(serial_int(r[0]), *r[1:]) for r in delta[1])
        elif opened is not None:
            count, length, der, log_seq = opened
        elif shard is None:
            count, length = await store.read(store.list_snapshot_begin, ca, kind)
            if base_of:  # where the revocation log stands in the same snapshot as the entries
                log_seq = await store.read(lambda: sh.log_seq(store._reader().db))
        else:
            count, length = await store.read(sh.snapshot_begin, ca, shard)
        # A full CRL whose entries are all kept encoded goes as pre-encoded pages (read as one blob a page,
        # checked strictly by the CIS, not echoed back); anything else entry by entry, encoded by the CIS.
        if opened is None:
            der = crl and delta is None and count > 0 and await (
                store.read(store.der_pages_ready, ca) if shard is None else store.read(store.shard_der_ready, ca, shard, count))
        header: list[bytes] = []  # DER pages: the CIS's TBS header and trailer, kept beside the entries in tmp
        header_in = trio.Event()
        mid = cis.new_id()
        replies = cis.open(mid)
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
                        await cis.send(S.CrlBegin(id=mid, ca=ca, crl_number=number, this_update=this_update,
                                                       next_update=next_update, entry_count=count, entries_length=length,
                                                       kind=kind, shard=shard,
                                                       delta_base=None if delta is None else delta[0]))
                        after = b""
                        if der:  # the entries follow the header in the hash: wait for it
                            await header_in.wait()
                        while der:
                            data, k, after = await (store.read(store.der_page, ca, after, CRL_CHUNK) if shard is None else
                                                    store.read(store.shard_der_page, ca, shard, after, CRL_CHUNK))
                            if not k:
                                break
                            tbs_hash.update(data)
                            await trio.to_thread.run_sync(tmp.write, data)
                            await cis.send(S.CrlEntriesDer(id=mid, data=data, count=k))
                        for i in range(0, len(delta[1]) if delta is not None else 0, CRL_CHUNK):
                            await cis.send(S.CrlEntries(id=mid, entries=delta[1][i:i + CRL_CHUNK]))
                        while delta is None and not der:
                            rows = await (store.read(store.list_page, ca, kind, after, CRL_CHUNK) if shard is None else
                                          store.read(sh.snapshot_page, ca, shard, after, CRL_CHUNK))
                            if not rows:
                                break
                            after = rows[-1][0]
                            await cis.send(S.CrlEntries(id=mid, entries=rows) if crl else
                                                S.SerialEntries(id=mid, serials=[r[0] for r in rows]))
                        await cis.send(S.CrlEnd(id=mid))
                    finally:
                        with trio.CancelScope(shield=True):  # the reader's snapshot ends even when the CIS refused
                            if delta is None and opened is None:
                                await store.read(store.list_snapshot_end)
                n.start_soon(sender)
                while True:
                    try:
                        m = await cis.receive(replies)
                    except CisUnresponsive as e:
                        late = e
                        n.cancel_scope.cancel()
                        break
                    if isinstance(m, S.CrlChunk) and der:  # the header, then (after every page) the trailer
                        tbs_hash.update(m.data)
                        header.append(m.data)
                        header_in.set()
                    elif isinstance(m, S.CrlChunk):
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

            if der and len(header) != 2:
                raise FactoryError("internal", "the CIS sent no TBS header and trailer around the encoded entries")

            def keep():
                total = len(signed.prefix) + (length + len(header[0]) + len(header[1]) if der else tbs_len) + len(signed.suffix)

                def parts():
                    yield signed.prefix
                    if der:
                        yield header[0]
                    tmp.seek(0)
                    while chunk := tmp.read(1 << 20):
                        yield chunk
                    if der:
                        yield header[1]
                    yield signed.suffix
                pre = hashlib.sha256()  # the digest first, so that it goes into the row with the blob
                for p in parts():
                    pre.update(p)
                with db.tx():
                    digest = store.store_signed_list(kind, name, number, this_update, next_update, count, parts(), total,
                                                     pre.digest())
                    # published with the same commit, named like its file: <ca>.crl, <ca>-<k>.crl, <ca>-delta.crl
                    self.dist.enqueue_object(db.db, action, ca, number, ("" if shard is None else f"-{shard}")
                                             + ("-delta" if delta is not None else ""))
                    if base_of:
                        sh.mark_base(db.db, ca, shard or 0, number, log_seq)
                        sh.prune_log(db.db, ca)
                    db.audit(actor, action, f"{name}#{number}", "ok", f"entries={count} sha256={digest.hex()}")
                return digest
            digest = await self.store.run(keep)
            self.dist.poke()
            if crl:
                self.stats["crls"] += 1

                async def stored() -> AsyncIterator[bytes]:
                    """The bytes just stored, from the temporary file (their digest was checked in the commit):
                    not read back out of the CMDB."""
                    yield signed.prefix + (header[0] if der else b"")
                    await trio.to_thread.run_sync(tmp.seek, 0)
                    for _ in range(tbs_len // (1 << 20) + length // (1 << 20) + 2):  # bounded: the file's size
                        chunk = await trio.to_thread.run_sync(tmp.read, 1 << 20)
                        if not chunk:
                            break
                        yield chunk
                    yield (header[1] if der else b"") + signed.suffix
                await self.ocsp.publish_crl(ca, number, shard=shard, delta=delta is not None, chunks=stored())
        finally:
            cis.close(mid, answered=late is None)
            tmp.close()
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
            await self._sign_deltas()
            await self._sign_serials_lists()

    async def _sign_deltas(self) -> None:
        """Delta CRLs: right after revocations (debounced with them) and every crl.delta minutes."""
        now = trio.current_time()
        due = self._delta_dirty | {ca for ca, m in self.delta.items() if now - self._delta_last.get(ca, -1e9) >= 60 * m}
        self._delta_dirty = set()
        for ca in sorted(due):
            if not await self.store.run(self.store.ca_name_taken, ca):
                continue  # configured before the CA is created: nothing to sign yet
            try:
                number, count, _ = await self.generate_delta(ca, "factory:crl-scheduler")
                _log(f"delta CRL {ca} #{number} signed ({count} entries)")
            except FactoryError as e:
                self._delta_dirty.add(ca)
                await self.send_event(S.Event(kind="crl-failed", detail=f"{ca} delta: {e.reason}"[:4000]))

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
        stream = self.store.blob_stream(table, rowid)
        try:
            off = 0
            while off < size:
                n = min(1 << 20, size - off)
                yield await self.store.run(stream.read, off, n)
                off += n
        finally:
            if self.store.db is None:
                stream.blob = None  # deactivated meanwhile: the connection, and the handle with it, is closed
            else:
                with trio.CancelScope(shield=True):
                    await self.store.run(stream.close)

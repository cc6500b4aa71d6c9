"""Pre-produced OCSP responses: have the CIS sign them, keep them in the CMDB, feed the endpoint.

A certificate gets a response in the transaction after its issuance or revocation (the `ocsp_queue`
row is written with it), and every response is re-signed once half of its validity has passed. The
endpoint holds no key: it only serves what it is fed, and says on connect the highest publication
sequence number it holds, so that a restart resends only what it missed.
"""

from __future__ import annotations

import time
from itertools import groupby
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import trio
from cryptography import x509

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation

from .cis_link import CisRefused
from .errors import FactoryError, _log
from .store import recovered_cert_state

if TYPE_CHECKING:
    from .cis_link import CisLink
    from .store import Store
    from .tenants import TenantManager


class OcspHost(Protocol):
    """What the producer uses of its owner (the Factory) besides the store, named so that this module
    does not import service.py (no import circle)."""

    cfg: S.FactoryConfig
    signers: list[CisLink]
    ocsp_feeds: dict[str, Channel]
    tenants: TenantManager

    async def send_event(self, ev: S.Event) -> None: ...
    async def ca_row(self, name: str) -> Any: ...
    def crl_chunks(self, ca: str, number: int | None = None) -> AsyncIterator[bytes]: ...
    async def ocsp_responder_cert(self, ca: str, days: int, actor: str) -> dict[str, Any]: ...

BATCH = 2048
BACKDATE = 60
CHECK_SECONDS = 30
RENEW_CHECK_SECONDS = 600  # how often delegated responder certificates are checked for renewal
RENEW_RETRY_SECONDS = 3600  # after a failed renewal (notified), unless an endpoint (re)connects first


def _by_this_update(items: list[tuple], backdated: int, floors: dict[bytes, int]) -> list[tuple[int, list[tuple]]]:
    """Group the items by the thisUpdate they can carry: the backdated one (client clock skew), except
    for those whose floor is later: a revocation more recent than that (a response may not say "as of
    T, revoked after T"), or a response held with a thisUpdate that late (the endpoint replaces a held
    response only with a newer one: a release from hold or a hold made permanent must be). Those are
    signed as of their latest floor, so at most two signatures per batch."""
    late = [it for it in items if floors.get(it[0], 0) > backdated]
    rest = [it for it in items if floors.get(it[0], 0) <= backdated]
    groups = [(backdated, rest)] if rest else []
    if late:
        groups.append((max(floors[it[0]] for it in late), late))
    return groups


class OcspProducer:
    def __init__(self, f: OcspHost, store: Store):
        self.f = f
        self.store = store
        self.wake = trio.Event()
        self.produced = 0
        self._ids = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self.renew_wake = trio.Event()
        self._renew_after: dict[str, float] = {}  # CA -> trio time before which a failed renewal waits

    def poke(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(CHECK_SECONDS):
                await self.wake.wait()
            self.wake = trio.Event()
            if not self.store.active:
                continue
            try:
                await self.drain()
            except CisRefused as e:
                await self.f.send_event(S.Event(kind="ocsp-failed", detail=e.reason[:4000]))

    def _due(self, now: int) -> list[tuple]:
        """Up to BATCH certificates whose response is missing, stale, or no longer says the truth."""
        st = self.store
        out = []
        for ca, serial in dict.fromkeys(st.ocsp_due_keys(now, BATCH)):
            row = st.ocsp_cert_state(ca, serial)
            if row is None:  # known only from what was published before a restore: still answered, never "unknown"
                row = recovered_cert_state(st.require_active().db, ca, serial)
            out.append((ca, serial, row))
        return out

    def _store(self, ca: str, items: list[tuple], responses: list[bytes], hashes: tuple[str, ...],
               this_update: int, next_update: int) -> tuple[list[tuple], int]:
        """Keep the new responses and dequeue their certificates in one transaction; return what to publish."""
        st = self.store
        refresh = this_update + (next_update - this_update) // 2
        published = []
        with st.tx():
            seq = st.ocsp_last_seq()
            for i, (serial, status, _, _) in enumerate(items):
                seq += 1
                by_hash = dict(zip(hashes, responses[i * len(hashes):(i + 1) * len(hashes)]))
                st.ocsp_put(ca, serial, status, this_update, next_update, refresh, seq, by_hash.get("sha1"), by_hash.get("sha256"))
                for h, der in by_hash.items():
                    published.append((serial, h, this_update, next_update, der))
        return published, seq

    def _retire(self, ca: str, serial: bytes) -> None:
        """An expired or unknown certificate: no more responses (the endpoint keeps answering until nextUpdate)."""
        with self.store.tx():
            self.store.ocsp_retire(ca, serial)

    async def drain(self) -> None:
        f = self.f
        for _ in range(100000):  # bounded: each round handles up to BATCH certificates
            now = int(time.time())
            due = await self.store.run(self._due, now)
            if not due:
                return
            for ca, group in groupby(sorted(due, key=lambda d: d[0]), key=lambda d: d[0]):
                ca_row = await f.ca_row(ca)
                ca_end = int(x509.load_der_x509_certificate(ca_row[4]).not_valid_after_utc.timestamp())
                items = []
                floors = {}  # serial -> the earliest thisUpdate its new response may carry
                for _, serial, row in group:
                    if row is None or row[0] < now:
                        await self.store.run(self._retire, ca, serial)
                        continue
                    revoked_at, reason, held_tu = row[1], row[2], row[3]
                    items.append((serial, 1 if revoked_at is not None else 0, revoked_at, reason))
                    floors[serial] = max(revoked_at or 0, held_tu + 1 if held_tu is not None else 0)
                next_update = min(now + f.cfg.ocsp_validity_hours * 3600, ca_end)
                for this_update, batch in _by_this_update(items, now - BACKDATE, floors):
                    await self._sign_batch(ca, batch, this_update, next_update)

    async def _sign_batch(self, ca: str, items: list[tuple], this_update: int, next_update: int) -> None:
        f = self.f
        signer = f.signers[self.produced % len(f.signers)]
        hashes = tuple(f.cfg.ocsp_hashes)
        reply = await signer.request(S.SignOcsp(id=signer.new_id(), ca=ca, this_update=this_update,
                                                next_update=next_update, hashes=hashes, items=items))
        if len(reply.responses) != len(items) * len(hashes):
            raise CisRefused("internal", "the CIS answered a different number of OCSP responses")
        published, seq = await self.store.run(self._store, ca, items, reply.responses, hashes, this_update, next_update)
        self.produced += len(items)
        await self.publish(S.PublishResponses(ca=ca, responses=published, seq=seq))

    async def renewal(self) -> None:
        """Renew each CA's delegated responder certificate before it lapses (after it, several CertIDs
        and nonces could no longer be answered): a new key in the endpoint's token, certified by the CA.
        A renewal that fails is notified (SNMP responder-cert-expiring) and retried."""
        while True:
            with trio.move_on_after(RENEW_CHECK_SECONDS):
                await self.renew_wake.wait()
            self.renew_wake = trio.Event()
            if not self.store.active or not self.f.cfg.responder_renew_days:
                continue
            for ca, not_after in await self.store.run(self.store.latest_responders):
                await self._renew(ca, not_after)

    async def _renew(self, ca: str, not_after: int) -> None:

        f = self.f
        if not_after - time.time() > f.cfg.responder_renew_days * 86400:
            return
        if ca in self._renew_after and trio.current_time() < self._renew_after[ca]:
            return  # failed lately (notified): retried later, or at once when an endpoint reconnects
        ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))
        try:
            ca_end = int(x509.load_der_x509_certificate((await f.ca_row(ca))[4]).not_valid_after_utc.timestamp())
            if not_after >= ca_end:
                raise FactoryError("policy", "a new responder cannot outlast the CA certificate, which ends then too")
            doc = await f.ocsp_responder_cert(ca, f.cfg.responder_days, "factory:responder-renewal")
        except FactoryError as e:
            self._renew_after[ca] = trio.current_time() + RENEW_RETRY_SECONDS
            await f.send_event(S.Event(kind="responder-renewal-failed",
                                       detail=f"{ca}: delegated responder (notAfter {ends}) not renewed: {e.reason}"[:4000]))
            return
        self._renew_after.pop(ca, None)
        _log(f"delegated responder of {ca} renewed (notAfter {ends} -> {doc['not_after']})")

    async def publish(self, msg, only: Channel | None = None) -> None:
        """Send to every connected endpoint process (or to one, during its resync)."""
        for name, chan in list(self.f.ocsp_feeds.items()) if only is None else [("", only)]:
            try:
                await chan.send(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self.f.ocsp_feeds.get(name) is chan:
                    del self.f.ocsp_feeds[name]

    async def publish_crl(self, ca: str, number: int, only: Channel | None = None, shard: int | None = None,
                          delta: bool = False, chunks: AsyncIterator[bytes] | None = None) -> None:
        """Stream one stored CRL to the endpoints: read from the CMDB, or `chunks`, the same bytes just stored."""
        if not self.f.ocsp_feeds and only is None:
            return
        name = (ca if shard is None else f"{ca}-{shard}") + ("-delta" if delta else "")
        prev: bytes | None = None  # one piece ahead, to mark the last: never the whole CRL in memory
        async for c in (chunks if chunks is not None else self.f.crl_chunks(name, number)):
            if prev is not None:
                await self.publish(S.PublishCrl(ca=ca, number=number, data=prev, last=False, shard=shard, delta=delta), only)
            prev = c
        if prev is not None:
            await self.publish(S.PublishCrl(ca=ca, number=number, data=prev, last=True, shard=shard, delta=delta), only)

    async def serve_endpoint(self, chan: Channel, role: str = "ocsp") -> None:
        """One endpoint process's link: resume from its sequence number, then push as things change."""
        f = self.f
        await chan.handshake()
        resume = await chan.recv()
        if not isinstance(resume, S.OcspResume):
            raise ProtocolViolation(f"factory-ocsp: expected OcspResume, got {type(resume).__name__}")
        st = self.store
        while not st.active:  # nothing to feed before activation; the endpoint serves its own store
            await trio.sleep(0.2)
        # This appliance's CAs, and the offline roots whose CRL calendar it publishes (two tiers: tier.py).
        cas = await st.run(st.published_cas)
        for name, der in cas:
            await self.publish(S.PublishCa(ca=name, cert=der), chan)
        # Live publication only once the endpoint knows every CA: a response signed meanwhile (an issuance
        # right after activation) must not reach it before its CA (it would be a protocol violation there).
        f.ocsp_feeds[role] = chan
        for name, *_ in cas:
            number = await st.run(st.latest_crl_number, name)
            if number:
                await self.publish_crl(name, number, chan)
            for k, kn in await st.run(st.latest_shard_crls, name):  # its CRL shards, if any
                await self.publish_crl(name, kn, chan, shard=k)
            dn = await st.run(st.latest_crl_number, name + "-delta")  # its delta CRL, if any
            if dn:
                await self.publish_crl(name, dn, chan, delta=True)
            for k, kn in await st.run(st.latest_shard_delta_crls, name):  # its shards' deltas, if any
                await self.publish_crl(name, kn, chan, shard=k, delta=True)
        after = resume.seq
        for _ in range(1 << 30):
            rows = await st.run(st.ocsp_after, after, BATCH)
            if not rows:
                break
            for ca, group in groupby(rows, key=lambda r: r[0]):
                group = list(group)
                resp = []
                for _, serial, tu, nu, sha1, sha256, _ in group:
                    resp += [(serial, h, tu, nu, d) for h, d in (("sha1", sha1), ("sha256", sha256)) if d]
                await self.publish(S.PublishResponses(ca=ca, responses=resp, seq=group[-1][6]), chan)
            after = rows[-1][6]
        await f.tenants.sync_endpoint(chan)
        self.poke()
        self._renew_after.clear()  # a (new) endpoint: check its responders now, failed ones included
        self.renew_wake.set()
        while True:  # after OcspResume the endpoint answers our requests (responder keys) and forwards pushed CRLs
            m = await chan.recv()
            if isinstance(m, S.TenantCrlPush):
                await f.tenants.on_push(chan, m)
                continue
            waiter = (self._waiting.pop(getattr(m, "id", None), None)
                      if isinstance(m, (S.ResponderKey, S.Refused, S.TenantCsr)) else None)
            if waiter is None:
                raise ProtocolViolation(f"factory-ocsp: unexpected {type(m).__name__}")
            waiter.send_nowait(m)

    async def request_responder_key(self, ca: str) -> S.ResponderKey:
        return await self.ask_endpoint(lambda rid: S.ResponderKeyRequest(id=rid, ca=ca), S.ResponderKey)

    async def ask_endpoint(self, make, expect):
        """A request to the first endpoint process (it makes keys; every process shares the
        endpoint's token); `make(id)` builds it, the answer must be an `expect` or a Refused."""
        chan = self.f.ocsp_feeds.get("ocsp") or next(iter(self.f.ocsp_feeds.values()), None)
        if chan is None:
            raise CisRefused("not-found", "the OCSP endpoint is not connected")
        self._ids += 1
        rid = self._ids
        send, recv = trio.open_memory_channel(1)
        self._waiting[rid] = send
        try:
            await chan.send(make(rid))
            with trio.fail_after(30):
                m = await recv.receive()
        finally:
            self._waiting.pop(rid, None)
        if isinstance(m, S.Refused):
            raise CisRefused(m.code, m.reason)
        if not isinstance(m, expect):
            raise CisRefused("internal", f"the endpoint answered {type(m).__name__}")
        return m


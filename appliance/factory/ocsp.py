"""Pre-produced OCSP responses: have the CIS sign them, keep them in the CMDB, feed the endpoint.

A certificate gets a response in the transaction after its issuance or revocation (the `ocsp_queue`
row is written with it), and every response is re-signed once half of its validity has passed. The
endpoint holds no key: it only serves what it is fed, and says on connect the highest publication
sequence number it holds, so that a restart resends only what it missed.
"""

from __future__ import annotations

import time
from itertools import groupby
from typing import TYPE_CHECKING

import trio
from cryptography import x509

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation

from .cis_link import CisRefused

if TYPE_CHECKING:
    from .service import Factory

BATCH = 2048
BACKDATE = 60
CHECK_SECONDS = 30


class OcspProducer:
    def __init__(self, f: "Factory"):
        self.f = f
        self.wake = trio.Event()
        self.produced = 0
        self._ids = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}

    def poke(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(CHECK_SECONDS):
                await self.wake.wait()
            self.wake = trio.Event()
            if self.f.db is None:
                continue
            try:
                await self.drain()
            except CisRefused as e:
                await self.f.send_event(S.Event(kind="ocsp-failed", detail=e.reason[:4000]))

    def _due(self, now: int) -> list[tuple]:
        """Up to BATCH certificates whose response is missing, stale, or no longer says the truth."""
        db = self.f.db.db
        keys = db.execute("SELECT ca, serial FROM ocsp_queue LIMIT ?", (BATCH,)).fetchall()
        if len(keys) < BATCH:
            keys += db.execute("SELECT ca, serial FROM ocsp WHERE refresh_at <= ? LIMIT ?", (now, BATCH - len(keys))).fetchall()
        out = []
        for ca, serial in dict.fromkeys(keys):
            row = db.execute("SELECT c.not_after, r.revoked_at, r.reason FROM certs c LEFT JOIN revocations r "
                             "ON r.ca = c.ca AND r.serial = c.serial WHERE c.ca=? AND c.serial=?", (ca, serial)).fetchone()
            out.append((ca, serial, row))
        return out

    def _store(self, ca: str, items: list[tuple], responses: list[bytes], hashes: tuple[str, ...],
               this_update: int, next_update: int) -> tuple[list[tuple], int]:
        """Keep the new responses and dequeue their certificates in one transaction; return what to publish."""
        f = self.f
        db = f.db
        refresh = this_update + (next_update - this_update) // 2
        published = []
        with db.tx():
            seq = db.db.execute("SELECT coalesce(max(seq), 0) FROM ocsp").fetchone()[0]
            for i, (serial, status, _, _) in enumerate(items):
                seq += 1
                by_hash = dict(zip(hashes, responses[i * len(hashes):(i + 1) * len(hashes)]))
                db.db.execute("INSERT OR REPLACE INTO ocsp VALUES (?,?,?,?,?,?,?,?,?)",
                              (ca, serial, status, this_update, next_update, refresh, seq, by_hash.get("sha1"), by_hash.get("sha256")))
                db.db.execute("DELETE FROM ocsp_queue WHERE ca=? AND serial=?", (ca, serial))
                for h, der in by_hash.items():
                    published.append((serial, h, this_update, next_update, der))
        return published, seq

    def _retire(self, ca: str, serial: bytes) -> None:
        """An expired or unknown certificate: no more responses (the endpoint keeps answering until nextUpdate)."""
        with self.f.db.tx():
            self.f.db.db.execute("DELETE FROM ocsp_queue WHERE ca=? AND serial=?", (ca, serial))
            self.f.db.db.execute("DELETE FROM ocsp WHERE ca=? AND serial=?", (ca, serial))

    async def drain(self) -> None:
        f = self.f
        for _ in range(100000):  # bounded: each round handles up to BATCH certificates
            now = int(time.time())
            due = await f.run_db(self._due, now)
            if not due:
                return
            for ca, group in groupby(sorted(due, key=lambda d: d[0]), key=lambda d: d[0]):
                ca_row = await f.ca_row(ca)
                ca_end = int(x509.load_der_x509_certificate(ca_row[4]).not_valid_after_utc.timestamp())
                items = []
                for _, serial, row in group:
                    if row is None or row[0] < now:
                        await f.run_db(self._retire, ca, serial)
                        continue
                    revoked_at, reason = row[1], row[2]
                    items.append((serial, 1 if revoked_at is not None else 0, revoked_at, reason))
                if not items:
                    continue
                this_update = now - BACKDATE
                next_update = min(now + f.cfg.ocsp_validity_hours * 3600, ca_end)
                signer = f.signers[self.produced % len(f.signers)]
                hashes = tuple(f.cfg.ocsp_hashes)
                reply = await signer.request(S.SignOcsp(id=signer.new_id(), ca=ca, this_update=this_update,
                                                        next_update=next_update, hashes=hashes, items=items))
                if len(reply.responses) != len(items) * len(hashes):
                    raise CisRefused("internal", "the CIS answered a different number of OCSP responses")
                published, seq = await f.run_db(self._store, ca, items, reply.responses, hashes, this_update, next_update)
                self.produced += len(items)
                await self.publish(S.PublishResponses(ca=ca, responses=published, seq=seq))

    async def publish(self, msg, only: Channel | None = None) -> None:
        """Send to every connected endpoint process (or to one, during its resync)."""
        for name, chan in list(self.f.ocsp_feeds.items()) if only is None else [("", only)]:
            try:
                await chan.send(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self.f.ocsp_feeds.get(name) is chan:
                    del self.f.ocsp_feeds[name]

    async def publish_crl(self, ca: str, number: int, only: Channel | None = None) -> None:
        if not self.f.ocsp_feeds and only is None:
            return
        chunks = [c async for c in self.f.crl_chunks(ca, number)]
        for i, c in enumerate(chunks):
            await self.publish(S.PublishCrl(ca=ca, number=number, data=c, last=i == len(chunks) - 1), only)

    async def serve_endpoint(self, chan: Channel, role: str = "ocsp") -> None:
        """One endpoint process's link: resume from its sequence number, then push as things change."""
        f = self.f
        await chan.handshake()
        resume = await chan.recv()
        if not isinstance(resume, S.OcspResume):
            raise ProtocolViolation(f"factory-ocsp: expected OcspResume, got {type(resume).__name__}")
        while f.db is None:  # nothing to feed before activation; the endpoint serves its own store
            await trio.sleep(0.2)
        f.ocsp_feeds[role] = chan
        for name, _, _, _, der in [tuple(r) for r in await f.run_db(lambda: f.db.db.execute(
                "SELECT name, key_type, parent, profile, cert FROM cas").fetchall())]:
            await self.publish(S.PublishCa(ca=name, cert=der), chan)
            number = await f.run_db(lambda n=name: f.db.db.execute("SELECT max(number) FROM crls WHERE ca=?", (n,)).fetchone()[0])
            if number:
                await self.publish_crl(name, number, chan)
        after = resume.seq
        for _ in range(1 << 30):
            rows = await f.run_db(lambda a=after: f.db.db.execute(
                "SELECT ca, serial, this_update, next_update, sha1, sha256, seq FROM ocsp WHERE seq > ? ORDER BY seq LIMIT ?",
                (a, BATCH)).fetchall())
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


"""The Distribution agent role: take jobs from the Factory, verify, publish, acknowledge.

Stateless: the queue lives in the CMDB; this process holds the destinations' credentials in memory
only (never logged) and reaches LDAP/HTTP servers outbound. One worker per destination publishes its
jobs in order; a failure makes the rest of that round "not attempted" so the Factory resends them,
in order, after its backoff. A broken destination never blocks the others.
"""

from __future__ import annotations

import os
import sys

import trio

# Everything used after drop() is imported before it (Landlock, seccomp).
import ldap3  # noqa: F401
import ldap3.operation  # noqa: F401
import ldap3.strategy.sync  # noqa: F401
import ldap3.operation.add  # noqa: F401
import ldap3.utils.asn1  # noqa: F401
import http.client  # noqa: F401
import ssl  # noqa: F401
import encodings.idna  # noqa: F401 - host names with ldap3/http.client

from appliance import roles
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation
from appliance.ipc.links import FACTORY_DIST

from .fetch import fetch
from .publish import Job, PublishError, publisher_for

MAX_OBJECT = 256 * 1024 * 1024  # a CRL bigger than this is refused (the Factory never makes one)
FETCH_CHUNK = 1 << 20
FETCHERS = 2  # tenant CRL fetches at once
LANE_BATCH = 64  # queued jobs of one lane published per thread hop


def _log(msg: str) -> None:
    print(f"donjon[distribution {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class Worker:
    """One destination: `rule.connections` lanes, each a publisher (a blocking client in its own
    thread) with its queue. An object (an entry, a CA's CRL, a URL) always takes the same lane, so
    its jobs stay in order while different objects are published in parallel."""

    def __init__(self, rule: S.DistRule, ack):
        self.rule = rule
        self.lanes = []
        for _ in range(rule.connections):
            send, recv = trio.open_memory_channel[tuple[S.DistJob, bytes]](1 << 16)
            self.lanes.append((publisher_for(rule), send, recv, trio.CapacityLimiter(1)))
        self.ack = ack
        self.failed_round: int | None = None

    def submit(self, m: S.DistJob, data: bytes) -> None:
        subject = tuple(kv for kv in m.subject if kv[0] != "serial")
        key = (m.action if m.action not in ("cert", "uncert") else "cert", m.ca, subject)
        self.lanes[hash(key) % len(self.lanes)][1].send_nowait((m, data))

    def close(self) -> None:
        for publisher, *_ in self.lanes:
            publisher.close()

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            for lane in self.lanes:
                n.start_soon(self._lane, *lane)

    async def _lane(self, publisher, send, recv, limiter) -> None:
        def publish_run(jobs: list[Job]) -> list[PublishError | None]:
            """Publish in order in one thread hop (the hop costs more than a local LDAP round trip);
            stop at the first failure: what follows it is decided again by the round rules below (LDAP
            sends runs of new entries pipelined, with the same outcomes)."""
            return publisher.publish_run(jobs)

        def skipped(m: S.DistJob) -> bool:
            return self.failed_round is not None and m.round <= self.failed_round

        async for first in recv:
            batch = [first]
            while len(batch) < LANE_BATCH:  # what is already queued goes in the same hop
                try:
                    batch.append(recv.receive_nowait())
                except trio.WouldBlock:
                    break
            acks: list[S.DistAck] = []  # sent together: one write for the run, not one per job
            i = 0
            while i < len(batch):
                m = batch[i][0]
                if skipped(m):
                    acks.append(S.DistAck(id=m.id, outcome="failed", error="an earlier job of this destination failed",
                                          attempted=False))
                    i += 1
                    continue
                run = []
                for m, data in batch[i:]:
                    if skipped(m):
                        break
                    run.append((m, Job(action=m.action, ca=m.ca, ca_root=m.ca_root, issuer=m.issuer, subject=dict(m.subject),
                                       number=m.number, data=data, attachment=m.attachment, part=m.part)))
                outcomes = await trio.to_thread.run_sync(publish_run, [j for _, j in run], limiter=limiter,
                                                         abandon_on_cancel=True)
                for (m, _), e in zip(run, outcomes):
                    if e is not None:
                        if not e.permanent:
                            self.failed_round = max(self.failed_round or 0, m.round)
                        _log(f"{self.rule.name}: job {m.id} ({m.action} {m.ca}): {e}")
                        acks.append(S.DistAck(id=m.id, outcome="permanent" if e.permanent else "failed", error=str(e)[:4000]))
                        continue
                    if self.failed_round is not None and m.round > self.failed_round:
                        self.failed_round = None  # a newer round went through: the destination is back
                    acks.append(S.DistAck(id=m.id, outcome="done"))
                i += len(outcomes)
                await self.ack(acks)
                acks = []
            if acks:
                await self.ack(acks)


async def main(fds: dict[str, int], drop) -> None:
    await roles.serve("distribution", fds, drop, lambda sup, cfg: _setup(fds, cfg))


async def _setup(fds: dict[str, int], cfg: S.DistConfig) -> roles.Body:
    fac = Channel.from_fd(fds[FACTORY_DIST.name], FACTORY_DIST.name, FACTORY_DIST.down)
    lock = trio.Lock()
    workers: dict[str, Worker] = {}

    async def ack(a) -> None:  # one message, or a list of them in one write
        async with lock:
            await (fac.send_many(a) if isinstance(a, list) else fac.send(a))

    async def connect() -> None:  # after the drop, as before: publishers are made unprivileged
        workers.update({r.name: Worker(r, ack) for r in cfg.rules})  # may be none: the agent then only fetches tenant CRLs

    def close() -> None:
        for w in workers.values():
            w.close()

    async def serve(n: trio.Nursery) -> None:
        for w in workers.values():
            n.start_soon(w.run)
        await fac.handshake()
        pending: dict[int, tuple[S.DistJob, list[bytes], int]] = {}
        fetchers = trio.CapacityLimiter(FETCHERS)

        async def fetch_crl(m: S.FetchCrl) -> None:
            async with fetchers:
                try:
                    url, data = await trio.to_thread.run_sync(fetch, list(m.urls), abandon_on_cancel=True)
                except PublishError as e:
                    _log(f"tenant {m.tenant}: CRL fetch failed: {e}")
                    await ack(S.FetchFailed(id=m.id, error=str(e)[:4000]))
                    return
            for off in range(0, len(data), FETCH_CHUNK):
                await ack(S.FetchedCrl(id=m.id, url=url, data=data[off:off + FETCH_CHUNK], last=off + FETCH_CHUNK >= len(data)))

        while True:
            m = await fac.recv()
            if isinstance(m, S.FetchCrl):
                n.start_soon(fetch_crl, m)
            elif isinstance(m, S.DistJob):
                w = workers.get(m.rule)
                if w is None or m.id in pending or m.size > MAX_OBJECT:
                    raise ProtocolViolation(f"factory-distribution: bad job {m.id} for {m.rule!r}")
                if m.size == 0:
                    raise ProtocolViolation(f"factory-distribution: job {m.id} without an object")
                pending[m.id] = (m, [], 0)
            elif isinstance(m, S.DistData):
                if m.id not in pending:
                    raise ProtocolViolation(f"factory-distribution: data for unknown job {m.id}")
                job, parts, got = pending[m.id]
                parts.append(m.data)
                got += len(m.data)
                if got > job.size:
                    raise ProtocolViolation(f"factory-distribution: job {m.id} longer than announced")
                if got == job.size:
                    del pending[m.id]
                    workers[job.rule].submit(job, b"".join(parts))
                else:
                    pending[m.id] = (job, parts, got)
            else:
                raise ProtocolViolation(f"unexpected {type(m).__name__} from the Factory")
    return roles.Body(serve=serve, connect=connect, close=close)

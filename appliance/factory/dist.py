"""The Factory's side of distribution: the durable job queue (rows written in the transaction of the
event that caused them), the dispatcher feeding the Distribution agent, acknowledgements, retries with
backoff and jitter per destination, parking, and `donjon dist status|list|retry`."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
from cryptography import x509

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel

from .cmdb import serial_bytes
from .store import Store

WINDOW = 256  # jobs in flight per destination: the agent's lanes have the next ones queued while acks commit
WINDOW_BYTES = 32 << 20  # and at most this many bytes of objects (a window of big CRLs), at least one job
CHUNK = 1 << 20
BACKOFF_BASE = 1.0
FAILING_AFTER = 3  # consecutive failures before the destination is reported failing (SNMP)
DONE_RETENTION = 30 * 86400  # acknowledged jobs are kept this long for `dist list --state done`
FETCH_POLL = 5.0  # seconds between two looks at the tenants' fetch plan
FETCH_BACKOFF_MAX = 3600
FETCH_MAX = 64 << 20  # bytes: no CRL larger than this is accepted from any intake path
_SHORT = {"CN": "CN", "O": "O", "OU": "OU", "C": "C", "L": "L", "ST": "ST", "UID": "UID", "emailAddress": "E"}


def _log(msg: str) -> None:
    print(f"donjon[factory dist]: {msg}", file=sys.stderr, flush=True)


def subject_fields(cert: x509.Certificate) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for a in cert.subject:
        k = _SHORT.get(a.rfc4514_attribute_name, a.rfc4514_attribute_name if a.rfc4514_attribute_name in _SHORT.values() else None)
        if k and k not in out and isinstance(a.value, str):
            out[k] = a.value[:256]
    out["serial"] = f"{cert.serial_number:x}"
    return tuple(out.items())


@dataclass
class RuleState:
    rule: S.DistRule
    last_sent: int = 0  # highest job id sent in this round (jobs go out in id order)
    inflight: dict[int, int] = field(default_factory=dict)  # job id -> bytes sent
    backoff_until: float = 0.0
    failures: int = 0
    restart: bool = False  # resend from the oldest pending job once the in-flight ones are answered
    round: int = 0  # incremented at each restart: the agent stops skipping jobs of a newer round
    last_success: int | None = None
    last_error: str | None = None
    last_error_at: int | None = None


class Dist:
    def __init__(self, factory, store: Store):
        self.f = factory  # its config, events and tenants; the CMDB only through the store
        self.store = store
        self.rules = {r.name: RuleState(r) for r in factory.cfg.dist_rules}
        self.link: Channel | None = None
        self._link_gen = 0
        self._wake = trio.Event()
        self._acks: list[S.DistAck] = []
        self._ack_wake = trio.Event()
        self._jobs_rule: dict[int, str] = {}
        # CRL-fed tenants: the agent fetches their CRLs (the Factory has no network)
        self._fetch_ids = iter(range(1, 2**62))
        self._fetching: dict[int, tuple[str, list[bytes], int]] = {}  # id -> (tenant, chunks, size)
        self._fetch_busy: set[str] = set()
        self.fetch_state: dict[str, dict[str, Any]] = {}  # tenant -> failures, retry_at, last_error, last_ok
        self._fetched_send, self._fetched_recv = trio.open_memory_channel[tuple[int, str, str, bytes | None, str]](64)
        self._fetch_wake = trio.Event()

    # ------------------------------------------------------------ enqueueing (inside a CMDB transaction)

    def _wants(self, r: S.DistRule, what: str, ca: str, profile: str | None = None) -> bool:
        return what in r.publish and (not r.cas or ca in r.cas) and (profile is None or not r.profiles or profile in r.profiles)

    def _insert(self, db, rule: str, action: str, ca: str, ref: bytes | None = None, number: int = 0) -> None:
        # `db` is the connection of the caller's transaction (the enqueue_* signatures stay for the callers
        # not yet moved onto the store, tier.py): it is always the store's writer, whose job rows these are
        assert db is self.store.require_active().db
        self.store.dist_job_add(rule, action, ca, ref, number, int(time.time()))

    def enqueue_cert(self, db, ca: str, serial: int, profile: str) -> None:
        for st in self.rules.values():
            if self._wants(st.rule, "certs", ca, profile):
                self._insert(db, st.rule.name, "cert", ca, serial_bytes(serial))

    def enqueue_uncert(self, db, ca: str, serial: int, profile: str) -> None:
        for st in self.rules.values():
            if st.rule.remove_on_revoke and self._wants(st.rule, "certs", ca, profile):
                self._insert(db, st.rule.name, "uncert", ca, serial_bytes(serial))

    def enqueue_object(self, db, action: str, ca: str, number: int = 0, part: str = "") -> None:
        """A CA certificate, CRL or issued-serials list for every rule that wants it. `part` names a CRL
        shard ("-<k>", for rules publishing "crl") or the delta CRL ("-delta", for "delta-crl"); kept in ref."""
        what = "delta-crl" if part.endswith("-delta") else {"ca-cert": "ca-cert", "crl": "crl", "issued-serials": "issued-serials"}[action]
        for st in self.rules.values():
            if self._wants(st.rule, what, ca):
                self._insert(db, st.rule.name, action, ca, part.encode() or None, number)

    def wants_serials(self, ca: str) -> bool:
        return any(self._wants(st.rule, "issued-serials", ca) for st in self.rules.values())

    def catch_up(self) -> None:
        """At activation: a rule added since the objects were made gets the current ones; jobs of a
        rule no longer configured are parked (visible, retryable if it comes back)."""
        st_ = self.store
        with st_.tx() as db:
            st_.dist_park_unconfigured(list(self.rules))
            cas = st_.ca_names()
            for st in self.rules.values():
                r = st.rule
                for ca in cas:
                    def never(action: str) -> bool:
                        return not st_.dist_ever(r.name, action, ca)
                    if self._wants(r, "ca-cert", ca) and never("ca-cert"):
                        self._insert(db, r.name, "ca-cert", ca)
                    if self._wants(r, "crl", ca) and never("crl"):
                        number = st_.latest_crl_number(ca)
                        if number:
                            self._insert(db, r.name, "crl", ca, None, number)
                        # and the latest of each CRL shard (stored as "<ca>-<k>")
                        for k, n in st_.latest_shard_crls(ca):
                            self._insert(db, r.name, "crl", ca, f"-{k}".encode(), n)
                    if self._wants(r, "delta-crl", ca) and not st_.dist_ever(r.name, "crl", ca, b"-delta"):
                        number = st_.latest_crl_number(ca + "-delta")
                        if number:
                            self._insert(db, r.name, "crl", ca, b"-delta", number)
                    if self._wants(r, "issued-serials", ca) and never("issued-serials"):
                        number = st_.latest_serials_list_number(ca)
                        if number:
                            self._insert(db, r.name, "issued-serials", ca, None, number)
                    if "certs" in r.publish and (not r.cas or ca in r.cas) and never("cert"):
                        for serial, profile in st_.unrevoked_certs(ca):
                            if not r.profiles or profile in r.profiles:
                                self._insert(db, r.name, "cert", ca, serial)
            st_.dist_prune(int(time.time()) - DONE_RETENTION)

    # ------------------------------------------------------------ the link to the agent

    def poke(self) -> None:
        self._wake.set()

    def attach(self, chan: Channel | None) -> None:
        """A (new) agent link: what was in flight on the old one is resent from the oldest pending job."""
        self.link = chan
        self._link_gen += 1
        self._jobs_rule.clear()
        for _, (tenant, _, _) in list(self._fetching.items()):
            self._fetch_busy.discard(tenant)
        self._fetching.clear()
        self._fetch_wake.set()
        for st in self.rules.values():
            st.inflight.clear()
            st.last_sent = 0
            st.restart = False
            st.round += 1
        self.poke()

    async def receive(self, chan: Channel) -> None:
        """Read acknowledgements until the link closes."""
        while True:
            m = await chan.recv()
            if isinstance(m, (S.FetchedCrl, S.FetchFailed)):
                await self._fetch_answer(m)
                continue
            if not isinstance(m, S.DistAck):
                from appliance.ipc.channel import ProtocolViolation
                raise ProtocolViolation(f"factory-distribution: unexpected {type(m).__name__}")
            rule = self._jobs_rule.get(m.id)
            if rule is None:
                continue  # an answer from a link generation we already gave up on
            self._acks.append(m)
            self._ack_wake.set()

    async def committer(self) -> None:
        """Apply acknowledgements in groups: one durable transaction for many acks."""
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            await trio.sleep(0.005)
            acks, self._acks = self._acks, []
            if not acks or not self.store.active:
                continue
            now = int(time.time())
            max_attempts = self.f.cfg.dist_max_attempts

            def apply():
                st_ = self.store
                parked = []
                with st_.tx():
                    for a in acks:
                        if not a.attempted:
                            continue
                        if a.outcome == "done":
                            st_.dist_done(a.id, now)
                        else:
                            row = st_.dist_job(a.id)
                            if row is None:
                                continue
                            park = a.outcome == "permanent" or row[0] + 1 >= max_attempts
                            st_.dist_failed(a.id, now, a.error[:500], park)
                            if park:
                                parked.append((a.id, row))
                                st_.audit_in_tx("factory:distribution", "dist-park", f"{row[1]}/{a.id}", "failed",
                                                f"{row[2]} {row[3]}: {a.error[:300]}")
                return parked
            parked = await self.store.run(apply)
            for a in acks:
                rule = self._jobs_rule.pop(a.id, None)
                st = self.rules.get(rule) if rule else None
                if st is None:
                    continue
                st.inflight.pop(a.id, None)
                if not a.attempted:
                    continue
                if a.outcome == "done":
                    st.last_success = now
                    if st.failures >= FAILING_AFTER:
                        await self.f.send_event(S.Event(kind="destination-recovered", detail=st.rule.name))
                    st.failures = 0
                else:
                    st.last_error, st.last_error_at = a.error[:500], now
                    if a.outcome == "failed":
                        st.failures += 1
                        delay = min(self.f.cfg.dist_backoff_max, BACKOFF_BASE * 2 ** min(st.failures - 1, 20))
                        st.backoff_until = trio.current_time() + delay * random.uniform(0.5, 1.0)
                        st.restart = True  # order per destination: resend from the oldest pending job
                        if st.failures == FAILING_AFTER:
                            await self.f.send_event(S.Event(kind="destination-failing", detail=f"{st.rule.name}: {a.error}"[:4000]))
            for jid, row in parked:
                _log(f"job {jid} ({row[2]} {row[3]}) parked for {row[1]}")
            self.poke()

    async def dispatcher(self) -> None:
        while True:
            with trio.move_on_after(self._next_wake()):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.link is None or not self.store.active:
                continue
            gen = self._link_gen
            try:
                for st in list(self.rules.values()):
                    await self._feed(st, gen)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if gen == self._link_gen:
                    self.link = None

    def _next_wake(self) -> float:
        now = trio.current_time()
        waits = [st.backoff_until - now for st in self.rules.values() if st.backoff_until > now]
        return max(0.05, min(waits + [5.0]))

    async def _feed(self, st: RuleState, gen: int) -> None:
        if trio.current_time() < st.backoff_until:
            return
        if st.restart:
            if st.inflight:
                return
            st.restart, st.last_sent = False, 0
            st.round += 1
        room = WINDOW - len(st.inflight)
        if room <= 0:
            return
        name, after = st.rule.name, st.last_sent
        budget, busy = WINDOW_BYTES - sum(st.inflight.values()), bool(st.inflight)

        def fetch():
            st_ = self.store
            rows = st_.dist_pending(name, after, room)
            out = []
            superseded = []
            last, left = after, budget
            for jid, action, ca, ref, number in rows:
                # the same CRL (complete, shard k or delta)
                if action in ("crl", "issued-serials") and st_.dist_newer_pending(name, action, ca, ref, number):
                    superseded.append(jid)  # a newer one is queued: the older is never sent
                    last = jid
                    continue
                job = (jid, action, ca, ref, number) + self._load(action, ca, ref, number)
                size = len(job[8] or b"")
                if size > left and (out or busy):
                    break  # the window's bytes are full: this job goes in a later feed
                left -= size
                out.append(job)
                last = jid
            if superseded:
                with st_.tx():
                    st_.dist_supersede(superseded, int(time.time()))
            return out, last
        jobs, last = await self.store.run(fetch)
        st.last_sent = max(st.last_sent, last)
        out: list[S.DistJob | S.DistData] = []  # written together (one write per CHUNK of objects, not two per job)
        size = 0
        for jid, action, ca, ref, number, issuer, ca_root, subject, data, attachment in jobs:
            if gen != self._link_gen or self.link is None:
                return
            if data is None:  # the object is gone (cannot happen short of manual surgery): park it
                await self._ack_local(jid, "the object to publish is not in the CMDB")
                continue
            st.inflight[jid] = len(data)
            self._jobs_rule[jid] = name
            job = S.DistJob(id=jid, rule=name, action=action, ca=ca, ca_root=ca_root, issuer=issuer,
                            subject=subject, number=number, size=len(data), round=st.round,
                            attachment=attachment, part=bytes(ref).decode() if action == "crl" and ref else "")
            if len(data) > CHUNK:  # a big object (a large CRL): its pieces one write each, never all in memory twice
                if out:
                    await self.link.send_many(out)
                    out, size = [], 0
                await self.link.send(job)
                for off in range(0, len(data), CHUNK):
                    await self.link.send(S.DistData(id=jid, data=data[off:off + CHUNK]))
                continue
            out += [job, S.DistData(id=jid, data=data)]
            size += len(data) + len(issuer)
            if size >= CHUNK:
                await self.link.send_many(out)
                out, size = [], 0
        if out and gen == self._link_gen and self.link is not None:
            await self.link.send_many(out)

    async def _ack_local(self, jid: int, error: str) -> None:
        self._jobs_rule[jid] = self._jobs_rule.get(jid, "")
        self._acks.append(S.DistAck(id=jid, outcome="permanent", error=error))
        self._ack_wake.set()

    def _load(self, action: str, ca: str, ref: bytes | None, number: int):
        """(issuer DER, ca_root, subject fields, object DER, attachment) for one job."""
        out = self._load_object(action, ca, ref, number)
        attachment = None
        if action == "issued-serials":
            row = self.store.latest_checkpoint()
            if row:
                from policy import audit
                attachment = msgspec.json.encode(audit.checkpoint_doc(row[0], row[1]))
        return out + (attachment,)

    def _load_object(self, action: str, ca: str, ref: bytes | None, number: int):
        st_ = self.store
        row = st_.ca_cert_and_parent(ca)
        if row is None and action == "crl":  # an offline root's pre-signed CRL (tier.py): verified against its root certificate
            root = st_.calendar_root_cert(ca)
            row = (root, None) if root is not None else None
        if row is None:
            return b"", False, (), None
        ca_der, parent = row
        ca_cert = x509.load_der_x509_certificate(ca_der)
        ca_root = ca_cert.issuer == ca_cert.subject
        if action in ("cert", "uncert"):
            der = st_.cert_der(ca, ref)
            if der is None:
                return ca_der, ca_root, (), None
            return ca_der, ca_root, subject_fields(x509.load_der_x509_certificate(der)), der
        if action == "ca-cert":
            issuer = ca_der
            if parent:
                p = st_.ca_cert_and_parent(parent)
                issuer = p[0] if p else ca_der
            elif not ca_root:  # an external parent (signed elsewhere): verify against itself is impossible
                issuer = ca_der
            return issuer, ca_root, subject_fields(ca_cert), ca_der
        name = ca + bytes(ref).decode() if action == "crl" and ref else ca  # a shard or delta: "<ca>-<k>", "<ca>-delta"
        return ca_der, ca_root, subject_fields(ca_cert), st_.signed_list_der(action, name, number)

    # ------------------------------------------------------------ tenant CRL fetches

    async def _fetch_answer(self, m) -> None:
        got = self._fetching.get(m.id)
        if got is None:
            return  # from a link we gave up on
        tenant, parts, size = got
        if isinstance(m, S.FetchFailed):
            del self._fetching[m.id]
            await self._fetched_send.send((m.id, tenant, "", None, m.error))
            return
        parts.append(m.data)
        size += len(m.data)
        if size > FETCH_MAX:
            from appliance.ipc.channel import ProtocolViolation
            raise ProtocolViolation("factory-distribution: a fetched CRL larger than the agent may send")
        if m.last:
            del self._fetching[m.id]
            await self._fetched_send.send((m.id, tenant, m.url, b"".join(parts), ""))
        else:
            self._fetching[m.id] = (tenant, parts, size)

    async def fetcher(self) -> None:
        """Ask the agent for each tenant's CRL when the tenant's fetch plan says so; a fetch that fails
        before reaching the tenant's intake backs off here (exponentially, capped at an hour)."""
        while True:
            with trio.move_on_after(FETCH_POLL):
                await self._fetch_wake.wait()
            self._fetch_wake = trio.Event()
            if self.link is None or not self.store.active:
                continue
            if not self.f.tenants.loaded:
                try:
                    await self.f.tenants._reload()
                except Exception as e:  # noqa: BLE001 - the CMDB is checked again at the next poll
                    _log(f"tenant fetch plan unavailable: {e}")
                    continue
            plan = self.f.tenant_fetch_plan()
            now = time.time()  # after the plan: "fetch at once" is the plan's own clock reading
            for tenant, urls, due in plan:
                st = self.fetch_state.setdefault(tenant, {"failures": 0, "retry_at": 0.0, "last_error": None,
                                                          "last_error_at": None, "last_ok": None, "last_result": None})
                if tenant in self._fetch_busy or due > now or st["retry_at"] > now or self.link is None:
                    continue
                fid = next(self._fetch_ids)
                self._fetching[fid] = (tenant, [], 0)
                self._fetch_busy.add(tenant)
                try:
                    await self.link.send(S.FetchCrl(id=fid, tenant=tenant, urls=urls[:16]))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._fetching.pop(fid, None)
                    self._fetch_busy.discard(tenant)

    async def fetch_results(self) -> None:
        """Hand each fetched CRL to the tenant intake (which verifies it and keeps the old one if bad)."""
        async for _fid, tenant, url, data, error in self._fetched_recv:
            self._fetch_busy.discard(tenant)
            st = self.fetch_state.setdefault(tenant, {"failures": 0, "retry_at": 0.0, "last_error": None,
                                                      "last_error_at": None, "last_ok": None, "last_result": None})
            now = time.time()
            if data is None:
                st["failures"] += 1
                st["retry_at"] = now + min(FETCH_BACKOFF_MAX, 30 * 2 ** min(st["failures"] - 1, 10)) * random.uniform(0.5, 1.0)
                st["last_error"], st["last_error_at"] = error[:500], int(now)
                continue
            st["failures"], st["retry_at"] = 0, 0.0
            result = await self.f.tenant_crl_received(tenant, data, f"distribution:fetch {url}"[:200])
            st["last_ok"], st["last_result"] = int(now), result
            if result != "accepted":
                st["last_error"], st["last_error_at"] = f"{url}: {result}"[:500], int(now)

    # ------------------------------------------------------------ admin

    def states(self) -> list[S.DestinationState]:
        return [S.DestinationState(name=n, backlog=0, failing=st.failures >= FAILING_AFTER) for n, st in self.rules.items()]

    async def status(self) -> dict[str, Any]:
        """The queue per destination (counts from the CMDB, live state from here)."""
        doc = await self.store.run(self._status_rows)
        clock = trio.current_time()
        for d in doc["destinations"]:
            st = self.rules.get(d["rule"])
            d["retry_in"] = round(st.backoff_until - clock, 1) if st and st.backoff_until > clock else 0
        doc["tenant_fetches"] = self._fetch_doc()
        return doc

    def _status_rows(self) -> dict[str, Any]:
        now = int(time.time())
        counts: dict[tuple[str, str], tuple[int, int | None]] = {}
        for rule, state, n, oldest in self.store.dist_counts():
            counts[(rule, state)] = (n, oldest)
        out = []
        names = list(self.rules) + sorted({r for r, _ in counts if r not in self.rules})
        for name in names:
            st = self.rules.get(name)
            pend, oldest = counts.get((name, "pending"), (0, None))
            parked, _ = counts.get((name, "parked"), (0, None))
            last_ok = st.last_success if st else None
            if last_ok is None:
                last_ok = self.store.dist_last_done(name)
            err = self.store.dist_last_error(name)
            last_error, last_error_at = (st.last_error, st.last_error_at) if st and st.last_error else (err[0], err[1]) if err else (None, None)
            out.append({
                "rule": name, "url": st.rule.url if st else None, "configured": st is not None,
                "pending": pend, "parked": parked, "oldest_pending_age": now - oldest if oldest else None,
                "in_flight": len(st.inflight) if st else 0, "failing": bool(st and st.failures >= FAILING_AFTER),
                "consecutive_failures": st.failures if st else 0,
                "last_success": last_ok, "last_error": last_error, "last_error_at": last_error_at,
            })
        return {"destinations": out, "agent": self.link is not None}

    def _fetch_doc(self) -> list[dict[str, Any]]:
        clock = time.time()
        return [{"tenant": t, "failures": st["failures"], "retry_in": max(0, round(st["retry_at"] - clock, 1)),
                 "last_fetch": st["last_ok"], "last_result": st["last_result"], "last_error": st["last_error"],
                 "last_error_at": st["last_error_at"], "in_flight": t in self._fetch_busy}
                for t, st in sorted(self.fetch_state.items())]

    def backlog(self) -> dict[str, int]:
        return self.store.dist_backlog()

    def list_jobs(self, state: str, rule: str | None, limit: int) -> list[dict[str, Any]]:
        return [{"id": i, "rule": r, "action": a, "ca": c, "serial": ref.hex() if ref else None, "number": n or None,
                 "created": cr, "attempts": at, "last_at": la, "last_error": le, "done_at": d}
                for i, r, a, c, ref, n, cr, at, la, le, d in self.store.dist_jobs(state, rule, limit)]

    async def retry(self, rule: str | None, job: int | None, actor: str) -> int:
        n = await self.store.run(self._retry, rule, job, actor)
        for st in self.rules.values():
            if rule is None or st.rule.name == rule:
                st.backoff_until = 0.0
                st.restart = True
        self.poke()
        return n

    def _retry(self, rule: str | None, job: int | None, actor: str) -> int:
        with self.store.tx():
            n = self.store.dist_unpark(rule, job)
            self.store.audit_in_tx(actor, "dist-retry", rule or (f"job {job}" if job else "all"), "ok", f"{n} job(s) back in the queue")
        return n

"""What the Factory reports: `donjon status`, the periodic StatusReport (SNMP), OCSP status, the audit export."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio
from cryptography import x509

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel

from .checkpoints import Checkpoints
from .cis_link import CisLink
from .dist import Dist
from .store import Store
from .tenants import TenantManager

STATUS_SECONDS = 5


class Status:
    def __init__(self, store: Store, dist: Dist, signers: list[CisLink], stats: dict[str, int], tenants: TenantManager,
                 ocsp_feeds: dict[str, Channel], token: Callable[[], str], pending: Callable[[], int]):
        self.store = store
        self.dist = dist
        self.signers = signers
        self.stats = stats
        self.tenants = tenants
        self.ocsp_feeds = ocsp_feeds  # the endpoint processes' links, by role name (the Factory's dict, kept current by main)
        self.ocsp_stats: S.OcspStats | None = None  # the endpoint's counters, relayed by the supervisor
        self.checkpoints: Checkpoints | None = None  # set by main once the CIS link is up
        self._token = token
        self._pending = pending

    async def status(self) -> dict[str, Any]:
        store = self.store
        doc: dict[str, Any] = {"activated": store.active, "token": self._token(), "stats": dict(self.stats),
                               "pending": self._pending(),
                               "cis": {s.name: "responsive" if s.responsive else "unresponsive" for s in self.signers}}
        if store.active:
            cas, certs, revoked, n_audit, head = await store.run(store.status_counts)
            doc.update(cas=cas, certificates=certs, revoked=revoked, audit_records=n_audit, audit_head=head)
            if self.dist.rules:
                backlog = await store.run(self.dist.backlog)
                doc["distribution"] = {d.name: {"backlog": backlog.get(d.name, 0), "failing": d.failing} for d in self.dist.states()}
            cp = await self.checkpoints.latest() if self.checkpoints is not None else None
            doc["audit_checkpoint"] = {k: cp[k] for k in ("seq", "head", "time")} if cp else None
        return doc

    async def status_reporter(self, send) -> None:
        """Every few seconds, the Factory's part of the appliance status (SNMP reads it)."""
        while True:
            try:
                await send(await self.status_report())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(STATUS_SECONDS)

    async def status_report(self) -> S.StatusReport:
        store = self.store
        if not store.active:
            return S.StatusReport(activated=False, cas=[], audit_records=0, audit_checkpoint=None, oldest_response_age=None)
        now = int(time.time())

        def q():
            cas = []
            for name, key_type, der, crl_number, nu, issued, revoked in store.ca_report_rows():
                cert = x509.load_der_x509_certificate(der)
                cas.append(S.CaState(name=name, key_type=key_type, not_after=int(cert.not_valid_after_utc.timestamp()),
                                     crl_number=crl_number, crl_next_update=nu, issued=issued, revoked=revoked))
            from .tier import calendar_ca_states
            cas += calendar_ca_states(store.require_active().db)  # offline roots whose CRL calendar is published here
            return cas, store.report_heads(), self.dist.backlog()
        cas, (n_audit, oldest, earliest, cp), backlog = await store.run(q)
        dests = [S.DestinationState(name=d.name, backlog=backlog.get(d.name, 0), failing=d.failing) for d in self.dist.states()]
        return S.StatusReport(activated=True, cas=cas, audit_records=n_audit, audit_checkpoint=cp,
                              oldest_response_age=max(0, now - oldest) if oldest else None,
                              ocsp_earliest_next_update=earliest, destinations=dests)

    async def ocsp_status(self) -> dict[str, Any]:
        """What the endpoint reports, and what the CMDB holds per CA (responses, queue, oldest, next refresh)."""
        self.store.require_active()
        now = int(time.time())
        rows, queued = await self.store.run(self.store.ocsp_summary)
        cas = [{"ca": ca, "responses": n, "revoked": rev or 0, "oldest_this_update": tu, "earliest_next_update": nu,
                "next_refresh": rf, "queued": queued.get(ca, 0), "lapsed": nu is not None and nu <= now}
               for ca, n, rev, tu, nu, rf in rows]
        st = self.ocsp_stats
        return {"endpoint_connected": bool(self.ocsp_feeds), "endpoints": sorted(self.ocsp_feeds), "cas": cas,
                "endpoint": msgspec.structs.asdict(st) if st else None,
                "tenant_crls": {"tenants": len(self.tenants.info), "accepted": self.tenants.accepted,
                                "refused": self.tenants.refused}}

    async def audit_export(self) -> bytes:
        """JSON Lines: every record in order, each signed checkpoint right after the record it covers."""
        from policy.audit import checkpoint_doc
        store = self.store
        db = store.require_active()

        def q():
            cps: dict[int, list[bytes]] = {}
            for seq, tbs, sig in store.checkpoints_by_seq():
                cps.setdefault(seq, []).append(msgspec.json.encode(checkpoint_doc(tbs, sig)) + b"\n")
            out = [b"".join(cps.pop(0, []))]
            for r in db.audit_records():
                out.append(msgspec.json.encode(r) + b"\n")
                out.extend(cps.pop(r["seq"], []))
            out.extend(b"".join(v) for v in cps.values())
            return b"".join(out)
        return await store.run(q)

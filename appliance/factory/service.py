"""The Certificate Factory: one thin class composing the store and the per-concern modules.

activation.py (PIN, shares, lockout), issuers.py (CA rows, states, the issuer check), cas.py (ceremony,
CA creation), issuance.py (the group-commit pipeline), revocation.py, crls.py (CRLs and issued-serials
lists), settings.py (`config set`), status.py (status, reports, audit export). Each receives the store
and the narrow collaborators it uses; the Factory keeps the public method names the admin table,
main.py and the older helpers (ocsp, dist, tenants, officers, ceremonies) call.
"""

from __future__ import annotations

from typing import Any

import trio

from appliance.ceremonyspec import CeremonyCa, CeremonySpec
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel
from policy import profiles as profmod

from .activation import Activation
from .cas import Cas
from .checkpoints import Checkpoints
from .cis_link import CisLink
from .cmdb import Cmdb
from .crls import SignedLists
from .dist import Dist
from .errors import FactoryError, _log
from .issuance import Issuance, new_serial
from .issuers import Issuers
from .ocsp import OcspProducer
from .revocation import Revocation
from .settings import Settings
from .status import Status
from .store import Store, ca_state
from .tenants import TenantManager
from .tier import Tier

__all__ = ["Factory", "FactoryError", "_log", "ca_state", "new_serial"]


class Factory:
    def __init__(self, cfg: S.FactoryConfig, cis: CisLink, send_event, profiles: dict[str, profmod.Profile],
                 signers: list[CisLink] | None = None):
        self.cfg = cfg
        self.cis = cis  # the primary CIS: activation, keys, CA certificates, CRLs
        self.signers = signers or [cis]  # every CIS process, for issuance batches
        self.send_event = send_event
        self.profiles = profiles
        self.estscep = None  # gwestscep.EstScepGate once the gateway link is served: EST/SCEP approvals
        self.store = Store()  # the CMDB: the DB thread, transactions, audit write, named queries
        # Set once the supervisor's AutoActivate (PIN file) is done, when one is coming (cfg.auto_activate).
        self.auto_activation: trio.Event | None = trio.Event() if cfg.auto_activate else None
        self.ocsp_feeds: dict[str, Channel] = {}  # the endpoint processes' links, by role name, when they run
        self.stats = {"issued": 0, "refused": 0, "revoked": 0, "crls": 0}
        self.ocsp = OcspProducer(self, self.store)
        self.dist = Dist(self, self.store)
        self.tenants = TenantManager(self.store, self.ocsp, send_event)  # CRL-fed OCSP tenants
        self.issuers = Issuers(cfg, self.store)
        self.lists = SignedLists(cfg, self.store, cis, self.issuers, self.dist, self.ocsp, send_event, self.stats, self.signers)
        self.issuance = Issuance(self.store, cis, self.signers, profiles, self.issuers, self.lists, self.dist, self.ocsp, self.stats)
        self.cas = Cas(cfg, self.store, cis, profiles, self.issuers, self.issuance, self.dist, self.ocsp)
        self.revocation = Revocation(self.store, self.dist, self.lists, self.stats)
        self.activation = Activation(cfg, self.store, cis, self.signers, self.dist, send_event)
        self.settings = Settings(self.store)
        self.tier: Tier | None = None  # two tiers: CA requests and installs, CRL calendars (set by main)
        self.reports = Status(self.store, self.dist, self.signers, self.stats, self.tenants, self.ocsp_feeds,
                              lambda: self.activation.token_info, lambda: len(self.issuance.pending))

    # ------------------------------------------------------------ plumbing

    @property
    def home(self) -> str:
        return self.cfg.home

    # The store owns these; the helpers not yet moved onto the store (ocsp, dist, officers, ...) reach them here.
    @property
    def db(self) -> Cmdb | None:
        return self.store.db

    @property
    def reader(self) -> Cmdb | None:
        return self.store.reader

    async def run_db(self, fn, *args):
        return await self.store.run(fn, *args)

    def _require_active(self) -> Cmdb:
        return self.store.require_active()

    async def audit(self, actor: str, action: str, obj: str, outcome: str, detail: str = "") -> None:
        await self.store.audit(actor, action, obj, outcome, detail)

    # Set by main after construction; the modules that use them hold the reference.
    @property
    def checkpoints(self) -> Checkpoints | None:
        return self.lists.checkpoints

    @checkpoints.setter
    def checkpoints(self, cp: Checkpoints | None) -> None:
        self.lists.checkpoints = self.reports.checkpoints = cp

    @property
    def sup_send(self):
        return self.settings.sup_send

    @sup_send.setter
    def sup_send(self, send) -> None:
        self.settings.sup_send = send

    @property
    def ocsp_stats(self) -> S.OcspStats | None:
        return self.reports.ocsp_stats

    @ocsp_stats.setter
    def ocsp_stats(self, m: S.OcspStats | None) -> None:
        self.reports.ocsp_stats = m

    @property
    def token_info(self) -> str:
        return self.activation.token_info

    # ------------------------------------------------------------ activation

    async def activate(self, pin: str, actor: str) -> dict[str, Any]:
        return await self._after_restore(await self.activation.activate(pin, actor), actor)

    async def activate_shares(self, shares: list[str], actor: str) -> dict[str, Any]:
        return await self._after_restore(await self.activation.activate_shares(shares, actor), actor)

    async def _after_restore(self, doc: dict[str, Any], actor: str) -> dict[str, Any]:
        for ca in doc.pop("restored_cas", ()):  # after a restore: a CRL numbered above every one published
            try:
                await self.lists.generate_crl(ca, actor)
            except FactoryError as e:
                _log(f"after the restore, the CRL of {ca} could not be signed yet: {e.reason}")
        return doc

    def check_shares(self, shares: list[str], uid: int) -> None:
        self.activation.check_shares(shares, uid)

    # ------------------------------------------------------------ CAs

    async def ceremony(self, spec: CeremonySpec, actor: str) -> list[str]:
        return await self.cas.ceremony(spec, actor)

    async def create_ca(self, c: CeremonyCa | S.ACaCreate, parent: str | None, actor: str) -> dict[str, Any]:
        return await self.cas.create_ca(c, parent, actor)

    async def ca_list(self) -> list[dict[str, Any]]:
        return await self.cas.ca_list()

    async def ca_show(self, name: str) -> dict[str, Any]:
        return await self.cas.ca_show(name)

    async def check_issuer(self, ca: str, profile: profmod.Profile, actor: str, action: str) -> None:
        await self.issuers.check_issuer(ca, profile, actor, action)

    async def ca_row(self, name: str):
        return await self.issuers.ca_row(name)

    async def ca_chain(self, name: str) -> list[bytes]:
        return await self.issuers.ca_chain(name)

    # ------------------------------------------------------------ settings (`donjon config set`)

    def sup_reply(self, m: S.ConfigSetDone) -> None:
        self.settings.sup_reply(m)

    async def config_set(self, key: str, value: str, actor: str) -> dict[str, Any]:
        return await self.settings.config_set(key, value, actor)

    # ------------------------------------------------------------ issuance and certificates

    async def issue(self, req: S.AIssue, actor: str) -> S.IssueReply:
        return await self.issuance.issue(req, actor)

    async def issuance_worker(self, signer: CisLink) -> None:
        await self.issuance.issuance_worker(signer)

    async def sign_csr_ca(self, req: S.ACaSignCsr, actor: str) -> dict[str, Any]:
        return await self.issuance.sign_csr_ca(req, actor)

    async def ocsp_responder_cert(self, ca: str, days: int, actor: str) -> dict[str, Any]:
        return await self.issuance.ocsp_responder_cert(ca, days, actor)

    async def cert_get(self, ca: str, serial: int) -> dict[str, Any]:
        return await self.issuance.cert_get(ca, serial)

    async def cert_list(self, req: S.ACertList) -> list[dict[str, Any]]:
        return await self.issuance.cert_list(req)

    # ------------------------------------------------------------ revocation and signed lists

    async def revoke(self, req: S.ARevoke, actor: str) -> dict[str, Any]:
        return await self.revocation.revoke(req, actor)

    async def unrevoke(self, req: S.AUnrevoke, actor: str) -> dict[str, Any]:
        return await self.revocation.unrevoke(req, actor)

    async def generate_crl(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        return await self.lists.generate_crl(ca, actor)

    async def generate_delta(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        return await self.lists.generate_delta(ca, actor)

    async def generate_serials_list(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        return await self.lists.generate_serials_list(ca, actor)

    async def crl_scheduler(self) -> None:
        await self.lists.crl_scheduler()

    def crl_chunks(self, ca: str, number: int | None = None, table: str = "crls"):
        return self.lists.crl_chunks(ca, number, table)

    # ------------------------------------------------------------ tenants

    async def tenant_crl_received(self, tenant: str, der: bytes, source: str) -> str:
        """Every tenant CRL enters here (officer upload, HTTP push, the Distribution agent's fetch):
        verified, stored and audited, pushed to every endpoint; returns "accepted" or a one-line reason."""
        return await self.tenants.crl_received(tenant, der, source)

    def tenant_fetch_plan(self) -> list[tuple[str, list[str], float]]:
        """What to fetch: (tenant, CRL URLs, next fetch unix time) for every tenant with URLs."""
        return self.tenants.fetch_plan()

    # ------------------------------------------------------------ status and audit

    async def ocsp_status(self) -> dict[str, Any]:
        return await self.reports.ocsp_status()

    async def status_reporter(self, send) -> None:
        await self.reports.status_reporter(send)

    async def status_report(self) -> S.StatusReport:
        return await self.reports.status_report()

    async def status(self) -> dict[str, Any]:
        return await self.reports.status()

    async def audit_export(self) -> bytes:
        return await self.reports.audit_export()

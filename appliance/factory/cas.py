"""CAs: the init ceremony, CA creation (key in the token, certificate by the parent or itself), CA documents."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from cryptography import x509

from appliance.ceremonyspec import CeremonyCa, CeremonySpec
from appliance.ipc import schema as S
from policy import profiles as profmod
from policy.capolicy import default_policy, named_policy
from policy.errors import PolicyError

from .cis_link import CisLink, CisRefused
from .cmdb import serial_bytes
from .crlshards import name_collision
from .dist import Dist
from .errors import FactoryError
from .issuance import BACKDATE, Issuance, _cn, new_serial
from .issuers import Issuers
from .ocsp import OcspProducer
from .store import Store


class Cas:
    def __init__(self, cfg: S.FactoryConfig, store: Store, cis: CisLink, profiles: dict[str, profmod.Profile],
                 issuers: Issuers, issuance: Issuance, dist: Dist, ocsp: OcspProducer):
        self.cfg = cfg
        self.store = store
        self.cis = cis
        self.profiles = profiles
        self.issuers = issuers
        self.issuance = issuance
        self.dist = dist
        self.ocsp = ocsp

    async def ceremony(self, spec: CeremonySpec, actor: str) -> list[str]:
        made = []
        self.store.require_active()
        exists = await self.store.run(self.store.ca_count)
        if exists:
            raise FactoryError("exists", "this appliance already has a CA: the ceremony refuses to overwrite it")
        await self.create_ca(spec.root, parent=None, actor=actor)
        made.append(spec.root.name)
        for sub in spec.issuing:
            await self.create_ca(sub, parent=spec.root.name, actor=actor)
            made.append(sub.name)
        return made

    async def create_ca(self, c: CeremonyCa | S.ACaCreate, parent: str | None, actor: str) -> dict[str, Any]:
        db = self.store.require_active()
        name = c.name
        profile = getattr(c, "profile", None) or ("root-ca" if parent is None else "sub-ca")
        if isinstance(c, CeremonyCa):
            subject = tuple((k, v) for k, v in c.subject.items())
        else:
            subject = tuple(c.subject)
        if profile not in self.profiles:
            raise FactoryError("not-found", f"unknown profile {profile!r}")
        if name == "donjon-audit":
            raise FactoryError("policy", "the name donjon-audit is the audit key's: choose another CA name")
        if parent is not None:
            await self.issuers.check_issuer(parent, self.profiles[profile], actor, "ca-create")
        try:
            names = tuple(getattr(c, "allowed_profiles", ()) or self.cfg.ca_profiles.get(name, ()))
            policy = named_policy(names, self.profiles) if names else default_policy(parent is None)
        except PolicyError as e:
            await self.store.audit(actor, "ca-create", name, "refused", str(e))
            raise FactoryError("bad-request", str(e)) from None
        if await self.store.run(self.store.ca_name_taken, name):
            raise FactoryError("exists", f"CA {name!r} already exists")
        why = await self.store.run(lambda: name_collision(db.db, name, dict(self.cfg.crl_shards), dict(self.cfg.crl_delta)))
        if why:  # <ca>-<k> / <ca>-delta name another CA's shards and delta (CRL store, endpoint, publication)
            await self.store.audit(actor, "ca-create", name, "refused", why)
            raise FactoryError("exists", why)
        parent_cert = None
        if parent is not None:
            prow = await self.store.run(self.store.ca_row, parent)
            if not prow:
                raise FactoryError("not-found", f"no parent CA {parent!r}")
            parent_cert = x509.load_der_x509_certificate(prow[4])
        try:
            pub = await self.cis.request(S.GenerateKey(id=self.cis.new_id(), label=name, key_type=c.key_type))
        except CisRefused as e:
            await self.store.audit(actor, "ca-create", name, "refused", e.reason)
            raise FactoryError(e.code, e.reason) from None
        now = int(time.time()) - BACKDATE
        not_after = now + c.validity_days * 86400 - 1  # RFC 5280 validity is inclusive
        if parent_cert is not None:
            not_after = min(not_after, int(parent_cert.not_valid_after_utc.timestamp()))
        serial = new_serial()
        item = S.IssueItem(profile=profile, spki=pub.spki, subject=subject, sans=(), serial=serial_bytes(serial),
                           validity=S.Validity(now, not_after), path_length=c.path_length, install_as=name,
                           allowed_kinds=policy.kinds, allowed_profiles=policy.profiles)  # type: ignore[arg-type]
        await self.store.run(self.store.reserve, [(serial, parent or name, None)])
        try:
            issued = await self.cis.request(S.Issue(id=self.cis.new_id(), ca=parent or name, self_signed=parent is None, items=[item]))
            outcome = issued.outcomes[0]
            if outcome.cert is None:
                raise CisRefused("policy", outcome.error or "refused")
        except CisRefused as e:
            await self.store.run(self.store.void, [serial], actor, "ca-create", e.reason)
            await self.cis.request(S.DeleteKey(id=self.cis.new_id(), label=name))
            raise FactoryError(e.code, e.reason) from None
        cert = x509.load_der_x509_certificate(outcome.cert)

        def store():
            with db.tx():
                self.store.add_ca(name, c.key_type, parent, profile, outcome.cert, policy.encode().decode())
                self.issuance.store_cert(serial, parent or name, profile, cert, outcome.cert, None)
                self.dist.enqueue_object(db.db, "ca-cert", name)
                self.store.audit_in_tx(actor, "ca-create", name, "ok", f"{c.key_type} {_cn(cert)} serial={serial:x} parent={parent or '-'} "
                                                         f"issues: {policy.describe()}")
        await self.store.run(store)
        await self.ocsp.publish(S.PublishCa(ca=name, cert=outcome.cert))
        self.ocsp.poke()
        return self._ca_doc(name, c.key_type, parent, profile, outcome.cert)

    def _ca_doc(self, name, key_type, parent, profile, der) -> dict[str, Any]:
        cert = x509.load_der_x509_certificate(der)
        return {"name": name, "key_type": key_type, "parent": parent, "profile": profile,
                "subject": _cn(cert), "serial": f"{cert.serial_number:x}",
                "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
                "sha256": hashlib.sha256(der).hexdigest()}

    async def ca_list(self) -> list[dict[str, Any]]:
        self.store.require_active()

        def q():
            return [{**self._ca_doc(*r), **self.issuers.extra(r[0])} for r in self.store.ca_rows()]
        return await self.store.run(q)

    async def ca_show(self, name: str) -> dict[str, Any]:
        row = await self.issuers.ca_row(name)
        return {**self._ca_doc(*row), **await self.store.run(self.issuers.extra, name)}


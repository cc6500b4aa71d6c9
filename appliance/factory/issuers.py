"""Who may issue what: CA rows, chains, states and policies, and the issuer check every issuance passes."""

from __future__ import annotations

import time
from typing import Any

from appliance.ipc import schema as S
from policy import profiles as profmod
from policy.capolicy import CaPolicy, default_policy

from .errors import FactoryError
from .store import Store, ca_state


class Issuers:
    def __init__(self, cfg: S.FactoryConfig, store: Store):
        self.cfg = cfg
        self.store = store

    def state(self, name: str) -> tuple[str, str]:
        """DB thread."""
        return ca_state(self.store.require_active().db, name, time.time())

    def policy(self, name: str) -> CaPolicy:
        """DB thread."""
        row = self.store.ca_policy_row(name)
        if row is None:
            raise FactoryError("not-found", f"no CA named {name!r}")
        return CaPolicy.decode(row[1].encode()) if row[1] else default_policy(row[0] is None)

    def extra(self, name: str) -> dict[str, Any]:
        """DB thread: a CA's state and what it issues, for the CA documents."""
        state, why = self.state(name)
        return {"state": state, "state_reason": why, "issues": self.policy(name).describe()}

    async def check_issuer(self, ca: str, profile: profmod.Profile, actor: str, action: str) -> None:
        """Refuse (audited, with the reason) issuance by a CA that is revoked or expired, or of a
        profile the CA may not issue (its policy, narrowed by donjon.toml [ca-profiles])."""
        self.store.require_active()

        def q():
            if self.store.ca_row(ca) is None:
                # ca request: the key is in the token, the certificate is to come from the parent (ca install)
                if self.store.ca_requested(ca):
                    return "policy", f"CA {ca!r} is awaiting certificate (ca install): it issues nothing yet"
                return "not-found", f"no CA named {ca!r}"
            succ = self.store.ca_successor(ca)
            if succ is not None:  # re-keyed (two tiers: tier.py): its old key only signs CRLs and OCSP now
                return "policy", f"CA {ca!r} was re-keyed: issue with its successor {succ!r} (the old key signs only its CRLs and OCSP)"
            state, why = self.state(ca)
            if state != "active":
                return "policy", f"CA {ca!r} is {state}: {why}; it issues nothing more"
            pol = self.policy(ca)
            narrowed = self.cfg.ca_profiles.get(ca)
            if not pol.allows(profile) or (narrowed is not None and profile.name not in narrowed):
                allowed = pol.describe() + (f"; donjon.toml [ca-profiles] narrows it to {', '.join(narrowed)}" if narrowed is not None else "")
                return "policy", f"CA {ca!r} may not issue profile {profile.name!r} (it issues: {allowed})"
            return None
        bad = await self.store.run(q)
        if bad is not None:
            await self.store.audit(actor, action, ca, "refused", bad[1])
            raise FactoryError(*bad)

    async def ca_row(self, name: str) -> tuple[str, str, str | None, str, bytes]:
        self.store.require_active()
        row = await self.store.run(self.store.ca_row, name)
        if not row:
            raise FactoryError("not-found", f"no CA named {name!r}")
        return row

    async def ca_chain(self, name: str) -> list[bytes]:
        chain = []
        cur: str | None = name
        while cur is not None:
            row = await self.ca_row(cur)
            chain.append(row[4])
            cur = row[2]
        return chain

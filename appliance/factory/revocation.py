"""Revocation: revoke, make a hold permanent, release a hold; each audited in its own transaction."""

from __future__ import annotations

import time
from typing import Any

from appliance.ipc import schema as S
from policy import crl as crlenc

from .cmdb import serial_bytes, serial_int
from .crls import SignedLists
from .dist import Dist
from .errors import FactoryError
from .store import Store

HOLD = 6  # CRLReason certificateHold: the one revocation that can be released or made permanent
# In the audit of a change to a certificate known only by its serial (a restore recovered it from published
# evidence): its CRLs (full, its shard, deltas) and the OCSP endpoint say it; no directory entry is updated.
RECOVERED_NOTE = "; known only by its serial (recovered by a restore): no directory entry updated"


class Revocation:
    def __init__(self, store: Store, dist: Dist, lists: SignedLists, stats: dict[str, int]):
        self.store = store
        self.dist = dist
        self.lists = lists
        self.stats = stats

    async def revoke(self, req: S.ARevoke, actor: str) -> dict[str, Any]:
        """Revoke a certificate, or change a certificateHold to a permanent reason (the entry keeps its
        revocation date: the certificate has not been trusted since the hold)."""
        store = self.store
        store.require_active()
        serial = serial_int(req.serial)
        if req.reason == 7:
            raise FactoryError("policy", "reason code 7 is not used (RFC 5280 §5.3.1)")
        if req.reason == 8:  # delta CRLs only: in a full CRL relying parties read it as revoked or as not
            await store.audit(actor, "revoke", f"{req.ca}/{serial:x}", "refused", "removeFromCRL is not a revocation reason")
            raise FactoryError("policy", "removeFromCRL is not a revocation reason (RFC 5280 §5.3.1: delta CRLs only); "
                                         "to lift a certificateHold, release it (donjon unrevoke)")
        sb = serial_bytes(serial)
        now = int(time.time())
        reason = req.reason or None
        entry_len = crlenc.entry_length(serial, now, reason, req.invalidity)
        obj = f"{req.ca}/{serial:x}"

        def w():
            with store.tx():
                profile = store.cert_profile(req.ca, sb)
                # A certificate a restore knows only by its serial (recovered_certs) is revocable too: its
                # CRL entry and OCSP response need nothing but the serial. No body: no directory entry to update.
                recovered = profile is None and store.recovered_cert(req.ca, sb)
                note = RECOVERED_NOTE if recovered else ""
                if profile is None and not recovered:
                    store.audit_in_tx(actor, "revoke", obj, "refused", "no such certificate")
                    return "not-found", now, False
                old = store.revocation(req.ca, sb, recovered)
                if old is not None and (old[1] != HOLD or reason == HOLD):
                    why = "already on hold" if old[1] == HOLD else "already revoked"
                    store.audit_in_tx(actor, "revoke", obj, "refused", why)
                    return why, old[0], recovered
                if old is not None:  # certificateHold -> a permanent reason
                    inv = req.invalidity if req.invalidity is not None else old[2]
                    store.change_revocation(req.ca, sb, reason, inv, crlenc.entry_length(serial, old[0], reason, inv), recovered)
                    store.audit_in_tx(actor, "revoke", obj, "ok", f"reason={req.reason} (was certificateHold since {old[0]}){note}")
                    return "changed", old[0], recovered
                store.add_revocation(req.ca, sb, now, reason, req.invalidity, entry_len, recovered)
                if profile is not None:
                    self.dist.enqueue_uncert(store.require_active().db, req.ca, serial, profile)
                store.audit_in_tx(actor, "revoke", obj, "ok", f"reason={req.reason}{note}")
                return "ok", now, recovered
        r, revoked_at, recovered = await store.run(w)
        if r == "not-found":
            raise FactoryError("not-found", f"no certificate {serial:x} issued by {req.ca!r}")
        if r == "already on hold":
            raise FactoryError("exists", f"certificate {serial:x} is already on hold")
        if r == "already revoked":
            raise FactoryError("exists", f"certificate {serial:x} is already revoked")
        if r == "ok":
            self.stats["revoked"] += 1
        self.lists.revocations_changed(req.ca)
        return {"ca": req.ca, "serial": f"{serial:x}", "revoked_at": revoked_at, "reason": req.reason,
                "was_on_hold": r == "changed", "known_by_serial_only": recovered}

    async def unrevoke(self, req: S.AUnrevoke, actor: str) -> dict[str, Any]:
        """Release a certificate from certificateHold: its entry leaves the CRL (the next full CRL omits
        it) and its OCSP response is re-signed `good`. A permanent revocation is never undone."""
        store = self.store
        store.require_active()
        serial = serial_int(req.serial)
        sb = serial_bytes(serial)
        obj = f"{req.ca}/{serial:x}"

        def w():
            with store.tx():
                profile = store.cert_profile(req.ca, sb)
                recovered = profile is None and store.recovered_cert(req.ca, sb)
                old = store.revocation(req.ca, sb, recovered)
                why = ("no such certificate" if profile is None and not recovered else "not revoked" if old is None
                       else None if old[1] == HOLD else "revoked permanently, not on hold")
                if why or old is None:
                    store.audit_in_tx(actor, "unrevoke", obj, "refused", why or "")
                    return why, None
                store.delete_revocation(req.ca, sb, recovered)
                if profile is not None:  # published again where revocation removed it
                    self.dist.enqueue_cert(store.require_active().db, req.ca, serial, profile)
                store.audit_in_tx(actor, "unrevoke", obj, "ok", f"released from certificateHold (held since {old[0]})"
                                  + (RECOVERED_NOTE if recovered else ""))
                return "ok", old[0]
        r, held_since = await store.run(w)
        if r == "no such certificate":
            raise FactoryError("not-found", f"no certificate {serial:x} issued by {req.ca!r}")
        if r != "ok":
            raise FactoryError("policy", f"certificate {serial:x} is {r}: only a certificateHold can be released")
        self.lists.revocations_changed(req.ca)
        return {"ca": req.ca, "serial": f"{serial:x}", "released": True, "held_since": held_since}

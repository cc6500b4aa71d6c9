"""The OCSP decision, sans-IO: request bytes + store + clock → response bytes and what to count.

Pre-produced responses (RFC 6960 §2.5, RFC 5019), and live ones where a delegated responder key
exists (live.py). Rules, in order:
- garbage → malformedRequest;
- several CertIDs, or a nonce, with a delegated responder for their one issuer → a live response
  (one SingleResponse per CertID, statuses from the held responses, `unknown` where none is held,
  the nonce echoed); several CertIDs without one → unauthorized;
- an issuer we do not serve → unauthorized;
- a known issuer but no held response (never issued, or not yet published) → unauthorized
  (RFC 5019 §2.2.3): a serial that was not issued is never `good`;
- a held response past its nextUpdate → tryLater: never served stale;
- otherwise the held DER, byte for byte. A request nonce is ignored, as RFC 5019 §4 allows.

A serial with no held response gets, per CA (`ocsp.unissued`), `unauthorized` (the default), or
when the CA has a delegated responder a live `unknown`, or `revoked` with the extended-revoke
extension (RFC 6960 §2.2: revocationTime 1970-01-01, reason certificateHold).

CRL-fed tenants (tenants.py): every CertID must name the tenant's CA; the answer is signed live by
the tenant's delegated responder from its current CRL — revoked if listed, else `good`, except a
serial outside the issued-serials list (when one is held), which gets the tenant's unissued policy.
No responder → unauthorized; no CRL, or a CRL past its nextUpdate → tryLater (never answered from a
stale CRL: the relying party may retry or fall back to the CRL itself). thisUpdate/nextUpdate of
each SingleResponse are the CRL's; answers without a nonce are cached until a new CRL arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from .live import Single, single_from_held
from .request import MalformedRequest, parse_request
from .tenants import CACHE_MAX
from .store import GOOD, REVOKED, Store, StoreError

# RFC 6960 §4.2.1 OCSPResponseStatus; error responses carry no responseBytes.
MALFORMED, INTERNAL_ERROR, TRY_LATER, SIG_REQUIRED, UNAUTHORIZED = 1, 2, 3, 5, 6


def error_response(status: int) -> bytes:
    return bytes((0x30, 0x03, 0x0A, 0x01, status))


@dataclass(frozen=True, slots=True)
class Answer:
    der: bytes
    outcome: str  # "good" | "revoked" | "unknown" | "unauthorized" | "malformed" | "trylater" | "error"
    this_update: int | None = None  # set for served (successful) responses: the caching headers
    next_update: int | None = None
    cacheable: bool = True

    @property
    def successful(self) -> bool:
        return self.this_update is not None


_OUTCOME = {GOOD: "good", REVOKED: "revoked"}

# Held answers kept by the exact request bytes that got them (the RFC 5019 shape repeats: the same
# certificate asked by many clients, the same request replayed by one): a hit skips decoding, the lookups
# and the read. The key is the whole request, so a hit is a request already fully checked by the same
# rules; dropped whenever the store or the tenants change (Store.version), and a held answer past its
# nextUpdate is never returned from it (the rules decide again: tryLater). About 1.6 KiB an answer with
# its prebuilt reply (http.Endpoint._wire): 13 MiB at most.
HOT_MAX = 8192


LIVE_VALIDITY = 3600  # nextUpdate of a live `unknown` answer
UNISSUED_VALIDITY = 300  # nextUpdate of a local CA's live answer for a serial with no held response (it may be one
# issued seconds ago whose response is not yet published: keep such an answer short-lived)
SKEW = 300
REASON_NAMES = {0: "unspecified", 1: "key_compromise", 2: "ca_compromise", 3: "affiliation_changed", 4: "superseded",
                5: "cessation_of_operation", 6: "certificate_hold", 8: "remove_from_crl", 9: "privilege_withdrawn",
                10: "aa_compromise"}
_EPOCH = datetime.fromtimestamp(0, timezone.utc)


def unissued_single(cid, policy: str, this_update: int, next_update: int) -> Single:
    """RFC 6960 §2.2: `revoked` for a serial that was not issued is 1970-01-01, certificateHold."""
    if policy == "revoked":
        return Single(cid.hash, cid.name_hash, cid.key_hash, cid.serial, "revoked", this_update, next_update,
                      _EPOCH, "certificate_hold")
    return Single(cid.hash, cid.name_hash, cid.key_hash, cid.serial, "unknown", this_update, next_update)


class Responder:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time, live=None, tenants=None,
                 unissued_default: str = "unauthorized", unissued: dict[str, str] | None = None):
        self.store = store
        self.clock = clock
        self.live = live  # live.LiveSigner, or None: pre-produced responses only
        self.tenants = tenants  # tenants.Tenants, or None
        self.unissued_default = unissued_default
        self.unissued = unissued or {}
        self._hot: dict[bytes, Answer] = {}
        self._hot_version: tuple[int, int] = (-1, -1)

    def answer(self, der: bytes) -> Answer:
        version = (self.store.version, self.tenants.version if self.tenants is not None else 0)
        if version != self._hot_version:
            self._hot.clear()
            self._hot_version = version
        hit = self._hot.get(der)
        if hit is not None and hit.next_update > self.clock():  # type: ignore[operator] - a held answer has one
            return hit
        return self._decide(der)

    def _decide(self, der: bytes) -> Answer:
        try:
            req = parse_request(der)
        except MalformedRequest:
            return Answer(error_response(MALFORMED), "malformed")
        if self.tenants is not None and self.tenants.by_name:
            c0 = req.cert_ids[0]
            t = self.tenants.for_issuer(c0.hash, c0.name_hash, c0.key_hash)
            if t is not None:
                return self._tenant(t, req)
        if len(req.cert_ids) != 1 or req.nonce is not None:
            live = self._live(req)
            if live is not None:
                return live
        if len(req.cert_ids) != 1:
            return Answer(error_response(UNAUTHORIZED), "unauthorized")
        cid = req.cert_ids[0]
        ca = self.store.ca_for(cid.hash, cid.name_hash, cid.key_hash)
        if ca is None:
            return Answer(error_response(UNAUTHORIZED), "unauthorized")
        try:
            held = self.store.get(ca, cid.hash, cid.serial)
        except (StoreError, OSError):
            return Answer(error_response(INTERNAL_ERROR), "error")
        if held is None:
            return self._unissued(ca.name, req)
        if held.next_update <= self.clock():
            return Answer(error_response(TRY_LATER), "trylater")
        answer = Answer(held.der, _OUTCOME.get(held.status, "unknown"), held.this_update, held.next_update)
        if req.nonce is None and type(der) is bytes:  # with a nonce, a responder key installed later changes the answer
            if len(self._hot) >= HOT_MAX:
                self._hot.clear()
            self._hot[der] = answer
        return answer

    def _live(self, req) -> Answer | None:
        """A live answer when every CertID names the same issuer and that issuer has a delegated
        responder; None to fall back to the pre-produced rules."""
        if self.live is None:
            return None
        now = int(self.clock())
        records = [self.store.ca_for(c.hash, c.name_hash, c.key_hash) for c in req.cert_ids]
        if any(r is None for r in records) or len({r.name for r in records}) != 1:
            return None
        ca = records[0]
        if not self.live.can_sign(ca.name, now):
            return None
        singles = []
        extended = False
        try:
            for c in req.cert_ids:
                held = self.store.get(ca, c.hash, c.serial)
                if held is not None and held.next_update <= now:
                    return Answer(error_response(TRY_LATER), "trylater")
                if held is None and self.unissued.get(ca.name, self.unissued_default) == "revoked":
                    singles.append(unissued_single(c, "revoked", now, now + UNISSUED_VALIDITY))
                    extended = True
                else:
                    singles.append(single_from_held(c, held.der if held else None, now, LIVE_VALIDITY))
            der = self.live.sign(ca.name, singles, req.nonce, now, extended)
        except Exception:  # noqa: BLE001 - a token or store failure is an internalError, never a crash
            return Answer(error_response(INTERNAL_ERROR), "error")
        outcome = singles[0].status if len(singles) == 1 else "good"
        nu = min((s.next_update for s in singles if s.next_update), default=now + LIVE_VALIDITY)
        return Answer(der, outcome, now, nu, cacheable=False)

    def _unissued(self, ca: str, req) -> Answer:
        """A local CA's serial with no held response: never `good`."""
        policy = self.unissued.get(ca, self.unissued_default)
        now = int(self.clock())
        if policy == "unauthorized" or self.live is None or not self.live.can_sign(ca, now):
            return Answer(error_response(UNAUTHORIZED), "unauthorized")
        single = unissued_single(req.cert_ids[0], policy, now, now + UNISSUED_VALIDITY)
        try:
            der = self.live.sign(ca, [single], req.nonce, now, policy == "revoked")
        except Exception:  # noqa: BLE001 - a token failure is an internalError, never a crash
            return Answer(error_response(INTERNAL_ERROR), "error")
        return Answer(der, single.status, now, now + UNISSUED_VALIDITY, cacheable=False)

    def _tenant(self, t, req) -> Answer:
        """A CRL-fed tenant's answer, signed live by its delegated responder (see the module docstring)."""
        now = int(self.clock())
        for c in req.cert_ids[1:]:
            if self.tenants.for_issuer(c.hash, c.name_hash, c.key_hash) is not t:
                return Answer(error_response(UNAUTHORIZED), "unauthorized")
        if self.live is None or not self.live.can_sign(t.signer_key, now):
            return Answer(error_response(UNAUTHORIZED), "unauthorized")
        crl = t.crl
        if crl is None or crl.next_update <= now or crl.this_update > now + SKEW:
            return Answer(error_response(TRY_LATER), "trylater")
        one = len(req.cert_ids) == 1 and req.nonce is None
        if one:
            c = req.cert_ids[0]
            hit = t.cache.get((c.hash, c.serial))
            if hit is not None:
                return Answer(hit[0], hit[1], crl.this_update, crl.next_update)
        singles = []
        extended = False
        for c in req.cert_ids:
            rev = crl.revoked.get(c.serial)
            if rev is not None:
                singles.append(Single(c.hash, c.name_hash, c.key_hash, c.serial, "revoked", crl.this_update,
                                      crl.next_update, datetime.fromtimestamp(rev[0], timezone.utc),
                                      REASON_NAMES.get(rev[1]) if rev[1] is not None else None))
            elif t.serials is not None and c.serial not in t.serials:
                singles.append(unissued_single(c, t.unissued, crl.this_update, crl.next_update))
                extended = extended or t.unissued == "revoked"
            else:
                singles.append(Single(c.hash, c.name_hash, c.key_hash, c.serial, "good", crl.this_update, crl.next_update))
        try:
            der = self.live.sign(t.signer_key, singles, req.nonce, now, extended)
        except Exception:  # noqa: BLE001 - a token failure is an internalError, never a crash
            return Answer(error_response(INTERNAL_ERROR), "error")
        outcome = singles[0].status if len(singles) == 1 else "good"
        if one:
            if len(t.cache) >= CACHE_MAX:
                t.cache.clear()
            t.cache[(req.cert_ids[0].hash, req.cert_ids[0].serial)] = (der, outcome)
        return Answer(der, outcome, crl.this_update, crl.next_update, cacheable=req.nonce is None)

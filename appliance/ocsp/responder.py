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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .live import single_from_held
from .request import MalformedRequest, parse_request
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


LIVE_VALIDITY = 3600  # nextUpdate of a live `unknown` answer


class Responder:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time, live=None):
        self.store = store
        self.clock = clock
        self.live = live  # live.LiveSigner, or None: pre-produced responses only

    def answer(self, der: bytes) -> Answer:
        try:
            req = parse_request(der)
        except MalformedRequest:
            return Answer(error_response(MALFORMED), "malformed")
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
            return Answer(error_response(UNAUTHORIZED), "unauthorized")
        if held.next_update <= self.clock():
            return Answer(error_response(TRY_LATER), "trylater")
        return Answer(held.der, _OUTCOME.get(held.status, "unknown"), held.this_update, held.next_update)

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
        try:
            for c in req.cert_ids:
                held = self.store.get(ca, c.hash, c.serial)
                if held is not None and held.next_update <= now:
                    return Answer(error_response(TRY_LATER), "trylater")
                singles.append(single_from_held(c, held.der if held else None, now, LIVE_VALIDITY))
            der = self.live.sign(ca.name, singles, req.nonce, now)
        except Exception:  # noqa: BLE001 - a token or store failure is an internalError, never a crash
            return Answer(error_response(INTERNAL_ERROR), "error")
        outcome = singles[0].status if len(singles) == 1 else "good"
        nu = min((s.next_update for s in singles if s.next_update), default=now + LIVE_VALIDITY)
        return Answer(der, outcome, now, nu, cacheable=False)

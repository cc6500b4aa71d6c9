"""The OCSP decision, sans-IO: request bytes + store + clock → response bytes and what to count.

Pre-produced responses only (RFC 6960 §2.5, RFC 5019). Rules, in order:
- garbage → malformedRequest;
- several CertIDs → unauthorized (answering them needs live signing with a delegated responder
  key of the endpoint's own: the next step of issue #3);
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

    @property
    def successful(self) -> bool:
        return self.this_update is not None


_OUTCOME = {GOOD: "good", REVOKED: "revoked"}


class Responder:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock

    def answer(self, der: bytes) -> Answer:
        try:
            req = parse_request(der)
        except MalformedRequest:
            return Answer(error_response(MALFORMED), "malformed")
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

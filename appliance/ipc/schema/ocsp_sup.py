"""Supervisor <-> OCSP endpoint: its configuration and statistics."""

from __future__ import annotations

from .cis import *  # each link module sees the messages of those before it
from .common import _Msg


# ---------------------------------------------------------------- supervisor <-> OCSP endpoint


class OcspConfig(_Msg, tag="ocsp-config"):
    store_dir: Text  # the endpoint's own on-disk store of pre-signed responses, CRLs and CA certificates
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)]
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)]
    max_age: Annotated[int, msgspec.Meta(ge=0, le=7 * 86400)]  # cap on Cache-Control max-age
    max_per_source: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 64  # connections per IPv4 address or IPv6 /64
    head_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0  # seconds to a complete request head
    # The endpoint's own PKCS#11 token for delegated responder keys (never a CA key); None: no live signing.
    token_module: Text | None = None
    token_label: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "donjon-ocsp"
    token_pin: Pin | None = None
    softhsm_conf: Text | None = None
    # Local CAs: the answer for a serial with no held response (never `good`); "unknown" and
    # "revoked" (extended revoked) need the CA's delegated responder, else "unauthorized".
    unissued_default: Literal["unauthorized", "unknown", "revoked"] = "unauthorized"
    unissued: dict[Name, Literal["unauthorized", "unknown", "revoked"]] = {}


class OcspStats(_Msg, tag="ocsp-stats"):
    requests: int
    good: int
    revoked: int
    unauthorized: int
    malformed: int
    errors: int
    responses_held: int
    oldest_this_update: Epoch | None


SupToOcsp = Union[Hello, OcspConfig, Shutdown]

OcspToSup = Union[Hello, Ready, Event, OcspStats]

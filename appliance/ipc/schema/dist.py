"""Supervisor/Factory <-> Distribution agent: publication jobs and their acknowledgements."""

from __future__ import annotations

from .ocsp_feed import *  # each link module sees the messages of those before it
from .common import _Msg


# ---------------------------------------------------------------- supervisor/Factory <-> Distribution agent


class DistConfig(_Msg, tag="dist-config"):
    """The rules with their credentials: held only in the agent's memory, never logged."""

    rules: list[DistRule]


SupToDist = Union[Hello, DistConfig, Shutdown]
DistToSup = Union[Hello, Ready, Event]


class DistJob(_Msg, tag="dist-job"):
    """Publish (or remove) one object at one destination. The object's DER follows in DistData
    frames (`size` bytes in all); `issuer` is the CA certificate the agent verifies it against."""

    id: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    rule: Name
    action: Literal["ca-cert", "cert", "uncert", "crl", "issued-serials"]
    ca: Name
    ca_root: bool  # a self-signed CA: its CRL is also the authority revocation list
    issuer: Der
    subject: tuple[Attr, ...]  # of the object's subject (certificates) or of the CA: for DN templates
    number: Annotated[int, msgspec.Meta(ge=0, lt=2**62)] = 0  # CRL / list number
    size: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 0
    # Order per destination: after a failure the agent answers "not attempted" to the rest of this
    # round; the Factory resends from the oldest pending job in the next round.
    round: Annotated[int, msgspec.Meta(ge=0, lt=2**62)] = 0
    # With an issued-serials list: the latest signed audit checkpoint (JSON), published beside it so
    # that a CMDB rolled back to an older copy is detectable from outside (issue #6).
    attachment: Annotated[bytes, msgspec.Meta(max_length=16384)] | None = None
    # Which CRL of the CA: "" its complete CRL, "-<k>" shard k, "-delta" its delta CRL; published as
    # <ca><part>.crl over HTTP (a shard's own entry in LDAP, a delta in deltaRevocationList).
    part: Annotated[str, msgspec.Meta(pattern=r"^(-(0|[1-9][0-9]{0,2})|-delta)?$")] = ""


class DistData(_Msg, tag="dist-data"):
    id: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]


class DistAck(_Msg, tag="dist-ack"):
    """The outcome of one job: done, failed (retry later), or refused for good (park it).
    `attempted` False: not tried because an earlier job of the same destination failed."""

    id: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    outcome: Literal["done", "failed", "permanent"]
    error: Text = ""
    attempted: bool = True


class FetchCrl(_Msg, tag="fetch-crl"):
    """Fetch a CRL-fed tenant's CRL from the first of these URLs that answers (http://, ldap://)."""

    id: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    tenant: Name
    urls: Annotated[list[Annotated[str, msgspec.Meta(max_length=1024)]], msgspec.Meta(min_length=1, max_length=16)]


class FetchedCrl(_Msg, tag="fetched-crl"):
    """What the URL returned, in chunks (unverified: the Factory checks it against the tenant CA)."""

    id: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    url: Annotated[str, msgspec.Meta(max_length=1024)]
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]
    last: bool


class FetchFailed(_Msg, tag="fetch-failed"):
    id: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    error: Text


FactoryToDist = Union[Hello, DistJob, DistData, FetchCrl]
DistToFactory = Union[Hello, DistAck, FetchedCrl, FetchFailed]

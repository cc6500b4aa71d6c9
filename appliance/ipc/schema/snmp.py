"""Supervisor <-> SNMP agent: configuration, status and notifications."""

from __future__ import annotations

from .ocsp_sup import *  # each link module sees the messages of those before it
from .common import _Msg


# ---------------------------------------------------------------- supervisor <-> SNMP agent


class SnmpUser(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An SNMPv3 USM user: authPriv with HMAC-SHA-2 and AES only."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    auth: Literal["sha256", "sha384", "sha512"]
    auth_key: Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
    priv: Literal["aes128", "aes192", "aes256"]
    priv_key: Annotated[str, msgspec.Meta(min_length=8, max_length=256)]


class SnmpTarget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where notifications go: v3 (with a user above) or v2c (with a community); trap or inform."""

    host: Annotated[str, msgspec.Meta(max_length=255)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    kind: Literal["trap", "inform"]
    version: Literal["v3", "v2c"]
    user: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    community: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class SnmpConfig(_Msg, tag="snmp-config"):
    listen: Text  # host:port (UDP)
    users: list[SnmpUser]
    community: Annotated[str, msgspec.Meta(max_length=64)] | None  # read-only v2c, optional
    community_sources: list[Annotated[str, msgspec.Meta(max_length=64)]]  # CIDRs allowed to use it
    targets: list[SnmpTarget]


class RoleState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    name: Name
    state: Literal["starting", "running", "restarting", "stopped", "failed", "unresponsive"]
    restarts: int
    pid: int


class TokenState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    label: Annotated[str, msgspec.Meta(max_length=32)]
    available: bool


class CaState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    key_type: KeyType
    not_after: Epoch
    crl_number: int
    crl_next_update: Epoch | None
    issued: int
    revoked: int


class DestinationState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    name: Name
    backlog: int
    failing: bool


class StatusReport(_Msg, tag="status-report"):
    """The Factory's part of the appliance status (for SNMP), sent every few seconds."""

    activated: bool
    cas: list[CaState]
    audit_records: int
    audit_checkpoint: Epoch | None
    oldest_response_age: int | None
    ocsp_earliest_next_update: Epoch | None = None  # of every pre-produced response held in the CMDB
    destinations: list[DestinationState] = []  # distribution rules: backlog and whether failing


class ConfigSet(_Msg, tag="config-set"):
    """Write one setting into HOME/donjon.toml (asked by an administrator, checked and audited by the
    Factory; the supervisor validates it again: it never trusts the Factory's check)."""

    id: ReqId
    key: Annotated[str, msgspec.Meta(max_length=64)]
    value: Annotated[str, msgspec.Meta(max_length=1024)]


class ConfigSetDone(_Msg, tag="config-set-done"):
    id: ReqId
    message: Text  # what was written, or why nothing was
    ok: bool


SupToFactory = Union[Hello, FactoryConfig, AutoActivate, Ceremony, Shutdown, OcspStats, NewLink,  # the endpoint's counters, relayed
                     ConfigSetDone, CheckRestoreOfficers]
FactoryToSup = Union[Hello, Ready, Event, StatusReport, ConfigSet]


class GatewayCounters(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """The protocol gateway's last reported counters (its GatewayStats)."""

    requests: Annotated[int, msgspec.Meta(ge=0)]
    errors: Annotated[int, msgspec.Meta(ge=0)]
    issued: Annotated[int, msgspec.Meta(ge=0)]
    refused: Annotated[int, msgspec.Meta(ge=0)]
    orders_open: Annotated[int, msgspec.Meta(ge=0)]


class ApplianceStatus(_Msg, tag="appliance-status"):
    """A snapshot for the SNMP agent (sent on change and every few seconds)."""

    activated: bool
    roles: list[RoleState]
    tokens: list[TokenState]
    cas: list[CaState]
    ocsp: OcspStats | None
    oldest_response_age: int | None  # seconds since the oldest held response's thisUpdate
    destinations: list[DestinationState]
    audit_records: int
    audit_checkpoint: Epoch | None
    gateway: GatewayCounters | None = None  # when the gateway runs and has reported


NotifyKind = Literal[
    "role-died", "role-restarted", "token-unavailable", "token-recovered", "activated", "deactivated",
    "login-lockout", "ca-cert-expiring", "responder-cert-expiring", "crl-expiring", "crl-lapsed",
    "ocsp-expiring", "ocsp-lapsed", "destination-failing", "audit-verify-failed", "disk-nearly-full",
    "role-unresponsive",
]


class Notify(_Msg, tag="notify"):
    """An event the operator must hear about: the agent sends the matching NOTIFICATION-TYPE."""

    kind: NotifyKind
    subject: Annotated[str, msgspec.Meta(max_length=255)]  # role name, token label, CA name, destination ...
    detail: Text


SupToSnmp = Union[Hello, SnmpConfig, ApplianceStatus, Notify, Shutdown]
SnmpToSup = Union[Hello, Ready, Event]

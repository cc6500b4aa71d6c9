"""Supervisor <-> CIS and supervisor <-> Factory: configuration, activation, events, status."""

from __future__ import annotations

from .common import *  # each link module sees the messages of those before it
from .common import _Msg


# ---------------------------------------------------------------- supervisor <-> CIS


class CisConfig(_Msg, tag="cis-config"):
    module: Text
    token_label: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    softhsm_conf: Text | None
    profiles: dict[Name, Annotated[str, msgspec.Meta(max_length=16384)]]  # operator TOML overrides
    base_url: Text | None  # CRL DP / AIA URLs are derived from it: {base}/crl/<ca>.crl, {base}/ocsp, {base}/ca/<ca>.crt
    crl_shards: dict[Name, Annotated[int, msgspec.Meta(ge=1, le=256)]] = {}  # CRL DP {base}/crl/<ca>-<k>.crl
    crl_delta: tuple[Name, ...] = ()  # CAs with delta CRLs: freshestCRL {base}/crl/<ca>-delta.crl


class RecoverKeys(_Msg, tag="recover-keys"):
    """Disaster recovery onto a fresh token (`donjon keys recover`): the CIS logs in, combines the
    custodians' KEK shares itself, checks the backup's MAC and unwraps every key; answered by an Event
    ("keys-recovered" or "keys-recover-failed", one line)."""

    pin: Pin
    shares: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=1200)]], msgspec.Meta(min_length=1, max_length=16)]
    blob: Annotated[bytes, msgspec.Meta(max_length=192 * 1024)]  # under the control link's 256 KiB frame


SupToCis = Union[Hello, CisConfig, Shutdown, RecoverKeys]
CisToSup = Union[Hello, Ready, Event]


# ---------------------------------------------------------------- supervisor <-> Factory


class FactoryConfig(_Msg, tag="factory-config"):
    home: Text
    cipher: Literal["chacha20", "aegis"]
    profiles: dict[Name, Annotated[str, msgspec.Meta(max_length=16384)]]
    base_url: Text | None
    crl_validity_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 366)]
    admin_gid: int | None
    dev_uid: int | None  # developer mode: this uid may use the admin socket
    ocsp_validity_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 31)] = 24
    ocsp_hashes: tuple[Literal["sha1", "sha256"], ...] = ("sha1",)
    responder_days: Annotated[int, msgspec.Meta(ge=1, le=30)] = 30  # renewed delegated responders last this long
    responder_renew_days: Annotated[int, msgspec.Meta(ge=0, le=29)] = 10  # ... renewed this close to notAfter; 0: never
    crl_shards: dict[Name, Annotated[int, msgspec.Meta(ge=1, le=256)]] = {}  # CRL shards per CA (crlshards.py)
    crl_delta: dict[Name, Annotated[int, msgspec.Meta(ge=1, le=1440)]] = {}  # minutes between delta CRLs per CA
    dist_rules: list[DistRule] = []  # what each destination receives (credentials stripped: the agent alone holds them)
    dist_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 50
    dist_backoff_max: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 3600
    # Officers, dual control and audit checkpoints (issue #6).
    session_idle_seconds: Annotated[int, msgspec.Meta(ge=30, le=86400)] = 900
    max_login_failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    dual_approvals: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1  # M: distinct officers, the requester included
    dual_operations: tuple[Name, ...] = ()
    dual_expiry_seconds: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 3600
    checkpoint_seconds: Annotated[int, msgspec.Meta(ge=0, le=30 * 86400)] = 3600  # 0: on demand only
    activation_max_failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    activation_lockout_seconds: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 900
    # donjon.toml [ca-profiles]: per CA, the profiles it may issue (narrows what its token policy allows).
    ca_profiles: dict[Name, Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)]] = {}
    auto_activate: bool = False  # an AutoActivate follows: admin requests wait for it instead of racing it
    cis_deadline_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # a CIS silent this long is unresponsive
    # The protocol gateway's policy, checked again here for every enrolment it sends: the (profile, CA)
    # pairs it may ask for ("" : any CA allowed to issue the profile), and the names any account may get.
    gateway_profiles: tuple[tuple[Name, Annotated[str, msgspec.Meta(max_length=64)]], ...] = ()
    gateway_name_patterns: tuple[Annotated[str, msgspec.Meta(max_length=253)], ...] = ()
    gateway_tls_names: tuple[Annotated[str, msgspec.Meta(max_length=253)], ...] = ()  # its own server certificate
    # The KGS's card profiles (TOML): the Factory certifies only the slots, CAs and profiles they name.
    card_profiles: dict[Name, Annotated[str, msgspec.Meta(max_length=65536)]] = {}
    standby: bool = False  # ship every commit to the standby CMDB (HOME/cmdb/standby) before acknowledging
    # An offline root's CRL calendar (tier.py): warn when fewer than this many pre-signed CRLs remain, or
    # when the current one lapses within this many hours with none to follow.
    calendar_warn_remaining: Annotated[int, msgspec.Meta(ge=1, le=120)] = 3
    calendar_warn_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 90)] = 72


class RestoreOfficer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    code: Annotated[str, msgspec.Meta(max_length=8)] = ""  # TOTP, for an officer with the second factor on


class CheckRestoreOfficers(_Msg, tag="check-restore-officers"):
    """`donjon restore` (the appliance stopped), dual control: the Factory unwraps the backup's CMDB key
    through the CIS, opens the backup's database (HOME/cmdb/restore-check.sqlite, read-only) and checks
    these officers against its own officers table; answered by an Event ("restore-officers-ok" with
    their names, or "restore-officers-refused", one line)."""

    pin: Pin
    wrapped_db_key: Annotated[bytes, msgspec.Meta(max_length=4096)]
    officers: Annotated[list[RestoreOfficer], msgspec.Meta(min_length=2, max_length=4)]


class AutoActivate(_Msg, tag="auto-activate"):
    """Developer mode only: the supervisor read the PIN file."""

    pin: Pin


class NewLink(_Msg, tag="new-link"):
    """A restarted role's link, its descriptor attached (SCM_RIGHTS): the receiver drops the old one."""

    link: Literal["factory-ocsp", "factory-distribution", "factory-gateway", "factory-kgs"]
    role: Name = "ocsp"  # which process ("ocsp", "ocsp.1", ..., "distribution")


OfficerRole = Literal["administrator", "operator", "auditor"]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class InitOfficer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An officer created by `donjon init --officer` (the first administrator, at least)."""

    name: Name
    roles: Annotated[tuple[OfficerRole, ...], msgspec.Meta(min_length=1, max_length=3)]
    password: Password


class Ceremony(_Msg, tag="ceremony"):
    """`donjon init`: run this root ceremony (already validated) and stop."""

    pin: Pin
    spec: Annotated[bytes, msgspec.Meta(max_length=65536)]  # msgpack of appliance.ceremonyspec.CeremonySpec
    officers: Annotated[list[InitOfficer], msgspec.Meta(max_length=16)] = []

"""Every message that crosses a Donjon process boundary, one union per direction of each link.

A receiver decodes with the union of what its peer may send and nothing else (msgspec rejects
unknown tags, missing and extra fields, wrong types, oversize values). Changing anything here
changes SCHEMA_HASH, which a test pins: bump VERSION in the same change.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

VERSION = 3

# Size limits, checked by msgspec at decode time.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Der = Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
Pin = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ReqId = Annotated[int, msgspec.Meta(ge=0, lt=2**62)]
Epoch = Annotated[int, msgspec.Meta(ge=0, lt=2**40)]
Serial = Annotated[bytes, msgspec.Meta(min_length=1, max_length=20)]  # big-endian, positive (msgpack ints stop at 64 bits)
KeyType = Literal["rsa2048", "rsa3072", "rsa4096", "p256", "p384", "ed25519"]
Reason = Annotated[int, msgspec.Meta(ge=0, le=10)]
Attr = tuple[Annotated[str, msgspec.Meta(max_length=32)], Annotated[str, msgspec.Meta(max_length=256)]]

LinkName = Literal["sup-cis", "sup-factory", "factory-cis", "admin", "sup-ocsp", "factory-ocsp", "sup-snmp",
                   "sup-distribution", "factory-distribution"]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


# ---------------------------------------------------------------- common


class Hello(_Msg, tag="hello"):
    link: LinkName
    version: int


class Refused(_Msg, tag="refused"):
    """A typed refusal. `code` is machine-readable, `reason` is one line for the operator."""

    id: ReqId
    code: Literal["policy", "not-found", "exists", "inactive", "auth", "hsm", "internal", "bad-request", "lint", "busy", "denied"]
    reason: Text


class Ok(_Msg, tag="ok"):
    id: ReqId


class Shutdown(_Msg, tag="shutdown"):
    pass


class Ready(_Msg, tag="ready"):
    role: Name
    pid: int


class Event(_Msg, tag="event"):
    """Something an operator should hear about (forwarded to logs and, later, SNMP)."""

    kind: Name
    detail: Text


# ---------------------------------------------------------------- distribution rules (config -> Factory, agent)

Publishable = Literal["ca-cert", "certs", "crl", "issued-serials"]


class DistRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One destination and what goes there. The Factory's copy has `secret` = None."""

    name: Name
    url: Text  # ldap://, ldaps://, http://, https:// (HTTP: may hold {ca} and {name} placeholders)
    publish: tuple[Publishable, ...]
    cas: tuple[Name, ...] = ()  # empty: every CA
    profiles: tuple[Name, ...] = ()  # for "certs": empty means every profile
    remove_on_revoke: bool = True
    bind_dn: Text | None = None  # LDAP simple bind (None: anonymous)
    username: Text | None = None  # HTTP basic auth user (None with a secret: bearer token)
    secret: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    starttls: bool = False
    ca_file_pem: Annotated[bytes, msgspec.Meta(max_length=256 * 1024)] | None = None  # trust anchors for TLS
    dn: Text | None = None  # end-entity entry template, e.g. cn={CN},ou=people,dc=example,dc=org
    ca_dn: Text | None = None  # CA entry template, e.g. cn={CN},ou=CAs,dc=example,dc=org
    entry_classes: tuple[Annotated[str, msgspec.Meta(max_length=64)], ...] = ("inetOrgPerson", "pkiUser")
    entry_attributes: dict[Annotated[str, msgspec.Meta(max_length=64)], Text] = {}
    ca_entry_classes: tuple[Annotated[str, msgspec.Meta(max_length=64)], ...] = ("applicationProcess", "pkiCA")
    method: Literal["PUT", "POST"] = "PUT"
    timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    connections: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4  # parallel lanes; one object always takes the same lane


# ---------------------------------------------------------------- supervisor <-> CIS


class CisConfig(_Msg, tag="cis-config"):
    module: Text
    token_label: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    softhsm_conf: Text | None
    profiles: dict[Name, Annotated[str, msgspec.Meta(max_length=16384)]]  # operator TOML overrides
    base_url: Text | None  # CRL DP / AIA URLs are derived from it: {base}/crl/<ca>.crl, {base}/ocsp, {base}/ca/<ca>.crt


SupToCis = Union[Hello, CisConfig, Shutdown]
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


class AutoActivate(_Msg, tag="auto-activate"):
    """Developer mode only: the supervisor read the PIN file."""

    pin: Pin


class NewLink(_Msg, tag="new-link"):
    """A restarted role's link, its descriptor attached (SCM_RIGHTS): the receiver drops the old one."""

    link: Literal["factory-ocsp", "factory-distribution"]
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




# ---------------------------------------------------------------- Factory <-> CIS


class Activate(_Msg, tag="activate"):
    id: ReqId
    pin: Pin
    wrapped_db_key: bytes | None  # None: first start, create the wrapping key and a new database key


class Activated(_Msg, tag="activated"):
    id: ReqId
    db_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    wrapped_db_key: Annotated[bytes, msgspec.Meta(max_length=512)]
    token: Text


class GenerateKey(_Msg, tag="genkey"):
    id: ReqId
    label: Name
    key_type: KeyType


class PublicKey(_Msg, tag="pubkey"):
    id: ReqId
    spki: Der


class DeleteKey(_Msg, tag="delkey"):
    id: ReqId
    label: Name


class Validity(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    not_before: Epoch
    not_after: Epoch


class IssueItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to certify. The CIS builds the TBS itself from these fields with policy/."""

    profile: Name
    spki: Der
    subject: tuple[Attr, ...]
    sans: tuple[Attr, ...]
    serial: Serial
    validity: Validity
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    permitted_dns: tuple[Annotated[str, msgspec.Meta(max_length=253)], ...] = ()
    install_as: Name | None = None  # a CA certificate for the token key of this label: keep it beside the key
    # With install_as: what the new CA may issue, written once beside its key (the CIS enforces it);
    # both empty: the default for its place (a root: CA profiles; an issuing CA: the others).
    allowed_kinds: tuple[Literal["sub-ca", "ocsp-responder", "end-entity"], ...] = ()
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()


class Issue(_Msg, tag="issue"):
    """Sign a batch under the CA whose key label is `ca`; `self_signed` (one item) makes that CA's root certificate."""

    id: ReqId
    ca: Name
    self_signed: bool
    items: Annotated[list[IssueItem], msgspec.Meta(min_length=1, max_length=1024)]


class IssueOutcome(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    cert: Der | None
    error: Text | None


class Issued(_Msg, tag="issued"):
    id: ReqId
    outcomes: list[IssueOutcome]


class CrlBegin(_Msg, tag="crl-begin"):
    id: ReqId
    ca: Name
    crl_number: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    this_update: Epoch
    next_update: Epoch
    entry_count: Annotated[int, msgspec.Meta(ge=0, le=50_000_000)]
    entries_length: Annotated[int, msgspec.Meta(ge=0, le=4_000_000_000)]
    # "issued-serials": the same stream signs the CA's issued-serials list (policy/serials.py),
    # fed with SerialEntries instead of CrlEntries; `crl_number` is then the list number.
    kind: Literal["crl", "issued-serials"] = "crl"


CrlEntry = tuple[Serial, Epoch, Reason | None, Epoch | None]


class CrlEntries(_Msg, tag="crl-entries"):
    id: ReqId
    entries: Annotated[list[CrlEntry], msgspec.Meta(max_length=20000)]


class SerialEntries(_Msg, tag="serial-entries"):
    id: ReqId
    serials: Annotated[list[Serial], msgspec.Meta(max_length=20000)]


class CrlEnd(_Msg, tag="crl-end"):
    id: ReqId


class CrlChunk(_Msg, tag="crl-chunk"):
    """Encoded TBS bytes, in order; the first chunk is the TBS header."""

    id: ReqId
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]


class CrlSigned(_Msg, tag="crl-signed"):
    id: ReqId
    prefix: Annotated[bytes, msgspec.Meta(max_length=16)]  # CertificateList header
    suffix: Annotated[bytes, msgspec.Meta(max_length=1024)]  # algorithm + signature
    tbs_sha256: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


OcspItem = tuple[Serial, Literal[0, 1], Epoch | None, Reason | None]  # serial, 0 good / 1 revoked, revoked_at, reason


class SignOcsp(_Msg, tag="sign-ocsp"):
    """Pre-produce OCSP responses (RFC 6960 §2.5, RFC 5019) for these certificates of CA `ca`, one
    response per item and CertID hash algorithm, signed by the CA key. The CIS builds every response."""

    id: ReqId
    ca: Name
    this_update: Epoch
    next_update: Epoch
    hashes: tuple[Literal["sha1", "sha256"], ...]
    items: Annotated[list[OcspItem], msgspec.Meta(min_length=1, max_length=4096)]


class OcspSigned(_Msg, tag="ocsp-signed"):
    """DER OCSPResponses, item-major: for each item, one per hash algorithm in request order."""

    id: ReqId
    responses: list[Der]


class Ping(_Msg, tag="ping"):
    id: ReqId


Digest = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class SignCheckpoint(_Msg, tag="sign-checkpoint"):
    """Sign a checkpoint of the audit chain head with the audit key (created with its self-issued
    certificate on first use). The CIS builds the signed text itself (policy.audit.checkpoint_tbs)."""

    id: ReqId
    seq: Annotated[int, msgspec.Meta(ge=0, lt=2**62)]
    head: Digest
    time: Epoch


class GetAuditCert(_Msg, tag="get-audit-cert"):
    id: ReqId


class CheckpointSigned(_Msg, tag="checkpoint-signed"):
    id: ReqId
    tbs: Annotated[bytes, msgspec.Meta(max_length=1024)]
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]


class AuditCert(_Msg, tag="audit-cert"):
    id: ReqId
    cert: Der


FactoryToCis = Union[Hello, Activate, GenerateKey, DeleteKey, Issue, CrlBegin, CrlEntries, SerialEntries, CrlEnd, SignOcsp, Ping,
                     SignCheckpoint, GetAuditCert]
CisToFactory = Union[Hello, Activated, PublicKey, Issued, CrlChunk, CrlSigned, OcspSigned, Ok, Refused,
                     CheckpointSigned, AuditCert]


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
                     ConfigSetDone]
FactoryToSup = Union[Hello, Ready, Event, StatusReport, ConfigSet]


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


# ---------------------------------------------------------------- Factory -> OCSP endpoint (its feed)


class PublishCa(_Msg, tag="publish-ca"):
    """A CA the endpoint serves: its certificate (at /ca/<ca>.crt; the OCSP issuer hashes derive from it)."""

    ca: Name
    cert: Der


PublishedResponse = tuple[Serial, Literal["sha1", "sha256"], Epoch, Epoch, Der]  # serial, CertID hash, thisUpdate, nextUpdate, DER


class PublishResponses(_Msg, tag="publish-responses"):
    """Pre-signed responses replacing any older one for the same (ca, hash, serial). `seq` is the
    Factory's publication sequence number of the last of them: the endpoint keeps the highest it
    has stored and says it in OcspResume when its link opens, and the Factory resends what is newer."""

    ca: Name
    responses: Annotated[list[PublishedResponse], msgspec.Meta(max_length=8192)]
    seq: Annotated[int, msgspec.Meta(ge=0, lt=2**62)] = 0


class PublishCrl(_Msg, tag="publish-crl"):
    """A CRL (DER) streamed in chunks; the endpoint swaps it in when `last` arrives, if newer."""

    ca: Name
    number: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]
    last: bool


class ResponderKeyRequest(_Msg, tag="responder-key-request"):
    """Generate a delegated responder key (P-256) for CA `ca` in the endpoint's own token."""

    id: ReqId
    ca: Name


class ResponderKey(_Msg, tag="responder-key"):
    id: ReqId
    ca: Name
    label: Name
    spki: Der


class ResponderCert(_Msg, tag="responder-cert"):
    """The certificate (id-kp-OCSPSigning, ocsp-nocheck) the CA issued for that key: live signing starts."""

    ca: Name
    label: Name
    cert: Der


class OcspResume(_Msg, tag="ocsp-resume"):
    """First message after the handshake: the highest publication `seq` the endpoint holds durably."""

    seq: Annotated[int, msgspec.Meta(ge=0, lt=2**62)]


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


# ---------------------------------------------------------------- CRL-fed tenants (another CA's CRL, answered live)

Unissued = Literal["unknown", "revoked"]  # RFC 6960 §2.2: "revoked" is extended revoked (id-pkix-ocsp-extended-revoke)
Sha256 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Blob = Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]  # one chunk of a streamed CRL or serials list


class TenantConfig(_Msg, tag="tenant-config"):
    """A tenant the endpoint answers for (replaces any earlier config of that name). The push
    secret travels as its SHA-256 only; the responder certificate is None until installed."""

    tenant: Name
    ca_cert: Der
    unissued: Unissued
    push_secret_sha256: Sha256 | None
    responder_label: Name | None
    responder_cert: Der | None


class TenantRemove(_Msg, tag="tenant-remove"):
    tenant: Name


class TenantSync(_Msg, tag="tenant-sync"):
    """Sent when the feed opens: the tenants that exist; the endpoint forgets any other."""

    tenants: Annotated[list[Name], msgspec.Meta(max_length=4096)]


class TenantCrl(_Msg, tag="tenant-crl"):
    """A tenant CRL the Factory verified, streamed in chunks; swapped in on `last`."""

    tenant: Name
    number: Annotated[int, msgspec.Meta(ge=0)]
    data: Blob
    last: bool


class TenantSerials(_Msg, tag="tenant-serials"):
    """The tenant's issued-serials list, streamed; `present` False (with empty data) clears it."""

    tenant: Name
    data: Blob
    last: bool
    present: bool = True


class TenantKeyRequest(_Msg, tag="tenant-key-request"):
    """Generate the tenant's delegated responder key (P-256) in the endpoint's own token and a CSR signed by it."""

    id: ReqId
    tenant: Name


class TenantCsr(_Msg, tag="tenant-csr"):
    id: ReqId
    tenant: Name
    label: Name
    spki: Der
    csr: Der


class TenantCrlPush(_Msg, tag="tenant-crl-push"):
    """A CRL pushed over HTTP to an endpoint (bearer secret checked there), for the Factory to verify."""

    id: ReqId
    tenant: Name
    data: Blob
    last: bool


class TenantPushResult(_Msg, tag="tenant-push-result"):
    id: ReqId
    outcome: Text  # "accepted" or a one-line reason


FactoryToOcsp = Union[Hello, PublishCa, PublishResponses, PublishCrl, ResponderKeyRequest, ResponderCert,
                      TenantConfig, TenantRemove, TenantSync, TenantCrl, TenantSerials, TenantKeyRequest, TenantPushResult]
OcspToFactory = Union[Hello, OcspResume, ResponderKey, Refused, TenantCsr, TenantCrlPush]


# ---------------------------------------------------------------- admin clients -> Factory


class AStatus(_Msg, tag="status"):
    id: ReqId


class AActivate(_Msg, tag="activate"):
    id: ReqId
    pin: Pin


class ACaList(_Msg, tag="ca-list"):
    id: ReqId


class ACaShow(_Msg, tag="ca-show"):
    id: ReqId
    name: Name


class ACaCreate(_Msg, tag="ca-create"):
    id: ReqId
    name: Name
    parent: Name
    profile: Name
    key_type: KeyType
    subject: tuple[Attr, ...]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()  # empty: donjon.toml, else the default


class ACaSignCsr(_Msg, tag="ca-sign-csr"):
    id: ReqId
    parent: Name
    profile: Name
    csr: Der
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None


class ACaExport(_Msg, tag="ca-export"):
    id: ReqId
    name: Name


class AIssue(_Msg, tag="issue"):
    id: ReqId
    ca: Name
    profile: Name
    csrs: Annotated[list[Der], msgspec.Meta(min_length=1, max_length=1024)]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)] | None = None


class ACertShow(_Msg, tag="cert-show"):
    id: ReqId
    ca: Name
    serial: Serial


class ACertList(_Msg, tag="cert-list"):
    id: ReqId
    ca: Name | None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1000
    # Filters (all given must match): substrings of the subject or of a SAN (case-insensitive), the
    # status now, valid certificates expiring within N days, the profile.
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    san: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    status: Literal["valid", "revoked", "expired"] | None = None
    expires_within_days: Annotated[int, msgspec.Meta(ge=0, le=40 * 366)] | None = None
    profile: Name | None = None


class ARevoke(_Msg, tag="revoke"):
    id: ReqId
    ca: Name
    serial: Serial
    reason: Reason
    invalidity: Epoch | None = None


class AUnrevoke(_Msg, tag="unrevoke"):
    """Release a certificate from certificateHold: off the next full CRL, OCSP `good` again."""

    id: ReqId
    ca: Name
    serial: Serial


class ACrlGenerate(_Msg, tag="crl-generate"):
    id: ReqId
    ca: Name
    kind: Literal["crl", "issued-serials"] = "crl"


class ACrlExport(_Msg, tag="crl-export"):
    """The latest stored CRL of a CA (or CRL number `number`), streamed as BlobChunks."""

    id: ReqId
    ca: Name
    number: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None = None
    kind: Literal["crl", "issued-serials"] = "crl"


class AAuditExport(_Msg, tag="audit-export"):
    id: ReqId


class AReconcile(_Msg, tag="reconcile"):
    id: ReqId


class AOcspStatus(_Msg, tag="ocsp-status"):
    id: ReqId


class AOcspResponderCert(_Msg, tag="ocsp-responder-cert"):
    """Have the endpoint generate a delegated responder key and the CA certify it."""

    id: ReqId
    ca: Name
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=366)] = 30


class ADistStatus(_Msg, tag="dist-status"):
    """Per destination: backlog, oldest pending age, parked jobs, last success and last error."""

    id: ReqId


class ADistRetry(_Msg, tag="dist-retry"):
    """Put parked jobs back in the queue (all, one destination's, or one job) and retry at once."""

    id: ReqId
    rule: Name | None = None
    job: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None = None


class ADistList(_Msg, tag="dist-list"):
    """Jobs of one state (pending, parked, done), newest first."""

    id: ReqId
    state: Literal["pending", "parked", "done"] = "parked"
    rule: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100


Url = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]


class AOcspTenantAdd(_Msg, tag="ocsp-tenant-add"):
    id: ReqId
    name: Name
    ca_cert: Der
    crl_urls: Annotated[list[Url], msgspec.Meta(max_length=16)] = []
    refresh_seconds: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] = 3600
    unissued: Unissued = "unknown"
    push_secret: Annotated[bytes, msgspec.Meta(max_length=1024)] | None = None


class AOcspTenantUpdate(_Msg, tag="ocsp-tenant-update"):
    """Change what is given (None: unchanged); `responder_cert` installs the delegated responder."""

    id: ReqId
    name: Name
    crl_urls: Annotated[list[Url], msgspec.Meta(max_length=16)] | None = None
    refresh_seconds: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] | None = None
    unissued: Unissued | None = None
    push_secret: Annotated[bytes, msgspec.Meta(max_length=1024)] | None = None
    responder_cert: Der | None = None


class AOcspTenantRemove(_Msg, tag="ocsp-tenant-remove"):
    id: ReqId
    name: Name


class AOcspTenantList(_Msg, tag="ocsp-tenant-list"):
    id: ReqId


class AOcspTenantCsr(_Msg, tag="ocsp-tenant-csr"):
    id: ReqId
    name: Name


class AOcspTenantCrl(_Msg, tag="ocsp-tenant-crl"):
    """A CRL uploaded by an officer (e.g. from removable media at an offline site)."""

    id: ReqId
    name: Name
    crl: Annotated[bytes, msgspec.Meta(max_length=7 * 1024 * 1024)]


class AOcspTenantSerials(_Msg, tag="ocsp-tenant-serials"):
    """The tenant's issued-serials list (None clears it)."""

    id: ReqId
    name: Name
    data: Annotated[bytes, msgspec.Meta(max_length=7 * 1024 * 1024)] | None




# ---------------------------------------------------------------- officers, sessions, dual control, audit (issue #6)

SessionToken = Annotated[str, msgspec.Meta(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
OtpCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6,8}$")]
ShareText = Annotated[str, msgspec.Meta(min_length=1, max_length=1200)]


class ALogin(_Msg, tag="login"):
    """Authenticate an officer; the session is bound to this connection. Reply: token, officer, roles, idle_seconds."""

    id: ReqId
    officer: Name
    password: Password
    otp: OtpCode | None = None


class AResume(_Msg, tag="resume"):
    """Attach an existing session (from ALogin's token) to this connection. Reply: officer, roles."""

    id: ReqId
    token: SessionToken


class ALogout(_Msg, tag="logout"):
    """End this connection's session (everywhere it is attached)."""

    id: ReqId


class AOfficerAdd(_Msg, tag="officer-add"):
    id: ReqId
    name: Name
    roles: Annotated[tuple[OfficerRole, ...], msgspec.Meta(min_length=1, max_length=3)]
    password: Password


class AOfficerList(_Msg, tag="officer-list"):
    id: ReqId


class AOfficerRemove(_Msg, tag="officer-remove"):
    id: ReqId
    name: Name


class AOfficerPasswd(_Msg, tag="officer-passwd"):
    """Set an officer's password (an administrator, or the officer themself)."""

    id: ReqId
    name: Name
    password: Password


class AOfficerUnlock(_Msg, tag="officer-unlock"):
    id: ReqId
    name: Name


class AOfficerUnlockShares(_Msg, tag="officer-unlock-shares"):
    """Break-glass: unlock an officer (and optionally set a new password) on the authority of a quorum of
    activation shares, when no administrator can log in to do it."""

    id: ReqId
    name: Name
    shares: Annotated[list[ShareText], msgspec.Meta(min_length=1, max_length=16)]
    password: Password | None = None


class AOfficerTotp(_Msg, tag="officer-totp"):
    """Turn the TOTP second factor on (reply: secret, otpauth URI) or off."""

    id: ReqId
    name: Name
    enable: bool


class APendingList(_Msg, tag="pending-list"):
    """Dual-control requests (open ones, and the recently closed unless `open_only`)."""

    id: ReqId
    open_only: bool = True


class AApprove(_Msg, tag="approve"):
    """Approve a pending dual-control request; the M-th distinct approval runs it (reply: its result)."""

    id: ReqId
    request: ReqId


class AAuditCheckpoint(_Msg, tag="audit-checkpoint"):
    """Have the CIS sign the chain head now. Reply: the signed checkpoint (policy.audit.checkpoint_doc)."""

    id: ReqId


class AAuditCert(_Msg, tag="audit-cert"):
    """The audit key's self-issued certificate (PEM in the reply)."""

    id: ReqId


class AActivateShares(_Msg, tag="activate-shares"):
    """Activate with a quorum of PIN shares (policy.shamir); the Factory combines them."""

    id: ReqId
    shares: Annotated[list[ShareText], msgspec.Meta(min_length=1, max_length=16)]


# ---------------------------------------------------------------- console, ceremonies, backup (issue #6)


class ACaCreateRoot(_Msg, tag="ca-create-root"):
    """A new self-signed root in the HSM (a ceremony's root creation or root rollover)."""

    id: ReqId
    name: Name
    profile: Name
    key_type: KeyType
    subject: tuple[Attr, ...]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()


class AConfigSet(_Msg, tag="config-set"):
    """`donjon config set KEY VALUE`: one setting of HOME/donjon.toml (takes effect at the next start)."""

    id: ReqId
    key: Annotated[str, msgspec.Meta(max_length=64)]
    value: Annotated[str, msgspec.Meta(max_length=1024)]


class AShutdown(_Msg, tag="shutdown-request"):
    """Stop the appliance cleanly (the supervisor stops every role, as on SIGTERM)."""

    id: ReqId


class ABackup(_Msg, tag="backup"):
    """A consistent online copy of the encrypted CMDB and its wrapped key, streamed as a tar (BlobChunks)."""

    id: ReqId


class ACeremonyBegin(_Msg, tag="ceremony-begin"):
    """Open a ceremony: an audit record whose seq identifies it; its window starts at this session's login."""

    id: ReqId
    ceremony: Name


class ACeremonyWitness(_Msg, tag="ceremony-witness"):
    """This session's officer, logged in during the ceremony, witnesses it (an audit record of their own)."""

    id: ReqId
    ceremony_seq: Annotated[int, msgspec.Meta(ge=1)]


class ACeremonyRecords(_Msg, tag="ceremony-records"):
    """The audit records (seq, hash, action, object, outcome) the ceremony's witnesses made since it began."""

    id: ReqId
    ceremony_seq: Annotated[int, msgspec.Meta(ge=1)]


class CeremonyOperation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    seq: Annotated[int, msgspec.Meta(ge=1)]
    hash: Digest


class ACeremonyRecord(_Msg, tag="ceremony-record"):
    """Write a ceremony transcript's digest into the audit chain, bound to the ceremony's opening record,
    its witnesses' records and the audit records of its operations (all checked by the Factory), and
    have the audit key sign a checkpoint of exactly that record. Reply: the record, the signed
    checkpoint, the audit certificate (PEM), the bindings."""

    id: ReqId
    ceremony: Name
    transcript_sha256: Digest
    ceremony_seq: Annotated[int, msgspec.Meta(ge=1)]
    witnesses: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=32)]
    operations: Annotated[list[CeremonyOperation], msgspec.Meta(max_length=4096)] = []


AdminRequest = Union[
    Hello, AStatus, AActivate, ACaList, ACaShow, ACaCreate, ACaSignCsr, ACaExport, AIssue,
    ACertShow, ACertList, ARevoke, AUnrevoke, ACrlGenerate, ACrlExport, AAuditExport, AReconcile, AOcspStatus, AOcspResponderCert,
    ADistStatus, ADistRetry, ADistList,
    AOcspTenantAdd, AOcspTenantUpdate, AOcspTenantRemove, AOcspTenantList, AOcspTenantCsr, AOcspTenantCrl,
    AOcspTenantSerials,
    ALogin, AResume, ALogout, AOfficerAdd, AOfficerList, AOfficerRemove, AOfficerPasswd, AOfficerUnlock, AOfficerTotp,
    AOfficerUnlockShares, APendingList, AApprove, AAuditCheckpoint, AAuditCert, AActivateShares,
    ACaCreateRoot, AShutdown, ABackup, ACeremonyRecord, ACeremonyBegin, ACeremonyWitness, ACeremonyRecords, AConfigSet,
]


class Reply(_Msg, tag="reply"):
    """Generic answer: `data` is a JSON-able document whose shape each command documents."""

    id: ReqId
    data: dict[str, object]


class IssueReply(_Msg, tag="issue-reply"):
    id: ReqId
    results: list[IssueOutcome]
    serials: list[Annotated[str, msgspec.Meta(max_length=40)] | None]  # hex


class BlobChunk(_Msg, tag="blob"):
    """A streamed result (CRL DER, audit export); `last` closes the stream."""

    id: ReqId
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]
    last: bool


# ---------------------------------------------------------------- typed replies, one per request family
# Strict like the requests (the client decodes them with AdminReply); omit_defaults keeps an absent
# optional field absent, so every face reads the same document as when replies were dicts.

HexSerial = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[0-9a-f]+$")]
Pem = Annotated[str, msgspec.Meta(max_length=128 * 1024)]
IsoTime = Annotated[str, msgspec.Meta(max_length=40)]
LongText = Annotated[str, msgspec.Meta(max_length=64 * 1024)]  # a subject or SAN list as stored


class _Reply(_Msg, omit_defaults=True):
    pass


class RevokeReply(_Reply, tag="revoke-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    revoked_at: Epoch
    reason: Reason
    was_on_hold: bool


class UnrevokeReply(_Reply, tag="unrevoke-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    released: bool
    held_since: Epoch


class CertReply(_Reply, tag="cert-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    profile: Name
    subject: LongText
    not_before: Epoch
    not_after: Epoch
    issued_at: Epoch
    revoked_at: Epoch | None
    reason: Reason | None
    pem: Pem


class CertSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ca: Name
    serial: HexSerial
    profile: Name
    subject: LongText
    not_after: Epoch
    revoked: bool
    expired: bool
    sans: LongText


class CertListReply(_Reply, tag="cert-list-reply"):
    id: ReqId
    certs: Annotated[list[CertSummary], msgspec.Meta(max_length=10000)]


class CaInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    key_type: KeyType
    parent: Name | None
    profile: Name
    subject: Text
    serial: HexSerial
    not_before: IsoTime
    not_after: IsoTime
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    state: Text
    state_reason: Text
    issues: Text  # what the CA may issue (policy.capolicy.CaPolicy.describe)


class CaReply(_Reply, tag="ca-reply"):
    """ca-show, ca-create, ca-create-root: the CA's summary (CaInfo's fields; state and issues in ca-show)."""

    id: ReqId
    name: Name
    key_type: KeyType
    parent: Name | None
    profile: Name
    subject: Text
    serial: HexSerial
    not_before: IsoTime
    not_after: IsoTime
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    state: Text | None = None
    state_reason: Text | None = None
    issues: Text | None = None


class CaListReply(_Reply, tag="ca-list-reply"):
    id: ReqId
    cas: Annotated[list[CaInfo], msgspec.Meta(max_length=4096)]


class CaExportReply(_Reply, tag="ca-export-reply"):
    id: ReqId
    chain: Annotated[list[Annotated[str, msgspec.Meta(max_length=128 * 1024)]], msgspec.Meta(max_length=64)]  # DER, hex


class CaSignCsrReply(_Reply, tag="ca-sign-csr-reply"):
    id: ReqId
    serial: HexSerial
    cert: Pem


class LoginReply(_Reply, tag="login-reply"):
    """login (token, idle_seconds) and resume (without them): the session's officer and roles."""

    id: ReqId
    officer: Name
    roles: Annotated[list[OfficerRole], msgspec.Meta(max_length=3)]
    token: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    idle_seconds: Annotated[int, msgspec.Meta(ge=0)] | None = None


class LogoutReply(_Reply, tag="logout-reply"):
    id: ReqId
    logged_out: bool


class OfficerReply(_Reply, tag="officer-reply"):
    """officer-add (name, roles), -remove (removed), -passwd (name, password), -unlock and -unlock-shares
    (name, locked, password), -totp (name, totp, and when turned on: secret, uri)."""

    id: ReqId
    name: Name | None = None
    roles: Annotated[list[OfficerRole], msgspec.Meta(max_length=3)] | None = None
    removed: Name | None = None
    password: Literal["changed", "unchanged"] | None = None
    locked: bool | None = None
    totp: bool | None = None
    secret: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    uri: Annotated[str, msgspec.Meta(max_length=512)] | None = None


class OfficerInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    roles: Annotated[list[OfficerRole], msgspec.Meta(max_length=3)]
    totp: bool
    failures: Annotated[int, msgspec.Meta(ge=0)]
    locked: bool
    created: Epoch


class OfficerListReply(_Reply, tag="officer-list-reply"):
    id: ReqId
    officers: Annotated[list[OfficerInfo], msgspec.Meta(max_length=10000)]


TypedReply = Union[RevokeReply, UnrevokeReply, CertReply, CertListReply, CaReply, CaListReply, CaExportReply,
                   CaSignCsrReply, LoginReply, LogoutReply, OfficerReply, OfficerListReply]


AdminReply = Union[Hello, Reply, IssueReply, BlobChunk, Refused, TypedReply]


def schema_hash() -> str:
    """SHA-256 over the JSON schema of every union: a pinned test forces a VERSION bump on change."""
    import hashlib
    import json

    unions = [SupToCis, CisToSup, SupToFactory, FactoryToSup, FactoryToCis, CisToFactory, AdminRequest, AdminReply,
              SupToOcsp, OcspToSup, FactoryToOcsp, OcspToFactory, SupToSnmp, SnmpToSup,
              SupToDist, DistToSup, FactoryToDist, DistToFactory]
    schema = msgspec.json.schema_components(unions, schema_hook=lambda t: {"any": repr(t)})
    return hashlib.sha256(json.dumps(schema, sort_keys=True, default=str).encode()).hexdigest()

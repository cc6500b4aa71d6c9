"""Every message that crosses a Donjon process boundary, one union per direction of each link.

A receiver decodes with the union of what its peer may send and nothing else (msgspec rejects
unknown tags, missing and extra fields, wrong types, oversize values). Changing anything here
changes SCHEMA_HASH, which a test pins: bump VERSION in the same change.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

VERSION = 1

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

LinkName = Literal["sup-cis", "sup-factory", "factory-cis", "admin", "sup-ocsp", "factory-ocsp", "sup-snmp"]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


# ---------------------------------------------------------------- common


class Hello(_Msg, tag="hello"):
    link: LinkName
    version: int


class Refused(_Msg, tag="refused"):
    """A typed refusal. `code` is machine-readable, `reason` is one line for the operator."""

    id: ReqId
    code: Literal["policy", "not-found", "exists", "inactive", "auth", "hsm", "internal", "bad-request", "lint", "busy"]
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


class AutoActivate(_Msg, tag="auto-activate"):
    """Developer mode only: the supervisor read the PIN file."""

    pin: Pin


class NewLink(_Msg, tag="new-link"):
    """A restarted role's link, its descriptor attached (SCM_RIGHTS): the receiver drops the old one."""

    link: Literal["factory-ocsp"]
    role: Name = "ocsp"  # which endpoint process ("ocsp", "ocsp.1", ...)


class Ceremony(_Msg, tag="ceremony"):
    """`donjon init`: run this root ceremony (already validated) and stop."""

    pin: Pin
    spec: Annotated[bytes, msgspec.Meta(max_length=65536)]  # msgspec-encoded CeremonySpec




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


CrlEntry = tuple[Serial, Epoch, Reason | None, Epoch | None]


class CrlEntries(_Msg, tag="crl-entries"):
    id: ReqId
    entries: Annotated[list[CrlEntry], msgspec.Meta(max_length=20000)]


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


FactoryToCis = Union[Hello, Activate, GenerateKey, DeleteKey, Issue, CrlBegin, CrlEntries, CrlEnd, SignOcsp, Ping]
CisToFactory = Union[Hello, Activated, PublicKey, Issued, CrlChunk, CrlSigned, OcspSigned, Ok, Refused]


# ---------------------------------------------------------------- supervisor <-> OCSP endpoint


class OcspConfig(_Msg, tag="ocsp-config"):
    store_dir: Text  # the endpoint's own on-disk store of pre-signed responses, CRLs and CA certificates
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)]
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)]
    max_age: Annotated[int, msgspec.Meta(ge=0, le=7 * 86400)]  # cap on Cache-Control max-age
    # The endpoint's own PKCS#11 token for delegated responder keys (never a CA key); None: no live signing.
    token_module: Text | None = None
    token_label: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "donjon-ocsp"
    token_pin: Pin | None = None
    softhsm_conf: Text | None = None


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
    state: Literal["starting", "running", "restarting", "stopped", "failed"]
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


SupToFactory = Union[Hello, FactoryConfig, AutoActivate, Ceremony, Shutdown, OcspStats, NewLink]  # the endpoint's counters, relayed
FactoryToSup = Union[Hello, Ready, Event, StatusReport]


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


FactoryToOcsp = Union[Hello, PublishCa, PublishResponses, PublishCrl, ResponderKeyRequest, ResponderCert]
OcspToFactory = Union[Hello, OcspResume, ResponderKey, Refused]


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


class ARevoke(_Msg, tag="revoke"):
    id: ReqId
    ca: Name
    serial: Serial
    reason: Reason
    invalidity: Epoch | None = None


class ACrlGenerate(_Msg, tag="crl-generate"):
    id: ReqId
    ca: Name


class ACrlExport(_Msg, tag="crl-export"):
    """The latest stored CRL of a CA (or CRL number `number`), streamed as BlobChunks."""

    id: ReqId
    ca: Name
    number: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None = None


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


class ACaCreateRoot(_Msg, tag="ca-create-root"):
    """A new self-signed root in the HSM (a ceremony's root creation or root rollover)."""

    id: ReqId
    name: Name
    profile: Name
    key_type: KeyType
    subject: tuple[Attr, ...]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None


class AShutdown(_Msg, tag="shutdown-request"):
    """Stop the appliance cleanly (the supervisor stops every role, as on SIGTERM)."""

    id: ReqId


class ABackup(_Msg, tag="backup"):
    """A consistent online copy of the encrypted CMDB and its wrapped key, streamed as a tar (BlobChunks)."""

    id: ReqId


AdminRequest = Union[
    Hello, AStatus, AActivate, ACaList, ACaShow, ACaCreate, ACaSignCsr, ACaExport, AIssue,
    ACertShow, ACertList, ARevoke, ACrlGenerate, ACrlExport, AAuditExport, AReconcile, AOcspStatus, AOcspResponderCert,
    ACaCreateRoot, AShutdown, ABackup,
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


AdminReply = Union[Hello, Reply, IssueReply, BlobChunk, Refused]


# ---------------------------------------------------------------- ceremony file (TOML, validated)


class CeremonyCa(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    name: Name
    key_type: KeyType
    subject: dict[str, str]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    profile: Name | None = None


class CeremonySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    root: CeremonyCa
    issuing: list[CeremonyCa] = []


# Maximum frame size per link (bytes). Checked before a frame is read.
MAX_FRAME = {
    "sup-cis": 256 * 1024,
    "sup-factory": 256 * 1024,
    "factory-cis": 8 * 1024 * 1024,
    "admin": 8 * 1024 * 1024,
    "sup-ocsp": 256 * 1024,
    "factory-ocsp": 16 * 1024 * 1024,
    "sup-snmp": 1024 * 1024,
}


def schema_hash() -> str:
    """SHA-256 over the JSON schema of every union: a pinned test forces a VERSION bump on change."""
    import hashlib
    import json

    unions = [SupToCis, CisToSup, SupToFactory, FactoryToSup, FactoryToCis, CisToFactory, AdminRequest, AdminReply,
              SupToOcsp, OcspToSup, FactoryToOcsp, OcspToFactory, SupToSnmp, SnmpToSup, CeremonySpec]
    schema = msgspec.json.schema_components(unions, schema_hook=lambda t: {"any": repr(t)})
    return hashlib.sha256(json.dumps(schema, sort_keys=True, default=str).encode()).hexdigest()

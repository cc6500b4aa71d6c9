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

LinkName = Literal["sup-cis", "sup-factory", "factory-cis", "admin"]


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


class AutoActivate(_Msg, tag="auto-activate"):
    """Developer mode only: the supervisor read the PIN file."""

    pin: Pin


class Ceremony(_Msg, tag="ceremony"):
    """`donjon init`: run this root ceremony (already validated) and stop."""

    pin: Pin
    spec: Annotated[bytes, msgspec.Meta(max_length=65536)]  # msgspec-encoded CeremonySpec


SupToFactory = Union[Hello, FactoryConfig, AutoActivate, Ceremony, Shutdown]
FactoryToSup = Union[Hello, Ready, Event]


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


class Ping(_Msg, tag="ping"):
    id: ReqId


FactoryToCis = Union[Hello, Activate, GenerateKey, DeleteKey, Issue, CrlBegin, CrlEntries, CrlEnd, Ping]
CisToFactory = Union[Hello, Activated, PublicKey, Issued, CrlChunk, CrlSigned, Ok, Refused]


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


AdminRequest = Union[
    Hello, AStatus, AActivate, ACaList, ACaShow, ACaCreate, ACaSignCsr, ACaExport, AIssue,
    ACertShow, ACertList, ARevoke, ACrlGenerate, ACrlExport, AAuditExport, AReconcile,
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
}


def schema_hash() -> str:
    """SHA-256 over the JSON schema of every union: a pinned test forces a VERSION bump on change."""
    import hashlib
    import json

    unions = [SupToCis, CisToSup, SupToFactory, FactoryToSup, FactoryToCis, CisToFactory, AdminRequest, AdminReply, CeremonySpec]
    schema = msgspec.json.schema_components(unions, schema_hook=lambda t: {"any": repr(t)})
    return hashlib.sha256(json.dumps(schema, sort_keys=True, default=str).encode()).hexdigest()

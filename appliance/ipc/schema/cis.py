"""Factory <-> CIS: structured signing requests (certificates, CRLs, lists, OCSP) and their results."""

from __future__ import annotations

from .sup import *  # each link module sees the messages of those before it
from .common import _Msg


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
    # One shard of a sharded CA's CRL: the CIS names it in the IDP and checks every entry belongs to it.
    shard: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    # A delta CRL on full CRL number `delta_base` (deltaCRLIndicator); only for a CA with crl.delta.
    delta_base: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None = None


CrlEntry = tuple[Serial, Epoch, Reason | None, Epoch | None]


class CrlEntries(_Msg, tag="crl-entries"):
    id: ReqId
    entries: Annotated[list[CrlEntry], msgspec.Meta(max_length=20000)]


class CrlEntriesDer(_Msg, tag="crl-entries-der"):
    """A full CRL's entries pre-encoded by the Factory (kept encoded in the CMDB since their revocation): the
    CIS checks every element's shape and the serials' order strictly (policy.crl.check_encoded) before it
    hashes them, and sends nothing back but the header, the trailer and the signature."""

    id: ReqId
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]
    count: Annotated[int, msgspec.Meta(ge=1, le=100_000)]


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


class BackupKeys(_Msg, tag="backup-keys"):
    """Wrap every CA key (labels), the audit key and the CMDB-wrapping key under a fresh trusted KEK
    made by the token's SO (RFC 5649 key wrap), and split the KEK into `shares` custodian shares of
    which `threshold` recover it. The CIS builds the blob and the shares itself."""

    id: ReqId
    so_pin: Pin
    labels: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=256)]
    threshold: Annotated[int, msgspec.Meta(ge=2, le=16)]
    shares: Annotated[int, msgspec.Meta(ge=2, le=16)]


class KeysBackedUp(_Msg, tag="keys-backed-up"):
    id: ReqId
    blob: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]  # JSON: manifest, wrapped keys, MAC
    shares: Annotated[list[Annotated[str, msgspec.Meta(max_length=1200)]], msgspec.Meta(max_length=16)]




class MakeCaRequest(_Msg, tag="make-ca-request"):
    """A CA's PKCS#10 request, built and signed by the CIS with the token key `label` (generated first
    when `new_key`): subject and CA extensions from the sub-CA `profile`, never bytes from the Factory."""

    id: ReqId
    label: Name
    key_type: KeyType
    profile: Name
    subject: tuple[Attr, ...]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    new_key: bool = True


class CaRequestMade(_Msg, tag="ca-request-made"):
    id: ReqId
    csr: Der
    spki: Der


class InstallCaCert(_Msg, tag="install-ca-cert"):
    """Keep a CA certificate signed elsewhere beside the token key `label`, after every check of
    policy.tier.check_install; `anchor` is given once (then kept in the token) and later ones must equal it."""

    id: ReqId
    label: Name
    cert: Der
    chain: Annotated[list[Der], msgspec.Meta(max_length=8)]
    anchor: Der | None
    allowed_kinds: tuple[Literal["sub-ca", "ocsp-responder", "end-entity"], ...] = ()
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()


class CaInstalled(_Msg, tag="ca-installed"):
    id: ReqId
    anchor: Der


FactoryToCis = Union[Hello, Activate, GenerateKey, DeleteKey, Issue, CrlBegin, CrlEntries, CrlEntriesDer, SerialEntries, CrlEnd, SignOcsp, Ping,
                     SignCheckpoint, GetAuditCert, MakeCaRequest, InstallCaCert, BackupKeys]
CisToFactory = Union[Hello, Activated, PublicKey, Issued, CrlChunk, CrlSigned, OcspSigned, Ok, Refused,
                     CheckpointSigned, AuditCert, CaRequestMade, CaInstalled, KeysBackedUp]

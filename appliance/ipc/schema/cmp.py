"""Gateway <-> Factory, CMP: the protection evidence the Factory re-checks, enrolment, polling, confirmation, revocation, genm data."""

from __future__ import annotations

from .tenants import *  # each link module sees the messages of those before it
from .common import _Msg

CmpRef = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Protected = Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]  # DER of a ProtectedPart (the gateway caps messages at 64 KiB)


class CmpMacParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """PasswordBasedMac or PBMAC1 parameters as the gateway decoded them (policy.cmpmac.MacSpec)."""

    kind: Literal["pbm", "pbmac1"]
    salt: Annotated[bytes, msgspec.Meta(min_length=8, max_length=64)]
    iterations: Annotated[int, msgspec.Meta(ge=100, le=100_000)]
    owf: Literal["sha1", "sha256", "sha384", "sha512"]
    mac: Literal["sha1", "sha256", "sha384", "sha512"]
    key_len: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0


class CmpEvidence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What protected a CMP message: the protected bytes, the protection value, and the MAC parameters with
    the officer-issued reference (senderKID), or the signer certificate with the signature algorithm."""

    kind: Literal["mac", "signature"]
    ref: CmpRef  # MAC: the reference number; signature: the signer certificate's serial (hex), for the audit
    protected: Protected
    protection: Annotated[bytes, msgspec.Meta(max_length=1024)]
    mac: CmpMacParams | None = None
    signer_cert: Der | None = None
    sig_alg: Annotated[str, msgspec.Meta(max_length=64)] = ""


class CmpCheck(_Msg, tag="cmp-check"):
    """Does this protection hold (genm, pollReq, certConf under a MAC: the gateway holds no secret)?"""

    id: ReqId
    evidence: CmpEvidence


class CmpChecked(_Msg, tag="cmp-checked"):
    id: ReqId
    ok: bool
    reason: Text = ""


class CmpEnroll(_Msg, tag="cmp-enroll"):
    """ir/cr/kur (spki + subject + sans from the CRMF template) or p10cr (csr). The Factory checks the
    evidence, that the key or the CSR is inside the protected bytes, and the credential's CA, profile and subject."""

    id: ReqId
    op: Literal["ir", "cr", "p10cr", "kur"]
    evidence: CmpEvidence
    spki: Der
    subject: Annotated[tuple[Attr, ...], msgspec.Meta(max_length=16)] = ()
    sans: Annotated[tuple[Attr, ...], msgspec.Meta(max_length=100)] = ()
    csr: Der | None = None
    profile: Name | None = None  # id-it-certProfile, if the client named one


class CmpPoll(_Msg, tag="cmp-poll"):
    id: ReqId
    request_id: Annotated[str, msgspec.Meta(max_length=64)]
    evidence: CmpEvidence


class CmpConfirm(_Msg, tag="cmp-confirm"):
    """certConf: accepted, or rejected (the Factory then revokes the certificate)."""

    id: ReqId
    serial: Serial
    accepted: bool
    evidence: CmpEvidence


class CmpRevoke(_Msg, tag="cmp-revoke"):
    id: ReqId
    issuer: Der  # DER of the issuer Name in the rr's certDetails
    serial: Serial
    reason: Reason | None
    evidence: CmpEvidence


class CmpInfo(_Msg, tag="cmp-info"):
    """Public data for genm: CA certificates or the current CRL."""

    id: ReqId
    kind: Literal["ca-certs", "crl"]
    ca: Name | None = None


class CmpInfoReply(_Msg, tag="cmp-info-reply"):
    id: ReqId
    items: Annotated[list[Der], msgspec.Meta(max_length=32)]


class CmpProtectionCert(_Msg, tag="cmp-protection-cert"):
    """A certificate for the gateway's CMP protection key (in its own token): it signs every response."""

    id: ReqId
    spki: Der

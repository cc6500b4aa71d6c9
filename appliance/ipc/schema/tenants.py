"""CRL-fed OCSP tenants: another CA's CRL, answered live by a delegated responder."""

from __future__ import annotations

from .dist import *  # each link module sees the messages of those before it
from .common import _Msg


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

"""Factory -> OCSP endpoint: the feed of CA certificates, pre-produced responses and CRLs."""

from __future__ import annotations

from .snmp import *  # each link module sees the messages of those before it
from .common import _Msg


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
    shard: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None  # one shard's CRL: /crl/<ca>-<shard>.crl
    delta: bool = False  # the CA's delta CRL: /crl/<ca>-delta.crl


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

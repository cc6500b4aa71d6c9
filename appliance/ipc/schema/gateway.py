"""Supervisor <-> protocol gateway, and gateway <-> Factory: structured enrolment, revocation, state."""

from __future__ import annotations

from .cmp import *  # each link module sees the messages of those before it
from .common import _Msg

# ---------------------------------------------------------------- supervisor <-> gateway

Protocol = Literal["acme", "cmp", "est", "scep"]
Cidr = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$")]
HostName = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Pattern = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]  # a DNS name, "*.example.org" or "*" (policy.names)


class AcmeProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ACME profile name (RFC draft "profiles", as Let's Encrypt offers them) and what it maps to."""

    name: Name
    profile: Name  # the Donjon profile the Factory applies
    ca: Name | None = None  # None: the gateway's tls_ca rule (the first CA allowed to issue the profile)
    description: Text = ""


class AcmeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profiles: Annotated[list[AcmeProfile], msgspec.Meta(min_length=1, max_length=32)]
    default_profile: Name
    eab_required: bool = False
    name_patterns: tuple[Pattern, ...] = ("*",)  # names any account may get (EAB keys may narrow)
    order_lifetime: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 86400
    authz_lifetime: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 86400
    orders_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 300  # per account
    new_accounts_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 50  # per source address
    max_open_orders: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000  # per account
    resolver: Annotated[str, msgspec.Meta(max_length=64)] | None = None  # host:port of the resolver used for dns-01 and names
    http01_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 80
    tlsalpn01_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 443
    renewal_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.33  # ARI: the window ends this far before notAfter


class EstScepSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ca: Name | None = None  # the CA of /cacerts, GetCACert and the RA certificates (None: the first issuing CA)
    est_channel_binding: Literal["off", "optional", "required"] = "optional"  # tls-unique in the CSR (RFC 7030 §3.5)
    est_key_types: tuple[Annotated[str, msgspec.Meta(max_length=16)], ...] = ("p256", "rsa2048")  # /csrattrs
    scep_allow_des: bool = False  # 3DES content encryption, for old devices only
    scep_allow_weak_digest: bool = False  # SHA-1 (and MD5) signatures, for old devices only


class GatewayConfig(_Msg, tag="gateway-config"):
    store_dir: Text  # the gateway's own state (ACME accounts, orders, its server certificate)
    base_url: Text  # https://host:port as clients reach the listener
    protocols: tuple[Protocol, ...]
    tls_names: Annotated[tuple[HostName, ...], msgspec.Meta(min_length=1, max_length=16)]  # of its server certificate
    tls_ca: Name | None = None  # the CA that issues that certificate (None: the first allowed tls-server)
    validation_networks: tuple[Cidr, ...] = ()  # where validation traffic may go (empty: public addresses only)
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1024
    max_per_source: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 64
    head_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    token_module: Text | None = None  # its own PKCS#11 token: the TLS server key (never a CA key)
    token_label: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "donjon-gateway"
    token_pin: Pin | None = None
    softhsm_conf: Text | None = None
    acme: AcmeSettings | None = None
    estscep: EstScepSettings | None = None


class GatewayStats(_Msg, tag="gateway-stats"):
    requests: int
    errors: int
    issued: int
    refused: int
    orders_open: int


SupToGateway = Union[Hello, GatewayConfig, Shutdown]

GatewayToSup = Union[Hello, Ready, Event, GatewayStats]


# ---------------------------------------------------------------- gateway <-> Factory


class GwAuth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The credential that admitted a request, as the protocol proved it to the gateway. The Factory
    checks again what it can: that the credential is still valid (an EAB key not revoked, a CMP or
    EST secret it issued) and that the profile and the names are within its policy."""

    kind: Literal["acme-account", "eab", "cmp-mac", "cmp-signature", "est-basic", "est-tls", "scep-challenge",
                  "scep-renewal", "gateway"]
    ident: Text  # the account URL, the EAB key id, the CMP sender, ...: what the audit names
    eab_kid: Annotated[str, msgspec.Meta(max_length=128)] | None = None  # the EAB key this account was bound with
    # EST Basic password / SCEP challenge (est-basic, scep-challenge): the Factory spends it itself
    secret: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    # the current certificate (est-tls, scep-renewal): the Factory checks it is its own, valid, not revoked
    cert: Der | None = None


class GwEnroll(_Msg, tag="gw-enroll"):
    """Issue this key for these names under this profile, admitted by `auth`. Either `csr` (checked
    by the Factory: proof of possession, names equal to `names`) or `spki` (the protocol proved
    possession itself, e.g. CMP POP) with `names`."""

    id: ReqId
    protocol: Protocol
    auth: GwAuth
    ca: Name
    profile: Name
    names: Annotated[tuple[Attr, ...], msgspec.Meta(max_length=100)]  # ("dns", "a.example") / ("ip", "192.0.2.1")
    csr: Der | None = None
    spki: Der | None = None
    subject: tuple[Attr, ...] = ()  # with spki only
    not_after: Epoch | None = None  # requested end (the profile caps it)
    approval_wait: bool = False  # park for an officer's approval: GwPending, then GwPoll
    replaces: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # ARI certificate id (audited)


class GwPoll(_Msg, tag="gw-poll"):
    id: ReqId
    request_id: Annotated[str, msgspec.Meta(max_length=64)]


class GwIssued(_Msg, tag="gw-issued"):
    id: ReqId
    ca: Name
    cert: Der
    chain: Annotated[list[Der], msgspec.Meta(max_length=8)]  # issuer first, up to the root
    serial: Serial


class GwPending(_Msg, tag="gw-pending"):
    id: ReqId
    request_id: Annotated[str, msgspec.Meta(max_length=64)]
    retry_after: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 60


RefusalCode = Literal["unauthorized", "policy", "bad-csr", "rejected-identifier", "bad-request", "not-found",
                      "already-revoked", "inactive", "busy", "internal"]


class GwRefused(_Msg, tag="gw-refused"):
    id: ReqId
    code: RefusalCode
    reason: Text


class GwRevoke(_Msg, tag="gw-revoke"):
    """Revoke a certificate. `proof` says how the requester showed its right: "account" (the account
    that ordered it: the Factory checks `auth.ident` ordered it), "cert-key" (signed with the
    certificate's key: the gateway checked that signature against `cert`), "authorized-names"."""

    id: ReqId
    protocol: Protocol
    auth: GwAuth
    cert: Der
    reason: Reason
    proof: Literal["account", "cert-key", "authorized-names"]


class GwRevoked(_Msg, tag="gw-revoked"):
    id: ReqId
    ca: Name
    serial: Serial


class GwCertStatus(_Msg, tag="gw-cert-status"):
    """What ARI needs of a certificate: its validity and whether it is revoked (and its CA retiring)."""

    id: ReqId
    ca: Name
    serial: Serial


class GwCertInfo(_Msg, tag="gw-cert-info"):
    id: ReqId
    found: bool
    not_before: Epoch = 0
    not_after: Epoch = 0
    revoked: bool = False
    ca_not_after: Epoch = 0


class GwEabCheck(_Msg, tag="gw-eab-check"):
    """An external account binding (RFC 8555 §7.3.4): the inner JWS as received; the Factory checks
    its HMAC with the officer-made key (which never leaves the CMDB) and binds it to `account`."""

    id: ReqId
    kid: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    protected: Annotated[str, msgspec.Meta(max_length=4096)]
    payload: Annotated[str, msgspec.Meta(max_length=8192)]
    signature: Annotated[str, msgspec.Meta(max_length=1024)]
    account: Text


class GwEabResult(_Msg, tag="gw-eab-result"):
    id: ReqId
    ok: bool
    reason: Text = ""
    profiles: tuple[Name, ...] = ()  # ACME profile names the key allows (empty: all)
    name_patterns: tuple[Pattern, ...] = ()  # empty: the gateway's own


class GwTlsRequest(_Msg, tag="gw-tls-request"):
    """The gateway's server certificate: its key is in the gateway's own token."""

    id: ReqId
    ca: Name | None  # None: the first issuing CA
    spki: Der
    names: Annotated[tuple[HostName, ...], msgspec.Meta(min_length=1, max_length=16)]


class GwStateGet(_Msg, tag="gw-state-get"):
    """A small key-value store the Factory keeps for the gateway (durable, in the CMDB)."""

    id: ReqId
    ns: Name
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class GwStatePut(_Msg, tag="gw-state-put"):
    id: ReqId
    ns: Name
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    value: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)] | None  # None deletes


class GwState(_Msg, tag="gw-state"):
    id: ReqId
    value: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)] | None


class GwChainRequest(_Msg, tag="gw-chain-request"):
    """EST /cacerts, SCEP GetCACert: the chain of the CA EST and SCEP enrol under (None: the first issuing CA)."""

    id: ReqId
    ca: Name | None = None


class GwChain(_Msg, tag="gw-chain"):
    id: ReqId
    ca: Name
    chain: Annotated[list[Der], msgspec.Meta(min_length=1, max_length=8)]  # the CA first, up to the root


class GwRaRequest(_Msg, tag="gw-ra-request"):
    """A SCEP RA certificate for a key in the gateway's own token: one for signing, one for decryption."""

    id: ReqId
    ca: Name | None
    spki: Der
    usage: Literal["sign", "decrypt"]


class GwFetch(_Msg, tag="gw-fetch"):
    """SCEP GetCert (a certificate by issuer name and serial) and GetCRL (the issuer's latest CRL)."""

    id: ReqId
    kind: Literal["cert", "crl"]
    issuer: Der  # the issuer Name, DER
    serial: Serial | None = None


class GwBlob(_Msg, tag="gw-blob"):
    id: ReqId
    der: Annotated[bytes, msgspec.Meta(max_length=1 << 20)]


GatewayToFactory = Union[Hello, GwEnroll, GwPoll, GwRevoke, GwCertStatus, GwEabCheck, GwTlsRequest, GwStateGet, GwStatePut,
                         GwChainRequest, GwRaRequest, GwFetch,
                         CmpCheck, CmpEnroll, CmpPoll, CmpConfirm, CmpRevoke, CmpInfo, CmpProtectionCert]

FactoryToGateway = Union[Hello, GwIssued, GwPending, GwRefused, GwRevoked, GwCertInfo, GwEabResult, GwState, Ok,
                         GwChain, GwBlob, CmpChecked, CmpInfoReply]

"""Typed configuration: `donjon.toml` and the ceremony file, validated completely at load.

Unknown keys are rejected; errors name the file, the line and the key. Roles never read these
files: the supervisor pushes what each role needs as messages.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Annotated, Literal

import msgspec

from appliance.ceremonyspec import CeremonySpec
from appliance.ipc import schema as S

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class ConfigError(Exception):
    pass


class _C(msgspec.Struct, forbid_unknown_fields=True, frozen=True, rename="kebab"):
    pass


class Hsm(_C):
    module: str = DEFAULT_MODULE
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "donjon"
    embedded: bool = True  # SoftHSM2 token folder inside DONJON_HOME/softhsm
    pin_file: str | None = "pin"  # developer mode: activate at start from this file (relative to home)
    signers: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2  # CIS processes (one PKCS#11 caller each)
    deadline_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # a CIS silent this long is unresponsive


class CmdbCfg(_C):
    cipher: Literal["chacha20", "aegis"] = "chacha20"
    standby: bool = False  # ship every commit to HOME/cmdb/standby (a second disk mounted there) before acknowledging
    restore_max_age_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 7  # donjon restore: older needs a quorum


class Endpoint(_C):
    base_url: str | None = "http://127.0.0.1:8080"


class Crl(_C):
    validity_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 366)] = 168
    # CRL shards per CA (RFC 5280 issuingDistributionPoint): each certificate's CRL DP names shard
    # serial mod N, fixed at issuance; a CA not named here has its one full CRL, as before.
    shards: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")],
                 Annotated[int, msgspec.Meta(ge=1, le=256)]] = {}
    # Delta CRLs per CA (RFC 5280 §5.2.4): minutes between two deltas; revocations go out in a delta at
    # once, the full CRL (the base) is re-signed at half its validity. A sharded CA has one delta per shard
    # (its scope, RFC 5280 §5.2.5: the shard's IDP, based on the shard's latest full CRL, its numbers).
    delta: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")],
                Annotated[int, msgspec.Meta(ge=1, le=24 * 60)]] = {}
    # An offline root's CRL calendar loaded here (issue 14): status warns and the SNMP notification goes
    # out when fewer than `calendar-warn-remaining` pre-signed CRLs remain, or when the current one lapses
    # within `calendar-warn-hours` with none to follow (donjonCrlLapsed once it has).
    calendar_warn_remaining: Annotated[int, msgspec.Meta(ge=1, le=120)] = 3
    calendar_warn_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 90)] = 72


class Ocsp(_C):
    enabled: bool = True
    listen: str = "127.0.0.1:8080"  # host:port of the OCSP/CRL/CA-certificate HTTP endpoint (port 0: any free port)
    workers: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1  # endpoint processes accepting on the one listener
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1024
    # Per IPv4 address or IPv6 /64: one slow or flooding client cannot take every connection.
    max_connections_per_source: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 64
    head_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    max_age: Annotated[int, msgspec.Meta(ge=0, le=7 * 86400)] = 3600
    validity_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 31)] = 24
    hashes: tuple[Literal["sha1", "sha256"], ...] = ("sha1",)
    # A local CA's serial with no held response is never `good`: `unauthorized` (RFC 5019), or, signed
    # live by the CA's delegated responder, `unknown` or `revoked` (RFC 6960 §2.2 extended revoked).
    unissued: Literal["unauthorized", "unknown", "revoked"] = "unauthorized"
    unissued_by_ca: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")],
                         Literal["unauthorized", "unknown", "revoked"]] = {}
    # A CA's delegated responder certificate is renewed (new key in the endpoint's token) once less than
    # `responder-renew-days` of it remains; the new one lasts `responder-days`. 0: no automatic renewal.
    responder_days: Annotated[int, msgspec.Meta(ge=1, le=30)] = 30
    responder_renew_days: Annotated[int, msgspec.Meta(ge=0, le=29)] = 10


# SNMP secrets live in 0600 files named here (relative to DONJON_HOME), never in donjon.toml, which the
# admin group reads. The inline keys are still parsed, only to refuse them with a message that says so.
class SnmpUserCfg(_C):
    name: str
    auth_key_file: str | None = None
    priv_key_file: str | None = None
    auth: Literal["sha256", "sha384", "sha512"] = "sha256"
    priv: Literal["aes128", "aes192", "aes256"] = "aes128"
    auth_key: str | None = None  # refused
    priv_key: str | None = None  # refused


class SnmpTargetCfg(_C):
    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 162
    kind: Literal["trap", "inform"] = "trap"
    version: Literal["v3", "v2c"] = "v3"
    user: str | None = None
    community_file: str | None = None
    community: str | None = None  # refused


class Snmp(_C):
    enabled: bool = False
    listen: str = "127.0.0.1:1161"
    users: tuple[SnmpUserCfg, ...] = ()
    community_file: str | None = None  # read-only v2c, only from community-sources
    community: str | None = None  # refused
    community_sources: tuple[str, ...] = ("127.0.0.0/8",)
    targets: tuple[SnmpTargetCfg, ...] = ()
    lead_time_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 90)] = 72  # warn this long before a CRL/OCSP/cert lapses


class DistRuleCfg(_C):
    """One `[[distribution.rule]]`: a destination and what it receives."""

    name: str
    url: str
    publish: tuple[Literal["ca-cert", "certs", "crl", "delta-crl", "issued-serials"], ...]
    cas: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    remove_on_revoke: bool = True
    bind_dn: str | None = None
    username: str | None = None
    secret_file: str | None = None  # relative to DONJON_HOME; read by the supervisor, held by the agent only
    starttls: bool = False
    ca_file: str | None = None  # PEM trust anchors for ldaps://, StartTLS and https://
    dn: str | None = None
    ca_dn: str | None = None
    entry_classes: tuple[str, ...] = ("inetOrgPerson", "pkiUser")
    entry_attributes: dict[str, str] = msgspec.field(default_factory=lambda: {"sn": "{CN}"})
    ca_entry_classes: tuple[str, ...] = ("applicationProcess", "pkiCA")
    method: Literal["PUT", "POST"] = "PUT"
    timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    connections: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4  # parallel connections; per object, order is kept


class Distribution(_C):
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 50  # then the job is parked
    backoff_max: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 3600  # seconds, cap of the exponential backoff
    rule: tuple[DistRuleCfg, ...] = ()


class AcmeProfileCfg(_C):
    """`[[gateway.acme.profile]]`: an ACME profile name offered in the directory and what it maps to."""

    name: str
    profile: str  # a Donjon profile
    ca: str
    description: str = ""


class AcmeCfg(_C):
    eab_required: bool = False  # new accounts need an external account binding (EAB keys: `donjon acme eab-add`)
    default_profile: str | None = None  # else the first profile
    profile: tuple[AcmeProfileCfg, ...] = ()
    name_patterns: tuple[str, ...] = ("*",)  # names any account may get ("*.example.org", "host.example.org", "*")
    order_lifetime: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 86400
    authz_lifetime: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 86400
    orders_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 300
    new_accounts_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 50
    max_open_orders: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    resolver: str | None = None  # host:port for dns-01 and validation names (None: the system's)
    http01_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 80
    tlsalpn01_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 443
    renewal_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.33


class EstScepCfg(_C):
    """`[gateway.estscep]`: EST and SCEP (enrolment secrets: `donjon enrol-secret create`)."""

    ca: str | None = None  # the CA of /cacerts, GetCACert and the SCEP RA certificates (default: the first issuing CA)
    est_channel_binding: Literal["off", "optional", "required"] = "optional"  # tls-unique in the CSR (RFC 7030 §3.5)
    est_key_types: tuple[str, ...] = ("p256", "rsa2048")  # what /csrattrs asks for
    scep_allow_des: bool = False  # 3DES for old devices (DES itself is never accepted)
    scep_allow_weak_digest: bool = False  # SHA-1/MD5 signatures for old devices


class Gateway(_C):
    enabled: bool = False
    listen: str = "127.0.0.1:8443"  # host:port of its HTTPS listener (port 0: any free port)
    base_url: str | None = None  # https://name:port as clients reach it (default: from listen and the first tls-name)
    protocols: tuple[Literal["acme", "cmp", "est", "scep"], ...] = ("acme",)
    tls_names: tuple[str, ...] = ("127.0.0.1",)  # fully qualified names and IPs in its server certificate
    tls_ca: str | None = None  # the CA issuing that certificate (default: the first CA with tls-server)
    validation_networks: tuple[str, ...] = ()  # CIDRs validation may reach besides public addresses
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1024
    max_connections_per_source: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 64
    head_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    acme: AcmeCfg = AcmeCfg()
    estscep: EstScepCfg = EstScepCfg()


class Admin(_C):
    group: str = "donjon-admin"


class Profiles(_C):
    dir: str | None = "profiles"  # operator profile files (*.toml) overriding or adding to the shipped ones


GUARDABLE = ("ca-create", "ca-delete", "ca-sign-csr", "revoke-ca", "officer", "restore", "key-recovery", "clock-set", "keys-backup")


class Officers(_C):
    session_idle_minutes: Annotated[int, msgspec.Meta(ge=1, le=1440)] = 15
    max_failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5  # consecutive failed logins of a peer before its slow-down


class DualControl(_C):
    approvals: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1  # M distinct officers, the requester included; 1: off
    operations: tuple[Literal["ca-create", "ca-delete", "ca-sign-csr", "revoke-ca", "officer", "restore", "key-recovery", "clock-set", "keys-backup"], ...] = GUARDABLE
    expiry_minutes: Annotated[int, msgspec.Meta(ge=1, le=30 * 1440)] = 60


class Audit(_C):
    checkpoint_minutes: Annotated[int, msgspec.Meta(ge=0, le=30 * 1440)] = 60  # 0: on demand only


class Activation(_C):
    max_failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5  # consecutive wrong PINs before a lockout
    lockout_minutes: Annotated[int, msgspec.Meta(ge=0, le=1440)] = 15


class Console(_C):
    media: str = "media"  # removable-media folder for CSRs in and certificates/CRLs/backups out (relative to home)


class Kgs(_C):
    """The key generation system (issue 18): card personalisation, PIN letters, key archival."""

    enabled: bool = False
    card_module: str | None = None  # the card readers' PKCS#11 module (OpenSC's in production); default: hsm.module
    card_profiles: str = "card-profiles"  # folder of card profiles (NAME.toml), relative to home


class Config(_C):
    hsm: Hsm = Hsm()
    cmdb: CmdbCfg = CmdbCfg()
    endpoint: Endpoint = Endpoint()
    crl: Crl = Crl()
    ocsp: Ocsp = Ocsp()
    snmp: Snmp = Snmp()
    distribution: Distribution = Distribution()
    admin: Admin = Admin()
    profiles: Profiles = Profiles()
    officers: Officers = Officers()
    dual_control: DualControl = DualControl()
    audit: Audit = Audit()
    activation: Activation = Activation()
    console: Console = Console()
    gateway: Gateway = Gateway()
    kgs: Kgs = Kgs()
    # Per CA, the profiles it may issue: at its creation, what goes into its policy in the token;
    # afterwards the Factory also refuses anything not listed here (it can narrow, never widen).
    ca_profiles: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")],
                      Annotated[tuple[Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")], ...],
                                msgspec.Meta(min_length=1, max_length=64)]] = {}


def officer_settings(cfg: Config) -> dict:
    """The FactoryConfig fields for officers, dual control, audit checkpoints and activation lockout."""
    return {"session_idle_seconds": cfg.officers.session_idle_minutes * 60, "max_login_failures": cfg.officers.max_failures,
            "dual_approvals": cfg.dual_control.approvals, "dual_operations": tuple(cfg.dual_control.operations),
            "dual_expiry_seconds": cfg.dual_control.expiry_minutes * 60,
            "checkpoint_seconds": cfg.audit.checkpoint_minutes * 60,
            "activation_max_failures": cfg.activation.max_failures,
            "activation_lockout_seconds": cfg.activation.lockout_minutes * 60}


DEFAULT_TOML = """\
# Donjon configuration. Every key is optional; shown here with its default.
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"   # any vendor PKCS#11 module
token = "donjon"                              # token label (tokens are found by label, never by slot)
embedded = true                               # SoftHSM2 token folder under DONJON_HOME/softhsm
pin-file = "pin"                              # developer mode: activate at start from this file
signers = 2                                   # CIS signing processes (SoftHSM: one PKCS#11 caller per process)
deadline-seconds = 30                         # a CIS that does not answer this long is unresponsive (requests fail)

[cmdb]
cipher = "chacha20"                           # chacha20 or aegis (both authenticated)
standby = false                               # true: every commit also on HOME/cmdb/standby (a second disk) first
restore-max-age-days = 7                      # donjon restore: an older backup needs a quorum's confirmation

[endpoint]
base-url = "http://127.0.0.1:8080"            # CRL DP and AIA URLs derive from it

[crl]
validity-hours = 168                          # nextUpdate = thisUpdate + this
calendar-warn-remaining = 3                   # an offline root's CRL calendar: warn when fewer pre-signed CRLs remain (1-120)
calendar-warn-hours = 72                      # ... or when the current one lapses this soon with none to follow (1-2160)

[ocsp]
enabled = true
listen = "127.0.0.1:8080"                     # the OCSP, CRL and CA-certificate HTTP endpoint
workers = 1                                   # endpoint processes on that listener (each its own store)
max-connections = 1024
max-connections-per-source = 64               # per IPv4 address or IPv6 /64 (raise it behind a proxy)
head-timeout = 5.0                            # seconds to receive a request's head
read-timeout = 10.0                           # seconds to receive a whole request
max-age = 3600                                # cap on Cache-Control max-age
validity-hours = 24                           # nextUpdate of pre-produced responses (re-signed at half)
hashes = ["sha1"]                             # CertID hashes to pre-produce (RFC 5019: sha1; add "sha256")
unissued = "unauthorized"                     # never-issued serials: unauthorized, or (with a delegated responder) unknown or revoked
responder-days = 30                           # lifetime of an automatically renewed delegated responder certificate
responder-renew-days = 10                     # renew it when less than this remains (0: never automatically)
# [ocsp.unissued-by-ca]                       # per CA, overriding `unissued`
# issuing = "revoked"                         # RFC 6960 extended revoked

[snmp]
enabled = false                               # the SNMP agent (DONJON-MIB) and notifications
listen = "127.0.0.1:1161"
# community-file = "secrets/snmp-community"   # optional read-only v2c, only from community-sources (a 0600 file)
community-sources = ["127.0.0.0/8"]
lead-time-hours = 72                          # warn this long before a CRL, OCSP response or CA cert lapses
# [[snmp.users]]                              # SNMPv3 authPriv users (SHA-2 + AES only)
# name = "ops"
# auth-key-file = "secrets/snmp-ops-auth"     # secrets: 0600 files under DONJON_HOME, never in this file
# priv-key-file = "secrets/snmp-ops-priv"
# [[snmp.targets]]                            # where notifications go
# host = "127.0.0.1"
# port = 162
# kind = "trap"                               # or "inform"
# version = "v3"                              # or "v2c" with community-file
# user = "ops"

[distribution]                                # the Distribution agent publishes to LDAP and HTTP
max-attempts = 50                             # a job failing this many times is parked (`donjon dist retry`)
backoff-max = 3600                            # seconds: cap of the per-destination exponential backoff
# [[distribution.rule]]
# name = "directory"
# url = "ldap://ldap.example.org"             # ldap://, ldaps:// (or starttls = true), http://, https://
# bind-dn = "cn=donjon,dc=example,dc=org"
# secret-file = "secrets/directory"           # bind password / HTTP password or bearer token (under DONJON_HOME)
# ca-file = "/etc/donjon/ldap-ca.pem"         # TLS trust anchors
# publish = ["ca-cert", "certs", "crl", "issued-serials"]
# cas = []                                    # empty: every CA
# profiles = ["user-auth"]                    # certs of these profiles (empty: all)
# dn = "cn={CN},ou=people,dc=example,dc=org"  # subject fields: {CN} {O} {OU} {C} {L} {ST} {UID} {E} {serial} {ca}
# ca-dn = "cn={CN},ou=CAs,dc=example,dc=org"
# entry-classes = ["inetOrgPerson", "pkiUser"]
# entry-attributes = { sn = "{CN}" }
# remove-on-revoke = true
# [[distribution.rule]]
# name = "web"
# url = "https://pki.example.org/pub/{name}"  # {name}: <ca>.crl, <ca>.crt, <ca>.serials; {ca}: the CA name
# method = "PUT"
# username = "donjon"                         # with secret-file: HTTP basic; without username: bearer token
# secret-file = "secrets/web"
# publish = ["ca-cert", "crl", "issued-serials"]

[admin]
group = "donjon-admin"                        # members may use the admin socket

[profiles]
dir = "profiles"                              # *.toml here override or add to the shipped profiles

[officers]
session-idle-minutes = 15                     # an admin session ends after this long unused
max-failures = 5                              # consecutive failed logins from one peer user before it is slowed down

[dual-control]
approvals = 1                                 # M distinct officers (the requester counts as one); 1 = off
operations = ["ca-create", "ca-delete", "ca-sign-csr", "revoke-ca", "officer", "restore", "clock-set", "keys-backup"]
expiry-minutes = 60                           # a pending request expires with its approvals

[audit]
checkpoint-minutes = 60                       # the CIS signs the audit chain head this often (0: on demand only)

[activation]
max-failures = 5                              # consecutive wrong PINs (or bad share sets) before a lockout
lockout-minutes = 15                          # activation refused this long after the lockout

[console]
media = "media"                               # removable media (appliance: /media/donjon); relative to DONJON_HOME

[gateway]
enabled = false                               # the protocol gateway (ACME; CMP, EST, SCEP) over HTTPS
listen = "127.0.0.1:8443"
protocols = ["acme"]
tls-names = ["127.0.0.1"]                     # its server certificate (fully qualified names, IPs) (key in its own token), issued by tls-ca
# tls-ca = "issuing"
validation-networks = []                      # CIDRs challenge validation may reach (loopback/private are denied otherwise)
# [gateway.acme]
# eab-required = false
# resolver = "127.0.0.1:5353"                 # dns-01 and validation names through this resolver
# [[gateway.acme.profile]]
# name = "classic"
# profile = "tls-server"
# ca = "issuing"

# [ca-profiles]                               # per CA, the profiles it may issue (default: a root the CA
# issuing = ["tls-server", "tls-client"]      # profiles, an issuing CA the others); set at the CA's
                                              # creation in its token policy, and only narrowed here later
"""


def _where(path: str, text: str, err: str) -> str:
    m = re.search(r"at `\$\.([\w.\-\[\]]+)`", err)
    line = ""
    if m:
        key = m.group(1).split(".")[-1].split("[")[0]
        for i, ln in enumerate(text.splitlines(), 1):
            if re.match(rf"\s*\[?\[?\s*\"?{re.escape(key)}\"?\s*[=\]]", ln):
                line = f", line {i}"
                break
    return f"{path}{line}: {err}"


def load_toml(path: str, typ):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    text = raw.decode("utf-8", "replace")
    try:
        return msgspec.toml.decode(raw, type=typ)
    except msgspec.ValidationError as e:
        raise ConfigError(_where(path, text, str(e))) from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load(home: str) -> Config:
    path = os.path.join(home, "donjon.toml")
    if not os.path.exists(path):
        return Config()
    cfg = load_toml(path, Config)
    if cfg.ocsp.responder_renew_days >= cfg.ocsp.responder_days:  # a renewed responder would be due again at once
        raise ConfigError(f"{path}: [ocsp] responder-renew-days ({cfg.ocsp.responder_renew_days}) must be less than "
                          f"responder-days ({cfg.ocsp.responder_days})")
    gateway_check(path, cfg)
    return cfg


def gateway_check(path: str, cfg: Config) -> None:
    """What the types cannot say about [gateway]: addresses, networks, profile names."""
    import ipaddress

    g = cfg.gateway
    for net in g.validation_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{path}: [gateway] validation-networks: {net!r} is not a CIDR network") from None
    names = [p.name for p in g.acme.profile]
    for p in g.acme.profile:
        for k in ("name", "profile", "ca"):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", getattr(p, k)):
                raise ConfigError(f"{path}: [[gateway.acme.profile]] {k}: letters, digits, '.', '_' or '-', got {getattr(p, k)!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: [[gateway.acme.profile]]: a profile name given twice")
    if g.acme.default_profile is not None and g.acme.default_profile not in names:
        raise ConfigError(f"{path}: [gateway.acme] default-profile {g.acme.default_profile!r} is not a [[gateway.acme.profile]]")
    for pat in g.acme.name_patterns:
        if not re.fullmatch(r"\*|(\*\.)?[A-Za-z0-9._-]{1,253}", pat):
            raise ConfigError(f"{path}: [gateway.acme] name-patterns: {pat!r} is not a name, *.name or *")


DN_FIELDS = {"CN", "O", "OU", "C", "L", "ST", "UID", "E", "serial", "ca"}


def dist_rules(home: str, cfg: Config, with_secrets: bool) -> list[S.DistRule]:
    """Check every rule completely (errors name the rule and the key) and build the messages."""
    from urllib.parse import urlsplit

    out: list[S.DistRule] = []
    seen: set[str] = set()
    path = os.path.join(home, "donjon.toml")
    for r in cfg.distribution.rule:
        where = f"{path}: [[distribution.rule]] {r.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", r.name):
            raise ConfigError(f"{where}: name must be letters, digits, '.', '_' or '-'")
        if r.name in seen:
            raise ConfigError(f"{where}: a second rule with this name")
        seen.add(r.name)
        u = urlsplit(r.url.replace("{", "%7B").replace("}", "%7D"))
        if u.scheme not in ("ldap", "ldaps", "http", "https") or not u.hostname:
            raise ConfigError(f"{where}: url: want ldap://, ldaps://, http:// or https:// with a host, got {r.url!r}")
        ldap = u.scheme.startswith("ldap")
        if "delta-crl" in r.publish and not (set(r.cas) & set(cfg.crl.delta) if r.cas else cfg.crl.delta):
            raise ConfigError(f"{where}: publish: delta-crl, but no CA of the rule has delta CRLs (crl.delta)")
        if not r.publish:
            raise ConfigError(f"{where}: publish: name at least one of ca-cert, certs, crl, issued-serials")
        if ldap:
            if "certs" in r.publish and not r.dn:
                raise ConfigError(f"{where}: dn: an LDAP rule publishing certs needs a dn template")
            if set(r.publish) - {"certs"} and not r.ca_dn:
                raise ConfigError(f"{where}: ca-dn: an LDAP rule publishing CA objects needs a ca-dn template")
            for key, tmpl in (("dn", r.dn), ("ca-dn", r.ca_dn)):
                for f in re.findall(r"{([^}]*)}", tmpl or ""):
                    if f not in DN_FIELDS:
                        raise ConfigError(f"{where}: {key}: unknown field {{{f}}} (use {', '.join(sorted(DN_FIELDS))})")
            if r.username or r.method != "PUT":
                raise ConfigError(f"{where}: username/method are for HTTP rules")
            if "issued-serials" in r.publish:
                raise ConfigError(f"{where}: publish: the issued-serials list has no LDAP attribute (RFC 4523): publish it over HTTP")
        else:
            if "certs" in r.publish:
                raise ConfigError(f"{where}: publish: end-entity certificates go to LDAP only")
            if r.bind_dn or r.dn or r.ca_dn or r.starttls:
                raise ConfigError(f"{where}: bind-dn/dn/ca-dn/starttls are for LDAP rules")
            for f in re.findall(r"{([^}]*)}", r.url):
                if f not in ("ca", "name"):
                    raise ConfigError(f"{where}: url: unknown field {{{f}}} (use {{ca}} or {{name}})")
        if u.scheme == "ldaps" and r.starttls:
            raise ConfigError(f"{where}: starttls with ldaps:// (choose one)")
        if u.username or u.password:
            raise ConfigError(f"{where}: url: credentials belong in secret-file, not in the URL")
        secret = None
        if r.secret_file:
            secret = read_secret(os.path.join(home, r.secret_file), f"{where}: secret-file")
        if r.bind_dn and secret is None:
            raise ConfigError(f"{where}: bind-dn needs a secret-file")
        ca_pem = None
        if r.ca_file:
            try:
                with open(os.path.join(home, r.ca_file), "rb") as f:
                    ca_pem = f.read()
            except OSError as e:
                raise ConfigError(f"{where}: ca-file: {e.strerror}") from None
        try:
            out.append(msgspec.convert(dict(
                name=r.name, url=r.url, publish=tuple(p for p in r.publish), cas=r.cas, profiles=r.profiles,
                remove_on_revoke=r.remove_on_revoke, bind_dn=r.bind_dn, username=r.username,
                secret=secret if with_secrets else None, starttls=r.starttls, ca_file_pem=ca_pem, dn=r.dn, ca_dn=r.ca_dn,
                entry_classes=r.entry_classes, entry_attributes=r.entry_attributes, ca_entry_classes=r.ca_entry_classes,
                method=r.method, timeout=r.timeout, connections=r.connections), S.DistRule))
        except msgspec.ValidationError as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


def read_secret(path: str, what: str) -> str:
    """A secret kept in a file (a PIN, a directory password): its text, stripped; unreadable or empty is
    refused in one line naming `what` and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not secret:
        raise ConfigError(f"{what} {path} is empty")
    return secret


def read_secret_file(home: str, rel: str, where: str, key: str) -> str:
    """A secret from a file beneath DONJON_HOME: a plain file, reached without following a link,
    readable by its owner only (0600); its first line, stripped."""
    from appliance import safefs
    path = os.path.join(home, rel)
    try:
        home_fd = safefs.open_root(home)
        try:
            fd = safefs.open_beneath(home_fd, rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        finally:
            os.close(home_fd)
    except OSError as e:
        why = "a symbolic link on the way, or outside DONJON_HOME" if e.errno in (errno.ELOOP, errno.EXDEV) else e.strerror
        raise ConfigError(f"{where}: {key} {path}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ConfigError(f"{where}: {key} {path}: not a plain file with one name (a link?)")
        if st.st_mode & 0o077:
            raise ConfigError(f"{where}: {key} {path}: readable by others (mode {st.st_mode & 0o777:04o}): chmod 600 it")
        raw = os.read(fd, 4097)
    finally:
        os.close(fd)
    lines = raw.decode("utf-8", "replace").splitlines()
    value = lines[0].strip() if lines else ""
    if not value or len(raw) > 4096:
        raise ConfigError(f"{where}: {key} {path}: empty or larger than 4 KiB")
    return value


def snmp_config(home: str, cfg: Config) -> S.SnmpConfig:
    """The agent's configuration, its secrets read from their files (errors name the key)."""
    path = os.path.join(home, "donjon.toml")
    c = cfg.snmp

    def refuse(where: str, key: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: secrets do not belong in donjon.toml (the admin group reads it): "
                           f"put it in a 0600 file under DONJON_HOME and name that file with {key}-file")

    def secret(where: str, key: str, rel: str | None) -> str | None:
        return None if rel is None else read_secret_file(home, rel, where, key + "-file")

    if c.community is not None:
        raise refuse(f"{path}: [snmp]", "community")
    users = []
    for u in c.users:
        where = f"{path}: [[snmp.users]] {u.name!r}"
        for key, val in (("auth-key", u.auth_key), ("priv-key", u.priv_key)):
            if val is not None:
                raise refuse(where, key)
        auth, priv = secret(where, "auth-key", u.auth_key_file), secret(where, "priv-key", u.priv_key_file)
        if auth is None or priv is None:
            raise ConfigError(f"{where}: auth-key-file and priv-key-file are both needed (authPriv only)")
        users.append({"name": u.name, "auth": u.auth, "auth_key": auth, "priv": u.priv, "priv_key": priv})
    targets = []
    for t in c.targets:
        where = f"{path}: [[snmp.targets]] {t.host}:{t.port}"
        if t.community is not None:
            raise refuse(where, "community")
        targets.append({"host": t.host, "port": t.port, "kind": t.kind, "version": t.version, "user": t.user,
                        "community": secret(where, "community", t.community_file)})
    try:
        return msgspec.convert({"listen": c.listen, "community": secret(f"{path}: [snmp]", "community", c.community_file),
                                "community_sources": list(c.community_sources), "users": users, "targets": targets}, S.SnmpConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: [snmp]: {e}") from None


def load_ceremony(path: str) -> CeremonySpec:
    return load_toml(path, CeremonySpec)


def profile_overrides(home: str, cfg: Config) -> dict[str, str]:
    """Operator profile files, validated by policy before they are pushed to the roles."""
    from policy.errors import PolicyError
    from policy.profiles import load_profile_text

    out: dict[str, str] = {}
    if not cfg.profiles.dir:
        return out
    d = os.path.join(home, cfg.profiles.dir)
    if not os.path.isdir(d):
        return out
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".toml"):
            name = fn[:-5]
            with open(os.path.join(d, fn), encoding="utf-8") as f:
                text = f.read()
            try:
                load_profile_text(name, text)
            except PolicyError as e:
                raise ConfigError(f"{os.path.join(d, fn)}: {e}") from None
            out[name] = text
    return out


def card_profiles(home: str, cfg: Config, overrides: dict[str, str]) -> dict[str, str]:
    """The KGS's card profiles (HOME/card-profiles/NAME.toml), validated against the certificate profiles."""
    from policy.cards import load_card_profile_text
    from policy.errors import PolicyError
    from policy.profiles import load_profiles

    out: dict[str, str] = {}
    d = os.path.join(home, cfg.kgs.card_profiles)
    if not cfg.kgs.enabled or not os.path.isdir(d):
        return out
    known = load_profiles(overrides)
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".toml"):
            with open(os.path.join(d, fn), encoding="utf-8") as f:
                text = f.read()
            try:
                load_card_profile_text(fn[:-5], text, known)
            except PolicyError as e:
                raise ConfigError(f"{os.path.join(d, fn)}: {e}") from None
            out[fn[:-5]] = text
    return out


def check_ca_profiles(home: str, cfg: Config, overrides: dict[str, str]) -> None:
    """Every profile [ca-profiles] names exists (a typo would silently stop a CA issuing)."""
    from policy.profiles import load_profiles

    known = load_profiles(overrides)
    for ca, names in cfg.ca_profiles.items():
        for n in names:
            if n not in known:
                raise ConfigError(f"{os.path.join(home, 'donjon.toml')}: [ca-profiles] {ca}: unknown profile {n!r}")


# ---------------------------------------------------------------- `donjon config set` (through the admin socket)

SETTINGS = {
    "ocsp.listen": "the OCSP/CRL endpoint's listen address (host:port)",
    "endpoint.base-url": "the base of CRL DP / OCSP / caIssuers URLs in new certificates",
    "snmp.listen": "the SNMP agent's UDP address (host:port)",
    "crl.validity-hours": "nextUpdate - thisUpdate of new CRLs (hours)",
    "crl.shards": "per CA, the number of CRL shards (1-256, by serial; fixed once the CA issued): { issuing = 16 }",
    "crl.delta": "per CA, minutes between its delta CRLs (1-1440): { issuing = 60 }",
    "ocsp.validity-hours": "validity of pre-produced OCSP responses (hours)",
    "console.media": "the removable-media folder of the console",
}
_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})$")
_URL = re.compile(r"^https?://(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")
_PATH = re.compile(r"^/?[A-Za-z0-9._/-]{1,200}$")


def setting_literal(key: str, value: str) -> str:
    """The TOML literal for a value, or ConfigError; never passes operator text through unchecked."""
    if key not in SETTINGS:
        raise ConfigError(f"unknown setting {key!r} (one of: {', '.join(SETTINGS)})")
    if key in ("ocsp.listen", "snmp.listen"):
        m = _HOSTPORT.match(value)
        if not m or int(m.group(2)) > 65535:
            raise ConfigError(f"{key}: {value[:60]!r} is not host:port")
        return f'"{value}"'
    if key == "endpoint.base-url":
        m = _URL.match(value)
        if not m or (m.group(2) and int(m.group(2)[1:]) > 65535):
            raise ConfigError(f"{key}: {value[:60]!r} is not an http(s) URL of letters, digits and ._~/-")
        return f'"{value.rstrip("/")}"'
    if key.endswith("validity-hours"):
        if not re.fullmatch(r"[0-9]{1,5}", value):
            raise ConfigError(f"{key}: {value[:20]!r} is not a whole number of hours")
        return value
    if key in ("crl.shards", "crl.delta"):  # a table of CA name -> number, written back in one normal form
        top = 256 if key == "crl.shards" else 24 * 60
        m = re.fullmatch(r"\{\s*(.*?)\s*\}", value.strip())
        items = [] if m is None or not m.group(1) else m.group(1).split(",")
        pairs = [re.fullmatch(r'\s*"?([A-Za-z0-9][A-Za-z0-9._-]{0,63})"?\s*=\s*([0-9]{1,4})\s*', it) for it in items]
        if m is None or len(value) > 4000 or not all(pairs):
            raise ConfigError(f"{key}: {value[:60]!r} is not a table of CA names and numbers, e.g. {{ issuing = 16 }}")
        table = {p.group(1): int(p.group(2)) for p in pairs if p}
        if len(table) != len(pairs) or not all(1 <= n <= top for n in table.values()):
            raise ConfigError(f"{key}: each CA once, each number 1..{top}")
        return "{ " + ", ".join(f'"{ca}" = {n}' for ca, n in table.items()) + " }" if table else "{}"
    if key == "console.media":
        if not _PATH.match(value) or ".." in value.split("/"):
            raise ConfigError(f"{key}: {value[:60]!r} is not a plain path")
        return f'"{value}"'
    raise ConfigError(f"unknown setting {key!r}")


def write_setting(home: str, key: str, value: str) -> str:
    """Set one key in HOME/donjon.toml (comments kept), validate the whole file, replace it atomically.
    The supervisor's alone (it is asked by the Factory, which checked the officer and audits it)."""
    literal = setting_literal(key, value)
    sect, field = key.split(".")
    path = os.path.join(home, "donjon.toml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    lines = text.splitlines()
    current, start, done = None, None, False
    for i, ln in enumerate(lines):
        m = re.match(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$", ln)
        if m:
            current = m.group(1)
            if current == sect:
                start = i
            continue
        if current == sect and re.match(rf"^\s*{re.escape(field)}\s*=", ln):
            m = re.match(r'^\s*("(?:[^"\\]|\\.)*"|[^#"]*?)\s*(#.*)?$', ln.split("=", 1)[1])
            lines[i] = f"{field} = {literal}" + (f"  {m.group(2)}" if m and m.group(2) else "")
            done = True
            break
    if not done:
        if start is None:
            lines += ["", f"[{sect}]", f"{field} = {literal}"]
        else:
            lines.insert(start + 1, f"{field} = {literal}")
    new = "\n".join(lines) + "\n"
    tmp = path + ".new"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)  # a stale one; never written through (a link is replaced, not followed)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        try:
            load_toml(tmp, Config)
        except ConfigError as e:
            raise ConfigError(str(e).replace(tmp, path)) from None
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return f"{key} = {literal} (takes effect at the next start)"

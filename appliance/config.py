"""Typed configuration: `donjon.toml` and the ceremony file, validated completely at load.

Unknown keys are rejected; errors name the file, the line and the key. Roles never read these
files: the supervisor pushes what each role needs as messages.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import msgspec

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


class CmdbCfg(_C):
    cipher: Literal["chacha20", "aegis"] = "chacha20"


class Endpoint(_C):
    base_url: str | None = "http://127.0.0.1:8080"


class Crl(_C):
    validity_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 366)] = 168


class Ocsp(_C):
    enabled: bool = True
    listen: str = "127.0.0.1:8080"  # host:port of the OCSP/CRL/CA-certificate HTTP endpoint (port 0: any free port)
    workers: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1  # endpoint processes accepting on the one listener
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1024
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    max_age: Annotated[int, msgspec.Meta(ge=0, le=7 * 86400)] = 3600
    validity_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 31)] = 24
    hashes: tuple[Literal["sha1", "sha256"], ...] = ("sha1",)


class SnmpUserCfg(_C):
    name: str
    auth_key: str
    priv_key: str
    auth: Literal["sha256", "sha384", "sha512"] = "sha256"
    priv: Literal["aes128", "aes192", "aes256"] = "aes128"


class SnmpTargetCfg(_C):
    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 162
    kind: Literal["trap", "inform"] = "trap"
    version: Literal["v3", "v2c"] = "v3"
    user: str | None = None
    community: str | None = None


class Snmp(_C):
    enabled: bool = False
    listen: str = "127.0.0.1:1161"
    users: tuple[SnmpUserCfg, ...] = ()
    community: str | None = None  # read-only v2c, only from community-sources
    community_sources: tuple[str, ...] = ("127.0.0.0/8",)
    targets: tuple[SnmpTargetCfg, ...] = ()
    lead_time_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 90)] = 72  # warn this long before a CRL/OCSP/cert lapses


class Admin(_C):
    group: str = "donjon-admin"


class Profiles(_C):
    dir: str | None = "profiles"  # operator profile files (*.toml) overriding or adding to the shipped ones


class Console(_C):
    media: str = "media"  # removable-media folder for CSRs in and certificates/CRLs/backups out (relative to home)


class Config(_C):
    hsm: Hsm = Hsm()
    cmdb: CmdbCfg = CmdbCfg()
    endpoint: Endpoint = Endpoint()
    crl: Crl = Crl()
    ocsp: Ocsp = Ocsp()
    snmp: Snmp = Snmp()
    admin: Admin = Admin()
    profiles: Profiles = Profiles()
    console: Console = Console()


DEFAULT_TOML = """\
# Donjon configuration. Every key is optional; shown here with its default.
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"   # any vendor PKCS#11 module
token = "donjon"                              # token label (tokens are found by label, never by slot)
embedded = true                               # SoftHSM2 token folder under DONJON_HOME/softhsm
pin-file = "pin"                              # developer mode: activate at start from this file
signers = 2                                   # CIS signing processes (SoftHSM: one PKCS#11 caller per process)

[cmdb]
cipher = "chacha20"                           # chacha20 or aegis (both authenticated)

[endpoint]
base-url = "http://127.0.0.1:8080"            # CRL DP and AIA URLs derive from it

[crl]
validity-hours = 168                          # nextUpdate = thisUpdate + this

[ocsp]
enabled = true
listen = "127.0.0.1:8080"                     # the OCSP, CRL and CA-certificate HTTP endpoint
workers = 1                                   # endpoint processes on that listener (each its own store)
max-connections = 1024
read-timeout = 10.0                           # seconds to receive a whole request
max-age = 3600                                # cap on Cache-Control max-age
validity-hours = 24                           # nextUpdate of pre-produced responses (re-signed at half)
hashes = ["sha1"]                             # CertID hashes to pre-produce (RFC 5019: sha1; add "sha256")

[snmp]
enabled = false                               # the SNMP agent (DONJON-MIB) and notifications
listen = "127.0.0.1:1161"
# community = "public"                        # optional read-only v2c, only from community-sources
community-sources = ["127.0.0.0/8"]
lead-time-hours = 72                          # warn this long before a CRL, OCSP response or CA cert lapses
# [[snmp.users]]                              # SNMPv3 authPriv users (SHA-2 + AES only)
# name = "ops"
# auth-key = "..."
# priv-key = "..."
# [[snmp.targets]]                            # where notifications go
# host = "127.0.0.1"
# port = 162
# kind = "trap"                               # or "inform"
# version = "v3"                              # or "v2c" with community
# user = "ops"

[admin]
group = "donjon-admin"                        # members may use the admin socket

[profiles]
dir = "profiles"                              # *.toml here override or add to the shipped profiles

[console]
media = "media"                               # removable media (appliance: /media/donjon); relative to DONJON_HOME
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
    return load_toml(path, Config)


def load_ceremony(path: str) -> S.CeremonySpec:
    return load_toml(path, S.CeremonySpec)


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

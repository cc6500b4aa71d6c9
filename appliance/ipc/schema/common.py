"""Size limits, the message base, Hello/Refused and what every link shares; the Distribution rules."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec


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
                   "sup-distribution", "factory-distribution", "sup-gateway", "factory-gateway", "sup-kgs", "factory-kgs"]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


# ---------------------------------------------------------------- common


class Hello(_Msg, tag="hello"):
    link: LinkName
    version: int


class Refused(_Msg, tag="refused"):
    """A typed refusal. `code` is machine-readable, `reason` is one line for the operator."""

    id: ReqId
    code: Literal["policy", "not-found", "exists", "inactive", "auth", "hsm", "internal", "bad-request", "lint", "busy", "denied",
                  "login-required"]  # login-required: no officer session (the client's cue for a deferred login)
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

Publishable = Literal["ca-cert", "certs", "crl", "delta-crl", "issued-serials"]


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

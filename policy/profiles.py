"""Certificate profiles: the typed, validated description of what a CA may issue."""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from policy.errors import PolicyError

KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384", "ed25519")
KINDS = ("root-ca", "sub-ca", "ocsp-responder", "end-entity")
CA_KINDS = ("root-ca", "sub-ca")
SUBJECT_ATTRS = ("CN", "O", "OU", "C", "L", "ST", "emailAddress", "serialNumber", "DC")
PRESENCES = ("required", "optional", "fixed")
SAN_TYPES = ("dns", "ip", "email", "uri")
KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)
EKU_NAMES = {
    "serverAuth": "1.3.6.1.5.5.7.3.1",
    "clientAuth": "1.3.6.1.5.5.7.3.2",
    "codeSigning": "1.3.6.1.5.5.7.3.3",
    "emailProtection": "1.3.6.1.5.5.7.3.4",
    "OCSPSigning": "1.3.6.1.5.5.7.3.9",
    "smartcardLogon": "1.3.6.1.4.1.311.20.2.2",
}
BUILTIN_NAMES = (
    "root-ca",
    "sub-ca",
    "ocsp-responder",
    "tls-server",
    "tls-client",
    "user-auth",
    "user-sign",
    "user-enc",
)

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]{0,18})){1,30}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# RFC 5280 caps a CA at "forever"; we cap every profile at 30 years so a typo cannot mint a century.
_MAX_DAYS = 30 * 366


@dataclass(frozen=True)
class SubjectRule:
    attr: str  # one of CN O OU C L ST emailAddress serialNumber DC
    presence: str  # "required" | "optional" | "fixed"
    value: str | None = None  # for fixed


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str
    key_types: tuple[str, ...]
    subject: tuple[SubjectRule, ...]
    san_types: tuple[str, ...]
    san_required: bool
    key_usage: tuple[str, ...]
    extended_key_usage: tuple[str, ...]
    ca: bool
    path_length: int | None
    crl_dp: bool
    aia: bool
    ocsp_nocheck: bool
    policies: tuple[str, ...]
    max_validity_days: int
    lint: bool
    cabf: bool = False  # publicly-trusted TLS: build and lint to the CA/B Forum Baseline Requirements
    # Subject values with bidi or invisible characters, or mixed-script look-alikes (UTS #39), are
    # refused unless the profile allows them (policy/names.py).
    allow_confusable_names: bool = False
    unique_subject: bool = False  # refuse a second valid certificate (same CA) for the subject with another key
    unique_key: bool = False  # refuse a public key this appliance already certified (any CA, any state)

    def rule(self, attr: str) -> SubjectRule | None:
        for r in self.subject:
            if r.attr == attr:
                return r
        return None


# key -> (required, default)
_KEYS: dict[str, tuple[bool, Any]] = {
    "kind": (True, None),
    "key_types": (True, None),
    "subject": (False, []),
    "san_types": (False, []),
    "san_required": (False, False),
    "key_usage": (True, None),
    "extended_key_usage": (False, []),
    "ca": (False, None),  # default: derived from kind
    "path_length": (False, None),
    "crl_dp": (False, False),
    "aia": (False, False),
    "ocsp_nocheck": (False, False),
    "policies": (False, []),
    "max_validity_days": (True, None),
    "lint": (False, False),
    "cabf": (False, False),
    "allow_confusable_names": (False, False),
    "unique_subject": (False, False),
    "unique_key": (False, False),
}
_SUBJECT_KEYS = ("attr", "presence", "value")


def _err(name: str, key: str, rule: str, message: str) -> PolicyError:
    return PolicyError(f"profile {name}: {key}", rule, message)


def _str_list(name: str, key: str, v: Any, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _err(name, key, "type", "must be a list of strings")
    if len(set(v)) != len(v):
        raise _err(name, key, "duplicate", "lists a value twice")
    if allowed is not None:
        for x in v:
            if x not in allowed:
                raise _err(name, key, "value", f"unknown value {x!r} (allowed: {', '.join(allowed)})")
    return tuple(v)


def _bool(name: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _err(name, key, "type", "must be true or false")
    return v


def _subject(name: str, v: Any) -> tuple[SubjectRule, ...]:
    if not isinstance(v, list):
        raise _err(name, "subject", "type", "must be an array of tables")
    rules: list[SubjectRule] = []
    seen: set[str] = set()
    for i, item in enumerate(v):
        where = f"subject[{i}]"
        if not isinstance(item, dict):
            raise _err(name, where, "type", "must be a table")
        for k in item:
            if k not in _SUBJECT_KEYS:
                raise _err(name, f"{where}.{k}", "unknown-key", f"unknown key {k!r}")
        attr, presence, value = item.get("attr"), item.get("presence"), item.get("value")
        if attr not in SUBJECT_ATTRS:
            raise _err(name, f"{where}.attr", "value", f"attr must be one of {', '.join(SUBJECT_ATTRS)}")
        if attr in seen:
            raise _err(name, f"{where}.attr", "duplicate", f"{attr} listed twice")
        seen.add(attr)
        if presence not in PRESENCES:
            raise _err(name, f"{where}.presence", "value", f"presence must be one of {', '.join(PRESENCES)}")
        if presence == "fixed":
            if not isinstance(value, str) or not value:
                raise _err(name, f"{where}.value", "required", "a fixed attribute needs a non-empty value")
            if attr == "DC":
                raise _err(name, f"{where}.attr", "value", "DC may not be fixed (it is multi-valued)")
        elif value is not None:
            raise _err(name, f"{where}.value", "unexpected", "value is only for presence = \"fixed\"")
        rules.append(SubjectRule(attr, presence, value))
    if rules:
        # Fixed values go into certificates verbatim: hold them to the same rules as requested ones.
        from policy.csr import check_subject_value

        for r in rules:
            if r.value is not None:
                try:
                    check_subject_value(r.attr, r.value)
                except PolicyError as e:
                    raise _err(name, f"subject.{r.attr}", e.rule, e.message) from None
    return tuple(rules)


def load_profile_text(name: str, text: str) -> Profile:
    """Parse and validate one profile from TOML text; every refusal names the key."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PolicyError(f"profile {name!r}", "name", "profile names are 1-63 of a-z 0-9 -")
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as e:
        raise _err(name, "toml", "syntax", f"not valid TOML ({e})") from None
    for k in data:
        if k not in _KEYS:
            raise _err(name, k, "unknown-key", f"unknown key {k!r}")
    for k, (required, _) in _KEYS.items():
        if required and k not in data:
            raise _err(name, k, "required", f"missing required key {k!r}")
    get = lambda k: data.get(k, _KEYS[k][1])  # noqa: E731

    kind = get("kind")
    if kind not in KINDS:
        raise _err(name, "kind", "value", f"kind must be one of {', '.join(KINDS)}")
    is_ca_kind = kind in CA_KINDS
    key_types = _str_list(name, "key_types", get("key_types"), KEY_TYPES)
    if not key_types:
        raise _err(name, "key_types", "empty", "at least one key type is needed")
    subject = _subject(name, get("subject"))
    san_types = _str_list(name, "san_types", get("san_types"), SAN_TYPES)
    san_required = _bool(name, "san_required", get("san_required"))
    if san_required and not san_types:
        raise _err(name, "san_required", "conflict", "a SAN is required but no SAN type is allowed")
    key_usage = _str_list(name, "key_usage", get("key_usage"), KEY_USAGES)
    if not key_usage:
        raise _err(name, "key_usage", "empty", "at least one key usage is needed")
    eku = _str_list(name, "extended_key_usage", get("extended_key_usage"))
    for oid in eku:
        if oid not in EKU_NAMES and not _OID_RE.match(oid):
            raise _err(name, "extended_key_usage", "value", f"{oid!r} is neither a known name nor a dotted OID")
    ca = get("ca")
    ca = is_ca_kind if ca is None else _bool(name, "ca", ca)
    if ca != is_ca_kind:
        raise _err(name, "ca", "conflict", f"ca = {str(ca).lower()} contradicts kind = {kind!r}")
    path_length = get("path_length")
    if path_length is not None:
        if not ca:
            raise _err(name, "path_length", "conflict", "only CA profiles take a path length")
        if isinstance(path_length, bool) or not isinstance(path_length, int) or not 0 <= path_length <= 16:
            raise _err(name, "path_length", "value", "path_length must be an integer 0..16")
    if ca:
        if "key_cert_sign" not in key_usage:
            raise _err(name, "key_usage", "ca", "a CA profile needs key_cert_sign")
        if eku:
            # An EKU in a CA certificate constrains everything beneath it in some validators and not
            # in others; keep CA certificates unambiguous.
            raise _err(name, "extended_key_usage", "ca", "CA profiles carry no extended key usage")
    elif "key_cert_sign" in key_usage:
        raise _err(name, "key_usage", "ca", "key_cert_sign is only for CA profiles")
    if kind == "ocsp-responder" and "OCSPSigning" not in eku:
        raise _err(name, "extended_key_usage", "ocsp", "an OCSP responder profile needs OCSPSigning")
    crl_dp = _bool(name, "crl_dp", get("crl_dp"))
    aia = _bool(name, "aia", get("aia"))
    if kind == "root-ca" and (crl_dp or aia):
        raise _err(name, "crl_dp" if crl_dp else "aia", "root", "a self-signed root has no issuer to point at")
    ocsp_nocheck = _bool(name, "ocsp_nocheck", get("ocsp_nocheck"))
    if ocsp_nocheck and kind != "ocsp-responder":
        raise _err(name, "ocsp_nocheck", "conflict", "ocsp_nocheck is only for OCSP responder profiles")
    policies = _str_list(name, "policies", get("policies"))
    for p in policies:
        if not _OID_RE.match(p):
            raise _err(name, "policies", "value", f"{p!r} is not a dotted OID")
    days = get("max_validity_days")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise _err(name, "max_validity_days", "value", f"max_validity_days must be an integer 1..{_MAX_DAYS}")
    lint = _bool(name, "lint", get("lint"))
    if kind != "end-entity":
        lint = True  # a bad CA or responder certificate is too costly to find out about later
    if not subject and not san_types:
        raise _err(name, "subject", "empty", "neither a subject attribute nor a SAN type is allowed")
    return Profile(
        name=name,
        kind=kind,
        key_types=key_types,
        subject=subject,
        san_types=san_types,
        san_required=san_required,
        key_usage=key_usage,
        extended_key_usage=eku,
        ca=ca,
        path_length=path_length,
        crl_dp=crl_dp,
        aia=aia,
        ocsp_nocheck=ocsp_nocheck,
        policies=policies,
        max_validity_days=days,
        lint=lint,
        cabf=_bool(name, "cabf", get("cabf")),
        allow_confusable_names=_bool(name, "allow_confusable_names", get("allow_confusable_names")),
        unique_subject=_bool(name, "unique_subject", get("unique_subject")),
        unique_key=_bool(name, "unique_key", get("unique_key")),
    )


@functools.cache
def _builtins() -> tuple[tuple[str, Profile], ...]:
    base = importlib.resources.files("policy") / "profiles"
    out = []
    for name in BUILTIN_NAMES:
        out.append((name, load_profile_text(name, (base / f"{name}.toml").read_text(encoding="utf-8"))))
    return tuple(out)


def builtin_profiles() -> dict[str, Profile]:
    """The shipped profiles, by name (a fresh dict each call; the profiles are immutable)."""
    return dict(_builtins())


def load_profiles(overrides: dict[str, str]) -> dict[str, Profile]:
    """The builtin profiles, replaced or extended by operator TOML texts (name -> text)."""
    profiles = builtin_profiles()
    for name, text in overrides.items():
        profiles[name] = load_profile_text(name, text)
    return profiles

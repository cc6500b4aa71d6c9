"""Profiles: the shipped ones load, operator TOML is validated key by key."""

from __future__ import annotations

import pytest

from policy.errors import PolicyError
from policy.profiles import BUILTIN_NAMES, KEY_TYPES, Profile, SubjectRule, builtin_profiles, load_profile_text, load_profiles

MINIMAL = """
kind = "end-entity"
key_types = ["p256"]
key_usage = ["digital_signature"]
max_validity_days = 30
[[subject]]
attr = "CN"
presence = "required"
"""


def test_every_builtin_profile_loads():
    profiles = builtin_profiles()
    assert set(profiles) == set(BUILTIN_NAMES)
    for name, p in profiles.items():
        assert isinstance(p, Profile) and p.name == name
        assert set(p.key_types) <= set(KEY_TYPES)
        if p.kind != "end-entity":
            assert p.lint


def test_builtin_shapes():
    p = builtin_profiles()
    assert p["root-ca"].ca and p["root-ca"].path_length is None and not p["root-ca"].crl_dp and not p["root-ca"].aia
    assert p["root-ca"].extended_key_usage == () and p["root-ca"].max_validity_days >= 25 * 365
    assert p["sub-ca"].ca and p["sub-ca"].path_length == 0 and p["sub-ca"].crl_dp and p["sub-ca"].aia
    assert p["ocsp-responder"].ocsp_nocheck and p["ocsp-responder"].extended_key_usage == ("OCSPSigning",)
    assert p["ocsp-responder"].max_validity_days <= 30
    assert p["tls-server"].san_required and set(p["tls-server"].san_types) == {"dns", "ip"}
    assert "ed25519" not in p["user-enc"].key_types


def test_builtin_profiles_returns_a_fresh_dict():
    a = builtin_profiles()
    a.pop("root-ca")
    assert "root-ca" in builtin_profiles()


def test_minimal_profile_defaults():
    p = load_profile_text("mini", MINIMAL)
    assert p.subject == (SubjectRule("CN", "required"),)
    assert p.san_types == () and not p.ca and not p.lint and p.path_length is None


@pytest.mark.parametrize("key", ["colour", "key_usages", "maxValidityDays"])
def test_unknown_key_is_refused_and_named(key):
    with pytest.raises(PolicyError) as e:
        load_profile_text("mini", MINIMAL.replace('kind = "end-entity"', f'kind = "end-entity"\n{key} = 1'))
    assert e.value.field == f"profile mini: {key}"
    assert e.value.rule == "unknown-key"
    assert key in str(e.value)


def test_unknown_key_in_subject_rule_is_named():
    with pytest.raises(PolicyError) as e:
        load_profile_text("mini", MINIMAL + 'colour = "blue"\n')
    assert e.value.field == "profile mini: subject[0].colour"


@pytest.mark.parametrize(
    "change, key, rule",
    [
        (('"p256"', '"p521"'), "key_types", "value"),
        (('"digital_signature"', '"sign_everything"'), "key_usage", "value"),
        (('"digital_signature"', '"key_cert_sign"'), "key_usage", "ca"),
        (("max_validity_days = 30", "max_validity_days = 0"), "max_validity_days", "value"),
        (("max_validity_days = 30", 'max_validity_days = "30"'), "max_validity_days", "value"),
        (('presence = "required"', 'presence = "fixed"'), "subject[0].value", "required"),
        (('attr = "CN"', 'attr = "UID"'), "subject[0].attr", "value"),
        (('kind = "end-entity"', 'kind = "sub-ca"'), "key_usage", "ca"),
        (('kind = "end-entity"', 'kind = "end-entity"\nca = true'), "ca", "conflict"),
        (('kind = "end-entity"', 'kind = "end-entity"\npath_length = 1'), "path_length", "conflict"),
        (('kind = "end-entity"', 'kind = "end-entity"\nsan_required = true'), "san_required", "conflict"),
        (('kind = "end-entity"', 'kind = "end-entity"\npolicies = ["not.an.oid"]'), "policies", "value"),
        (('kind = "end-entity"', 'kind = "end-entity"\nextended_key_usage = ["fooAuth"]'), "extended_key_usage", "value"),
        (('kind = "end-entity"', 'kind = "end-entity"\nocsp_nocheck = true'), "ocsp_nocheck", "conflict"),
        (('kind = "end-entity"', 'kind = "end-entity"\nlint = "yes"'), "lint", "type"),
        (('kind = "end-entity"\n', ""), "kind", "required"),
        (("max_validity_days = 30", "max_validity_days = 30\n[["), "toml", "syntax"),
    ],
)
def test_invalid_profiles_are_refused_naming_the_key(change, key, rule):
    text = MINIMAL.replace(*change)
    assert text != MINIMAL
    with pytest.raises(PolicyError) as e:
        load_profile_text("mini", text)
    assert (e.value.field, e.value.rule) == (f"profile mini: {key}", rule)


def test_fixed_value_is_checked_like_a_requested_one():
    text = MINIMAL + '[[subject]]\nattr = "C"\npresence = "fixed"\nvalue = "France"\n'
    with pytest.raises(PolicyError) as e:
        load_profile_text("mini", text)
    assert e.value.field == "profile mini: subject.C"


def test_ca_and_ocsp_kinds_force_lint():
    text = """
kind = "ocsp-responder"
key_types = ["p256"]
key_usage = ["digital_signature"]
extended_key_usage = ["OCSPSigning"]
max_validity_days = 7
lint = false
[[subject]]
attr = "CN"
presence = "required"
"""
    assert load_profile_text("ocsp", text).lint is True


def test_load_profiles_replaces_and_extends():
    profiles = load_profiles({"tls-server": MINIMAL, "machine": MINIMAL})
    assert profiles["tls-server"].max_validity_days == 30
    assert profiles["machine"].name == "machine"
    assert profiles["root-ca"] == builtin_profiles()["root-ca"]


def test_bad_override_name_is_refused():
    with pytest.raises(PolicyError):
        load_profiles({"../etc/passwd": MINIMAL})


def test_error_string_format():
    e = PolicyError("san", "type", "not allowed")
    assert str(e) == "san: not allowed [type]"
    assert (e.field, e.rule, e.message) == ("san", "type", "not allowed")

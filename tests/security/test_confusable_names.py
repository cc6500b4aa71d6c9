"""Subject names that can pass for others (UTS #39): bidi and invisible characters, mixed-script
look-alikes and mixed digit systems are refused by default, per profile, in the Factory and the CIS."""

from __future__ import annotations

import importlib.resources

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from policy.csr import check_csr
from policy.errors import PolicyError
from policy.names import check_name_text, script_of
from policy.profiles import builtin_profiles, load_profile_text

REFUSED = [
    ("Alice\u202eecilA", "bidi-control"),  # RIGHT-TO-LEFT OVERRIDE
    ("Bob\u200fSmith", "bidi-control"),  # RIGHT-TO-LEFT MARK
    ("ad\u200bmin", "invisible"),  # ZERO WIDTH SPACE
    ("ad\u2060min", "invisible"),  # WORD JOINER
    ("ad\u00admin", "invisible"),  # SOFT HYPHEN
    ("John\u00a0Smith", "invisible"),  # NO-BREAK SPACE
    ("Han\u3164gul", "invisible"),  # HANGUL FILLER
    ("x\ufe0fy", "invisible"),  # VARIATION SELECTOR-16
    ("p\u0430ypal", "mixed-script"),  # Cyrillic a in a Latin word
    ("\u0391lice", "mixed-script"),  # Greek capital alpha
    ("\u13aaDMIN", "mixed-script"),  # Cherokee A
    ("Ivan \u0418\u0432\u0430\u043d", "mixed-script"),
    ("Agent 00\u0667", "mixed-digits"),  # Arabic-Indic seven after ASCII digits
]
ACCEPTED = [
    "Jean-\u00c9mile Dupont", "Fran\u00e7ois O'Neil (Ops) 2", "\u0418\u0432\u0430\u043d \u041f\u0435\u0442\u0440\u043e\u0432",
    "\u0391\u03bb\u03ad\u03be\u03b1\u03bd\u03b4\u03c1\u03bf\u03c2", "\u5c71\u7530 \u592a\u90ce", "\u5c71\u7530 \u30bf\u30ed\u30a6 Yamada",
    "\u0645\u062d\u0645\u062f \u0639\u0644\u064a", "\ud64d\uae38\ub3d9 Hong", "Zo\u00eb Tr\u00e2n-Nguy\u1ec5n",
]


@pytest.mark.parametrize(("value", "rule"), REFUSED)
def test_look_alikes_refused(value, rule):
    with pytest.raises(PolicyError) as e:
        check_name_text("subject.CN", value)
    assert e.value.rule == rule and e.value.field == "subject.CN"
    assert "U+" in e.value.message or "scripts" in e.value.message


@pytest.mark.parametrize("value", ACCEPTED)
def test_real_names_in_one_writing_system_accepted(value):
    check_name_text("subject.CN", value)


def test_script_table():
    assert [script_of(c) for c in "a\u0430\u03b1\u13aa\u5c71\u30bf\u3042\ud64d7 "] == [
        "Latin", "Cyrillic", "Greek", "Cherokee", "Han", "Katakana", "Hiragana", "Hangul", None, None]
    assert script_of("\u2d30") == "Tifinagh"  # outside the table: the first word of the name


def _csr(cn: str, email: str = "a@example.org") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_user_profiles_refuse_by_default_and_a_profile_may_allow():
    profiles = builtin_profiles()
    for name in ("user-auth", "user-sign", "user-enc"):
        for cn, rule in (("Alice\u202eecilA", "bidi-control"), ("Ali\u200bce", "invisible"), ("p\u0430ypal", "mixed-script")):
            with pytest.raises(PolicyError) as e:
                check_csr(_csr(cn), profiles[name])
            assert (e.value.field, e.value.rule) == ("subject.CN", rule), name
        assert check_csr(_csr("\u0418\u0432\u0430\u043d \u041f\u0435\u0442\u0440\u043e\u0432"), profiles[name]).subject
    text = (importlib.resources.files("policy") / "profiles" / "user-auth.toml").read_text()
    lax = load_profile_text("user-auth-lax", "allow_confusable_names = true\n" + text)
    assert lax.allow_confusable_names and not profiles["user-auth"].allow_confusable_names
    assert check_csr(_csr("p\u0430ypal"), lax).subject == (("CN", "p\u0430ypal"),)
    with pytest.raises(PolicyError) as e:
        load_profile_text("bad", "allow_confusable_names = \"yes\"\n" + text)
    assert e.value.rule == "type"


def test_issuance_refuses_look_alikes(appliance_factory, tmp_path):
    a = appliance_factory(start=False)
    (a.home / "profiles").mkdir(exist_ok=True)
    text = (importlib.resources.files("policy") / "profiles" / "user-auth.toml").read_text()
    (a.home / "profiles" / "user-auth-intl.toml").write_text("allow_confusable_names = true\n" + text)
    a.start()
    for i, (profile, cn) in enumerate((("user-auth", "Alice\u202eecilA"), ("user-sign", "ad\u200bmin"),
                                       ("user-auth", "p\u0430ypal"), ("user-auth-intl", "p\u0430ypal"))):
        p = tmp_path / f"{i}.csr"
        p.write_bytes(_csr(cn))
        r = a.cli("issue", "--ca", "issuing", "--profile", profile, "--csr", str(p), check=False)
        if profile == "user-auth-intl":  # the operator's profile allows them: issued
            assert r.returncode == 0, r.stderr
            cert = x509.load_pem_x509_certificate(r.stdout)
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        else:
            assert r.returncode == 1 and b"subject.CN" in r.stderr and b"Traceback" not in r.stderr, r.stderr
            assert r.stderr.count(b"\n") == 1

"""Distribution rules are validated completely at load: every bad rule is refused with its name and key."""

from __future__ import annotations

import pytest

from appliance import config as C

GOOD_LDAP = """
[[distribution.rule]]
name = "directory"
url = "ldap://ldap.example.org"
bind-dn = "cn=donjon,dc=example,dc=org"
secret-file = "s"
publish = ["ca-cert", "certs", "crl"]
dn = "cn={CN},ou=people,dc=example,dc=org"
ca-dn = "cn={CN},ou=CAs,dc=example,dc=org"
"""


def load(tmp_path, text: str, secret: str | None = "pw\n"):
    (tmp_path / "donjon.toml").write_text(text)
    if secret is not None:
        (tmp_path / "s").write_text(secret)
    cfg = C.load(str(tmp_path))
    return C.dist_rules(str(tmp_path), cfg, with_secrets=True), C.dist_rules(str(tmp_path), cfg, with_secrets=False)


def test_good_rules_and_secrets_only_for_the_agent(tmp_path):
    text = GOOD_LDAP + """
[[distribution.rule]]
name = "web"
url = "https://pki.example.org/pub/{name}"
publish = ["crl", "issued-serials"]
secret-file = "s"
"""
    agent, factory = load(tmp_path, text)
    assert [r.name for r in agent] == ["directory", "web"]
    assert agent[0].secret == "pw" and factory[0].secret is None and factory[1].secret is None
    assert agent[0].entry_attributes == {"sn": "{CN}"}


@pytest.mark.parametrize("edit,message", [
    (("ldap://ldap.example.org", "ftp://x"), "url: want ldap://"),
    (('publish = ["ca-cert", "certs", "crl"]', 'publish = ["delta-crl"]'), "delta-crl, but no CA of the rule has delta"),
    (('publish = ["ca-cert", "certs", "crl"]', 'publish = ["issued-serials"]'), "no LDAP attribute"),
    (('dn = "cn={CN},ou=people,dc=example,dc=org"', 'dn = "cn={nickname},dc=x"'), "unknown field {nickname}"),
    (('dn = "cn={CN},ou=people,dc=example,dc=org"', ''), "needs a dn template"),
    (("ldap://ldap.example.org", "ldap://user:pw@ldap.example.org"), "credentials belong in secret-file"),
    (('name = "directory"', 'name = "bad name!"'), "name must be"),
    (('secret-file = "s"', 'secret-file = "missing"'), "secret-file"),
    (('secret-file = "s"', ''), "bind-dn needs a secret-file"),
    (('publish = ["ca-cert", "certs", "crl"]', 'publish = ["certs"]\nmethod = "POST"'), "username/method are for HTTP"),
])
def test_bad_ldap_rules_refused(tmp_path, edit, message):
    old, new = edit
    with pytest.raises(C.ConfigError) as e:
        load(tmp_path, GOOD_LDAP.replace(old, new))
    assert message in str(e.value)
    assert "donjon.toml: [[distribution.rule]] 'directory'" in str(e.value) or "'bad name!'" in str(e.value)


def test_http_rules_refuse_ldap_things(tmp_path):
    for extra, message in (('publish = ["certs"]', "end-entity certificates go to LDAP only"),
                           ('publish = ["crl"]\ndn = "cn=x"', "are for LDAP rules"),
                           ('publish = ["crl"]\nurl2 = 1', "unknown field"),
                           ('publish = []', "at least one")):
        text = f'[[distribution.rule]]\nname = "web"\nurl = "http://h/{{ca}}"\n{extra}\n'
        with pytest.raises(C.ConfigError) as e:
            load(tmp_path, text)
        assert message in str(e.value)


def test_duplicate_rule_names_and_empty_secret(tmp_path):
    with pytest.raises(C.ConfigError, match="second rule"):
        load(tmp_path, GOOD_LDAP + GOOD_LDAP)
    with pytest.raises(C.ConfigError, match="is empty"):
        load(tmp_path, GOOD_LDAP, secret="\n")


def test_delta_crl_rules_need_a_ca_with_deltas(tmp_path):
    text = GOOD_LDAP.replace('publish = ["ca-cert", "certs", "crl"]', 'publish = ["ca-cert", "certs", "crl", "delta-crl"]')
    agent, _ = load(tmp_path, "[crl]\ndelta = { root = 60 }\n" + text)
    assert "delta-crl" in agent[0].publish
    with pytest.raises(C.ConfigError, match="no CA of the rule has delta CRLs"):
        load(tmp_path, "[crl]\ndelta = { root = 60 }\n" + text.replace("[[distribution.rule]]", "[[distribution.rule]]\ncas = [\"issuing\"]", 1))

"""Pure parts of issue 11 items 1 and 16: the CA issuance policy, and URI SANs under the pre-sign lint."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from policy import certs
from policy.capolicy import CaPolicy, default_policy, named_policy
from policy.csr import check_uri
from policy.errors import PolicyError
from policy.lint import lint_certificate
from policy.profiles import builtin_profiles

P = builtin_profiles()
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
CA_KEY = ec.generate_private_key(ec.SECP256R1())
LEAF = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_default_and_named_policies():
    root, issuing = default_policy(True), default_policy(False)
    assert root.allows(P["sub-ca"]) and root.allows(P["ocsp-responder"]) and not root.allows(P["tls-server"])
    assert not issuing.allows(P["sub-ca"]) and not issuing.allows(P["root-ca"]) and issuing.allows(P["tls-client"])
    named = named_policy(["tls-client"], P)
    assert named.allows(P["tls-client"]) and not named.allows(P["tls-server"]) and not named.allows(P["sub-ca"])
    assert CaPolicy.decode(named.encode()) == named and CaPolicy.decode(root.encode()) == root
    for bad in (["nope"], [], ["root-ca"]):
        with pytest.raises(PolicyError):
            named_policy(bad, P)
    for junk in (b"", b"{}", b'{"v":1,"kinds":["wizard"],"profiles":[]}', b'{"v":2,"kinds":[],"profiles":[]}', b"\xff"):
        with pytest.raises(PolicyError):
            CaPolicy.decode(junk)


def _leaf(uri: str) -> bytes:
    """A tls-client certificate built by policy/ (as the CIS does), signed by a throwaway CA key."""
    ca_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "URI Test CA")])
    spki = CA_KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    issuer = certs.IssuerInfo(name_der=ca_name.public_bytes(), key_type="p256", spki_der=spki,
                              not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=3650), path_length=0,
                              crl_url="http://127.0.0.1/crl/x.crl", ocsp_url="http://127.0.0.1/ocsp",
                              ca_issuers_url="http://127.0.0.1/ca/x.crt")
    spec = certs.IssueSpec(profile=P["tls-client"], public_key_der=LEAF, subject=(("CN", "web"),), sans=(("uri", uri),),
                           serial=0x1234567890ABCDEF01, not_before=NOW, not_after=NOW + dt.timedelta(days=30))
    return certs.build_tbs(spec, issuer).sign(CA_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _raw_leaf(uri: str) -> bytes:
    """The same certificate with a URI policy/ would refuse, made directly (what the lint alone sees)."""
    good = x509.load_der_x509_certificate(_leaf("spiffe://example.org/x"))
    b = (x509.CertificateBuilder().subject_name(good.subject).issuer_name(good.issuer).public_key(good.public_key())
         .serial_number(good.serial_number).not_valid_before(good.not_valid_before_utc).not_valid_after(good.not_valid_after_utc))
    for ext in good.extensions:
        value = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]) if isinstance(ext.value, x509.SubjectAlternativeName) else ext.value
        b = b.add_extension(value, ext.critical)
    return b.sign(CA_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("uri", ["spiffe://example.org/ns/prod/sa/web", "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
                                 "urn:example:device-42", "https://svc.example.org/id"])
def test_spiffe_and_urn_sans_pass_the_lint(uri):
    check_uri(uri)
    assert lint_certificate(_leaf(uri), P["tls-client"]) == []


@pytest.mark.parametrize("uri", ["spiffe://Example.org/web", "spiffe://example.org/web?x=1", "spiffe://example.org/",
                                 "urn:uuid:not-a-uuid", "urn:x:y"])
def test_malformed_spiffe_and_urn_are_still_refused(uri):
    with pytest.raises(PolicyError, match=r"\[uri\]"):
        check_uri(uri)  # refused at the CSR check
    # and the lint, which decides on its own, still gates the signature (the filter is no blanket pass)
    assert any("pkix.invalid_uri_syntax" in f for f in lint_certificate(_raw_leaf(uri), P["tls-client"]))


def test_other_uri_findings_are_not_filtered():
    assert any("pkix.invalid_uri_syntax" in f for f in lint_certificate(_raw_leaf("mailto:a@example.org"), P["tls-client"]))


def test_allowed_profiles_in_the_ceremony_file_and_donjon_toml(tmp_path):
    from appliance import config as C
    (tmp_path / "c.toml").write_text('[root]\nname = "root"\nkey-type = "p256"\nsubject = { CN = "R" }\nvalidity-days = 10\n'
                                     '[[issuing]]\nname = "clients"\nkey-type = "p256"\nsubject = { CN = "C" }\nvalidity-days = 5\n'
                                     'allowed-profiles = ["tls-client"]\n')
    spec = C.load_ceremony(str(tmp_path / "c.toml"))
    assert spec.root.allowed_profiles == () and spec.issuing[0].allowed_profiles == ("tls-client",)
    (tmp_path / "donjon.toml").write_text('[ca-profiles]\nclients = ["tls-client"]\n')
    cfg = C.load(str(tmp_path))
    assert cfg.ca_profiles == {"clients": ("tls-client",)}
    C.check_ca_profiles(str(tmp_path), cfg, {})
    (tmp_path / "donjon.toml").write_text('[ca-profiles]\nclients = ["tls-clinet"]\n')
    with pytest.raises(C.ConfigError, match="unknown profile 'tls-clinet'"):
        C.check_ca_profiles(str(tmp_path), C.load(str(tmp_path)), {})
    (tmp_path / "donjon.toml").write_text('[ca-profiles]\nclients = []\n')
    with pytest.raises(C.ConfigError):
        C.load(str(tmp_path))

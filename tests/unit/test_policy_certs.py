"""build_tbs: every builtin profile yields lint-clean certificates; every constraint refuses."""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from policy.certs import IssueSpec, IssuerInfo, build_tbs, name_from_der, signature_hash
from policy.errors import PolicyError
from policy.lint import lint_certificate
from policy.profiles import builtin_profiles, load_profile_text

P = builtin_profiles()
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
DAY = dt.timedelta(days=1)
SEC = dt.timedelta(seconds=1)
OPENSSL = "/usr/bin/openssl"

KEYGEN = {
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def sign(builder: x509.CertificateBuilder, key, key_type: str) -> x509.Certificate:
    return builder.sign(key, signature_hash(key_type))


def info(cert: x509.Certificate, key_type: str, **kw) -> IssuerInfo:
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    pub = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    defaults = dict(
        crl_url="http://pki.example.com/sub.crl",
        ocsp_url="http://ocsp.example.com/",
        ca_issuers_url="http://pki.example.com/sub.der",
    )
    defaults.update(kw)
    return IssuerInfo(
        cert.subject.public_bytes(), key_type, pub, cert.not_valid_before_utc, cert.not_valid_after_utc, bc.path_length, **defaults
    )


class CA:
    def __init__(self, cert, key, key_type):
        self.cert, self.key, self.key_type = cert, key, key_type

    def info(self, **kw) -> IssuerInfo:
        return info(self.cert, self.key_type, **kw)

    def issue(self, spec: IssueSpec, **kw) -> x509.Certificate:
        return sign(build_tbs(spec, self.info(**kw)), self.key, self.key_type)


def spec(profile: str, key, subject=(), sans=(), days=None, serial=0x1234_5678_9ABC_DEF1, **kw) -> IssueSpec:
    p = P[profile] if isinstance(profile, str) else profile
    days = days if days is not None else min(p.max_validity_days, 300)
    return IssueSpec(p, spki(key), tuple(subject), tuple(sans), serial, NOW - DAY, NOW - DAY + dt.timedelta(days=days) - SEC, **kw)


def make_root(key_type="p384", **kw) -> CA:
    key = KEYGEN[key_type]()
    s = IssueSpec(
        P["root-ca"], spki(key), (("CN", "Donjon Test Root"), ("O", "Donjon"), ("C", "FR")), (), 1, NOW - 2 * DAY, NOW + 3650 * DAY, **kw
    )
    return CA(sign(build_tbs(s, None), key, key_type), key, key_type)


def make_sub(root: CA, key_type="p256", **kw) -> CA:
    key = KEYGEN[key_type]()
    s = spec("sub-ca", key, (("CN", "Donjon Test Sub"), ("O", "Donjon")), days=2000, **kw)
    return CA(root.issue(s), key, key_type)


@pytest.fixture(scope="module")
def root() -> CA:
    return make_root()


@pytest.fixture(scope="module")
def sub(root) -> CA:
    return make_sub(root)


LEAVES = {
    "tls-server": ((), (("dns", "www.example.com"), ("dns", "*.api.example.com"), ("ip", "8.8.8.8"))),
    "tls-client": ((("CN", "client-7"), ("O", "Example")), (("dns", "client7.example.com"),)),
    "user-auth": ((("CN", "Alice Martin"), ("C", "FR"), ("serialNumber", "E12345")), (("email", "alice@example.com"),)),
    "user-sign": ((("CN", "Alice Martin"),), (("email", "alice@example.com"),)),
    "user-enc": ((("CN", "Alice Martin"),), (("email", "alice@example.com"),)),
    "ocsp-responder": ((("CN", "Donjon OCSP"),), ()),
}


def test_root_and_sub_are_lint_clean(root, sub):
    assert lint_certificate(der(root.cert), P["root-ca"]) == []
    assert lint_certificate(der(root.cert), P["root-ca"], der(root.cert)) == []
    assert lint_certificate(der(sub.cert), P["sub-ca"], der(root.cert)) == []


@pytest.mark.parametrize("root_type", ["rsa2048", "ed25519"])
def test_other_root_key_types_are_lint_clean(root_type):
    r = make_root(root_type)
    s = make_sub(r, "p384")
    assert lint_certificate(der(r.cert), P["root-ca"]) == []
    assert lint_certificate(der(s.cert), P["sub-ca"], der(r.cert)) == []


@pytest.mark.parametrize(
    "profile, key_type",
    [(p, k) for p in sorted(LEAVES) for k in ("rsa2048", "p256", "ed25519") if k in P[p].key_types],
)
def test_every_profile_is_lint_clean(sub, profile, key_type):
    subject, sans = LEAVES[profile]
    cert = sub.issue(spec(profile, KEYGEN[key_type](), subject, sans))
    assert lint_certificate(der(cert), P[profile], der(sub.cert)) == []


def test_extensions_and_subject_order(sub):
    key = KEYGEN["p256"]()
    cert = sub.issue(spec("user-auth", key, *LEAVES["user-auth"]))
    assert [a.oid for a in cert.subject] == [NameOID.COUNTRY_NAME, NameOID.COMMON_NAME, NameOID.SERIAL_NUMBER]
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(sub.key.public_key()).digest
    assert cert.issuer.public_bytes() == sub.cert.subject.public_bytes()
    dp = ext.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name[0].value == "http://pki.example.com/sub.crl"
    aia = {a.access_method: a.access_location.value for a in ext.get_extension_for_class(x509.AuthorityInformationAccess).value}
    assert set(aia.values()) == {"http://ocsp.example.com/", "http://pki.example.com/sub.der"}
    assert not ext.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_empty_subject_makes_san_critical(sub):
    cert = sub.issue(spec("tls-server", KEYGEN["p256"](), *LEAVES["tls-server"]))
    assert len(cert.subject) == 0
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_ocsp_responder_has_nocheck(sub):
    cert = sub.issue(spec("ocsp-responder", KEYGEN["p256"](), *LEAVES["ocsp-responder"], days=30))
    assert cert.extensions.get_extension_for_oid(ExtensionOID.OCSP_NO_CHECK)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [x509.ExtendedKeyUsageOID.OCSP_SIGNING]


def test_user_enc_key_usage_follows_key_type(sub):
    rsa_cert = sub.issue(spec("user-enc", KEYGEN["rsa2048"](), *LEAVES["user-enc"]))
    ec_cert = sub.issue(spec("user-enc", KEYGEN["p256"](), *LEAVES["user-enc"]))
    rku = rsa_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    eku = ec_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert rku.key_encipherment and not rku.key_agreement
    assert eku.key_agreement and not eku.key_encipherment


def _openssl_verify(tmp_path, root, chain, leaf, *extra) -> subprocess.CompletedProcess:
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    cmd = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem")]
    if chain:
        cmd += ["-untrusted", str(tmp_path / "chain.pem")]
    return subprocess.run(cmd + list(extra) + [str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)


def test_openssl_verifies_root_sub_tls_server(tmp_path, root, sub):
    leaf = sub.issue(spec("tls-server", KEYGEN["p256"](), *LEAVES["tls-server"]))
    r = _openssl_verify(tmp_path, root.cert, [sub.cert], leaf, "-purpose", "sslserver")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leaf.pem: OK" in r.stdout


def test_openssl_verifies_name_constrained_sub(tmp_path, root):
    sub = make_sub(root, permitted_dns=("example.com",))
    nc = sub.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and [g.value for g in nc.value.permitted_subtrees] == ["example.com"]
    leaf = sub.issue(spec("tls-server", KEYGEN["p256"](), *LEAVES["tls-server"][:1], (("dns", "www.example.com"),)), permitted_dns=("example.com",))
    assert lint_certificate(der(sub.cert), P["sub-ca"], der(root.cert)) == []
    r = _openssl_verify(tmp_path, root.cert, [sub.cert], leaf, "-purpose", "sslserver")
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ refusals


def _refused(s: IssueSpec, issuer: IssuerInfo | None) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        build_tbs(s, issuer)
    return e.value


def test_validity_beyond_issuer(sub):
    s = spec("tls-client", KEYGEN["p256"](), *LEAVES["tls-client"])
    end = sub.cert.not_valid_after_utc
    late = replace(s, not_before=end - 10 * DAY, not_after=end + SEC)
    e = _refused(late, sub.info())
    assert (e.field, e.rule) == ("validity.not_after", "issuer")
    early = replace(s, not_before=sub.cert.not_valid_before_utc - SEC)
    e = _refused(early, sub.info())
    assert (e.field, e.rule) == ("validity.not_before", "issuer")


def test_validity_beyond_profile_max(sub):
    p = P["tls-server"]
    s = spec(p, KEYGEN["p256"](), *LEAVES["tls-server"], days=p.max_validity_days)
    build_tbs(s, sub.info())  # exactly the maximum (inclusive of both ends) is fine
    e = _refused(replace(s, not_after=s.not_after + SEC), sub.info())
    assert (e.field, e.rule) == ("validity", "profile-max")


def test_validity_order_and_timezone(sub):
    s = spec("tls-client", KEYGEN["p256"](), *LEAVES["tls-client"])
    assert _refused(replace(s, not_after=s.not_before), sub.info()).rule == "order"
    assert _refused(replace(s, not_before=s.not_before.replace(tzinfo=None)), sub.info()).rule == "timezone"


def test_pathlen_zero_issuer_cannot_issue_a_ca(sub):
    assert sub.info().path_length == 0
    e = _refused(spec("sub-ca", KEYGEN["p256"](), (("CN", "Too Deep"),)), sub.info())
    assert (e.field, e.rule) == ("path_length", "issuer-zero")


def test_requested_pathlen_must_stay_below_issuer_and_profile():
    root = make_root(path_length=1)
    unlimited_sub = load_profile_text(
        "sub-any",
        '''
kind = "sub-ca"
key_types = ["p256"]
key_usage = ["key_cert_sign", "crl_sign"]
max_validity_days = 3650
[[subject]]
attr = "CN"
presence = "required"
''')
    key = KEYGEN["p256"]()
    e = _refused(spec(unlimited_sub, key, (("CN", "X"),), path_length=1), root.info())
    assert (e.field, e.rule) == ("path_length", "issuer")
    e = _refused(spec(unlimited_sub, key, (("CN", "X"),)), root.info())  # unlimited under pathlen 1
    assert (e.field, e.rule) == ("path_length", "issuer")
    build_tbs(spec(unlimited_sub, key, (("CN", "X"),), path_length=0), root.info())
    e = _refused(spec("sub-ca", key, (("CN", "X"),), path_length=1), None)
    assert e.field == "path_length" or e.field == "issuer"
    e = _refused(spec("sub-ca", key, (("CN", "X"),), path_length=3), root.info())
    assert (e.field, e.rule) == ("path_length", "profile")
    e = _refused(spec("tls-client", key, *LEAVES["tls-client"], path_length=0), root.info())
    assert (e.field, e.rule) == ("path_length", "not-ca")


@pytest.mark.parametrize(
    "permitted, excluded, sans, field",
    [
        (("example.com",), (), (("dns", "www.example.org"),), "san"),
        ((".example.com",), (), (("dns", "example.com"),), "san"),
        (("example.com",), (), (("dns", "badexample.com"),), "san"),
        ((), ("secret.example.com",), (("dns", "a.secret.example.com"),), "san"),
        ((), ("secret.example.com",), (("dns", "*.example.com"),), "san"),
        (("foo.example.com",), (), (("dns", "*.example.com"),), "san"),
    ],
)
def test_name_constraint_violations(sub, permitted, excluded, sans, field):
    s = spec("tls-server", KEYGEN["p256"](), (), sans)
    e = _refused(s, sub.info(permitted_dns=permitted, excluded_dns=excluded))
    assert (e.field, e.rule) == (field, "name-constraints")


def test_name_constraints_allow_names_inside(sub):
    s = spec("tls-server", KEYGEN["p256"](), (), (("dns", "*.www.example.com"), ("dns", "example.com"), ("ip", "8.8.8.8")))
    build_tbs(s, sub.info(permitted_dns=("example.com",), excluded_dns=("secret.example.com",)))


def test_name_constraints_apply_to_cn_and_to_sub_ca_constraints(root):
    cn_profile = load_profile_text(
        "tls-cn",
        """
kind = "end-entity"
key_types = ["p256"]
key_usage = ["digital_signature"]
extended_key_usage = ["serverAuth"]
san_types = ["dns"]
san_required = true
max_validity_days = 90
[[subject]]
attr = "CN"
presence = "optional"
""",
    )
    key = KEYGEN["p256"]()
    sub_info = make_sub(root).info(permitted_dns=("example.com",))
    e = _refused(spec(cn_profile, key, (("CN", "www.example.org"),), (("dns", "www.example.org"),)), sub_info)
    assert e.rule == "name-constraints"
    e = _refused(spec(cn_profile, key, (("CN", "www.example.com"),), (("dns", "mail.example.com"),)), sub_info)
    assert (e.field, e.rule) == ("subject.CN", "cn-not-in-san")
    r = make_root(path_length=2)
    e = _refused(spec("sub-ca", key, (("CN", "X"),), permitted_dns=("example.org",)), r.info(permitted_dns=("example.com",)))
    assert (e.field, e.rule) == ("name_constraints", "name-constraints")


def test_serial_rules(sub):
    s = spec("tls-client", KEYGEN["p256"](), *LEAVES["tls-client"])
    for bad, rule in [(0, "positive"), (-5, "positive"), (1 << 159, "length"), (True, "positive")]:
        assert _refused(replace(s, serial=bad), sub.info()).rule == rule
    build_tbs(replace(s, serial=(1 << 159) - 1), sub.info())


def test_key_and_names_rechecked_at_build(sub):
    s = spec("tls-server", KEYGEN["ed25519"](), *LEAVES["tls-server"])
    assert _refused(s, sub.info()).rule == "key-type"
    s = spec("tls-server", KEYGEN["p256"](), (), (("email", "a@example.com"),))
    assert (_refused(s, sub.info()).field, _refused(s, sub.info()).rule) == ("san", "type")
    s = spec("tls-client", KEYGEN["p256"](), (("O", "Example"),), ())
    assert _refused(s, sub.info()).field == "subject.CN"


def test_fixed_attributes_are_filled_in_and_enforced(sub):
    p = load_profile_text(
        "corp",
        """
kind = "end-entity"
key_types = ["p256"]
key_usage = ["digital_signature"]
extended_key_usage = ["clientAuth"]
max_validity_days = 90
[[subject]]
attr = "CN"
presence = "required"
[[subject]]
attr = "O"
presence = "fixed"
value = "Example Corp"
[[subject]]
attr = "C"
presence = "fixed"
value = "FR"
""",
    )
    key = KEYGEN["p256"]()
    cert = sub.issue(spec(p, key, (("CN", "bob"),)))
    assert cert.subject.rfc4514_string() == "CN=bob,O=Example Corp,C=FR"
    assert lint_certificate(der(cert), p, der(sub.cert)) == []
    e = _refused(spec(p, key, (("CN", "bob"), ("O", "Evil Corp"))), sub.info())
    assert (e.field, e.rule) == ("subject.O", "fixed")


def test_root_rules():
    key = KEYGEN["p256"]()
    root = make_root()
    e = _refused(spec("root-ca", key, (("CN", "R"),), days=3650), root.info())
    assert e.field == "issuer"
    e = _refused(spec("sub-ca", key, (("CN", "R"),)), None)
    assert e.field == "issuer"


def test_issuer_name_is_reproduced_byte_for_byte():
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Printable Org", _type=x509.name._ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.COMMON_NAME, "Dé UTF8"),
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example"),
        ]
    )
    assert name_from_der(name.public_bytes()).public_bytes() == name.public_bytes()
    with pytest.raises(PolicyError):
        name_from_der(b"\x30\x05garbage")


def test_signature_hash():
    assert signature_hash("rsa2048").name == "sha256"
    assert signature_hash("p256").name == "sha256"
    assert signature_hash("rsa3072").name == "sha256"
    assert signature_hash("rsa4096").name == "sha384"
    assert signature_hash("p384").name == "sha384"
    assert signature_hash("ed25519") is None
    with pytest.raises(PolicyError):
        signature_hash("dsa1024")

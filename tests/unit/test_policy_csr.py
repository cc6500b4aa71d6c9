"""CSR and public-key checks against the crafted requests in tests/data/csr (see make.py there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.csr import check_csr, check_public_key
from policy.errors import PolicyError
from policy.profiles import KEY_TYPES, builtin_profiles

DATA = Path(__file__).resolve().parent.parent / "data" / "csr"
P = builtin_profiles()


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


# file -> (profile, field, rule)
BAD = {
    "bad-signature.der": ("tls-server", "csr", "signature"),
    "bad-sha1-signature.der": ("tls-server", "csr", "signature-algorithm"),
    "bad-rsa-exponent-3.der": ("tls-server", "public_key", "exponent"),
    "bad-rsa-1024.der": ("tls-server", "public_key", "size"),
    "bad-rsa-fermat.der": ("tls-server", "public_key", "fermat"),
    "bad-ec-p521.der": ("tls-server", "public_key", "curve"),
    "bad-unknown-extension.der": ("tls-server", "csr.extensions", "unknown"),
    "bad-critical-unknown-extension.der": ("tls-server", "csr.extensions", "critical-unknown"),
    "bad-ca-true.der": ("tls-server", "csr.extensions", "basic-constraints"),
    "bad-duplicate-extension.der": ("tls-server", "csr.extensions", "duplicate"),
    "bad-san-email-type.der": ("tls-server", "san", "type"),
    "bad-wildcard-middle.der": ("tls-server", "san", "wildcard"),
    "bad-missing-cn.der": ("tls-client", "subject.CN", "required"),
    "bad-repeated-cn.der": ("tls-client", "subject.CN", "repeated"),
    "bad-cn-too-long.der": ("tls-client", "subject.CN", "length"),
    "bad-no-san.der": ("tls-server", "san", "required"),
    "bad-truncated.der": ("tls-server", "csr", "der"),
    "bad-empty.der": ("tls-server", "csr", "der"),
}


def test_every_crafted_file_is_covered():
    on_disk = {p.name for p in DATA.glob("bad-*.der")}
    assert on_disk == set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_csr_is_refused(name):
    profile, field, rule = BAD[name]
    with pytest.raises(PolicyError) as e:
        check_csr(read(name), P[profile])
    assert (e.value.field, e.value.rule) == (field, rule), str(e.value)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_good_csr_for_each_key_type(key_type):
    info = check_csr(read(f"good-tls-client-{key_type}.der"), P["tls-client"])
    assert info.key_type == key_type
    assert info.subject == (("CN", "client.example.com"),)
    assert info.sans == (("dns", "client.example.com"),)
    assert check_public_key(info.public_key_der, KEY_TYPES) == key_type


def test_good_tls_server_csr():
    info = check_csr(read("good-tls-server-p256.der"), P["tls-server"])
    assert info.subject == ()
    assert info.sans == (("dns", "www.example.com"), ("dns", "*.api.example.com"), ("ip", "8.8.8.8"))


def test_good_user_auth_csr():
    info = check_csr(read("good-user-auth-p256.der"), P["user-auth"])
    assert info.subject == (("C", "FR"), ("CN", "Alice Martin"))
    assert info.sans == (("email", "alice@example.com"),)


def test_key_type_not_in_profile():
    with pytest.raises(PolicyError) as e:
        check_csr(read("good-tls-client-ed25519.der"), P["tls-server"])
    assert (e.value.field, e.value.rule) == ("public_key", "key-type")


def test_subject_not_allowed_by_profile():
    # tls-server lists only CN: an OU in the request is refused, naming it.
    from cryptography import x509 as _x509
    from cryptography.hazmat.primitives import hashes as _h, serialization as _s
    from cryptography.x509.oid import NameOID as _N
    k = ec.generate_private_key(ec.SECP256R1())
    csr = (_x509.CertificateSigningRequestBuilder()
           .subject_name(_x509.Name([_x509.NameAttribute(_N.ORGANIZATIONAL_UNIT_NAME, "ops"), _x509.NameAttribute(_N.COMMON_NAME, "www.example.com")]))
           .add_extension(_x509.SubjectAlternativeName([_x509.DNSName("www.example.com")]), critical=False)
           .sign(k, _h.SHA256()).public_bytes(_s.Encoding.DER))
    with pytest.raises(PolicyError) as e:
        check_csr(csr, P["tls-server"])
    assert (e.value.field, e.value.rule) == ("subject.OU", "not-allowed")


_KEY = ec.generate_private_key(ec.SECP256R1())


def _csr(subject: list[tuple], sans: list[x509.GeneralName] | None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(oid, v) for oid, v in subject])
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "dns, rule",
    [
        ("*.com", "wildcard"),
        ("*", "wildcard"),
        ("w*w.example.com", "wildcard"),
        ("-bad.example.com", "dns"),
        ("bad_.example.com", "dns"),
        ("localhost", "dns"),
        ("a" * 64 + ".example.com", "dns"),
        (("a" * 60 + ".") * 5 + "com", "dns"),
        ("www.example.com.", "dns"),
        ("1.2.3.4", "dns"),
    ],
)
def test_bad_dns_names(dns, rule):
    with pytest.raises(PolicyError) as e:
        check_csr(_csr([], [x509.DNSName(dns)]), P["tls-server"])
    assert (e.value.field, e.value.rule) == ("san", rule)


@pytest.mark.parametrize("email", ["alice", "alice@", "@example.com", "a@b@example.com", "a..b@example.com", "alice@*.example.com"])
def test_bad_emails(email):
    with pytest.raises(PolicyError) as e:
        check_csr(_csr([(NameOID.COMMON_NAME, "Alice")], [x509.RFC822Name._init_without_validation(email)]), P["user-auth"])
    assert (e.value.field, e.value.rule) == ("san", "email")


@pytest.mark.parametrize(
    "subject, field, rule",
    [
        ([(NameOID.COMMON_NAME, "Alice"), (NameOID.COUNTRY_NAME, "fr")], "subject.C", "country"),
        ([(NameOID.COMMON_NAME, "Alice"), (NameOID.LOCALITY_NAME, "Paris")], "subject.L", "not-allowed"),
        ([(NameOID.COMMON_NAME, "Alice\x00Bob")], "subject.CN", "charset"),
        ([(NameOID.COMMON_NAME, " Alice")], "subject.CN", "charset"),
        ([(NameOID.COMMON_NAME, "Alice"), (NameOID.USER_ID, "alice")], f"subject.{NameOID.USER_ID.dotted_string}", "not-allowed"),
    ],
)
def test_bad_subjects(subject, field, rule):
    with pytest.raises(PolicyError) as e:
        check_csr(_csr(subject, [x509.RFC822Name("alice@example.com")]), P["user-auth"])
    assert (e.value.field, e.value.rule) == (field, rule)


def test_duplicate_san_refused():
    with pytest.raises(PolicyError) as e:
        check_csr(_csr([], [x509.DNSName("a.example.com"), x509.DNSName("A.example.com")]), P["tls-server"])
    assert (e.value.field, e.value.rule) == ("san", "duplicate")


def test_public_key_checks_directly():
    with pytest.raises(PolicyError) as e:
        check_public_key(b"\x30\x03\x02\x01\x00", KEY_TYPES)
    assert e.value.rule == "der"
    with pytest.raises(PolicyError) as e:
        check_public_key(b"", KEY_TYPES)
    assert e.value.rule == "der"
    # RSA modulus with a small factor: n = 3 * (a 2046-bit odd number), exponent 65537.
    n = 3 * ((1 << 2046) + 12345)
    assert n.bit_length() == 2048
    spki = rsa.RSAPublicNumbers(65537, n).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(PolicyError) as e:
        check_public_key(spki, KEY_TYPES)
    assert e.value.rule == "small-factor"


_SEEDS = [p.read_bytes() for p in sorted(DATA.glob("*.der"))]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_policy_error(data):
    try:
        check_csr(data, P["tls-server"])
    except PolicyError:
        pass


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(min_value=0, max_value=1 << 16), st.integers(min_value=0, max_value=255)), max_size=8),
    st.integers(min_value=0, max_value=1 << 16),
    st.sampled_from(sorted(P)),
)
def test_mutated_csrs_only_raise_policy_error(seed, flips, cut, profile):
    data = bytearray(seed)
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    if cut and data:
        data = data[: cut % (len(data) + 1)]
    try:
        check_csr(bytes(data), P[profile])
    except PolicyError:
        pass

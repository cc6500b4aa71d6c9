"""policy.crl: the streaming CRL encoder, checked against real tools (cryptography, openssl, pkilint)."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import crl as C

UTC = dt.timezone.utc
T1950 = -631152000  # 1950-01-01T00:00:00Z
T2050 = 2524608000  # 2050-01-01T00:00:00Z
T10000 = 253402300800  # 10000-01-01T00:00:00Z
NOW = 1767225600  # 2026-01-01T00:00:00Z
REASON_CODES = [c for c in C.REASONS.values()]


def ts(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, UTC)


# --------------------------------------------------------------------------------------------------
# Issuers (software keys), one per key type, made once

_HASH = {"rsa2048": hashes.SHA256, "p256": hashes.SHA256, "p384": hashes.SHA384, "ed25519": None}


def _gen(key_type):
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def _sign(key, key_type, tbs: bytes) -> bytes:
    if key_type.startswith("rsa"):
        return key.sign(tbs, padding.PKCS1v15(), _HASH[key_type]())
    if key_type in ("p256", "p384"):
        return key.sign(tbs, ec.ECDSA(_HASH[key_type]()))
    return key.sign(tbs)


class Issuer:
    def __init__(self, key_type, tmp_path_factory):
        self.key_type = key_type
        self.key = _gen(key_type)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Donjon Test"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Donjon CRL Test CA {key_type}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.ski = ski.digest
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ts(NOW - 86400 * 365))
            .not_valid_after(ts(NOW + 86400 * 3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
        )
        h = _HASH[key_type]
        self.cert = b.sign(self.key, h() if h else None)
        self.name_der = self.cert.subject.public_bytes()
        self.pem_path = tmp_path_factory.mktemp(f"issuer-{key_type}") / "issuer.pem"
        self.pem_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def make_crl(self, entries, *, crl_number=42, this_update=NOW, next_update=NOW + 7 * 86400,
                 chunk=300, idp_der=None, expired_certs_on_crl=None) -> bytes:
        entries = list(entries)
        tbs = C.TbsCrl(
            issuer_name_der=self.name_der, key_type=self.key_type, this_update=this_update,
            next_update=next_update, crl_number=crl_number, aki_key_id=self.ski,
            entry_count=len(entries), entries_length=sum(C.entry_length(*e) for e in entries),
            idp_der=idp_der, expired_certs_on_crl=expired_certs_on_crl,
        )
        parts = [tbs.header()]
        for i in range(0, len(entries), chunk):
            parts.append(tbs.entries(iter(entries[i : i + chunk])))
        parts.append(tbs.trailer())
        tbs_bytes = b"".join(parts)
        assert len(tbs_bytes) == tbs.length()
        prefix, suffix = C.certificate_list(tbs.length(), self.key_type, _sign(self.key, self.key_type, tbs_bytes))
        return prefix + tbs_bytes + suffix


KEY_TYPES = ["rsa2048", "p256", "p384", "ed25519"]


@pytest.fixture(scope="module")
def issuers(tmp_path_factory):
    return {k: Issuer(k, tmp_path_factory) for k in KEY_TYPES}


# --------------------------------------------------------------------------------------------------
# Entry sets

def _entries(n: int, with_ext: bool, seed: int = 0):
    rnd = random.Random(seed * 1000 + n)
    out = []
    edge_times = [T1950, T2050 - 1, T2050, T10000 - 1, 0, NOW]
    for i in range(n):
        kind = i % 4
        if kind == 0:
            serial = rnd.getrandbits(159) | (1 << 158)  # 20 content octets, high bit clear
        elif kind == 1:
            serial = rnd.getrandbits(128) | (1 << 127)  # high bit set: leading 0x00
        elif kind == 2:
            serial = i + 1
        else:
            serial = rnd.randrange(1, 1 << 64)
        revoked = edge_times[i] if i < len(edge_times) else NOW - rnd.randrange(0, 86400 * 3000)
        if with_ext:
            reason = rnd.choice([None, *REASON_CODES])
            inval = None if rnd.random() < 0.4 else rnd.choice([T1950, T2050, revoked - rnd.randrange(0, 86400 * 30)])
            if inval is not None and inval < T1950:
                inval = T1950
        else:
            reason = inval = None
        out.append((serial, revoked, reason, inval))
    return out


_CODE_TO_FLAG = {
    1: x509.ReasonFlags.key_compromise, 2: x509.ReasonFlags.ca_compromise,
    3: x509.ReasonFlags.affiliation_changed, 4: x509.ReasonFlags.superseded,
    5: x509.ReasonFlags.cessation_of_operation, 6: x509.ReasonFlags.certificate_hold,
    8: x509.ReasonFlags.remove_from_crl, 9: x509.ReasonFlags.privilege_withdrawn,
    10: x509.ReasonFlags.aa_compromise,
}


def _openssl_verify(der: bytes, issuer: Issuer, tmp_path) -> None:
    f = tmp_path / "crl.der"
    f.write_bytes(der)
    r = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(f), "-noout", "-CAfile", str(issuer.pem_path)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "verify OK" in (r.stdout + r.stderr), r.stdout + r.stderr


_PKILINT = None


def _pkilint_findings(der: bytes):
    """pkilint's RFC 5280 CRL lint, in process (as bin/lint_crl.py does), findings at WARNING or worse."""
    global _PKILINT
    from pkilint import loader, pkix, report
    from pkilint.pkix import crl, extension, name

    if _PKILINT is None:
        _PKILINT = crl.create_pkix_crl_validator_container(
            [
                pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
                pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
            ],
            [
                crl.create_issuer_validator_container([]),
                crl.create_validity_validator_container([]),
                crl.create_extensions_validator_container([]),
            ],
        )
    doc = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "crl")
    results = _PKILINT.validate(doc.root)
    from pkilint.validation import ValidationFindingSeverity as S

    findings = [
        (r.node.path, fd.finding.code, fd.finding.severity.name, fd.message)
        for r in results
        for fd in r.finding_descriptions
        if fd.finding.severity <= S.WARNING
    ]
    assert report.get_findings_count(results, S.WARNING) == len(findings)
    return findings


def _check_roundtrip(der, issuer, entries, crl_number=42, this_update=NOW, next_update=NOW + 7 * 86400):
    c = x509.load_der_x509_crl(der)
    assert c.public_bytes(serialization.Encoding.DER) == der
    assert c.is_signature_valid(issuer.key.public_key())
    assert c.issuer == issuer.cert.subject
    assert c.last_update_utc == ts(this_update)
    assert c.next_update_utc == ts(next_update)
    assert c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == crl_number
    aki = c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical and aki.value.key_identifier == issuer.ski
    assert aki.value.authority_cert_issuer is None
    revoked = list(c)
    assert len(revoked) == len(entries)
    for rc, (serial, revoked_at, reason, inval) in zip(revoked, entries):
        assert rc.serial_number == serial
        assert rc.revocation_date_utc == ts(revoked_at)
        exts = {e.oid: e for e in rc.extensions}
        if reason in (None, 0):
            assert x509.CRLReason.oid not in exts
        else:
            assert exts[x509.CRLReason.oid].value.reason == _CODE_TO_FLAG[reason]
            assert not exts[x509.CRLReason.oid].critical
        if inval is None:
            assert x509.InvalidityDate.oid not in exts
        else:
            assert exts[x509.InvalidityDate.oid].value.invalidity_date_utc == ts(inval)
        assert len(exts) == (reason not in (None, 0)) + (inval is not None)
    return c


# --------------------------------------------------------------------------------------------------
# The matrix: key types x entry counts x with/without extensions


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize("n", [0, 1, 3, 1000])
@pytest.mark.parametrize("with_ext", [False, True], ids=["plain", "ext"])
def test_crl_matrix(issuers, key_type, n, with_ext, tmp_path):
    issuer = issuers[key_type]
    entries = _entries(n, with_ext)
    der = issuer.make_crl(entries)
    _check_roundtrip(der, issuer, entries)
    _openssl_verify(der, issuer, tmp_path)
    assert _pkilint_findings(der) == []


def test_encoded_times_and_serials(issuers):
    """UTCTime through 2049, GeneralizedTime from 2050; invalidityDate always GeneralizedTime."""
    enc = C.encode_entries([(0x80, T2050 - 1, None, None)])
    assert enc == bytes.fromhex("3013") + bytes.fromhex("02020080") + b"\x17\x0d491231235959Z"
    enc = C.encode_entries([(0x7F, T2050, None, None)])
    assert enc == bytes.fromhex("3014") + bytes.fromhex("02017f") + b"\x18\x0f20500101000000Z"
    enc = C.encode_entries([(1, T1950, 0, None)])  # reason 0 is never encoded
    assert enc == bytes.fromhex("3012020101") + b"\x17\x0d500101000000Z"
    enc = C.encode_entries([(1, T1950, 1, T1950)])
    assert b"\x18\x0f19500101000000Z" in enc and b"\x0a\x01\x01" in enc


def test_zero_entries_has_no_revoked_sequence(issuers):
    issuer = issuers["p256"]
    tbs = C.TbsCrl(issuer_name_der=issuer.name_der, key_type="p256", this_update=NOW, next_update=NOW + 1,
                   crl_number=0, aki_key_id=issuer.ski, entry_count=0, entries_length=0)
    h = tbs.header()
    assert h.endswith(b"\x17\x0d260101000001Z")  # nextUpdate is the last element of the header
    assert tbs.entries([]) == b""
    assert len(h) + len(tbs.trailer()) == tbs.length()


def test_crl_number_and_idp_and_expired_certs(issuers, tmp_path):
    issuer = issuers["rsa2048"]
    idp = x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier("http://crl.example/ca.crl")], relative_name=None,
        only_contains_user_certs=True, only_contains_ca_certs=False, only_some_reasons=None,
        indirect_crl=False, only_contains_attribute_certs=False,
    )
    big = (1 << 159) - 1  # 20 octets
    entries = _entries(5, True)
    der = issuer.make_crl(entries, crl_number=big, idp_der=idp.public_bytes(), expired_certs_on_crl=NOW - 86400)
    c = _check_roundtrip(der, issuer, entries, crl_number=big)
    ext = c.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert ext.critical and ext.value == idp
    eco = c.extensions.get_extension_for_oid(x509.ObjectIdentifier("2.5.29.60"))
    assert not eco.critical and eco.value.value == b"\x18\x0f20251231000000Z"
    assert [e.oid.dotted_string for e in c.extensions] == ["2.5.29.35", "2.5.29.20", "2.5.29.28", "2.5.29.60"]
    _openssl_verify(der, issuer, tmp_path)
    # expiredCertsOnCRL (X.509, not RFC 5280) is unknown to pkilint but non-critical: no finding at WARNING
    assert _pkilint_findings(der) == []
    der2 = issuer.make_crl(entries, idp_der=idp.public_bytes())
    assert _pkilint_findings(der2) == []


# --------------------------------------------------------------------------------------------------
# Canonical DER: byte-identical to cryptography's builder (deterministic signatures: RSA PKCS#1 v1.5, Ed25519)


def _cryptography_crl(issuer: Issuer, entries, crl_number, idp=None):
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(ts(NOW))
        .next_update(ts(NOW + 7 * 86400))
        .add_extension(x509.AuthorityKeyIdentifier(issuer.ski, None, None), critical=False)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
    )
    if idp is not None:
        b = b.add_extension(idp, critical=True)
    for serial, revoked_at, reason, inval in entries:
        rb = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(ts(revoked_at))
        if reason not in (None, 0):
            rb = rb.add_extension(x509.CRLReason(_CODE_TO_FLAG[reason]), critical=False)
        if inval is not None:
            rb = rb.add_extension(x509.InvalidityDate(ts(inval)), critical=False)
        b = b.add_revoked_certificate(rb.build())
    h = _HASH[issuer.key_type]
    return b.sign(issuer.key, h() if h else None).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("key_type", ["rsa2048", "ed25519"])
@pytest.mark.parametrize("n", [0, 1, 40])
def test_byte_identical_to_cryptography(issuers, key_type, n):
    issuer = issuers[key_type]
    entries = _entries(n, True, seed=7)
    idp = x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier("http://crl.example/ca.crl")], relative_name=None,
        only_contains_user_certs=False, only_contains_ca_certs=False, only_some_reasons=None,
        indirect_crl=False, only_contains_attribute_certs=False,
    )
    for crl_number, with_idp in ((0, False), (1234567, True), ((1 << 159) - 1, False), (128, True)):
        ours = issuer.make_crl(entries, crl_number=crl_number, idp_der=idp.public_bytes() if with_idp else None)
        theirs = _cryptography_crl(issuer, entries, crl_number, idp if with_idp else None)
        assert ours == theirs


# --------------------------------------------------------------------------------------------------
# The declaration is enforced


def _tbs(issuer, count, length):
    return C.TbsCrl(issuer_name_der=issuer.name_der, key_type=issuer.key_type, this_update=NOW,
                    next_update=NOW + 86400, crl_number=1, aki_key_id=issuer.ski,
                    entry_count=count, entries_length=length)


def test_wrong_declared_count_or_length_is_refused(issuers):
    issuer = issuers["p256"]
    entries = _entries(10, True)
    total = sum(C.entry_length(*e) for e in entries)
    # right declaration: fine
    t = _tbs(issuer, 10, total)
    t.header(), t.entries(entries), t.trailer()
    # too few entries sent
    t = _tbs(issuer, 10, total)
    t.header()
    t.entries(entries[:9])
    with pytest.raises(ValueError):
        t.trailer()
    # declared count too high for the same bytes (count mismatch, length matches)
    t = _tbs(issuer, 11, total)
    t.header()
    t.entries(entries)
    with pytest.raises(ValueError):
        t.trailer()
    # declared length too large by one
    t = _tbs(issuer, 10, total + 1)
    t.header()
    t.entries(entries)
    with pytest.raises(ValueError):
        t.trailer()
    # declared length too small: refused as soon as the entries exceed it, and no trailer afterwards
    t = _tbs(issuer, 10, total - 1)
    t.header()
    with pytest.raises(ValueError):
        t.entries(entries)
    with pytest.raises(ValueError):
        t.trailer()
    # more entries than declared
    t = _tbs(issuer, 9, total)
    t.header()
    with pytest.raises(ValueError):
        t.entries(entries)
    # same count and length, but a different mix: length and count match, so this is the sender's
    # right (the entries are encoded by us); entries exceeding the length are caught above.
    # order of calls is enforced
    t = _tbs(issuer, 0, 0)
    with pytest.raises(ValueError):
        t.entries([])
    with pytest.raises(ValueError):
        t.trailer()
    t.header()
    t.trailer()
    with pytest.raises(ValueError):
        t.trailer()
    with pytest.raises(ValueError):
        t.entries([])
    # impossible declarations are refused up front
    with pytest.raises(ValueError):
        _tbs(issuer, 0, 10)
    with pytest.raises(ValueError):
        _tbs(issuer, 2, 10)
    with pytest.raises(ValueError):
        _tbs(issuer, -1, 0)


@pytest.mark.parametrize(
    "entry",
    [
        (0, NOW, None, None),
        (-5, NOW, None, None),
        (1 << 159, NOW, None, None),  # 21 octets with the leading zero
        (True, NOW, None, None),
        (1.0, NOW, None, None),
        ("1", NOW, None, None),
        (1, NOW, 7, None),
        (1, NOW, 11, None),
        (1, NOW, -1, None),
        (1, NOW, True, None),
        (1, NOW, 0.0, None),
        (1, NOW, 7, NOW),
        (1, NOW, "keyCompromise", None),
        (1, T1950 - 1, None, None),
        (1, T10000, None, None),
        (1, 10**30, None, None),
        (1, float(NOW), None, None),
        (1, NOW, None, T1950 - 1),
        (1, NOW, None, T10000),
        (1, NOW, 1, T10000),
        (1, NOW, None, float(NOW)),
        (1, NOW, None),
        (1, NOW, None, None, None),
        None,
    ],
)
def test_invalid_entries(entry):
    with pytest.raises(ValueError):
        C.encode_entries([(1, NOW, None, None), entry])
    if isinstance(entry, tuple) and len(entry) == 4:
        with pytest.raises(ValueError):
            C.entry_length(*entry)


def test_valid_extremes():
    C.encode_entries([((1 << 159) - 1, T10000 - 1, 10, T10000 - 1), (1, T1950, 1, T1950)])


@pytest.mark.parametrize(
    "kw",
    [
        {"key_type": "rsa1024"},
        {"issuer_name_der": b"\x30\x00"},
        {"issuer_name_der": b"\x31\x00"},
        {"issuer_name_der": b"\x30\x05\x31\x03"},
        {"next_update": NOW},
        {"this_update": T1950 - 1},
        {"next_update": T10000},
        {"crl_number": -1},
        {"crl_number": 1 << 159},
        {"aki_key_id": b""},
        {"idp_der": b"\x04\x00"},
        {"idp_der": b"\x30\x00\x00"},
        {"expired_certs_on_crl": 1.5},
    ],
)
def test_invalid_tbs_parameters(issuers, kw):
    issuer = issuers["p256"]
    args = dict(issuer_name_der=issuer.name_der, key_type="p256", this_update=NOW, next_update=NOW + 86400,
                crl_number=1, aki_key_id=issuer.ski, entry_count=0, entries_length=0)
    args.update(kw)
    with pytest.raises(ValueError):
        C.TbsCrl(**args)


def test_algorithm_identifiers():
    from asn1crypto import algos

    expect = {
        "rsa2048": ("sha256_rsa", True), "rsa3072": ("sha256_rsa", True), "rsa4096": ("sha384_rsa", True),
        "p256": ("sha256_ecdsa", False), "p384": ("sha384_ecdsa", False), "ed25519": ("ed25519", False),
    }
    for k, (algo, null) in expect.items():
        der = C.algorithm_identifier(k)
        a = algos.SignedDigestAlgorithm.load(der)
        assert a["algorithm"].native == algo and a.dump(force=True) == der
        assert (der.endswith(b"\x05\x00")) == null
    with pytest.raises(ValueError):
        C.algorithm_identifier("dsa")


def test_certificate_list_lengths():
    for n in (10, 100, 1000, 70000, 20_000_000):
        prefix, suffix = C.certificate_list(n, "rsa2048", b"\x01" * 256)
        tag, start, end = C._parse_tlv(prefix + b"\x00" * n + suffix)
        assert tag == 0x30 and end == len(prefix) + n + len(suffix) and start == len(prefix)
    with pytest.raises(ValueError):
        C.certificate_list(10, "ed25519", b"\x00" * 63)
    with pytest.raises(ValueError):
        C.certificate_list(10, "p256", b"\x02\x01\x01")


def test_rsa4096_header_and_large_lengths(issuers):
    """The TBS and revokedCertificates lengths take multi-octet forms for big CRLs."""
    issuer = issuers["rsa2048"]
    t = C.TbsCrl(issuer_name_der=issuer.name_der, key_type="rsa4096", this_update=NOW, next_update=NOW + 1,
                 crl_number=1, aki_key_id=issuer.ski, entry_count=1_000_000, entries_length=42_000_000)
    h = t.header()
    assert h[:2] == b"\x30\x84" and h.endswith(b"\x30\x84" + (42_000_000).to_bytes(4, "big"))
    assert C.algorithm_identifier("rsa4096") in h


# --------------------------------------------------------------------------------------------------
# entry_length is exact


_time = st.integers(min_value=T1950, max_value=T10000 - 1)
_entry = st.tuples(
    st.integers(min_value=1, max_value=(1 << 159) - 1),
    _time,
    st.one_of(st.none(), st.sampled_from(REASON_CODES)),
    st.one_of(st.none(), _time),
)


@settings(max_examples=1500, deadline=None)
@given(_entry)
def test_entry_length_is_exact(e):
    enc = C.encode_entries([e])
    assert C.entry_length(*e) == len(enc)
    # and the element is one well-formed DER SEQUENCE
    tag, start, end = C._parse_tlv(enc)
    assert tag == 0x30 and end == len(enc)


@settings(max_examples=60, deadline=None)
@given(st.lists(_entry, max_size=30))
def test_encoding_matches_cryptography_entries(es):
    """Entries parse back through cryptography (a CRL wrapper with a dummy signature)."""
    body = C.encode_entries(es)
    assert len(body) == sum(C.entry_length(*e) for e in es)
    # wrap in a minimal CRL so cryptography can parse the entries
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]).public_bytes()
    t = C.TbsCrl(issuer_name_der=name, key_type="ed25519", this_update=NOW, next_update=NOW + 1, crl_number=1,
                 aki_key_id=b"\x01", entry_count=len(es), entries_length=len(body))
    tbs = t.header() + t.entries(es) + t.trailer()
    p, s = C.certificate_list(len(tbs), "ed25519", b"\x00" * 64)
    c = x509.load_der_x509_crl(p + tbs + s)
    got = [(r.serial_number, int(r.revocation_date_utc.timestamp())) for r in c]
    assert got == [(e[0], e[1]) for e in es]


def test_streaming_hash_equals_whole(issuers):
    """Hashing the chunks as they come equals hashing the TBS: what the CIS does."""
    issuer = issuers["p256"]
    entries = _entries(500, True, seed=3)
    total = sum(C.entry_length(*e) for e in entries)
    t = _tbs(issuer, 500, total)
    h = hashlib.sha256()
    chunks = [t.header()] + [t.entries(entries[i : i + 64]) for i in range(0, 500, 64)] + [t.trailer()]
    for c in chunks:
        h.update(c)
    assert h.digest() == hashlib.sha256(b"".join(chunks)).digest()


def test_openssl_available():
    assert shutil.which("openssl")

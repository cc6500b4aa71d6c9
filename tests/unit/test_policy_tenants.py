"""policy.tenants: a tenant CRL is checked (signature, issuer, freshness, number, full CRL) before use,
and the issued-serials list is read strictly."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.tenants import CrlRefused, check_ca_cert, check_crl, parse_issued_serials
from tests.unit.test_ocsp_pki import Ca, make_ca, make_leaf

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)


def crl(ca: Ca, number: int | None = 1, revoked=(), this=NOW - dt.timedelta(minutes=1), next_=NOW + dt.timedelta(days=1),
        extra=(), key=None) -> bytes:
    b = x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(this)
    if next_ is not None:
        b = b.next_update(next_)
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    for ext, critical in extra:
        b = b.add_extension(ext, critical=critical)
    for serial, reason in revoked:
        rb = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - dt.timedelta(hours=1))
        if reason is not None:
            rb = rb.add_extension(x509.CRLReason(reason), critical=False)
        b = b.add_revoked_certificate(rb.build())
    return b.sign(key or ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def without_next_update(ca: Ca, der: bytes) -> bytes:
    """cryptography cannot build a CRL without nextUpdate: drop it with asn1crypto and sign again."""
    from asn1crypto import crl as a_crl
    from cryptography.hazmat.primitives.asymmetric import ec
    c = a_crl.CertificateList.load(der)
    tbs = c["tbs_cert_list"]
    fields = {k: tbs[k] for k in ("version", "signature", "issuer", "this_update", "crl_extensions")}
    new_tbs = a_crl.TbsCertList(fields)
    sig = ca.key.sign(new_tbs.dump(), ec.ECDSA(hashes.SHA256()))
    return a_crl.CertificateList({"tbs_cert_list": new_tbs, "signature_algorithm": c["signature_algorithm"],
                                  "signature": sig}).dump()


def test_a_good_crl_gives_its_entries():
    ca = make_ca("t")
    c = check_crl(ca.cert, crl(ca, 7, [(5, x509.ReasonFlags.key_compromise), (6, None)]), NOW.timestamp())
    assert c.number == 7 and c.revoked[5][1] == 1 and c.revoked[6][1] is None and 4 not in c.revoked
    assert c.next_update > NOW.timestamp() > c.this_update


@pytest.mark.parametrize("make, why", [
    (lambda ca, other: crl(ca, key=other.key), "signature does not verify"),
    (lambda ca, other: crl(make_ca("elsewhere")), "issuer is not the tenant CA"),
    (lambda ca, other: crl(ca)[:-7], "not a DER X.509 CRL"),
    (lambda ca, other: b"", "empty"),
    (lambda ca, other: crl(ca, number=None), "no CRL number"),
    (lambda ca, other: without_next_update(ca, crl(ca)), "no nextUpdate"),
    (lambda ca, other: crl(ca, this=NOW - dt.timedelta(days=2), next_=NOW - dt.timedelta(seconds=1)), "stale"),
    (lambda ca, other: crl(ca, this=NOW + dt.timedelta(hours=1), next_=NOW + dt.timedelta(days=1)), "in the future"),
    (lambda ca, other: crl(ca, 3), "lower than the current 4"),
    (lambda ca, other: crl(ca, extra=[(x509.DeltaCRLIndicator(2), True)]), "delta CRL"),
    (lambda ca, other: crl(ca, extra=[(x509.IssuingDistributionPoint(None, None, False, False, None, True, False), True)]),
     "partitioned or indirect"),
])
def test_bad_crls_are_refused(make, why):
    ca = make_ca("t")
    other = make_ca("other", cn="Donjon Test t CA")  # the same name, another key
    with pytest.raises(CrlRefused, match=why):
        check_crl(ca.cert, make(ca, other), NOW.timestamp(), current=(4, int(NOW.timestamp()) - 3600))


def test_same_number_older_issue_is_refused_newer_accepted():
    ca = make_ca("t")
    cur = (4, int((NOW - dt.timedelta(minutes=1)).timestamp()))
    assert check_crl(ca.cert, crl(ca, 4), NOW.timestamp(), cur).number == 4
    with pytest.raises(CrlRefused, match="older issue"):
        check_crl(ca.cert, crl(ca, 4, this=NOW - dt.timedelta(hours=1)), NOW.timestamp(), cur)


def test_a_stored_crl_reloads_without_the_clock():
    ca = make_ca("t")
    der = crl(ca, this=NOW - dt.timedelta(days=2), next_=NOW - dt.timedelta(days=1))
    assert check_crl(ca.cert, der, NOW.timestamp(), clock=False).number == 1


def test_ca_certificate_checks():
    ca = make_ca("t")
    assert check_ca_cert(ca.der).subject == ca.cert.subject
    leaf = make_leaf(ca, 5).public_bytes(serialization.Encoding.DER)
    with pytest.raises(CrlRefused, match="not a CA certificate"):
        check_ca_cert(leaf)
    with pytest.raises(CrlRefused, match="not a DER"):
        check_ca_cert(b"\x30\x03garbage")


def test_issued_serials_list():
    assert parse_issued_serials(b"# partner\n0x1f\n\nAB:CD  # colons\n1f\n") == {0x1F, 0xABCD}
    for bad, why in ((b"12\nxyz\n", "line 2"), (b":\n", "line 1"), (b"0x\n", "line 1"), (b"0\n", "positive"), (b"\xff\n", "ASCII"), (b"1" * 41 + b"\n", "20 octets")):
        with pytest.raises(CrlRefused, match=why):
            parse_issued_serials(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_another_exception(data):
    ca = make_ca_cached()
    with pytest.raises(CrlRefused):
        check_crl(ca.cert, data, NOW.timestamp())
    try:
        parse_issued_serials(data)
    except CrlRefused:
        pass


_CA: list[Ca] = []


def make_ca_cached() -> Ca:
    if not _CA:
        _CA.append(make_ca("fuzz"))
    return _CA[0]


def test_signed_issued_serials_list_checked_against_the_tenant_ca():
    """A Donjon CA's signed list (policy/serials.py) is read as the issued-serials list; one signed by
    another key, or naming another issuer, is refused."""
    from tests.unit.test_serials_list import KEY, NAME, make

    ca = (x509.CertificateBuilder().subject_name(NAME).issuer_name(NAME).public_key(KEY.public_key())
          .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1))
          .sign(KEY, hashes.SHA256()))
    der = make([5, 7, 2**64])
    assert parse_issued_serials(der, ca) == {5, 7, 2**64}
    other = ec.generate_private_key(ec.SECP256R1())
    wrong = (x509.CertificateBuilder().subject_name(NAME).issuer_name(NAME).public_key(other.public_key())
             .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1))
             .sign(other, hashes.SHA256()))
    with pytest.raises(CrlRefused, match="does not verify"):
        parse_issued_serials(der, wrong)
    with pytest.raises(CrlRefused, match="does not decode"):
        parse_issued_serials(der[:-3], ca)

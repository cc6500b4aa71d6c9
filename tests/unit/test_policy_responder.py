"""policy.responder: the one responder-certificate check (tenant responders in the Factory, every responder the endpoint installs)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.responder import ResponderRefused, check_responder_cert
from tests.unit.test_ocsp_pki import Ca, make_ca

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)


def _spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def responder(ca: Ca, key, eku=(ExtendedKeyUsageOID.OCSP_SIGNING,), nocheck=True, days=30, start=-1) -> bytes:
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "responder")]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW + dt.timedelta(hours=start)).not_valid_after(NOW + dt.timedelta(days=days)))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if nocheck:
        b = b.add_extension(x509.OCSPNoCheck(), critical=False)
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_good_responder_certificate_passes_with_and_without_issuer_and_clock():
    ca, key = make_ca("t"), ec.generate_private_key(ec.SECP256R1())
    der = responder(ca, key)
    cert, nocheck = check_responder_cert(der, _spki(key), issuer=ca.cert, now=NOW.timestamp())
    assert nocheck and cert.public_bytes(serialization.Encoding.DER) == der
    # The endpoint's check of a local CA's responder: no issuer (the CIS signed it), no clock.
    assert check_responder_cert(der, _spki(key)) == (cert, True)
    assert check_responder_cert(responder(ca, key, nocheck=False), _spki(key))[1] is False


def test_each_refusal_names_its_reason():
    ca, other = make_ca("t"), make_ca("other")
    key, stranger = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cases = [
        (b"\x30\x03\x02\x01\x00", _spki(key), ca.cert, "not a DER or PEM X.509 certificate"),
        (responder(ca, stranger), _spki(key), ca.cert, "does not certify the key of the latest `tenant csr`"),
        (responder(ca, stranger), _spki(key), None, "does not certify the token key"),
        (responder(other, key), _spki(key), ca.cert, "not issued by the tenant CA"),
        (responder(ca, key, eku=(ExtendedKeyUsageOID.SERVER_AUTH,)), _spki(key), ca.cert, "lacks the id-kp-OCSPSigning"),
        (responder(ca, key, eku=()), _spki(key), None, "lacks the id-kp-OCSPSigning"),
        (responder(ca, key, days=-1, start=-48), _spki(key), ca.cert, "not valid now"),
        (responder(ca, key, start=2), _spki(key), ca.cert, "not valid now"),
    ]
    for der, spki, issuer, why in cases:
        with pytest.raises(ResponderRefused, match=why):
            check_responder_cert(der, spki, issuer=issuer, now=NOW.timestamp())
    # A ValueError: the endpoint's install path catches that type for every bad certificate.
    assert issubclass(ResponderRefused, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_garbage_is_refused_in_one_line(data):
    ca, key = _FUZZ
    try:
        check_responder_cert(data, _spki(key), issuer=ca.cert, now=NOW.timestamp())
    except ResponderRefused as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255))
def test_fuzz_a_flipped_byte_never_passes_as_another_key(pos, value):
    ca, key = _FUZZ
    der = bytearray(_GOOD)
    i = pos % len(der)
    der[i] = value
    try:
        cert, _ = check_responder_cert(bytes(der), _spki(key), issuer=ca.cert, now=NOW.timestamp())
    except ResponderRefused as e:
        assert "\n" not in str(e)
    else:  # only a change that leaves the key, the issuer's signature and the EKU intact passes
        assert _spki(key) == cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


_FUZZ = (make_ca("fuzz"), ec.generate_private_key(ec.SECP256R1()))
_GOOD = responder(*_FUZZ)

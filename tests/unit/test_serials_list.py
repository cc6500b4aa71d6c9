"""The issued-serials list: encoder/decoder round trip, signature, and strict refusal of bad input."""

from __future__ import annotations


import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import serials as SL
from policy.crl import certificate_list

KEY = ec.generate_private_key(ec.SECP256R1())
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "List CA")])


def make(serials: list[int], number: int = 7) -> bytes:
    octets = sorted(s.to_bytes((s.bit_length() + 7) // 8, "big") for s in serials)
    tbs = SL.TbsSerials(issuer_name_der=NAME.public_bytes(), key_type="p256", aki_key_id=b"\x01" * 20, list_number=number,
                        this_update=1_700_000_000, next_update=1_700_086_400, count=len(serials),
                        serials_length=sum(SL.serial_length(o) for o in octets))
    body = tbs.header() + tbs.entries(octets[: len(octets) // 2]) + tbs.entries(octets[len(octets) // 2:]) + tbs.trailer()
    assert len(body) == tbs.length()
    sig = KEY.sign(body, ec.ECDSA(hashes.SHA256()))
    prefix, suffix = certificate_list(len(body), "p256", sig)
    return prefix + body + suffix


def test_round_trip_and_signature():
    serials = [1, 127, 128, 255, 2**63, 2**159 - 1, 0x100]
    der = make(serials)
    lst = SL.decode(der)
    assert lst.serials == frozenset(serials)
    assert lst.number == 7 and lst.issuer_der == NAME.public_bytes()
    assert lst.this_update == 1_700_000_000 and lst.next_update == 1_700_086_400
    assert lst.signature_oid == "1.2.840.10045.4.3.2"
    KEY.public_key().verify(lst.signature, lst.tbs, ec.ECDSA(SL.hash_for(lst.signature_oid)))


def test_empty_list():
    assert SL.decode(make([])).serials == frozenset()


def test_declaration_mismatch_and_order_refused():
    tbs = SL.TbsSerials(issuer_name_der=NAME.public_bytes(), key_type="p256", aki_key_id=b"\x01", list_number=1,
                        this_update=1, next_update=2, count=2, serials_length=6)
    tbs.header()
    with pytest.raises(ValueError):
        tbs.entries([b"\x05", b"\x03"])
    tbs = SL.TbsSerials(issuer_name_der=NAME.public_bytes(), key_type="p256", aki_key_id=b"\x01", list_number=1,
                        this_update=1, next_update=2, count=2, serials_length=6)
    tbs.header()
    tbs.entries([b"\x05"])
    with pytest.raises(ValueError):
        tbs.trailer()


def test_truncated_and_trailing_bytes_refused():
    der = make([1, 2, 3])
    for bad in (der[:-1], der + b"\x00", der[:10], b"", b"\x30\x00"):
        with pytest.raises(ValueError):
            SL.decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_decode_never_crashes(data):
    try:
        SL.decode(data)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=4))
def test_fuzz_mutations(pos, junk):
    der = bytearray(make([3, 9, 2**70]))
    pos %= len(der)
    der[pos:pos + len(junk)] = junk
    try:
        SL.decode(bytes(der))
    except ValueError:
        pass

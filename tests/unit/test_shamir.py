"""Shamir's scheme over GF(256) and the checksummed PIN shares (policy/shamir.py, pure)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import shamir
from policy.errors import PolicyError


def test_gf256_field_laws():
    for a in range(1, 256):
        assert shamir.gf_mul(a, shamir.gf_div(1, a)) == 1  # every non-zero element has an inverse
    assert shamir.gf_mul(0x57, 0x83) == 0xC1  # FIPS-197 section 4.2 example


@settings(max_examples=60, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), m=st.integers(2, 6), extra=st.integers(0, 4))
def test_any_m_shares_recover_the_secret(secret, m, extra):
    n = m + extra
    shares = shamir.split(secret, m, n, os.urandom)
    for subset in itertools.islice(itertools.combinations(shares, m), 10):
        assert shamir.combine(list(subset)) == secret


def test_m_minus_1_shares_reveal_nothing_checkable():
    """With M-1 shares every secret is still possible: the combination is just another value."""
    shares = shamir.split(b"\x42", 3, 5, os.urandom)
    seen = {shamir.combine([shares[0], shares[1], (9, bytes([y]))]) for y in range(256)}
    assert len(seen) == 256


def test_pin_shares_round_trip_and_refusals():
    texts = shamir.split_pin("s3cret-PIN-value", 3, 5, os.urandom)
    assert shamir.combine_pin([texts[4], texts[0], texts[2]]) == "s3cret-PIN-value"
    assert shamir.combine_pin([" " + texts[1].upper() + "\n", texts[3], texts[2]]) == "s3cret-PIN-value"
    with pytest.raises(PolicyError, match="3 shares are needed, 2 given"):
        shamir.combine_pin(texts[:2])
    typo = texts[0][:-20] + ("a" if texts[0][-20] != "a" else "b") + texts[0][-19:]
    with pytest.raises(PolicyError, match="checksum"):
        shamir.combine_pin([typo, texts[1], texts[2]])
    other = shamir.split_pin("s3cret-PIN-value", 3, 5, os.urandom)
    with pytest.raises(PolicyError, match="different sets"):
        shamir.combine_pin([texts[0], texts[1], other[2]])
    with pytest.raises(PolicyError, match="twice"):
        shamir.combine_pin([texts[0], texts[0], texts[1]])


def test_a_forged_threshold_is_caught_by_the_inner_checksum():
    """Shares re-labelled threshold 2 (with valid outer checksums) do not combine to a valid PIN."""
    texts = shamir.split_pin("another-pin-123", 3, 5, os.urandom)
    forged = []
    for t in texts[:2]:
        _, set_id, _, x, data, _ = t.split("-")
        body = f"DJS1-{set_id}-2-{x}-{data}"
        forged.append(f"{body}-{shamir._check(body)}")
    with pytest.raises(PolicyError) as e:
        shamir.combine_pin(forged)
    assert e.value.rule == "combine"


def test_split_refuses_bad_parameters():
    with pytest.raises(PolicyError):
        shamir.split(b"x", 1, 3, os.urandom)
    with pytest.raises(PolicyError):
        shamir.split(b"x", 4, 3, os.urandom)

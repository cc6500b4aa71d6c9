"""Shamir's secret sharing over GF(256) and the checksummed text form of a share (pure, no I/O).

A secret (the token PIN) is split byte by byte: each byte is the constant term of a random
polynomial of degree M-1 over GF(2^8) (AES polynomial), and share x holds the polynomial values at
x = 1..N. Any M shares give the secret back by Lagrange interpolation at 0; M-1 shares say nothing
about it. The shared payload is `len || secret || SHA-256(secret)[:4]` so that a combination of the
wrong shares (too few, mixed sets, a forged threshold) is detected before the PIN is ever tried, and
each share's text carries its own checksum so that a typo is caught before combining.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from .errors import PolicyError

PREFIX = "DJS1"
MAX_SHARES = 16

_EXP = [0] * 512
_LOG = [0] * 256


def _init_tables() -> None:
    x = 1
    for i in range(255):
        _EXP[i] = x
        _LOG[x] = i
        # multiply by the generator 3 in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1
        x ^= (x << 1) ^ (0x11B if x & 0x80 else 0)
        x &= 0xFF
    for i in range(255, 512):
        _EXP[i] = _EXP[i - 255]


_init_tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(256)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] - _LOG[b]) % 255]


def _eval(coeffs: list[int], x: int) -> int:
    y = 0
    for c in reversed(coeffs):  # Horner
        y = gf_mul(y, x) ^ c
    return y


def split(secret: bytes, m: int, n: int, rand: Callable[[int], bytes]) -> list[tuple[int, bytes]]:
    """Split `secret` into n shares (x, y) of which any m recover it; `rand(k)` returns k random bytes."""
    if not 2 <= m <= n <= MAX_SHARES:
        raise PolicyError("quorum", "range", f"need 2 <= threshold <= shares <= {MAX_SHARES} (got {m} of {n})")
    if not secret:
        raise PolicyError("quorum", "secret", "nothing to split")
    ys = [bytearray() for _ in range(n)]
    for byte in secret:
        coeffs = [byte] + list(rand(m - 1))
        for i in range(n):
            ys[i].append(_eval(coeffs, i + 1))
    return [(i + 1, bytes(y)) for i, y in enumerate(ys)]


def combine(shares: list[tuple[int, bytes]]) -> bytes:
    """Lagrange interpolation at 0 of the given shares (all of the same length, distinct x)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 255 for x in xs):
        raise PolicyError("share", "distinct", "the same share was given twice")
    length = len(shares[0][1])
    if any(len(y) != length for _, y in shares):
        raise PolicyError("share", "length", "the shares are of different lengths (not from the same set)")
    out = bytearray()
    for k in range(length):
        acc = 0
        for i, (xi, yi) in enumerate(shares):
            num, den = 1, 1
            for j, (xj, _) in enumerate(shares):
                if i != j:
                    num = gf_mul(num, xj)
                    den = gf_mul(den, xi ^ xj)
            acc ^= gf_mul(yi[k], gf_div(num, den))
        out.append(acc)
    return bytes(out)


# ---------------------------------------------------------------- the PIN payload and the share text


def _check(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def split_pin(pin: str, m: int, n: int, rand: Callable[[int], bytes]) -> list[str]:
    """The PIN as n checksummed share texts, any m of which activate."""
    raw = pin.encode()
    if len(raw) > 255:
        raise PolicyError("quorum", "secret", "the PIN is too long to split")
    payload = bytes([len(raw)]) + raw + hashlib.sha256(raw).digest()[:4]
    set_id = rand(4).hex()
    out = []
    for x, y in split(payload, m, n, rand):
        body = f"{PREFIX}-{set_id}-{m}-{x}-{y.hex()}"
        out.append(f"{body}-{_check(body)}")
    return out


def parse_share(text: str) -> tuple[str, int, int, bytes]:
    """(set id, threshold, x, y) of one share text; a typo fails its checksum."""
    t = "".join(text.split()).lower()
    parts = t.split("-")
    if len(parts) != 6 or parts[0] != PREFIX.lower():
        raise PolicyError("share", "format", "not a Donjon share (DJS1-set-threshold-index-data-check)")
    _, set_id, m, x, data, check = parts
    body = f"{PREFIX}-{set_id}-{m}-{x}-{data}"
    if _check(body) != check:
        raise PolicyError("share", "checksum", f"share {x if x.isdigit() else '?'} fails its checksum (a typo?)")
    try:
        mi, xi, y = int(m), int(x), bytes.fromhex(data)
    except ValueError:
        raise PolicyError("share", "format", "malformed share") from None
    if not 2 <= mi <= MAX_SHARES or not 1 <= xi <= 255 or len(y) < 6:
        raise PolicyError("share", "format", "malformed share")
    return set_id, mi, xi, y


def combine_pin(texts: list[str]) -> str:
    """The PIN from at least `threshold` share texts of one set; refuses anything else clearly."""
    if not texts:
        raise PolicyError("share", "count", "no share given")
    parsed = [parse_share(t) for t in texts]
    sets = {p[0] for p in parsed}
    if len(sets) != 1:
        raise PolicyError("share", "set", "the shares come from different sets")
    thresholds = {p[1] for p in parsed}
    if len(thresholds) != 1:
        raise PolicyError("share", "set", "the shares disagree on the threshold")
    m = thresholds.pop()
    xs = {p[2] for p in parsed}
    if len(xs) != len(parsed):
        raise PolicyError("share", "distinct", "the same share was given twice")
    if len(parsed) < m:
        raise PolicyError("share", "count", f"{m} shares are needed, {len(parsed)} given")
    payload = combine([(p[2], p[3]) for p in parsed[:m]])
    n = payload[0]
    raw, check = payload[1:1 + n], payload[1 + n:]
    if len(payload) != n + 5 or hashlib.sha256(raw).digest()[:4] != check:
        raise PolicyError("share", "combine", "the shares do not combine to a valid secret")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise PolicyError("share", "combine", "the shares do not combine to a valid secret") from None

"""Streaming, incremental DER encoder for X.509 v2 CRLs (RFC 5280 §5).

Pure Python, no I/O. The CIS builds the TBSCertList itself from structured entries streamed by the
Factory, hashes the bytes as they are produced and signs the digest at the end:

    tbs = TbsCrl(issuer_name_der=..., key_type="rsa2048", this_update=..., next_update=...,
                 crl_number=..., aki_key_id=..., entry_count=n, entries_length=total)
    h.update(tbs.header())
    for chunk in chunks:
        h.update(tbs.entries(chunk))
    h.update(tbs.trailer())             # refuses if the declaration was wrong
    prefix, suffix = certificate_list(tbs.length(), "rsa2048", signature)
    crl = prefix + <tbs bytes> + suffix

Entries are ``(serial, revoked_at, reason, invalidity)``: serial > 0 (at most 20 content octets),
revoked_at in epoch seconds UTC, reason a CRLReason code or None (0 = unspecified is never encoded,
RFC 5280 §5.3.1), invalidity date in epoch seconds or None. Times are UTCTime for 1950–2049 and
GeneralizedTime from 2050 (RFC 5280 §4.1.2.5 / §5.1.2.4); the invalidity date is always
GeneralizedTime (§5.3.2). Times outside 1950-01-01..9999-12-31 are refused.

Speed: entries are encoded without datetime objects: the date part of every time comes from a
per-day cache (computed with integer civil-from-days arithmetic), the time-of-day part from a table of
the 86,400 possible ``HHMMSSZ`` strings, and every entry's tag/length octets from precomputed tables.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable

__all__ = [
    "REASONS",
    "Entry",
    "entry_length",
    "encode_entries",
    "algorithm_identifier",
    "TbsCrl",
    "certificate_list",
    "shard_of",
    "shard_url",
    "idp_der",
    "delta_url",
    "check_encoded",
    "decode_encoded",
    "crl_stub",
]

REASONS = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    # removeFromCRL (8) is not here: RFC 5280 §5.3.1 allows it in delta CRLs only, and relying parties
    # disagree on what it means in a full CRL (revoked for some, not revoked for others).
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}

Entry = tuple[int, int, int | None, int | None]

# --------------------------------------------------------------------------------------------------
# DER primitives


def _der_len(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative length")
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if len(body) > 126:
        raise ValueError("length too large")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _der_len(len(content)) + content


def _der_uint(value: int) -> bytes:
    """Content octets of a non-negative DER INTEGER (minimal, leading 0x00 if the high bit is set)."""
    return value.to_bytes((value.bit_length() >> 3) + 1, "big")


def _parse_tlv(data: bytes | memoryview, pos: int = 0) -> tuple[int, int, int]:
    """Return (tag, content_start, content_end) of the DER TLV at pos; ValueError if malformed."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags not supported")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        nbytes = first & 0x7F
        if nbytes == 0 or nbytes > 4 or pos + nbytes > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + nbytes], "big")
        if length < 0x80 or data[pos] == 0:
            raise ValueError("non-minimal DER length")
        pos += nbytes
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, pos, end


def _check_single_sequence(der: bytes, what: str) -> None:
    if not isinstance(der, (bytes, bytearray)):
        raise ValueError(f"{what} must be bytes")
    tag, start, end = _parse_tlv(der)
    if tag != 0x30 or end != len(der):
        raise ValueError(f"{what} must be exactly one DER SEQUENCE")
    return None


# --------------------------------------------------------------------------------------------------
# Times

_SECONDS_PER_DAY = 86400
_MIN_YEAR, _MAX_YEAR = 1950, 9999
_DAY_CACHE_MAX = 8192

# HHMMSSZ for every second of the day, built on first use (~3 MB, ~20 ms).
_SOD: list[bytes] = []


def _sod() -> list[bytes]:
    if not _SOD:
        hms = [b"%02d%02d" % divmod(i, 60) for i in range(3600)]
        _SOD.extend(b"%02d%sZ" % (h, ms) for h in range(24) for ms in hms)
    return _SOD


def _civil_from_days(z: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of days since 1970-01-01 (H. Hinnant's algorithm)."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return y + (m <= 2), m, d


def _day_date(day: int) -> tuple[int, int, int]:
    if type(day) is not int:
        raise ValueError("time must be an integer number of seconds")
    y, m, d = _civil_from_days(day)
    if not _MIN_YEAR <= y <= _MAX_YEAR:
        raise ValueError(f"time out of range (year {y}; allowed {_MIN_YEAR}..{_MAX_YEAR})")
    return y, m, d


# day -> (Time TLV prefix up to the date, full Time TLV length)
_TIME_DAY: dict[int, tuple[bytes, int]] = {}
# day -> invalidityDate extension prefix up to the date
_INV_DAY: dict[int, bytes] = {}

# Extension OIDs
_OID_REASON = b"\x06\x03\x55\x1d\x15"
_OID_INVALIDITY = b"\x06\x03\x55\x1d\x18"
_OID_CRL_NUMBER = b"\x06\x03\x55\x1d\x14"
_OID_AKI = b"\x06\x03\x55\x1d\x23"
_OID_IDP = b"\x06\x03\x55\x1d\x1c"
_OID_EXPIRED_CERTS_ON_CRL = b"\x06\x03\x55\x1d\x3c"
_OID_DELTA_CRL_INDICATOR = b"\x06\x03\x55\x1d\x1b"
_OID_FRESHEST_CRL = b"\x06\x03\x55\x1d\x2e"

# invalidityDate Extension: SEQUENCE { OID, OCTET STRING { GeneralizedTime(15) } } = 26 octets
_INV_EXT_PREFIX = b"\x30\x18" + _OID_INVALIDITY + b"\x04\x11\x18\x0f"
_INV_EXT_LEN = 26


def _time_day(day: int) -> tuple[bytes, int]:
    v = _TIME_DAY.get(day)
    if v is None:
        y, m, d = _day_date(day)
        if y < 2050:
            v = (b"\x17\x0d%02d%02d%02d" % (y % 100, m, d), 15)
        else:
            v = (b"\x18\x0f%04d%02d%02d" % (y, m, d), 17)
        if len(_TIME_DAY) >= _DAY_CACHE_MAX:
            _TIME_DAY.clear()
        _TIME_DAY[day] = v
    return v


def _inv_day(day: int) -> bytes:
    v = _INV_DAY.get(day)
    if v is None:
        y, m, d = _day_date(day)
        v = _INV_EXT_PREFIX + b"%04d%02d%02d" % (y, m, d)
        if len(_INV_DAY) >= _DAY_CACHE_MAX:
            _INV_DAY.clear()
        _INV_DAY[day] = v
    return v


def _encode_time(t: int) -> bytes:
    if type(t) is not int:
        raise ValueError("time must be an integer number of seconds")
    day, sec = divmod(t, _SECONDS_PER_DAY)
    return _time_day(day)[0] + _sod()[sec]


def _encode_generalized_time(t: int) -> bytes:
    if type(t) is not int:
        raise ValueError("time must be an integer number of seconds")
    day, sec = divmod(t, _SECONDS_PER_DAY)
    y, m, d = _day_date(day)
    return b"\x18\x0f%04d%02d%02d" % (y, m, d) + _sod()[sec]


# --------------------------------------------------------------------------------------------------
# Entries

_REASON_CODES = frozenset(v for v in REASONS.values())
# reasonCode Extension: SEQUENCE { OID, OCTET STRING { ENUMERATED } } = 12 octets
_REASON_EXT = {c: b"\x30\x0a" + _OID_REASON + b"\x04\x03\x0a\x01" + bytes((c,)) for c in _REASON_CODES if c}

# reason -> complete crlEntryExtensions when there is no invalidity date
_EXTS_NO_INV: dict = {None: b"", 0: b""}
# reason -> crlEntryExtensions prefix (header + reasonCode) when an invalidity date follows
_EXTS_INV: dict = {}
for _c, _x in _REASON_EXT.items():
    _EXTS_NO_INV[_c] = b"\x30" + bytes((len(_x),)) + _x
    _EXTS_INV[_c] = b"\x30" + bytes((len(_x) + _INV_EXT_LEN,)) + _x
_EXTS_INV[None] = _EXTS_INV[0] = b"\x30" + bytes((_INV_EXT_LEN,))
# A delta CRL's tables also know removeFromCRL (8): RFC 5280 §5.3.1 allows it there only.
_REMOVE = b"\x30\x0a" + _OID_REASON + b"\x04\x03\x0a\x01\x08"
_EXTS_NO_INV_DELTA: dict = {**_EXTS_NO_INV, 8: b"\x30" + bytes((len(_REMOVE),)) + _REMOVE}
_EXTS_INV_DELTA: dict = {**_EXTS_INV, 8: b"\x30" + bytes((len(_REMOVE) + _INV_EXT_LEN,)) + _REMOVE}
del _c, _x
# Without the invalidity date the length of the extensions is len(_EXTS_NO_INV[r]); with it,
# len(_EXTS_INV[r]) + 26. The entry's content length never reaches 128 octets:
# 2+20 (serial) + 17 (time) + 2+12+26 (extensions) = 79.

# Entry header + serial header, indexed [content_length][serial_octets]: b"\x30 L \x02 n".
_HEADS = [[bytes((0x30, cl, 0x02, n)) for n in range(22)] for cl in range(128)]


def _bad_entry(entry, delta: bool = False) -> ValueError:
    """Explain why an entry was refused (slow path, only after the fast path failed)."""
    try:
        serial, revoked_at, reason, invalidity = entry
    except (TypeError, ValueError):
        return ValueError(f"entry must be a 4-tuple, got {entry!r}")
    if type(serial) is not int:
        return ValueError(f"serial must be an int, got {type(serial).__name__}")
    if serial <= 0:
        return ValueError(f"serial must be positive, got {serial}")
    if (serial.bit_length() >> 3) + 1 > 20:
        return ValueError("serial longer than 20 octets")
    if reason == 8 and type(reason) is int and not delta:
        return ValueError("removeFromCRL (8) is allowed in delta CRLs only (RFC 5280 §5.3.1)")
    if reason is not None and (type(reason) is not int or reason not in _REASON_CODES | ({8} if delta else set())):
        return ValueError(f"invalid reason code {reason!r}")
    for name, t in (("revoked_at", revoked_at), ("invalidity", invalidity)):
        if name == "invalidity" and t is None:
            continue
        try:
            _encode_time(t)
        except ValueError as e:
            return ValueError(f"{name}: {e}")
    return ValueError(f"invalid entry {entry!r}")


def _encode(entries: Iterable[Entry], delta: bool = False) -> tuple[list[bytes], int]:
    """Encode entries; return (parts, count). Every entry contributes exactly one part.
    removeFromCRL (8) only with delta=True (a delta CRL)."""
    sod = _sod()
    heads = _HEADS
    time_get = _TIME_DAY.get
    inv_get = _INV_DAY.get
    exts_no_inv = _EXTS_NO_INV_DELTA if delta else _EXTS_NO_INV
    exts_inv = _EXTS_INV_DELTA if delta else _EXTS_INV
    out: list[bytes] = []
    append = out.append
    entry = None
    try:
        for entry in entries:
            serial, revoked_at, reason, invalidity = entry
            # type() checks: refuse bool/float/str early and cheaply.
            if type(serial) is not int or serial <= 0 or type(revoked_at) is not int:
                raise ValueError
            n = (serial.bit_length() >> 3) + 1
            if n > 20:
                raise ValueError
            day, sec = divmod(revoked_at, 86400)
            tv = time_get(day)
            if tv is None:
                tv = _time_day(day)
            tp, tl = tv
            if invalidity is None:
                ext = exts_no_inv[reason]
                if ext:
                    if type(reason) is not int:
                        raise ValueError
                    append(heads[2 + n + tl + len(ext)][n] + serial.to_bytes(n, "big") + tp + sod[sec] + ext)
                else:
                    if reason is not None and type(reason) is not int:
                        raise ValueError
                    append(heads[2 + n + tl][n] + serial.to_bytes(n, "big") + tp + sod[sec])
            else:
                if type(invalidity) is not int or (reason is not None and type(reason) is not int):
                    raise ValueError
                ext = exts_inv[reason]
                iday, isec = divmod(invalidity, 86400)
                ip = inv_get(iday)
                if ip is None:
                    ip = _inv_day(iday)
                append(
                    heads[28 + n + tl + len(ext)][n]
                    + serial.to_bytes(n, "big")
                    + tp
                    + sod[sec]
                    + ext
                    + ip
                    + sod[isec]
                )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError):
        raise _bad_entry(entry, delta) from None
    return out, len(out)


def encode_entries(entries: Iterable[Entry]) -> bytes:
    """Concatenated DER of the revokedCertificates elements, in the caller's order."""
    parts, _ = _encode(entries)
    return b"".join(parts)


def entry_length(serial: int, revoked_at: int, reason: int | None, invalidity: int | None) -> int:
    """Exact encoded length of one revokedCertificates element (ValueError if the entry is invalid)."""
    entry = (serial, revoked_at, reason, invalidity)
    try:
        if type(serial) is not int or serial <= 0 or type(revoked_at) is not int:
            raise ValueError
        n = (serial.bit_length() >> 3) + 1
        if n > 20:
            raise ValueError
        tl = _time_day(revoked_at // 86400)[1]
        if reason is not None and type(reason) is not int:
            raise ValueError
        if invalidity is None:
            ext = len(_EXTS_NO_INV_DELTA[reason])  # the length of 8 too (the encoder decides where it may go)
        else:
            if type(invalidity) is not int:
                raise ValueError
            _inv_day(invalidity // 86400)
            ext = len(_EXTS_INV_DELTA[reason]) + _INV_EXT_LEN
        return 4 + n + tl + ext
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        raise _bad_entry(entry) from None


_MIN_ENTRY_LEN = 4 + 1 + 15  # 1-octet serial, UTCTime, no extensions
_MAX_ENTRY_LEN = 2 + 79

# --------------------------------------------------------------------------------------------------
# Algorithms and the CRL structure

_ALGIDS = {
    "rsa2048": bytes.fromhex("300d06092a864886f70d01010b0500"),  # sha256WithRSAEncryption, NULL
    "rsa3072": bytes.fromhex("300d06092a864886f70d01010b0500"),
    "rsa4096": bytes.fromhex("300d06092a864886f70d01010c0500"),  # sha384WithRSAEncryption, NULL
    "p256": bytes.fromhex("300a06082a8648ce3d040302"),  # ecdsa-with-SHA256
    "p384": bytes.fromhex("300a06082a8648ce3d040303"),  # ecdsa-with-SHA384
    "ed25519": bytes.fromhex("300506032b6570"),  # id-Ed25519, no parameters
}


def algorithm_identifier(key_type: str) -> bytes:
    """DER AlgorithmIdentifier of the signature made with a CA key of this type."""
    try:
        return _ALGIDS[key_type]
    except (KeyError, TypeError):
        raise ValueError(f"unknown key type {key_type!r}") from None


def _uri(url: str) -> bytes:
    """GeneralName uniformResourceIdentifier [6] IA5String (refused if not ASCII or not a URL)."""
    if not isinstance(url, str) or not url.isascii() or "://" not in url or len(url) > 2048 or any(c <= " " for c in url):
        raise ValueError(f"not a URL fit for a distribution point: {url!r}")
    return _tlv(0x86, url.encode("ascii"))


def _dp_name(url: str) -> bytes:
    """distributionPoint [0] { fullName [0] GeneralNames { URI } } (a tagged CHOICE: explicit)."""
    return _tlv(0xA0, _tlv(0xA0, _uri(url)))


def idp_der(url: str) -> bytes:
    """issuingDistributionPoint value naming exactly one URL: the scope of a partitioned CRL (RFC 5280 §5.2.5)."""
    return _tlv(0x30, _dp_name(url))


def shard_of(serial: int, shards: int) -> int:
    """The CRL shard of a certificate, by serial (serials are random: shards fill evenly)."""
    if type(shards) is not int or not 1 <= shards <= 256:
        raise ValueError("shards must be 1..256")
    return serial % shards


def shard_url(crl_url: str, shard: int, shards: int) -> str:
    """The URL of one shard beside the CA's single CRL URL: <ca>.crl becomes <ca>-<k>.crl; unchanged with one shard."""
    if shards == 1:
        return crl_url
    if not 0 <= shard < shards or not crl_url.endswith(".crl"):
        raise ValueError(f"no shard {shard} of {shards} for {crl_url!r}")
    return f"{crl_url[:-4]}-{shard}.crl"


def delta_url(crl_url: str) -> str:
    """Where the delta CRL of the CA whose full CRL is at crl_url is published."""
    if not crl_url.endswith(".crl"):
        raise ValueError(f"no delta URL for {crl_url!r}")
    return f"{crl_url[:-4]}-delta.crl"


def _extension(oid_tlv: bytes, value: bytes, critical: bool = False) -> bytes:
    return _tlv(0x30, oid_tlv + (b"\x01\x01\xff" if critical else b"") + _tlv(0x04, value))


class TbsCrl:
    """Incremental TBSCertList. The caller declares the entry count and total entries length up front;
    trailer() (the finish step) refuses if what was encoded does not match (so a lying sender can't make
    us sign a wrong structure).

    Call header() once, entries() for every batch, then trailer(): trailer() raises ValueError if the
    count or the length of the encoded entries differs from the declaration. entries() raises as soon
    as a batch would exceed the declaration.
    """

    def __init__(
        self,
        *,
        issuer_name_der: bytes,
        key_type: str,
        this_update: int,
        next_update: int,
        crl_number: int,
        aki_key_id: bytes,
        entry_count: int,
        entries_length: int,
        idp_der: bytes | None = None,
        expired_certs_on_crl: int | None = None,
        delta_base: int | None = None,
        freshest_crl_url: str | None = None,
    ):
        algid = algorithm_identifier(key_type)
        issuer_name_der = bytes(issuer_name_der) if isinstance(issuer_name_der, bytearray) else issuer_name_der
        _check_single_sequence(issuer_name_der, "issuer_name_der")
        if issuer_name_der == b"\x30\x00":
            raise ValueError("the CRL issuer name must not be empty (RFC 5280 §5.1.2.3)")
        for name, t in (("this_update", this_update), ("next_update", next_update)):
            if type(t) is not int:
                raise ValueError(f"{name} must be an int")
        if next_update <= this_update:
            raise ValueError("next_update must be later than this_update")
        if type(crl_number) is not int or crl_number < 0 or len(_der_uint(crl_number)) > 20:
            raise ValueError("crl_number must be a non-negative integer of at most 20 octets")
        if not isinstance(aki_key_id, (bytes, bytearray)) or not 1 <= len(aki_key_id) <= 64:
            raise ValueError("aki_key_id must be 1..64 bytes")
        if type(entry_count) is not int or entry_count < 0:
            raise ValueError("entry_count must be a non-negative int")
        if type(entries_length) is not int or entries_length < 0:
            raise ValueError("entries_length must be a non-negative int")
        if not entry_count * _MIN_ENTRY_LEN <= entries_length <= entry_count * _MAX_ENTRY_LEN:
            raise ValueError("entries_length is impossible for entry_count")
        if idp_der is not None:
            _check_single_sequence(idp_der, "idp_der")
        if expired_certs_on_crl is not None and type(expired_certs_on_crl) is not int:
            raise ValueError("expired_certs_on_crl must be an int")
        if delta_base is not None:
            # RFC 5280 §5.2.4: the delta's own number comes from the base's sequence, after it
            if type(delta_base) is not int or not 0 <= delta_base < crl_number:
                raise ValueError("delta_base must be a CRL number below the delta's own crl_number")
            if freshest_crl_url is not None:
                raise ValueError("a delta CRL does not point at a fresher CRL (freshestCRL is for full CRLs)")

        self._entry_count = entry_count
        self._entries_length = entries_length
        self._count = 0
        self._length = 0
        self._state = 0  # 0 new, 1 header given, 2 finished
        self._delta = delta_base is not None  # removeFromCRL entries allowed

        exts = [
            _extension(_OID_AKI, _tlv(0x30, _tlv(0x80, bytes(aki_key_id)))),
            _extension(_OID_CRL_NUMBER, _tlv(0x02, _der_uint(crl_number))),
        ]
        if idp_der is not None:
            exts.append(_extension(_OID_IDP, bytes(idp_der), critical=True))
        if expired_certs_on_crl is not None:
            exts.append(_extension(_OID_EXPIRED_CERTS_ON_CRL, _encode_generalized_time(expired_certs_on_crl)))
        if delta_base is not None:
            exts.append(_extension(_OID_DELTA_CRL_INDICATOR, _tlv(0x02, _der_uint(delta_base)), critical=True))
        if freshest_crl_url is not None:  # CRLDistributionPoints syntax: one DP, fullName, one URI
            exts.append(_extension(_OID_FRESHEST_CRL, _tlv(0x30, _tlv(0x30, _dp_name(freshest_crl_url)))))
        self._trailer = _tlv(0xA0, _tlv(0x30, b"".join(exts)))

        fixed = (
            b"\x02\x01\x01"  # version v2
            + algid
            + issuer_name_der
            + _encode_time(this_update)
            + _encode_time(next_update)
        )
        revoked_hdr = b"\x30" + _der_len(entries_length) if entry_count else b""
        content_len = len(fixed) + len(revoked_hdr) + entries_length + len(self._trailer)
        self._header = b"\x30" + _der_len(content_len) + fixed + revoked_hdr
        self._total = len(self._header) + entries_length + len(self._trailer)

    def header(self) -> bytes:
        if self._state == 2:
            raise ValueError("TBSCertList already finished")
        self._state = 1
        return self._header

    def entries(self, batch: Iterable[Entry]) -> bytes:
        if self._state != 1:
            raise ValueError("entries() must come after header() and before trailer()")
        parts, count = _encode(batch, self._delta)
        data = b"".join(parts)
        self._count += count
        self._length += len(data)
        if self._count > self._entry_count or self._length > self._entries_length:
            self._state = 2  # poisoned: no trailer for this object
            raise ValueError(
                f"entries exceed the declaration ({self._count}/{self._entry_count} entries, "
                f"{self._length}/{self._entries_length} octets)"
            )
        return data

    def encoded(self, data: bytes, after: bytes = b"") -> list[bytes]:
        """Account for a batch of entries encoded elsewhere, after the strict check of `check_encoded` (full
        CRLs only: a delta's removeFromCRL is not among its shapes). Returns the batch's serial octets."""
        if self._state != 1:
            raise ValueError("entries must come after header() and before trailer()")
        if self._delta:
            raise ValueError("a delta CRL's entries are encoded here, not sent encoded")
        keys = check_encoded(data, after)
        self._count += len(keys)
        self._length += len(data)
        if self._count > self._entry_count or self._length > self._entries_length:
            self._state = 2
            raise ValueError(
                f"entries exceed the declaration ({self._count}/{self._entry_count} entries, "
                f"{self._length}/{self._entries_length} octets)"
            )
        return keys

    def trailer(self) -> bytes:
        if self._state != 1:
            raise ValueError("trailer() must come after header() and entries(), once")
        self._state = 2
        if self._count != self._entry_count or self._length != self._entries_length:
            raise ValueError(
                f"encoded entries differ from the declaration ({self._count}/{self._entry_count} entries, "
                f"{self._length}/{self._entries_length} octets)"
            )
        return self._trailer

    def length(self) -> int:
        return self._total


def certificate_list(tbs_length: int, key_type: str, signature: bytes) -> tuple[bytes, bytes]:
    """(outer_prefix, suffix) around the TBS bytes: the CRL is outer_prefix + tbs + suffix."""
    algid = algorithm_identifier(key_type)
    if type(tbs_length) is not int or tbs_length <= 0:
        raise ValueError("tbs_length must be a positive int")
    if not isinstance(signature, (bytes, bytearray)) or not signature:
        raise ValueError("signature must be non-empty bytes")
    signature = bytes(signature)
    if key_type == "ed25519" and len(signature) != 64:
        raise ValueError("an Ed25519 signature is 64 octets")
    if key_type in ("p256", "p384"):
        _check_single_sequence(signature, "ECDSA signature")
    suffix = algid + _tlv(0x03, b"\x00" + signature)
    return b"\x30" + _der_len(tbs_length + len(suffix)), suffix


# --------------------------------------------------------------------------------------------------
# Pre-encoded entries: the strict check of a buffer of revokedCertificates elements


def _entry_pattern() -> re.Pattern[bytes]:
    """One regular expression that matches exactly the revokedCertificates elements `_encode` makes for a
    full CRL: minimal positive serial of 1..20 octets, UTCTime for 1950-2049 and GeneralizedTime from 2050
    with real calendar dates, no extension, reasonCode (never unspecified nor removeFromCRL),
    invalidityDate or both, each length octet the one its content has. Branches are keyed by the
    length octets and atomic, the repetition possessive: the check runs in C at a few hundred ns an entry."""
    mmdd = (rb"(?:(?:0[13578]|1[02])(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)(?:0[1-9]|[12][0-9]|30)"
            rb"|02(?:0[1-9]|1[0-9]|2[0-8]))")
    hms = rb"(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]Z"
    utc = rb"(?:[0-9][0-9]" + mmdd + rb"|(?:[02468][048]|[13579][26])0229)" + hms  # YY 50-99, 00-49: all leap rules agree

    def gen(first: bytes, years: bytes) -> bytes:  # GeneralizedTime YYYYMMDDHHMMSSZ with the Gregorian leap rule
        leap = rb"(?:[0-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
        return rb"(?:" + years + mmdd + rb"|(?=" + first + rb")" + leap + rb"0229)" + hms
    gen2050 = gen(rb"20[5-9]|2[1-9]|[3-9]", rb"(?:20[5-9][0-9]|2[1-9][0-9][0-9]|[3-9][0-9]{3})")
    gen1950 = gen(rb"19[5-9]|[2-9]", rb"(?:19[5-9][0-9]|[2-9][0-9]{3})")
    reasons = b"".join(re.escape(bytes((c,))) for c in sorted(c for c in _REASON_CODES if c))
    reason = re.escape(b"\x30\x0a" + _OID_REASON + b"\x04\x03\x0a\x01") + rb"[" + reasons + rb"]"
    inv = re.escape(_INV_EXT_PREFIX) + gen1950
    exts = {0: b"", 14: rb"\x30\x0c" + reason, 28: rb"\x30\x1a" + inv, 40: rb"\x30\x26" + reason + inv}
    by_len: dict[int, list[bytes]] = {}
    for n in range(1, 21):
        if n == 1:
            serial = rb"[\x01-\x7f]"
        else:  # minimal and positive: a leading 0x00 only before a high bit
            serial = rb"(?:[\x01-\x7f][\x00-\xff]{%d}|\x00[\x80-\xff][\x00-\xff]{%d})" % (n - 1, n - 2)
        for tl, time_ in ((15, rb"\x17\x0d" + utc), (17, rb"\x18\x0f" + gen2050)):
            for el, ext in exts.items():
                by_len.setdefault(2 + n + tl + el, []).append(re.escape(bytes((n,))) + serial + time_ + ext)
    entry = rb"\x30(?>" + rb"|".join(re.escape(bytes((ln,))) + rb"\x02(?>" + rb"|".join(alts) + rb")"
                                     for ln, alts in sorted(by_len.items())) + rb")"
    return re.compile(rb"(?:" + entry + rb")*+", re.DOTALL)


# After the strict check, this one splits the same buffer into the same entries and captures each serial's
# INTEGER (an extension's SEQUENCE can't be taken for the next entry: an entry's third octet is 0x02).
_SERIALS = re.compile(rb"\x30[\x00-\x7f](\x02(?:" + rb"|".join(re.escape(bytes((n,))) + rb"[\x00-\xff]{%d}" % n for n in range(1, 21))
                      + rb"))(?:\x17\x0d[\x00-\xff]{13}|\x18\x0f[\x00-\xff]{15})"
                      rb"(?:\x30\x0c\x30\x0a[\x00-\xff]{10}|\x30\x1a\x30\x18[\x00-\xff]{24}|\x30\x26\x30\x0a[\x00-\xff]{36})?",
                      re.DOTALL)
_STRICT: list[re.Pattern[bytes]] = []


def check_encoded(data: bytes, after: bytes = b"") -> list[bytes]:
    """Check a buffer of pre-encoded revokedCertificates elements of a full CRL, as a CIS must before it signs
    bytes it did not encode: every element exactly of a shape the encoder makes (see `_entry_pattern`), and
    serials strictly increasing after `after` in the CMDB's order (their minimal unsigned octets compared as
    bytes: no duplicate). Returns those serial octets; ValueError otherwise."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("entries must be bytes")
    if not _STRICT:
        _STRICT.append(_entry_pattern())
    if _STRICT[0].fullmatch(data) is None:
        raise ValueError("the entries are not DER revokedCertificates elements of the encoder's shapes")
    keys = [t[2:].lstrip(b"\x00") for t in _SERIALS.findall(data)]
    if keys and not (after < keys[0] and all(map(operator.lt, keys, itertools.islice(keys, 1, None)))):
        raise ValueError("serials out of order or duplicated")
    return keys


def _decode_time(tlv: bytes) -> int:
    """Epoch seconds of a UTCTime or GeneralizedTime TLV the strict check accepted."""
    v = tlv[2:].decode("ascii")
    if tlv[0] == 0x17:
        yy = int(v[:2])
        v = ("19" if yy >= 50 else "20") + v  # RFC 5280 §4.1.2.5.1
    y, mo, d, h, mi, s = int(v[:4]), int(v[4:6]), int(v[6:8]), int(v[8:10]), int(v[10:12]), int(v[12:14])
    a = (14 - mo) // 12  # days from civil (the inverse of _civil_from_days)
    yy2, mm = y + 4800 - a, mo + 12 * a - 3
    jdn = d + (153 * mm + 2) // 5 + 365 * yy2 + yy2 // 4 - yy2 // 100 + yy2 // 400 - 32045
    return (jdn - 2440588) * 86400 + h * 3600 + mi * 60 + s


def decode_encoded(data: bytes, limit: int) -> list[Entry]:
    """The first `limit` entries of a buffer `check_encoded` accepted, back as (serial, revoked_at, reason,
    invalidity): the CIS lints a sample CRL the encoder builds from them."""
    out: list[Entry] = []
    pos = 0
    while pos < len(data) and len(out) < limit:
        end = pos + 2 + data[pos + 1]
        n = data[pos + 3]
        serial = int.from_bytes(data[pos + 4:pos + 4 + n], "big")
        t = pos + 4 + n
        revoked = _decode_time(data[t:t + 2 + data[t + 1]])
        t += 2 + data[t + 1]
        reason: int | None = None
        invalidity: int | None = None
        if t < end:  # crlEntryExtensions: reasonCode and/or invalidityDate, in this order
            t += 2
            while t < end:
                ext_end = t + 2 + data[t + 1]
                if data[t + 6] == 0x15:
                    reason = data[ext_end - 1]
                else:
                    invalidity = _decode_time(data[ext_end - 17:ext_end])
                t = ext_end
        out.append((serial, revoked, reason, invalidity))
        pos = end
    return out


def crl_stub(der: bytes | memoryview) -> bytes:
    """The CRL `der` with its revokedCertificates left out: a few hundred octets that a DER parser reads for
    the header and the extensions (number, IDP, deltaCRLIndicator) without touching a million entries. The
    outer structure is checked to span `der` exactly; the stub's signature no longer verifies (it is for
    reading fields, never for trust)."""
    view = memoryview(der)
    tag, start, end = _parse_tlv(view, 0)
    if tag != 0x30 or end != len(view):
        raise ValueError("not one DER SEQUENCE")
    ttag, tstart, tend = _parse_tlv(view, start)
    if ttag != 0x30:
        raise ValueError("no TBSCertList")
    fields = []
    pos = tstart
    seen_time = False
    while pos < tend:  # version, signature, issuer, thisUpdate, nextUpdate, revokedCertificates, [0] extensions
        ftag, fstart, fend = _parse_tlv(view, pos)
        if not (ftag == 0x30 and seen_time):  # the one SEQUENCE after the times is the entries: skipped
            fields.append(bytes(view[pos:fend]))
        seen_time = seen_time or ftag in (0x17, 0x18)
        pos = fend
    tbs = _tlv(0x30, b"".join(fields))
    return _tlv(0x30, tbs + bytes(view[tend:end]))


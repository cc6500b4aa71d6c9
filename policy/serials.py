"""The issued-serials list: a CA-signed list of every serial a CA has issued (encoder and parser, pure).

Our open counterpart of a Certificate Issuance List, so that a relying OCSP responder fed by CRLs
never says `good` for a serial that was never issued. DER, shaped like an X.509 CRL so that the same
streaming signer serves both (see README, "Issued-serials list"):

    IssuedSerialsList ::= SEQUENCE {
        tbsList             TBSIssuedSerials,
        signatureAlgorithm  AlgorithmIdentifier,    -- as for the CA's CRLs
        signature           BIT STRING }

    TBSIssuedSerials ::= SEQUENCE {
        version             INTEGER (1),
        listType            OBJECT IDENTIFIER,      -- id-donjon-issuedSerials-v1 (LIST_OID)
        signature           AlgorithmIdentifier,    -- same as signatureAlgorithm
        issuer              Name,                   -- the CA's subject
        authorityKeyId      OCTET STRING,           -- the CA's subject key identifier
        listNumber          INTEGER,                -- increases with every list of this CA
        thisUpdate          GeneralizedTime,
        nextUpdate          GeneralizedTime,
        serials             SEQUENCE OF INTEGER }   -- each > 0, no duplicates, ordered (below)

Serials are ordered by their minimal unsigned big-endian octets compared as byte strings (the order
of the CMDB's index, so the list streams straight from it); a reader can binary-search it.
Like `policy.crl.TbsCrl`, the encoder takes the count and the total length of the serials up front,
streams them, and refuses to finish if what was encoded differs from the declaration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from policy.crl import _check_single_sequence, _der_len, _der_uint, _encode_generalized_time, _parse_tlv, _tlv, algorithm_identifier

# 1.3.6.1.4.1.99999.3.1 (99999: the placeholder enterprise number of DONJON-MIB until one is registered)
LIST_OID = "1.3.6.1.4.1.99999.3.1"
_LIST_OID_TLV = bytes.fromhex("060a2b06010401868d1f0301")

_SIG_HASHES = {
    "1.2.840.113549.1.1.11": hashes.SHA256, "1.2.840.113549.1.1.12": hashes.SHA384,
    "1.2.840.10045.4.3.2": hashes.SHA256, "1.2.840.10045.4.3.3": hashes.SHA384, "1.3.101.112": None,
}


def serial_length(serial_octets: bytes) -> int:
    """Length of the INTEGER TLV for a positive serial given as minimal big-endian octets."""
    return 2 + len(serial_octets) + (1 if serial_octets[0] & 0x80 else 0)


class TbsSerials:
    def __init__(self, *, issuer_name_der: bytes, key_type: str, aki_key_id: bytes, list_number: int,
                 this_update: int, next_update: int, count: int, serials_length: int):
        algid = algorithm_identifier(key_type)
        _check_single_sequence(bytes(issuer_name_der), "issuer_name_der")
        if next_update <= this_update:
            raise ValueError("next_update must be later than this_update")
        if type(list_number) is not int or list_number < 0:
            raise ValueError("list_number must be a non-negative int")
        if not count * 3 <= serials_length <= count * 23:
            raise ValueError("serials_length is impossible for count")
        self._count, self._declared = count, serials_length
        self._n = self._len = 0
        self._last = b""
        self._state = 0
        fixed = (b"\x02\x01\x01" + _LIST_OID_TLV + algid + bytes(issuer_name_der) + _tlv(0x04, bytes(aki_key_id))
                 + _tlv(0x02, _der_uint(list_number)) + _encode_generalized_time(this_update)
                 + _encode_generalized_time(next_update))
        seq_hdr = b"\x30" + _der_len(serials_length)
        content = len(fixed) + len(seq_hdr) + serials_length
        self._header = b"\x30" + _der_len(content) + fixed + seq_hdr
        self._total = len(self._header) + serials_length

    def header(self) -> bytes:
        if self._state != 0:
            raise ValueError("header() once, first")
        self._state = 1
        return self._header

    def entries(self, serials: Iterable[bytes]) -> bytes:
        """Serials as minimal unsigned big-endian octets, strictly ascending as byte strings."""
        if self._state != 1:
            raise ValueError("entries() after header(), before trailer()")
        out = []
        for s in serials:
            if not isinstance(s, bytes) or not s or s[0] == 0 or len(s) > 20 or s <= self._last:
                self._state = 2
                raise ValueError("serials must be positive, minimal, at most 20 octets and strictly ascending")
            self._last = s
            out.append(_tlv(0x02, (b"\x00" + s) if s[0] & 0x80 else s))
        data = b"".join(out)
        self._n += len(out)
        self._len += len(data)
        if self._n > self._count or self._len > self._declared:
            self._state = 2
            raise ValueError("serials exceed the declaration")
        return data

    def trailer(self) -> bytes:
        if self._state != 1:
            raise ValueError("trailer() after header()")
        self._state = 2
        if self._n != self._count or self._len != self._declared:
            raise ValueError(f"encoded serials differ from the declaration ({self._n}/{self._count})")
        return b""

    def length(self) -> int:
        return self._total


@dataclass(frozen=True)
class IssuedSerials:
    tbs: bytes
    issuer_der: bytes
    aki: bytes
    number: int
    this_update: int
    next_update: int
    serials: frozenset[int]
    signature_oid: str
    signature: bytes


def _oid_str(content: bytes) -> str:
    parts, v = [], 0
    for b in content:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(v)
            v = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(x) for x in [first, parts[0] - 40 * first] + parts[1:])


def _gtime(content: bytes) -> int:
    import calendar

    s = content.decode("ascii")
    if len(s) != 15 or s[-1] != "Z":
        raise ValueError("GeneralizedTime must be YYYYMMDDHHMMSSZ")
    return calendar.timegm((int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]), int(s[10:12]), int(s[12:14])))


def decode(der: bytes) -> IssuedSerials:
    """Parse a list strictly (DER, no trailing bytes). Raises ValueError on anything else.
    The signature is not checked here: verify `signature` over `tbs` with the CA's key."""
    der = bytes(der)
    tag, start, end = _parse_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a single SEQUENCE")
    tag, ts, te = _parse_tlv(der, start)
    if tag != 0x30:
        raise ValueError("tbsList is not a SEQUENCE")
    tbs = der[start:te]
    tag, a0, a1 = _parse_tlv(der, te)
    tag2, b0, b1 = _parse_tlv(der, a1)
    if tag != 0x30 or tag2 != 0x03 or b1 != end or der[b0] != 0:
        raise ValueError("bad signatureAlgorithm or signature")
    outer_alg = der[te:a1]
    pos = ts
    fields = []
    while pos < te:
        t, c0, c1 = _parse_tlv(der, pos)
        fields.append((t, der[pos:c1], der[c0:c1]))
        pos = c1
    if len(fields) != 9:
        raise ValueError("TBSIssuedSerials has the wrong number of fields")
    (vt, _, vc), (ot, otlv, _), (at, atlv, _), (nt, ntlv, _), (kt, _, kc), (lt, _, lc), (t1, _, c1_), (t2, _, c2_), (st, _, sc) = fields
    if (vt, vc) != (0x02, b"\x01") or otlv != _LIST_OID_TLV or at != 0x30 or atlv != outer_alg:
        raise ValueError("not an issued-serials list v1")
    if nt != 0x30 or kt != 0x04 or lt != 0x02 or t1 != 0x18 or t2 != 0x18 or st != 0x30:
        raise ValueError("TBSIssuedSerials field types are wrong")
    serials = []
    p, last = 0, b""
    while p < len(sc):
        t, c0, c1 = _parse_tlv(sc, p)
        if t != 0x02 or c1 == c0 or sc[c0] & 0x80 or (c1 - c0 > 1 and sc[c0] == 0 and not sc[c0 + 1] & 0x80):
            raise ValueError("a serial is not a positive minimal INTEGER")
        octets = sc[c0 + 1:c1] if sc[c0] == 0 else sc[c0:c1]
        if octets <= last or not octets:
            raise ValueError("serials are not strictly ascending")
        serials.append(int.from_bytes(octets, "big"))
        last = octets
        p = c1
    at_, ac0, ac1 = _parse_tlv(outer_alg, 0)
    ot_, oc0, oc1 = _parse_tlv(outer_alg, ac0)
    return IssuedSerials(tbs=tbs, issuer_der=ntlv, aki=kc, number=int.from_bytes(lc, "big"), this_update=_gtime(c1_),
                         next_update=_gtime(c2_), serials=frozenset(serials), signature_oid=_oid_str(outer_alg[oc0:oc1]),
                         signature=der[b0 + 1:b1])


def hash_for(signature_oid: str):
    if signature_oid not in _SIG_HASHES:
        raise ValueError(f"unsupported signature algorithm {signature_oid}")
    h = _SIG_HASHES[signature_oid]
    return h() if h else None

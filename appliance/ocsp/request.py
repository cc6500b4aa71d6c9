"""Parse untrusted OCSP requests (RFC 6960 §4.1, DER) and GET paths into CertIDs: one error type.

asn1crypto, not cryptography: cryptography refuses requests with several CertIDs, which
`openssl ocsp -cert A -cert B` sends. Every failure, whatever asn1crypto raises, becomes
MalformedRequest; nothing else leaves this module.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from asn1crypto import core
from asn1crypto import ocsp as a_ocsp

MAX_REQUEST = 64 * 1024  # bytes of DER (over HTTP a POST body is capped lower: http.BODY_CAP)
MAX_CERT_IDS = 32
HASH_LENGTHS = {"sha1": 20, "sha256": 32}
MAX_SERIAL_BYTES = 20  # RFC 5280 §4.1.2.2 (a longer one cannot be ours)


class MalformedRequest(Exception):
    """The request is not a well-formed OCSPRequest we support (answered `malformedRequest`)."""


@dataclass(frozen=True, slots=True)
class CertId:
    hash: str  # "sha1" | "sha256"
    name_hash: bytes
    key_hash: bytes
    serial: int


@dataclass(frozen=True, slots=True)
class OcspRequest:
    cert_ids: tuple[CertId, ...]
    nonce: bytes | None


# AlgorithmIdentifier DER of the CertID hashes we serve, with and without the NULL parameters.
_ALGS = (
    (bytes.fromhex("300906052b0e03021a0500"), "sha1"),
    (bytes.fromhex("300706052b0e03021a"), "sha1"),
    (bytes.fromhex("300d06096086480165030402010500"), "sha256"),
    (bytes.fromhex("300b0609608648016503040201"), "sha256"),
)


def _fast(der: bytes) -> OcspRequest | None:
    """The RFC 5019 shape — one CertID, no version, requestor, extensions or signature — read by
    hand from exact, short-form DER. Anything else returns None and takes the full parser, which
    decides; a request this accepts is one the full parser reads identically (a test checks)."""
    n = len(der)
    if n > 129 or n < 12:
        return None
    for i in range(5):  # OCSPRequest, TBSRequest, requestList, Request, CertID: nested exactly
        if der[2 * i] != 0x30 or der[2 * i + 1] != n - 2 * i - 2:
            return None
    p = 10
    for alg_der, alg in _ALGS:  # noqa: B007 - the match is used after the loop
        if der.startswith(alg_der, p):
            p += len(alg_der)
            break
    else:
        return None
    hl = HASH_LENGTHS[alg]
    hashes = []
    for _ in range(2):
        if p + 2 + hl > n or der[p] != 0x04 or der[p + 1] != hl:
            return None
        hashes.append(der[p + 2:p + 2 + hl])
        p += 2 + hl
    if p + 2 > n or der[p] != 0x02:
        return None
    sl = der[p + 1]
    if not 1 <= sl <= MAX_SERIAL_BYTES + 1 or p + 2 + sl != n:
        return None
    v = der[p + 2:]
    if v[0] & 0x80 or (sl > 1 and v[0] == 0 and v[1] < 0x80):
        return None  # negative or not minimal: the full parser refuses it
    serial = int.from_bytes(v, "big")
    if serial.bit_length() > 8 * MAX_SERIAL_BYTES:
        return None
    return OcspRequest((CertId(alg, hashes[0], hashes[1], serial),), None)


def parse_request(der: bytes) -> OcspRequest:
    if not isinstance(der, (bytes, bytearray)) or not der or len(der) > MAX_REQUEST:
        raise MalformedRequest("empty or oversize request")
    fast = _fast(bytes(der))
    if fast is not None:
        return fast
    try:
        return _parse(bytes(der))
    except MalformedRequest:
        raise
    except Exception:  # noqa: BLE001 - asn1crypto raises ValueError, TypeError, KeyError, OverflowError, ...
        raise MalformedRequest("undecodable request") from None


def _parse(der: bytes) -> OcspRequest:
    req = a_ocsp.OCSPRequest.load(der, strict=True)  # strict: trailing data is an error
    tbs = req["tbs_request"]
    if tbs["version"].native != "v1":
        raise MalformedRequest("unsupported version")
    items = tbs["request_list"]
    n = len(items)
    if n == 0 or n > MAX_CERT_IDS:
        raise MalformedRequest("no or too many CertIDs")
    ids = []
    for item in items:
        cid = item["req_cert"]
        alg = cid["hash_algorithm"]["algorithm"].native
        params = cid["hash_algorithm"]["parameters"]
        if alg not in HASH_LENGTHS or params.native is not None:
            raise MalformedRequest("unsupported CertID hash")
        name_hash = cid["issuer_name_hash"].native
        key_hash = cid["issuer_key_hash"].native
        if len(name_hash) != HASH_LENGTHS[alg] or len(key_hash) != HASH_LENGTHS[alg]:
            raise MalformedRequest("bad CertID hash length")
        serial = cid["serial_number"].native
        if not isinstance(serial, int) or serial < 0 or serial.bit_length() > 8 * MAX_SERIAL_BYTES:
            raise MalformedRequest("bad serial")
        _touch(item["single_request_extensions"])
        ids.append(CertId(alg, name_hash, key_hash, serial))
    nonce = None
    exts = tbs["request_extensions"]
    _touch(tbs["requestor_name"])
    _touch(req["optional_signature"])
    if exts.native is not None:
        for ext in exts:
            if ext["extn_id"].native == "nonce":
                if nonce is not None:
                    raise MalformedRequest("two nonces")
                value = ext["extn_value"].parsed  # OCTET STRING inside the extension's OCTET STRING
                nonce = value.native if isinstance(value, core.OctetString) else ext["extn_value"].native
                if not isinstance(nonce, bytes) or len(nonce) > 128:
                    raise MalformedRequest("bad nonce")
            else:
                ext.native  # noqa: B018 - decode fully: a malformed extension is a malformed request
    if req.dump(force=True) != der and _explicit_v1(req) != der:
        raise MalformedRequest("not DER")  # BER (indefinite lengths, non-minimal encodings) is not an OCSP request
    return OcspRequest(tuple(ids), nonce)


# TBSRequest `version [0] EXPLICIT Version DEFAULT v1` written out: DER omits a default, BER allows it,
# and Botan's client sends it (OpenSSL's responder accepts it). The only non-DER form we take.
_EXPLICIT_V1 = b"\xa0\x03\x02\x01\x00"


def _explicit_v1(req: a_ocsp.OCSPRequest) -> bytes:
    """The request re-encoded in DER except for an explicit v1 version: every other part must still be
    exactly DER, so this admits one known client form and nothing looser."""
    tbs = req["tbs_request"]
    tbs_der = tbs.dump()  # already re-encoded in DER by the caller's dump(force=True)
    rest = req.contents[len(tbs_der):]  # the optional signature
    return _tlv(0x30, _tlv(0x30, _EXPLICIT_V1 + tbs.contents) + rest)


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(ln))) + ln + content


def _touch(value) -> None:
    """Force asn1crypto's lazy parsing of an optional part: errors must surface here, not later."""
    value.native  # noqa: B018


# ------------------------------------------------------------------ GET (RFC 6960 Appendix A.1)

_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


def decode_get_path(path: bytes | str) -> bytes:
    """`/ocsp/<url-encoded base64>` or `/<url-encoded base64>` (openssl appends the base64 right
    after the URL path) → the DER request. `/`, `//` and `+` inside the base64 are kept as they
    are (the router must not normalise the path); %2F, %2B, %3D are decoded. A query string is
    not part of the request."""
    try:
        raw = path.encode("latin-1") if isinstance(path, str) else bytes(path)
        raw = raw.split(b"?", 1)[0]
        if raw.startswith(b"/ocsp/"):
            raw = raw[6:]
        elif raw.startswith(b"/"):
            raw = raw[1:]
        else:
            raise MalformedRequest("not a path")
        if len(raw) > 4 * MAX_REQUEST:
            raise MalformedRequest("oversize")
        text = unquote_to_bytes(raw)
        # Some clients form-encode ('+' became ' ') or use the URL-safe alphabet.
        text = text.replace(b" ", b"+").replace(b"-", b"+").replace(b"_", b"/")
        text = text.rstrip(b"=")
        text += b"=" * (-len(text) % 4)
        if not text or not _B64_CHARS.match(text):
            raise MalformedRequest("not base64")
        der = base64.b64decode(text, validate=True)
    except MalformedRequest:
        raise
    except (binascii.Error, ValueError, UnicodeError):
        raise MalformedRequest("not base64") from None
    if not der:
        raise MalformedRequest("empty")
    return der

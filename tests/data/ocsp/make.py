"""Regenerate the OCSP request corpus: `python tests/data/ocsp/make.py` (from the repo root).

Each bad-*.der must be answered malformedRequest by the endpoint, each good-*.der parsed
(tests/unit/test_ocsp_request.py).
"""

from __future__ import annotations

from pathlib import Path

from asn1crypto import core
from asn1crypto import ocsp as a_ocsp

HERE = Path(__file__).resolve().parent
NH, KH = b"\x11" * 20, b"\x22" * 20


def req(items, **tbs) -> bytes:
    return a_ocsp.OCSPRequest({"tbs_request": {"request_list": items, **tbs}}).dump()


def item(alg="sha1", nh=NH, kh=KH, serial=0x1234):
    return {"req_cert": {"hash_algorithm": {"algorithm": alg}, "issuer_name_hash": nh, "issuer_key_hash": kh,
                         "serial_number": serial}}


GOOD = req([item()])


def _tlv(tag: int, content: bytes) -> bytes:
    assert len(content) < 0x80
    return bytes((tag, len(content))) + content


def botan(alg="sha1", nh=NH, kh=KH, serial=0x1234, version=b"\xa0\x03\x02\x01\x00") -> bytes:
    """A request as Botan's OCSP client encodes it (botan/src/lib/x509/ocsp.cpp, Request::BER_encode):
    the default `version` written out as [0] EXPLICIT INTEGER 0, then the one CertID (NULL params)."""
    cid = a_ocsp.CertId({"hash_algorithm": {"algorithm": alg, "parameters": core.Null()}, "issuer_name_hash": nh,
                         "issuer_key_hash": kh, "serial_number": serial})
    return _tlv(0x30, _tlv(0x30, version + _tlv(0x30, _tlv(0x30, cid.dump()))))


GOOD_CORPUS = {
    "botan-sha1": botan(),
    "botan-sha256": botan("sha256", b"\x11" * 32, b"\x22" * 32),
}
CORPUS = {
    "empty": b"",
    "truncated": GOOD[:-3],
    "trailing-data": GOOD + b"\x00\x00",
    "not-a-sequence": b"\x04\x03abc",
    "indefinite-length": b"\x30\x80" + GOOD[2:] + b"\x00\x00",
    "huge-length": b"\x30\x84\xff\xff\xff\xff" + GOOD[2:],
    "no-cert-ids": req([]),
    "too-many-cert-ids": req([item(serial=i) for i in range(1, 34)]),
    "md5-cert-id": req([item(alg="md5", nh=b"\x11" * 16, kh=b"\x22" * 16)]),
    "sha1-wrong-hash-length": req([item(nh=b"\x11" * 19)]),
    "sha256-with-sha1-lengths": req([item(alg="sha256")]),
    "negative-serial": req([item(serial=-1)]),
    "huge-serial": req([item(serial=1 << 200)]),
    "version-2": req([item()], version=1),
    "two-nonces": req([item()], request_extensions=[{"extn_id": "nonce", "extn_value": b"a"},
                                                   {"extn_id": "nonce", "extn_value": b"b"}]),
    "long-nonce": req([item()], request_extensions=[{"extn_id": "nonce", "extn_value": b"n" * 200}]),
    "garbage": bytes(range(256)),
    # Botan's form with a default version that is not exactly [0] { INTEGER 0 } in DER
    "explicit-version-not-minimal": botan(version=b"\xa0\x04\x02\x02\x00\x00"),
    "explicit-version-long-length": botan(version=b"\xa0\x81\x03\x02\x01\x00"),
    "explicit-version-2": botan(version=b"\xa0\x03\x02\x01\x01"),
    "explicit-version-trailing-data": botan() + b"\x00",
}

if __name__ == "__main__":
    for name, data in CORPUS.items():
        (HERE / f"bad-{name}.der").write_bytes(data)
    for name, data in GOOD_CORPUS.items():
        (HERE / f"good-{name}.der").write_bytes(data)
    print(f"wrote {len(CORPUS) + len(GOOD_CORPUS)} files to {HERE}")

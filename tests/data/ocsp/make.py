"""Regenerate the malformed OCSP request corpus: `python tests/data/ocsp/make.py` (from the repo root).

Each bad-*.der must be answered malformedRequest by the endpoint (tests/unit/test_ocsp_request.py).
"""

from __future__ import annotations

from pathlib import Path

from asn1crypto import ocsp as a_ocsp

HERE = Path(__file__).resolve().parent
NH, KH = b"\x11" * 20, b"\x22" * 20


def req(items, **tbs) -> bytes:
    return a_ocsp.OCSPRequest({"tbs_request": {"request_list": items, **tbs}}).dump()


def item(alg="sha1", nh=NH, kh=KH, serial=0x1234):
    return {"req_cert": {"hash_algorithm": {"algorithm": alg}, "issuer_name_hash": nh, "issuer_key_hash": kh,
                         "serial_number": serial}}


GOOD = req([item()])
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
}

if __name__ == "__main__":
    for name, data in CORPUS.items():
        (HERE / f"bad-{name}.der").write_bytes(data)
    print(f"wrote {len(CORPUS)} files to {HERE}")

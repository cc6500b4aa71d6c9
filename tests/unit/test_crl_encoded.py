"""CRL entries kept encoded (issue 19, CRLs at scale): the CIS's strict check of a pre-encoded entry buffer
(policy.crl.check_encoded) accepts exactly what the encoder makes, a TBS assembled around such a buffer is
the TBS the encoder builds byte for byte, the CMDB's pre-encoded pages are the slow path's encoding, the
per-CA counts follow every change, and the endpoint reads a CRL's header without its entries."""

from __future__ import annotations

import os
import random

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.factory.cmdb import serial_bytes
from appliance.factory.store import Store
from policy import crl as C

KEY = os.urandom(32)
REASONS = [None, 1, 2, 3, 4, 5, 6, 9, 10]


def _entries(rnd: random.Random, n: int) -> list[C.Entry]:
    """Every shape: serials of 1..20 octets, UTCTime and GeneralizedTime, reasons, invalidity dates; CMDB order."""
    out: dict[bytes, C.Entry] = {}
    for _ in range(n):
        bits = rnd.choice([1, 7, 8, 9, 63, 64, 65, 127, 128, 159])
        s = rnd.getrandbits(bits) | 1
        t = rnd.choice([rnd.randrange(-631152000, 2524608000), rnd.randrange(2524608000, 253402300799)])
        inv = rnd.choice([None, None, rnd.randrange(-631152000, 253402300799)])
        out[serial_bytes(s)] = (s, t, rnd.choice(REASONS), inv)
    return [out[k] for k in sorted(out)]


def test_accepts_exactly_what_the_encoder_makes_and_decodes_it_back():
    rnd = random.Random(19)
    ents = _entries(rnd, 5000)
    buf = C.encode_entries(ents)
    keys = C.check_encoded(buf)
    assert keys == [serial_bytes(e[0]) for e in ents]
    assert C.decode_encoded(buf, len(ents)) == ents
    assert C.decode_encoded(buf, 3) == ents[:3]
    # leap days: 2000 and 2400 are leap years, 2100 is not (GeneralizedTime from 2050)
    for y, ok in ((2000, True), (2024, True), (2100, False), (2400, True)):
        der = bytearray(C.encode_entries([(5, 951782400 if y == 2000 else 1709164800, None, None)]))  # 2000-02-29 / 2024-02-29
        if y in (2100, 2400):
            der = bytearray(C.encode_entries([(5, 4107542400, None, None)]))  # 2100-03-01, a GeneralizedTime
            der[7:11] = b"%d" % y
            der[11:15] = b"0229"
        if ok:
            C.check_encoded(bytes(der))
        else:
            with pytest.raises(ValueError, match="shapes"):
                C.check_encoded(bytes(der))


@pytest.mark.parametrize("why,mangle", [
    ("truncated", lambda b: b[:-1]),
    ("trailing octet", lambda b: b + b"\x00"),
    ("entry length + 1", lambda b: b[:1] + bytes((b[1] + 1,)) + b[2:]),
    ("entry length - 1", lambda b: b[:1] + bytes((b[1] - 1,)) + b[2:]),
    ("serial not minimal", lambda b: C.encode_entries([(0x85, 100, None, None)]).replace(b"\x02\x02\x00\x85", b"\x02\x02\x00\x05")),
    ("negative serial", lambda b: C.encode_entries([(0x85, 100, None, None)]).replace(b"\x02\x02\x00\x85", b"\x02\x02\xff\x85")),
    ("zero serial", lambda b: C.encode_entries([(5, 100, None, None)]).replace(b"\x02\x01\x05", b"\x02\x01\x00")),
    ("reason unspecified", lambda b: C.encode_entries([(5, 100, 1, None)])[:-1] + b"\x00"),
    ("removeFromCRL in a full CRL", lambda b: C.encode_entries([(5, 100, 1, None)])[:-1] + b"\x08"),
    ("reason 7", lambda b: C.encode_entries([(5, 100, 1, None)])[:-1] + b"\x07"),
    ("30 February", lambda b: C.encode_entries([(5, 1709164800, None, None)]).replace(b"240229", b"240230")),
    ("month 13", lambda b: C.encode_entries([(5, 1709164800, None, None)]).replace(b"240229", b"241329")),
    ("hour 24", lambda b: C.encode_entries([(5, 1709164800, None, None)]).replace(b"240229000000Z", b"240229240000Z")),
    ("GeneralizedTime before 2050", lambda b: C.encode_entries([(5, 4107542400, None, None)]).replace(b"\x18\x0f2100", b"\x18\x0f2049")),
    ("UTCTime without Z", lambda b: C.encode_entries([(5, 100, None, None)])[:-1] + b"0"),
    ("unknown extension", lambda b: C.encode_entries([(5, 100, 1, None)]).replace(b"\x55\x1d\x15", b"\x55\x1d\x16")),
    ("a certificate", lambda b: bytes.fromhex("3082010a0201") + b"\x00" * 260),
])
def test_refuses_anything_else(why, mangle):
    good = C.encode_entries([(0x1234, 1700000000, 4, None), (0x1235, 1700000001, None, 1600000000)])
    bad = mangle(good)
    with pytest.raises(ValueError):
        C.check_encoded(bad)


def test_refuses_duplicates_out_of_order_and_what_came_before():
    a, b = (0x1234, 1700000000, 4, None), (0x1235, 1700000001, None, None)
    with pytest.raises(ValueError, match="order"):
        C.check_encoded(C.encode_entries([b, a]))
    with pytest.raises(ValueError, match="order"):
        C.check_encoded(C.encode_entries([a, a]))
    with pytest.raises(ValueError, match="order"):  # the previous page ended at or after this one's first serial
        C.check_encoded(C.encode_entries([a, b]), after=serial_bytes(0x1234))
    assert C.check_encoded(C.encode_entries([a, b]), after=serial_bytes(0x1233)) == [serial_bytes(0x1234), serial_bytes(0x1235)]
    # CMDB order is by the serial's octets: 0x0100 (2 octets) sorts before 0x05 (1 octet)
    assert C.check_encoded(C.encode_entries([(0x0100, 1, None, None), (0x05, 1, None, None)]))
    with pytest.raises(ValueError):
        C.check_encoded("not bytes")  # type: ignore[arg-type]


def test_fuzz_whatever_is_accepted_is_what_the_encoder_makes():
    """Bounded mutations of a valid buffer (flips, inserts, deletes, splices): refused with ValueError, or
    accepted only if the encoder makes exactly these octets from what they decode to."""
    rnd = random.Random(5280)
    base = C.encode_entries(_entries(rnd, 40))
    accepted = 0
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 3)):
            op, i = rnd.randrange(4), rnd.randrange(len(b))
            if op == 0:
                b[i] = rnd.randrange(256)
            elif op == 1:
                b.insert(i, rnd.randrange(256))
            elif op == 2:
                del b[i]
            else:
                b[i] ^= 1 << rnd.randrange(8)
        data = bytes(b)
        try:
            keys = C.check_encoded(data)
        except ValueError:
            continue
        accepted += 1
        ents = C.decode_encoded(data, len(keys))
        assert C.encode_entries(ents) == data
    assert accepted > 0  # mutations of a digit or a reason into another valid one


def _tbs(ents: list[C.Entry], **kw) -> C.TbsCrl:
    return C.TbsCrl(issuer_name_der=bytes.fromhex("300f310d300b06035504030c0443412031"), key_type="p256",
                    this_update=1767225600, next_update=1767830400, crl_number=7, aki_key_id=b"\x01" * 20,
                    entry_count=len(ents), entries_length=sum(C.entry_length(*e) for e in ents), **kw)


def test_tbs_around_encoded_entries_is_the_encoders_tbs_byte_for_byte():
    ents = _entries(random.Random(1), 3000)
    slow = _tbs(ents)
    want = slow.header() + slow.entries(ents[:1000]) + slow.entries(ents[1000:]) + slow.trailer()
    fast = _tbs(ents)
    buf = C.encode_entries(ents)
    h = fast.header()
    k1 = fast.encoded(buf[:C.entry_length(*ents[0])])
    k2 = fast.encoded(buf[len(C.encode_entries(ents[:1])):], after=k1[-1])
    assert len(k1) + len(k2) == len(ents)
    assert h + buf + fast.trailer() == want
    # the declaration still binds: one entry more than declared, or a delta CRL's entries sent encoded
    short = _tbs(ents[:-1])
    short.header()
    with pytest.raises(ValueError, match="exceed the declaration"):
        short.encoded(buf)
    fewer = _tbs(ents)
    fewer.header()
    fewer.encoded(C.encode_entries(ents[:-1]))
    with pytest.raises(ValueError, match="differ from the declaration"):
        fewer.trailer()
    delta = _tbs(ents, delta_base=3)
    delta.header()
    with pytest.raises(ValueError, match="delta"):
        delta.encoded(buf)


def test_crl_stub_reads_the_header_without_the_entries():
    key = ec.generate_private_key(ec.SECP256R1())
    ents = _entries(random.Random(2), 2000)
    idp = C.idp_der("http://127.0.0.1/crl/issuing-3.crl")
    t = _tbs(ents, idp_der=idp)
    body = t.header() + t.entries(ents) + t.trailer()
    prefix, suffix = C.certificate_list(len(body), "p256", key.sign(body, ec.ECDSA(hashes.SHA256())))
    der = prefix + body + suffix
    stub = C.crl_stub(memoryview(der))
    assert len(stub) < 400 < len(der)
    full, head = x509.load_der_x509_crl(der), x509.load_der_x509_crl(stub)
    assert head.last_update_utc == full.last_update_utc and head.next_update_utc == full.next_update_utc
    assert [(e.oid, e.critical, e.value) for e in head.extensions] == [(e.oid, e.critical, e.value) for e in full.extensions]
    assert len(list(head)) == 0 and len(list(full)) == len(ents)
    for bad in (der[:-1], der + b"\x00", b"\x31" + der[1:], b""):
        with pytest.raises(ValueError):
            C.crl_stub(bad)


# ------------------------------------------------------------------ the CMDB side (a real encrypted CMDB)


@pytest.fixture
def st(tmp_path):
    s = Store()
    trio.run(s.open, str(tmp_path / "cmdb.sqlite"), KEY, "chacha20", True)
    with s.tx():
        s.add_ca("root", "ec-p256", None, "root-ca", b"root-der", "")
    yield s
    for c in (s.db, s.reader):
        if c is not None:
            c.close()


def test_pre_encoded_pages_are_the_slow_paths_encoding_and_counts_follow(st):
    ents = _entries(random.Random(3), 700)
    n = len(ents)
    st.reserve([(e[0], "root", None) for e in ents])
    with st.tx():
        for s, *_ in ents:
            st.store_issued(s, "root", "tls-server", "CN=x", 1, 2, b"der", None, b"\0" * 32, "")
        for s, t, r, i in ents:
            st.add_revocation("root", serial_bytes(s), t, r, i, C.entry_length(s, t, r, i))
    hold = next(e for e in ents if e[2] == 6)
    with st.tx():  # a hold made permanent: its entry encoded again with the new reason
        st.change_revocation("root", serial_bytes(hold[0]), 1, None, C.entry_length(hold[0], hold[1], 1, None))
        st.delete_revocation("root", serial_bytes(ents[0][0]))
    ents = [e if e is not hold else (e[0], e[1], 1, None) for e in ents[1:]]
    count, length = st.list_snapshot_begin("root", "crl")
    try:
        assert st.der_pages_ready("root")
        pages, after = [], b""
        for _ in range(100):
            data, k, after = st.der_page("root", after, 64)
            if not k:
                break
            pages.append(data)
        slow = []
        after = b""
        while rows := st.list_page("root", "crl", after, 64):
            slow += [(int.from_bytes(s, "big"), t, r, i) for s, t, r, i in rows]
            after = rows[-1][0]
    finally:
        st.list_snapshot_end()
    assert b"".join(pages) == C.encode_entries(slow) == C.encode_entries(ents)
    assert (count, length) == (len(ents), len(b"".join(pages)))
    issued, revoked = st.db.db.execute("SELECT issued, revoked FROM ca_counts WHERE ca='root'").fetchone()
    assert (issued, revoked) == (n, n - 1)
    assert st.status_counts()[1:3] == (n, n - 1)
    assert st.ca_report_rows()[0][5:] == (n, n - 1)
    # a revocation written without its entry (an older path): no fast path, the slow one encodes it
    extra = max(e[0] for e in ents) + 2
    st.reserve([(extra, "root", None)])
    with st.tx() as c:
        st.store_issued(extra, "root", "tls-server", "CN=x", 1, 2, b"der", None, b"\0" * 32, "")
        c.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", ("root", serial_bytes(extra), 100, None, None, 20))
    st.list_snapshot_begin("root", "crl")
    try:
        assert not st.der_pages_ready("root")
    finally:
        st.list_snapshot_end()
    assert st.status_counts()[1:3] == (n + 1, n)


def test_migration_19_backfills_the_entries_of_older_revocations(st):
    """A CMDB upgraded from before migration 19: every revocation's entry is encoded once, at the upgrade."""
    from appliance.factory.cmdb import _backfill_v19
    ents = _entries(random.Random(4), 50)
    st.reserve([(e[0], "root", None) for e in ents])
    with st.tx() as c:
        for s, t, r, i in ents:
            st.store_issued(s, "root", "tls-server", "CN=x", 1, 2, b"der", None, b"\0" * 32, "")
            c.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", ("root", serial_bytes(s), t, r, i, C.entry_length(s, t, r, i)))
    assert st.db.db.execute("SELECT count(*) FROM crl_der").fetchone()[0] == 0
    with st.tx() as c:
        _backfill_v19(c)
    st.list_snapshot_begin("root", "crl")
    try:
        assert st.der_pages_ready("root")
        assert st.der_page("root", b"", 1000)[0] == C.encode_entries(ents)
    finally:
        st.list_snapshot_end()


# ------------------------------------------------------------------ the endpoint side


def test_endpoint_writes_crls_to_their_file_as_they_come_and_refuses_bad_ones_whole(tmp_path):
    from appliance.ocsp.store import Store as EndpointStore
    from tests.unit.test_ocsp_pki import make_ca, make_crl
    ca = make_ca()
    path = tmp_path / "store"
    st = EndpointStore.open(str(path))
    st.publish_ca("issuing", ca.der)
    crl5, crl6 = make_crl(ca, 5, [(7, 1700000000)]), make_crl(ca, 6)
    for i in range(0, len(crl5), 100):
        assert st.crl_chunk("issuing", 5, crl5[i:i + 100], i + 100 >= len(crl5)) is (i + 100 >= len(crl5))
    held = st.cas["issuing"].crl
    assert isinstance(held, memoryview) and held == crl5  # a view of the mapped file, not a copy in memory
    assert st.cas["issuing"].crl_etag == '"' + __import__("hashlib").sha256(crl5).hexdigest() + '"'
    for bad in (b"\x30\x03\x02\x01\x00", crl6[:-1], crl6 + b"\x00", b"not a crl at all"):
        with pytest.raises(ValueError):
            st.crl_chunk("issuing", 6, bad, True)
        assert st.cas["issuing"].crl == crl5 and st.cas["issuing"].crl_number == 5
    with pytest.raises(ValueError, match="differs"):  # the DER says 6
        st.crl_chunk("issuing", 7, crl6, True)
    for k in range(8):  # streams never finished, then one too many
        st.crl_chunk("issuing", 10 + k, crl6[:10], False)
    with pytest.raises(ValueError, match="in flight"):
        st.crl_chunk("issuing", 99, crl6[:10], False)
    with pytest.raises(ValueError, match="too large"):
        st.crl_chunk("issuing", 100, crl6, False, max_bytes=10)
    assert sorted(p.name for p in (path / "issuing").iterdir() if p.name.startswith("crl")) == ["crl.bin"]
    assert st.crl_chunk("issuing", 6, crl6, True) is True
    st.close()
    again = EndpointStore.open(str(path))
    assert again.cas["issuing"].crl == crl6 and again.cas["issuing"].crl_number == 6


def test_pages_are_read_in_order_from_one_index(st):
    """A page is a range scan: the full CRL's in crl_der's key order, a shard's in its covering index (one
    random lookup per entry into encrypted pages would cost a page decryption each)."""
    from appliance.factory.store import _DER_PAGE, _DER_SHARD_PAGE
    plan = " | ".join(r[3] for r in st.db.db.execute("EXPLAIN QUERY PLAN " + _DER_PAGE, ("root", b"", 10)))
    assert "SEARCH crl_der USING PRIMARY KEY (ca=? AND serial>?)" in plan, plan
    plan = " | ".join(r[3] for r in st.db.db.execute("EXPLAIN QUERY PLAN " + _DER_SHARD_PAGE, ("root", 1, b"", 10)))
    assert "COVERING INDEX crl_der_shard (ca=? AND shard=? AND serial>?)" in plan, plan

"""The endpoint's own store of pre-signed OCSP responses, CA certificates and CRLs: memory + disk.

Layout beneath `store_dir` (one folder per CA, named as the CA):

    <ca>/ca.der                  the CA certificate (atomic replace)
    <ca>/crl.bin                 8-byte big-endian CRL number, then the DER CRL (atomic replace; crl-<k>.bin a
                                 shard's, crl-delta.bin the delta). Received chunk by chunk into <file>.part,
                                 then mapped read-only: one copy, in the page cache, whatever its size.
    <ca>/CURRENT                 the generation of the response files below
    <ca>/responses.<gen>.dat     append-only: per record crc32(der) (4 bytes) + der
    <ca>/responses.<gen>.idx     append-only: 64-byte entries (see _ENTRY), each with its own crc32

Writes: data, fsync, index entries, fsync: an index entry always points at durable data, and a
torn tail (bad entry crc, entry past the data) is cut off at load. The publication `seq` of a
message is written only on its last entry, so a torn message never claims to be complete.

Memory: one dict per (CA, CertID hash) of serial int → one packed int (offset, length, status,
thisUpdate, nextUpdate): ≈ 150 bytes per response, no Python object per field. Responses are read
with pread() when served (page cache, not our RSS). Loading reads only the index files.

Not thread-safe: the trio thread owns the dicts. Blocking work that may run in a worker thread is
split out (`prepare_responses`, `Plan.write`, `build_compaction`) and touches no shared state.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from policy.crl import crl_stub
from policy.ocsp import HASHES, issuer_hashes

_ALG = {"sha1": 1, "sha256": 2}
_ALG_NAME = {1: "sha1", 2: "sha256"}
GOOD, REVOKED, UNKNOWN = 0, 1, 2

# alg, status, serial length, serial (20), thisUpdate, nextUpdate, offset, length, seq | crc32
_ENTRY = struct.Struct(">BBB20sQQQIQx")  # 60 bytes (one pad byte)
_ENTRY_SIZE = _ENTRY.size + 4
assert _ENTRY_SIZE == 64
_CRC = struct.Struct(">I")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Packed index value: nextUpdate 40 bits | thisUpdate 40 bits | status 2 bits | length 20 bits | offset.
_M40 = (1 << 40) - 1


def _pack(offset: int, length: int, status: int, this_update: int, next_update: int) -> int:
    return (((((offset << 20) | length) << 2 | status) << 40 | this_update) << 40) | next_update


def _unpack(v: int) -> tuple[int, int, int, int, int]:
    """(offset, length, status, this_update, next_update)"""
    nu = v & _M40
    v >>= 40
    tu = v & _M40
    v >>= 40
    st = v & 3
    v >>= 2
    return v >> 20, v & 0xFFFFF, st, tu, nu


class StoreError(Exception):
    """The store cannot be used (I/O error, corrupt beyond its torn tail)."""


@dataclass(frozen=True, slots=True)
class Held:
    """A held response, as the responder needs it."""

    der: bytes
    status: int
    this_update: int
    next_update: int


@dataclass(slots=True)
class Prepared:
    """A published response checked against its DER (worker-thread safe)."""

    alg: str
    serial: int
    status: int
    this_update: int
    next_update: int
    der: bytes


@dataclass(slots=True)
class Rejected:
    serial: int
    alg: str
    why: str


def _ts(dt) -> int:
    return int(dt.timestamp())


def prepare_responses(hashes_of_ca: dict[str, tuple[bytes, bytes]], items) -> tuple[list[Prepared], list[Rejected]]:
    """Parse each published response once: status, validity, and that its CertID is the one it
    is published under (this CA, this hash, this serial). Pure; may run in a worker thread."""
    ok: list[Prepared] = []
    bad: list[Rejected] = []
    want = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}
    for serial_b, alg, _tu, _nu, der in items:
        serial = int.from_bytes(serial_b, "big")
        try:
            r = ocsp.load_der_ocsp_response(der)
            if r.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                raise ValueError("not a successful response")
            singles = list(r.responses)
            if len(singles) != 1:
                raise ValueError("not exactly one SingleResponse")
            s = singles[0]
            if s.serial_number != serial:
                raise ValueError("serial differs")
            if not isinstance(s.hash_algorithm, want[alg]):
                raise ValueError("CertID hash differs")
            if (s.issuer_name_hash, s.issuer_key_hash) != hashes_of_ca[alg]:
                raise ValueError("issuer differs from the CA certificate")
            if s.next_update_utc is None:
                raise ValueError("no nextUpdate")
            status = {ocsp.OCSPCertStatus.GOOD: GOOD, ocsp.OCSPCertStatus.REVOKED: REVOKED}.get(s.certificate_status, UNKNOWN)
            tu, nu = _ts(s.this_update_utc), _ts(s.next_update_utc)
            if not (0 <= tu <= _M40 and 0 <= nu <= _M40) or len(der) > 0xFFFFF - 4:
                raise ValueError("out of range")
            ok.append(Prepared(alg, serial, status, tu, nu, bytes(der)))
        except Exception as e:  # noqa: BLE001 - cryptography raises several types on bad DER
            bad.append(Rejected(serial, alg, str(e)[:200] or type(e).__name__))
    return ok, bad


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass
class CaRecord:
    name: str
    path: str
    cert: bytes = b""
    cert_etag: str = ""
    cert_mtime: int = 0
    hashes: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    index: dict[str, dict[int, int]] = field(default_factory=lambda: {a: {} for a in HASHES})
    this_counts: dict[int, int] = field(default_factory=dict)  # thisUpdate → responses held with it
    dead: int = 0  # superseded records still in the data file
    max_seq: int = 0
    gen: int = 0
    data_fd: int = -1
    idx_fd: int = -1
    data_size: int = 0
    idx_size: int = 0
    crl: bytes | memoryview | None = None
    crl_number: int = 0
    crl_etag: str = ""
    crl_mtime: int = 0
    shards: dict[int, tuple[int, bytes | memoryview, str, int, str]] = field(default_factory=dict)  # k -> (number, DER, etag, mtime, URL)
    delta: tuple[int, bytes | memoryview, str, int] | None = None  # the delta CRL: (number, DER, etag, mtime)
    shard_deltas: dict[int, tuple[int, bytes | memoryview, str, int]] = field(default_factory=dict)  # k -> shard k's delta

    @property
    def live(self) -> int:
        return sum(len(d) for d in self.index.values())


class _PartialCrl:
    """A CRL being received: its file (`<name>.part`, the 8-byte number first), its running SHA-256 (the ETag)."""

    def __init__(self, path: str, number: int):
        self.path = path
        self.size = 0
        self._sha = hashlib.sha256()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        _write_all(self._fd, number.to_bytes(8, "big"))

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        _write_all(self._fd, data)
        self._sha.update(data)
        self.size += len(data)

    def finish(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def etag(self) -> str:
        return '"' + self._sha.hexdigest() + '"'

    def discard(self) -> None:
        """Close and remove what is left of it (nothing once it was renamed into place)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _map_crl(path: str) -> tuple[int, memoryview] | None:
    """(number, DER) of a stored CRL file, the DER a view of a read-only mapping (None if absent or empty)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size <= 8:
            return None
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(mm)
    return int.from_bytes(view[:8], "big"), view[8:]


def _crl_head(der: bytes | memoryview) -> x509.CertificateRevocationList:
    """The CRL's header and extensions, parsed from its stub (policy.crl.crl_stub): the entries are not read."""
    try:
        return x509.load_der_x509_crl(crl_stub(der))
    except ValueError as e:
        raise ValueError(f"not a CRL: {e}") from None


def _etag(der: bytes | memoryview) -> str:
    return '"' + hashlib.sha256(der).hexdigest() + '"'


def _files(path: str, gen: int) -> tuple[str, str]:
    return os.path.join(path, f"responses.{gen}.dat"), os.path.join(path, f"responses.{gen}.idx")


@dataclass
class Plan:
    """Records to append for one published message (built in the trio thread, written anywhere)."""

    ca: CaRecord
    data: bytes
    entries: bytes
    updates: list[tuple[str, int, int]]  # alg, serial, packed value
    data_fd: int
    idx_fd: int

    def write(self) -> None:
        """Blocking: data, fsync, index, fsync."""
        if not self.updates:
            return
        _write_all(self.data_fd, self.data)
        os.fsync(self.data_fd)
        _write_all(self.idx_fd, self.entries)
        os.fsync(self.idx_fd)


class Store:
    def __init__(self, root: str):
        self.root = root
        self.cas: dict[str, CaRecord] = {}
        self.issuers: dict[tuple[str, bytes, bytes], str] = {}
        self.partial_crls: dict[tuple[str, int], _PartialCrl] = {}
        self.partial_bytes = 0
        # Bumped after every change to what ca_for() or get() return (some happen in a worker thread): the
        # responder's cache of served answers (responder.HOT_MAX) is dropped whenever it moves.
        self.version = 0

    # ---------------------------------------------------------------- open / load

    @classmethod
    def open(cls, root: str) -> "Store":
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = cls(root)
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if _NAME.match(name) and os.path.isdir(path) and os.path.exists(os.path.join(path, "ca.der")):
                st._load_ca(name, path)
        return st

    def close(self) -> None:
        for ca in self.cas.values():
            for fd in (ca.data_fd, ca.idx_fd):
                if fd >= 0:
                    os.close(fd)
            ca.data_fd = ca.idx_fd = -1

    def _load_ca(self, name: str, path: str) -> None:
        ca = CaRecord(name=name, path=path)
        with open(os.path.join(path, "ca.der"), "rb") as f:
            self._set_cert(ca, f.read())
        if (got := _map_crl(os.path.join(path, "crl.bin"))) is not None:
            self._set_crl(ca, *got)
        if (got := _map_crl(os.path.join(path, "crl-delta.bin"))) is not None:
            self._set_delta(ca, *got)
        for fn in os.listdir(path):  # CRL shards: crl-<k>.bin, and their deltas crl-<k>-delta.bin
            if (sm := re.match(r"^crl-(\d{1,3})(-delta)?\.bin$", fn)) and int(sm.group(1)) < 256:
                if (got := _map_crl(os.path.join(path, fn))) is not None:
                    if sm.group(2):
                        self._set_delta(ca, *got, shard=int(sm.group(1)))
                    else:
                        self._set_shard(ca, int(sm.group(1)), *got)
        try:
            with open(os.path.join(path, "CURRENT"), "rb") as f:
                ca.gen = int(f.read().strip() or b"0")
        except FileNotFoundError:
            ca.gen = 0
        for fn in os.listdir(path):  # leftovers of an interrupted compaction or replace
            m = re.match(r"^responses\.(\d+)\.(dat|idx)$", fn)
            if (m and int(m.group(1)) != ca.gen) or fn.endswith(".tmp"):
                os.unlink(os.path.join(path, fn))
        dat, idx = _files(path, ca.gen)
        ca.data_fd = os.open(dat, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        ca.idx_fd = os.open(idx, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        ca.data_size = os.fstat(ca.data_fd).st_size
        self._load_index(ca)
        self.cas[name] = ca
        self.version += 1

    def _load_index(self, ca: CaRecord) -> None:
        size = os.fstat(ca.idx_fd).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.preadv(ca.idx_fd, [view[got:]], got)
            if n <= 0:
                break
            got += n
        good = 0
        data_end = 0
        index = ca.index
        counts = ca.this_counts
        unpack = _ENTRY.unpack_from
        crc = zlib.crc32
        dead = 0
        max_seq = 0
        data_size = ca.data_size
        for pos in range(0, got - _ENTRY_SIZE + 1, _ENTRY_SIZE):
            if crc(view[pos:pos + 60]) != int.from_bytes(view[pos + 60:pos + 64], "big"):
                break
            alg, status, slen, serial_b, tu, nu, off, length, seq = unpack(buf, pos)
            if off + length > data_size or alg not in _ALG_NAME or slen > 20:
                break
            d = index[_ALG_NAME[alg]]
            serial = int.from_bytes(serial_b[:slen], "big")
            old = d.get(serial)
            if old is not None:
                dead += 1
                otu = (old >> 40) & _M40
                c = counts[otu] - 1
                if c:
                    counts[otu] = c
                else:
                    del counts[otu]
            d[serial] = _pack(off, length, status, tu, nu)
            counts[tu] = counts.get(tu, 0) + 1
            if seq > max_seq:
                max_seq = seq
            good = pos + _ENTRY_SIZE
            if off + length > data_end:
                data_end = off + length
        ca.dead = dead
        ca.max_seq = max_seq
        if good != size:  # torn tail: cut it (its data, too)
            os.ftruncate(ca.idx_fd, good)
            os.fsync(ca.idx_fd)
        if data_end != ca.data_size:
            os.ftruncate(ca.data_fd, data_end)
            os.fsync(ca.data_fd)
            ca.data_size = data_end
        ca.idx_size = good

    def _set_cert(self, ca: CaRecord, der: bytes) -> None:
        cert = x509.load_der_x509_certificate(der)
        hashes_ = issuer_hashes(der)
        for key in [k for k, v in self.issuers.items() if v == ca.name]:
            del self.issuers[key]
        for alg, (nh, kh) in hashes_.items():
            self.issuers[(alg, nh, kh)] = ca.name
        ca.cert, ca.hashes = der, hashes_
        self.version += 1
        ca.cert_etag = '"' + hashlib.sha256(der).hexdigest() + '"'
        ca.cert_mtime = _ts(cert.not_valid_before_utc)

    def _set_crl(self, ca: CaRecord, number: int, der: bytes | memoryview, etag: str | None = None) -> None:
        crl = _crl_head(der)
        ca.crl, ca.crl_number = der, number
        ca.crl_etag = etag or _etag(der)
        ca.crl_mtime = _ts(crl.last_update_utc)

    # ---------------------------------------------------------------- queries

    def ca_for(self, alg: str, name_hash: bytes, key_hash: bytes) -> CaRecord | None:
        name = self.issuers.get((alg, name_hash, key_hash))
        return self.cas.get(name) if name is not None else None

    def get(self, ca: CaRecord, alg: str, serial: int) -> Held | None:
        v = ca.index[alg].get(serial)
        if v is None:
            return None
        off, length, status, tu, nu = _unpack(v)
        rec = os.pread(ca.data_fd, length, off)
        if len(rec) != length or zlib.crc32(rec[4:]) != _CRC.unpack_from(rec)[0]:
            raise StoreError(f"{ca.name}: stored response for serial {serial:x} is damaged")
        return Held(rec[4:], status, tu, nu)

    def responses_held(self) -> int:
        return sum(ca.live for ca in self.cas.values())

    def oldest_this_update(self) -> int | None:
        olds = [min(ca.this_counts) for ca in self.cas.values() if ca.this_counts]
        return min(olds) if olds else None

    def max_seq(self) -> int:
        return max((ca.max_seq for ca in self.cas.values()), default=0)

    # ---------------------------------------------------------------- publication

    def publish_ca(self, name: str, der: bytes) -> None:
        """Blocking (fsync). Validates the certificate before anything is written."""
        x509.load_der_x509_certificate(der)
        issuer_hashes(der)
        path = os.path.join(self.root, name)
        ca = self.cas.get(name)
        if ca is not None and ca.cert == der:
            return
        os.makedirs(path, mode=0o700, exist_ok=True)
        _atomic_write(os.path.join(path, "ca.der"), der)
        if ca is None:
            _fsync_dir(self.root)
            self._load_ca(name, path)
        else:
            self._set_cert(ca, der)

    def crl_chunk(self, name: str, number: int, data: bytes, last: bool, max_bytes: int = 512 << 20,
                  shard: int | None = None, delta: bool = False) -> bool:
        """Write a streamed CRL (or one shard's, or the delta) to its file as it comes; on `last`, swap it in
        if its number is higher (blocking: fsync) and serve it from a read-only mapping of that file. Returns
        True when a CRL was stored. Nothing of it is held in memory but the chunk being written."""
        ca = self.cas.get(name)
        if ca is None:
            raise KeyError(name)
        fn = ("crl" if shard is None else f"crl-{shard}") + ("-delta" if delta else "") + ".bin"
        key = (f"{name}/{fn}", number)
        part = self.partial_crls.get(key)
        if part is None:
            if len(self.partial_crls) >= 8:
                self._drop_partials()
                raise ValueError("too many CRLs in flight")
            part = self.partial_crls[key] = _PartialCrl(os.path.join(ca.path, fn + ".part"), number)
        try:
            part.write(data)
        except OSError:
            self._drop_partials()
            raise
        self.partial_bytes += len(data)
        if self.partial_bytes > max_bytes:
            self._drop_partials()
            raise ValueError("CRL stream too large")
        if not last:
            return False
        del self.partial_crls[key]
        self.partial_bytes -= part.size
        final = os.path.join(ca.path, fn)
        held = ((ca.delta[0] if ca.delta else 0) if shard is None else ca.shard_deltas.get(shard, (0,))[0]) if delta \
            else ca.crl_number if shard is None else ca.shards.get(shard, (0,))[0]
        try:
            part.finish()
            if number <= held:
                return False
            got = _map_crl(part.path)
            if got is None:
                raise ValueError("empty CRL")
            der = got[1]
            try:
                ext_number = _crl_head(der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            except x509.ExtensionNotFound:
                ext_number = None
            if ext_number != number:
                raise ValueError("the CRL's number differs from the published number")
            if delta:
                self._set_delta(ca, number, der, part.etag(), shard)
            elif shard is not None:
                self._set_shard(ca, shard, number, der, part.etag())
            else:
                self._set_crl(ca, number, der, part.etag())
            os.replace(part.path, final)  # checked and held: now the file the next start maps
            _fsync_dir(ca.path)
            return True
        finally:
            part.discard()

    def _drop_partials(self) -> None:
        for p in self.partial_crls.values():
            p.discard()
        self.partial_crls.clear()
        self.partial_bytes = 0

    def _set_delta(self, ca: CaRecord, number: int, der: bytes | memoryview, etag: str | None = None,
                   shard: int | None = None) -> None:
        crl = _crl_head(der)
        try:  # only a delta CRL goes where relying parties fetch deltas
            crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        except x509.ExtensionNotFound:
            raise ValueError(f"the delta CRL of {ca.name} has no deltaCRLIndicator") from None
        got = (number, der, etag or _etag(der), _ts(crl.last_update_utc))
        if shard is None:
            ca.delta = got
        else:
            ca.shard_deltas[shard] = got

    def _set_shard(self, ca: CaRecord, shard: int, number: int, der: bytes | memoryview, etag: str | None = None) -> None:
        crl = _crl_head(der)
        try:  # its URL as its certificates name it: the IDP the CIS wrote (listed in /crl/<ca>.json)
            names = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value.full_name or []
            url = next(str(n.value) for n in names if isinstance(n, x509.UniformResourceIdentifier))
        except (x509.ExtensionNotFound, StopIteration):
            raise ValueError(f"CRL shard {shard} of {ca.name} names no URL in its IDP") from None
        ca.shards[shard] = (number, der, etag or _etag(der), _ts(crl.last_update_utc), url)

    def plan(self, name: str, prepared: list[Prepared], seq: int) -> Plan:
        """Which prepared responses replace what is held: a newer thisUpdate, or the same
        thisUpdate with another status or a later nextUpdate (a revocation in the same second)."""
        ca = self.cas[name]
        data = bytearray()
        entries = bytearray()
        updates: list[tuple[str, int, int]] = []
        pending: dict[tuple[str, int], int] = {}
        off = ca.data_size
        for p in prepared:
            old = pending.get((p.alg, p.serial))
            if old is None:
                old = ca.index[p.alg].get(p.serial)
            if old is not None:
                _, _, ost, otu, onu = _unpack(old)
                if not (p.this_update > otu or (p.this_update == otu and (p.status != ost or p.next_update > onu))):
                    continue
            rec = _CRC.pack(zlib.crc32(p.der)) + p.der
            value = _pack(off, len(rec), p.status, p.this_update, p.next_update)
            sb = p.serial.to_bytes(20, "big")
            slen = (p.serial.bit_length() + 7) // 8 or 1
            entries_payload = (_ALG[p.alg], p.status, slen, sb[20 - slen:].ljust(20, b"\0"), p.this_update,
                               p.next_update, off, len(rec), 0)
            entries += _ENTRY.pack(*entries_payload) + b"\0\0\0\0"
            data += rec
            off += len(rec)
            updates.append((p.alg, p.serial, value))
            pending[(p.alg, p.serial)] = value
        if updates:
            # The message's seq goes on its last entry only (see the module docstring).
            last = len(entries) - _ENTRY_SIZE
            fields = list(_ENTRY.unpack_from(entries, last))
            fields[-1] = seq
            entries[last:last + 60] = _ENTRY.pack(*fields)
            for pos in range(0, len(entries), _ENTRY_SIZE):
                entries[pos + 60:pos + 64] = _CRC.pack(zlib.crc32(entries[pos:pos + 60]))
        return Plan(ca, bytes(data), bytes(entries), updates, ca.data_fd, ca.idx_fd)

    def commit(self, plan: Plan, seq: int) -> None:
        """After Plan.write: make the written responses visible."""
        ca = plan.ca
        for alg, serial, value in plan.updates:
            d = ca.index[alg]
            old = d.get(serial)
            if old is not None:
                ca.dead += 1
                otu = (old >> 40) & _M40
                c = ca.this_counts[otu] - 1
                if c:
                    ca.this_counts[otu] = c
                else:
                    del ca.this_counts[otu]
            d[serial] = value
            tu = (value >> 40) & _M40
            ca.this_counts[tu] = ca.this_counts.get(tu, 0) + 1
        ca.data_size += len(plan.data)
        ca.idx_size += len(plan.entries)
        if plan.updates and seq > ca.max_seq:
            ca.max_seq = seq
        self.version += 1

    def publish_responses(self, name: str, items, seq: int = 0) -> tuple[int, list[Rejected]]:
        """All steps in the calling thread (tests, tools). Returns (stored, rejected)."""
        ok, bad = prepare_responses(self.cas[name].hashes, items)
        plan = self.plan(name, ok, seq)
        plan.write()
        self.commit(plan, seq)
        return len(plan.updates), bad

    # ---------------------------------------------------------------- compaction

    def needs_compaction(self, name: str) -> bool:
        ca = self.cas[name]
        return ca.dead > 10_000 and ca.dead > ca.live

    def build_compaction(self, name: str) -> tuple[CaRecord, int, dict[str, dict[int, int]], int, int]:
        """Blocking, touches no shared state except reading the current files: writes generation
        gen+1 holding only the live records. Returns what `finish_compaction` swaps in."""
        ca = self.cas[name]
        gen = ca.gen + 1
        dat, idx = _files(ca.path, gen)
        new_index: dict[str, dict[int, int]] = {a: {} for a in HASHES}
        dfd = os.open(dat, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        ifd = os.open(idx, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        data = bytearray()
        entries = bytearray()
        off = 0
        snapshot = [(alg, dict(d)) for alg, d in ca.index.items()]
        total = sum(len(d) for _, d in snapshot)
        k = 0
        for alg, d in snapshot:
            for serial, v in d.items():
                o, length, st, tu, nu = _unpack(v)
                rec = os.pread(ca.data_fd, length, o)
                k += 1
                slen = (serial.bit_length() + 7) // 8 or 1
                payload = _ENTRY.pack(_ALG[alg], st, slen, serial.to_bytes(slen, "big").ljust(20, b"\0"), tu, nu, off,
                                      length, ca.max_seq if k == total else 0)
                entries += payload + _CRC.pack(zlib.crc32(payload))
                data += rec
                new_index[alg][serial] = _pack(off, length, st, tu, nu)
                off += length
                if len(data) > 8 << 20:
                    _write_all(dfd, data)
                    _write_all(ifd, entries)
                    data.clear()
                    entries.clear()
        _write_all(dfd, data)
        _write_all(ifd, entries)
        os.fsync(dfd)
        os.fsync(ifd)
        return ca, gen, new_index, dfd, ifd

    def finish_compaction(self, built) -> None:
        """In the owning thread: point CURRENT at the new generation, swap, drop the old files."""
        ca, gen, new_index, dfd, ifd = built
        _atomic_write(os.path.join(ca.path, "CURRENT"), str(gen).encode())
        old = (ca.data_fd, ca.idx_fd, ca.gen)
        ca.index = new_index
        ca.data_fd, ca.idx_fd, ca.gen = dfd, ifd, gen
        self.version += 1
        ca.data_size = os.fstat(dfd).st_size
        ca.idx_size = os.fstat(ifd).st_size
        ca.dead = 0
        os.close(old[0])
        os.close(old[1])
        for p in _files(ca.path, old[2]):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def compact(self, name: str) -> None:
        self.finish_compaction(self.build_compaction(name))

"""Stand-alone CRL encoder benchmark: Donjon's streaming encoder against `openssl ca -gencrl`.

    .venv/bin/python -m bench.crl_encoder --sizes 10000,100000,1000000

For each size N, in fresh child processes measured with /usr/bin/time (wall time and peak RSS of that child):
  (a) Donjon: entries come from a generator (a stand-in for the Factory's database cursor), a first pass
      computes the declared total length with entry_length(), then TbsCrl encodes them in chunks of
      10,000, each chunk fed to a running SHA-256 and written to the CRL file; the digest is signed with a
      software RSA-2048 key (PKCS#1 v1.5 over a Prehashed SHA-256) and the CertificateList prefix/suffix
      are written around the TBS (the prefix's space is reserved: RSA signatures have a fixed length);
  (b) OpenSSL: `openssl ca -gencrl` with the same CA key and an index.txt holding the same N revoked
      entries (serial, revocation date, reason).
Both children are timed from process start (interpreter start-up and imports included for Donjon).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import crl_peer

CHUNK = 10_000
NOW = 1767225600  # 2026-01-01T00:00:00Z


def synthetic_entries(n: int, seed: int = 1):
    """Deterministic (serial, revoked_at, reason, None) stream, ascending 128-bit-ish random serials."""
    rnd = random.Random(seed)
    getrandbits = rnd.getrandbits
    reasons = (None, None, 1, 4, 5, 3)
    serial = 1 << 120
    for _ in range(n):
        serial += 1 + getrandbits(16)  # strictly ascending, like a cursor ordered by serial
        yield (serial ^ (getrandbits(120) << 1) | 1 << 126, NOW - getrandbits(26), reasons[getrandbits(16) % 6], None)


def _child_donjon(n: int, d: Path, out: Path) -> None:
    t0 = time.perf_counter()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    from policy import crl as C

    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    t_import = time.perf_counter()

    # pass 1: the sender's declaration (count and exact total length)
    el = C.entry_length
    total = 0
    count = 0
    for e in synthetic_entries(n):
        total += el(*e)
        count += 1
    t_declare = time.perf_counter()

    tbs = C.TbsCrl(issuer_name_der=cert.subject.public_bytes(), key_type="rsa2048", this_update=NOW,
                   next_update=NOW + 7 * 86400, crl_number=42, aki_key_id=ski,
                   entry_count=count, entries_length=total)
    sig_len = (key.key_size + 7) // 8
    prefix_len = len(C.certificate_list(tbs.length(), "rsa2048", b"\x00" * sig_len)[0])
    h = hashlib.sha256()
    with open(out, "wb") as f:
        f.seek(prefix_len)
        b = tbs.header()
        h.update(b)
        f.write(b)
        it = synthetic_entries(n)
        while True:
            chunk = list(itertools.islice(it, CHUNK))
            if not chunk:
                break
            b = tbs.entries(chunk)
            h.update(b)
            f.write(b)
        b = tbs.trailer()
        h.update(b)
        f.write(b)
        t_encode = time.perf_counter()
        sig = key.sign(h.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        prefix, suffix = C.certificate_list(tbs.length(), "rsa2048", sig)
        assert len(prefix) == prefix_len
        f.write(suffix)
        f.seek(0)
        f.write(prefix)
    t_end = time.perf_counter()
    print(json.dumps({
        "import_s": t_import - t0, "declare_s": t_declare - t_import, "encode_hash_write_s": t_encode - t_declare,
        "sign_assemble_s": t_end - t_encode, "crl_bytes": prefix_len + tbs.length() + len(suffix),
    }))


def _measure_donjon(n: int, d: Path) -> tuple[float, int, dict]:
    log = d / f"donjon-{n}.json"
    with open(log, "wb") as lf:
        wall, rss, rc = crl_peer.run_measured(
            [sys.executable, "-m", "bench.crl_encoder", "--child", str(n), "--dir", str(d)], stdout=lf
        )
    if rc != 0:
        raise RuntimeError(f"donjon child failed ({rc})")
    return wall, rss, json.loads(log.read_text())


def _baseline_rss() -> int:
    """Peak RSS of a bare interpreter that imports what the child imports (for reference)."""
    _, rss, _ = crl_peer.run_measured(
        [sys.executable, "-c", "import cryptography.x509, policy.crl, hashlib"], cwd=str(Path(__file__).parent.parent)
    )
    return rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--verify", default="max", help="verify the Donjon CRL with openssl for: max, all, none")
    args = ap.parse_args(argv)

    if args.child is not None:
        _child_donjon(args.child, Path(args.dir), Path(args.dir) / f"donjon-{args.child}.crl")
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s]
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="donjon-crl-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    crl_peer.write_ca_key_and_cert(base)
    print(f"work dir {base}; bare interpreter+imports peak RSS {_baseline_rss() / 2**20:.1f} MB", flush=True)
    rows = []
    for n in sizes:
        d = base / f"n{n}"
        d.mkdir(exist_ok=True)
        for f in ("ca.key", "ca.pem"):
            (d / f).write_bytes((base / f).read_bytes())
        crl_peer.build_ca_dir(d, synthetic_entries(n))
        dw, drss, detail = _measure_donjon(n, d)
        ow, orss = crl_peer.gencrl(d, d / "openssl.crl.pem")
        verified = ""
        if args.verify == "all" or (args.verify == "max" and n == max(sizes)):
            verified = crl_peer.verify_crl(d / f"donjon-{n}.crl", d / "ca.pem")
        rows.append((n, dw, drss, ow, orss, detail, verified))
        print(f"  n={n}: donjon {dw:.2f} s {drss / 2**20:.1f} MB {detail} | openssl {ow:.2f} s {orss / 2**20:.1f} MB"
              + (f" | donjon CRL: {verified}" if verified else ""), flush=True)
        # keep disk use bounded
        for f in (d / "openssl.crl.pem",):
            f.unlink(missing_ok=True)

    print()
    print(f"{'size':>9} | {'donjon s':>8} | {'donjon MB':>9} | {'openssl s':>9} | {'openssl MB':>10} | "
          f"{'time ratio':>10} | {'mem ratio':>9} | {'µs/entry':>8}")
    print("-" * 92)
    for n, dw, drss, ow, orss, detail, _ in rows:
        per = detail["encode_hash_write_s"] / n * 1e6
        print(f"{n:>9} | {dw:>8.2f} | {drss / 2**20:>9.1f} | {ow:>9.2f} | {orss / 2**20:>10.1f} | "
              f"{dw / ow:>10.3f} | {drss / orss:>9.3f} | {per:>8.2f}")
    print("(ratios are donjon/openssl; µs/entry = encode+hash+write phase of the Donjon child / N;"
          " openssl writes PEM, Donjon DER)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

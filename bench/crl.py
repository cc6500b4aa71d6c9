"""CRL generation at 10k / 100k / 1M revoked entries: the running appliance against `openssl ca -gencrl`.

    .venv/bin/python -m bench.crl --sizes 10000,100000,1000000

One appliance home with an RSA-2048 issuing CA (the peer's CA in bench.crl_peer is RSA-2048 too). For each
size N (ascending), the bench-only shortcut:
  1. stop the appliance; in a child process (its own PKCS#11 state) unwrap the CMDB key with the token and
     bulk-insert the missing entries into serials ('issued'), certs (dummy DER), revocations
     (entry_len from policy.crl.entry_length) and crl_der (each entry's DER, as a revocation keeps it) in one transaction, so the CA holds exactly N revocations;
     ownership of the CMDB and token files is restored for the dropped roles;
  2. start the appliance (fresh role processes), read VmHWM of the `role factory` and `role cis` processes,
     time `crl generate` through AdminClient.stream(ACrlGenerate), read VmHWM again;
  3. `openssl ca -gencrl` on an index.txt with the same N entries (bench.crl_peer: wall time, peak RSS).
The largest Donjon CRL is verified with `openssl crl -inform DER -noout -CAfile <exported chain>`.
Entries are bench.crl_encoder.synthetic_entries (deterministic, so size N is a prefix of size M > N).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

from bench import common, crl_peer
from bench.crl_encoder import synthetic_entries

CA = "issuing-rsa2048"
SHARD_CA = "issuing-shards"  # the same entries again, in a CA with crl.shards = 16
SHARDS = 16
KEY_TYPE = "rsa2048"
INSERT_CHUNK = 50_000


# ---------------------------------------------------------------- bulk load (child process)


def _load_child(home: Path, start: int, stop: int, ca: str = CA, shards: int = 1) -> dict:
    from appliance.factory.cmdb import serial_bytes
    from policy import crl as crlenc

    t0 = time.perf_counter()
    db = common.open_stopped_cmdb(home)
    c = db.db
    now = int(time.time())
    nb, na = now - 86400, now + 300 * 86400
    el = crlenc.entry_length
    enc = crlenc.encode_entries
    # the sharded CA's entries: the same number, other serials (a serial is unique across the CMDB)
    it = itertools.islice(synthetic_entries(stop, seed=1 if shards == 1 else 2), start, stop)
    inserted = 0
    with db.tx():
        for _ in range((stop - start) // INSERT_CHUNK + 2):  # bounded: one more than enough
            chunk = list(itertools.islice(it, INSERT_CHUNK))
            if not chunk:
                break
            chunk.sort()  # random serials: insert each chunk in key order
            rows = [(serial_bytes(s), t, r, i) for s, t, r, i in chunk]
            c.executemany("INSERT INTO serials VALUES (?,?,'issued',?,NULL)", [(sb, ca, now) for sb, *_ in rows])
            c.executemany("INSERT INTO certs(serial, ca, profile, subject, not_before, not_after, issued_at, der, request) "
                          "VALUES (?,?,'tls-server','CN=bench',?,?,?,?,NULL)",
                          [(sb, ca, nb, na, now, b"\x30\x03\x02\x01\x00") for sb, *_ in rows])
            if shards > 1:  # each certificate's shard, as issuance keeps it (cert_shards)
                c.executemany("INSERT INTO cert_shards VALUES (?,?,?)", [(sb, ca, s % shards) for (sb, *_), (s, *_) in zip(rows, chunk)])
            c.executemany("INSERT INTO revocations VALUES (?,?,?,?,?,?)",
                          [(ca, sb, t, r, i, el(s, t, r, i)) for (sb, t, r, i), (s, *_) in zip(rows, chunk)])
            # each entry encoded once, as Store.add_revocation does at revocation time (migration 19)
            c.executemany("INSERT INTO crl_der VALUES (?,?,?,?)",
                          [(ca, sb, enc([e]), e[0] % shards if shards > 1 else None) for (sb, *_), e in zip(rows, chunk)])
            inserted += len(chunk)
        if shards > 1:
            c.execute("INSERT OR IGNORE INTO crl_partition VALUES (?,?)", (ca, shards))
        total = c.execute("SELECT count(*) FROM revocations WHERE ca=?", (ca,)).fetchone()[0]
    db.close()
    return {"inserted": inserted, "total": total, "seconds": time.perf_counter() - t0}


def bulk_load(home: Path, start: int, stop: int, ca: str = CA, shards: int = 1) -> dict:
    """Insert entries [start, stop) while the appliance is stopped; restore file ownership for the roles."""
    return common.run_bulk_load(home, "bench.crl", str(start), str(stop), ca, str(shards))


# ---------------------------------------------------------------- measurements


def _hwm(app: common.Appliance) -> dict[str, int]:
    pids = app.role_pids()
    return {role: common.proc_status_kb(pid, "VmHWM") * 1024 for role, pid in pids.items()}


def _reset_hwm(app: common.Appliance) -> None:
    """Each role's peak RSS back to its current RSS (proc(5), clear_refs "5"): the peak read afterwards is
    the generation's, not an earlier one's (the Factory's highest is the Argon2id of the officer's login,
    46 MiB freed as soon as it is done)."""
    for pid in app.role_pids().values():
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")


def donjon_generate(app: common.Appliance, out: Path, ca: str = CA) -> dict:
    from appliance.client import connect
    from appliance.ipc import schema as S

    lifetime = _hwm(app)
    t0 = time.perf_counter()  # the time includes the officer's login (the first command after a restart logs in)
    size = 0
    with connect(str(app.home), timeout=3600) as c, open(out, "wb") as f:
        _reset_hwm(app)  # ...the memory does not: the login's Argon2id is not the CRL's
        before = _hwm(app)
        for chunk in c.stream(S.ACrlGenerate, ca=ca):
            f.write(chunk)
            size += len(chunk)
    wall = time.perf_counter() - t0
    after = _hwm(app)
    delta = {k: after[k] - before[k] for k in after}
    return {"seconds": wall, "bytes": size, "hwm_before": before, "hwm_after": after, "hwm_delta": delta,
            "peak": max(after.values()), "peak_delta": max(delta.values()),
            "peak_lifetime": max(max(after.values()), max(lifetime.values()))}


def openssl_generate(work: Path, n: int) -> dict:
    d = work / f"openssl-crl-{n}"
    d.mkdir()
    crl_peer.write_ca_key_and_cert(d)
    crl_peer.build_ca_dir(d, synthetic_entries(n))
    out = d / "openssl.crl.pem"
    wall, rss = crl_peer.gencrl(d, out)
    size = out.stat().st_size
    for f in (out, d / "index.txt"):
        f.unlink(missing_ok=True)  # keep disk use bounded
    return {"seconds": wall, "peak": rss, "pem_bytes": size}


def run(work: Path, sizes: list[int]) -> dict:
    t0 = time.perf_counter()
    sizes = sorted(sizes)
    home = work / "home-crl"
    common.log(f"crl: donjon init (root p256, {CA})")
    common.init_home(home, [(CA, KEY_TYPE), (SHARD_CA, KEY_TYPE)], nolint_profile=False)
    from appliance.config import write_setting
    write_setting(str(home), "crl.shards", f"{{ {SHARD_CA} = {SHARDS} }}")  # as `donjon config set` writes it
    chain = work / "issuing-chain.pem"
    res: dict = {"ca": CA, "key_type": KEY_TYPE, "sizes": {}}
    have = 0
    app = common.Appliance(home)
    try:
        app.start()
        common.export_chain(home, CA, chain)
        for n in sizes:
            app.stop()
            common.log(f"crl: bulk-loading entries {have}..{n}")
            load = bulk_load(home, have, n)
            if load["total"] != n:
                raise common.BenchError(f"CMDB holds {load['total']} revocations, expected {n}")
            have = n
            app.start(timeout=120)
            common.log(f"crl: donjon crl generate, {n} entries")
            out = work / f"donjon-{n}.crl"
            d = donjon_generate(app, out)
            # a second generation in the same (now warm) processes: the first pays one-off costs
            # (the CIS's throwaway lint key, pkilint's first CRL lint); memory is reported from the first
            warm = donjon_generate(app, work / f"donjon-{n}-warm.crl")
            (work / f"donjon-{n}-warm.crl").unlink()
            d["warm_seconds"] = warm["seconds"]
            d["warm_hwm_after"] = warm["hwm_after"]
            common.log(f"crl: openssl ca -gencrl, {n} entries")
            o = openssl_generate(work, n)
            r = {"load": load, "donjon": d, "openssl": o, "time_ratio": d["seconds"] / o["seconds"],
                 "mem_ratio": d["peak"] / o["peak"], "mem_delta_ratio": d["peak_delta"] / o["peak"]}
            if n == sizes[-1]:
                r["verify"] = crl_peer.verify_crl(out, chain)
            out.unlink()
            res["sizes"][str(n)] = r
        res["shards"] = shards_run(app, home, work, sizes[-1])
    finally:
        app.stop()
    res["seconds"] = time.perf_counter() - t0
    return res


def shards_run(app: common.Appliance, home: Path, work: Path, n: int) -> dict:
    """The largest size again in a CA with 16 CRL shards: `crl generate` signs its complete CRL and then the
    16 shards in parallel (one snapshot, one shard at a time per CIS process); the Factory logs how long the
    shards took. Peer: `openssl ca -gencrl` once per shard on the same partition (16 index files)."""
    app.stop()
    common.log(f"crl: bulk-loading {n} entries into {SHARD_CA} ({SHARDS} shards)")
    load = bulk_load(home, 0, n, SHARD_CA, SHARDS)
    app.start(timeout=120)
    mark = app.log.stat().st_size
    d = donjon_generate(app, work / "donjon-shards.crl", SHARD_CA)
    (work / "donjon-shards.crl").unlink()
    text = app.log.read_bytes()[mark:].decode(errors="replace")
    m = re.search(rf"CRL shards of {SHARD_CA}: {SHARDS} signed in ([0-9.]+) s", text)
    d["shards_seconds"] = float(m.group(1)) if m else None
    common.log("crl: openssl ca -gencrl, one per shard")
    peer_s, peer_peak = 0.0, 0
    parts: list[list] = [[] for _ in range(SHARDS)]
    for e in synthetic_entries(n, seed=2):  # what the sharded CA holds
        parts[e[0] % SHARDS].append(e)
    for k, part in enumerate(parts):
        dk = work / f"openssl-shard-{k}"
        dk.mkdir()
        crl_peer.write_ca_key_and_cert(dk)
        crl_peer.build_ca_dir(dk, part)
        wall, rss = crl_peer.gencrl(dk, dk / "crl.pem")
        peer_s += wall
        peer_peak = max(peer_peak, rss)
        (dk / "crl.pem").unlink(missing_ok=True)
        (dk / "index.txt").unlink(missing_ok=True)
    return {"entries": n, "shards": SHARDS, "load": load, "donjon": d,
            "openssl": {"seconds": peer_s, "peak": peer_peak},
            "time_ratio": (d["shards_seconds"] or d["seconds"]) / peer_s, "mem_ratio": d["peak"] / peer_peak}


def table(res: dict) -> str:
    mb = 2 ** 20
    lines = [f"CRL generation, {res['ca']} ({res['key_type']}); Donjon peak = the highest of the roles' peak RSS during "
             "the generation (absolute | above the role's RSS before it); ratios = donjon/openssl",
             f"{'entries':>9} {'donjon s':>9} {'(warm)':>7} {'openssl s':>9} {'time':>6} {'(warm)':>7} | "
             f"{'donjon MB':>9} {'(delta)':>8} {'openssl MB':>10} {'mem':>6} {'(delta)':>7} | {'CRL MB':>6}",
             "-" * 116]
    for n, r in res["sizes"].items():
        d, o = r["donjon"], r["openssl"]
        lines.append(f"{int(n):>9,} {d['seconds']:>9.2f} {d['warm_seconds']:>7.2f} {o['seconds']:>9.2f} "
                     f"{r['time_ratio']:>5.2f}x {d['warm_seconds'] / o['seconds']:>6.2f}x | "
                     f"{d['peak'] / mb:>9.1f} {d['peak_delta'] / mb:>8.1f} {o['peak'] / mb:>10.1f} "
                     f"{r['mem_ratio']:>5.2f}x {r['mem_delta_ratio']:>6.2f}x | {d['bytes'] / mb:>6.1f}")
        lines.append(f"  {int(n):,}: the roles' lifetime peak, earlier ones included (the Factory's login Argon2id): "
                     f"{d['peak_lifetime'] / mb:.1f} MB")
        if "verify" in r:
            lines.append(f"  {int(n):,}-entry Donjon CRL: openssl crl -CAfile chain: {r['verify']}")
    if "shards" in res:
        r = res["shards"]
        d, o = r["donjon"], r["openssl"]
        sh = f"{d['shards_seconds']:.2f}" if d["shards_seconds"] is not None else "?"
        lines.append(f"{r['entries']:,} entries in {r['shards']} shards: the shards {sh} s (complete CRL + shards "
                     f"{d['seconds']:.2f} s), peak {d['peak'] / mb:.1f} MB; openssl ca -gencrl once per shard "
                     f"{o['seconds']:.2f} s in total, peak {o['peak'] / mb:.1f} MB: {r['time_ratio']:.2f}x time, "
                     f"{r['mem_ratio']:.2f}x memory")
    lines.append("donjon s = first generation after a restart (what the ratios use); (warm) = a second one right after.")
    lines.append("Targets at 1M: faster than openssl (time < 1.00x) with under half its peak memory (mem < 0.50x).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--load", nargs=5, metavar=("HOME", "START", "STOP", "CA", "SHARDS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.load:
        print(json.dumps(_load_child(Path(a.load[0]), int(a.load[1]), int(a.load[2]), a.load[3], int(a.load[4]))))
        return 0
    with common.temp_dir("donjon-bench-crl-", keep=a.keep) as work:
        res = run(work, [int(s) for s in a.sizes.split(",") if s])
    print(table(res))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`just bench`: Donjon side by side with its peers, in one run.

    .venv/bin/python -m bench.run            # issuance N=2000, CRL 10k/100k/1M
    .venv/bin/python -m bench.run --quick    # issuance N=300, CRL 10k/100k

1. Issuance rate (bench.issuance): the appliance (P-256 and RSA-2048 issuing CAs, with and without leaf
   lint) against `openssl ca -batch -infiles` and the raw SoftHSM signing rate.
2. CRL generation (bench.crl): time and peak memory through the appliance against `openssl ca -gencrl`.
3. OCSP serving (bench.ocsp): requests/s and p50/p99 at 1/16/64 connections (wrk) on 100k certificates
   (--quick 10k) against `openssl ocsp` (P-256 and RSA-2048 CAs) and `cfssl ocspserve`; start-up time and
   memory with 1M pre-signed responses (--quick 200k) against cfssl.
4. Publication (bench.dist): entries/s to a real slapd while issuing, and the drain time of a 10,000-job
   backlog (--quick 2,000) after an outage and a restart, beside `ldapadd` loading the same entries.
5. ACME (bench.acme): complete orders/s at 1, 8, 32 clients, the gateway beside `pebble`, and the
   gateway's memory with 10,000 open orders (--quick 2,000).
6. EST and SCEP (bench.gateway): enrolments/s at 1 and 16 clients (a scripted EST client; Debian's
   scepclient), SCEP beside micromdm's scepserver under the same client.
7. Card personalisation (bench.kgs): cards/minute for a batch of 20 (--quick 10), keys on the card
   against the encryption key made in the HSM, beside softhsm2-util + pkcs11-tool doing the keys alone.
8. CMP on the gateway (with 6, and --only gateway; bench.gateway_cmp): enrolments/s at 1 and 16 `openssl cmp`
   clients against OpenSSL's own mock CMP server.
9. Standby CMDB (bench.standby): issuance with [cmdb] standby on and off (group commits, and one commit
   per certificate), the ratio on/off.
A readable table goes to stdout, everything measured to bench/out/results.json. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import acme, common, crl, dist, gateway, gateway_cmp, issuance, kgs, ocsp, standby, summary

OUT = Path(__file__).resolve().parent / "out"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=300 CSRs, CRLs of 10k and 100k entries")
    ap.add_argument("--n", type=int, help="number of CSRs (default 2000, --quick 300)")
    ap.add_argument("--sizes", help="CRL sizes, comma-separated (default 10000,100000,1000000)")
    ap.add_argument("--only", choices=["issuance", "crl", "ocsp", "dist", "acme", "gateway", "kgs", "standby"], help="run one benchmark only")
    ap.add_argument("--acme-seconds", type=float, help="ACME: seconds per concurrency point (default 10, --quick 5)")
    ap.add_argument("--acme-open", type=int, help="ACME: open orders for the memory figure (default 10000, --quick 2000)")
    ap.add_argument("--gateway-seconds", type=float, help="EST/SCEP: seconds per concurrency point (default 10, --quick 5)")
    ap.add_argument("--dist-backlog", type=int, help="publication: backlog jobs (default 10000, --quick 2000)")
    ap.add_argument("--ocsp-certs", type=int, help="OCSP: certificates served (default 100000, --quick 10000)")
    ap.add_argument("--ocsp-big", type=int, help="OCSP: responses for the start-up test (default 1000000, --quick 200000)")
    ap.add_argument("--ocsp-duration", type=float, default=5.0, help="OCSP: seconds of wrk per point")
    ap.add_argument("--ocsp-workers", type=int, default=1, help="OCSP: endpoint processes on the listener (ocsp.workers)")
    ap.add_argument("--ocsp-profile", action="store_true", help="OCSP: py-spy the endpoint during one more run")
    ap.add_argument("--ocsp-rounds", type=int, default=ocsp.ROUNDS,
                    help="OCSP: Donjon/openssl ocsp rounds alternated at 64 connections (median ratio and spread)")
    ap.add_argument("--kgs-cards", type=int, help="KGS: cards per batch (default 20, --quick 10)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (appliance homes, CA dirs)")
    ap.add_argument("--out", default=str(OUT / "results.json"))
    a = ap.parse_args(argv)
    n = a.n or (300 if a.quick else 2000)
    sizes = [int(s) for s in (a.sizes or ("10000,100000" if a.quick else "10000,100000,1000000")).split(",") if s]

    t0 = time.perf_counter()
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": a.quick,
                     "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                              "openssl": _openssl_version()}}
    tables = []
    with common.temp_dir("donjon-bench-", keep=a.keep) as work:
        if a.only in (None, "issuance"):
            results["issuance"] = issuance.run(work, n)
            tables.append(issuance.table(results["issuance"]))
        if a.only in (None, "crl"):
            results["crl"] = crl.run(work, sizes)
            tables.append(crl.table(results["crl"]))
        if a.only in (None, "ocsp"):
            ocsp.WORKERS = a.ocsp_workers
            results["ocsp"] = ocsp.run(work, a.ocsp_certs or (10_000 if a.quick else 100_000),
                                       a.ocsp_big or (200_000 if a.quick else 1_000_000), a.ocsp_duration,
                                       a.ocsp_profile, a.ocsp_rounds)
            tables.append(ocsp.table(results["ocsp"]))
        if a.only in (None, "dist"):
            results["dist"] = dist.run(work, 500 if a.quick else 2000, a.dist_backlog or (2000 if a.quick else 10_000))
            tables.append(dist.table(results["dist"]))
        if a.only in (None, "acme", "gateway"):
            results["acme"] = acme.run(work, a.acme_seconds or (5.0 if a.quick else 10.0), a.acme_open or (2000 if a.quick else 10_000))
            tables.append(acme.table(results["acme"]))
        if a.only in (None, "gateway"):
            results["gateway"] = gateway.run(work, a.gateway_seconds or (5.0 if a.quick else 10.0))
            tables.append(gateway.table(results["gateway"]))
            results["gateway_cmp"] = gateway_cmp.run(work, quick=a.quick)
            tables.append(gateway_cmp.table(results["gateway_cmp"]))
        if a.only in (None, "kgs"):
            results["kgs"] = kgs.run(work, a.kgs_cards or (10 if a.quick else 20))
            tables.append(kgs.table(results["kgs"]))
        if a.only in (None, "standby"):
            results["standby"] = standby.run(work, 300 if a.quick else 1000)
            tables.append(standby.table(results["standby"]))
    results["seconds"] = time.perf_counter() - t0
    closing = summary.table(results)  # issue 19's rows, from this run
    if closing:
        tables.append(closing)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("\n\n".join(tables))
    print(f"\nWhole run: {results['seconds']:.0f} s; results in {out}")
    return 0


def _openssl_version() -> str:
    import subprocess
    try:
        return subprocess.run([common.OPENSSL, "version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())

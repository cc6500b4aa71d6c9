"""Issuance with the standby CMDB ([cmdb] standby = true) on and off, same appliance, same CSRs.

    .venv/bin/python -m bench.standby --n 1000

Each commit is also applied, durably, to the standby before it is acknowledged (appliance/factory/
standby.py): the cost is one more synchronous=FULL transaction per commit. Measured with the issuance
benchmark's clients (4 connections, batches of 128: group commits) and with one CSR per request (one
commit per certificate: the worst case), lint off so that commits, not pkilint, are the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import common, issuance

CA = "issuing-p256"
PROFILE = "tls-server-nolint"


def _set_standby(home: Path, on: bool) -> None:
    cfg = home / "donjon.toml"
    text = cfg.read_text()
    old, new = ("standby = false", "standby = true") if on else ("standby = true", "standby = false")
    if old not in text and new not in text:
        raise common.BenchError("donjon.toml has no [cmdb] standby line")
    cfg.write_text(text.replace(old, new, 1))


def run(work: Path, n: int) -> dict:
    t0 = time.perf_counter()
    home = work / "home-standby"
    common.log("standby: donjon init (root p256, issuing p256)")
    common.init_home(home, [(CA, "p256")])
    res: dict = {"n": n, "modes": {}}
    for on in (False, True, False, True):  # alternated: the shared machine's load drifts
        _set_standby(home, on)
        sb = home / "cmdb" / "standby" / "cmdb.sqlite"
        sb.unlink(missing_ok=True)  # each run proves by itself whether the standby was written
        with common.Appliance(home) as app:
            app.start()
            if on != sb.exists():
                raise common.BenchError(f"standby {'on' if on else 'off'} but {sb} {'is missing' if on else 'exists'}")
            issuance.issue_all(home, CA, PROFILE, common.make_csrs(64, f"warm-{on}-{time.time_ns()}"), threads=1, batch=64)
            for label, threads, batch, count in (("group", issuance.THREADS, issuance.BATCH, n), ("single", 1, 1, max(50, n // 10))):
                csrs = common.make_csrs(count, f"sb-{on}-{label}-{time.time_ns()}")
                common.log(f"standby {'on' if on else 'off'}: {label} x{count}")
                r = issuance.issue_all(home, CA, PROFILE, csrs, threads=threads, batch=batch)
                res["modes"].setdefault(f"{label}-{'on' if on else 'off'}", []).append(r)
    for label in ("group", "single"):
        best = {m: max(x["rate"] or 0 for x in res["modes"][f"{label}-{m}"]) for m in ("on", "off")}
        res[label] = {"on": best["on"], "off": best["off"], "ratio": best["on"] / best["off"] if best["off"] else None}
    res["seconds"] = time.perf_counter() - t0
    return res


def table(res: dict) -> str:
    lines = ["Issuance with the standby CMDB, P-256 CA, lint off (certs/s, best of 2 runs each; ratio = on/off)",
             f"{'clients x batch':<22} {'standby off':>11} {'standby on':>10} {'on/off':>7}", "-" * 54]
    for label, what in (("group", f"{issuance.THREADS} x {issuance.BATCH}"), ("single", "1 x 1")):
        r = res[label]
        lines.append(f"{what:<22} {common.fmt_rate(r['off']):>11} {common.fmt_rate(r['on']):>10} {r['ratio']:>7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    with common.temp_dir("donjon-bench-standby-", keep=a.keep) as work:
        res = run(work, a.n)
    print(table(res))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

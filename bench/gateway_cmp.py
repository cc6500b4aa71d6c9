"""CMP enrolment rate on the gateway: `openssl cmp` clients against the appliance and against OpenSSL's own CMP server.

    .venv/bin/python -m bench.gateway_cmp --n 64

Donjon: an appliance with CMP on the gateway (HTTPS), one shared secret with many uses; C concurrent client
processes (C = 1 and 16), each `openssl cmp -cmd ir` with PasswordBasedMac and implicit confirmation, `-repeat`
enrolments in one process (fresh transaction each); the rate counts certificates written, timed from the first
start to the last exit. Every certificate comes from the full pipeline: the Factory re-checks the MAC,
the CIS signs in SoftHSM2, the CMDB commits durably.
Peer: `openssl cmp -port` (OpenSSL's built-in mock CMP server: it answers every ir with one fixed certificate,
no CA, no database: a ceiling for the protocol work), the same clients over plain HTTP, run in a private
network namespace with only loopback up (`unshare -n`: the mock server binds every address).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from bench import common

CLIENTS = (1, 16)
SECRET_USES = 1_000_000


def _ir_argv(server: list[str], secret: list[str], key: Path, out: Path, repeat: int) -> list[str]:
    return ["openssl", "cmp", "-config", "", "-batch", *server, *secret, "-cmd", "ir", "-newkey", str(key), "-subject", "/CN=bench-device",
            "-implicit_confirm", "-certout", str(out), "-repeat", str(repeat), "-msg_timeout", "120", "-total_timeout", "600"]


def _clients(argvs: list[list[str]], wrap: list[str] | None = None) -> tuple[float, int]:
    """Start every client at once; (wall seconds, clients that succeeded)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen((wrap or []) + a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in argvs]
    ok = 0
    for p in procs:
        _, err = p.communicate(timeout=1200)
        if p.returncode == 0:
            ok += 1
        else:
            common.log(f"cmp client failed: {err.decode(errors='replace')[-300:]}")
    return time.perf_counter() - t0, ok


def run_donjon(work: Path, n: int) -> dict:
    home = work / "cmp-home"
    common.init_home(home, [("issuing", "p256")], nolint_profile=False)
    cfg = home / "donjon.toml"
    head, sep, rest = cfg.read_text().partition("[gateway]\n")  # the section `donjon init` wrote: switch it on for CMP
    body, nxt, tail = rest.partition("\n[")
    body = re.sub(r"(?m)^(enabled|listen|protocols)\s*=.*$", "", body)
    cfg.write_text(head + sep + 'enabled = true\nlisten = "127.0.0.1:0"\nprotocols = ["cmp"]\n' + body + nxt + tail)
    out: dict = {}
    with common.Appliance(home) as a:
        a.start()
        root = a.export("root", work / "cmp-root.pem")
        issuing = a.export("issuing", work / "cmp-issuing.pem")
        url = _wait_cmp(a)
        doc = json.loads(a.cli("cmp", "add", "--ca", "issuing", "--profile", "tls-client", "--uses", str(SECRET_USES), "--days", "1", "--json").stdout)
        server = ["-server", url.removeprefix("https://"), "-tls_used", "-tls_trusted", str(root), "-trusted", str(root), "-untrusted", str(issuing),
                  "-recipient", "/CN=Donjon CMP gateway"]
        secret = ["-ref", doc["ref"], "-secret", f"pass:{doc['secret']}"]
        key = _key(work / "cmp-dev.key")
        pid = a.role_pids().get("gateway")
        for c in CLIENTS:
            per = max(1, n // c)
            cpu0 = common.cpu_seconds(pid) if pid else 0.0
            wall, ok = _clients([_ir_argv(server, secret, key, work / f"cmp-d{c}-{i}.pem", per) for i in range(c)])
            cpu = (common.cpu_seconds(pid) - cpu0) if pid else None
            out[str(c)] = {"clients": c, "enrolments": ok * per, "seconds": wall, "rate": ok * per / wall if wall else None,
                           "gateway_cpu_per_enrolment_ms": (cpu * 1000 / (ok * per)) if cpu and ok else None}
            common.log(f"donjon cmp, {c} clients: {ok * per} enrolments in {wall:.1f} s")
    return out


def _wait_cmp(a, timeout: float = 90) -> str:
    import ssl
    import urllib.request

    deadline = time.monotonic() + timeout
    url = ""
    while time.monotonic() < deadline:
        try:
            url = (a.home / "run" / "gateway").read_text().strip() + "/.well-known/cmp"
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            req = urllib.request.Request(url, data=b"\x30\x00", headers={"Content-Type": "application/pkixcmp"})
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                if r.status == 200:
                    return url
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise common.BenchError("CMP did not come up on the gateway")


def _key(path: Path) -> Path:
    if not path.exists():
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)], check=True)
    return path


def run_peer(work: Path, n: int) -> dict:
    """OpenSSL's mock CMP server and the clients, together in one private network namespace."""
    d = work / "cmp-peer"
    d.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(d / "srv.key"),
                    "-out", str(d / "srv.pem"), "-subj", "/CN=mock CMP server", "-days", "2"], check=True, capture_output=True)
    key = _key(d / "dev.key")
    # The mock server answers with one fixed certificate: make it one for the clients' key, or they reject it.
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=bench-device", "-out", str(d / "dev.csr")], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(d / "dev.csr"), "-CA", str(d / "srv.pem"), "-CAkey", str(d / "srv.key"), "-days", "2",
                    "-out", str(d / "rsp.pem")], check=True, capture_output=True)
    out: dict = {}
    for c in CLIENTS:
        per = max(1, n // c)
        clients = " ".join(
            "openssl cmp -config '' -batch -server 127.0.0.1:18080 -srvcert {d}/srv.pem -trusted {d}/srv.pem -ref 1 -secret pass:bench-secret -cmd ir "
            "-newkey {k} -subject /CN=bench-device -implicit_confirm -certout {d}/c{i}.pem -repeat {per} >/dev/null 2>&1 & ".format(
                d=d, k=key, i=i, per=per) for i in range(c))
        script = (
            "ip link set lo up; "
            f"openssl cmp -config '' -port 18080 -srv_cert {d}/srv.pem -srv_key {d}/srv.key -srv_secret pass:bench-secret "
            f"-rsp_cert {d}/rsp.pem -grant_implicitconf >/dev/null 2>&1 & srv=$!; sleep 0.5; "
            f"t0=$(date +%s.%N); {clients} fail=0; for j in $(jobs -p); do [ $j = $srv ] && continue; wait $j || fail=$((fail+1)); done; "
            f"t1=$(date +%s.%N); kill $srv; echo $t0 $t1 $fail")
        r = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=1200)
        try:
            t0, t1, fail = r.stdout.split()[-3:]
            wall = float(t1) - float(t0)
            ok = c - int(fail)
        except ValueError:
            common.log(f"peer run failed: {r.stderr[-300:]}")
            out[str(c)] = {"clients": c, "rate": None}
            continue
        out[str(c)] = {"clients": c, "enrolments": ok * per, "seconds": wall, "rate": ok * per / wall if wall else None}
        common.log(f"openssl mock cmp, {c} clients: {ok * per} enrolments in {wall:.1f} s")
    return out


def run(work: Path, quick: bool = False, n: int | None = None) -> dict:
    n = n or (32 if quick else 128)
    return {"n": n, "donjon": run_donjon(work, n), "openssl-mock": run_peer(work, n)}


def table(res: dict) -> str:
    rows = ["CMP enrolments/s (openssl cmp ir, PasswordBasedMac, implicit confirm; Donjon over HTTPS, full pipeline)",
            f"{'clients':>8} {'Donjon':>10} {'openssl mock':>13} {'ratio':>7} {'gw CPU/enrol':>13}"]
    for c in CLIENTS:
        dj = res["donjon"].get(str(c), {})
        peer = res["openssl-mock"].get(str(c), {})
        ratio = dj.get("rate") / peer["rate"] if dj.get("rate") and peer.get("rate") else None
        cpu = dj.get("gateway_cpu_per_enrolment_ms")
        rows.append(f"{c:>8} {common.fmt_rate(dj.get('rate')):>10} {common.fmt_rate(peer.get('rate')):>13} {common.fmt_ratio(ratio):>7} "
                    f"{(f'{cpu:.1f} ms' if cpu else '-'):>13}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="enrolments per client count")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    with common.temp_dir("donjon-bench-cmp-", keep=a.keep) as work:
        res = run(work, n=a.n)
    print(json.dumps(res, indent=2), file=sys.stderr)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

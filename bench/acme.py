"""ACME: complete orders per second (new order -> http-01 -> finalize -> download) at 1, 8 and 32 concurrent
clients, Donjon's gateway beside Debian's `pebble` (the reference test server) on the same machine and the
same client; and the gateway's memory with 10,000 open orders (pebble's beside it).

    .venv/bin/python -m bench.run --only acme [--acme-seconds 10] [--acme-open 10000]

The client is tests/acmeclient.py (one account, one keep-alive HTTPS connection per concurrent client,
threads of one process), the same for both servers; it answers http-01 from one in-process HTTP server
both servers validate against. Identifiers are IP addresses (RFC 8738: no DNS on either side). Donjon
issues with the `tls-server-nolint` profile (pkilint costs ~9 ms of CIS CPU per certificate, measured
by the issuance benchmark); pebble runs with PEBBLE_VA_NOSLEEP=1 and PEBBLE_WFE_NONCEREJECT=0.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from bench import common
from tests.acmeclient import Client, b64, csr_for

CONCURRENCY = (1, 8, 32)
_tokens: dict[str, str] = {}


class _Challenges(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ka = _tokens.get(self.path.rsplit("/", 1)[-1])
        body = (ka or "").encode()
        self.send_response(200 if ka else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a) -> None:
        pass


def _serve_challenges(port: int) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Challenges)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _one_order(c: Client) -> None:
    r = c.order(["127.0.0.1"])
    if r.status != 201:
        raise common.BenchError(f"new order: {r.status} {r.body[:200]!r}")
    order, url = r.json(), r.headers["location"]
    for az in order["authorizations"]:
        z = c.post(az, None).json()
        ch = next(x for x in z["challenges"] if x["type"] == "http-01")
        _tokens[ch["token"]] = c.key_authorization(ch["token"])
        c.post(ch["url"], {})
    order = c.wait(url, ("ready", "invalid"), timeout=60)
    if order["status"] != "ready":
        raise common.BenchError(f"order not ready: {order}")
    der, _ = csr_for(["127.0.0.1"])
    r = c.post(order["finalize"], {"csr": b64(der)})
    order = r.json() if r.status == 200 else order
    if order.get("status") != "valid":
        order = c.wait(url, ("valid", "invalid"), timeout=60)
    if order.get("status") != "valid":
        raise common.BenchError(f"order not valid: {order}")
    cert = c.post(order["certificate"], None)
    if b"BEGIN CERTIFICATE" not in cert.body:
        raise common.BenchError("no certificate downloaded")


def measure(directory: str, cafile: str, clients: int, seconds: float) -> dict:
    """Complete orders per second with `clients` concurrent clients, for about `seconds`."""
    done = [0] * clients
    errors: list[str] = []
    cs = [Client(directory, cafile) for _ in range(clients)]
    for c in cs:
        if c.register().status not in (200, 201):
            raise common.BenchError("account creation failed")
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        while time.monotonic() < stop and not errors:
            try:
                _one_order(cs[i])
                done[i] += 1
            except Exception as e:  # noqa: BLE001 - reported, ends the point
                errors.append(f"{type(e).__name__}: {e}")
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - t0
    for c in cs:
        c.close()
    if errors:
        raise common.BenchError(errors[0])
    return {"clients": clients, "orders": sum(done), "seconds": elapsed, "rate": sum(done) / elapsed}


def open_orders(directory: str, cafile: str, n: int, threads: int = 8) -> float:
    """n new orders left open (pending); returns the seconds it took."""
    per = (n + threads - 1) // threads
    cs = [Client(directory, cafile) for _ in range(threads)]
    for c in cs:
        c.register()
    errs: list[str] = []

    def work(c: Client) -> None:
        for _ in range(per):
            r = c.order(["127.0.0.1"])
            if r.status != 201:
                errs.append(f"{r.status} {r.body[:200]!r}")
                return
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(c,)) for c in cs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(3600)
    for c in cs:
        c.close()
    if errs:
        raise common.BenchError(f"open orders: {errs[0]}")
    return time.perf_counter() - t0


def _pebble(work: Path, http_port: int) -> tuple[subprocess.Popen, str, Path]:
    d = work / "pebble"
    d.mkdir()
    subprocess.run([common.OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=pebble",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    from tests.acmeenv import free_port
    port, mgmt = free_port(), free_port()
    (d / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(d / "cert.pem"), "privateKey": str(d / "key.pem"), "httpPort": http_port, "tlsPort": free_port(),
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
    proc = subprocess.Popen(["pebble", "-config", str(d / "pebble.json")], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(d / "pebble.log", "wb"), cwd=d)
    url = f"https://127.0.0.1:{port}/dir"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            Client(url, str(d / "cert.pem")).close()
            return proc, url, d / "cert.pem"
        except (OSError, ValueError):
            time.sleep(0.2)
    proc.kill()
    raise common.BenchError(f"pebble did not start: {(d / 'pebble.log').read_text()[-1000:]}")


def _donjon(work: Path, http_port: int) -> tuple[common.Appliance, str, Path]:
    home = work / "acme-home"
    common.init_home(home, [("issuing", "p256")])
    with open(home / "donjon.toml", "w") as f:
        f.write(f"""[ocsp]
listen = "127.0.0.1:0"
[gateway]
enabled = true
listen = "127.0.0.1:0"
tls-names = ["127.0.0.1"]
validation-networks = ["127.0.0.0/8"]
[gateway.acme]
http01-port = {http_port}
orders-per-hour = 1000000
new-accounts-per-hour = 100000
max-open-orders = 10000000
[[gateway.acme.profile]]
name = "bench"
profile = "tls-server-nolint"
ca = "issuing"
""")
    app = common.Appliance(home)
    app.start()
    chain = work / "acme-root.pem"
    r = subprocess.run(common.donjon_argv("ca", "export", "root", "--out", str(chain), "--home", str(home)),
                       capture_output=True, text=True, timeout=60, env=app.env())
    if r.returncode != 0:
        raise common.BenchError(r.stderr)
    url = (home / "run" / "gateway").read_text().strip() + "/acme/directory"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            Client(url, str(chain)).close()
            return app, url, chain
        except (OSError, ValueError):
            time.sleep(0.2)
    raise common.BenchError("the gateway did not serve HTTPS")


def run(work: Path, seconds: float, n_open: int) -> dict:
    from tests.acmeenv import free_port
    http_port = free_port()
    srv = _serve_challenges(http_port)
    out: dict = {"seconds_per_point": seconds, "open_orders": n_open, "donjon": [], "pebble": []}
    try:
        app, url, chain = _donjon(work, http_port)
        try:
            for n in CONCURRENCY:
                common.log(f"acme: Donjon, {n} client(s)")
                out["donjon"].append(measure(url, str(chain), n, seconds))
            pid = app.role_pids()["gateway"]
            rss0 = common.proc_status_kb(pid, "VmRSS")
            common.log(f"acme: Donjon, {n_open} open orders")
            out["donjon_open_seconds"] = open_orders(url, str(chain), n_open)
            out["donjon_rss_kb"] = (rss0, common.proc_status_kb(pid, "VmRSS"), common.proc_status_kb(pid, "VmHWM"))
        finally:
            app.stop()
        proc, purl, pcert = _pebble(work, http_port)
        try:
            for n in CONCURRENCY:
                common.log(f"acme: pebble, {n} client(s)")
                out["pebble"].append(measure(purl, str(pcert), n, seconds))
            rss0 = common.proc_status_kb(proc.pid, "VmRSS")
            common.log(f"acme: pebble, {n_open} open orders")
            out["pebble_open_seconds"] = open_orders(purl, str(pcert), n_open)
            out["pebble_rss_kb"] = (rss0, common.proc_status_kb(proc.pid, "VmRSS"), common.proc_status_kb(proc.pid, "VmHWM"))
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        srv.shutdown()
    return out


def table(res: dict) -> str:
    lines = ["ACME: complete orders/s (new order -> http-01 -> finalize -> download), same client for both",
             f"{'clients':>8} {'Donjon':>10} {'pebble':>10} {'ratio':>8}"]
    for d, p in zip(res["donjon"], res["pebble"]):
        ratio = d["rate"] / p["rate"] if p["rate"] else None
        lines.append(f"{d['clients']:>8} {d['rate']:>10.1f} {p['rate']:>10.1f} {common.fmt_ratio(ratio):>8}")
    dr, pr = res["donjon_rss_kb"], res["pebble_rss_kb"]
    lines.append(f"memory with {res['open_orders']:,} open orders: gateway RSS {dr[0] / 1024:.0f} -> {dr[1] / 1024:.0f} MiB "
                 f"(peak {dr[2] / 1024:.0f}), pebble {pr[0] / 1024:.0f} -> {pr[1] / 1024:.0f} MiB (peak {pr[2] / 1024:.0f}); "
                 f"made in {res['donjon_open_seconds']:.0f} s and {res['pebble_open_seconds']:.0f} s")
    return "\n".join(lines)

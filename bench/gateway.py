"""EST and SCEP through the gateway: enrolments per second at 1 and 16 concurrent clients.

    .venv/bin/python -m bench.run --only gateway [--gateway-seconds 10]

- EST: a scripted client (threads of one process, one keep-alive HTTPS connection each) POSTs
  /simpleenroll with HTTP Basic (one enrolment secret with many uses) and pre-made P-256 CSRs.
- SCEP: Debian's `scepclient` (micromdm 2.1.0), one process per enrolment with a pre-made RSA key and
  a one-time challenge password each, through HTTPS; beside micromdm's own `scepserver` (the peer: a
  file-based CA with its key in software, plain HTTP) under the same client and load.
Donjon issues with `tls-client-nolint` (pkilint costs ~9 ms of CIS CPU per certificate) from an
RSA-2048 issuing CA (scepclient encrypts to every certificate GetCACert returns: RSA only).
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

from bench import common

CONCURRENCY = (1, 16)
SCEP_SECRETS = 3000


def _profile(home: Path) -> None:
    text = (common.REPO / "policy" / "profiles" / "tls-client.toml").read_text()
    lines = [("lint = false" if ln.strip().startswith("lint") and "=" in ln else ln) for ln in text.splitlines()]
    d = home / "profiles"
    d.mkdir(exist_ok=True)
    (d / "tls-client-nolint.toml").write_text("\n".join(lines) + "\n")


def _donjon(work: Path) -> tuple[common.Appliance, str, Path]:
    home = work / "gw-home"
    common.init_home(home, [("issuing", "rsa2048")], nolint_profile=False)
    _profile(home)
    (home / "donjon.toml").write_text("""[ocsp]
listen = "127.0.0.1:0"
[gateway]
enabled = true
listen = "127.0.0.1:0"
protocols = ["est", "scep"]
tls-names = ["127.0.0.1"]
[gateway.estscep]
scep-allow-des = true
scep-allow-weak-digest = true
""")
    app = common.Appliance(home)
    app.start()
    chain = work / "gw-root.pem"
    r = subprocess.run(common.donjon_argv("ca", "export", "root", "--out", str(chain), "--home", str(home)),
                       capture_output=True, text=True, timeout=60, env=app.env())
    if r.returncode != 0:
        raise common.BenchError(r.stderr)
    url = (home / "run" / "gateway").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(chain))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPSConnection(url.removeprefix("https://"), context=ctx, timeout=10)
            c.request("GET", "/scep?operation=GetCACert")
            if c.getresponse().status == 200:
                return app, url, chain
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.3)
    raise common.BenchError("the gateway's EST/SCEP did not become ready")


def _secrets(app: common.Appliance, protocol: str, n: int, uses: int) -> list[dict]:
    from appliance.client import connect
    from appliance.ipc import schema as S
    saved = dict(os.environ)
    os.environ.update(app.env())
    try:
        with connect(str(app.home), timeout=60) as c:
            return [c.call(S.AEnrolSecretCreate, protocol=protocol, ca="issuing", profile="tls-client-nolint",
                           ttl_seconds=86400, uses=uses) for _ in range(n)]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def est_measure(url: str, chain: str, secret: dict, clients: int, seconds: float, csrs: list[bytes]) -> dict:
    ctx = ssl.create_default_context(cafile=chain)
    auth = "Basic " + base64.b64encode(f"{secret['ref']}:{secret['secret']}".encode()).decode()
    done, errors = [0] * clients, [0] * clients
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        c = http.client.HTTPSConnection(url.removeprefix("https://"), context=ctx, timeout=60)
        k = i
        while time.monotonic() < stop:
            body = csrs[k % len(csrs)]
            k += clients
            c.request("POST", "/.well-known/est/simpleenroll", body=body,
                      headers={"Authorization": auth, "Content-Type": "application/pkcs10"})
            r = c.getresponse()
            r.read()
            if r.status == 200:
                done[i] += 1
            else:
                errors[i] += 1
                c.close()
                c = http.client.HTTPSConnection(url.removeprefix("https://"), context=ctx, timeout=60)
        c.close()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "enrolments": sum(done), "errors": sum(errors), "seconds": wall, "rate": sum(done) / wall}


def scep_measure(url: str, env: dict, clients: int, seconds: float, challenges: list[str], keys: list[Path], work: Path) -> dict:
    lock = threading.Lock()
    done, errors = [0], [0]
    last: list = [[""]]
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        k = 0
        while time.monotonic() < stop:
            with lock:
                if not challenges:
                    return
                pw = challenges.pop()
            d = work / f"scep-{clients}-{i}-{k}"
            d.mkdir()
            shutil.copy(keys[i % len(keys)], d / "key.pem")
            k += 1
            r = subprocess.run(["scepclient", "-server-url", url, "-private-key", str(d / "key.pem"), "-certificate",
                                str(d / "cert.pem"), "-cn", f"bench-{i}-{k}", "-country", "", "-organization", "Bench",
                                "-ou", "devices", "-challenge", pw], cwd=d, env=env, capture_output=True, timeout=120)
            with lock:
                if r.returncode == 0 and (d / "cert.pem").exists():
                    done[0] += 1
                else:
                    errors[0] += 1
                    last[0] = (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()[-1:] or [""]
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "enrolments": done[0], "errors": errors[0], "seconds": wall, "rate": done[0] / wall,
            "last_error": last[0][0][:300]}


def _scepserver(work: Path) -> tuple[subprocess.Popen, str]:
    from tests.acmeenv import free_port
    depot = work / "scepserver-depot"
    subprocess.run(["scepserver", "ca", "-init", "-depot", str(depot), "-keySize", "2048", "-country", "FR"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen(["scepserver", "-depot", str(depot), "-port", str(port), "-challenge", "bench-challenge",
                             "-allowrenew", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/scep"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=5)
            c.request("GET", "/scep?operation=GetCACaps")
            if c.getresponse().status == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise common.BenchError("scepserver did not start")


def _keys(work: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = work / f"scep-key-{i}.pem"
        # PKCS#1 ("RSA PRIVATE KEY"): scepclient reads no other form
        subprocess.run([common.OPENSSL, "genrsa", "-traditional", "-out", str(p), "2048"], check=True, capture_output=True, timeout=60)
        out.append(p)
    return out


def _csrs(n: int) -> list[bytes]:
    """n DER CSRs with a CN (tls-client requires one), P-256 keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    return [x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME,
            f"est-bench-{i}")])).sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(Encoding.DER)
            for i in range(n)]


def run(work: Path, seconds: float) -> dict:
    out: dict = {"seconds_per_point": seconds, "est": [], "scep": [], "scepserver": []}
    keys = _keys(work, max(CONCURRENCY))
    csrs = [base64.encodebytes(c) for c in _csrs(1000)]
    app, url, chain = _donjon(work)
    try:
        est_secret = _secrets(app, "est", 1, 100000)[0]
        challenges = [s["secret"] for s in _secrets(app, "scep", SCEP_SECRETS, 1)]
        for n in CONCURRENCY:
            common.log(f"gateway: EST, {n} client(s)")
            out["est"].append(est_measure(url, str(chain), est_secret, n, seconds, csrs))
        env = {**os.environ, "SSL_CERT_FILE": str(chain)}
        for n in CONCURRENCY:
            common.log(f"gateway: SCEP (scepclient), {n} client(s)")
            out["scep"].append(scep_measure(url + "/scep", env, n, seconds, challenges, keys, work))
        out["gateway_cpu_seconds"] = common.cpu_seconds(app.role_pids()["gateway"])
    finally:
        app.stop()
    proc, surl = _scepserver(work)
    try:
        for n in CONCURRENCY:
            common.log(f"gateway: SCEP peer (micromdm scepserver), {n} client(s)")
            out["scepserver"].append(scep_measure(surl, dict(os.environ), n, seconds, ["bench-challenge"] * 100000, keys, work))
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def table(res: dict) -> str:
    lines = ["Gateway EST and SCEP: enrolments/s (issued and returned; lint off)",
             f"{'clients':>8} {'EST':>8} {'SCEP':>8} {'scepserver':>11} {'SCEP ratio':>11}"]
    for e, s, p in zip(res["est"], res["scep"], res["scepserver"]):
        ratio = s["rate"] / p["rate"] if p["rate"] else None
        lines.append(f"{e['clients']:>8} {e['rate']:>8.1f} {s['rate']:>8.1f} {p['rate']:>11.1f} {common.fmt_ratio(ratio):>11}")
    errs = {k: sum(x["errors"] for x in res[k]) for k in ("est", "scep", "scepserver")}
    lines.append(f"failed enrolments: Donjon EST {errs['est']}, Donjon SCEP {errs['scep']}, scepserver {errs['scepserver']}; "
                 "SCEP: one scepclient process per enrolment (Go start-up, DES/SHA-1 as it speaks)")
    return "\n".join(lines)

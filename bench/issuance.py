"""Issuance rate: the running appliance (full pipeline, durable group commits) against `openssl ca -batch
-infiles` on the same CSRs and against the raw SoftHSM signing rate of the same key type.

    .venv/bin/python -m bench.issuance --n 2000

Donjon: N pre-generated CSRs (P-256 subject keys, CN = the DNS SAN) issued by THREADS concurrent
AdminClient connections, each sending batches of BATCH CSRs; the rate counts certificates returned, timed
from the first request to the last reply. Done for profile tls-server (pkilint per leaf) and for
tls-server-nolint (an operator copy with lint = false).
OpenSSL: a CA folder (index.txt, serial, software CA key of the same type, tls-server-like extensions),
one `openssl ca -batch -notext -md sha256 -infiles ...` process on the same CSRs, timed as a process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from bench import common, crl_peer, hsm_raw, lint_cpu

THREADS = 4
BATCH = 128
PROFILES = ("tls-server", "tls-server-nolint")
KEY_TYPES = {"p256": "issuing-p256", "rsa2048": "issuing-rsa2048"}
RAW_N = {"rsa2048": 3000, "p256": 30000}


# ---------------------------------------------------------------- Donjon


def issue_all(home: Path, ca: str, profile: str, csrs: list[bytes], threads: int = THREADS, batch: int = BATCH,
              roles: dict[str, int] | None = None) -> dict:
    """Issue csrs; `roles` (name -> pid) adds each role's CPU use during the run (CPU seconds / wall seconds)."""
    from appliance.client import AdminClient, connect

    batches = [csrs[i:i + batch] for i in range(0, len(csrs), batch)]
    lock = threading.Lock()
    issued = [0]
    errors: list[str] = []
    clients = [connect(str(home)) for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def worker(c: AdminClient) -> None:
        start.wait(60)
        for _ in range(len(batches)):  # bounded: at most every batch
            with lock:
                if not batches:
                    return
                b = batches.pop()
            try:
                r = c.issue(ca=ca, profile=profile, csrs=b, validity_days=None)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            ok = sum(1 for o in r.results if o.cert is not None)
            with lock:
                issued[0] += ok
                errors.extend(o.error for o in r.results if o.cert is None)

    ts = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in ts:
        t.start()
    roles = roles or {}
    cpu0 = {r: common.cpu_seconds(p) for r, p in roles.items()}
    own0 = os.times()
    start.wait(60)
    t0 = time.perf_counter()
    for t in ts:
        t.join(1800)
    wall = time.perf_counter() - t0
    own1 = os.times()
    cpu = {r: (common.cpu_seconds(p) - cpu0[r]) / wall for r, p in roles.items()}
    cpu["bench-client"] = max(0.0, own1.user + own1.system - own0.user - own0.system) / wall
    for c in clients:
        c.close()
    if any(t.is_alive() for t in ts):
        raise common.BenchError("an issuing thread did not finish within 30 minutes")
    if errors:
        common.log(f"{ca}/{profile}: {len(errors)} errors, first: {errors[0]}")
    return {"requested": len(csrs), "issued": issued[0], "errors": len(errors), "seconds": wall,
            "rate": issued[0] / wall if wall else None, "first_error": errors[0] if errors else None,
            "cpu_util": cpu}


# ---------------------------------------------------------------- OpenSSL


def _software_ca(d: Path, key_type: str) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(65537, 2048) if key_type == "rsa2048" else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Donjon Bench"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"OpenSSL bench {key_type}")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1825))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    (d / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def openssl_ca(work: Path, key_type: str, csrs: list[bytes]) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    d = work / f"openssl-ca-{key_type}"
    (d / "newcerts").mkdir(parents=True)
    (d / "csr").mkdir()
    _software_ca(d, key_type)
    (d / "index.txt").write_text("")
    (d / "index.txt.attr").write_text("unique_subject = no\n")
    (d / "serial").write_text("1000\n")
    (d / "openssl.cnf").write_text(f"""[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {d}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_days = 398
policy = policy_any
copy_extensions = copy
unique_subject = no
email_in_dn = no
x509_extensions = leaf
[ policy_any ]
commonName = optional
[ leaf ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
crlDistributionPoints = URI:http://pki.example.org/crl/bench.crl
authorityInfoAccess = caIssuers;URI:http://pki.example.org/ca/bench.crt, OCSP;URI:http://pki.example.org/ocsp
""")
    paths = []
    for i, der in enumerate(csrs):
        p = d / "csr" / f"{i}.pem"
        p.write_bytes(x509.load_der_x509_csr(der).public_bytes(Encoding.PEM))
        paths.append(str(p))
    out = d / "issued.pem"
    with open(d / "openssl.err", "wb") as err:
        wall, rss, rc = crl_peer.run_measured(
            [crl_peer.OPENSSL, "ca", "-batch", "-config", str(d / "openssl.cnf"), "-notext", "-md", "sha256",
             "-out", str(out), "-infiles", *paths], stdout=crl_peer.subprocess.DEVNULL, stderr=err, timeout=1800)
    if rc != 0:
        raise common.BenchError(f"openssl ca failed ({rc}): {(d / 'openssl.err').read_text()[-2000:]}")
    # count the certificates filed in new_certs_dir: with -infiles, OpenSSL 3.0 leaves only the last one in -out
    issued = sum(1 for f in (d / "newcerts").iterdir() if f.suffix == ".pem")
    return {"requested": len(csrs), "issued": issued, "seconds": wall, "rate": issued / wall, "peak_rss": rss}


# ---------------------------------------------------------------- the whole comparison


def run(work: Path, n: int) -> dict:
    t0 = time.perf_counter()
    common.log(f"issuance: generating {n} CSRs")
    csrs = common.make_csrs(n, "issue")
    home = work / "home-issue"
    common.log("issuance: donjon init (root p256, issuing p256 + rsa2048)")
    common.init_home(home, [(ca, kt) for kt, ca in KEY_TYPES.items()])
    results: dict = {"n": n, "threads": THREADS, "batch": BATCH, "key_types": {}}
    with common.Appliance(home) as app:
        app.start()
        for kt, ca in KEY_TYPES.items():
            r: dict = {"ca": ca, "donjon": {}}
            for prof in PROFILES:
                issue_all(home, ca, prof, common.make_csrs(min(64, n), f"warm-{kt}-{prof}"), threads=1, batch=64)  # imports, caches
                common.log(f"issuance: donjon {ca} {prof} x{n}")
                r["donjon"][prof] = issue_all(home, ca, prof, csrs, roles={**app.role_pids(), "supervisor": app.proc.pid})
            results["key_types"][kt] = r
    for kt in KEY_TYPES:
        r = results["key_types"][kt]
        common.log(f"issuance: openssl ca {kt} x{n}")
        r["openssl"] = openssl_ca(work, kt, csrs)
        common.log(f"issuance: raw SoftHSM {kt}")
        r["raw_hsm"] = hsm_raw.measure(kt, RAW_N[kt])
        for prof in PROFILES:
            d = r["donjon"][prof]
            d["vs_openssl"] = d["rate"] / r["openssl"]["rate"]
            d["vs_raw_hsm"] = d["rate"] / r["raw_hsm"]["rate"]
            d["cis_ms_per_cert"] = _cis_ms_per_cert(d)
        lint, nolint = r["donjon"]["tls-server"]["cis_ms_per_cert"], r["donjon"]["tls-server-nolint"]["cis_ms_per_cert"]
        # Lint CPU per certificate: what the CIS processes spend per linted leaf beyond an unlinted one.
        r["lint_cpu_ms_per_cert"] = lint - nolint if lint is not None and nolint is not None else None
    common.log("issuance: lint step in-process, Donjon's path and pkilint as shipped")
    results["lint_inprocess"] = lint_cpu.compare(min(n, 300))
    results["seconds"] = time.perf_counter() - t0
    return results


def _cis_ms_per_cert(d: dict) -> float | None:
    """CPU milliseconds of every CIS process per issued certificate (from CPU/wall and the run's wall time)."""
    util = sum(v for k, v in d.get("cpu_util", {}).items() if k == "cis" or k.startswith("cis."))
    return util * d["seconds"] / d["issued"] * 1000 if d.get("issued") else None


def table(res: dict) -> str:
    lines = [f"Issuance rate, N={res['n']} CSRs, {res['threads']} clients x batches of {res['batch']} "
             "(certs/s; ratios = donjon/peer)",
             f"{'CA key':<8} {'donjon lint':>11} {'donjon nolint':>13} {'openssl ca':>10} {'raw HSM sig':>11} | "
             f"{'lint/openssl':>12} {'nolint/openssl':>14} {'lint/HSM':>8} {'nolint/HSM':>10}",
             "-" * 112]
    for kt, r in res["key_types"].items():
        dl, dn = r["donjon"]["tls-server"], r["donjon"]["tls-server-nolint"]
        lines.append(f"{kt:<8} {common.fmt_rate(dl['rate']):>11} {common.fmt_rate(dn['rate']):>13} "
                     f"{common.fmt_rate(r['openssl']['rate']):>10} {common.fmt_rate(r['raw_hsm']['rate']):>11} | "
                     f"{common.fmt_ratio(dl['vs_openssl']):>12} {common.fmt_ratio(dn['vs_openssl']):>14} "
                     f"{dl['vs_raw_hsm']:>8.0%} {dn['vs_raw_hsm']:>10.0%}")
        for prof, d in r["donjon"].items():
            if d["errors"] or d["issued"] != d["requested"]:
                lines.append(f"  ! {kt} {prof}: issued {d['issued']}/{d['requested']}, {d['errors']} errors: {d['first_error']}")
    lines.append("CPU use during the Donjon runs (CPU s / wall s; 1.00 = one core busy):")
    for kt, r in res["key_types"].items():
        for prof, d in r["donjon"].items():
            lines.append(f"  {kt:<8} {prof:<18} " + "  ".join(f"{k} {v:.2f}" for k, v in d.get("cpu_util", {}).items()))
    for kt, r in res["key_types"].items():
        lc = r.get("lint_cpu_ms_per_cert")
        cis = {p: r["donjon"][p].get("cis_ms_per_cert") for p in PROFILES}
        lines.append(f"  {kt:<8} CIS CPU per certificate: linted {_ms(cis['tls-server'])}, lint off "
                     f"{_ms(cis['tls-server-nolint'])}: lint CPU {_ms(lc)} per certificate")
    for kt, r in res.get("lint_inprocess", {}).items():
        lines.append(f"  {kt:<8} lint step in-process (trial signature + pkilint): {_ms(r['donjon']['lint_ms'])}, pkilint as "
                     f"shipped {_ms(r['stock']['lint_ms'])}: {r['ratio']:.1f}x less")
    lines.append("Targets: donjon linted >= 1x openssl ca, lint off >= 2x; donjon >= 80% of the raw HSM rate for RSA-2048.")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    with common.temp_dir("donjon-bench-issue-", keep=a.keep) as work:
        res = run(work, a.n)
    print(table(res))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Publication to LDAP: the Distribution agent against a real slapd, beside `ldapadd` loading the same
certificates in one process (the directory's own ceiling on this machine).

    .venv/bin/python -m bench.dist --live 2000 --backlog 10000

1. Live: N certificates issued (P-256, lint off) while slapd runs; rate = N / (time from the first
   issuance request until the agent's last acknowledgement is committed).
2. Backlog: slapd stopped, B certificates issued (their jobs queue up durably), the appliance stopped,
   slapd started, the appliance started; drain time = from its activation until `dist status` shows no
   pending job.
3. Peer: `ldapadd` of B entries carrying the same kind of certificate (one process, one connection).
Every publication is checked afterwards: each entry holds its certificate exactly once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from bench import common, issuance
from tests.servers import ADMIN_DN, ADMIN_PW, BASE, Slapd

CA = "issuing-p256"


def _config(home: Path, slapd: Slapd) -> None:
    (home.parent / "ldap.secret").write_text(ADMIN_PW)
    (home / "donjon.toml").write_text(f"""[ocsp]
listen = "127.0.0.1:0"
[[distribution.rule]]
name = "directory"
url = "{slapd.url}"
bind-dn = "{ADMIN_DN}"
secret-file = "{home.parent / 'ldap.secret'}"
publish = ["certs"]
profiles = ["tls-server-nolint"]
dn = "cn={{CN}},ou=people,{BASE}"
entry-classes = ["applicationProcess", "pkiUser"]
entry-attributes = {{}}
""")


def _status(home: Path) -> dict:
    from appliance.client import connect
    from appliance.ipc import schema as S

    with connect(str(home), timeout=30) as c:
        return c.call(S.ADistStatus)["destinations"][0]


def _wait_drained(home: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = _status(home)
        if d["pending"] == 0 and d["in_flight"] == 0:
            return time.perf_counter() - t0
        time.sleep(0.1)  # each poll costs the Factory a status query: polled faster, it slows what it measures
    raise common.BenchError(f"backlog not drained within {timeout:.0f} s: {d}")


def _count_published(slapd: Slapd) -> int:
    r = subprocess.run(["ldapsearch", "-LLL", "-x", "-H", slapd.url, "-D", ADMIN_DN, "-w", ADMIN_PW, "-b", f"ou=people,{BASE}",
                        "-s", "one", "-z", "0", "(userCertificate;binary=*)", "dn"], capture_output=True, text=True, timeout=300)
    return sum(1 for ln in r.stdout.splitlines() if ln.startswith("dn:"))


def _ldapadd_peer(work: Path, ders: list[bytes]) -> dict:
    import base64

    d = Slapd(work / "slapd-peer")
    d.start()
    try:
        ldif = work / "peer.ldif"
        with open(ldif, "w") as f:
            for i, der in enumerate(ders):
                f.write(f"dn: cn=peer{i},ou=people,{BASE}\nobjectClass: applicationProcess\nobjectClass: pkiUser\n"
                        f"cn: peer{i}\nuserCertificate;binary:: {base64.b64encode(der).decode()}\n\n")
        t0 = time.perf_counter()
        subprocess.run(["ldapadd", "-x", "-H", d.url, "-D", ADMIN_DN, "-w", ADMIN_PW, "-f", str(ldif)],
                       check=True, capture_output=True, timeout=1800)
        wall = time.perf_counter() - t0
        return {"entries": len(ders), "seconds": wall, "rate": len(ders) / wall}
    finally:
        d.stop()


def run(work: Path, live: int, backlog: int) -> dict:
    slapd = Slapd(work / "slapd")
    slapd.start()
    home = work / "dist-home"
    home.mkdir(mode=0o755)
    _config(home, slapd)
    common.init_home(home, [(CA, "p256")])
    app = common.Appliance(home)
    res: dict = {"live": live, "backlog": backlog}
    try:
        app.start()
        common.log(f"dist: {live} live publications")
        csrs = common.make_csrs(live, "live")
        t0 = time.perf_counter()
        iss = issuance.issue_all(home, CA, "tls-server-nolint", csrs)
        _wait_drained(home, 600)
        wall = time.perf_counter() - t0
        res["live_issuance_rate"] = iss["rate"]
        res["live_seconds"] = wall
        res["live_rate"] = iss["issued"] / wall
        common.log(f"dist: {backlog} jobs queued with slapd stopped")
        slapd.stop()
        csrs = common.make_csrs(backlog, "backlog")
        issuance.issue_all(home, CA, "tls-server-nolint", csrs)
        queued = _status(home)["pending"]
        res["queued"] = queued
        app.stop()  # the backlog survives a restart; the directory is back before the appliance
        slapd.start()
        app.start()
        drain = _wait_drained(home, 1800)
        res["drain_seconds"] = drain
        res["drain_rate"] = queued / drain if drain else None
        res["published_entries"] = _count_published(slapd)
        res["expected_entries"] = live + backlog
        common.log(f"dist: drained {queued} in {drain:.1f} s; checking with ldapsearch")
    finally:
        app.stop()
        slapd.stop()
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    peer_ders = []
    for der in common.make_csrs(min(backlog, 10_000), "peer")[:backlog]:
        peer_ders.append(_self_signed_like(x509.load_der_x509_csr(der)).public_bytes(Encoding.DER))
    res["ldapadd"] = _ldapadd_peer(work, peer_ders)
    res["ratio_drain_vs_ldapadd"] = res["drain_rate"] / res["ldapadd"]["rate"] if res["drain_rate"] else None
    return res


def _self_signed_like(csr):
    """A certificate of about the size Donjon issues (for the ldapadd peer's payload)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    k = _self_signed_like.key = getattr(_self_signed_like, "key", None) or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(csr.subject).public_key(csr.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
            .sign(k, hashes.SHA256()))


def table(res: dict) -> str:
    lines = ["Publication to slapd (Distribution agent, one destination), ldapadd = one process loading the same entries",
             f"{'':<28} {'entries':>8} {'seconds':>8} {'entries/s':>10}",
             "-" * 58,
             f"{'live (issue + publish)':<28} {res['live']:>8,} {res['live_seconds']:>8.1f} {common.fmt_rate(res['live_rate']):>10}",
             f"{'backlog drain after restart':<28} {res['queued']:>8,} {res['drain_seconds']:>8.1f} {common.fmt_rate(res['drain_rate']):>10}",
             f"{'ldapadd (peer)':<28} {res['ldapadd']['entries']:>8,} {res['ldapadd']['seconds']:>8.1f} "
             f"{common.fmt_rate(res['ldapadd']['rate']):>10}",
             f"drain / ldapadd: {common.fmt_ratio(res['ratio_drain_vs_ldapadd'])}; entries holding their certificate: "
             f"{res['published_entries']:,} of {res['expected_entries']:,}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=int, default=2000)
    ap.add_argument("--backlog", type=int, default=10000)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    with common.temp_dir("donjon-bench-dist-", keep=a.keep) as work:
        res = run(work, a.live, a.backlog)
    print(json.dumps(res, indent=2))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

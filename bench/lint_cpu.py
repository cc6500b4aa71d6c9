"""Lint CPU per certificate, in-process: the CIS's pre-signing lint step (trial signature under a throwaway
key, pkilint on the trial certificate and its shadow issuer) timed alone, through Donjon's lint path and
through pkilint's stock path (fresh documents, every container's validate()).

    .venv/bin/python -m bench.lint_cpu --n 300 [--profile FILE]

CPU time (process_time) per certificate, after a warm-up; the leaves are tls-server certificates of one
issuing CA (P-256 or RSA-2048, under a P-384 root) with one DNS SAN each, as `just bench` issues them.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from policy import certs, lint
from policy.profiles import builtin_profiles

_KEYGEN = {"p256": lambda: ec.generate_private_key(ec.SECP256R1()), "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
           "p384": lambda: ec.generate_private_key(ec.SECP384R1())}


ROUNDS = 10


def _spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _info(cert: x509.Certificate, key_type: str) -> certs.IssuerInfo:
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    return certs.IssuerInfo(cert.subject.public_bytes(), key_type, _spki_of(cert), cert.not_valid_before_utc, cert.not_valid_after_utc,
                            bc.path_length, crl_url="http://pki.example.org/crl/issuing.crl", ocsp_url="http://pki.example.org/ocsp",
                            ca_issuers_url="http://pki.example.org/ca/issuing.der")


def _spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def chain(key_type: str) -> tuple[x509.Certificate, object, x509.Certificate]:
    """(root, issuing key, issuing certificate): a P-384 root and an issuing CA of key_type."""
    P = builtin_profiles()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    rk = _KEYGEN["p384"]()
    rs = certs.IssueSpec(P["root-ca"], _spki(rk), (("CN", "Bench Root"), ("O", "Donjon"), ("C", "FR")), (), 1,
                         now - dt.timedelta(days=2), now + dt.timedelta(days=3650))
    root = certs.build_tbs(rs, None).sign(rk, certs.signature_hash("p384"))
    ik = _KEYGEN[key_type]()
    s = certs.IssueSpec(P["sub-ca"], _spki(ik), (("CN", f"Bench Issuing {key_type}"), ("O", "Donjon")), (), 2,
                        now - dt.timedelta(days=1), now + dt.timedelta(days=1500))
    issuing = certs.build_tbs(s, _info(root, "p384")).sign(rk, certs.signature_hash("p384"))
    return root, ik, issuing


def builders(issuing: x509.Certificate, key_type: str, n: int, profile: str = "tls-server") -> list:
    P = builtin_profiles()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    info = _info(issuing, key_type)
    out = []
    for i in range(n):
        k = _KEYGEN["p256"]()
        s = certs.IssueSpec(P[profile], _spki(k), (("CN", f"host{i}.bench.example.org"),), (("dns", f"host{i}.bench.example.org"),),
                            0x4000_0000_0000_0000 + i,
                            now - dt.timedelta(hours=1), now + dt.timedelta(days=90))
        out.append(certs.build_tbs(s, info))
    return out


def shadow(issuing: x509.Certificate, tk, key_type: str) -> bytes:
    """As the CIS's shadow_issuer: the issuing certificate re-made around the throwaway key."""
    b = (x509.CertificateBuilder().subject_name(issuing.subject).issuer_name(issuing.issuer).public_key(tk.public_key())
         .serial_number(issuing.serial_number).not_valid_before(issuing.not_valid_before_utc)
         .not_valid_after(issuing.not_valid_after_utc))
    for ext in issuing.extensions:
        b = b.add_extension(ext.value, ext.critical)
    return b.sign(tk, certs.signature_hash(key_type)).public_bytes(serialization.Encoding.DER)


def measure(key_type: str, n: int, stock: bool = False, prof: cProfile.Profile | None = None) -> dict:
    """CPU ms per certificate of the lint step (trial signature + lint + TBS comparison) and of the real signature."""
    P = builtin_profiles()
    _, ik, issuing = chain(key_type)
    tk = _KEYGEN[key_type]()
    sh = shadow(issuing, tk, key_type)
    halg = certs.signature_hash(key_type)
    profile = P["tls-server"]
    run = _stock if stock else lint.lint_certificate
    for b in builders(issuing, key_type, 20):  # warm-up: imports, validator sets, caches
        assert run(b.sign(tk, halg).public_bytes(serialization.Encoding.DER), profile, sh) == []
    bs = builders(issuing, key_type, n)
    # The machine is shared: the least CPU time of ROUNDS rounds (another process's load inflates, never deflates).
    lint_s, sign_s = [], []
    for r in range(ROUNDS):
        part = bs[r::ROUNDS]
        if prof is not None:
            prof.enable()
        t0 = time.process_time()
        for b in part:
            trial = b.sign(tk, halg)
            findings = run(trial.public_bytes(serialization.Encoding.DER), profile, sh)
            assert findings == [], findings
            _ = trial.tbs_certificate_bytes
        lint_s.append((time.process_time() - t0) / len(part))
        if prof is not None:
            prof.disable()
        t0 = time.process_time()
        for b in part:
            b.sign(ik, halg).public_bytes(serialization.Encoding.DER)
        sign_s.append((time.process_time() - t0) / len(part))
    return {"n": n, "lint_ms": min(lint_s) * 1000, "sign_ms": min(sign_s) * 1000,
            "lint_ms_median": sorted(lint_s)[len(lint_s) // 2] * 1000}


def _stock(cert_der: bytes, profile, issuer_der: bytes | None) -> list[str]:
    """pkilint's stock path, as its own tools drive it (the reference the differential tests use too)."""
    from tests.lintstock import stock_findings

    return stock_findings(cert_der, profile, issuer_der)


def stock_only(key_types: list[str], n: int) -> dict:
    """The stock path in this process with none of Donjon's changes to pkilint applied (run it alone)."""
    from policy import lintwalk

    lintwalk.PKILINT_VERSION = "0.0.0-not-installed"  # the version guard leaves pkilint as shipped
    lint.warm()
    assert not lintwalk._INSTALLED
    return {kt: measure(kt, n, stock=True) for kt in key_types}


def _stock_subprocess(key_type: str, n: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.lint_cpu", "--stock-only", "--key-type", key_type, "--n", str(n)],
                       capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent)
    if r.returncode != 0:
        raise RuntimeError(f"stock lint run failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.splitlines()[-1])[key_type]


def compare(n: int, key_types: tuple[str, ...] = ("p256", "rsa2048")) -> dict:
    """Donjon's lint step against pkilint as shipped (in a process of its own), per key type."""
    out = {}
    for kt in key_types:
        mine, stock = measure(kt, n), _stock_subprocess(kt, n)
        out[kt] = {"donjon": mine, "stock": stock, "ratio": stock["lint_ms"] / mine["lint_ms"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--key-type", choices=["p256", "rsa2048"], action="append")
    ap.add_argument("--stock", action="store_true", help="also measure pkilint's stock path")
    ap.add_argument("--stock-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="write a cProfile of Donjon's lint step (p256) to this file")
    a = ap.parse_args(argv)
    if a.stock_only:
        print(json.dumps(stock_only(a.key_type, a.n)))
        return 0
    out: dict = {}
    for kt in a.key_type or ["p256", "rsa2048"]:
        prof = cProfile.Profile() if a.profile and kt == (a.key_type or ["p256"])[0] else None
        out[kt] = {"donjon": measure(kt, a.n, prof=prof)}
        if prof is not None:
            prof.dump_stats(a.profile)
        if a.stock:
            out[kt]["stock"] = _stock_subprocess(kt, a.n)
            out[kt]["ratio"] = out[kt]["stock"]["lint_ms"] / out[kt]["donjon"]["lint_ms"]
        line = f"{kt:<8} lint step {out[kt]['donjon']['lint_ms']:.2f} ms/cert (real signature {out[kt]['donjon']['sign_ms']:.2f} ms)"
        if a.stock:
            line += f"; stock pkilint {out[kt]['stock']['lint_ms']:.2f} ms/cert: {out[kt]['ratio']:.2f}x less"
        print(line, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

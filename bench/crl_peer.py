"""Peer benchmark helpers: `openssl ca -gencrl` on N revoked entries (time and peak RSS).

Builds a minimal OpenSSL CA directory (openssl.cnf, index.txt, crlnumber, RSA-2048 CA key and
certificate) whose index.txt lists the same revoked entries the Donjon encoder is given, and runs
`openssl ca -gencrl` in a child process measured with /usr/bin/time (wall time, peak RSS of that child).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

OPENSSL = "/usr/bin/openssl"
TIME = "/usr/bin/time"

_REASON_NAMES = {
    0: "unspecified", 1: "keyCompromise", 2: "CACompromise", 3: "affiliationChanged", 4: "superseded",
    5: "cessationOfOperation", 6: "certificateHold", 8: "removeFromCRL",
}


def run_measured(argv: list[str], **kw) -> tuple[float, int, int]:
    """Run argv as a child under /usr/bin/time; return (wall seconds, peak RSS bytes of argv, exit status).

    The peak RSS comes from /usr/bin/time (a small C program that forks and execs argv), not from
    os.wait4 on a child forked by this Python process: ru_maxrss counts the pre-exec image of the
    forked child, which would report the parent's own size for a small program.
    """
    with tempfile.NamedTemporaryFile("r", prefix="time-", suffix=".txt") as tf:
        t0 = time.perf_counter()
        rc = subprocess.run([TIME, "-f", "%M", "-o", tf.name, *argv], **kw).returncode
        wall = time.perf_counter() - t0
        lines = [ln for ln in Path(tf.name).read_text().splitlines() if ln.strip()]
    rss_kb = int(lines[-1])
    return wall, rss_kb * 1024, rc


def _utctime(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%y%m%d%H%M%SZ")


def write_ca_key_and_cert(d: Path) -> None:
    """RSA-2048 CA key and self-signed certificate (made with cryptography) as ca.key / ca.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Donjon bench CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    (d / "ca.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def build_ca_dir(d: Path, entries: Iterable[tuple[int, int, int | None, int | None]], *, crl_number: int = 42) -> Path:
    """Write openssl.cnf, index.txt (one 'R' line per entry), crlnumber into d (ca.key/ca.pem must exist)."""
    d.mkdir(parents=True, exist_ok=True)
    exp = _utctime(int(time.time()) + 86400 * 3650)
    with open(d / "index.txt", "w") as f:
        w = f.write
        for serial, revoked_at, reason, _inval in entries:
            hx = "%X" % serial
            if len(hx) % 2:
                hx = "0" + hx
            rev = _utctime(revoked_at)
            if reason:
                rev += "," + _REASON_NAMES[reason]
            w(f"R\t{exp}\t{rev}\t{hx}\tunknown\t/CN=x\n")
    (d / "index.txt.attr").write_text("unique_subject = no\n")
    (d / "crlnumber").write_text("%02X\n" % crl_number)
    (d / "openssl.cnf").write_text(
        f"""[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {d}
database = $dir/index.txt
crlnumber = $dir/crlnumber
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_crl_days = 7
crl_extensions = crl_ext
unique_subject = no
[ crl_ext ]
authorityKeyIdentifier = keyid:always
"""
    )
    return d


def gencrl(d: Path, out: Path) -> tuple[float, int]:
    """Run `openssl ca -gencrl` in d; return (wall seconds, peak RSS bytes). Output is PEM (openssl ca's only form)."""
    with open(d / "openssl.err", "wb") as err:
        wall, rss, rc = run_measured(
            [OPENSSL, "ca", "-gencrl", "-batch", "-config", str(d / "openssl.cnf"), "-out", str(out)],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    if rc != 0:
        raise RuntimeError(f"openssl ca -gencrl failed ({rc}): {(d / 'openssl.err').read_text()[-2000:]}")
    return wall, rss


def verify_crl(crl_path: Path, ca_pem: Path, inform: str = "DER") -> str:
    """`openssl crl -noout -CAfile`; returns its 'verify OK' line or raises."""
    r = subprocess.run(
        [OPENSSL, "crl", "-inform", inform, "-in", str(crl_path), "-noout", "-CAfile", str(ca_pem)],
        capture_output=True, text=True,
    )
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or "verify OK" not in out:
        raise RuntimeError(f"openssl crl verification failed: {out}")
    return out

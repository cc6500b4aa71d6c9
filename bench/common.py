"""Shared helpers of the benchmarks: temp dirs, the appliance under test (init/start/stop by pid),
its role processes and their memory, CSR generation, a throwaway SoftHSM token.

Every wait is bounded by a deadline; every process started here is stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import Appliance as TestAppliance

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DONJON = str(VENV_BIN / "donjon") if (VENV_BIN / "donjon").exists() else None
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
OPENSSL = "/usr/bin/openssl"


# The benchmark's officers (issue #6): every CLI call and admin client below logs in as the operator
# through the environment (appliance.client.connect).
BENCH_PASSWORD = "bench-officer-password"
os.environ.setdefault("DONJON_OFFICER", "bench")
os.environ.setdefault("DONJON_PASSWORD", BENCH_PASSWORD)


class BenchError(Exception):
    pass


def donjon_argv(*args: str) -> list[str]:
    if DONJON:
        return [DONJON, *args]
    return [sys.executable, "-m", "appliance.cli", *args]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def temp_dir(prefix: str, keep: bool = False):
    """A private temporary folder, removed afterwards (unless keep). 0o755 so that dropped roles can traverse."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- the appliance


def write_ceremony(path: Path, issuing: list[tuple[str, str]]) -> None:
    """Root P-256 plus one issuing CA per (name, key type)."""
    lines = ['[root]', 'name = "root"', 'key-type = "p256"',
             'subject = { C = "FR", O = "Donjon Bench", CN = "Donjon Bench Root CA" }',
             'validity-days = 3650', 'path-length = 1', '']
    for name, kt in issuing:
        lines += ['[[issuing]]', f'name = "{name}"', f'key-type = "{kt}"',
                  f'subject = {{ C = "FR", O = "Donjon Bench", CN = "Donjon Bench {name}" }}',
                  'validity-days = 1825', 'path-length = 0', '']
    path.write_text("\n".join(lines))


def init_home(home: Path, issuing: list[tuple[str, str]], nolint_profile: bool = True, timeout: float = 300) -> None:
    cer = home.parent / (home.name + "-ceremony.toml")
    write_ceremony(cer, issuing)
    r = subprocess.run(donjon_argv("init", "--home", str(home), "--ceremony", str(cer),
                                   "--officer", "bench-admin:administrator", "--officer", "bench:operator"), capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    if r.returncode != 0:
        raise BenchError(f"donjon init failed: {r.stderr[-2000:]}")
    if nolint_profile:
        add_nolint_profile(home)
    listen_on_free_port(home)


def listen_on_free_port(home: Path) -> None:
    """ocsp.listen on a free port of 127.0.0.1: engineers' tests and benchmarks share the machine (and 8080)."""
    cfg = home / "donjon.toml"
    text = cfg.read_text()
    new = re.sub(r'(?m)^listen = "127\.0\.0\.1:8080"', 'listen = "127.0.0.1:0"', text, count=1)
    if new != text:
        cfg.write_text(new)


def add_nolint_profile(home: Path) -> None:
    """Operator profile tls-server-nolint: the shipped tls-server with lint = false (read at `donjon run`)."""
    text = (REPO / "policy" / "profiles" / "tls-server.toml").read_text()
    lines = [("lint = false" if ln.strip().startswith("lint") and "=" in ln else ln) for ln in text.splitlines()]
    if "lint = false" not in lines:
        lines.append("lint = false")
    d = home / "profiles"
    d.mkdir(exist_ok=True)
    (d / "tls-server-nolint.toml").write_text("\n".join(lines) + "\n")


class Appliance(TestAppliance):
    """The test suite's appliance helper (tests/conftest.py), run the benchmark's way: the venv's donjon
    (or the source tree), the benchmark officers, its own process group stopped by pid."""

    def __init__(self, home: Path):
        super().__init__(home, src=str(REPO), bin=DONJON or "")
        self.officers = {"bench-admin": "administrator", "bench": "operator"}

    def env(self, officer: str = "bench") -> dict[str, str]:
        e = super().env(officer if officer in self.officers else "bench")
        e["DONJON_PASSWORD"] = BENCH_PASSWORD
        return e

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()


def open_stopped_cmdb(home: Path):
    """Bench-only: open a stopped appliance's CMDB for a bulk load, unwrapping its key through the
    token with the PIN file (what the CIS does at activation), with a large page cache."""
    from appliance.factory.cmdb import Cmdb
    from hsm.token import Token

    os.environ["SOFTHSM2_CONF"] = str(home / "softhsm" / "softhsm2.conf")
    tok = Token(SOFTHSM_MODULE, "donjon")
    tok.login((home / "pin").read_text().strip())
    key = tok.unwrap_db_key((home / "cmdb" / "cmdb.key").read_bytes())
    db = Cmdb(str(home / "cmdb" / "cmdb.sqlite"), key)
    db.db.execute("PRAGMA cache_size = -1000000")  # ~1 GB page cache for the bulk insert (random keys)
    return db


def run_bulk_load(home: Path, module: str, *args: str) -> dict:
    """Run `python -m MODULE --load HOME ARGS...` (a bench-only bulk load into the stopped appliance's
    CMDB, as root), give the role folders back to their owners, and return the child's last JSON line."""
    import json
    owners = {p: (p.stat().st_uid, p.stat().st_gid) for p in (home / "cmdb", home / "softhsm")}
    r = subprocess.run([sys.executable, "-m", module, "--load", str(home), *args],
                       capture_output=True, text=True, timeout=3600, cwd=REPO)
    for top, (uid, gid) in owners.items():  # the child ran as root: give back what it created or touched
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), uid, gid)
    if r.returncode != 0:
        raise BenchError(f"bulk load failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def proc_status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith(field + ":"):
                return int(ln.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process so far (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def export_chain(home: Path, ca: str, out: Path) -> None:
    r = subprocess.run(donjon_argv("ca", "export", ca, "--chain", "--out", str(out), "--home", str(home)),
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    if r.returncode != 0:
        raise BenchError(f"donjon ca export failed: {r.stderr}")


# ---------------------------------------------------------------- CSRs


def make_csrs(n: int, prefix: str = "bench") -> list[bytes]:
    """n DER CSRs, P-256 subject keys, empty subject, one DNS SAN each."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = []
    for i in range(n):
        k = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"host{i}.{prefix}.example.org")]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"host{i}.{prefix}.example.org")]), critical=False)
               .sign(k, hashes.SHA256()))
        out.append(csr.public_bytes(serialization.Encoding.DER))
    return out


# ---------------------------------------------------------------- a throwaway SoftHSM token


@contextlib.contextmanager
def softhsm_token(d: Path, label: str = "bench", pin: str = "1234"):
    """A fresh SoftHSM2 token in d (own SOFTHSM2_CONF, set in os.environ for this process)."""
    tokdir = d / "tokens"
    tokdir.mkdir(parents=True)
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokdir}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    r = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "123456", "--pin", pin],
                       env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BenchError(f"softhsm2-util failed: {r.stderr}")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield label, pin
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"

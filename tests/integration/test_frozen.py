"""The appliance smoke test, from source and from the PyInstaller onedir bundle (`just binary`)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from appliance.privdrop import ROLE_USERS
from tests.conftest import REPO, make_csr, openssl

SNMP = '[snmp]\nenabled = true\nlisten = "127.0.0.1:0"\ncommunity-file = "snmp-community"\ncommunity-sources = ["127.0.0.0/8"]\n'


@pytest.fixture(scope="session")
def frozen_bin():
    """The bundle's executable: DONJON_BIN if given, else built once for the session (~30 s)."""
    given = os.environ.get("DONJON_BIN")
    if given:
        yield given
        return
    out = Path(tempfile.mkdtemp(prefix="donjon-dist-"))
    os.chmod(out, 0o755)  # roles re-execute the bundle under their own users
    try:
        r = subprocess.run(["bash", str(REPO / "image" / "build-binary"), str(out)], capture_output=True, text=True,
                           timeout=900, cwd=REPO)
        assert r.returncode == 0, f"image/build-binary failed:\n{r.stdout}\n{r.stderr}"
        yield str(out / "donjon" / "donjon")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _bundle_excludes_test_packages(exe: str) -> None:
    internal = Path(exe).parent / "_internal"
    names = {p.name.split("-")[0].lower() for p in internal.iterdir()}
    assert not names & {"pytest", "_pytest", "hypothesis", "pyinstaller"}, names
    # World-readable and not writable by others: roles run the bundle under their own users.
    for p in [Path(exe).parent, *Path(exe).parent.rglob("*")]:
        mode = p.lstat().st_mode
        assert mode & 0o004 and not mode & 0o002, p


# The frozen run builds the PyInstaller bundle (minutes of CPU): it runs in `just drills` (CI), the source run in `just test`.
@pytest.mark.parametrize("kind", ["source", pytest.param("frozen", marks=pytest.mark.slow)])
def test_smoke(request, appliance_factory, tmp_path, kind):
    """init, run, issue, revoke, CRL and an OCSP answer; every role re-executed from the same program
    and, as root, running under its own user."""
    exe = request.getfixturevalue("frozen_bin") if kind == "frozen" else ""
    if exe:
        _bundle_excludes_test_packages(exe)
    a = appliance_factory(start=False, bin=exe)
    t0 = time.monotonic()
    out = a.cli("--version").stdout.decode()
    print(f"\n{kind}: `donjon --version` in {time.monotonic() - t0:.2f} s")
    assert out.startswith("donjon ") and (not exe or "source" not in out), out
    cfg = a.home / "donjon.toml"
    cfg.write_text(cfg.read_text() + SNMP)
    (a.home / "snmp-community").write_text("smoke\n")
    os.chmod(a.home / "snmp-community", 0o600)
    t0 = time.monotonic()
    a.start()
    print(f"{kind}: `donjon run` to activated in {time.monotonic() - t0:.2f} s")

    roles = a.role_pids()
    assert {"cis", "factory", "ocsp", "snmp"} <= {n.split(".")[0] for n in roles}, roles
    program = os.path.realpath(exe) if exe else None
    for name, pid in roles.items():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if program:  # re-executed from the bundle itself, not from an interpreter
            assert os.path.realpath(f"/proc/{pid}/exe") == program, (name, cmd)
        else:
            assert cmd[1:4] == [b"-m", b"appliance.entry", b"role"], (name, cmd)  # typer-free entry
        if os.geteuid() == 0:
            want = pwd.getpwnam(ROLE_USERS[name.split(".")[0]]).pw_uid
            uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
            assert set(uids) == {str(want)}, (name, uids)

    root = a.export("root", tmp_path / "root.pem")
    issuing = a.export("issuing", tmp_path / "issuing.pem")
    chain = a.export("issuing", tmp_path / "chain.pem", chain=True)
    csr = make_csr(tmp_path, "www")
    leaf = tmp_path / "www.pem"
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(leaf))
    openssl("verify", "-x509_strict", "-CAfile", str(root), "-untrusted", str(issuing), str(leaf))
    serial = format(x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number, "x")
    a.cli("revoke", "--ca", "issuing", serial, "--reason", "keyCompromise")
    a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "issuing.crl"))

    # The endpoint serves the CRL (DER) and answers OCSP for the revoked certificate.
    deadline = time.monotonic() + 60
    while True:
        got = subprocess.run(["curl", "-sf", f"{a.endpoint}/crl/issuing.crl"], capture_output=True, timeout=30)
        crl = x509.load_der_x509_crl(got.stdout) if got.returncode == 0 else None
        if crl is not None and crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None:
            break
        assert time.monotonic() < deadline, "the endpoint never served a CRL with the revoked serial"
        time.sleep(0.5)
    while True:
        r = openssl("ocsp", "-issuer", str(issuing), "-cert", str(leaf), "-url", f"{a.endpoint}/ocsp",
                    "-CAfile", str(chain), check=False)
        if r.returncode == 0 and b": revoked" in r.stdout and b"Response verify OK" in r.stderr:
            break
        assert time.monotonic() < deadline, f"no revoked OCSP answer:\n{r.stdout.decode()}\n{r.stderr.decode()}"
        time.sleep(0.5)
    assert a.stop() == 0

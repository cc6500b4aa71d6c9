"""Developer mode (a normal user: same processes and confinement, no uid switch) and recovery of the
token connection when its storage goes away and comes back."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from appliance import privdrop
from tests.conftest import Appliance, make_ceremony, make_csr

DEV_USER = "donjon-devtest"


@pytest.fixture
def dev_user():
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name  # already a normal user: that is developer mode
    try:
        pwd.getpwnam(DEV_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", DEV_USER], check=True)
    return DEV_USER


def test_developer_mode_runs_the_same_roles_without_uid_switch(homes, src_path, dev_user):
    pw = pwd.getpwnam(dev_user)
    base = homes / "dev"
    base.mkdir()
    os.chown(base, pw.pw_uid, pw.pw_gid)
    a = Appliance(base / "home", src_path, user=dev_user if os.geteuid() == 0 else None)
    ceremony = make_ceremony(base / "ceremony.toml")
    csr = make_csr(base, "dev")
    for p in (ceremony, csr):
        os.chmod(p, 0o644)
    try:
        a.init(ceremony)
        a.start()
        out = base / "dev.pem"
        a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(out))
        assert out.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        pids = a.role_pids()
        assert set(pids) == {"cis", "cis.1", "factory", "ocsp", "distribution"}
        for role, pid in pids.items():
            c = privdrop.current_confinement(pid)
            assert c["uid"] == (pw.pw_uid,) * 4, (role, c)
            assert c["no_new_privs"] and c["seccomp"] == 2 and c["cap_eff"] == 0, (role, c)
        assert "libsofthsm2" not in Path(f"/proc/{pids['factory']}/maps").read_text()
        assert a.stop() == 0
    finally:
        a.kill()


def test_cis_reconnects_after_the_token_storage_comes_back(appliance, tmp_path):
    tokens = appliance.home / "softhsm" / "tokens"
    moved = appliance.home / "softhsm" / "tokens.away"
    csr = make_csr(tmp_path, "t")
    appliance.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr))
    os.rename(tokens, moved)
    try:
        r = appliance.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), check=False)
        # SoftHSM may still serve from its cache or fail: either way a clear answer, no crash.
        assert r.returncode in (0, 1)
        assert appliance.proc.poll() is None
    finally:
        os.rename(moved, tokens)
    deadline = time.monotonic() + 20
    while True:
        r = appliance.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), check=False)
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.5)
    assert appliance.proc.poll() is None

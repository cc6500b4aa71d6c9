"""A stopped CIS is noticed, a CIS without its token refuses CRLs cleanly, and SNMP secrets are files
of their own (issue 12 items 11, 8 and 10): one appliance with SNMP and a short Factory->CIS
deadline, its SNMP secrets in 0600 files."""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from appliance import config as C
from appliance.snmp import mib as M
from tests.conftest import VENV_BIN, Appliance, make_ceremony, make_csr

pytestmark = pytest.mark.root

DEADLINE = 3
COMMUNITY, AUTH, PRIV = "ro-liveness", "auth-secret-liveness", "priv-secret-liveness"
BOUND = 40.0  # the Factory pings every 5 s; status reaches SNMP every 5 s


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_secrets(home: Path) -> None:
    (home / "secrets").mkdir(mode=0o700, exist_ok=True)
    for name, value in (("community", COMMUNITY), ("auth", AUTH), ("priv", PRIV)):
        (home / "secrets" / name).write_text(value + "\n")
        os.chmod(home / "secrets" / name, 0o600)


SNMP = """
[hsm]
deadline-seconds = {deadline}
[snmp]
enabled = true
listen = "127.0.0.1:{port}"
community-file = "secrets/community"
[[snmp.users]]
name = "ops"
auth-key-file = "secrets/auth"
priv-key-file = "secrets/priv"
"""


@pytest.fixture(scope="module")
def app(src_path, tmp_path_factory):
    base = Path(tempfile.mkdtemp(prefix="donjon-live-"))
    os.chmod(base, 0o711)
    a = Appliance(base / "home", src_path)
    a.home.mkdir(mode=0o711)
    write_secrets(a.home)
    a.snmp_port = _udp_port()
    a.init(make_ceremony(tmp_path_factory.mktemp("live") / "ceremony.toml"), config=SNMP.format(deadline=DEADLINE, port=a.snmp_port))
    a.start()
    yield a
    a.stop()
    shutil.rmtree(base, ignore_errors=True)


def snmp_roles(a: Appliance) -> dict[str, int]:
    """Role name -> donjonRoleState, and the appliance state under "", from a v2c walk."""
    env = dict(os.environ, MIBS="", MIBDIRS="", SNMP_PERSISTENT_DIR=str(a.home.parent / "snmp-persist"))
    r = subprocess.run(["snmpwalk", "-v2c", "-c", COMMUNITY, "-On", "-m", "", "-t", "2", "-r", "0",
                        f"udp:127.0.0.1:{a.snmp_port}", ".".join(map(str, M.OBJECTS))], env=env, capture_output=True, text=True, timeout=30,
                       check=False)
    vals = {k.strip().lstrip("."): v.strip() for k, _, v in (ln.partition(" = ") for ln in r.stdout.splitlines()) if v}
    out = {"": int(vals.get(".".join(map(str, M.APPLIANCE_STATE + (0,))), "INTEGER: 0").split()[-1])}
    name_col = ".".join(map(str, M.ROLE_ENTRY + (M.ROLE_NAME,))) + "."
    for k, v in vals.items():
        if k.startswith(name_col):
            state = vals.get(".".join(map(str, M.ROLE_ENTRY + (M.ROLE_STATE, int(k.rsplit(".", 1)[1])))), "INTEGER: 0")
            out[v.split(":", 1)[1].strip().strip('"')] = int(state.split()[-1])
    return out


def until(pred, what: str, timeout: float = BOUND):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := pred():
            return got
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_a_stopped_cis_is_unresponsive_in_status_and_snmp_and_issuance_fails_at_the_deadline(app, tmp_path):
    a = app
    assert until(lambda: snmp_roles(a).get("cis") == M.ROLE_STATES["running"], "SNMP shows the CIS running")
    cis = [pid for name, pid in a.role_pids().items() if name.startswith("cis")]
    assert len(cis) == 2
    csr = make_csr(tmp_path, "live")
    for pid in cis:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), check=False, timeout=120)
        took = time.monotonic() - t0
        print(f"\nissuance with both CIS processes stopped: refused after {took:.1f} s (deadline {DEADLINE} s)")
        err = r.stderr.decode()
        assert r.returncode == 1 and f"did not answer in {DEADLINE} s: it is unresponsive" in err, err
        assert took < 60, took  # not the CLI's 600 s: the Factory's deadline answered
        until(lambda: b"CIS: UNRESPONSIVE (cis, cis.1)" in a.cli("status", check=False).stdout, "status names both CIS processes")
        silent = M.ROLE_STATES["unresponsive"]
        states = until(lambda: (s := snmp_roles(a)).get("cis") == silent and s.get("cis.1") == silent and s,
                       "SNMP roleState unresponsive(6) for both")
        assert states[""] == M.STATE_DEGRADED, states
    finally:
        for pid in cis:
            os.kill(pid, signal.SIGCONT)
    # Resumed: the late replies are dropped (not a protocol violation), status clears, issuance works.
    until(lambda: b"UNRESPONSIVE" not in (out := a.cli("status", check=False).stdout) and b"activated: yes" in out, "status clears")
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(make_csr(tmp_path, "after")))
    assert until(lambda: snmp_roles(a).get("cis") == M.ROLE_STATES["running"], "SNMP shows the CIS running again")
    assert set(a.role_pids()) >= {"cis", "cis.1", "factory"}


def test_crl_refused_without_the_token_folder_then_signed_with_the_next_number(app, tmp_path):
    """Issue 12 item 8: a clear refusal, audited, no CRL number skipped, the next CRL signs once the token is back."""
    a = app
    a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "first.crl"))
    first = x509.load_der_x509_crl((tmp_path / "first.crl").read_bytes()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    tokens = a.home / "softhsm" / "tokens"
    shutil.move(tokens, a.home / "tokens.away")
    try:
        r = a.cli("crl", "generate", "--ca", "issuing", check=False)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1, err
        assert f"the CIS refused to sign CRL #{first + 1} of issuing" in err and "internal error" not in err, err
    finally:
        shutil.move(a.home / "tokens.away", tokens)
    log = a.log.read_text()
    assert "Traceback" not in log and "UnboundLocalError" not in log
    # Back: the number the refusal did not use is the next CRL's (the reader's snapshot ended too).
    deadline = time.monotonic() + 60
    while True:
        r = a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "next.crl"), check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)  # the CIS re-initialises the library when it sees the token back
    assert r.returncode == 0, r.stderr.decode()
    crl = x509.load_der_x509_crl((tmp_path / "next.crl").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == first + 1
    records = [json.loads(ln) for ln in a.cli("audit", "export").stdout.decode().splitlines() if ln.strip()]
    refused = [r for r in records if r.get("action") == "crl" and r.get("outcome") == "refused"]
    assert refused and refused[-1]["object"] == f"issuing#{first + 1}" and "not used" in refused[-1]["detail"], refused


def test_snmp_secrets_come_from_0600_files_and_the_config_is_0640(app):
    st = os.stat(app.home / "donjon.toml")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == grp.getgrnam("donjon-admin").gr_gid
    text = (app.home / "donjon.toml").read_text()
    assert COMMUNITY not in text and AUTH not in text and PRIV not in text
    assert until(lambda: snmp_roles(app).get("factory"), "a v2c walk with the community read from its file")


@pytest.mark.parametrize("case", ["inline", "group-readable", "symlink"])
def test_snmp_secret_misplaced_is_refused_in_one_line_before_anything_is_made(case, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    write_secrets(home)
    cfg = SNMP.format(deadline=30, port=_udp_port())
    if case == "inline":
        cfg = cfg.replace('auth-key-file = "secrets/auth"', f'auth-key = "{AUTH}"')
        want = "[[snmp.users]] 'ops': auth-key: secrets do not belong in donjon.toml"
    elif case == "group-readable":
        os.chmod(home / "secrets" / "priv", 0o640)
        want = "priv-key-file " + str(home / "secrets" / "priv") + ": readable by others (mode 0640): chmod 600 it"
    else:
        (home / "secrets" / "community").unlink()
        os.symlink("/etc/shadow", home / "secrets" / "community")
        want = "community-file " + str(home / "secrets" / "community") + ": a symbolic link on the way"
    (home / "donjon.toml").write_text(cfg)
    with pytest.raises(C.ConfigError) as e:
        C.snmp_config(str(home), C.load(str(home)))
    assert want in str(e.value), str(e.value)
    r = subprocess.run([str(VENV_BIN / "python"), "-m", "appliance.cli", "run", "--home", str(home)], capture_output=True, check=False,
                       timeout=60, cwd="/", env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    err = r.stderr.decode()
    assert r.returncode == 1 and want in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in home.iterdir()) == ["donjon.toml", "secrets"]  # nothing made

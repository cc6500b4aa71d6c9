"""Issue 14: a two-tier PKI across two appliances (an offline root, an online issuing CA), media carried by hand."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import PASSWORD, VENV_BIN, Appliance, ApplianceMaker, make_csr, openssl
from tests.servers import Receiver, free_udp_port, snmptrapd

WITNESSES = ("alice", "bob")
DAY = 86400


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start(make: ApplianceMaker, base: Path, name: str, ceremony: str, config: str, edit) -> Appliance:
    """A copy of the init-once template of this ceremony and config (each box's variant is its own:
    an offline root alone, an online box with its local root), not started, its donjon.toml edited."""
    cer = base / f"{name}.toml"
    cer.write_text(ceremony)
    a = make(cer, start=False, config=config)
    cfg = a.home / "donjon.toml"
    cfg.write_text(edit(cfg.read_text()))
    return a


ROOT_CEREMONY = """
[root]
name = "root"
key-type = "p384"
subject = { C = "FR", O = "Donjon Two Tier", CN = "Donjon Offline Root" }
validity-days = 3650
path-length = 1
"""
ONLINE_CEREMONY = """
[root]
name = "local"
key-type = "p256"
subject = { C = "FR", O = "Donjon Two Tier", CN = "Donjon Online Local Root" }
validity-days = 3650
"""


@pytest.fixture(scope="module")
def pki(module_appliance_factory):
    """The two appliances: the root offline (no endpoint, no Distribution, no inet socket; its profiles'
    URLs name the online box), the online box with a simulated clock for the CRL calendar (test mode)."""
    base = Path(tempfile.mkdtemp(prefix="donjon-tier-"))
    os.chmod(base, 0o711)
    made: list[Appliance] = []  # stopped whatever happens, even a failure half-way through the setup
    servers = contextlib.ExitStack()
    try:
        # The online box's notifications go to a real snmptrapd; its Distribution rule "web" publishes the
        # offline root's calendar CRLs to an HTTP destination (tests/servers.py Receiver: stores each PUT).
        traps_dir = base / "traps"
        traps_dir.mkdir()
        trap_port, trap_log = servers.enter_context(snmptrapd(
            traps_dir, "authCommunity log ro-test\n", dict(os.environ, SNMP_PERSISTENT_DIR=str(traps_dir), MIBS="", MIBDIRS="")))
        web = Receiver(base / "web")
        servers.callback(web.stop)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        root = _start(module_appliance_factory, base, "root", ROOT_CEREMONY, "enabled = false\n",
                      lambda t: t + f'\n[endpoint]\nbase-url = "{url}"\n'
                      '\n[dual-control]\napprovals = 2\noperations = ["ca-create", "ca-sign-csr", "revoke-ca", "clock-set"]\n')
        made.append(root)
        snmp_port = free_udp_port()
        online = _start(module_appliance_factory, base, "online", ONLINE_CEREMONY, "",
                        lambda t: t.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"') +
                        f'\n[endpoint]\nbase-url = "{url}"\n[snmp]\nenabled = true\nlisten = "127.0.0.1:{snmp_port}"\n'
                        'community-file = "secrets/ro"\ncommunity-sources = ["127.0.0.0/8"]\n'
                        f'[[snmp.targets]]\nhost = "127.0.0.1"\nport = {trap_port}\nversion = "v2c"\ncommunity-file = "secrets/ro"\n'
                        # K of "fewer than K CRLs remain" and the lapse horizon: not the defaults (3, 72 h), to show they are read.
                        '[crl]\ncalendar-warn-remaining = 5\ncalendar-warn-hours = 100\n'
                        f'[distribution]\nbackoff-max = 2\n[[distribution.rule]]\nname = "web"\nurl = "{web.url}/pki"\n'
                        'publish = ["crl"]\ncas = ["root"]\n')
        (online.home / "secrets").mkdir(mode=0o700, exist_ok=True)
        (online.home / "secrets" / "ro").write_text("ro-test\n")
        os.chmod(online.home / "secrets" / "ro", 0o600)
        online.snmp_port = snmp_port  # type: ignore[attr-defined]
        online.trap_log, online.web = trap_log, web  # type: ignore[attr-defined]
        made.append(online)
        assert f'base-url = "{url}"' in (root.home / "donjon.toml").read_text()
        clock = online.home / "cmdb" / "test-clock"
        online.run_env = {"DONJON_TEST_CLOCK_FILE": str(clock)}
        # The root: a simulated clock too (a clock gone backwards), and the FAKE clock setter (records, never sets).
        root.run_env = {"DONJON_TEST_CLOCK_FILE": str(root.home / "cmdb" / "test-clock"),
                        "DONJON_TEST_CLOCK_SETTER_FAKE": str(base / "clock-setter-fake.log")}
        media = base / "media"  # the stick carried between the two boxes
        media.mkdir(mode=0o755)
        # The two boxes start side by side (each mostly waits: fsync, its roles, the HSM), the root's
        # officers added meanwhile; a start that fails raises here, after the other is done.
        with ThreadPoolExecutor(1) as pool:
            online_started = pool.submit(online.start)
            root.start()
            for n in WITNESSES:
                root.cli("officer", "add", n, "--role", "operator", env={"DONJON_PASSWORD": PASSWORD})
                root.officers[n] = "operator"
            root.cli("officer", "add", "admin2", "--role", "administrator", env={"DONJON_PASSWORD": PASSWORD})
            root.officers["admin2"] = "administrator"
            online_started.result()
        yield root, online, media, clock, url
    finally:
        with ThreadPoolExecutor(2) as pool:  # side by side too; each stop waits for its own supervisor
            list(pool.map(lambda a: a.stop(), made))
        servers.close()
        shutil.rmtree(base, ignore_errors=True)


def _answers(n_steps: int) -> bytes:
    lines = []
    for name in WITNESSES:
        lines += [name, PASSWORD, ""]  # every listed officer present: no empty name to end the roll call
    lines += ["yes"] * (n_steps * len(WITNESSES))
    return ("\n".join(lines) + "\n").encode()


def _ceremony(root: Appliance, folder: Path, name: str, steps: str, n: int) -> Path:
    f = folder / f"{name}.toml"
    f.write_text(f"""
[ceremony]
name = "{name}"
officers = {json.dumps(list(WITNESSES))}
quorum = 2
output = "{name}-out"
{steps}""")
    r = root.cli("ceremony", "run", str(f), input=_answers(n), check=False, timeout=300)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    return folder / f"{name}-out"


def _set_clock(clock: Path, t: int) -> None:
    clock.write_text(str(t))
    os.chmod(clock, 0o644)


def _verify(files: Path, leaf: Path, root_pem: Path, sub_pem: Path, url: str) -> subprocess.CompletedProcess:
    """openssl verify, every CRL from the online endpoint: the issuing CA's and the root's downloaded from the
    CRL DPs (-crl_download); the root's also given for the root itself (a self-signed root has no CRL DP)."""
    der = _get(f"{url}/crl/root.crl")
    assert der is not None
    (files / "root-from-endpoint.crl").write_bytes(openssl("crl", "-inform", "DER", input=der).stdout)
    return openssl("verify", "-x509_strict", "-crl_check_all", "-crl_download", "-CAfile", str(root_pem),
                   "-CRLfile", str(files / "root-from-endpoint.crl"),
                   "-untrusted", str(sub_pem), str(leaf), check=False)


def _lint_crl(der: bytes) -> list[str]:
    from policy import lint
    return lint.lint_crl(der)


def test_two_tier_request_sign_install_issue_verify_revoke(pki, tmp_path):
    root, online, media, clock, url = pki
    # The root is offline: no endpoint process, no listening inet socket.
    assert not (root.home / "run" / "endpoint").exists()
    assert "ocsp" not in root.role_pids() and "distribution" not in root.role_pids()
    _set_clock(clock, int(time.time()))

    # 1. The online box makes its CA key in the HSM and its request: the CA awaits its certificate.
    r = online.cli("ca", "request", "issuing", "--subject", "CN=Donjon Online Issuing CA,O=Donjon Two Tier,C=FR",
                   "--key-type", "p256", "--path-length", "0", "--out", str(media / "issuing.csr"), "--json")
    doc = json.loads(r.stdout)
    assert doc["state"] == "awaiting certificate" and doc["mode"] == "new"
    openssl("req", "-in", str(media / "issuing.csr"), "-verify", "-noout")
    text = openssl("req", "-in", str(media / "issuing.csr"), "-noout", "-text").stdout.decode()
    assert "CA:TRUE, pathlen:0" in text and "Certificate Sign, CRL Sign" in text
    make_csr(tmp_path, "leaf0", subj="/CN=www.example.org")
    r = online.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(tmp_path / "leaf0.csr"), check=False)
    assert r.returncode == 1 and b"awaiting certificate" in r.stderr
    # Asking again with other options is refused (the key stays); the same request is signed again.
    r = online.cli("ca", "request", "issuing", "--subject", "CN=X", "--key-type", "p384", check=False)
    assert r.returncode == 1 and b"already awaits" in r.stderr

    # 2. At the root, in a ceremony with two witnesses: sign the request, export the root, pre-sign 12 CRLs.
    shutil.copy(media / "issuing.csr", tmp_path / "issuing.csr")
    out = _ceremony(root, tmp_path, "sign-issuing", """
[[step]]
action = "sign-csr"
parent = "root"
csr = "issuing.csr"
validity-days = 1825
path-length = 0
out = "issuing.pem"

[[step]]
action = "export-ca"
ca = "root"
out = "root.pem"

[[step]]
action = "crl-presign"
ca = "root"
periods = 12
every = "30d"
overlap = "2d"
out = "root-calendar.json"
""", 3)
    for f in ("issuing.pem", "root.pem", "root-calendar.json"):
        shutil.copy(out / f, media / f)
    sub = x509.load_pem_x509_certificate((media / "issuing.pem").read_bytes())
    assert f"{url}/crl/root.crl" in str(sub.extensions.get_extension_for_class(x509.CRLDistributionPoints).value)
    bundle = json.loads((media / "root-calendar.json").read_text())
    crls = [__import__("base64").b64decode(e["der"]) for e in bundle["crls"]]
    assert len(crls) == 12
    numbers = [e["number"] for e in bundle["crls"]]
    assert numbers == list(range(numbers[0], numbers[0] + 12))
    for e in bundle["crls"]:
        assert e["next_update"] == e["this_update"] + 32 * DAY
    for der in crls:  # pkilint clean on every CRL of the calendar
        assert _lint_crl(der) == []
    verify_out = root.cli("ceremony", "verify", str(out / "transcript.json"), check=False)
    assert verify_out.returncode == 0, verify_out.stdout.decode() + verify_out.stderr.decode()

    # 3. Back on the online box: install (bad ones refused naming the check), then issue.
    r = online.cli("ca", "install", "issuing", str(media / "root.pem"), "--trust-anchor", str(media / "root.pem"), check=False)
    assert r.returncode == 1 and b"key:" in r.stderr and b"not the CA's key in the token" in r.stderr
    r = online.cli("ca", "install", "issuing", str(media / "issuing.pem"), check=False)
    assert r.returncode == 1 and b"no trust anchor" in r.stderr
    online.cli("ca", "install", "issuing", str(media / "issuing.pem"), "--trust-anchor", str(media / "root.pem"))
    shown = json.loads(online.cli("ca", "show", "issuing").stdout)
    assert shown["state"] == "active"
    r = online.cli("ca", "install", "issuing", str(media / "issuing.pem"), check=False)
    assert r.returncode == 1 and b"awaits no certificate" in r.stderr

    # The calendar: verified against the root; each CRL published once its thisUpdate has come, not before
    # (the online box's clock is simulated: test mode).
    tus = [e["this_update"] for e in bundle["crls"]]
    _set_clock(clock, tus[0] - 1)
    r = online.cli("crl", "calendar", "load", str(media / "root-calendar.json"), "--json")
    doc = json.loads(r.stdout)
    assert doc["ca"] == "root" and doc["current"] is None and doc["remaining"] == 12 and doc["new"] == 12
    assert _get(f"{url}/crl/root.crl") is None  # 404: nothing due yet
    assert _web_puts(online) == []  # nor handed to the Distribution rule
    _set_clock(clock, tus[0])
    cal = _status(online)
    assert cal["current"] == numbers[0] and cal["remaining"] == 11 and cal["warning"] is None
    assert _get(f"{url}/crl/root.crl") == crls[0]
    _web_wait(online, [crls[0]])  # the rule "web" got it once its thisUpdate came
    make_csr(tmp_path, "leaf", subj="/CN=www.example.org")
    online.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(tmp_path / "leaf.csr"),
               "--out", str(tmp_path / "leaf.pem"))
    clock.unlink()  # back to the real clock to sign (a simulated clock behind the last signature refuses it)
    online.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "issuing.crl"))
    _wait_crl(url, "issuing")
    r = _verify(tmp_path, tmp_path / "leaf.pem", media / "root.pem", media / "issuing.pem", url)
    assert r.returncode == 0 and b"OK" in r.stdout, r.stdout.decode() + r.stderr.decode()
    got = subprocess.run(["curl", "-sf", f"{url}/ca/root.crt"], capture_output=True, timeout=30).stdout
    assert got == x509.load_pem_x509_certificate((media / "root.pem").read_bytes()).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)

    # Time passes on the online box: each CRL at its thisUpdate, never before; late ones are skipped, never
    # published after a newer one; fewer than 3 left raises the status warning (and the SNMP notification).
    # SNMP shows the offline root in the CA table: the published calendar CRL's number (its lapse then warned by the agent).
    from appliance.snmp import mib as M
    snmp_env = dict(os.environ, SNMP_PERSISTENT_DIR=str(tmp_path), MIBS="", MIBDIRS="")
    oid = ".".join(map(str, M.CA_ENTRY))
    for _ in range(60):  # the Factory pushes its status every few seconds
        w = subprocess.run(["snmpwalk", "-v2c", "-c", "ro-test", "-On", "-m", "", "-t", "2", "-r", "0",
                            f"udp:127.0.0.1:{online.snmp_port}", oid], env=snmp_env, capture_output=True, text=True, timeout=30).stdout
        w = "\n".join(ln.lstrip(".") for ln in w.splitlines())
        names = {ln.split(" = ")[0].rsplit(".", 1)[1]: ln for ln in w.splitlines() if f"{oid}.{M.CA_NAME}." in ln}
        idx = next((i for i, ln in names.items() if '"root"' in ln), None)
        crl_line = next((ln for ln in w.splitlines() if idx and ln.startswith(f"{oid}.{M.CA_CRL_NUMBER}.{idx} = ")), "")
        if crl_line.endswith(f": {numbers[0]}"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the root's calendar CRL is not in the SNMP CA table:\n{w}")
    _set_clock(clock, tus[1] - 1)
    assert _status(online)["current"] == numbers[0]
    assert _web_puts(online) == [_sha(crls[0])]  # one second before its thisUpdate, the next one is not out
    _set_clock(clock, tus[1])
    assert _status(online)["current"] == numbers[1]
    assert _get(f"{url}/crl/root.crl") == crls[1]
    _web_wait(online, [crls[0], crls[1]])
    # [crl] calendar-warn-remaining = 5 here: 4 left warns (the default, 3, would not).
    _set_clock(clock, tus[7])
    cal = _status(online)
    assert cal["current"] == numbers[7] and cal["remaining"] == 4
    assert "4 pre-signed CRL(s) left (fewer than 5)" in cal["warning"], cal
    _trap_wait(online, "4 pre-signed CRL(s) left")
    _set_clock(clock, tus[10])
    cal = _status(online)
    assert cal["current"] == numbers[10] and cal["remaining"] == 1
    assert "1 pre-signed CRL(s) left" in cal["warning"]
    _web_wait(online, [crls[0], crls[1], crls[7], crls[10]])  # the passed-over ones never go out
    st = json.loads(online.cli("status", "--json").stdout)
    assert st["crl_calendars"][0]["warning"] == cal["warning"]
    assert "crl-calendar-low" in online.log.read_text()
    _set_clock(clock, int(time.time()))

    # 4. The root revokes the sub-CA in a second ceremony-like session (dual control), then a new calendar.
    serial = f"{sub.serial_number:x}"
    r = root.cli("revoke", "--ca", "root", serial, "--reason", "cACompromise")
    pending = re.search(rb"#(\d+)", r.stdout)
    assert pending, r.stdout
    root.cli("approve", pending.group(1).decode(), officer="alice")
    out2 = _ceremony(root, tmp_path, "after-compromise", """
[[step]]
action = "crl-presign"
ca = "root"
periods = 12
every = "30d"
overlap = "2d"
out = "root-calendar-2.json"
""", 1)
    shutil.copy(out2 / "root-calendar-2.json", media / "root-calendar-2.json")
    # The new calendar supersedes the old one at once; the old one again is refused (all older than published).
    _set_clock(clock, int(time.time()))
    doc = json.loads(online.cli("crl", "calendar", "load", str(media / "root-calendar-2.json"), "--json").stdout)
    assert doc["current"] == doc["first"] > numbers[-1] and doc["remaining"] == 11 and doc["warning"] is None
    r = online.cli("crl", "calendar", "load", str(media / "root-calendar.json"), check=False)
    assert r.returncode == 1 and b"older than CRL number" in r.stderr
    r = _verify(tmp_path, tmp_path / "leaf.pem", media / "root.pem", media / "issuing.pem", url)
    assert r.returncode != 0 and b"certificate revoked" in r.stdout + r.stderr, r.stdout.decode() + r.stderr.decode()
    clock.unlink()  # the online box back on the real clock for the next tests


def test_calendar_lapse_warnings_status_and_snmp(pki):
    """The calendar loaded last (12 CRLs after the compromise): with the simulated clock, the three warnings in
    turn, each in status and as an SNMP notification at snmptrapd: none left (fewer than the configured 5), the
    current one lapsing within the configured 100 h (donjonCrlExpiring), then lapsed (donjonCrlLapsed)."""
    from appliance.snmp import mib as M
    _, online, _, clock, _ = pki
    try:
        end = _status(online)["covered_until"]  # the last CRL's nextUpdate
        _set_clock(clock, end - 101 * 3600)  # every CRL due: the last one published, none left; 101 h is not yet "near"
        cal = _status(online)
        assert cal["remaining"] == 0 and cal["current_next_update"] == end
        assert "0 pre-signed CRL(s) left (fewer than 5)" in cal["warning"], cal
        _trap_wait(online, "0 pre-signed CRL(s) left")
        _set_clock(clock, end - 99 * 3600)
        cal = _status(online)
        assert f"the current CRL #{cal['current']} lapses at" in cal["warning"] and "within 100 h" in cal["warning"], cal
        assert json.loads(online.cli("status", "--json").stdout)["crl_calendars"][0]["warning"] == cal["warning"]
        expiring = ".".join(map(str, M.NOTIFY_OID["crl-expiring"]))
        _trap_wait(online, "lapses at", expiring)
        _set_clock(clock, end)
        cal = _status(online)
        assert cal["warning"].endswith(f"the current CRL #{cal['current']} has lapsed"), cal
        _trap_wait(online, "has lapsed", ".".join(map(str, M.NOTIFY_OID["crl-lapsed"])))
    finally:
        clock.unlink(missing_ok=True)


def ops_crl_number(a: Appliance, tmp: Path) -> int:
    """The number of the CRL just signed (a new one, so that it is the newest number handed out)."""
    a.cli("crl", "generate", "--ca", "root", "--out", str(tmp / "now.crl"))
    return x509.load_der_x509_crl((tmp / "now.crl").read_bytes()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _get(url: str) -> bytes | None:
    r = subprocess.run(["curl", "-sf", url], capture_output=True, timeout=30)
    return r.stdout if r.returncode == 0 else None


def _status(online: Appliance) -> dict:
    cals = json.loads(online.cli("crl", "calendar", "status", "--json").stdout)
    assert [c["ca"] for c in cals] == ["root"]
    return cals[0]


def _sha(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _web_puts(online: Appliance) -> list[str]:
    """The SHA-256 of each root CRL the Distribution rule "web" delivered, in order (the HTTP destination's log)."""
    return [ln[4] for ln in online.web.log() if ln[1] == "/pki/root.crl"]  # type: ignore[attr-defined]


def _web_wait(online: Appliance, want: list[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        got = _web_puts(online)
        if got == [_sha(x) for x in want]:
            return
        assert len(got) <= len(want) and time.monotonic() < deadline, f"rule web delivered {got}, wanted {[_sha(x) for x in want]}"
        time.sleep(0.1)


def _trap_wait(online: Appliance, text: str, oid: str | None = None) -> str:
    """The notification carrying `text` at the module's snmptrapd (the supervisor sends one per new warning)."""
    deadline = time.monotonic() + 30
    while True:
        log = online.trap_log.read_text(errors="replace")  # type: ignore[attr-defined]
        hits = [blk for blk in log.split("\n\n") if text in blk or text in blk.replace("\n", " ")]
        if hits and (oid is None or oid in hits[-1]):
            return hits[-1]
        assert time.monotonic() < deadline, f"no notification with {text!r} (oid {oid}):\n{log[-3000:]}"
        time.sleep(0.1)


def _wait_crl(url: str, ca: str) -> None:
    for _ in range(100):
        r = subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{url}/crl/{ca}.crl"], timeout=30)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url}/crl/{ca}.crl never served")


OPENSSL_CA = """
[ca]
default_ca = ext
[ext]
dir = {d}
database = {d}/index.txt
new_certs_dir = {d}/certs
serial = {d}/serial
crlnumber = {d}/crlnumber
certificate = {d}/root.pem
private_key = {d}/root.key
default_md = sha256
default_crl_days = 30
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
organizationName = optional
countryName = optional
[sub]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[req]
distinguished_name = dn
[dn]
[root]
basicConstraints = critical, CA:true, pathlen:1
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def test_openssl_ca_parent_request_install_renew(pki, tmp_path):
    """`openssl ca` as the external parent: ca request, signed by openssl, ca install, issue; then --renew (same
    key, a new certificate): leaves issued before and after the renewal verify with either certificate."""
    _, online, _, _, url = pki
    d = tmp_path / "extca"
    (d / "certs").mkdir(parents=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "crlnumber").write_text("01\n")
    cnf = d / "ca.cnf"
    cnf.write_text(OPENSSL_CA.format(d=d))
    openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(d / "root.key"),
            "-subj", "/CN=External Root CA/O=Elsewhere", "-days", "3650", "-config", str(cnf), "-extensions", "root",
            "-out", str(d / "root.pem"))

    def sign(csr: Path, out: Path) -> None:
        openssl("ca", "-batch", "-config", str(cnf), "-extensions", "sub", "-days", "365", "-in", str(csr), "-out", str(out),
                "-notext")

    online.cli("ca", "request", "ext-issuing", "--subject", "CN=External Issuing CA,O=Elsewhere", "--key-type", "p384",
               "--path-length", "0", "--out", str(tmp_path / "ext.csr"))
    sign(tmp_path / "ext.csr", tmp_path / "ext.pem")
    # The wrong anchor is refused naming the chain; the right one installs.
    r = online.cli("ca", "install", "ext-issuing", str(tmp_path / "ext.pem"), "--trust-anchor", str(tmp_path / "ext.pem"),
                   check=False)
    assert r.returncode == 1 and b"chain:" in r.stderr
    online.cli("ca", "install", "ext-issuing", str(tmp_path / "ext.pem"), "--trust-anchor", str(d / "root.pem"))
    make_csr(tmp_path, "a", subj="/CN=a.example.org", san="DNS:a.example.org")
    online.cli("issue", "--ca", "ext-issuing", "--profile", "tls-server", "--csr", str(tmp_path / "a.csr"), "--out", str(tmp_path / "a.pem"))

    # Renewal: the same key, a new certificate from the same parent.
    online.cli("ca", "request", "ext-issuing", "--renew", "--subject", "CN=External Issuing CA,O=Elsewhere", "--key-type", "p384",
               "--path-length", "0", "--out", str(tmp_path / "ext2.csr"))
    key1 = openssl("req", "-in", str(tmp_path / "ext.csr"), "-noout", "-pubkey").stdout
    assert openssl("req", "-in", str(tmp_path / "ext2.csr"), "-noout", "-pubkey").stdout == key1
    sign(tmp_path / "ext2.csr", tmp_path / "ext2.pem")
    online.cli("ca", "install", "ext-issuing", str(tmp_path / "ext2.pem"))  # the anchor kept in the token from the first install
    shown = json.loads(online.cli("ca", "show", "ext-issuing").stdout)
    new = x509.load_pem_x509_certificate((tmp_path / "ext2.pem").read_bytes())
    assert shown["serial"] == f"{new.serial_number:x}" and shown["state"] == "active"
    make_csr(tmp_path, "b", subj="/CN=b.example.org", san="DNS:b.example.org")
    online.cli("issue", "--ca", "ext-issuing", "--profile", "tls-server", "--csr", str(tmp_path / "b.csr"), "--out", str(tmp_path / "b.pem"))
    online.cli("crl", "generate", "--ca", "ext-issuing", "--out", str(tmp_path / "ext-issuing.crl"))
    _wait_crl(url, "ext-issuing")
    openssl("ca", "-gencrl", "-config", str(cnf), "-out", str(d / "root.crl"))
    for leaf in ("a", "b"):
        for sub in ("ext", "ext2"):
            r = openssl("verify", "-x509_strict", "-crl_check_all", "-crl_download", "-CAfile", str(d / "root.pem"),
                        "-CRLfile", str(d / "root.crl"), "-untrusted", str(tmp_path / f"{sub}.pem"), str(tmp_path / f"{leaf}.pem"),
                        check=False)
            assert r.returncode == 0, (leaf, sub, r.stdout.decode() + r.stderr.decode())
    r = online.cli("ca", "install", "ext-issuing", str(tmp_path / "ext2.pem"), check=False)
    assert r.returncode == 1 and b"awaits no certificate" in r.stderr

    # Re-key: a new key, installed as the successor ext-issuing.k2, which issues from then on; the old key keeps
    # signing the CRL for what it issued (a revoked old leaf shows revoked, a new leaf verifies).
    doc = json.loads(online.cli("ca", "request", "ext-issuing", "--rekey", "--subject", "CN=External Issuing CA,O=Elsewhere",
                                "--key-type", "p256", "--path-length", "0", "--out", str(tmp_path / "ext3.csr"), "--json").stdout)
    assert doc["name"] == "ext-issuing.k2" and doc["mode"] == "rekey"
    assert openssl("req", "-in", str(tmp_path / "ext3.csr"), "-noout", "-pubkey").stdout != key1
    sign(tmp_path / "ext3.csr", tmp_path / "ext3.pem")
    online.cli("ca", "install", "ext-issuing.k2", str(tmp_path / "ext3.pem"))  # the predecessor's anchor
    make_csr(tmp_path, "c", subj="/CN=c.example.org", san="DNS:c.example.org")
    r = online.cli("issue", "--ca", "ext-issuing", "--profile", "tls-server", "--csr", str(tmp_path / "c.csr"), check=False)
    assert r.returncode == 1 and b"issue with its successor 'ext-issuing.k2'" in r.stderr
    online.cli("issue", "--ca", "ext-issuing.k2", "--profile", "tls-server", "--csr", str(tmp_path / "c.csr"), "--out", str(tmp_path / "c.pem"))
    a_serial = f"{x509.load_pem_x509_certificate((tmp_path / 'a.pem').read_bytes()).serial_number:x}"
    online.cli("revoke", "--ca", "ext-issuing", a_serial, "--reason", "keyCompromise")
    online.cli("crl", "generate", "--ca", "ext-issuing", "--out", str(tmp_path / "old.crl"))  # signed by the old key
    online.cli("crl", "generate", "--ca", "ext-issuing.k2", "--out", str(tmp_path / "new.crl"))
    _wait_crl(url, "ext-issuing.k2")
    for _ in range(100):  # the endpoint swaps in the newer CRL of the old key
        if _get(f"{url}/crl/ext-issuing.crl") == (tmp_path / "old.crl").read_bytes():
            break
        time.sleep(0.1)

    def check(leaf: str, sub: str) -> subprocess.CompletedProcess:
        return openssl("verify", "-x509_strict", "-crl_check_all", "-crl_download", "-CAfile", str(d / "root.pem"),
                       "-CRLfile", str(d / "root.crl"), "-untrusted", str(tmp_path / f"{sub}.pem"), str(tmp_path / f"{leaf}.pem"),
                       check=False)
    r = check("a", "ext2")
    assert r.returncode != 0 and b"certificate revoked" in r.stdout + r.stderr
    assert check("b", "ext2").returncode == 0
    r = check("c", "ext3")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_clock_gone_backwards_refused_and_set_under_dual_control(pki, tmp_path):
    """The root refuses to sign while its clock is before the newest time it signed at; setting the time is an
    administrator's request under dual control, audited, carried out by the supervisor (here its FAKE setter)."""
    root, online, _, _, _ = pki
    root_clock = root.home / "cmdb" / "test-clock"
    _set_clock(root_clock, 1_704_067_200)  # 2024-01-01: before anything this root signed
    try:
        make_csr(tmp_path, "late", san=None, subj="/CN=Late Sub CA")
        r = root.cli("ca", "sign-csr", str(tmp_path / "late.csr"), "--parent", "root", "--out", str(tmp_path / "late.pem"))
        pending = re.search(rb"#(\d+)", r.stdout)
        assert pending, r.stdout
        r = root.cli("approve", pending.group(1).decode(), officer="alice", check=False)  # the operation runs here: refused
        assert r.returncode == 1 and b"gone backwards" in r.stderr, r.stdout + r.stderr
        r = root.cli("crl", "generate", "--ca", "root", "--out", str(tmp_path / "root.crl"), check=False)
        assert r.returncode == 1 and b"gone backwards" in r.stderr
        assert not (tmp_path / "late.pem").exists()
    finally:
        root_clock.unlink()
    root.cli("crl", "generate", "--ca", "root", "--out", str(tmp_path / "root.crl"))  # the clock is right again
    # ca sign-csr outside a ceremony, of a CA's own request (it asks for basicConstraints CA, as ca request's do).
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp_path / "x.key"),
            "-subj", "/CN=Outside Sub CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0", "-out", str(tmp_path / "x.csr"))
    r = root.cli("ca", "sign-csr", str(tmp_path / "x.csr"), "--parent", "root", "--path-length", "0", "--out", str(tmp_path / "x.pem"))
    doc = json.loads(root.cli("approve", re.search(rb"#(\d+)", r.stdout).group(1).decode(), "--json", officer="bob").stdout)
    assert doc["executed"]
    (tmp_path / "x.pem").write_text(doc["result"]["cert"])
    openssl("verify", "-x509_strict", "-CAfile", str(root.export("root", tmp_path / "root.pem")), str(tmp_path / "x.pem"))
    assert "CA:TRUE, pathlen:0" in openssl("x509", "-in", str(tmp_path / "x.pem"), "-noout", "-text").stdout.decode()

    # crl presign outside a ceremony: one bundle, never overwritten; numbers continue after every CRL signed before.
    before = ops_crl_number(root, tmp_path)
    root.cli("crl", "presign", "--ca", "root", "--periods", "2", "--every", "7d", "--overlap", "12h", "--out", str(tmp_path / "cal.json"))
    b = json.loads((tmp_path / "cal.json").read_text())
    assert [e["number"] for e in b["crls"]] == [before + 1, before + 2]
    assert b["crls"][1]["this_update"] - b["crls"][0]["this_update"] == 7 * DAY
    assert b["crls"][0]["next_update"] == b["crls"][1]["this_update"] + 12 * 3600
    r = root.cli("crl", "presign", "--ca", "root", "--periods", "2", "--every", "7d", "--out", str(tmp_path / "cal.json"), check=False)
    assert r.returncode == 1 and b"never overwritten" in r.stderr
    r = root.cli("crl", "presign", "--ca", "root", "--periods", "2", "--every", "7x", "--out", str(tmp_path / "cal2.json"), check=False)
    assert r.returncode == 1 and b"invalid period" in r.stderr and not (tmp_path / "cal2.json").exists()

    shown = root.cli("clock", "show").stdout.decode()
    assert "system clock:" in shown and "UTC" in shown and "hardware clock:" in shown
    fake = Path(root.run_env["DONJON_TEST_CLOCK_SETTER_FAKE"])
    r = root.cli("clock", "set", "2031-02-03 04:05:06", officer="admin")
    pending = re.search(rb"#(\d+)", r.stdout)
    assert pending and not fake.exists(), r.stdout  # one administrator is not enough
    r = root.cli("approve", pending.group(1).decode(), officer="admin2")
    assert fake.read_text() == "1927857906\n"  # what the FAKE setter recorded: the machine's clock is untouched
    r = root.cli("clock", "set", "1999-01-01 00:00:00", officer="admin", check=False)
    assert r.returncode == 1 and b"between 2023" in r.stderr
    r = root.cli("clock", "set", "2031-02-03 04:05:06", officer="oper", check=False)
    assert r.returncode == 1
    log = [json.loads(x) for x in root.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]
    sets = [e for e in log if e["action"] == "clock-set" and e["outcome"] == "ok"]
    assert sets and "to 2031-02-03T04:05:06Z" in sets[-1]["detail"] and "FAKE" in sets[-1]["detail"]
    assert any(e["action"] == "ca-sign-csr" and e["outcome"] == "refused" and "backwards" in e["detail"] for e in log)


@pytest.fixture
def stick(tmp_path):
    """A loop device standing in for the USB stick (ext4: this kernel has no vfat), with a file on it."""
    src = tmp_path / "stick-src"
    src.mkdir()
    (src / "note.txt").write_text("carried by hand\n")
    img = tmp_path / "stick.img"
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, check=True, text=True).stdout.strip()
    try:
        yield dev, img
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_console_media_mounted_for_its_use_only(pki, stick, tmp_path):
    """The console mounts the stick at the media folder (nodev,nosuid,noexec) for the actions chosen with it, and
    unmounts it after: a backup written there is on the stick, and nothing stays mounted."""
    from appliance.console import stick as S
    _, online, _, _, _ = pki
    dev, img = stick
    os.environ[S.TEST_DEVICE_ENV] = dev
    try:
        assert [d.path for d in S.devices()] == [dev]
        where = tmp_path / "mnt"
        with S.mounted(S.devices()[0], str(where)):
            mounts = Path("/proc/mounts").read_text().splitlines()
            opts = next(line.split()[3] for line in mounts if line.split()[1] == str(where))
            assert {"nodev", "nosuid", "noexec"} <= set(opts.split(","))
            assert (where / "note.txt").read_text() == "carried by hand\n"
        assert not os.path.ismount(where)
    finally:
        del os.environ[S.TEST_DEVICE_ENV]
    media = online.home / "media"
    lines = ["admin", PASSWORD, "", "16", "1", "6", "", "0"]  # 16: "Removable media (USB)" in the admin menu
    r = subprocess.run(online.argv("console", "--home", str(online.home)), input=("\n".join(lines) + "\n").encode(),
                       env={**online.env("admin"), S.TEST_DEVICE_ENV: dev}, capture_output=True, timeout=300, cwd="/")
    out = r.stdout.decode()
    assert r.returncode == 0 and f"mounted {dev} at {media}" in out and "note.txt" in out and f"{dev} unmounted" in out, out
    assert not os.path.ismount(media)
    assert not [f for f in os.listdir(media) if f.startswith("donjon-backup-")]  # written to the stick, not the disk
    check = tmp_path / "check"
    check.mkdir()
    subprocess.run(["mount", "-o", "ro,nodev,nosuid,noexec", dev, str(check)], check=True)
    try:
        assert [f for f in os.listdir(check) if f.startswith("donjon-backup-") and f.endswith(".tar")]
    finally:
        subprocess.run(["umount", str(check)], check=True)
    # Over SSH (not root) nothing is mounted: the console says where media are handled.
    r = subprocess.run(["/usr/sbin/runuser", "-u", "nobody", "--", str(VENV_BIN / "python"), "-c",
                        "from appliance.console import stick as S; S.mounted(S.Device('/dev/null','ext4','0',''), '/tmp/x').__enter__()"],
                       capture_output=True, timeout=60, env={"PYTHONPATH": online.src})
    assert b"local console only" in r.stderr


def test_officer_ssh_key_enrol_and_remove(pki, tmp_path):
    """An administrator enrols an officer's SSH key for the console account (the supervisor writes authorized_keys,
    restricted, tagged with the officer), removes it; bad keys and option-smuggling lines are refused; all audited."""
    _, online, _, _, _ = pki
    keys = online.home / "ssh" / "authorized_keys" / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "oper@laptop", "-f", str(tmp_path / "k")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "weak")], check=True)
    pub = (tmp_path / "k.pub").read_text().strip()
    r = online.cli("officer", "ssh-key", "oper", "--key-file", str(tmp_path / "k.pub"), officer="admin")
    assert b"enrolled the SSH key of oper" in r.stdout
    line = keys.read_text()
    assert line == f"restrict,pty {' '.join(pub.split()[:2])} donjon-officer:oper\n"
    assert keys.stat().st_uid == 0 and oct(keys.stat().st_mode & 0o777) == "0o644"
    (tmp_path / "evil.pub").write_text('command="/bin/sh" ' + pub + "\n")
    (tmp_path / "two.pub").write_text(pub + "\n" + pub + "\n")
    for f, why in (("evil.pub", b"options are not accepted"), ("weak.pub", b"at least 3072"), ("two.pub", b"one OpenSSH public key line")):
        r = online.cli("officer", "ssh-key", "oper", "--key-file", str(tmp_path / f), officer="admin", check=False)
        assert r.returncode == 1 and why in r.stderr and len(r.stderr.splitlines()) == 1, (f, r.stderr)
    # A client that skips the CLI's check gets the Factory's typed refusal (audited); the file is unchanged.
    from appliance.client import AdminClient
    from appliance.ipc import schema as S
    with AdminClient(str(online.home), session=online.session("admin")) as c:
        with pytest.raises(Exception, match="options are not accepted"):
            c.call(S.AOfficerSshKey, name="oper", key='command="/bin/sh" ' + pub)
    assert keys.read_text() == line
    r = online.cli("officer", "ssh-key", "nobody", "--key-file", str(tmp_path / "k.pub"), officer="admin", check=False)
    assert r.returncode == 1 and b"no officer named" in r.stderr
    r = online.cli("officer", "ssh-key", "oper", "--key-file", str(tmp_path / "k.pub"), officer="oper", check=False)
    assert r.returncode == 1  # an operator may not
    online.cli("officer", "ssh-key", "oper", "--remove", officer="admin")
    assert keys.read_text() == ""
    r = online.cli("officer", "ssh-key", "oper", "--remove", officer="admin", check=False)
    assert r.returncode == 1 and b"has no SSH key enrolled" in r.stderr
    fp = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True).stdout.split()[1]
    log = [json.loads(x) for x in online.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]
    acts = [(e["action"], e["object"], e["outcome"]) for e in log if e["action"].startswith("ssh-key")]
    assert ("ssh-key-add", "oper", "ok") in acts and ("ssh-key-remove", "oper", "ok") in acts and ("ssh-key-add", "oper", "refused") in acts
    assert any(fp in e["detail"] for e in log if e["action"] == "ssh-key-add" and e["outcome"] == "ok")


def test_calendar_load_refuses_hostile_bundles(pki, tmp_path):
    """A bundle from an unknown root, garbage, or an oversize file: one line each, audited, nothing kept."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from policy import tier as T
    _, online, _, _, _ = pki
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Rogue Root")])
    now = dt.datetime.now(dt.timezone.utc)
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()).public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                                               fromlist=["Encoding"]).Encoding.DER))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(now).next_update(now + dt.timedelta(days=30))
           .add_extension(x509.CRLNumber(7), critical=False).sign(k, hashes.SHA256()))
    der = crl.public_bytes(__import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    (tmp_path / "rogue.json").write_bytes(T.encode_bundle("rogue", root, 30 * DAY, 0, int(now.timestamp()),
                                                          [(7, int(crl.last_update_utc.timestamp()), int(crl.next_update_utc.timestamp()), der)]))
    (tmp_path / "garbage.json").write_bytes(b'{"format": 1, "crls": "x"}')
    (tmp_path / "huge.json").write_bytes(b" " * (4 * 1024 * 1024 + 1))
    for f, why in (("rogue.json", b"not the trust anchor of any CA installed here"), ("garbage.json", b"manifest unreadable"),
                   ("huge.json", b"at most 4 MiB")):
        r = online.cli("crl", "calendar", "load", str(tmp_path / f), check=False)
        assert r.returncode == 1 and why in r.stderr and len(r.stderr.splitlines()) == 1, (f, r.stderr)
    assert "rogue" not in [c["ca"] for c in json.loads(online.cli("crl", "calendar", "status", "--json").stdout)]
    assert _get(f"{pki[4]}/crl/rogue.crl") is None
    log = [json.loads(x) for x in online.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]
    assert sum(1 for e in log if e["action"] == "crl-calendar-load" and e["outcome"] == "refused") >= 2

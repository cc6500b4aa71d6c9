"""The console menu on a real 80x24 tmux pane, locally and through a real OpenSSH sshd with ForceCommand."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import PASSWORD, REPO, VENV_BIN, make_csr
from tests.integration.console_driver import Tmux

OFFICER = "oper"  # an operator (tests/conftest.py creates admin, oper and aud)


def log_in(t: Tmux, officer: str = OFFICER, password: str = PASSWORD) -> None:
    t.expect(r"officer:$")
    t.send(officer)
    t.expect(r"password:$")
    t.send(password)
    t.expect(r"second-factor code \(Enter: none\):$")
    t.send("")


def console_argv(a) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "appliance.cli", "console", "--home", str(a.home)]


def pick_issuing(t: Tmux) -> None:
    m = t.expect(r"(\d)  issuing  \([\s\S]*CA \(1-2, Enter: back\)>$")
    t.send(m.group(1))


def drive_menu(t: Tmux, a, media: Path) -> None:
    """login -> activate -> issue from a CSR on the media -> revoke -> CRL, with injection attempts on the way."""
    pin = (a.home / "pin").read_text().strip()
    t.expect(r"not activated")
    t.expect(r"choice>$")
    for attempt in ("; sh", "$(id)", "`id`", "../../etc/passwd", "1; rm -rf /"):
        t.send(attempt)
        t.expect(r"unknown command[\s\S]*choice>$")
    t.send("2")
    t.expect(r"activate with \(1-2, Enter: back\)>$")
    t.send("1")
    t.expect(r"token PIN:$")
    t.send(pin)
    t.expect(r"activated: donjon serial=")
    t.expect(r"officer:$")
    t.send("$(id)")  # never a name
    t.expect(r"login refused: invalid officer name[\s\S]*officer:$")
    t.send(OFFICER)
    t.expect(r"password:$")
    t.send("not the password")
    t.expect(r"second-factor code \(Enter: none\):$")
    t.send("")
    t.expect(r"login refused: wrong officer name, password or code[\s\S]*officer:$")
    t.send(OFFICER)
    t.expect(r"password:$")
    t.send(PASSWORD)
    t.expect(r"second-factor code \(Enter: none\):$")
    t.send("")
    t.expect(r"logged in as oper[\s\S]*choice>$")

    t.send("; sh")
    t.expect(r"unknown command[\s\S]*choice>$")
    t.key("C-c")  # Ctrl-C at the menu: a fresh prompt, still in the console
    t.expect(r"choice>$")

    # Issue: a path out of the media folder is refused, then the CSR on the media is picked by number.
    t.send("4")
    t.expect(r"CSR: number or file name \(Enter: back\)>$")
    t.send("../../etc/passwd")
    t.expect(r"error: invalid file name[\s\S]*choice>$")
    t.send("4")
    t.expect(r"1  www\.csr[\s\S]*>$")
    t.send("1")
    pick_issuing(t)
    t.expect(r"profile \[tls-server\]:$")
    t.send("")
    t.expect(r"validity in days \(Enter: default\):$")
    t.send("")
    m = t.expect(r"issued issuing/([0-9a-f]+)\s+-> media: www-[0-9a-f]+\.pem[\s\S]*choice>$")
    serial = m.group(1)
    issued = [p for p in media.glob("www-*.pem")]
    assert len(issued) == 1
    cert = x509.load_pem_x509_certificate(issued[0].read_bytes())
    assert format(cert.serial_number, "x") == serial

    # Revoke: the serial is hexadecimal or refused.
    t.send("6")
    pick_issuing(t)
    t.expect(r"serial \(hex\):$")
    t.send("$(id)")
    t.expect(r"error: serial '\$\(id\)' is not hexadecimal[\s\S]*choice>$")
    t.send("6")
    pick_issuing(t)
    t.expect(r"serial \(hex\):$")
    t.send(serial)
    t.expect(r"2  keyCompromise[\s\S]*reason \(1-\d+, Enter: back\)>$")
    t.send("2")
    t.expect(r"\[yes/no\]$")
    t.send("yes")
    t.expect(rf"revoked issuing/{serial} \(keyCompromise\)[\s\S]*choice>$")

    # CRL: a new one, written to the media, lists the serial.
    t.send("7")
    pick_issuing(t)
    t.expect(r"CRL \(1-2, Enter: back\)>$")
    t.send("1")
    m = t.expect(r"CRL issuing #(\d+): \d+ bytes -> media: issuing-crl-\d+\.crl[\s\S]*choice>$")
    crl = x509.load_der_x509_crl((media / f"issuing-crl-{m.group(1)}.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    t.send("1")  # status pages its output and waits at the end
    t.expect(r"certificates: \d+; revoked: 1")
    t.expect(r"(Enter for the menu --|choice>)$")
    if "Enter for the menu" in t.screen():
        t.send("")
        t.expect(r"choice>$")


def assert_80_columns(t: Tmux) -> None:
    long = [ln for ln in t.history().splitlines() if len(ln) > 80]
    assert not long, f"lines wider than 80 columns: {long}"


@pytest.fixture
def ready(appliance_factory, tmp_path):
    a = appliance_factory(start=False)
    a.start_inactive()
    media = a.home / "media"
    media.mkdir(mode=0o700)
    csr = make_csr(tmp_path, "www", san="DNS:www.example.org")
    shutil.copy(csr, media / "www.csr")
    (media / "evil.csr").symlink_to("/etc/passwd")  # a symlink on the media is never followed
    return a, media


def test_console_menu_on_tmux(ready, tmp_path):
    a, media = ready
    t = Tmux(tmp_path, console_argv(a), env=a.env())
    try:
        drive_menu(t, a, media)
        t.send("4")
        t.expect(r">$")
        assert "evil.csr" not in t.history()[t.mark:]
        t.send("evil.csr")
        t.expect(r"error: cannot read evil\.csr[\s\S]*choice>$")
        t.key("C-d")  # EOF: a clean exit
        assert t.wait_dead() == 0
        assert_80_columns(t)
    finally:
        t.close()
    assert b"audit chain intact" in a.cli("audit", "verify").stdout


# ---------------------------------------------------------------- SSH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """A real sshd on 127.0.0.1 with the shipped configuration, its own host key and authorized key."""

    OVERRIDDEN = {"port", "addressfamily", "listenaddress", "hostkey", "permitrootlogin", "allowgroups",
                  "authorizedkeysfile", "forcecommand", "setenv", "syslogfacility", "loglevel", "strictmodes"}

    def __init__(self, folder: Path, force_command: str):
        self.dir = folder
        os.chmod(folder, 0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "client")], check=True)
        (folder / "authorized_keys").write_bytes((folder / "client.pub").read_bytes())
        os.chmod(folder / "authorized_keys", 0o600)
        self.port = free_port()
        host_pub = (folder / "host.pub").read_text().split()
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        import grp
        shipped = (REPO / "image" / "sshd_config.donjon").read_text().splitlines()
        kept = [ln for ln in shipped if ln.strip() and not ln.lstrip().startswith("#")
                and ln.split()[0].lower() not in self.OVERRIDDEN]
        conf = kept + [
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host'}",
            f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",  # the test runs as whoever runs it (root on CI)
            f"AllowGroups {grp.getgrgid(os.getgid()).gr_name}",
            f"PidFile {folder / 'sshd.pid'}", "LogLevel DEBUG1",
            "StrictModes no",  # the key file sits under the world-writable /tmp, which StrictModes refuses
            f"ForceCommand {force_command}",
        ]
        (folder / "sshd_config").write_text("\n".join(conf) + "\n")
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.log = folder / "sshd.log"
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config"), "-E", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("sshd did not start")

    def argv(self, *extra: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.dir / "client"), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-p", str(self.port), *extra, f"{self.user}@127.0.0.1"]

    def ssh(self, command: str | None, *extra: str, input: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
        argv = self.argv(*extra) + ([command] if command is not None else [])
        return subprocess.run(argv, capture_output=True, timeout=timeout, input=input)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by pid: only the sshd this test started
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sshd(ready):
    a, media = ready
    folder = Path(tempfile.mkdtemp(prefix="donjon-sshd-"))
    env = a.env()
    force = " ".join(["env", f"PYTHONPATH={env['PYTHONPATH']}", f"DONJON_HOME={a.home}",
                      str(VENV_BIN / "python"), "-m", "appliance.cli", "ssh-shell"])
    s = Sshd(folder, force)
    yield a, media, s
    s.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_ssh_one_shot_allow_list(sshd):
    a, media, s = sshd
    r = s.ssh("status")
    assert r.returncode == 0, r.stderr
    assert b"activated: no" in r.stdout
    for bad in ("rm -rf /", "status; rm -rf /", "status $(id)", "sh", "bash -i", "status --home /etc",
                "ca export root --out /tmp/x", "cert list --ca '$(id)'", "'unbalanced", "../../bin/sh"):
        r = s.ssh(bad)
        assert r.returncode != 0, bad
        assert b"unknown command" in r.stderr, (bad, r.stderr)
        assert r.stdout == b"", bad
    # Key only: a password is never asked for, and forwarding is refused.
    r = s.ssh("status", "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive")
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    r = s.ssh("status", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9")
    assert r.returncode != 0
    # The one-shot runs the same CLI command as `donjon status` locally; beyond status, the officer
    # logs in on the channel first (prompts on stderr, the output alone on stdout).
    pin = a.home / "pin"
    a.cli("activate", "--pin-file", str(pin))
    a.cli("status")  # the local CLI logs in once (an audit record); later commands resume its session
    assert s.ssh("status").stdout == a.cli("status").stdout
    r = s.ssh("ca list", input=f"{OFFICER}\n{PASSWORD}\n\n".encode())
    assert r.returncode == 0 and r.stdout == a.cli("ca", "list").stdout and b"issuing" in r.stdout
    r = s.ssh("ca list", input=f"{OFFICER}\nwrong password\n\n".encode())
    assert r.returncode == 1 and r.stdout == b"" and b"login refused" in r.stderr
    r = s.ssh("ca list")
    assert r.returncode == 1 and r.stdout == b"" and b"login refused" in r.stderr


def test_ssh_console_menu(sshd, tmp_path):
    a, media, s = sshd
    t = Tmux(tmp_path, s.argv("-tt"))
    try:
        drive_menu(t, a, media)
        t.send("0")
        t.expect(r"bye")
        assert t.wait_dead() == 0
        assert_80_columns(t)
    finally:
        t.close()


def test_shutdown_from_the_console(ready, tmp_path):
    a, media = ready
    a.cli("activate", "--pin-file", str(a.home / "pin"))
    t = Tmux(tmp_path, console_argv(a), env=a.env())
    try:
        log_in(t, "admin")  # settings, backup and shutdown are an administrator's
        t.expect(r"logged in as admin[\s\S]*choice>$")
        t.send("10")  # network and endpoint settings: a validated edit of donjon.toml
        t.expect(r"change \(1-\d+, Enter: back\)>$")
        t.send("1")
        t.expect(r"new value \(Enter: keep\):$")
        t.send('127.0.0.1:8443" module = "/tmp/evil.so')
        t.expect(r"error: ocsp\.listen: [\s\S]*choice>$")
        t.send("10")
        t.expect(r">$")
        t.send("1")
        t.expect(r"new value \(Enter: keep\):$")
        t.send("127.0.0.1:18443")
        t.expect(r"ocsp\.listen = \"127\.0\.0\.1:18443\" \(takes effect at the next start\)[\s\S]*choice>$")
        t.send("19")  # key backup to the media: refused here, where dual control is off (tests/integration/test_keybackup.py
        t.expect(r"Key backup \(1-2, Enter: back\)>$")  # drives it to the end under dual control)
        t.send("1")
        t.expect(r"custodian shares \(Enter: default\):$")
        t.send("3")
        t.expect(r"shares needed to recover \(Enter: default\):$")
        t.send("2")
        t.expect(r"token SO PIN:$")
        t.send((a.home / "softhsm" / "so-pin").read_text().strip())
        t.expect(r"error: [\s\S]*a key backup needs dual control[\s\S]*choice>$")
        assert not list(media.glob("keys-*"))
        t.send("12")  # backup to the media: the same operation as `donjon backup`
        t.expect(r"backup: \d+ bytes -> media: (donjon-backup-\d{8}T\d{6}Z\.tar)\s+sha256 ([0-9a-f]{64})[\s\S]*choice>$")
        t.send("13")
        t.expect(r"\[yes/no\]$")
        t.send("yes")
        t.expect(r"the appliance is stopping")
        assert t.wait_dead() == 0
    finally:
        t.close()
    assert a.proc.wait(timeout=60) == 0
    backups = list(media.glob("donjon-backup-*.tar"))
    assert len(backups) == 1 and backups[0].stat().st_mode & 0o077 == 0
    assert 'listen = "127.0.0.1:18443"' in (a.home / "donjon.toml").read_text()
    assert "evil" not in (a.home / "donjon.toml").read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))

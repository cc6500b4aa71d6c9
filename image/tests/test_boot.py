"""`just image-test`: build each image profile, boot it in QEMU, drive the console on the serial line."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# The first test also builds both images (the session fixture, each build bounded at 1800 s): the
# suite's 600 s per test would stop `just image-test` from scratch in the middle of the first build.
pytestmark = pytest.mark.timeout(2 * 1800 + 900)
REPO = Path(__file__).resolve().parents[2]
OVMF = "/usr/share/ovmf/OVMF.fd"
BOOT_BOUND = 600
OFFICER_CONSOLE, STATUS, CAS, NETWORK, LOG, POWEROFF = "1", "2", "3", "4", "5", "7"  # /usr/lib/donjon/menu
PASSWORD = "correct horse battery staple 7"  # seconds from power-on to the first console question (TCG is far slower than KVM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def image_dir():
    """DONJON_IMAGE_DIR if given (images built by `just image`), else both profiles built here."""
    given = os.environ.get("DONJON_IMAGE_DIR")
    if given:
        yield Path(given).resolve()
        return
    out = Path(tempfile.mkdtemp(prefix="donjon-images-", dir="/var/tmp"))
    try:
        for profile in ("online-ca", "offline-root"):
            t0 = time.monotonic()
            r = subprocess.run(["bash", str(REPO / "image" / "mkimage"), profile, str(out)], cwd=REPO,
                               capture_output=True, text=True, timeout=1800)
            assert r.returncode == 0, f"mkimage {profile} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            print(f"\nmkimage {profile}: {time.monotonic() - t0:.0f} s")
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("profile", ["online-ca", "offline-root"])
def test_versions_recorded_and_package_set_kept(image_dir, profile, tmp_path):
    """The manifest and the SBOM name the exact versions the mirror of the day gave, the same ones, and
    the kept package set (.debs and signed indexes) verifies for an offline rebuild."""
    name = f"donjon-{profile}"
    manifest = (image_dir / f"{name}.packages.txt").read_text().splitlines()
    assert len(manifest) > 100 and all(len(ln.split()) == 4 for ln in manifest), manifest[:3]
    assert (image_dir / f"{name}.debs" / "packages.txt").read_text().splitlines() == manifest
    sbom = json.loads((image_dir / f"{name}.sbom.cdx.json").read_text())
    debs = {(c["name"], c["version"], c["hashes"][0]["content"]) for c in sbom["components"]
            if c["purl"].startswith("pkg:deb/") and "hashes" in c}
    assert debs == {(n, v, h) for n, v, _, h in map(str.split, manifest)}
    assert any(ln.startswith("linux-image-amd64 ") for ln in manifest)
    r = subprocess.run(["python3", str(REPO / "image" / "debset.py"), "verify", str(image_dir / f"{name}.debs"),
                        str(tmp_path / "repo")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "repo").glob("*.deb"))) == len(manifest)


def kvm_usable() -> bool:
    """/dev/kvm can be there and still fail (nested virtualisation without the MSRs QEMU sets):
    start firmware under KVM for a few seconds and look for a KVM error."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    p = subprocess.Popen(["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256", "-bios", OVMF,
                          "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=4)
        return False  # the firmware does not exit by itself: an exit is a failure
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return b"error" not in out.lower()


class Vm:
    """One QEMU guest: the serial console on a Unix socket, user-mode networking bound to 127.0.0.1."""

    def __init__(self, image: Path, tmp: Path, http_port: int | None):
        self.tmp = tmp
        self.disk = tmp / "disk.qcow2"  # a copy-on-write layer: the built image stays pristine
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(self.disk)],
                       check=True)
        self.sock_path = tmp / "serial.sock"
        self.transcript = tmp / "serial.log"
        kvm = kvm_usable()
        fwd = f",hostfwd=tcp:127.0.0.1:{http_port}-:80" if http_port else ""
        argv = [
            "qemu-system-x86_64", "-machine", f"q35,accel={'kvm' if kvm else 'tcg'}", "-cpu", "host" if kvm else "max",
            "-m", "1536", "-smp", "2", "-bios", OVMF, "-no-reboot", "-display", "none",
            "-drive", f"if=virtio,format=qcow2,file={self.disk}",
            # restrict=on: the guest reaches nothing outside; only the forward on 127.0.0.1 reaches it.
            "-netdev", f"user,id=n0,restrict=on{fwd}", "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"socket,id=ser0,path={self.sock_path},server=on,wait=on", "-serial", "chardev:ser0",
        ]
        self.log = open(tmp / "qemu.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        deadline = time.monotonic() + 30
        while not self.sock_path.exists():
            assert self.proc.poll() is None, (tmp / "qemu.log").read_text()
            assert time.monotonic() < deadline, "QEMU made no serial socket"
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.sock_path))
        self.buf = b""
        self.seen = b""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Read the serial line until pattern (a regex over what arrived since the last match)."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} on the serial console within {timeout}s; last output:\n"
                                     f"{self.seen[-3000:].decode(errors='replace')}")
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise AssertionError("the serial console closed")
            data = data.replace(b"\r", b"")
            self.buf += data
            self.seen += data
            with open(self.transcript, "ab") as f:
                f.write(data)

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r")

    def menu(self, choice: str, timeout: float = 60) -> str:
        """Pick a menu entry; returns what it printed before the next prompt."""
        self.send(choice)
        return self.expect(r"([\s\S]*?)Choice: ", timeout).group(1).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.sock.close()
        self.log.close()


def _first_boot(vm: Vm, url: str | None) -> None:
    vm.expect(r"Press Enter to set up this appliance from this console", BOOT_BOUND)
    print(f"console question after {time.monotonic() - vm.started:.1f} s")
    vm.send("")
    vm.expect(r"HSM choice \[1\]: ")
    vm.send("1")
    vm.expect(r"Initial security officer \(login name\): ")
    vm.send("alice")
    vm.expect(r"Hierarchy choice \[1\]: ")
    vm.send("1")
    vm.expect(r"Public URL .*\(CRL DP and AIA derive from it\).*: ")
    vm.send(url or "")  # offline-root: the default (published elsewhere)
    # Builds with officer accounts create the first administrator: its password, twice.
    m = vm.expect(r"(Password for officer alice: )|(Choice: )", 900)
    if m.group(1):
        vm.send(PASSWORD)
        vm.expect(r"Repeat for confirmation: ")
        vm.send(PASSWORD)
        vm.expect(r"Choice: ", 120)
    print(f"menu after first boot at {time.monotonic() - vm.started:.1f} s")


def _network(vm: Vm) -> tuple[list[str], list[str]]:
    out = vm.menu(NETWORK)
    ifaces = out.split("--- interfaces up ---")[1].split("--- listening inet sockets ---")[0].split()
    socks = [ln.strip() for ln in out.split("--- listening inet sockets ---")[1].split("--- failed units ---")[0].splitlines()
             if ln.strip()]
    failed = out.split("--- failed units ---")[1].split("--- end ---")[0].split()
    if failed:
        print(vm.menu(LOG))
    assert failed == [], f"failed units: {failed}"
    return ifaces, socks


def _officer_console(vm: Vm) -> str | None:
    """Log in to the officers' console as the first officer, show its status, log out. None when the
    build has no officer console."""
    vm.send(OFFICER_CONSOLE)
    m = vm.expect(r"(officer: )|(Choice: )", 120)
    if m.group(2):
        return None
    vm.send("alice")
    vm.expect(r"password: ")
    vm.send(PASSWORD)
    # The second factor is asked only where officer accounts exist (the officers work).
    if vm.expect(r"(second-factor code \(Enter: none\): )|(choice> )", 120).group(1):
        vm.send("")
        vm.expect(r"choice> ", 60)
    vm.send("1")
    out = b""
    while True:  # the status pages: Enter for the next page, until the menu's prompt
        m = vm.expect(r"([\s\S]*?)(-- more: [^\n]*-- |-- end: [^\n]*-- |choice> )", 60)
        out += m.group(1)
        if m.group(2) == b"choice> ":
            break
        vm.send("")
    vm.send("0")
    vm.expect(r"Choice: ", 60)
    return out.decode(errors="replace")


def _poweroff(vm: Vm) -> None:
    vm.send(POWEROFF)
    try:
        vm.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        raise AssertionError("the guest did not power off") from None


def _curl(url: str, out: Path) -> None:
    r = subprocess.run(["curl", "-sf", "--max-time", "10", "-o", str(out), url], capture_output=True)
    assert r.returncode == 0, f"curl {url}: {r.returncode} {r.stderr.decode()}"


def test_online_ca_boots_initialises_and_serves(image_dir, tmp_path):
    port = _free_port()
    vm = Vm(image_dir / "donjon-online-ca.qcow2", tmp_path, port)
    try:
        base = f"http://127.0.0.1:{port}"
        _first_boot(vm, base)
        status = vm.menu(STATUS)
        assert "activated" in status.lower(), status
        cas = vm.menu(CAS)
        assert "root" in cas and "issuing" in cas, cas

        # Through the forwarded port: the CA certificates, a CRL (DER, signed by its CA), an OCSP answer.
        root, issuing = tmp_path / "root.der", tmp_path / "issuing.der"
        _curl(f"{base}/ca/root.crt", root)
        _curl(f"{base}/ca/issuing.crt", issuing)
        pems = {}
        for name, der in (("root", root), ("issuing", issuing)):
            pems[name] = tmp_path / f"{name}.pem"
            subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(der), "-out", str(pems[name])], check=True)
        crl = tmp_path / "issuing.crl"
        _curl(f"{base}/crl/issuing.crl", crl)
        r = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(crl), "-CAfile", str(pems["issuing"]),
                            "-noout"], capture_output=True, text=True)
        assert r.returncode == 0 and "verify OK" in r.stderr + r.stdout, r.stderr
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(["openssl", "ocsp", "-issuer", str(pems["root"]), "-cert", str(pems["issuing"]),
                                "-url", f"{base}/ocsp", "-CAfile", str(pems["root"])],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and ": good" in r.stdout and "Response verify OK" in r.stderr:
                break
            assert time.monotonic() < deadline, f"no good OCSP answer:\n{r.stdout}\n{r.stderr}"
            time.sleep(1)

        officer = _officer_console(vm)
        if officer is not None:
            assert "activated: yes" in officer, officer
        else:
            print("this build has no officer console (donjon console): the system menu only")

        ifaces, socks = _network(vm)
        assert "lo" in ifaces and len(ifaces) >= 2, ifaces
        ports = {s.split()[-1].rsplit(":", 1)[1] for s in socks}
        assert {"80", "22"} <= ports and ports <= {"80", "22", "161", "68", "546"}, socks
        _poweroff(vm)
        print(f"online-ca boot test: {time.monotonic() - vm.started:.1f} s")
    finally:
        vm.close()


def test_offline_root_has_no_network(image_dir, tmp_path):
    vm = Vm(image_dir / "donjon-offline-root.qcow2", tmp_path, None)  # a NIC is there; it must stay down
    try:
        _first_boot(vm, None)
        cas = vm.menu(CAS)
        assert "root" in cas, cas
        ifaces, socks = _network(vm)
        assert ifaces == ["lo"], ifaces
        assert socks == [], socks
        _poweroff(vm)
        print(f"offline-root boot test: {time.monotonic() - vm.started:.1f} s")
    finally:
        vm.close()

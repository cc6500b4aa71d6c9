"""`just image-test`: build each image profile, boot it in QEMU, drive the console on the serial line."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
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
    """One QEMU guest: the serial console on a Unix socket (drained by a thread, so that two guests boot
    at once), the QEMU monitor on another (USB hot-plug of the "stick"), user-mode networking bound to
    127.0.0.1, and an xHCI controller where the virtual USB stick is attached and removed."""

    def __init__(self, image: Path, tmp: Path, forwards: dict[int, int] | None = None, stick: Path | None = None):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.disk = tmp / "disk.qcow2"  # a copy-on-write layer: the built image stays pristine
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(self.disk)],
                       check=True)
        self.sock_path = tmp / "serial.sock"
        self.mon_path = tmp / "monitor.sock"
        self.transcript = tmp / "serial.log"
        kvm = kvm_usable()
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in (forwards or {}).items())
        argv = [
            "qemu-system-x86_64", "-machine", f"q35,accel={'kvm' if kvm else 'tcg'}", "-cpu", "host" if kvm else "max",
            "-m", "1536", "-smp", "2", "-bios", OVMF, "-no-reboot", "-display", "none",
            "-drive", f"if=virtio,format=qcow2,file={self.disk}",
            # restrict=on: the guest reaches nothing outside; only the forwards on 127.0.0.1 reach it.
            "-netdev", f"user,id=n0,restrict=on{fwd}", "-device", "virtio-net-pci,netdev=n0",
            "-device", "qemu-xhci,id=xhci",
            "-chardev", f"socket,id=ser0,path={self.sock_path},server=on,wait=on", "-serial", "chardev:ser0",
            "-monitor", f"unix:{self.mon_path},server=on,wait=off",
        ]
        if stick is not None:
            argv += ["-drive", f"if=none,id=stick,format=raw,file={stick}",
                     "-device", "usb-storage,bus=xhci.0,drive=stick,id=stickdev,removable=on"]
        self.argv = argv
        self.log = open(tmp / "qemu.log", "ab")
        self.started = time.monotonic()
        self.cond = threading.Condition()
        self._start()

    def _start(self) -> None:
        self.sock_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.sock_path.exists():
            assert self.proc.poll() is None, (self.tmp / "qemu.log").read_text()
            assert time.monotonic() < deadline, "QEMU made no serial socket"
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        while True:  # the socket file can exist a moment before QEMU listens on it
            try:
                self.sock.connect(str(self.sock_path))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "QEMU's serial socket refused"
                time.sleep(0.1)
        self.buf = b""
        self.seen = b""
        self.closed = False
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def power_cycle(self) -> None:
        """Kill the guest and start it again on the same disks (before first boot wrote anything)."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.sock.close()
        self.reader.join(timeout=10)
        self._start()

    def _drain(self) -> None:
        with open(self.transcript, "ab") as f:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                with self.cond:
                    if not data:
                        self.closed = True
                        self.cond.notify_all()
                        return
                    data = data.replace(b"\r", b"")
                    self.buf += data
                    self.seen += data
                    self.cond.notify_all()
                f.write(data)
                f.flush()

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait for pattern (a regex over what arrived since the last match) on the serial line."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf)
                if m:
                    self.buf = self.buf[m.end():]
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.closed or self.proc.poll() is not None:
                    raise AssertionError(f"{self.tmp.name}: no {pattern!r} on the serial console within {timeout}s; "
                                         f"last output:\n{self.seen[-3000:].decode(errors='replace')}")
                self.cond.wait(min(left, 1.0))

    def unread(self, data: bytes) -> None:
        with self.cond:
            self.buf = data + self.buf

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r")

    def menu(self, choice: str, timeout: float = 60) -> str:
        """Pick a system-menu entry; returns what it printed before the next prompt."""
        self.send(choice)
        return self.expect(r"([\s\S]*?)Choice: ", timeout).group(1).decode(errors="replace")

    def hmp(self, command: str) -> str:
        """One QEMU monitor command (human monitor), its output."""
        with socket.socket(socket.AF_UNIX) as m:
            m.settimeout(30)
            m.connect(str(self.mon_path))
            out = b""
            while not out.endswith(b"(qemu) "):
                out += m.recv(65536)
            m.sendall(command.encode() + b"\n")
            out = b""
            while not out.endswith(b"(qemu) "):
                out += m.recv(65536)
        return out.decode(errors="replace").replace("\r", "")

    def plug_stick(self, stick: Path) -> None:
        self.hmp(f"drive_add 0 if=none,id=stick,format=raw,file={stick}")
        out = self.hmp("device_add usb-storage,bus=xhci.0,drive=stick,id=stickdev,removable=on")
        assert "rror" not in out, out

    def unplug_stick(self) -> None:
        """Pull the stick (after the console unmounted it): its writes are on the host file once QEMU let go."""
        self.hmp("device_del stickdev")
        deadline = time.monotonic() + 60
        while "stickdev" in self.hmp("info usb") or "stick" in self.hmp("info block"):
            assert time.monotonic() < deadline, "the stick was not released"
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.sock.close()
        self.reader.join(timeout=10)
        self.log.close()


def _first_boot(vm: Vm, url: str | None, hierarchy: str = "1") -> None:
    for attempt in range(5):
        # An emulated guest on a loaded host can fail the kernel's early timer check ("IO-APIC + timer
        # doesn't work!"): an artefact of TCG starved of CPU, not of the image; power-cycle and boot again.
        m = vm.expect(r"(Press Enter to set up this appliance from this console)|(Kernel panic - not syncing: [^\n]*)",
                      BOOT_BOUND)
        if m.group(1):
            break
        print(f"{vm.tmp.name}: {m.group(2).decode(errors='replace')[:120]} (emulated boot {attempt + 1}); power-cycled")
        assert attempt < 4, "five kernel panics at boot"
        vm.power_cycle()
    print(f"{vm.tmp.name}: console question after {time.monotonic() - vm.started:.1f} s")
    vm.send("")
    vm.expect(r"HSM choice \[1\]: ")
    vm.send("1")
    vm.expect(r"Initial security officer \(login name\): ")
    vm.send("alice")
    vm.expect(r"Hierarchy choice \[1\]: ")
    vm.send(hierarchy)
    vm.expect(r"Public URL .*\(CRL DP and AIA derive from it\).*: ")
    vm.send(url or "")  # the default (published elsewhere)
    # Builds with officer accounts create the first administrator: its password, twice.
    m = vm.expect(r"(Password for officer alice: )|(Choice: )", 900)
    if m.group(1):
        vm.send(PASSWORD)
        vm.expect(r"Repeat for confirmation: ")
        vm.send(PASSWORD)
        vm.expect(r"Choice: ", 120)
    print(f"{vm.tmp.name}: menu after first boot at {time.monotonic() - vm.started:.1f} s")


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


def _login(vm: Vm, who: str = "alice") -> None:
    """Log in to the officers' console (its menu's prompt follows)."""
    vm.send(OFFICER_CONSOLE)
    vm.expect(r"officer: ", 120)
    vm.send(who)
    vm.expect(r"password: ")
    vm.send(PASSWORD)
    # The second factor is asked only where officer accounts exist (the officers work).
    if vm.expect(r"(second-factor code \(Enter: none\): )|(choice> )", 120).group(1):
        vm.send("")
        vm.expect(r"choice> ", 60)


def _add_operator(vm: Vm, name: str) -> None:
    """The administrator adds an operator (the first officer is an administrator only: separation of duties)."""
    _officer_item(vm, "Officers")
    _pick(vm, "Add an officer", r"officers \(1-\d+, Enter: back\)> ")
    vm.expect(r"new officer name: ")
    vm.send(name)
    _pick(vm, "operator", r"role \(1-\d+, Enter: back\)> ")
    vm.expect(rf"new password for {name}: ")
    vm.send(PASSWORD)
    vm.expect(r"again: ")
    vm.send(PASSWORD)
    vm.expect(rf"officer {name} added \(operator\)", 120)
    vm.expect(r"choice> ", 60)


def _pick(vm: Vm, label: str, prompt: str, timeout: float = 120) -> str:
    """Wait for a numbered list ending in `prompt`, answer the number of the entry `label` (a regex);
    returns what was printed."""
    text = vm.expect(r"([\s\S]*?)" + prompt, timeout).group(1).decode(errors="replace")
    m = re.search(r"(\d+)  (?:" + label + ")", text)
    assert m, f"no {label!r} in:\n{text}"
    vm.send(m.group(1))
    return text


def _officer_item(vm: Vm, label: str) -> None:
    """Pick an item of the officers' main menu by its label (a menu already printed up to `choice> `)."""
    text = vm.seen[-4000:].decode(errors="replace").rsplit("== Donjon menu", 1)[-1]
    m = re.search(r"(\d+)  " + re.escape(label), text)
    assert m, f"no {label!r} in the menu:\n{text}"
    vm.send(m.group(1))


def _status_pages(vm: Vm) -> str:
    vm.send("1")
    out = b""
    for _ in range(50):  # the status pages: Enter for the next page, until the menu's prompt
        m = vm.expect(r"([\s\S]*?)(-- more: [^\n]*-- |-- end: [^\n]*-- |choice> )", 60)
        out += m.group(1)
        if m.group(2) == b"choice> ":
            break
        vm.send("")
    return out.decode(errors="replace")


def _logout(vm: Vm) -> None:
    vm.send("0")
    vm.expect(r"Choice: ", 60)


def _mount(vm: Vm) -> str:
    """Officers' menu -> Removable media: pick the stick; returns the mount report."""
    _officer_item(vm, "Removable media (USB)")
    _pick(vm, r"/dev/sd[a-z]+ +vfat", r"media \(1-\d+, Enter: back\)> ")
    return vm.expect(r"(mounted [^\n]*\n[^\n]*options: [^\n]*)\n", 120).group(1).decode()


def _with_media(vm: Vm, action: str) -> None:
    _pick(vm, re.escape(action), r"with the media \(1-\d+, Enter: back\)> ")


def _unmount(vm: Vm) -> str:
    vm.expect(r"with the media \(1-\d+, Enter: back\)> ", 300)
    vm.send("")
    out = vm.expect(r"(/dev/sd[a-z]+ unmounted: it may be removed)", 120).group(1).decode()
    vm.expect(r"choice> ", 60)
    return out


def _poweroff(vm: Vm) -> None:
    vm.send(POWEROFF)
    try:
        vm.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("the guest did not power off") from None


def _curl(url: str, out: Path) -> None:
    r = subprocess.run(["curl", "-sf", "--max-time", "10", "-o", str(out), url], capture_output=True)
    assert r.returncode == 0, f"curl {url}: {r.returncode} {r.stderr.decode()}"


def _mtools(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


SIGN_CEREMONY = """\
[ceremony]
name = "sub-2026"
officers = ["bob"]
quorum = 1
output = "sign-out"

[[step]]
action = "sign-csr"
parent = "offline-root"
csr = "sub.csr"
validity-days = 1825
path-length = 0
out = "sub.pem"

[[step]]
action = "export-ca"
ca = "offline-root"
out = "root.pem"

[[step]]
action = "crl-presign"
ca = "offline-root"
periods = 12
every = "30d"
overlap = "2d"
out = "root-calendar.json"
"""


def _make_stick(tmp: Path) -> Path:
    """The "USB stick": a raw vfat disk image made and filled on the host without mounting (mtools)."""
    stick = tmp / "stick.img"
    with open(stick, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.vfat", "-n", "DONJONSTICK", str(stick)], check=True, capture_output=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f", str(tmp / "alice")], check=True)
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp / "www.key"), "-subj", "/CN=www.example.org",
                    "-addext", "subjectAltName=DNS:www.example.org", "-out", str(tmp / "www.csr")],
                   check=True, capture_output=True)
    (tmp / "sign.toml").write_text(SIGN_CEREMONY)
    for name in ("alice.pub", "www.csr", "sign.toml"):
        _mtools("mcopy", "-i", str(stick), str(tmp / name), f"::{name}")
    return stick


def test_two_appliances_carry_media(image_dir, tmp_path):
    """Both images boot at once; a virtual vfat USB stick goes online-ca -> offline-root -> online-ca:
    SSH key and CA request out, signed certificate and 12-CRL calendar back, then a leaf verifies with
    every CRL fetched from the online endpoint. The offline root sets its clock (CAP_SYS_TIME in the
    clock helper alone); the online box is reached over SSH with the key enrolled from the console."""
    http, ssh = _free_port(), _free_port()
    base = f"http://127.0.0.1:{http}"
    stick = _make_stick(tmp_path)
    online = Vm(image_dir / "donjon-online-ca.qcow2", tmp_path / "online", {http: 80, ssh: 22}, stick)
    offline = Vm(image_dir / "donjon-offline-root.qcow2", tmp_path / "offline")  # a NIC is there; it must stay down
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            boots = [pool.submit(_first_boot, online, base), pool.submit(_first_boot, offline, base, "3")]
            for b in boots:
                b.result()

        # ---- online-ca: serves what it made at first boot.
        status = online.menu(STATUS)
        assert "activated" in status.lower(), status
        cas = online.menu(CAS)
        assert "root" in cas and "issuing" in cas, cas
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

        # ---- online-ca, officers' console: the stick mounted nodev,nosuid,noexec at the one media folder;
        # alice's SSH key enrolled from it; the sub-CA's key made in the HSM and its request written to it.
        _login(online)
        assert "activated: yes" in _status_pages(online)
        _add_operator(online, "bob")
        mounted = _mount(online)
        opts = mounted.split("options: ")[1].split(",")
        assert "/media/donjon" in mounted and {"nodev", "nosuid", "noexec"} <= set(opts), mounted
        _with_media(online, "Officers' SSH keys")
        _pick(online, "Enrol a key from the media", r"SSH keys \(1-2, Enter: back\)> ")
        online.expect(r"officer: ")
        online.send("alice")
        _pick(online, r"alice\.pub", r"SSH public key: number or file name \(Enter: back\)> ")
        online.expect(r"enrolled the SSH key of alice", 120)
        _unmount(online)
        _logout(online)
        _login(online, "bob")  # the operator makes the CA's key and request
        _mount(online)
        _with_media(online, "CA: request, install")
        _pick(online, "Request", r"CA \(1-2, Enter: back\)> ")
        online.expect(r"CA name: ")
        online.send("sub")
        online.expect(r"subject \([^\n]*\): ")
        online.send("CN=Donjon Demo Sub CA,O=Donjon Demo,C=FR")
        online.expect(r"key type [^\n]*: ")
        online.send("")
        online.expect(r"path length \(Enter: default\): ")
        online.send("0")
        online.expect(r"CA sub: awaiting[^\n]*\n[^\n]*-> media: sub\.csr", 300)
        assert "unmounted: it may be removed" in _unmount(online)
        _logout(online)

        # ---- carried: the request on the stick, pulled from one guest and pushed into the other.
        online.unplug_stick()
        assert "sub.csr" in _mtools("mdir", "-b", "-i", str(stick), "::")
        _mtools("mcopy", "-i", str(stick), "::sub.csr", str(tmp_path / "sub.csr"))
        r = subprocess.run(["openssl", "req", "-in", str(tmp_path / "sub.csr"), "-verify", "-noout", "-subject"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Donjon Demo Sub CA" in r.stdout, r.stderr
        offline.plug_stick(stick)

        # ---- offline-root: the ceremony from the stick (sign the request, export the root, 12 CRLs ahead).
        cas = offline.menu(CAS)
        assert "offline-root" in cas, cas
        _login(offline)
        _add_operator(offline, "bob")
        _logout(offline)
        _login(offline, "bob")
        _mount(offline)
        _with_media(offline, "Ceremonies")
        _pick(offline, r"sign\.toml", r"ceremony file: number or file name \(Enter: back\)> ")
        offline.expect(r"officer: ", 120)
        offline.send("bob")
        offline.expect(r"password: ")
        offline.send(PASSWORD)
        if offline.expect(r"(second-factor code \(Enter: none\): )|(bob present)", 120).group(1):
            offline.send("")  # every listed officer present: the roll call ends by itself
        for step in (1, 2, 3):
            offline.expect(rf"bob: I witnessed step {step} as shown and approve it \[yes/no\] ", 600)
            offline.send("yes")
            offline.expect(rf"step {step} done", 600)
        offline.expect(r"outcome: complete", 300)
        _unmount(offline)
        _logout(offline)
        _login(offline)  # the administrator sets the clock

        # The clock: shown, then set by the administrator (audited); only donjon-clock@.service may.
        _officer_item(offline, "Clock: show, set")
        shown = offline.expect(r"(system clock: [^\n]*\n[^\n]*hardware clock: [^\n]*)\n", 60).group(1).decode()
        assert "UTC" in shown and "no hardware clock" not in shown, shown
        offline.expect(r"set the time\? \[yes/no\] ")
        offline.send("yes")
        offline.expect(r"new time, UTC \(YYYY-MM-DD HH:MM:SS\): ")
        ahead = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + 86400 + 3600))
        offline.send(ahead)
        said = offline.expect(r"([^\n]*clock[^\n]*)\n[\s\S]*?choice> ", 300).group(1).decode()
        assert "system clock set; hardware clock set" in said, said
        _officer_item(offline, "Clock: show, set")
        shown = offline.expect(r"(system clock: [^\n]*\n[^\n]*hardware clock: [^\n]*)\n", 60).group(1).decode()
        day = ahead[:10]
        assert shown.count(day) == 2, f"both clocks on {day}:\n{shown}"
        offline.expect(r"set the time\? \[yes/no\] ")
        offline.send("no")
        offline.expect(r"choice> ", 60)
        _logout(offline)
        ifaces, socks = _network(offline)
        assert ifaces == ["lo"], ifaces
        assert socks == [], socks

        # ---- carried back: the certificate, the root and the calendar.
        offline.unplug_stick()
        listing = _mtools("mdir", "-b", "-i", str(stick), "::sign-out")
        for name in ("sub.pem", "root.pem", "root-calendar.json", "transcript.json"):
            assert name in listing, listing
            _mtools("mcopy", "-i", str(stick), f"::sign-out/{name}", str(tmp_path / name))
        cal = json.loads((tmp_path / "root-calendar.json").read_text())
        assert len(cal["crls"]) == 12, cal.keys()
        online.plug_stick(stick)

        # ---- online-ca: install the certificate, load the calendar, issue a leaf from the CSR on the stick.
        _login(online, "bob")
        _mount(online)
        _with_media(online, "CA: request, install")
        _pick(online, "Install", r"CA \(1-2, Enter: back\)> ")
        online.expect(r"CA name: ")
        online.send("sub")
        _pick(online, r"sign-out/sub\.pem", r"CA certificate: number or file name \(Enter: back\)> ")
        _pick(online, r"sign-out/root\.pem", r"trust anchor [^\n]*> ")
        online.expect(r"installed CA sub", 300)
        _with_media(online, "CRL calendar: load, status")
        _pick(online, "Load a calendar bundle", r"CRL calendar \(1-2, Enter: back\)> ")
        _pick(online, r"sign-out/root-calendar\.json", r"calendar bundle: number or file name \(Enter: back\)> ")
        online.expect(r"calendar of offline-root: CRLs #\d+-#\d+ \(12 new\) loaded", 300)
        for _ in range(5):  # the calendar's lines are paged
            m = online.expect(r"([\s\S]*?)(-- more: [^\n]*-- |-- end: [^\n]*-- |with the media \(1-\d+, Enter: back\)> )", 60)
            if m.group(2).startswith(b"with the media"):
                online.unread(m.group(0))  # the list and its prompt, for _with_media
                break
            online.send("")
        _with_media(online, "Issue from a CSR")
        _pick(online, r"www\.csr", r"CSR: number or file name \(Enter: back\)> ")
        _pick(online, r"sub  ", r"CA \(1-\d+, Enter: back\)> ")
        online.expect(r"profile \[tls-server\]: ")
        online.send("")
        online.expect(r"validity in days \(Enter: default\): ")
        online.send("")
        leaf_name = online.expect(r"-> media: (www-[0-9a-f]+\.pem)", 300).group(1).decode()
        _with_media(online, "CRL: sign, export")  # the new sub-CA's first CRL, published at its CRL DP at once
        _pick(online, r"sub  ", r"CA \(1-\d+, Enter: back\)> ")
        _pick(online, "Sign a new CRL now", r"CRL \(1-2, Enter: back\)> ")
        online.expect(r"CRL sub #\d+: \d+ bytes -> media: sub-crl-\d+\.crl", 300)
        _unmount(online)
        _logout(online)
        online.unplug_stick()
        _mtools("mcopy", "-i", str(stick), f"::{leaf_name}", str(tmp_path / "www.pem"))

        # A relying party on the host: every CRL from the online endpoint, the offline root's pre-signed one
        # (published once its thisUpdate came; given for the self-signed root too, which has no CRL DP) and,
        # downloaded from the CRL DPs in the certificates, the sub-CA's and the root's again.
        root_crl = tmp_path / "offline-root.crl"
        deadline = time.monotonic() + 180
        while subprocess.run(["curl", "-sf", "--max-time", "10", "-o", str(root_crl), f"{base}/crl/offline-root.crl"]).returncode:
            assert time.monotonic() < deadline, "the offline root's calendar CRL is not served by the online box"
            time.sleep(5)
        r = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(root_crl), "-noout", "-crlnumber",
                            "-CAfile", str(tmp_path / "root.pem")], capture_output=True, text=True)
        first = min(c["number"] for c in cal["crls"])
        assert r.returncode == 0 and int(r.stdout.strip().split("=")[1], 16) == first, r.stdout + r.stderr
        subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(root_crl), "-out", str(tmp_path / "offline-root.crl.pem")],
                       check=True)
        deadline = time.monotonic() + 180
        while True:
            r = subprocess.run(["openssl", "verify", "-x509_strict", "-crl_check_all", "-crl_download",
                                "-CAfile", str(tmp_path / "root.pem"), "-CRLfile", str(tmp_path / "offline-root.crl.pem"),
                                "-untrusted", str(tmp_path / "sub.pem"), str(tmp_path / "www.pem")],
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, f"{r.stdout}\n{r.stderr}"
            time.sleep(5)
        assert "www.pem: OK" in r.stdout

        # SSH with the enrolled key: the admin account, the forced command, a read-only command.
        sshopts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                   "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30", "-p", str(ssh)]
        # The officer then logs in on the channel itself (prompts on stderr): name, password, second factor.
        r = subprocess.run(["ssh", *sshopts, "-i", str(tmp_path / "alice"), "admin@127.0.0.1", "ca list"],
                           input=f"alice\n{PASSWORD}\n\n", capture_output=True, text=True, timeout=180)
        assert r.returncode == 0 and re.search(r"(?m)^sub ", r.stdout), f"{r.returncode} {r.stdout} {r.stderr}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "mallory")], check=True)
        r = subprocess.run(["ssh", *sshopts, "-i", str(tmp_path / "mallory"), "admin@127.0.0.1", "status"],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 255 and "Permission denied" in r.stderr, f"{r.returncode} {r.stderr}"

        ifaces, socks = _network(online)
        assert "lo" in ifaces and len(ifaces) >= 2, ifaces
        ports = {s.split()[-1].rsplit(":", 1)[1] for s in socks}
        assert {"80", "22"} <= ports and ports <= {"80", "22", "161", "68", "546"}, socks
        _poweroff(offline)
        _poweroff(online)
        print(f"two-appliance boot test: {time.monotonic() - online.started:.1f} s")
    finally:
        online.close()
        offline.close()

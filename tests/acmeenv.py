"""What the ACME tests run beside the appliance: an authoritative DNS (knot, RFC 2136 updates) for the
test names and dns-01, a web root served over HTTP for hook-based http-01 clients, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ZONE = "donjon.test"
CERTBOT = "/opt/donjon-dev/certbot-venv-5.8.0/bin/certbot"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for TCP and UDP on 127.0.0.1 (knot listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Knot:
    """knotd authoritative for donjon.test on 127.0.0.1:PORT: every name has A 127.0.0.1; dynamic
    updates (RFC 2136) from 127.0.0.1 accepted (lego's rfc2136 provider; knsupdate in tests)."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Knot":
        d = self.dir
        (d / "db").mkdir(parents=True, exist_ok=True)
        (d / f"{ZONE}.zone").write_text(
            f"$ORIGIN {ZONE}.\n$TTL 0\n@ SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 0\n@ NS ns\nns A 127.0.0.1\n"
            "@ A 127.0.0.1\n* A 127.0.0.1\n")
        (d / "knot.conf").write_text(f"""server:
    listen: 127.0.0.1@{self.port}
    rundir: {d}
    pidfile: {d}/knot.pid
log:
  - target: {d}/knot.log
    any: info
database:
    storage: {d}/db
control:
    listen: {d}/knot.sock
acl:
  - id: local_update
    address: 127.0.0.1
    action: update
template:
  - id: default
    storage: {d}
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: changes
zone:
  - domain: {ZONE}
    acl: local_update
""")
        self.proc = subprocess.Popen(["knotd", "-c", str(d / "knot.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.query(f"www.{ZONE}", "A") == ["127.0.0.1"]:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (d / "knot.log").read_text() if (d / "knot.log").exists() else ""
        raise RuntimeError(f"knotd did not start: {log[-2000:]}")

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def query(self, name: str, rtype: str) -> list[str]:
        r = subprocess.run(["kdig", "@127.0.0.1", "-p", str(self.port), "+short", "+timeout=1", "+retry=0", name, rtype],
                           capture_output=True, text=True, timeout=10)
        return [x.strip().strip('"') for x in r.stdout.splitlines() if x.strip()]

    def update(self, *commands: str) -> None:
        script = f"server 127.0.0.1 {self.port}\nzone {ZONE}.\n" + "\n".join(commands) + "\nsend\n"
        r = subprocess.run(["knsupdate"], input=script, capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"knsupdate: {r.stderr}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class WebRoot:
    """A static HTTP server on 127.0.0.1:PORT serving `root` (http-01 for hook-based clients)."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WebRoot":
        (self.root / ".well-known" / "acme-challenge").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(self.root),
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("web root server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def clean_env(**extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}
    env.update(extra)
    return env

"""The protocol gateway role: its own user and token, HTTPS with a certificate from a local CA, the route table, the HTTP bounds, restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import Appliance, _variant, copy_home, make_ceremony

GATEWAY_TOML = """
[gateway]
enabled = true
listen = "127.0.0.1:0"
tls-names = ["gw.donjon.test", "127.0.0.1"]
validation-networks = ["127.0.0.0/8"]
"""


@pytest.fixture(scope="module")
def gw(src_path, home_templates):
    """One appliance with the gateway on, for the whole module."""
    base = Path(tempfile.mkdtemp(prefix="donjon-gw-"))
    os.chmod(base, 0o711)
    ceremony = make_ceremony(base / "ceremony.toml")
    t = home_templates((*_variant(ceremony, GATEWAY_TOML, None, None, None), 0), ceremony, None, None, GATEWAY_TOML, None)
    a = Appliance(base / "gw", src_path)
    copy_home(t.home, a.home)
    a.template, a.officers = t.home, dict(t.officers)
    try:
        a.start()
        a.chain = base / "chain.pem"
        a.export("root", a.chain)
        wait_https(a)
        yield a
    finally:
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


def gateway_url(a: Appliance) -> str:
    return (a.home / "run" / "gateway").read_text().strip()


def wait_https(a: Appliance, timeout: float = 60) -> None:
    """Until the gateway answers over TLS (it asks the Factory for its certificate after activation)."""
    host, port = gateway_url(a).removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(a.chain))
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s, ctx.wrap_socket(s, server_hostname="gw.donjon.test"):
                return
        except (OSError, ssl.SSLError) as e:
            last = e
            time.sleep(0.2)
    raise AssertionError(f"the gateway did not serve TLS in {timeout}s: {last}\n{a.log.read_text()[-3000:]}")


def curl(a: Appliance, path: str, *args: str) -> tuple[int, bytes]:
    r = subprocess.run(["curl", "-sS", "--cacert", str(a.chain), "-o", "-", "-w", "\n%{http_code}", *args,
                        gateway_url(a).replace("127.0.0.1", "gw.donjon.test") + path,
                        "--resolve", f"gw.donjon.test:{gateway_url(a).rsplit(':', 1)[1]}:127.0.0.1"],
                       capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or 0), body


def test_the_gateway_serves_https_with_a_certificate_of_a_local_ca(gw, tmp_path):
    code, body = curl(gw, "/acme/directory")
    assert code == 200, body
    d = json.loads(body)
    assert d["newNonce"].endswith("/acme/new-nonce") and d["newAccount"].endswith("/acme/new-account")
    # The certificate: issued by the issuing CA for the configured names, verified to the root.
    host, port = gateway_url(gw).removeprefix("https://").rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)))
    (tmp_path / "gw.pem").write_text(pem)
    issuing = gw.export("issuing", tmp_path / "issuing.pem")
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(gw.chain), "-untrusted", str(issuing),
                        "-purpose", "sslserver", str(tmp_path / "gw.pem")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "gw.pem")], capture_output=True, text=True).stdout
    assert "DNS:gw.donjon.test" in text and "IP Address:127.0.0.1" in text and "Donjon Test Issuing CA" in text
    # Its key is in the gateway's own token, never in its folder in clear.
    for p in (gw.home / "gateway").rglob("*"):
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes(), p
    assert any((gw.home / "gateway-token" / "tokens").iterdir())
    # The audit names the gateway.
    audit = gw.cli("audit", "export").stdout.decode()
    assert "gateway/tls" in audit and "gateway-tls" in audit


def test_the_route_table_and_placeholders(gw):
    assert curl(gw, "/.well-known/cmp", "-X", "POST", "--data-binary", "x")[0] == 501
    assert curl(gw, "/.well-known/est/cacerts")[0] == 501
    assert curl(gw, "/scep?operation=GetCACaps")[0] == 501
    assert curl(gw, "/nothing-here")[0] == 404
    assert curl(gw, "/ocsp")[0] == 404  # the gateway is not the endpoint


def test_http_bounds_are_the_endpoints(gw):
    """A declared body over the route's cap is refused from the head, unread; a slow head is cut off."""
    host, port = gateway_url(gw).removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(gw.chain))
    with socket.create_connection((host, int(port)), timeout=10) as s, ctx.wrap_socket(s, server_hostname="gw.donjon.test") as t:
        t.sendall(b"POST /acme/new-order HTTP/1.1\r\nHost: gw.donjon.test\r\nContent-Type: application/jose+json\r\n"
                  b"Content-Length: 10000000\r\n\r\n")
        data = t.recv(4096)
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    with socket.create_connection((host, int(port)), timeout=10) as s, ctx.wrap_socket(s, server_hostname="gw.donjon.test") as t:
        t.sendall(b"GET /acme/directory HTTP/1.1\r\nHost: gw.donjon.test\r\nX-" + b"a" * 9000 + b": b\r\n\r\n")
        data = t.recv(4096)
    assert data.startswith(b"HTTP/1.1 431") or data.startswith(b"HTTP/1.1 400"), data[:100]
    code, _ = curl(gw, "/acme/directory", "-X", "DELETE")
    assert code == 405


def test_the_gateway_runs_as_its_own_user_and_is_restarted(gw):
    pids = gw.role_pids()
    assert "gateway" in pids
    status = Path(f"/proc/{pids['gateway']}/status").read_text()
    if os.geteuid() == 0:
        import pwd
        uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
        assert pwd.getpwuid(uid).pw_name == "donjon-gateway"
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
    os.kill(pids["gateway"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = gw.role_pids().get("gateway")
        if new and new != pids["gateway"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the gateway was not restarted")
    wait_https(gw)
    assert curl(gw, "/acme/directory")[0] == 200  # the same certificate, its key read back from the token

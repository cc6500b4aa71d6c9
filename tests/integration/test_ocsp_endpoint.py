"""The OCSP/CRL endpoint role on its own, started as the supervisor starts it (socketpairs for its
links, an inherited listening socket, `donjon role ocsp`), fed as the Factory feeds it, and judged
by `openssl ocsp` and `curl`. The test plays the supervisor and the Factory."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509

from appliance.ipc import schema as S
from tests.harness import EndpointRole
from tests.unit.test_ocsp_pki import make_ca, make_crl, make_leaf, published, sha256_hex

REPO = Path(__file__).resolve().parents[2]
GOOD, REVOKED, NEVER = 0x1234ABCD, 0x5678EF01, 0x42424242


class Role(EndpointRole):
    """One run of the role process from the source tree (tests/harness.py: the benchmark runs the same)."""

    def __init__(self, store: Path, listen: socket.socket, log: Path):
        super().__init__(store, listen, log, [sys.executable, "-m", "appliance.cli"])


def _http(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "-D", "-", *args, url], capture_output=True, timeout=20)


def _split(out: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    headers[":status"] = lines[0].split()[1]
    return headers, body


def _wait_health(base: str, count: int) -> None:
    for _ in range(100):
        r = _http(f"{base}/health")
        if f"ok: {count} ".encode() in r.stdout:
            return
        time.sleep(0.1)
    raise AssertionError(f"the endpoint never held {count} responses: {r.stdout!r}")


def _ocsp(tmp: Path, base: str, ca_pem: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "ocsp", "-issuer", str(ca_pem), "-cert", str(cert), "-url", f"{base}/ocsp",
                           "-CAfile", str(ca_pem), "-timeout", "10", *extra], capture_output=True, timeout=30)


@pytest.fixture
def pki(tmp_path):
    ca = make_ca("issuing")
    ca_pem = ca.pem(tmp_path / "ca.pem")
    paths = {}
    for name, serial in (("good", GOOD), ("revoked", REVOKED), ("never", NEVER)):
        leaf = make_leaf(ca, serial, f"{name}.example.org")
        from cryptography.hazmat.primitives import serialization
        p = tmp_path / f"{name}.pem"
        p.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        paths[name] = p
    return ca, ca_pem, paths


@pytest.fixture
def listen():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    yield s
    s.close()


def test_endpoint_serves_feed_and_restarts_from_its_store(tmp_path, pki, listen):
    ca, ca_pem, leaves = pki
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    base = f"http://127.0.0.1:{listen.getsockname()[1]}"
    now = int(time.time())
    crl = make_crl(ca, 5, [(REVOKED, now - 600)])

    role = Role(store, listen, tmp_path / "role.log")
    try:
        assert role.connect_feed() == 0  # an empty store resumes from the beginning
        role.fac.send(S.PublishCa(ca="issuing", cert=ca.der))
        items = [published(ca, GOOD), published(ca, GOOD, alg="sha256"),
                 published(ca, REVOKED, status="revoked", revoked_at=now - 600, reason=x509.ReasonFlags.key_compromise)]
        role.fac.send(S.PublishResponses(ca="issuing", responses=items, seq=3))
        role.fac.send(S.PublishCrl(ca="issuing", number=5, data=crl[:100], last=False))
        role.fac.send(S.PublishCrl(ca="issuing", number=5, data=crl[100:], last=True))
        _wait_health(base, 3)

        r = _ocsp(tmp_path, base, ca_pem, leaves["good"], "-no_nonce")
        assert r.returncode == 0, r.stderr
        assert b": good" in r.stdout and b"Response verify OK" in r.stderr
        r = _ocsp(tmp_path, base, ca_pem, leaves["good"])  # with a nonce: a pre-produced one carries none
        assert r.returncode == 0 and b": good" in r.stdout, r.stdout + r.stderr
        r = _ocsp(tmp_path, base, ca_pem, leaves["revoked"], "-no_nonce")
        assert r.returncode == 0 and b": revoked" in r.stdout and b"Reason: keyCompromise" in r.stdout, r.stdout
        r = _ocsp(tmp_path, base, ca_pem, leaves["never"], "-no_nonce")
        assert b"unauthorized" in (r.stdout + r.stderr).lower() and b": good" not in r.stdout

        # GET and POST: the same bytes, with RFC 5019 caching headers.
        req = tmp_path / "req.der"
        subprocess.run(["openssl", "ocsp", "-issuer", str(ca_pem), "-cert", str(leaves["good"]), "-no_nonce",
                        "-reqout", str(req)], check=True, capture_output=True, timeout=20)
        b64 = base64.b64encode(req.read_bytes()).decode()
        get_h, get_body = _split(_http(f"{base}/ocsp/{urllib.parse.quote(b64, safe='')}").stdout)
        post_h, post_body = _split(_http(f"{base}/ocsp", "--data-binary", f"@{req}",
                                         "-H", "Content-Type: application/ocsp-request").stdout)
        bare_h, bare_body = _split(_http(f"{base}/{b64}").stdout)  # openssl-style: base64 right after the path
        assert get_h[":status"] == post_h[":status"] == bare_h[":status"] == "200"
        assert get_body == post_body == bare_body == items[0][4]
        assert get_h["content-type"] == "application/ocsp-response"
        assert get_h["etag"] == f'"{sha256_hex(get_body)}"'
        assert "max-age=" in get_h["cache-control"] and "public" in get_h["cache-control"]
        assert 0 < int(get_h["cache-control"].split("max-age=")[1].split(",")[0]) <= 600
        assert "last-modified" in get_h and "expires" in get_h
        r304, _ = _split(_http(f"{base}/ocsp/{urllib.parse.quote(b64, safe='')}", "-H",
                               f"If-None-Match: {get_h['etag']}").stdout)
        assert r304[":status"] == "304"

        crl_h, crl_body = _split(_http(f"{base}/crl/issuing.crl").stdout)
        assert crl_h[":status"] == "200" and crl_h["content-type"] == "application/pkix-crl" and crl_body == crl
        crt_h, crt_body = _split(_http(f"{base}/ca/issuing.crt").stdout)
        assert crt_h["content-type"] == "application/pkix-cert" and crt_body == ca.der
        assert _split(_http(f"{base}/crl/other.crl").stdout)[0][":status"] == "404"
    finally:
        assert role.stop() == 0
    log = (tmp_path / "role.log").read_bytes()

    # A restart serves from the store before any feed arrives (the Factory link stays silent).
    t0 = time.monotonic()
    role = Role(store, listen, tmp_path / "role.log")
    try:
        r = _ocsp(tmp_path, base, ca_pem, leaves["good"], "-no_nonce")
        assert r.returncode == 0 and b": good" in r.stdout, r.stdout + r.stderr
        print(f"restart to first good answer: {time.monotonic() - t0:.2f}s")
        assert _split(_http(f"{base}/crl/issuing.crl").stdout)[1] == crl
        assert role.connect_feed() == 3  # resumes after what it holds
        # An older CRL does not replace the held one.
        role.fac.send(S.PublishCrl(ca="issuing", number=4, data=make_crl(ca, 4), last=True))
        _wait_health(base, 3)
        assert _split(_http(f"{base}/crl/issuing.crl").stdout)[1] == crl
    finally:
        assert role.stop() == 0, (tmp_path / "role.log").read_bytes().decode(errors="replace")
    assert b"Traceback" not in log


def test_unexpected_feed_message_exits_3(tmp_path, pki, listen):
    ca, _, _ = pki
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    role = Role(store, listen, tmp_path / "role.log")
    try:
        role.connect_feed()
        role.fac.send(S.PublishResponses(ca="nope", responses=[published(ca, GOOD)], seq=1))  # a CA never published
        assert role.proc.wait(timeout=15) == 3
    finally:
        role.stop()
    assert b"protocol violation" in (tmp_path / "role.log").read_bytes()
    assert os.listdir(store) == []

"""The shipped nginx cache configuration (appliance/ocsp/nginx.conf) in front of the endpoint role, run by
Debian's nginx: what nginx serves is judged by signature, serial, status and nextUpdate, never stale,
and a revocation shows through the cache within ocsp.max-age."""

from __future__ import annotations

import base64
import datetime as dt
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from appliance.ipc import schema as S
from tests.harness import EndpointRole
from tests.servers import Nginx
from tests.unit.test_ocsp_pki import cert_id_request, make_ca, make_leaf, published

MAX_AGE = 3  # ocsp.max-age of this endpoint: the stated revocation bound through the cache
GOOD, LATER, SHORT, NEVER = 0x1111AAAA, 0x2222BBBB, 0x3333CCCC, 0x4444DDDD


def _curl(url: str, *args: str) -> tuple[dict[str, str], bytes]:
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-D", "-", *args, url], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    headers[":status"] = lines[0].split()[1]
    return headers, body


def judge(ca, der: bytes, serial: int) -> str:
    """What a relying party checks: signed by the CA, for this serial, not past nextUpdate. Returns the status."""
    r = ocsp.load_der_ocsp_response(der)
    assert r.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    ca.key.public_key().verify(r.signature, r.tbs_response_bytes, ec.ECDSA(r.signature_hash_algorithm))
    assert r.serial_number == serial
    assert r.next_update_utc > dt.datetime.now(dt.timezone.utc), "served past its nextUpdate"
    assert r.this_update_utc <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    return r.certificate_status.name.lower()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ocsp-nginx")
    store = tmp / "store"
    store.mkdir(mode=0o700)
    listen = socket.socket()
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.bind(("127.0.0.1", 0))
    listen.listen(128)
    role = EndpointRole(store, listen, tmp / "role.log", [sys.executable, "-m", "appliance.cli"], max_age=MAX_AGE)
    nginx = Nginx()
    try:
        role.connect_feed()
        nginx.start(listen.getsockname()[1])
        yield role, nginx, make_ca("issuing")
    finally:
        nginx.stop()
        assert role.stop() == 0, (tmp / "role.log").read_text()
        listen.close()
    assert b"Traceback" not in (tmp / "role.log").read_bytes()


def _wait_held(base: str, n: int) -> None:
    for _ in range(100):  # bounded: 10 s
        h, body = _curl(f"{base}/health")
        if f"ok: {n} ".encode() in body:
            assert "x-cache-status" not in h or h["x-cache-status"] != "HIT"  # health is never cached
            return
        time.sleep(0.1)
    raise AssertionError(f"the endpoint never held {n} responses")


def test_nginx_serves_only_fresh_signed_answers_and_shows_a_revocation_within_max_age(proxied, tmp_path):
    role, nginx, ca = proxied
    base = f"http://127.0.0.1:{nginx.port}"
    role.fac.send(S.PublishCa(ca="issuing", cert=ca.der))
    now = int(time.time())
    role.fac.send(S.PublishResponses(ca="issuing", seq=1, responses=[
        published(ca, GOOD), published(ca, LATER),
        published(ca, SHORT, this_update=now - 60, next_update=now + 3),  # lapses during the test
    ]))
    _wait_held(base, 3)

    req = cert_id_request(ca, [GOOD])
    get_url = f"{base}/ocsp/{urllib.parse.quote(base64.b64encode(req).decode(), safe='')}"

    def post_req(body: bytes, ctype: str = "application/ocsp-request") -> tuple[dict[str, str], bytes]:
        p = tmp_path / "body.der"
        p.write_bytes(body)
        return _curl(f"{base}/ocsp", "--data-binary", f"@{p}", "-H", f"Content-Type: {ctype}")

    # GET cached by URL, POST cached by body: the second of each is a HIT, and every answer is judged.
    seen = []
    for _ in range(2):
        for h, body in (_curl(get_url), post_req(req)):
            assert h[":status"] == "200" and h["content-type"] == "application/ocsp-response"
            assert judge(ca, body, GOOD) == "good"
            # what reaches the client never promises freshness past nextUpdate
            assert h["expires"] and "max-age" not in h.get("cache-control", "")
            seen.append(h["x-cache-status"])
    assert seen[:2] == ["MISS", "MISS"] and seen[2:] == ["HIT", "HIT"], seen
    # Another body (another serial) is another key: never the cached answer for GOOD.
    h, body = post_req(cert_id_request(ca, [LATER]))
    assert h["x-cache-status"] == "MISS" and judge(ca, body, LATER) == "good"
    # A request with a nonce is its own key too (the pre-produced answer carries no nonce).
    h, body = post_req(cert_id_request(ca, [GOOD], nonce=os.urandom(16)))
    assert h["x-cache-status"] == "MISS" and judge(ca, body, GOOD) == "good"
    # The same body with another content type is refused by the endpoint, not answered from the cache.
    h, _ = post_req(req, "application/octet-stream")
    assert h[":status"] == "415"
    # Errors are never cached; a body past the cap is refused by nginx before the endpoint sees it.
    for _ in range(2):
        h, body = post_req(b"\x30\x03\x02\x01\x01")
        assert h[":status"] == "200" and h["x-cache-status"] != "HIT" and h["cache-control"] == "no-store"
        assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    h, _ = post_req(b"\x30" * 5000)
    assert h[":status"] == "413"
    # openssl ocsp, the real client, through the cache (POST, then from the cache).
    ca_pem = ca.pem(tmp_path / "ca.pem")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(make_leaf(ca, GOOD, "good.example.org").public_bytes(Encoding.PEM))
    for _ in range(2):
        r = subprocess.run(["openssl", "ocsp", "-issuer", str(ca_pem), "-cert", str(leaf), "-url", f"{base}/ocsp",
                            "-CAfile", str(ca_pem), "-no_nonce", "-timeout", "10"], capture_output=True, timeout=30)
        assert r.returncode == 0 and b": good" in r.stdout and b"Response verify OK" in r.stderr, r.stdout + r.stderr

    # Revocation: the endpoint holds the new answer at once; through the cache it shows within MAX_AGE s.
    now = int(time.time())
    role.fac.send(S.PublishResponses(ca="issuing", seq=2, responses=[
        published(ca, GOOD, status="revoked", revoked_at=now - 1, reason=x509.ReasonFlags.key_compromise)]))
    revoked_at = time.monotonic()
    statuses: list[str] = []
    for _ in range(200):  # bounded: MAX_AGE + a few seconds
        got = {judge(ca, b, GOOD) for _, b in (_curl(get_url), post_req(req))}
        statuses.append("/".join(sorted(got)))
        if got == {"revoked"} or time.monotonic() - revoked_at > MAX_AGE + 2:
            break
        time.sleep(0.1)
    assert statuses[-1] == "revoked", statuses
    assert time.monotonic() - revoked_at <= MAX_AGE + 2, statuses
    r = subprocess.run(["openssl", "ocsp", "-issuer", str(ca_pem), "-cert", str(leaf), "-url", f"{base}/ocsp",
                        "-CAfile", str(ca_pem), "-no_nonce", "-timeout", "10"], capture_output=True, timeout=30)
    assert b": revoked" in r.stdout and b"Response verify OK" in r.stderr, r.stdout + r.stderr

    # Never stale: SHORT was cached with max-age up to its nextUpdate; once that passes, nginx does not
    # serve it again (the endpoint answers tryLater for a lapsed response, and that is not cached).
    short = cert_id_request(ca, [SHORT])
    h, body = post_req(short)
    if ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
        judge(ca, body, SHORT)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # bounded
        h, body = post_req(short)
        r = ocsp.load_der_ocsp_response(body)
        if r.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            assert r.response_status == ocsp.OCSPResponseStatus.TRY_LATER and h["x-cache-status"] != "HIT"
            break
        judge(ca, body, SHORT)  # while successful, never past its nextUpdate
        time.sleep(0.2)
    else:
        raise AssertionError("the lapsed response was still served")

"""The protocol gateway role: its own user and token, HTTPS with a certificate from a local CA, the route table, the HTTP bounds, restarts."""

from __future__ import annotations

import contextlib
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

from tests.acmeenv import Knot, free_port
from tests.conftest import Appliance

GATEWAY_TOML = """
[gateway]
enabled = true
listen = "127.0.0.1:0"
tls-names = ["gw.donjon.test", "127.0.0.1"]
validation-networks = ["127.0.0.0/8"]
"""
# Per run (after the template is copied): the resolver and the ports validation connects to.
ACME_TOML = """
[gateway.acme]
name-patterns = ["*.donjon.test", "127.0.0.1"]
resolver = "127.0.0.1:{dns}"
http01-port = {http}
tlsalpn01-port = {alpn}
[[gateway.acme.profile]]
name = "classic"
profile = "tls-server"
ca = "issuing"
description = "TLS server certificate, 90 days, with CRL and OCSP"
[[gateway.acme.profile]]
name = "shortlived"
profile = "acme-short"
ca = "issuing"
description = "7 days, no CRL DP or OCSP URL"
"""
SHORT_PROFILE = """kind = "end-entity"
key_types = ["rsa2048", "rsa3072", "rsa4096", "p256", "p384"]
key_usage = ["digital_signature"]
extended_key_usage = ["serverAuth"]
san_types = ["dns", "ip"]
san_required = true
crl_dp = false
aia = false
max_validity_days = 7
lint = true

[[subject]]
attr = "CN"
presence = "optional"
"""


@pytest.fixture(scope="module")
def gw(module_appliance_factory):
    """One appliance with the gateway and ACME on, and the DNS it resolves through, for the whole module."""
    base = Path(tempfile.mkdtemp(prefix="donjon-gw-"))
    os.chmod(base, 0o711)
    # The default variant's template (made once per session, shared with other modules): the gateway's
    # folder and token are made at its first start.
    a = module_appliance_factory(start=False)
    knot = Knot(base / "knot").start()
    a.knot = knot
    a.http_port, a.alpn_port = free_port(), free_port()
    with open(a.home / "donjon.toml", "a") as f:
        f.write(GATEWAY_TOML + ACME_TOML.format(dns=knot.port, http=a.http_port, alpn=a.alpn_port))
    (a.home / "profiles").mkdir(exist_ok=True)
    (a.home / "profiles" / "acme-short.toml").write_text(SHORT_PROFILE)
    try:
        a.start()
        a.chain = base / "chain.pem"
        a.export("root", a.chain)
        a.issuing = a.export("issuing", base / "issuing.pem")
        wait_https(a)
        yield a
    finally:
        a.stop()  # before knot: the gateway resolves through it (the factory's own stop is then a no-op)
        knot.stop()
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
    """Killed, it is restarted with backoff; its ACME orders survive, a nonce from before does not."""
    from tests.acmeclient import Client
    c = Client(acme_directory(gw), str(gw.chain))
    assert c.register().status == 201
    r = c.order(["survive.donjon.test"])
    order_url = r.headers["location"]
    old_nonce = c.new_nonce()
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
    c.close()
    r = c.post(order_url, None, nonce=old_nonce)
    assert (r.status, r.problem) == (400, "badNonce")
    r = c.post(order_url, None)
    assert r.status == 200 and r.json()["identifiers"] == [{"type": "dns", "value": "survive.donjon.test"}]
    c.close()


# ---------------------------------------------------------------- ACME with real clients


def acme_directory(a: Appliance) -> str:
    return gateway_url(a) + "/acme/directory"


def verify(a: Appliance, cert: Path) -> str:
    """`openssl verify -x509_strict` against the root, the issuing CA as the untrusted intermediate."""
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(a.chain), "-untrusted", str(a.issuing),
                        "-purpose", "sslserver", str(cert)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(cert)], capture_output=True, text=True).stdout


def ocsp_status(a: Appliance, cert: Path, want: str, timeout: float = 30) -> str:
    """Poll the endpoint until the certificate's status is `want` (responses are signed right after
    issuance or revocation); the last status seen otherwise."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        r = subprocess.run(["openssl", "ocsp", "-issuer", str(a.issuing), "-cert", str(cert), "-url", a.endpoint + "/ocsp",
                            "-CAfile", str(a.chain), "-no_nonce"], capture_output=True, text=True, timeout=30)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith(str(cert) + ":")), "")
        status = line.split(":", 1)[1].strip() if line else (r.stderr.strip()[-200:] or "no answer")
        if status == want:
            return status
        time.sleep(0.3)
    return status


def first_cert(pem_chain: Path, out: Path) -> Path:
    text = pem_chain.read_text()
    end = "-----END CERTIFICATE-----"
    out.write_text(text[: text.index(end) + len(end)] + "\n")
    return out


@pytest.mark.slow  # `just acme-clients`; the short version in `just test`: test_acme_ip_identifier_...
def test_certbot_standalone_http01_revoke_ari_renewal_profiles(gw, tmp_path):
    from tests.acmeenv import CERTBOT, clean_env
    d = tmp_path / "certbot"
    env = clean_env(REQUESTS_CA_BUNDLE=str(gw.chain))
    common = ["--server", acme_directory(gw), "--config-dir", str(d / "conf"), "--work-dir", str(d / "work"),
              "--logs-dir", str(d / "logs"), "--non-interactive"]

    def certbot(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([CERTBOT, *args, *common], env=env, capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, f"certbot {' '.join(args)}:\n{r.stdout}\n{r.stderr}\n{gw.log.read_text()[-3000:]}"
        return r
    certbot("register", "--agree-tos", "--register-unsafely-without-email")
    certbot("certonly", "--standalone", "--http-01-address", "127.0.0.1", "--http-01-port", str(gw.http_port),
            "-d", "certbot.donjon.test", "--cert-name", "cb", "--required-profile", "classic", "--key-type", "ecdsa")
    live = d / "conf" / "live" / "cb"
    text = verify(gw, live / "cert.pem")
    assert "DNS:certbot.donjon.test" in text and "CRL Distribution Points" in text and "OCSP - URI" in text
    assert ocsp_status(gw, live / "cert.pem", "good") == "good"
    first = (live / "cert.pem").read_text()
    # Revocation with the account key: OCSP says revoked; ARI then moves the renewal window to now, and a
    # plain `certbot renew` (no --force-renewal: certbot renews when renewalInfo says so) gets a new one.
    certbot("revoke", "--cert-path", str(live / "cert.pem"), "--reason", "keycompromise", "--no-delete-after-revoke")
    assert ocsp_status(gw, live / "cert.pem", "revoked") == "revoked"
    r = certbot("renew", "--no-random-sleep-on-renew", "--cert-name", "cb", "--standalone", "--http-01-address", "127.0.0.1",
                "--http-01-port", str(gw.http_port))
    assert (live / "cert.pem").read_text() != first, r.stdout
    verify(gw, live / "cert.pem")
    assert ocsp_status(gw, live / "cert.pem", "good") == "good"
    assert "gateway/acme:" in gw.cli("audit", "export").stdout.decode()
    # The short-lived profile: no CRL DP, no AIA, at most 7 days.
    certbot("certonly", "--standalone", "--http-01-address", "127.0.0.1", "--http-01-port", str(gw.http_port),
            "-d", "short.donjon.test", "--cert-name", "short", "--required-profile", "shortlived", "--key-type", "ecdsa")
    text = verify(gw, d / "conf" / "live" / "short" / "cert.pem")
    assert "CRL Distribution Points" not in text and "OCSP - URI" not in text


def _lego(gw: Appliance, path: Path, *args: str, eab: tuple[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    from tests.acmeenv import clean_env
    env = clean_env(LEGO_CA_CERTIFICATES=str(gw.chain), RFC2136_NAMESERVER=gw.knot.server, RFC2136_PROPAGATION_TIMEOUT="10",
                    RFC2136_POLLING_INTERVAL="1")
    argv = ["lego", "--server", acme_directory(gw), "--path", str(path), "--email", "lego@donjon.test", "--accept-tos",
            "--key-type", "ec256"]
    if eab:
        argv += ["--eab", "--kid", eab[0], "--hmac", eab[1]]
    r = subprocess.run(argv + list(args), env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"lego {' '.join(args)}:\n{r.stdout}\n{r.stderr}\n{gw.log.read_text()[-3000:]}"
    return r


@pytest.mark.slow  # `just acme-clients`; the short version in `just test`: test_acme_ip_identifier_...
def test_lego_http01_tlsalpn01_dns01_renew_revoke(gw, tmp_path):
    path = tmp_path / "lego"
    ways = {"lego-http.donjon.test": ["--http", "--http.port", f"127.0.0.1:{gw.http_port}"],
            "lego-alpn.donjon.test": ["--tls", "--tls.port", f"127.0.0.1:{gw.alpn_port}"],
            "*.lego-dns.donjon.test": ["--dns", "rfc2136", "--dns.resolvers", gw.knot.server, "--dns.disable-cp"]}
    for name, how in ways.items():
        _lego(gw, path, "-d", name, *how, "run")
        crt = path / "certificates" / (name.replace("*", "_") + ".crt")
        leaf = first_cert(crt, tmp_path / "leaf.pem")
        assert f"DNS:{name}" in verify(gw, leaf)
        assert ocsp_status(gw, leaf, "good") == "good"
    # Renew (forced by --days) and revoke the http-01 one.
    name, how = "lego-http.donjon.test", ways["lego-http.donjon.test"]
    before = (path / "certificates" / f"{name}.crt").read_text()
    _lego(gw, path, "-d", name, *how, "renew", "--days", "1000", "--no-random-sleep")  # forced: the window is far off
    assert (path / "certificates" / f"{name}.crt").read_text() != before
    leaf = first_cert(path / "certificates" / f"{name}.crt", tmp_path / "renewed.pem")
    verify(gw, leaf)
    _lego(gw, path, "-d", name, "revoke")
    assert ocsp_status(gw, leaf, "revoked") == "revoked"
    # A wildcard is only validated through dns-01: http-01 is not even offered for it.
    r = _lego(gw, path, "-d", "*.nohttp.donjon.test", *ways["lego-http.donjon.test"], "run", check=False)
    assert r.returncode != 0 and not (path / "certificates" / "_.nohttp.donjon.test.crt").exists()


@pytest.mark.slow  # `just acme-clients`; the short version in `just test`: test_acme_ip_identifier_...
def test_lego_with_eab_made_by_an_officer(gw, tmp_path):
    doc = json.loads(gw.cli("acme", "eab-add", "--name", "*.eab.donjon.test", "--profile", "classic", "--json",
                            officer="admin").stdout)
    kid, key = doc["eab"]["kid"], doc["hmac_key"]
    path = tmp_path / "lego-eab"
    http = ["--http", "--http.port", f"127.0.0.1:{gw.http_port}"]
    _lego(gw, path, "-d", "a.eab.donjon.test", *http, "run", eab=(kid, key))
    verify(gw, first_cert(path / "certificates" / "a.eab.donjon.test.crt", tmp_path / "eab.pem"))
    # The key's name patterns bind its account: another name is refused, nothing issued.
    r = _lego(gw, path, "-d", "other.donjon.test", *http, "run", check=False)
    assert r.returncode != 0 and "rejectedIdentifier" in r.stdout + r.stderr
    # A second account cannot reuse the key; a wrong HMAC is refused.
    r = _lego(gw, tmp_path / "lego-eab2", "-d", "b.eab.donjon.test", *http, "run", eab=(kid, key), check=False)
    assert r.returncode != 0 and "bound to another account" in r.stdout + r.stderr
    listed = json.loads(gw.cli("acme", "eab-list", "--json").stdout)["keys"]
    assert any(k["kid"] == kid and k.get("account") for k in listed)
    # Revoked by an officer: the account obtains nothing more.
    gw.cli("acme", "eab-revoke", kid, officer="admin")
    r = _lego(gw, path, "-d", "c.eab.donjon.test", *http, "run", check=False)
    assert r.returncode != 0 and not (path / "certificates" / "c.eab.donjon.test.crt").exists()
    audit = gw.cli("audit", "export").stdout.decode()
    assert "acme-eab-add" in audit and "eab-bind" in audit and "acme-eab-revoke" in audit


UACME_HOOK = """#!/bin/sh
# uacme's challenge hook: METHOD TYPE IDENT TOKEN AUTH; http-01 only (a non-zero answer declines the type).
case "$1:$2" in
  begin:http-01) printf '%s' "$5" > "{root}/.well-known/acme-challenge/$4"; exit 0;;
  done:http-01|failed:http-01) rm -f "{root}/.well-known/acme-challenge/$4"; exit 0;;
  *) exit 1;;
esac
"""


@pytest.mark.slow  # `just acme-clients`; the short version in `just test`: test_acme_ip_identifier_...
def test_uacme_http01_hook_key_rollover_renew_revoke(gw, tmp_path):
    """uacme (libcurl with GnuTLS, no CA option): run in a private mount namespace where the system
    trust store is the test root, so nothing of the machine's own trust changes."""
    from tests.acmeenv import WebRoot, clean_env
    root, conf = tmp_path / "www", tmp_path / "uacme"
    web = WebRoot(root, gw.http_port).start()
    hook = tmp_path / "hook.sh"
    hook.write_text(UACME_HOOK.replace("{root}", str(root)))
    hook.chmod(0o755)
    bundle = tmp_path / "trust.pem"
    bundle.write_text(gw.chain.read_text())

    def uacme(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        inner = " ".join(["uacme", "-v", "-a", acme_directory(gw), "-c", str(conf), "-h", str(hook), "-t", "EC", *args])
        r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {bundle} /etc/ssl/certs/ca-certificates.crt && exec {inner}"],
                           env=clean_env(), capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, f"uacme {' '.join(args)}:\n{r.stdout}\n{r.stderr[-3000:]}\n{gw.log.read_text()[-2000:]}"
        return r
    try:
        uacme("-y", "new", "uacme@donjon.test")
        uacme("newkey")  # account key rollover (RFC 8555 §7.3.5)
        uacme("issue", "uacme.donjon.test")
        cert = conf / "uacme.donjon.test" / "cert.pem"
        leaf = first_cert(cert, tmp_path / "leaf.pem")
        assert "DNS:uacme.donjon.test" in verify(gw, leaf)
        assert ocsp_status(gw, leaf, "good") == "good"
        before = cert.read_text()
        uacme("-f", "issue", "uacme.donjon.test")  # renew (forced), with the rolled-over key
        assert cert.read_text() != before
        leaf = first_cert(cert, tmp_path / "renewed.pem")
        verify(gw, leaf)
        uacme("revoke", str(cert))
        assert ocsp_status(gw, leaf, "revoked") == "revoked"
    finally:
        web.stop()


@pytest.mark.slow  # `just acme-clients`; the short version in `just test`: test_acme_ip_identifier_...
def test_dehydrated_http01_renew_revoke(gw, tmp_path):
    from tests.acmeenv import WebRoot, clean_env
    root, base = tmp_path / "www", tmp_path / "dehydrated"
    web = WebRoot(root, gw.http_port).start()
    base.mkdir()
    cfg = base / "config"
    cfg.write_text(f'CA="{acme_directory(gw)}"\nCHALLENGETYPE="http-01"\nWELLKNOWN="{root}/.well-known/acme-challenge"\n'
                   f'BASEDIR="{base}"\nKEY_ALGO="prime256v1"\nCONTACT_EMAIL="dehydrated@donjon.test"\n')
    env = clean_env(CURL_CA_BUNDLE=str(gw.chain))

    def dehydrated(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(["dehydrated", "--config", str(cfg), *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"dehydrated {' '.join(args)}:\n{r.stdout}\n{r.stderr}\n{gw.log.read_text()[-2000:]}"
        return r
    try:
        dehydrated("--register", "--accept-terms")
        dehydrated("-c", "-d", "dehydrated.donjon.test")
        cert = base / "certs" / "dehydrated.donjon.test" / "cert.pem"
        assert "DNS:dehydrated.donjon.test" in verify(gw, cert)
        assert ocsp_status(gw, cert, "good") == "good"
        first = cert.resolve().read_text()
        dehydrated("-c", "-x", "-d", "dehydrated.donjon.test")  # forced renewal
        assert cert.resolve().read_text() != first
        verify(gw, cert)
        kept = tmp_path / "revoked.pem"  # dehydrated renames what it revoked
        kept.write_text(cert.resolve().read_text())
        dehydrated("-r", str(cert.resolve()))
        assert ocsp_status(gw, kept, "revoked") == "revoked"
    finally:
        web.stop()


def issued_count(a: Appliance) -> int:
    return len(json.loads(a.cli("cert", "list", "--json").stdout))


def test_acme_refusals_are_problem_documents_and_issue_nothing(gw, tmp_path):
    """Replayed nonce, wrong JWS url, key mismatch, a failed challenge, an identifier outside policy, a
    CSR whose names differ, a deactivated account, validation towards a private address: each gets
    its RFC 7807 problem type and no certificate is issued."""
    from tests.acmeclient import Client, b64, csr_for
    from tests.acmeenv import WebRoot
    web = WebRoot(tmp_path / "www", gw.http_port).start()
    clients = contextlib.ExitStack()
    try:
        before = issued_count(gw)
        c = clients.enter_context(Client(acme_directory(gw), str(gw.chain)))
        assert c.register().status == 201
        # Replayed nonce.
        nonce = c.new_nonce()
        r = c.post(c.dir["newOrder"], {"identifiers": [{"type": "dns", "value": "n1.donjon.test"}]}, nonce=nonce)
        assert r.status == 201
        r = c.post(c.dir["newOrder"], {"identifiers": [{"type": "dns", "value": "n1.donjon.test"}]}, nonce=nonce)
        assert (r.status, r.problem) == (400, "badNonce") and r.headers.get("replay-nonce")
        # The url in the JWS is not the resource's.
        r = c.post(c.dir["newOrder"], {"identifiers": [{"type": "dns", "value": "n2.donjon.test"}]}, url_in_jws=c.dir["newAccount"])
        assert (r.status, r.problem) == (403, "unauthorized")
        # Key mismatch: this account's kid, another key's signature.
        from cryptography.hazmat.primitives.asymmetric import ec
        r = c.post(c.dir["newOrder"], {"identifiers": [{"type": "dns", "value": "n3.donjon.test"}]}, key=ec.generate_private_key(ec.SECP256R1()))
        assert (r.status, r.problem) == (400, "malformed") and "signature" in r.json()["detail"]
        # Outside the name policy (gateway.acme.name-patterns).
        r = c.order(["www.example.org", "ok.donjon.test"])
        assert (r.status, r.problem) == (400, "rejectedIdentifier")
        assert [s["identifier"]["value"] for s in r.json()["subproblems"]] == ["www.example.org"]
        # A failed challenge: the wrong key authorization is served.
        r = c.order(["wrong.donjon.test"])
        order, url = r.json(), r.headers["location"]
        z = c.post(order["authorizations"][0], None).json()
        ch = next(x for x in z["challenges"] if x["type"] == "http-01")
        (tmp_path / "www" / ".well-known" / "acme-challenge" / ch["token"]).write_text("not-the-token.x")
        c.post(ch["url"], {})
        z = c.wait(order["authorizations"][0], ("valid", "invalid"))
        assert z["status"] == "invalid" and z["challenges"][0]["error"]["type"].endswith(":incorrectResponse")
        order = c.wait(url, ("invalid",))
        r = c.post(order["finalize"], {"csr": b64(csr_for(["wrong.donjon.test"])[0])})
        assert (r.status, r.problem) == (403, "orderNotReady")
        # Validation never goes to an address outside the allowed networks (10/8 is not listed).
        gw.knot.update("update add private.donjon.test. 0 A 10.1.2.3")
        r = c.order(["private.donjon.test"])
        z = c.post(r.json()["authorizations"][0], None).json()
        ch = next(x for x in z["challenges"] if x["type"] == "http-01")
        c.post(ch["url"], {})
        z = c.wait(r.json()["authorizations"][0], ("valid", "invalid"))
        assert z["status"] == "invalid" and "may not reach" in z["challenges"][0]["error"]["detail"]
        # A CSR whose names differ from the order's.
        r = c.order(["csr.donjon.test"])
        order, url = r.json(), r.headers["location"]
        z = c.post(order["authorizations"][0], None).json()
        ch = next(x for x in z["challenges"] if x["type"] == "http-01")
        (tmp_path / "www" / ".well-known" / "acme-challenge" / ch["token"]).write_text(c.key_authorization(ch["token"]))
        c.post(ch["url"], {})
        assert c.wait(url, ("ready", "invalid"))["status"] == "ready"
        r = c.post(order["finalize"], {"csr": b64(csr_for(["csr.donjon.test", "extra.donjon.test"])[0])})
        assert (r.status, r.problem) == (400, "badCSR")
        # A deactivated account gets nothing more.
        assert c.post(c.kid, {"status": "deactivated"}).json()["status"] == "deactivated"
        r = c.post(order["finalize"], {"csr": b64(csr_for(["csr.donjon.test"])[0])})
        assert (r.status, r.problem) == (403, "unauthorized")
        r = c.order(["again.donjon.test"])
        assert (r.status, r.problem) == (403, "unauthorized")
        # Not JOSE, an unknown algorithm, a bad profile, an unknown account.
        r = c._request("POST", c.dir["newOrder"], b"{}", ctype="application/json")
        assert (r.status, r.problem) == (415, "malformed")
        d = clients.enter_context(Client(acme_directory(gw), str(gw.chain)))
        assert d.register().status == 201
        r = d.order(["p.donjon.test"], profile="nope")
        assert (r.status, r.problem) == (400, "invalidProfile")
        d.kid = d.kid.rsplit("/", 1)[0] + "/999999999"
        r = d.order(["p.donjon.test"])
        assert (r.status, r.problem) == (400, "accountDoesNotExist")
        assert issued_count(gw) == before
    finally:
        clients.close()
        web.stop()


def test_acme_ip_identifier_replaces_and_ari(gw, tmp_path):
    """RFC 8738: an IP identifier through http-01; RFC 9773: renewalInfo of the certificate, and a
    new order that `replaces` it (once); revocation with the certificate's key. The short version of
    the real clients' scenario (issue, verify, OCSP good, renew, revoke, OCSP revoked) for `just test`."""
    from tests.acmeclient import Client
    from tests.acmeenv import WebRoot
    web = WebRoot(tmp_path / "www", gw.http_port).start()
    c = Client(acme_directory(gw), str(gw.chain))
    try:
        assert c.register().status == 201
        order, pem = c.issue_http01(["127.0.0.1", "ip.donjon.test"], tmp_path / "www")
        first_key = c.last_cert_key
        (tmp_path / "ip.pem").write_text(pem)
        leaf = first_cert(tmp_path / "ip.pem", tmp_path / "leaf.pem")
        assert "IP Address:127.0.0.1" in verify(gw, leaf)
        from cryptography import x509
        cert = x509.load_pem_x509_certificate(leaf.read_bytes())
        from appliance.gateway.acme.service import ari_id
        cid = ari_id(cert)
        r = c.get(c.dir["renewalInfo"] + "/" + cid)
        w = r.json()["suggestedWindow"]
        assert r.status == 200 and r.headers.get("retry-after") and w["start"] < w["end"]
        assert w["start"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 86400))  # far off
        order2, _ = c.issue_http01(["127.0.0.1", "ip.donjon.test"], tmp_path / "www", replaces=cid)
        assert order2["replaces"] == cid
        r = c.order(["127.0.0.1"], replaces=cid)
        assert (r.status, r.problem) == (409, "conflict")
        assert "replaces " + cid in gw.cli("audit", "export").stdout.decode()
        assert c.get(c.dir["renewalInfo"] + "/AAAA.AAAA").status == 404
        # Revocation signed with the certificate's own key (no account): OCSP says revoked.
        assert ocsp_status(gw, leaf, "good") == "good"
        from cryptography.hazmat.primitives.serialization import Encoding

        from tests.acmeclient import b64
        r = c.post(c.dir["revokeCert"], {"certificate": b64(cert.public_bytes(Encoding.DER))}, key=c.last_cert_key, use_jwk=True)
        assert (r.status, r.problem) == (403, "unauthorized")  # another certificate's key
        cert_key = first_key
        r = c.post(c.dir["revokeCert"], {"certificate": b64(cert.public_bytes(Encoding.DER)),
                                         "reason": 1}, key=cert_key, use_jwk=True)
        assert r.status == 200, r.body
        assert ocsp_status(gw, leaf, "revoked") == "revoked"
        r = c.post(c.dir["revokeCert"], {"certificate": b64(cert.public_bytes(Encoding.DER))},
                   key=cert_key, use_jwk=True)
        assert (r.status, r.problem) == (400, "alreadyRevoked")
    finally:
        c.close()
        web.stop()


def test_a_fuzzed_jws_corpus_never_crashes_the_gateway(gw):
    """Mutated JWS/JSON bodies at every POST resource (bounded: 300 requests, fixed seed): each answer
    is a problem document, none a 500, and the gateway process is the same one afterwards."""
    import random

    from tests.acmeclient import Client, jwk, sign
    rnd = random.Random(16)
    pid = gw.role_pids()["gateway"]
    with Client(acme_directory(gw), str(gw.chain)) as c:
        assert c.register().status == 201
        urls = [c.dir["newAccount"], c.dir["newOrder"], c.dir["revokeCert"], c.dir["keyChange"], c.kid, c.kid + "/orders",
                c.dir["newOrder"].replace("new-order", "order/x/finalize"), c.dir["newOrder"].replace("new-order", "chall/x/0")]
        odd = [None, 0, -1, True, "", "A" * 3000, [], {}, {"identifiers": [{"type": "dns", "value": "*.*.x"}]},
               {"identifiers": [{"type": "ip", "value": "::ffff:1.2.3.4"}] * 101}, {"csr": "AAAA"}, {"certificate": "!!"}]
        statuses = set()
        for _ in range(300):
            url = rnd.choice(urls)
            prot: dict = {"alg": "ES256", "nonce": c.nonce or c.new_nonce(), "url": url}
            if rnd.random() < 0.3:
                prot["jwk"] = jwk(c.key)
            else:
                prot["kid"] = c.kid
            payload = json.dumps(rnd.choice(odd)).encode()
            raw = bytearray(sign(c.key, prot, payload))
            if rnd.random() < 0.5:
                for _ in range(rnd.randrange(1, 6)):
                    raw[rnd.randrange(len(raw))] = rnd.randrange(32, 127)
            c.nonce = None
            r = c.post(url, None, raw=bytes(raw))
            statuses.add(r.status)
            assert r.status < 500, (r.status, r.body[:300])
            assert r.status in (200, 201) or r.problem, r.body[:300]
        assert len(statuses) > 1
    assert gw.role_pids()["gateway"] == pid
    assert curl(gw, "/acme/directory")[0] == 200

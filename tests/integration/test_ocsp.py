"""The appliance's OCSP and CRL endpoint, judged by openssl and curl: pre-produced responses for
every certificate, revocation visible within a bound, CRLs fetched through the CRL DP, and serving
from the endpoint's own store while the CA is not activated."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from policy import lint
from tests.conftest import make_csr, openssl

BOUND = 20.0  # seconds: issuance/revocation to a served response (debounce + one CIS batch + push)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _setup(appliance_factory, tmp_path, workers: int = 1, ocsp: str = "", extra: str = ""):
    port = _free_port()
    a = appliance_factory(start=False)
    # The CRL DP and AIA URLs must name where the endpoint listens.
    cfg = a.home / "donjon.toml"
    cfg.write_text(f'[ocsp]\nlisten = "127.0.0.1:{port}"\nworkers = {workers}\n{ocsp}[endpoint]\nbase-url = "http://127.0.0.1:{port}"\n{extra}')
    a.start()
    root = a.export("root", tmp_path / "root.pem")
    issuing = a.export("issuing", tmp_path / "issuing.pem")
    chain = a.export("issuing", tmp_path / "chain.pem", chain=True)
    return a, root, issuing, chain


def _issue(a, tmp_path, name):
    csr = make_csr(tmp_path, name, san=f"DNS:{name}.example.org")
    out = tmp_path / f"{name}.pem"
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(out))
    return out


def _ask(a, issuing, chain, cert, *extra) -> subprocess.CompletedProcess:
    return openssl("ocsp", "-issuer", str(issuing), "-cert", str(cert), "-url", f"{a.endpoint}/ocsp",
                   "-CAfile", str(chain), *extra, check=False)


def _wait_for(a, issuing, chain, cert, word: str, *extra) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + BOUND
    while True:
        r = _ask(a, issuing, chain, cert, *extra)
        if r.returncode == 0 and f": {word}".encode() in r.stdout:
            return r
        assert time.monotonic() < deadline, f"no '{word}' within {BOUND}s:\n{r.stdout.decode()}\n{r.stderr.decode()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def box(module_appliance_factory, tmp_path_factory):
    """One appliance for the tests that each issue, revoke and ask about their own certificates only."""
    return _setup(module_appliance_factory, tmp_path_factory.mktemp("ocsp"))


def test_ocsp_good_then_revoked_and_crl_download(box, tmp_path):
    a, root, issuing, chain = box
    leaf = _issue(a, tmp_path, "www")
    r = _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")
    assert b"Response verify OK" in r.stderr
    r = _ask(a, issuing, chain, leaf)  # with a nonce: a pre-produced response carries none, still verifies
    assert r.returncode == 0 and b": good" in r.stdout

    # The CRL through the certificate's own CRL DP, as a relying party would fetch it.
    r = openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(root), "-untrusted", str(issuing), str(leaf), check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    serial = format(x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number, "x")
    a.cli("revoke", "--ca", "issuing", serial, "--reason", "keyCompromise")
    r = _wait_for(a, issuing, chain, leaf, "revoked", "-no_nonce")
    assert b"Reason: keyCompromise" in r.stdout
    deadline = time.monotonic() + BOUND
    while True:
        r = openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(root), "-untrusted", str(issuing), str(leaf), check=False)
        if b"certificate revoked" in r.stdout + r.stderr:
            break
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.3)


def test_get_post_headers_and_lint(box, tmp_path):
    a, root, issuing, chain = box
    leaf = _issue(a, tmp_path, "api")
    _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")
    req = tmp_path / "req.der"
    openssl("ocsp", "-issuer", str(issuing), "-cert", str(leaf), "-no_nonce", "-reqout", str(req))
    post = subprocess.run(["curl", "-sS", "-D", "-", "-o", str(tmp_path / "post.der"), "--data-binary", f"@{req}",
                           "-H", "Content-Type: application/ocsp-request", f"{a.endpoint}/ocsp"], capture_output=True, timeout=30)
    headers = post.stdout.decode().lower()
    assert "200" in headers.splitlines()[0] and "content-type: application/ocsp-response" in headers
    import base64
    import urllib.parse
    b64 = urllib.parse.quote(base64.b64encode(req.read_bytes()).decode(), safe="")
    get = subprocess.run(["curl", "-sS", "-D", "-", "-o", str(tmp_path / "get.der"), f"{a.endpoint}/ocsp/{b64}"],
                         capture_output=True, timeout=30)
    gh = get.stdout.decode().lower()
    for h in ("cache-control: max-age=", "expires:", "last-modified:", "etag:"):
        assert h in gh, gh
    der = (tmp_path / "get.der").read_bytes()
    assert der == (tmp_path / "post.der").read_bytes()
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert lint.lint_ocsp_response(der) == []
    # The CA certificate and the CRL are served as DER.
    ca = subprocess.run(["curl", "-sSf", f"{a.endpoint}/ca/issuing.crt"], capture_output=True, timeout=30).stdout
    assert x509.load_der_x509_certificate(ca).public_bytes(serialization.Encoding.PEM) == issuing.read_bytes()
    crl = subprocess.run(["curl", "-sSf", f"{a.endpoint}/crl/issuing.crl"], capture_output=True, timeout=30).stdout
    x509.load_der_x509_crl(crl)


def test_never_good_for_a_serial_that_was_not_issued(box, tmp_path):
    a, root, issuing, chain = box
    r = openssl("ocsp", "-issuer", str(issuing), "-serial", "0x1234567890abcdef", "-url", f"{a.endpoint}/ocsp",
                "-CAfile", str(chain), "-no_nonce", check=False)
    out = (r.stdout + r.stderr).decode()
    assert ": good" not in out and "unauthorized" in out.lower(), out
    # An issuer the endpoint does not serve: unauthorized as well.
    other = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                            "-keyout", str(tmp_path / "o.key"), "-subj", "/CN=Other", "-out", str(tmp_path / "o.pem")],
                           capture_output=True)
    assert other.returncode == 0
    r = openssl("ocsp", "-issuer", str(tmp_path / "o.pem"), "-serial", "0x10", "-url", f"{a.endpoint}/ocsp", "-no_nonce", check=False)
    assert "unauthorized" in (r.stdout + r.stderr).decode().lower()


def test_endpoint_serves_its_store_while_the_ca_is_not_activated(appliance_factory, tmp_path):
    a, root, issuing, chain = _setup(appliance_factory, tmp_path)
    leaf = _issue(a, tmp_path, "keep")
    _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")
    assert a.stop() == 0
    a.start_inactive()
    r = _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")
    assert b"Response verify OK" in r.stderr
    st = a.cli("status", "--json").stdout
    assert b'"activated": false' in st


def test_endpoint_is_restarted_and_fed_again_when_it_dies(appliance_factory, tmp_path):
    import os
    a, root, issuing, chain = _setup(appliance_factory, tmp_path)
    first = _issue(a, tmp_path, "before")
    _wait_for(a, issuing, chain, first, "good", "-no_nonce")
    old = a.role_pids()["ocsp"]
    os.kill(old, 9)
    # The supervisor restarts it (stateless role) while the rest keeps running...
    deadline = time.monotonic() + BOUND
    while a.role_pids().get("ocsp") in (None, old):
        assert time.monotonic() < deadline and a.proc.poll() is None, a.log.read_text()
        time.sleep(0.2)
    # ...and a certificate issued afterwards is fed to the new endpoint over its new link.
    second = _issue(a, tmp_path, "after")
    _wait_for(a, issuing, chain, second, "good", "-no_nonce")
    _wait_for(a, issuing, chain, first, "good", "-no_nonce")
    assert "notify role-died ocsp" in a.log.read_text()


def test_delegated_responder_answers_several_certificates_and_echoes_the_nonce(appliance_factory, tmp_path):
    a, root, issuing, chain = _setup(appliance_factory, tmp_path)
    one, two = _issue(a, tmp_path, "one"), _issue(a, tmp_path, "two")
    _wait_for(a, issuing, chain, two, "good", "-no_nonce")
    a.cli("revoke", "--ca", "issuing", format(x509.load_pem_x509_certificate(two.read_bytes()).serial_number, "x"),
          "--reason", "superseded")
    _wait_for(a, issuing, chain, two, "revoked", "-no_nonce")
    # Without a delegated responder, two CertIDs in one request cannot be answered.
    r = openssl("ocsp", "-issuer", str(issuing), "-cert", str(one), "-cert", str(two), "-url", f"{a.endpoint}/ocsp",
                "-CAfile", str(chain), check=False)
    assert "unauthorized" in (r.stdout + r.stderr).decode().lower()
    resp_pem = tmp_path / "responder.pem"
    a.cli("ocsp", "responder-cert", "--ca", "issuing", "--out", str(resp_pem))
    rc = x509.load_pem_x509_certificate(resp_pem.read_bytes())
    assert x509.ExtendedKeyUsageOID.OCSP_SIGNING in rc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    deadline = time.monotonic() + BOUND
    while True:  # two certificates and a nonce: signed live by the responder key, nonce echoed
        r = openssl("ocsp", "-issuer", str(issuing), "-cert", str(one), "-cert", str(two), "-serial", "0x123456789",
                    "-url", f"{a.endpoint}/ocsp", "-CAfile", str(chain), check=False)
        if r.returncode == 0 and b"Response verify OK" in r.stderr:
            break
        assert time.monotonic() < deadline, (r.stdout + r.stderr).decode()
        time.sleep(0.3)
    out = r.stdout.decode()
    assert f"{one}: good" in out and f"{two}: revoked" in out and "0x123456789: unknown" in out, out
    assert "WARNING: no nonce" not in r.stderr.decode()
    resp = tmp_path / "live.der"
    openssl("ocsp", "-issuer", str(issuing), "-cert", str(one), "-url", f"{a.endpoint}/ocsp", "-CAfile", str(chain),
            "-respout", str(resp))
    assert lint.lint_ocsp_response(resp.read_bytes()) == []
    # The key lives in the endpoint's own token, not in the CA token: the CIS holds no responder key.
    assert (a.home / "ocsp-token" / "tokens").is_dir()


def test_unissued_policy_per_local_ca(appliance_factory, tmp_path):
    from asn1crypto import ocsp as a_ocsp
    a, root, issuing, chain = _setup(appliance_factory, tmp_path, ocsp='unissued = "unknown"\n',
                                     extra='[ocsp.unissued-by-ca]\nissuing = "revoked"\n')
    leaf = _issue(a, tmp_path, "real")
    _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")

    def never(ca_pem, *extra):
        return openssl("ocsp", "-issuer", str(ca_pem), "-serial", "0xabcdef0123456789", "-url", f"{a.endpoint}/ocsp",
                       "-CAfile", str(root), *extra, check=False)
    # Without a delegated responder nothing can be signed live: unauthorized, as before.
    assert b"unauthorized" in (never(issuing, "-no_nonce").stdout + never(issuing, "-no_nonce").stderr).lower()
    a.cli("ocsp", "responder-cert", "--ca", "issuing")
    a.cli("ocsp", "responder-cert", "--ca", "root")
    deadline = time.monotonic() + BOUND
    while True:
        r = never(issuing, "-no_nonce", "-respout", str(tmp_path / "ext.der"))
        if b": revoked" in r.stdout:
            break
        assert time.monotonic() < deadline, (r.stdout + r.stderr).decode()
        time.sleep(0.3)
    assert b"Response verify OK" in r.stderr and b"Reason: certificateHold" in r.stdout, r.stdout + r.stderr
    assert b"Revocation Time: Jan  1 00:00:00 1970 GMT" in r.stdout
    der = (tmp_path / "ext.der").read_bytes()
    exts = a_ocsp.OCSPResponse.load(der).basic_ocsp_response["tbs_response_data"]["response_extensions"]
    assert [e["extn_id"].native for e in exts] == ["extended_revoke"]
    assert lint.lint_ocsp_response(der) == []
    # The issued certificate still gets its pre-produced `good`, also next to an unissued serial.
    r = openssl("ocsp", "-issuer", str(issuing), "-cert", str(leaf), "-serial", "0x1234", "-url", f"{a.endpoint}/ocsp",
                "-CAfile", str(chain), check=False)
    assert f"{leaf}: good".encode() in r.stdout and b"0x1234: revoked" in r.stdout, r.stdout + r.stderr
    # The root follows the default policy: unknown.
    r = never(root)
    assert b"0xabcdef0123456789: unknown" in r.stdout and b"Response verify OK" in r.stderr, r.stdout + r.stderr


def test_several_endpoint_processes_share_the_listener(appliance_factory, tmp_path):
    import os
    a, root, issuing, chain = _setup(appliance_factory, tmp_path, workers=2)
    pids = a.role_pids()
    assert {"ocsp", "ocsp.1"} <= set(pids)
    leaf = _issue(a, tmp_path, "both")
    for _ in range(20):  # whichever process accepts, the answer is the same
        _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")
    for store in ("ocsp", "ocsp.1"):  # each process keeps its own store
        assert any((a.home / store).iterdir())
    os.kill(pids["ocsp.1"], 9)
    deadline = time.monotonic() + BOUND
    while a.role_pids().get("ocsp.1") in (None, pids["ocsp.1"]):
        assert time.monotonic() < deadline and a.proc.poll() is None, a.log.read_text()
        time.sleep(0.2)
    later = _issue(a, tmp_path, "later")
    for _ in range(20):
        _wait_for(a, issuing, chain, later, "good", "-no_nonce")
    st = a.cli("ocsp", "status", "--json").stdout
    assert b'"ocsp.1"' in st and b'"ocsp"' in st

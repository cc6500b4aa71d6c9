"""EST (RFC 7030) and SCEP (RFC 8894) on the gateway, judged by curl + openssl, micromdm's scepclient and certmonger."""

from __future__ import annotations

import base64
import email
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import Appliance, _variant, copy_home, make_ceremony
from tests.integration.test_gateway import gateway_url, wait_https

TOML = """
[gateway]
enabled = true
listen = "127.0.0.1:0"
protocols = ["est", "scep"]
tls-names = ["gw.donjon.test", "127.0.0.1"]
[gateway.estscep]
# Debian's scepclient (micromdm 2.1.0) encrypts with DES and signs with SHA-1 only, whatever GetCACaps
# says: allowed here, refused by default (tests/unit/test_scep_messages.py).
scep-allow-des = true
scep-allow-weak-digest = true
"""


@pytest.fixture(scope="module")
def gw(src_path, home_templates):
    """One appliance with EST and SCEP on, for the whole module."""
    base = Path(tempfile.mkdtemp(prefix="donjon-estscep-"))
    os.chmod(base, 0o711)
    # An RSA issuing CA: scepclient encrypts to every certificate GetCACert returns, and RSA only
    ceremony = make_ceremony(base / "ceremony.toml", issuing_key="rsa2048")
    t = home_templates((*_variant(ceremony, TOML, None, None, None), 0), ceremony, None, None, TOML, None)
    a = Appliance(base / "gw", src_path)
    copy_home(t.home, a.home)
    a.template, a.officers = t.home, dict(t.officers)
    try:
        a.start()
        a.base = base
        a.chain = a.export("root", base / "root.pem")
        a.issuing = a.export("issuing", base / "issuing.pem")
        wait_https(a)
        deadline = time.monotonic() + 60
        while curl(a, "/scep?operation=GetCACert")[0] != 200:  # RA certificates issued, chain known
            assert time.monotonic() < deadline, a.log.read_text()[-3000:]
            time.sleep(0.2)
        yield a
    finally:
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


P10 = ("-H", "Content-Type: application/pkcs10")  # curl would say x-www-form-urlencoded


def url(a: Appliance, path: str = "") -> str:
    return gateway_url(a) + path  # https://127.0.0.1:PORT: the server certificate names the IP too


def curl(a: Appliance, path: str, *args: str) -> tuple[int, bytes]:
    r = subprocess.run(["curl", "-sS", "--cacert", str(a.chain), "-o", "-", "-w", "\n%{http_code}", *args, url(a, path)],
                       capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or 0), body


def run(*argv: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, input=input, timeout=120, env=env, cwd=cwd)


def secret(a: Appliance, protocol: str, *args: str) -> dict:
    return json.loads(a.cli("enrol-secret", "create", protocol, "--ca", "issuing", "--profile", "tls-client", "--json", *args).stdout)


def verify(a: Appliance, pem: Path, purpose: str = "sslclient") -> str:
    r = run("openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(a.chain), "-untrusted", str(a.issuing), str(pem))
    assert r.returncode == 0, r.stdout + r.stderr
    return run("openssl", "x509", "-noout", "-subject", "-serial", "-in", str(pem)).stdout.decode()


def p7_to_pem(body: bytes, out: Path) -> Path:
    """EST answers base64 PKCS#7 certs-only: decoded and read by openssl."""
    (out.with_suffix(".p7")).write_bytes(base64.b64decode(body))
    r = run("openssl", "pkcs7", "-inform", "DER", "-in", str(out.with_suffix(".p7")), "-print_certs", "-out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def csr_b64(tmp: Path, name: str, cn: str, key: Path | None = None) -> tuple[Path, Path]:
    key = key or tmp / f"{name}.key"
    if not key.exists():
        assert run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)).returncode == 0
    der = run("openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-outform", "DER").stdout
    (tmp / f"{name}.b64").write_bytes(base64.encodebytes(der))
    return tmp / f"{name}.b64", key


# ---------------------------------------------------------------------------------------------- EST


def test_est_with_curl_and_openssl(gw, tmp_path):
    # /cacerts: the issuing CA and the root, certs-only PKCS#7
    code, body = curl(gw, "/.well-known/est/cacerts")
    assert code == 200, body
    cas = p7_to_pem(body, tmp_path / "cacerts.pem").read_text()
    assert "Donjon Test Issuing CA" in cas and "Donjon Test Root CA" in cas
    # /csrattrs
    code, body = curl(gw, "/.well-known/est/csrattrs")
    assert code == 200
    (tmp_path / "attrs.der").write_bytes(base64.b64decode(body))
    assert b"challengePassword" in run("openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "attrs.der")).stdout
    # /simpleenroll with HTTP Basic (an officer's enrolment secret)
    s = secret(gw, "est", "--ref", "router-1", "--uses", "2")
    req, key = csr_b64(tmp_path, "r1", "router-1")
    code, body = curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-1:{s['secret']}", "-H", "Content-Type: application/pkcs10",
                      "--data-binary", f"@{req}")
    assert code == 200, body
    first = verify(gw, p7_to_pem(body, tmp_path / "r1.pem"))
    assert "CN = router-1" in first
    # /simplereenroll with the certificate just issued as the TLS client certificate
    req2, _ = csr_b64(tmp_path, "r1b", "router-1", key)
    code, body = curl(gw, "/.well-known/est/simplereenroll", "--cert", str(tmp_path / "r1.pem"), "--key", str(key),
                      "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{req2}")
    assert code == 200, body
    second = verify(gw, p7_to_pem(body, tmp_path / "r1b.pem"))
    assert "CN = router-1" in second and second != first
    # /serverkeygen: the key made by the gateway's token comes back with its certificate
    req3, _ = csr_b64(tmp_path, "r2", "router-2")
    s2 = secret(gw, "est", "--ref", "router-2")
    code, body = curl(gw, "/.well-known/est/serverkeygen", "-u", f"router-2:{s2['secret']}", *P10, "--data-binary", f"@{req3}", "-i")
    assert code == 200, body
    head, _, payload = body.partition(b"\r\n\r\n")
    ctype = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-type:")][0]
    parts = email.message_from_bytes(ctype + b"\r\n\r\n" + payload).get_payload()
    assert [p.get_content_type() for p in parts] == ["application/pkcs8", "application/pkcs7-mime"]
    (tmp_path / "kg.key").write_bytes(base64.b64decode(parts[0].get_payload()))
    kg = p7_to_pem(parts[1].get_payload().encode(), tmp_path / "kg.pem")
    assert "CN = router-2" in verify(gw, kg)
    pub_key = run("openssl", "pkey", "-inform", "DER", "-in", str(tmp_path / "kg.key"), "-pubout").stdout
    pub_cert = run("openssl", "x509", "-in", str(kg), "-noout", "-pubkey").stdout
    assert pub_key and pub_key == pub_cert  # the returned key is the certified one
    # the audit names the protocol and the credential
    audit = gw.cli("audit", "export").stdout.decode()
    assert "gateway/est:router-1" in audit and "enrol-secret-use" in audit


def test_est_refusals(gw, tmp_path):
    req, key = csr_b64(tmp_path, "x", "router-9")
    s = secret(gw, "est", "--ref", "router-9")
    for args, status in ((["-u", "router-9:WRONGWRONGWRONG", *P10], 401), ([*P10], 401), (["-u", f"router-8:{s['secret']}", *P10], 401),
                         (["-u", f"router-9:{s['secret']}", "-H", "Content-Type: text/plain"], 415)):
        code, body = curl(gw, "/.well-known/est/simpleenroll", *args, "--data-binary", f"@{req}")
        assert code == status, (args, code, body)
        assert b"Traceback" not in body and body.count(b"\n") <= 1
    # re-enrolment needs a client certificate; a malformed body is one line; GET is not a POST
    assert curl(gw, "/.well-known/est/simplereenroll", "--data-binary", f"@{req}")[0] == 401
    code, body = curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-9:{s['secret']}", *P10, "--data-binary", "!!!!")
    assert code == 400 and b"base64" in body
    assert curl(gw, "/.well-known/est/simpleenroll")[0] == 405
    assert curl(gw, "/.well-known/est/nope")[0] == 404
    # the secret is still good after all that (refusals before the Factory spend nothing) and then spent
    assert curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-9:{s['secret']}", *P10, "--data-binary", f"@{req}")[0] == 200
    code, body = curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-9:{s['secret']}", *P10, "--data-binary", f"@{req}")
    assert code == 401 and b"already used" in body
    audit = gw.cli("audit", "export").stdout.decode()
    assert '"est-enrol"' in audit and "secret already used" in audit and s["secret"] not in audit


# ---------------------------------------------------------------------------------------------- SCEP


def scepclient(a: Appliance, tmp: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSL_CERT_FILE": str(a.chain)}  # Go's TLS trusts the appliance's root
    # its default subject has C=US, which the tls-client profile does not take
    return run("scepclient", "-server-url", url(a, "/scep"), "-private-key", str(tmp / f"{name}.key"),
               "-certificate", str(tmp / f"{name}.pem"), "-country", "", "-organization", "Donjon Test", "-ou", "devices",
               *args, env=env, cwd=tmp)


def ra_fingerprint(a: Appliance, tmp: Path) -> str:
    """SHA-256 of the RA decryption certificate in GetCACert: scepclient encrypts to the certificate
    with this fingerprint (else to every certificate of the answer, EC CAs included, which it cannot)."""
    code, body = curl(a, "/scep?operation=GetCACert")
    assert code == 200
    (tmp / "ca-ra.p7").write_bytes(body)
    pems = run("openssl", "pkcs7", "-inform", "DER", "-in", str(tmp / "ca-ra.p7"), "-print_certs").stdout.decode()
    for block in pems.split("-----END CERTIFICATE-----")[:-1]:
        pem = block[block.index("-----BEGIN CERTIFICATE-----"):] + "-----END CERTIFICATE-----\n"
        text = run("openssl", "x509", "-noout", "-subject", "-fingerprint", "-sha256", input=pem.encode()).stdout.decode()
        if "RA decryption" in text:
            return text.split("Fingerprint=")[1].strip().replace(":", "").lower()
    raise AssertionError(pems)


def test_scep_with_micromdm_scepclient(gw, tmp_path):
    code, body = curl(gw, "/scep?operation=GetCACaps")
    assert code == 200 and {"AES", "SHA-256", "POSTPKIOperation", "Renewal"} <= set(body.decode().split())
    s = secret(gw, "scep")
    r = scepclient(gw, tmp_path, "dev1", "-cn", "device-1", "-challenge", s["secret"])
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode() + gw.cli("audit", "export").stdout.decode()[-2000:]
    assert "CN = device-1" in verify(gw, tmp_path / "dev1.pem")

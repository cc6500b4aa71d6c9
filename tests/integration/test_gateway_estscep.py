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
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import Appliance
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
def gw(module_appliance_factory):
    """One appliance with EST and SCEP on, for the whole module."""
    base = Path(tempfile.mkdtemp(prefix="donjon-estscep-"))
    os.chmod(base, 0o711)
    # An RSA issuing CA: scepclient encrypts to every certificate GetCACert returns, and RSA only
    a = module_appliance_factory(start=False, config=TOML, issuing_key="rsa2048")
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
    # a CSR the profile refuses (C is not a tls-client attribute): refused, and the use is given back
    der = run("openssl", "req", "-new", "-key", str(key), "-subj", "/C=US/CN=router-9", "-outform", "DER").stdout
    (tmp_path / "c.b64").write_bytes(base64.encodebytes(der))
    code, body = curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-9:{s['secret']}", *P10, "--data-binary", f"@{tmp_path / 'c.b64'}")
    assert code == 400 and b"refused" in body, body
    # the secret is still good after all that (refusals before the Factory spend nothing) and then spent
    assert curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-9:{s['secret']}", *P10, "--data-binary", f"@{req}")[0] == 200
    code, body = curl(gw, "/.well-known/est/simpleenroll", "-u", f"router-9:{s['secret']}", *P10, "--data-binary", f"@{req}")
    assert code == 401 and b"already used" in body
    audit = gw.cli("audit", "export").stdout.decode()
    assert '"est-enrol"' in audit and "secret already used" in audit and s["secret"] not in audit


def test_est_channel_binding(gw):
    """RFC 7030 §3.5: a CSR made after the handshake, its challengePassword base64(tls-unique), is
    accepted on that TLS connection and refused on another (a CSR lifted from one session)."""
    import http.client
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    host, port = gateway_url(gw).removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(gw.chain))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # tls-unique exists up to TLS 1.2
    s = secret(gw, "est", "--ref", "router-cb", "--uses", "2")
    auth = "Basic " + base64.b64encode(f"router-cb:{s['secret']}".encode()).decode()
    key = ec.generate_private_key(ec.SECP256R1())

    def post(conn: http.client.HTTPSConnection, body: bytes) -> tuple[int, bytes]:
        conn.request("POST", "/.well-known/est/simpleenroll", body=body,
                     headers={"Authorization": auth, "Content-Type": "application/pkcs10"})
        r = conn.getresponse()
        return r.status, r.read()
    c1 = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    c1.connect()
    unique = c1.sock.get_channel_binding("tls-unique")
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "router-cb")]))
           .add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, base64.b64encode(unique)).sign(key, hashes.SHA256()))
    body = base64.encodebytes(csr.public_bytes(Encoding.DER))
    c2 = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    status, text = post(c2, body)
    assert status == 400 and b"channel binding does not match" in text, text
    status, text = post(c1, body)
    assert status == 200, text
    c1.close()
    c2.close()


# ---------------------------------------------------------------------------------------------- SCEP


def scepclient(a: Appliance, tmp: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """Debian's scepclient; its key, certificate and self-signed certificate (self.pem) in tmp/name/."""
    env = {**os.environ, "SSL_CERT_FILE": str(a.chain)}  # Go's TLS trusts the appliance's root
    d = tmp / name
    d.mkdir(exist_ok=True)
    # its default subject has C=US, which the tls-client profile does not take
    return run("scepclient", "-server-url", url(a, "/scep"), "-private-key", str(d / "key.pem"),
               "-certificate", str(d / "cert.pem"), "-country", "", "-organization", "Donjon Test", "-ou", "devices",
               *args, env=env, cwd=d)


def test_scep_with_micromdm_scepclient(gw, tmp_path):
    code, body = curl(gw, "/scep?operation=GetCACaps")
    assert code == 200 and {"AES", "SHA-256", "POSTPKIOperation", "Renewal"} <= set(body.decode().split())
    s = secret(gw, "scep")
    r = scepclient(gw, tmp_path, "dev1", "-cn", "device-1", "-challenge", s["secret"])
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode() + gw.cli("audit", "export").stdout.decode()[-2000:]
    first = verify(gw, tmp_path / "dev1" / "cert.pem")
    assert "CN = device-1" in first
    # renewal: the same command with the certificate in place sends a RenewalReq signed with it
    r = scepclient(gw, tmp_path, "dev1", "-cn", "device-1")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    second = verify(gw, tmp_path / "dev1" / "cert.pem")
    assert "CN = device-1" in second and second != first
    # a wrong challenge password (and a used one) is refused with failInfo, nothing issued
    for pw in ("WRONGWRONGWRONGWRONGWRON", s["secret"]):
        r = scepclient(gw, tmp_path, f"bad-{pw[:4]}", "-cn", "device-2", "-challenge", pw)
        assert r.returncode != 0 and b"failInfo: badRequest" in r.stdout + r.stderr, r.stdout + r.stderr
        assert not (tmp_path / f"bad-{pw[:4]}" / "cert.pem").exists()
    audit = gw.cli("audit", "export").stdout.decode()
    assert "gateway/scep:txn:" in audit and "gateway/scep" in audit and '"scep-enrol"' in audit and "wrong secret" in audit


# ---------------------------------------------------------------------------------------------- approval


def _decide(a: Appliance, request: str, approve: bool, officer: str = "oper2") -> subprocess.CompletedProcess:
    return a.cli("enrol-secret", "decide", request, "--approve" if approve else "--reject", "--reason", "test", "--json",
                 officer=officer, check=False)


def test_approval_waits_polls_and_completes(gw, tmp_path):
    """A secret marked --approval: EST answers 202 + Retry-After until another officer approves; SCEP
    answers PENDING and CertPoll; a rejected one gets the protocol's refusal."""
    if "oper2" not in gw.officers:
        gw.cli("officer", "add", "oper2", "--role", "operator")
        gw.officers["oper2"] = "operator"
    s = secret(gw, "est", "--ref", "router-a", "--approval")
    req, _ = csr_b64(tmp_path, "ra", "router-a")
    post = ("/.well-known/est/simpleenroll", "-u", f"router-a:{s['secret']}", *P10, "--data-binary", f"@{req}", "-i")
    code, body = curl(gw, *post)
    assert code == 202 and b"retry-after:" in body.lower(), body
    rid = body.split(b"(request ")[1].split(b")")[0].decode()
    waiting = json.loads(gw.cli("enrol-secret", "waiting", "--json").stdout)
    assert [w["state"] for w in waiting if w["request"] == rid] == ["waiting"]
    assert curl(gw, *post)[0] == 202  # the retry is recognised (the secret is not spent twice)
    r = _decide(gw, rid, True, officer="oper")  # the officer who made the secret may not approve it
    assert r.returncode == 1 and b"another officer" in r.stderr
    r = _decide(gw, rid, True)
    assert r.returncode == 0, r.stderr
    code, body = curl(gw, *post[:-1])
    assert code == 200
    assert "CN = router-a" in verify(gw, p7_to_pem(body, tmp_path / "ra.pem"))
    # rejected: the protocol's refusal
    s = secret(gw, "est", "--ref", "router-b", "--approval")
    req, _ = csr_b64(tmp_path, "rb", "router-b")
    post = ("/.well-known/est/simpleenroll", "-u", f"router-b:{s['secret']}", *P10, "--data-binary", f"@{req}")
    code, body = curl(gw, *post)
    assert code == 202
    rid = body.split(b"(request ")[1].split(b")")[0].decode()
    assert _decide(gw, rid, False).returncode == 0
    code, body = curl(gw, *post)
    assert code == 400 and b"rejected by an officer" in body
    # SCEP: PENDING, CertPoll, approval, SUCCESS (a crafted requester: scepclient stops at PENDING)
    from tests.scepmsg import Requester, csr
    from appliance.gateway import scep
    from asn1crypto import x509 as ax509
    from cryptography import x509
    ra_certs = [x509.load_pem_x509_certificate(b) for b in _ra_pems(gw, tmp_path)]
    dec = [c for c in ra_certs if "decryption" in c.subject.rfc4514_string()][0]
    sign = [c for c in ra_certs if "signing" in c.subject.rfc4514_string()][0]
    s = secret(gw, "scep", "--approval")
    dev = Requester.new("device-p")
    msg = dev.message(scep.PKCS_REQ, csr(dev.key, "device-p", s["secret"]), dec, tid="T-pending")
    rep = dev.open(_pki(gw, tmp_path, msg), sign)
    assert rep["scep_pki_status"] == scep.PENDING
    issuer = ax509.Name.load(x509.load_pem_x509_certificate(gw.issuing.read_bytes()).subject.public_bytes())
    poll = scep.IssuerAndSubject({"issuer": issuer, "subject": ax509.Name.build({"common_name": "device-p"})}).dump()
    assert dev.open(_pki(gw, tmp_path, dev.message(scep.CERT_POLL, poll, dec, tid="T-pending")), sign)["scep_pki_status"] == scep.PENDING
    other = Requester.new("intruder")  # a poll signed by another key learns nothing
    assert other.open(_pki(gw, tmp_path, other.message(scep.CERT_POLL, poll, dec, tid="T-pending")), sign)["scep_fail_info"] == scep.BAD_CERT_ID
    rid = [w for w in json.loads(gw.cli("enrol-secret", "waiting", "--json").stdout) if w["state"] == "waiting" and w["protocol"] == "scep"][0]["request"]
    assert _decide(gw, rid, True).returncode == 0
    rep = dev.open(_pki(gw, tmp_path, dev.message(scep.CERT_POLL, poll, dec, tid="T-pending")), sign)
    assert rep["scep_pki_status"] == scep.SUCCESS
    issued = x509.load_der_x509_certificate(rep["certs"][0])
    (tmp_path / "p.pem").write_bytes(issued.public_bytes(Encoding.PEM))
    assert "CN = device-p" in verify(gw, tmp_path / "p.pem")
    # GetCert (by issuer and serial) and GetCRL, answered encrypted to the requester
    from asn1crypto import cms
    ias = cms.IssuerAndSerialNumber({"issuer": issuer, "serial_number": issued.serial_number}).dump()
    rep = dev.open(_pki(gw, tmp_path, dev.message(scep.GET_CERT, ias, dec)), sign)
    assert rep["scep_pki_status"] == scep.SUCCESS and rep["certs"] == [issued.public_bytes(Encoding.DER)]
    gw.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "issuing.crl"))
    rep = dev.open(_pki(gw, tmp_path, dev.message(scep.GET_CRL, ias, dec)), sign)
    assert rep["scep_pki_status"] == scep.SUCCESS and len(rep["crls"]) == 1
    (tmp_path / "scep.crl").write_bytes(rep["crls"][0])
    r = run("openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "scep.crl"), "-noout", "-CAfile", str(gw.issuing))
    assert r.returncode == 0 and b"verify OK" in r.stdout + r.stderr, r.stdout + r.stderr
    unknown = cms.IssuerAndSerialNumber({"issuer": issuer, "serial_number": 12345}).dump()
    assert dev.open(_pki(gw, tmp_path, dev.message(scep.GET_CERT, unknown, dec)), sign)["scep_fail_info"] == scep.BAD_CERT_ID


def _ra_pems(a: Appliance, tmp: Path) -> list[bytes]:
    code, body = curl(a, "/scep?operation=GetCACert")
    (tmp / "ca-ra.p7").write_bytes(body)
    pems = run("openssl", "pkcs7", "-inform", "DER", "-in", str(tmp / "ca-ra.p7"), "-print_certs").stdout
    return [b"-----BEGIN CERTIFICATE-----" + p.split(b"-----BEGIN CERTIFICATE-----")[1] + b"-----END CERTIFICATE-----\n"
            for p in pems.split(b"-----END CERTIFICATE-----")[:-1]]


def _pki(a: Appliance, tmp: Path, msg: bytes) -> bytes:
    (tmp / "msg.der").write_bytes(msg)
    code, body = curl(a, "/scep?operation=PKIOperation", "-H", "Content-Type: application/x-pki-message",
                      "--data-binary", f"@{tmp / 'msg.der'}")
    assert code == 200, body
    return body


# ---------------------------------------------------------------------------------------------- fuzz


def test_fuzzed_bodies_never_crash_the_role(gw, tmp_path):
    """Mutated pkiMessages (POST and GET) and EST bodies at the live gateway: answers, never a 5xx, same process."""
    import random
    from tests.scepmsg import Requester, csr
    from appliance.gateway import scep
    from cryptography import x509
    pid_before = subprocess.run(["pgrep", "-f", "donjon.*role gateway"], capture_output=True).stdout
    dec = [x509.load_pem_x509_certificate(b) for b in _ra_pems(gw, tmp_path)]
    dec = [c for c in dec if "decryption" in c.subject.rfc4514_string()][0]
    dev = Requester.new("fuzz")
    seed = dev.message(scep.PKCS_REQ, csr(dev.key, "fuzz", "pw"), dec)
    est_seed = base64.encodebytes(run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                                      "-keyout", "/dev/null", "-subj", "/CN=fuzz", "-outform", "DER").stdout)
    rng = random.Random(17)
    statuses = set()
    for i in range(60):
        body = bytearray(seed if i % 2 else est_seed)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(body))
            body[pos:pos + rng.randint(0, 4)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 4)))
        (tmp_path / "f.bin").write_bytes(body)
        if i % 2:
            code, _ = curl(gw, "/scep?operation=PKIOperation", "--data-binary", f"@{tmp_path / 'f.bin'}")
        else:
            code, _ = curl(gw, "/.well-known/est/simpleenroll", "-u", "x:y", *P10, "--data-binary", f"@{tmp_path / 'f.bin'}")
        statuses.add(code)
    assert statuses and all(200 <= c < 500 for c in statuses), statuses
    assert subprocess.run(["pgrep", "-f", "donjon.*role gateway"], capture_output=True).stdout == pid_before
    assert curl(gw, "/scep?operation=GetCACaps")[0] == 200


# ---------------------------------------------------------------------------------------------- certmonger


def certmonger(a: Appliance, tmp: Path, script: str) -> str:
    """certmonger on a private socket (no D-Bus), its state in tmp (CERTMONGER_*_DIR), running `script`
    with getcert; certmonger exits when the script does. Returns the script's output."""
    state = tmp / "cm"
    for d in ("requests", "cas", "local", "tmp"):
        (state / d).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CERTMONGER_REQUESTS_DIR": str(state / "requests"), "CERTMONGER_CAS_DIR": str(state / "cas"),
           "CERTMONGER_LOCAL_CA_DIR": str(state / "local"), "CERTMONGER_TMPDIR": str(state / "tmp"), "HOME": str(state)}
    (tmp / "cm.sh").write_text("set -x\n" + script)
    # scep-submit 0.79 uses -R only for GetCACaps/GetCACert and the system trust store for PKIOperation:
    # in a private mount namespace, that store is the system's plus the appliance's root.
    bundle = tmp / "bundle.pem"
    bundle.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes() + a.chain.read_bytes())
    r = run("unshare", "-m", "sh", "-c", f"mount --bind {bundle} /etc/ssl/certs/ca-certificates.crt && "
            f"exec certmonger -n -L -P {state / 'sock'} -c 'sh {tmp / 'cm.sh'}'", env=env)
    return (r.stdout + r.stderr).decode()


def test_scep_with_certmonger(gw, tmp_path):
    s, bad = secret(gw, "scep"), "WRONGWRONGWRONGWRONGWRON"
    u = url(gw, "/scep")
    out = certmonger(gw, tmp_path, f"""
getcert add-scep-ca -c Donjon -u {u} -R {gw.chain} -N {gw.chain} -I {gw.issuing}
getcert request -c Donjon -I dev -k {tmp_path}/cm-key.pem -f {tmp_path}/cm-cert.pem -N CN=device-cm -L {s['secret']} -w -v
openssl x509 -in {tmp_path}/cm-cert.pem -noout -serial > {tmp_path}/first.serial
getcert resubmit -i dev -w -v
getcert request -c Donjon -I bad -k {tmp_path}/bad-key.pem -f {tmp_path}/bad-cert.pem -N CN=device-bad -L {bad} -w -v
getcert list
""")
    assert (tmp_path / "cm-cert.pem").exists(), out[-3000:] + gw.cli("audit", "export").stdout.decode()[-3000:]
    second = verify(gw, tmp_path / "cm-cert.pem")
    assert "CN = device-cm" in second
    assert (tmp_path / "first.serial").read_text().strip().lower().split("=")[1] not in second.lower(), gw.cli("audit", "export").stdout.decode()[-3000:]  # renewed
    assert not (tmp_path / "bad-cert.pem").exists()
    assert "CA_REJECTED" in out or "rejected" in out.lower(), out

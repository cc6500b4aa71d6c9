"""CRL-fed OCSP tenants, judged by `openssl ocsp`: another CA made with `openssl ca` (its own index,
leaves, revocations, CRLs, and the OCSP-signing certificate it issues for the endpoint's CSR), whose
CRL reaches the appliance by officer upload and by HTTP push; bad CRLs are refused and the previous
one keeps serving; a stale CRL is never answered from; the endpoint serves its tenants again after a
restart while the CA is not activated."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from asn1crypto import ocsp as a_ocsp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from policy import lint
from tests.conftest import openssl

CNF = """
[ca]
default_ca = tenant
[tenant]
dir = {d}
database = $dir/index.txt
serial = $dir/serial
crlnumber = $dir/crlnumber
new_certs_dir = $dir/newcerts
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_days = 30
default_crl_days = 7
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[responder]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = OCSPSigning
noCheck = ignored
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[crl_ext]
authorityKeyIdentifier = keyid
"""


class OpensslCa:
    """A tiny CA run with `openssl ca`, in its own folder."""

    def __init__(self, d: Path, cn: str = "Partner Test CA", serial: str = "1000"):
        self.d = d
        d.mkdir()
        (d / "newcerts").mkdir()
        (d / "index.txt").write_text("")
        (d / "serial").write_text(serial + "\n")
        (d / "crlnumber").write_text("01\n")
        self.cnf = d / "openssl.cnf"
        self.cnf.write_text(CNF.format(d=d))
        self.pem = d / "ca.pem"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(d / "ca.key"),
                "-out", str(self.pem), "-subj", f"/O=Partner/CN={cn}", "-days", "365",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def sign(self, csr: Path, out: Path, ext: str) -> Path:
        openssl("ca", "-batch", "-config", str(self.cnf), "-extensions", ext, "-in", str(csr), "-out", str(out), "-notext")
        return out

    def leaf(self, name: str) -> Path:
        key, csr = self.d / f"{name}.key", self.d / f"{name}.csr"
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
                "-subj", f"/CN={name}.partner.example", "-out", str(csr))
        return self.sign(csr, self.d / f"{name}.pem", "leaf")

    def revoke(self, cert: Path, reason: str = "keyCompromise") -> None:
        openssl("ca", "-config", str(self.cnf), "-revoke", str(cert), "-crl_reason", reason)

    def crl(self, name: str, *extra: str) -> Path:
        pem = self.d / f"{name}.crl.pem"
        openssl("ca", "-config", str(self.cnf), "-gencrl", "-crlexts", "crl_ext", "-out", str(pem), *extra)
        der = self.d / f"{name}.crl"
        openssl("crl", "-in", str(pem), "-outform", "DER", "-out", str(der))
        return der


def serial_of(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


SECRET = "s3cret-push-token-0123456789"


@pytest.fixture
def tenant(appliance_factory, tmp_path):
    """An appliance answering for an `openssl ca` tenant whose responder certificate is installed."""
    a = appliance_factory()
    ca = OpensslCa(tmp_path / "partner")
    good, bad = ca.leaf("good"), ca.leaf("bad")
    ca.revoke(bad)
    (tmp_path / "secret").write_text(SECRET + "\n")
    a.cli("ocsp", "tenant", "add", "partner", "--ca-cert", str(ca.pem), "--crl-url", "http://127.0.0.1:9/partner.crl",
          "--unissued", "revoked", "--push-secret-file", str(tmp_path / "secret"))
    csr = tmp_path / "responder.csr"
    a.cli("ocsp", "tenant", "csr", "partner", "--out", str(csr))
    openssl("req", "-in", str(csr), "-verify", "-noout")  # signed by the key in the endpoint's token
    resp = ca.sign(csr, tmp_path / "responder.pem", "responder")
    r = a.cli("ocsp", "tenant", "update", "partner", "--responder-cert", str(resp))
    assert b"responder certificate" in r.stdout and b"warning" not in r.stdout
    return a, ca, good, bad


def ask(a, ca: OpensslCa, *what: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["ocsp", "-issuer", str(ca.pem)]
    for w in what:
        args += ["-serial", w] if w.startswith("0x") else ["-cert", w]
    return openssl(*args, "-url", f"{a.endpoint}/ocsp", "-CAfile", str(ca.pem), "-timeout", "10", *extra, check=False)


def wait(a, ca, what: str, word: str, extra: tuple[str, ...] = (), bound: float = 15.0) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + bound
    while True:
        r = ask(a, ca, what, extra=extra)
        out = (r.stdout + r.stderr).decode()
        if word in out:
            return r
        assert time.monotonic() < deadline, f"no {word!r} within {bound}s:\n{out}\n{a.log.read_text()[-12000:]}"
        time.sleep(0.2)


def push(a, name: str, crl: Path, secret: str | None, ctype: str = "application/pkix-crl") -> tuple[int, str]:
    args = ["curl", "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "-X", "PUT", "--data-binary", f"@{crl}",
            "-H", f"Content-Type: {ctype}"]
    if secret is not None:
        args += ["-H", f"Authorization: Bearer {secret}"]
    out = subprocess.run(args + [f"{a.endpoint}/tenant/{name}/crl"], capture_output=True, timeout=60).stdout.decode()
    body, _, code = out.rpartition("\n")
    return int(code), body.strip()


def tenants(a) -> dict:
    return {t["name"]: t for t in json.loads(a.cli("ocsp", "tenant", "list", "--json").stdout)["tenants"]}


def test_tenant_served_from_an_openssl_ca_crl(tenant, tmp_path):
    a, ca, good, bad = tenant
    # No CRL yet: never an answer made up without one.
    r = ask(a, ca, str(good))
    assert b"trylater" in (r.stdout + r.stderr).lower().replace(b" ", b""), r.stdout + r.stderr

    crl1 = ca.crl("one")
    r = a.cli("ocsp", "tenant", "crl", "partner", str(crl1))
    assert b"CRL #1 in use" in r.stdout

    r = wait(a, ca, str(good), ": good")
    assert r.returncode == 0 and b"Response verify OK" in r.stderr, r.stderr
    assert b"WARNING: no nonce" not in r.stderr and b"nonce" not in r.stderr.lower()  # the nonce is echoed
    r = ask(a, ca, str(bad))
    assert r.returncode == 0 and f"{bad}: revoked".encode() in r.stdout and b"Reason: keyCompromise" in r.stdout, r.stdout
    assert b"Response verify OK" in r.stderr
    r = ask(a, ca, str(good), str(bad))  # two CertIDs in one request, one live response
    assert f"{good}: good".encode() in r.stdout and f"{bad}: revoked".encode() in r.stdout, r.stdout

    # pkilint on a tenant response (with and without a nonce).
    for extra in ((), ("-no_nonce",)):
        out = tmp_path / "resp.der"
        openssl("ocsp", "-issuer", str(ca.pem), "-cert", str(good), "-url", f"{a.endpoint}/ocsp", "-CAfile", str(ca.pem),
                "-respout", str(out), *extra)
        assert lint.lint_ocsp_response(out.read_bytes()) == []

    # Without an issued-serials list a serial not on the CRL is good (all a CRL can say)...
    r = ask(a, ca, "0x999999")
    assert b"0x999999: good" in r.stdout, r.stdout
    # ...with one, an unissued serial is never good: extended revoked per the tenant's policy.
    issued = tmp_path / "issued.txt"
    issued.write_text(f"# partner\n{serial_of(good):x}\n{serial_of(bad):X}\n")
    r = a.cli("ocsp", "tenant", "serials", "partner", str(issued))
    assert b"of 2 serials" in r.stdout
    r = wait(a, ca, "0x999999", "0x999999: revoked")
    assert b"Reason: certificateHold" in r.stdout and b"Revocation Time: Jan  1 00:00:00 1970 GMT" in r.stdout, r.stdout
    out = tmp_path / "ext.der"
    openssl("ocsp", "-issuer", str(ca.pem), "-serial", "0x999999", "-url", f"{a.endpoint}/ocsp", "-CAfile", str(ca.pem),
            "-no_nonce", "-respout", str(out))
    exts = a_ocsp.OCSPResponse.load(out.read_bytes()).basic_ocsp_response["tbs_response_data"]["response_extensions"]
    assert [e["extn_id"].native for e in exts] == ["extended_revoke"]
    assert lint.lint_ocsp_response(out.read_bytes()) == []
    assert ": good" in ask(a, ca, str(good)).stdout.decode()
    a.cli("ocsp", "tenant", "update", "partner", "--unissued", "unknown")
    wait(a, ca, "0x999999", "0x999999: unknown")

    # Bad CRLs are refused, audited, and the previous CRL keeps serving.
    other = OpensslCa(tmp_path / "impostor")  # the same name, another key: the signature does not verify
    forged = other.crl("forged")
    truncated = tmp_path / "truncated.crl"
    truncated.write_bytes(crl1.read_bytes()[:-20])
    ca.leaf("later")
    crl2 = ca.crl("two")
    assert a.cli("ocsp", "tenant", "crl", "partner", str(crl2)).returncode == 0
    for bad_crl, why in ((forged, "signature does not verify"), (truncated, "not a DER X.509 CRL"),
                         (crl1, "lower than the current 2")):
        r = a.cli("ocsp", "tenant", "crl", "partner", str(bad_crl), check=False)
        assert r.returncode == 1 and why.encode() in r.stderr and b"previous CRL stays in use" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = ask(a, ca, str(bad))
        assert f"{bad}: revoked".encode() in r.stdout, r.stdout
    t = tenants(a)["partner"]
    assert t["crl_number"] == 2 and "lower than the current 2" in t["last_refusal"]
    st = json.loads(a.cli("ocsp", "status", "--json").stdout)["tenant_crls"]
    assert st == {"tenants": 1, "accepted": 2, "refused": 3}
    assert b"CRLs accepted 2 refused 3" in a.cli("ocsp", "status").stdout
    audit = a.cli("audit", "export").stdout.decode()
    assert audit.count('"action":"tenant-crl","object":"partner","outcome":"refused"') == 3
    assert '"action":"tenant-crl","object":"partner#2","outcome":"ok"' in audit
    assert '"action":"tenant-add","object":"partner"' in audit and '"action":"tenant-csr"' in audit

    # The HTTP push: refused without the right secret, accepted with it; the new CRL replaces the cached answers.
    ca.revoke(good, "superseded")
    crl3 = ca.crl("three")
    assert push(a, "partner", crl3, None)[0] == 401
    assert push(a, "partner", crl3, "wrong-secret-0123456789")[0] == 401
    assert push(a, "nobody", crl3, SECRET)[0] == 401  # an unknown tenant looks the same
    assert push(a, "partner", crl3, SECRET, ctype="application/octet-stream")[0] == 415
    assert tenants(a)["partner"]["crl_number"] == 2
    assert ": good" in ask(a, ca, str(good)).stdout.decode()
    code, body = push(a, "partner", forged, SECRET)
    assert (code, body) == (422, "the CRL's signature does not verify with the tenant CA's key")
    assert push(a, "partner", crl3, SECRET) == (200, "accepted")
    r = wait(a, ca, str(good), f"{good}: revoked")
    assert b"Reason: superseded" in r.stdout
    assert tenants(a)["partner"]["crl_source"] == "http-push"
    assert push(a, "partner", crl3, SECRET) == (200, "accepted")  # the same CRL again: nothing changes

    # A restarted endpoint serves its tenants from its own store, without the Factory (CA not activated).
    assert a.stop() == 0
    a.start_inactive()
    r = wait(a, ca, str(bad), f"{bad}: revoked")
    assert b"Response verify OK" in r.stderr
    assert f"{good}: revoked".encode() in ask(a, ca, str(good)).stdout


def test_stale_tenant_crl_is_never_answered_from(tenant, tmp_path):
    a, ca, good, bad = tenant
    short = ca.crl("short", "-crlsec", "6")
    a.cli("ocsp", "tenant", "crl", "partner", str(short))
    wait(a, ca, str(good), ": good", extra=("-no_nonce",))  # cached from here on
    nu = tenants(a)["partner"]["crl_next_update"]
    deadline = time.monotonic() + 30
    while time.time() < nu + 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for extra in ((), ("-no_nonce",)):
        r = ask(a, ca, str(good), extra=extra)
        out = (r.stdout + r.stderr).decode().lower().replace(" ", "")
        assert "trylater" in out and ": good" not in out, out
    assert tenants(a)["partner"]["stale"]
    # A stale CRL is refused at intake too (its nextUpdate has passed).
    r = a.cli("ocsp", "tenant", "crl", "partner", str(short), check=False)
    assert r.returncode == 1 and b"stale" in r.stderr
    fresh = ca.crl("fresh")
    a.cli("ocsp", "tenant", "crl", "partner", str(fresh))
    wait(a, ca, str(good), ": good")


def test_tenant_commands_refuse_bad_input(tenant, tmp_path):
    a, ca, good, bad = tenant
    r = a.cli("ocsp", "tenant", "add", "partner", "--ca-cert", str(ca.pem), check=False)
    assert r.returncode == 1 and b"already exists" in r.stderr
    r = a.cli("ocsp", "tenant", "add", "leafy", "--ca-cert", str(good), check=False)
    assert r.returncode == 1 and b"not a CA certificate" in r.stderr
    r = a.cli("ocsp", "tenant", "add", "twin", "--ca-cert", str(ca.pem), check=False)
    assert r.returncode == 1 and b"already answers for that CA" in r.stderr
    (tmp_path / "weak").write_text("short")
    r = a.cli("ocsp", "tenant", "add", "weak", "--ca-cert", str(OpensslCa(tmp_path / "w", cn="W").pem),
              "--push-secret-file", str(tmp_path / "weak"), check=False)
    assert r.returncode == 1 and b"push secret" in r.stderr
    # A responder certificate for another key, or not issued by the tenant CA, is refused.
    r = a.cli("ocsp", "tenant", "update", "partner", "--responder-cert", str(good), check=False)
    assert r.returncode == 1 and b"does not certify the key" in r.stderr
    (tmp_path / "bad.txt").write_text("12ab\nnot-hex\n")
    r = a.cli("ocsp", "tenant", "serials", "partner", str(tmp_path / "bad.txt"), check=False)
    assert r.returncode == 1 and b"line 2" in r.stderr
    # A new key (renewal) leaves the installed responder answering until its certificate is installed.
    a.cli("ocsp", "tenant", "crl", "partner", str(ca.crl("one")))
    wait(a, ca, str(good), ": good")
    a.cli("ocsp", "tenant", "csr", "partner", "--out", str(tmp_path / "renew.csr"))
    old = tmp_path / "responder.pem"
    r = a.cli("ocsp", "tenant", "update", "partner", "--responder-cert", str(old), check=False)
    assert r.returncode == 1 and b"does not certify the key" in r.stderr  # the old one is not the latest key's
    r = ask(a, ca, str(good))
    assert b": good" in r.stdout and b"Response verify OK" in r.stderr, r.stdout + r.stderr
    new = ca.sign(tmp_path / "renew.csr", tmp_path / "renew.pem", "responder")
    a.cli("ocsp", "tenant", "update", "partner", "--responder-cert", str(new))
    deadline = time.monotonic() + 15
    while True:  # the answers now carry the new responder certificate
        out = tmp_path / "renewed.der"
        openssl("ocsp", "-issuer", str(ca.pem), "-cert", str(good), "-url", f"{a.endpoint}/ocsp", "-CAfile", str(ca.pem),
                "-no_nonce", "-respout", str(out))
        certs = a_ocsp.OCSPResponse.load(out.read_bytes()).basic_ocsp_response["certs"]
        if certs[0].dump() == x509.load_pem_x509_certificate(new.read_bytes()).public_bytes(serialization.Encoding.DER):
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = a.cli("ocsp", "tenant", "crl", "nobody", str(ca.pem), check=False)
    assert r.returncode == 1 and b"no OCSP tenant named 'nobody'" in r.stderr
    a.cli("ocsp", "tenant", "remove", "partner")
    assert tenants(a) == {}
    wait(a, ca, str(good), "unauthorized")


def test_tenant_answered_by_every_endpoint_process(appliance_factory, tmp_path):
    """Two endpoint processes: the key made by the first is used by both (one token), and a CRL
    pushed to whichever process accepts the connection reaches both."""
    a = appliance_factory(start=False)
    cfg = a.home / "donjon.toml"
    cfg.write_text(cfg.read_text().replace("[ocsp]\n", "[ocsp]\nworkers = 2\n", 1))
    a.start()
    ca = OpensslCa(tmp_path / "partner")
    _good, bad = ca.leaf("good"), ca.leaf("bad")
    (tmp_path / "secret").write_text(SECRET)
    a.cli("ocsp", "tenant", "add", "partner", "--ca-cert", str(ca.pem), "--push-secret-file", str(tmp_path / "secret"))
    a.cli("ocsp", "tenant", "csr", "partner", "--out", str(tmp_path / "r.csr"))
    a.cli("ocsp", "tenant", "update", "partner", "--responder-cert", str(ca.sign(tmp_path / "r.csr", tmp_path / "r.pem", "responder")))
    assert push(a, "partner", ca.crl("one"), SECRET) == (200, "accepted")
    wait(a, ca, str(bad), f"{bad}: good")
    for _ in range(12):  # whichever process answers, the same status, verified
        r = ask(a, ca, str(bad))
        assert f"{bad}: good".encode() in r.stdout and b"Response verify OK" in r.stderr, r.stdout + r.stderr
    ca.revoke(bad)
    assert push(a, "partner", ca.crl("two"), SECRET) == (200, "accepted")
    deadline = time.monotonic() + 15
    streak = 0
    while streak < 12:  # both processes switch to the new CRL
        r = ask(a, ca, str(bad))
        streak = streak + 1 if f"{bad}: revoked".encode() in r.stdout else 0
        assert time.monotonic() < deadline, r.stdout + r.stderr
    assert a.log.read_text().count("tenant partner: CRL #2 in use") == 2

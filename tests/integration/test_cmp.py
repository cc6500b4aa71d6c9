"""CMP on the gateway, judged by the real `openssl cmp` over HTTPS against the whole appliance (gateway, Factory,
CIS, SoftHSM2, encrypted CMDB): ir/cr/p10cr/kur/rr/genm with MAC and signature protection, implicit and explicit
confirmation, approval by a second officer with polling, refusals, replay, a bounded fuzz; each certificate
checked by `openssl verify`."""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Appliance
from tests.integration.test_gateway import gateway_url, wait_https

CMP_TOML = """
[gateway]
enabled = true
listen = "127.0.0.1:0"
protocols = ["cmp"]
tls-names = ["gw.donjon.test", "127.0.0.1"]
"""
# An RA profile (id-kp-cmcRA): its certificate signs enrolments for devices it vouches for.
RA_PROFILE = """kind = "end-entity"
key_types = ["p256", "p384", "rsa2048"]
key_usage = ["digital_signature"]
extended_key_usage = ["1.3.6.1.5.5.7.3.28"]
san_types = ["dns"]
max_validity_days = 365
lint = false
[[subject]]
attr = "CN"
presence = "required"
"""


@pytest.fixture(scope="module")
def gw(module_appliance_factory, tmp_path_factory):
    """One appliance with CMP on the gateway for the whole module, its PKI files, and an openssl cmp runner."""
    base = tmp_path_factory.mktemp("cmp")
    # The default variant's template (made once per session, shared with other modules), CMP switched on before the start.
    a = module_appliance_factory(start=False)
    with open(a.home / "donjon.toml", "a") as f:
        f.write(CMP_TOML)
    (a.home / "profiles").mkdir(exist_ok=True)
    (a.home / "profiles" / "cmp-ra.toml").write_text(RA_PROFILE)
    os.chmod(a.home / "profiles", 0o755)
    os.chmod(a.home / "profiles" / "cmp-ra.toml", 0o644)
    a.start()
    a.cli("officer", "add", "oper2", "--role", "operator")  # a second operator: approvals are never the issuer's
    a.officers["oper2"] = "operator"
    a.d = base
    a.root = a.export("root", base / "root.pem")
    a.chain = a.root
    a.issuing = a.export("issuing", base / "issuing.pem")
    wait_https(a)
    a.cmp_url = gateway_url(a) + "/.well-known/cmp"
    wait_cmp(a)
    return a


def post(a: Appliance, body: bytes, ctype: str = "application/pkixcmp") -> tuple[int, bytes, str]:
    host, port = gateway_url(a).removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(a.root))
    with socket.create_connection((host, int(port)), timeout=20) as s, ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
        t.sendall(b"POST /.well-known/cmp HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: " + ctype.encode()
                  + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := t.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    ct = next((h.split(":", 1)[1].strip() for h in lines[1:] if h.lower().startswith("content-type:")), "")
    return int(lines[0].split()[1]), payload, ct


def wait_cmp(a: Appliance, timeout: float = 60) -> None:
    """Until CMP answers (503 until the gateway holds its CMP protection certificate)."""
    deadline = time.monotonic() + timeout
    code = 0
    while time.monotonic() < deadline:
        code, _, _ = post(a, b"\x30\x00")
        if code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"CMP did not come up: last status {code}\n{a.log.read_text()[-3000:]}")


def cmp(a: Appliance, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """openssl cmp against the gateway over HTTPS, trusting the appliance's root for TLS and for CMP protection."""
    r = subprocess.run(["openssl", "cmp", "-config", "", "-batch", "-server", a.cmp_url.removeprefix("https://"), "-tls_used",
                        "-tls_trusted", str(a.root), "-trusted", str(a.root), "-untrusted", str(a.issuing),
                        "-recipient", "/CN=Donjon CMP gateway", "-msg_timeout", "30", "-total_timeout", "60", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, r.stdout)


def verify(a: Appliance, cert: Path) -> None:
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(a.root), "-untrusted", str(a.issuing), str(cert)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith(": OK"), r.stdout + r.stderr


def key(a: Appliance, name: str) -> Path:
    p = a.d / f"{name}.key"
    if not p.exists():
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(p)], check=True)
    return p


def admin(a: Appliance, cls, officer: str = "oper", **kw) -> dict:
    """One admin request in-process (the CLI's own path is run by the tests that name `donjon cmp`): no interpreter start."""
    from appliance.client import AdminClient

    with AdminClient(str(a.home), timeout=60, session=a.session(officer)) as c:
        return c.call(cls, **kw)


def secret(a: Appliance, *args: str, officer: str = "oper", **kw) -> tuple[str, str]:
    if kw or not args:
        from appliance.ipc import schema as S

        doc = admin(a, S.ACmpCredentialAdd, officer=officer, ca="issuing", profile="tls-client", **kw)
    else:
        doc = json.loads(a.cli("cmp", "add", "--ca", "issuing", "--profile", "tls-client", *args, "--json", officer=officer).stdout)
    return doc["ref"], doc["secret"]


def audit(a: Appliance) -> str:
    return a.cli("audit", "export").stdout.decode(errors="replace")


def test_mac_ir_p10cr_kur_rr_genm(gw):
    a, d = gw, gw.d
    ref, sec = secret(a, "--uses", "3", "--subject", "CN=dev1")
    mac = ["-ref", ref, "-secret", f"pass:{sec}"]
    # ir, PasswordBasedMac, implicit confirmation.
    r = cmp(a, "-cmd", "ir", *mac, "-newkey", str(key(a, "dev1")), "-subject", "/CN=dev1", "-implicit_confirm", "-certout", str(d / "dev1.pem"))
    assert r.returncode == 0, r.stderr
    verify(a, d / "dev1.pem")
    # p10cr, same secret (second use), explicit certConf/pkiConf.
    subprocess.run(["openssl", "req", "-new", "-key", str(key(a, "dev1b")), "-subj", "/CN=dev1", "-out", str(d / "dev1b.csr")], check=True)
    r = cmp(a, "-cmd", "p10cr", *mac, "-csr", str(d / "dev1b.csr"), "-certout", str(d / "dev1b.pem"))
    assert r.returncode == 0 and "received PKICONF" in r.stderr, r.stderr
    verify(a, d / "dev1b.pem")
    # kur signed with the first certificate, to a new key: same subject, a new certificate.
    r = cmp(a, "-cmd", "kur", "-cert", str(d / "dev1.pem"), "-key", str(key(a, "dev1")), "-newkey", str(key(a, "dev1c")),
            "-implicit_confirm", "-certout", str(d / "dev1c.pem"))
    assert r.returncode == 0, r.stderr
    verify(a, d / "dev1c.pem")
    assert "CN = dev1" in subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", str(d / "dev1c.pem")], capture_output=True, text=True).stdout
    # rr signed with the certificate itself; the CRL/OCSP side is the Factory's ordinary revocation.
    r = cmp(a, "-cmd", "rr", "-cert", str(d / "dev1c.pem"), "-key", str(key(a, "dev1c")), "-oldcert", str(d / "dev1c.pem"), "-revreason", "4")
    assert r.returncode == 0, r.stderr
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(d / "dev1c.pem")], capture_output=True, text=True).stdout.split("=")[1].strip()
    shown = a.cli("cert", "show", "--ca", "issuing", serial.lower(), "--json", check=False)
    assert b"revoked" in shown.stdout.lower(), shown.stdout + shown.stderr
    # rr with the MAC for the p10cr certificate (obtained under that secret).
    r = cmp(a, "-cmd", "rr", *mac, "-oldcert", str(d / "dev1b.pem"))
    assert r.returncode == 0, r.stderr
    # genm: CA certificates (both CAs), root CA update (none), current CRL, by MAC (third use is not consumed by genm).
    r = cmp(a, "-cmd", "genm", *mac, "-infotype", "caCerts", "-rspout", str(d / "genp.der"))
    assert r.returncode == 0 and "id-it-caCerts" in r.stderr, r.stderr
    r = cmp(a, "-cmd", "genm", "-cert", str(d / "dev1.pem"), "-key", str(key(a, "dev1")), "-infotype", "rootCaKeyUpdate")
    assert r.returncode == 0 and "id-it-rootCaKeyUpdate" in r.stderr, r.stderr
    r = cmp(a, "-cmd", "genm", *mac, "-infotype", "certReqTemplate")
    assert r.returncode == 0 and "id-it-certReqTemplate" in r.stderr, r.stderr
    # currentCRL: the issuing CA's latest CRL, which openssl reads and checks against the CA.
    from pyasn1.codec.der import decoder
    from pyasn1_alt_modules import rfc9810

    a.cli("crl", "generate", "--ca", "issuing", "--out", str(d / "issuing.crl"))
    r = cmp(a, "-cmd", "genm", *mac, "-infotype", "currentCRL", "-rspout", str(d / "genp-crl.der"))
    assert r.returncode == 0 and "id-it-currentCRL" in r.stderr, r.stderr
    itav = decoder.decode((d / "genp-crl.der").read_bytes(), asn1Spec=rfc9810.PKIMessage())[0]["body"]["genp"][0]
    (d / "genp.crl").write_bytes(bytes(itav["infoValue"]))
    r2 = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(d / "genp.crl"), "-CAfile", str(a.issuing), "-noout"],
                        capture_output=True, text=True)
    assert r2.returncode == 0 and "verify OK" in r2.stdout + r2.stderr, r2.stdout + r2.stderr
    records = [json.loads(x) for x in audit(a).splitlines() if x.startswith("{")]
    mine = [r for r in records if r.get("actor", "").startswith(f"gateway/cmp:{ref}")]
    assert {r["action"] for r in mine} >= {"issue", "revoke"} and all(r["outcome"] == "ok" for r in mine if r["action"] == "issue")


def test_ra_signature_cr_and_ir(gw):
    a, d = gw, gw.d
    subprocess.run(["openssl", "req", "-new", "-key", str(key(a, "ra")), "-subj", "/CN=cmp-ra", "-out", str(d / "ra.csr")], check=True)
    a.cli("issue", "--ca", "issuing", "--profile", "cmp-ra", "--csr", str(d / "ra.csr"), "--out", str(d / "ra.pem"))
    a.cli("cmp", "add", "--ca", "issuing", "--profile", "tls-client", "--ra-cert", str(d / "ra.pem"))
    for cmd, cn in (("ir", "dev2"), ("cr", "dev3")):
        r = cmp(a, "-cmd", cmd, "-cert", str(d / "ra.pem"), "-key", str(key(a, "ra")), "-newkey", str(key(a, cn)), "-subject", f"/CN={cn}",
                "-sans", f"{cn}.example.org", "-implicit_confirm", "-certout", str(d / f"{cn}.pem"))
        assert r.returncode == 0, r.stderr
        verify(a, d / f"{cn}.pem")
    # A device certificate is no RA: its ir for another subject is refused.
    r = cmp(a, "-cmd", "ir", "-cert", str(d / "dev2.pem"), "-key", str(key(a, "dev2")), "-newkey", str(key(a, "x")), "-subject", "/CN=other",
            "-implicit_confirm", "-certout", str(d / "x.pem"))
    assert r.returncode != 0 and "notAuthorized" in r.stderr, r.stderr


def test_approval_by_a_second_officer_then_rejection(gw):
    """Two enrolments under a secret issued with --approval wait and poll; one officer approves one, rejects the other."""
    a, d = gw, gw.d
    ref, sec = secret(a, uses=2, approval=True)
    procs = {}
    for cn in ("waits", "refused"):
        procs[cn] = subprocess.Popen(
            ["openssl", "cmp", "-config", "", "-batch", "-server", a.cmp_url.removeprefix("https://"), "-tls_used", "-tls_trusted", str(a.root),
             "-trusted", str(a.root), "-untrusted", str(a.issuing), "-recipient", "/CN=Donjon CMP gateway", "-total_timeout", "120",
             "-cmd", "ir", "-ref", ref, "-secret", f"pass:{sec}", "-newkey", str(key(a, cn)), "-implicit_confirm", "-subject", f"/CN={cn}",
             "-certout", str(d / f"{cn}.pem")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        mine: dict[str, int] = {}
        from appliance.ipc import schema as S

        for _ in range(100):
            reqs = admin(a, S.ACmpRequestList)["requests"]
            mine = {q["subject"].removeprefix("CN="): q["id"] for q in reqs if q["ref"] == ref}
            if len(mine) == 2:
                break
            time.sleep(0.2)
        assert set(mine) == {"waits", "refused"}, mine
        # The officer who issued the secret cannot decide its enrolments (dual control).
        r = a.cli("cmp", "approve", str(mine["waits"]), check=False, officer="oper")
        assert r.returncode == 1 and b"dual control" in r.stderr
        a.cli("cmp", "approve", str(mine["waits"]), officer="oper2")
        a.cli("cmp", "reject", str(mine["refused"]), "--reason", "unknown device", officer="oper2")
        out = {cn: p.communicate(timeout=120)[0] for cn, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert procs["waits"].returncode == 0 and "received POLLREP" in out["waits"], out["waits"]
    verify(a, d / "waits.pem")
    assert procs["refused"].returncode != 0 and "rejection" in out["refused"] and "unknown device" in out["refused"], out["refused"]
    assert not (d / "refused.pem").exists()
    states = {q["id"]: q["state"] for q in json.loads(a.cli("cmp", "requests", "--all", "--json").stdout)["requests"]}
    assert states[mine["waits"]] == "issued" and states[mine["refused"]] == "rejected"


def test_refusals_replay_and_fuzz(gw):
    a, d = gw, gw.d
    ref, sec = secret(a, uses=2, subject="CN=only")
    ok = ["-ref", ref, "-secret", f"pass:{sec}"]
    # Wrong secret: badMessageCheck, and the Factory counts the failure.
    r = cmp(a, "-cmd", "ir", "-ref", ref, "-secret", "pass:wrong-wrong-wrong", "-newkey", str(key(a, "n1")), "-subject", "/CN=only",
            "-implicit_confirm", "-certout", str(d / "n.pem"))
    assert r.returncode != 0 and "badMessageCheck" in r.stderr, r.stderr
    # A subject the credential does not allow.
    r = cmp(a, "-cmd", "ir", *ok, "-newkey", str(key(a, "n1")), "-subject", "/CN=someone-else", "-implicit_confirm", "-certout", str(d / "n.pem"))
    assert r.returncode != 0 and "rejection" in r.stderr and "subject" in r.stderr, r.stderr
    # A good request, then the very same bytes again: transactionIdInUse, nothing issued twice.
    r = cmp(a, "-cmd", "ir", *ok, "-newkey", str(key(a, "n1")), "-subject", "/CN=only", "-implicit_confirm", "-certout", str(d / "only.pem"),
            "-reqout", str(d / "only-req.der"))
    assert r.returncode == 0, r.stderr
    r = cmp(a, "-cmd", "ir", *ok, "-reqin", str(d / "only-req.der"), "-newkey", str(key(a, "n1")), "-subject", "/CN=only", "-certout", str(d / "n.pem"))
    assert r.returncode != 0 and "transactionIdInUse" in r.stderr, r.stderr
    assert not (d / "n.pem").exists()
    # PBMAC1 (RFC 9481 §6.1.2), which OpenSSL 3.0 cannot send: a message built by the unit tests' helper, checked by the Factory.
    from cryptography import x509
    from pyasn1.codec.der import decoder
    from pyasn1_alt_modules import rfc9810

    from tests.unit.test_cmp_openssl import _pbmac1_ir
    ref2, sec2 = secret(a, subject="CN=pbmac1-device")
    code, body, ct = post(a, _pbmac1_ir(x509.Name.from_rfc4514_string("CN=Donjon CMP gateway"), ref2.encode(), sec2.encode()))
    msg, _ = decoder.decode(body, asn1Spec=rfc9810.PKIMessage())
    assert code == 200 and msg["body"].getName() == "ip" and int(msg["body"]["ip"]["response"][0]["status"]["status"]) == 0
    code, body, ct = post(a, _pbmac1_ir(x509.Name.from_rfc4514_string("CN=Donjon CMP gateway"), ref2.encode(), b"not the secret at all"))
    assert decoder.decode(body, asn1Spec=rfc9810.PKIMessage())[0]["body"].getName() == "error"
    # Ten wrong MACs in a row lock the reference: the right secret is refused after them, and the officers see why.
    from appliance.ipc import schema as S

    ref3, sec3 = secret(a, subject="CN=pbmac1-device")
    gw_name = x509.Name.from_rfc4514_string("CN=Donjon CMP gateway")
    for _ in range(10):
        post(a, _pbmac1_ir(gw_name, ref3.encode(), b"a guess, not the secret"))
    code, body, ct = post(a, _pbmac1_ir(gw_name, ref3.encode(), sec3.encode()))
    assert decoder.decode(body, asn1Spec=rfc9810.PKIMessage())[0]["body"].getName() == "error"
    creds = {c["ref"]: c for c in admin(a, S.ACmpCredentialList)["credentials"]}
    assert creds[ref3]["failures"] == 10 and creds[ref3]["uses_left"] == 1 and creds[ref2]["uses_left"] == 0
    # HTTP: wrong content type, and a bounded fuzz of the real request: every answer a CMP message or an HTTP error, the role alive.
    assert post(a, b"\x30\x00", "text/plain")[0] == 415
    pids = a.role_pids()
    seed = (d / "only-req.der").read_bytes()
    rnd = random.Random(17)
    for _ in range(25):
        s = bytearray(seed)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(len(s))
            s[pos] = rnd.randrange(256)
        code, body, ct = post(a, bytes(s))
        assert code == 200 and ct == "application/pkixcmp" and body[:1] == b"\x30"
    assert a.role_pids().get("gateway") == pids.get("gateway")
    records = [json.loads(x) for x in audit(a).splitlines() if x.startswith("{")]
    assert any(r["action"] == "cmp-auth" and r["outcome"] == "refused" and "wrong MAC" in r.get("detail", "") for r in records)
    assert any(r["action"] == "cmp-auth" and r.get("object") == ref3 and "locked" in r.get("detail", "") for r in records)

"""Issuance authority (issue 11 items 1-3): CA certificates only through the guarded CA operations,
per-CA allowed profiles enforced by the Factory and by the CIS from the policy kept in the token,
every issuance record naming the officer, and no issuance from a revoked CA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import adminops as ops
from appliance.client import AdminClient, ClientError
from appliance.ipc import schema as S
from appliance.ipc.channel import SyncChannel
from tests.conftest import OFFICERS, make_csr, openssl

DUAL = '\n[dual-control]\napprovals = 2\n\n[ca-profiles]\nissuing = ["tls-server", "tls-client", "ocsp-responder", "device"]\n'
# An operator profile with both uniqueness options on (item 15; they are off by default).
DEVICE = """kind = "end-entity"
key_types = ["p256"]
key_usage = ["digital_signature"]
extended_key_usage = ["clientAuth"]
max_validity_days = 30
unique_subject = true
unique_key = true
[[subject]]
attr = "CN"
presence = "required"
"""


def audit_records(a) -> list[dict]:
    return [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]


def pending_id(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0 and b"is pending" in r.stdout, r.stdout + r.stderr
    return r.stdout.split(b"#")[1].split(b" ")[0].decode()


def test_ca_issuance_is_guarded_per_ca_profiles_officer_audited_and_revoked_ca_refused(appliance_factory, homes, tmp_path):
    home = homes / "home0"  # the factory's first home: the operator profile is there before `donjon init`
    (home / "profiles").mkdir(parents=True)
    os.chmod(home, 0o711)
    (home / "profiles" / "device.toml").write_text(DEVICE)
    a = appliance_factory(config=DUAL, officers={**OFFICERS, "oper2": "operator"})
    assert a.home == home
    sub_csr = make_csr(tmp_path, "sub", san=None, subj="/CN=Rogue Sub CA/O=Donjon Test")
    www = make_csr(tmp_path, "www")

    # Item 1: `issue` with a CA profile is refused at once, by one operator or any, from any CA.
    for ca in ("root", "issuing"):
        r = a.cli("issue", "--ca", ca, "--profile", "sub-ca", "--csr", str(sub_csr), "--out", str(tmp_path / "x.pem"), check=False)
        assert r.returncode == 1 and b"only by `donjon ca sign-csr`" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr and not (tmp_path / "x.pem").exists()
    # A root issues no end-entity certificate; donjon.toml [ca-profiles] limits the issuing CA.
    r = a.cli("issue", "--ca", "root", "--profile", "tls-server", "--csr", str(www), check=False)
    assert r.returncode == 1 and b"may not issue profile 'tls-server'" in r.stderr, r.stderr
    r = a.cli("issue", "--ca", "issuing", "--profile", "user-auth", "--csr", str(make_csr(tmp_path, "u", san="email:u@example.org",
                                                                                            subj="/CN=U")), check=False)
    assert r.returncode == 1 and b"may not issue profile 'user-auth'" in r.stderr, r.stderr
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(www), "--out", str(tmp_path / "www.pem"))

    # The guarded path still certifies a sub-CA, with two officers.
    pid = pending_id(a.cli("ca", "sign-csr", str(sub_csr), "--parent", "root", "--out", str(tmp_path / "sub.pem"), check=False))
    assert not (tmp_path / "sub.pem").exists()
    a.cli("approve", pid, officer="oper2")

    # A new CA with its own list: kept in its token policy.
    pid = pending_id(a.cli("ca", "create", "clients", "--parent", "root", "--subject", "CN=Clients CA,O=Donjon Test",
                           "--allow-profile", "tls-client", check=False))
    a.cli("approve", pid, officer="oper2")
    cas = {c["name"]: c for c in json.loads(a.cli("ca", "list", "--json").stdout)}
    assert cas["clients"]["issues"] == "tls-client" and cas["clients"]["state"] == "active"
    assert cas["root"]["issues"] == "kind sub-ca, kind ocsp-responder"
    client_csr = make_csr(tmp_path, "cl", san="URI:spiffe://example.org/ns/prod/sa/web", subj="/CN=web")
    r = a.cli("issue", "--ca", "clients", "--profile", "tls-server", "--csr", str(www), check=False)
    assert r.returncode == 1 and b"may not issue profile 'tls-server'" in r.stderr
    a.cli("issue", "--ca", "clients", "--profile", "tls-client", "--csr", str(client_csr))

    # Item 2: every record of the issuance pipeline names the officer who asked.
    recs = [r for r in audit_records(a) if r["action"] in ("issue", "ca-sign-csr")]
    assert {r["outcome"] for r in recs} == {"ok", "refused"}
    assert all(r["actor"].startswith("officer:oper ") for r in recs if r["action"] == "issue"), recs
    assert not [r for r in audit_records(a) if r["actor"] == "factory"]

    # Item 3: revoke the clients CA (revoke-ca is guarded); it then issues nothing, and says why.
    serial = json.loads(a.cli("ca", "show", "clients").stdout)["serial"]
    pid = pending_id(a.cli("revoke", "--ca", "root", serial, "--reason", "cessationOfOperation", check=False))
    a.cli("approve", pid, officer="oper2")
    r = a.cli("issue", "--ca", "clients", "--profile", "tls-client", "--csr", str(client_csr), check=False)
    assert r.returncode == 1 and b"CA 'clients' is revoked" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    shown = json.loads(a.cli("ca", "show", "clients").stdout)
    assert shown["state"] == "revoked" and "was revoked on" in shown["state_reason"]
    lines = a.cli("ca", "list").stdout.decode().splitlines()
    assert any(ln.startswith("clients") and " revoked " in ln for ln in lines) and any(" active " in ln for ln in lines)
    refused = [r for r in audit_records(a) if r["action"] == "issue" and r["object"] == "clients" and r["outcome"] == "refused"]
    assert refused and "revoked" in refused[-1]["detail"] and refused[-1]["actor"].startswith("officer:oper ")

    # Item 16: the SPIFFE client certificate above passed the pre-sign lint; the audit certificate
    # has its authority key identifier and passes pkilint's RFC 5280 checks (the real CLI).
    audit_pem = tmp_path / "audit.pem"
    a.cli("audit", "cert", "--out", str(audit_pem))
    audit_cert = x509.load_pem_x509_certificate(audit_pem.read_bytes())
    aki = audit_cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == audit_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    r = subprocess.run([str(Path(sys.executable).parent / "lint_pkix_cert"), "lint", "-s", "WARNING", str(audit_pem)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout

    # Item 15: uniqueness options, per profile. Off by default: the same CSR twice under tls-server.
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(www))
    key_a, key_b = make_csr(tmp_path, "ka", san=None, subj="/CN=dev1"), make_csr(tmp_path, "kb", san=None, subj="/CN=dev1")
    first = json.loads(a.cli("issue", "--ca", "issuing", "--profile", "device", "--csr", str(key_a), "--json").stdout)[0]
    r = a.cli("issue", "--ca", "issuing", "--profile", "device", "--csr", str(key_b), check=False)
    assert r.returncode == 1 and b"requires unique names" in r.stderr and first["serial"].encode() in r.stderr, r.stderr
    key_a2 = tmp_path / "ka2.csr"  # the same key under another name
    openssl("req", "-new", "-key", str(tmp_path / "ka.key"), "-subj", "/CN=dev2", "-out", str(key_a2))
    r = a.cli("issue", "--ca", "issuing", "--profile", "device", "--csr", str(key_a2), check=False)
    assert r.returncode == 1 and b"forbids key re-use" in r.stderr, r.stderr
    # Two CSRs for one new name in one request: the first is issued, the second refused.
    c1, c2 = make_csr(tmp_path, "c1", san=None, subj="/CN=dev3"), make_csr(tmp_path, "c2", san=None, subj="/CN=dev3")
    r = a.cli("issue", "--ca", "issuing", "--profile", "device", "--csr", str(c1), "--csr", str(c2), "--json", check=False)
    docs = json.loads(r.stdout)
    assert r.returncode == 1 and "serial" in docs[0] and "being issued now" in docs[1]["error"], docs
    # Once the first is revoked, the name is free for another key.
    a.cli("revoke", "--ca", "issuing", first["serial"], "--reason", "superseded")
    second = json.loads(a.cli("issue", "--ca", "issuing", "--profile", "device", "--csr", str(key_b), "--json").stdout)[0]

    # `cert list` filters: subject, SAN, status, expiry window, profile (in-process through the admin
    # socket, the CLI's own operation; once through the CLI below).
    opts = {"--subject": "subject", "--san": "san", "--status": "status", "--expires-within": "expires_within",
            "--profile": "profile", "--ca": "ca"}

    def listed(*args: str) -> list[str]:
        kw: dict = {opts[k]: int(v) if k == "--expires-within" else v for k, v in zip(args[::2], args[1::2])}
        with AdminClient(str(a.home), timeout=30, session=a.session("oper")) as c:
            return [d["serial"] for d in ops.cert_list(c, kw.pop("ca", None), 100, **kw)]
    assert [d["serial"] for d in json.loads(a.cli("cert", "list", "--json", "--subject", "dev1", "--status", "revoked").stdout)] == [first["serial"]]
    assert listed("--subject", "CN=DEV1") == [second["serial"], first["serial"]]
    assert listed("--subject", "dev1", "--status", "valid") == [second["serial"]]
    assert first["serial"] in listed("--status", "revoked") and second["serial"] not in listed("--status", "revoked")
    assert listed("--status", "expired") == []
    soon = set(listed("--expires-within", "31", "--profile", "device"))
    assert second["serial"] in soon and first["serial"] not in soon and soon == set(listed("--profile", "device", "--status", "valid"))
    assert first["serial"] not in listed("--expires-within", "31") and listed("--expires-within", "29") == []
    spiffe = listed("--san", "spiffe://example.org/")
    assert len(spiffe) == 1 and listed("--san", "dns:www.example.org", "--ca", "issuing") and listed("--san", "%") == []
    r = a.cli("cert", "list", "--status", "bogus", check=False)
    assert r.returncode == 1 and b"unknown status" in r.stderr

    # Item 4: `config set` goes through the admin socket: an administrator's session, audited.
    toml = (a.home / "donjon.toml").read_text()
    r = a.cli("config", "set", "crl.validity-hours", "48", officer="oper", check=False)
    assert r.returncode == 1 and b"may not config-set" in r.stderr and (a.home / "donjon.toml").read_text() == toml
    r = a.cli("config", "set", "crl.validity-hours", "1e9", officer="admin", check=False)
    assert r.returncode == 1 and b"not a whole number" in r.stderr and b"Traceback" not in r.stderr
    assert "takes effect" in a.cli("config", "set", "crl.validity-hours", "48", officer="admin").stdout.decode()
    assert "[crl]\nvalidity-hours = 48" in (a.home / "donjon.toml").read_text()
    with AdminClient(str(a.home), timeout=30, session=a.session("admin")) as c:  # past the CLI's own check
        try:
            c.call(S.AConfigSet, key="hsm.module", value="/tmp/evil.so")
            raise AssertionError("hsm.module was accepted")
        except ClientError as e:
            assert "unknown setting 'hsm.module'" in str(e)
    assert "evil" not in (a.home / "donjon.toml").read_text()
    cfg = [(r["actor"].split()[0], r["object"], r["outcome"]) for r in audit_records(a) if r["action"] == "config-set"]
    assert cfg == [("officer:oper", "-", "denied"), ("officer:admin", "crl.validity-hours", "ok"),
                   ("officer:admin", "hsm.module", "refused")], cfg

    # Item 1, in the CIS itself: a stand-in Factory speaking the real schema to the real CIS role.
    root_pem = a.export("root", tmp_path / "root.pem")
    issuing_pem = a.export("issuing", tmp_path / "issuing.pem")
    issuing_spki = x509.load_pem_x509_certificate(issuing_pem.read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    a.stop()
    old_audit = audit_cert_without_aki(a.home, a.src)  # what an appliance made before the fix holds
    out = standin_factory(a.home, a.src, issuing_spki)
    assert out["issuing/sub-ca"].startswith("profile: CA 'issuing' may not issue profile 'sub-ca'"), out
    assert "ca-policy" in out["issuing/sub-ca"]
    assert out["root/tls-server"].startswith("profile: CA 'root' may not issue profile 'tls-server'"), out
    assert out["issuing/user-auth"].startswith("profile: CA 'issuing' may not issue profile 'user-auth'"), out
    assert "already has its certificate in the token" in out["widen-issuing"] and "never changed" in out["widen-issuing"], out
    # An older audit certificate without an AKI is replaced, for the same key, when the CIS first needs it.
    new_audit = x509.load_der_x509_certificate(bytes.fromhex(out["audit-cert"]))
    assert new_audit.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert new_audit.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == old_audit
    # The control: the same harness gets a good certificate where the policy allows it.
    good = tmp_path / "good.pem"
    assert len(out["issuing/tls-server"]) > 200, out
    good.write_bytes(x509.load_der_x509_certificate(bytes.fromhex(out["issuing/tls-server"])).public_bytes(serialization.Encoding.PEM))
    openssl("verify", "-CAfile", str(root_pem), "-untrusted", str(issuing_pem), str(good))


DOWNGRADE = r"""
import sys
from datetime import datetime, timedelta, timezone
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pkcs11 import Attribute, ObjectClass
from hsm.token import Token, make_private_key
t = Token("/usr/lib/softhsm/libsofthsm2.so", "donjon")
t.login(sys.argv[1])
key = t.key("donjon-audit")
for o in list(t._session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: "donjon-audit"})):
    o.destroy()
pub = serialization.load_der_public_key(key.spki)
name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Donjon audit key donjon")])
now = datetime.now(timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub).serial_number(7)
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(make_private_key(t, key), hashes.SHA256()))
t.store_certificate("donjon-audit", cert.public_bytes(serialization.Encoding.DER), name.public_bytes())
sys.stdout.write(key.spki.hex())
"""


def audit_cert_without_aki(home: Path, src: str) -> bytes:
    """Put back the audit certificate as Donjon made it before (no AKI), for the same key in the real token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=src, SOFTHSM2_CONF=str(home / "softhsm" / "softhsm2.conf"))
    r = subprocess.run([sys.executable, "-c", DOWNGRADE, (home / "pin").read_text().strip()], env=env, capture_output=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(r.stdout.decode())


def standin_factory(home: Path, src: str, issuing_spki: bytes) -> dict[str, str]:
    """Start the real CIS role (`donjon role cis`) on socketpairs and play supervisor and Factory."""
    sup_a, sup_b = socket.socketpair()
    fac_a, fac_b = socket.socketpair()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = src
    argv = [sys.executable, "-m", "appliance.cli", "role", "cis", "--fd", f"sup-cis={sup_b.fileno()}",
            "--fd", f"factory-cis={fac_b.fileno()}", "--rw", str(home / "softhsm"), "--ro", "/usr/lib/softhsm", "--ro", "/etc/softhsm"]
    proc = subprocess.Popen(argv, pass_fds=[sup_b.fileno(), fac_b.fileno()], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sup_b.close()
    fac_b.close()
    sup_a.settimeout(60)
    fac_a.settimeout(60)
    sup = SyncChannel(sup_a, "sup-cis", S.CisToSup)
    fac = SyncChannel(fac_a, "factory-cis", S.CisToFactory)
    out: dict[str, str] = {}
    try:
        sup.handshake()
        sup.send(S.CisConfig(module="/usr/lib/softhsm/libsofthsm2.so", token_label="donjon",
                             softhsm_conf=str(home / "softhsm" / "softhsm2.conf"), profiles={}, base_url=None))
        fac.handshake()
        assert isinstance(sup.recv(), S.Ready)
        fac.send(S.Activate(id=1, pin=(home / "pin").read_text().strip(), wrapped_db_key=(home / "cmdb" / "cmdb.key").read_bytes()))
        assert isinstance(fac.recv(), S.Activated)
        key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        now = int(__import__("time").time())
        cases = [("issuing/sub-ca", "issuing", "sub-ca", key, None, ()), ("root/tls-server", "root", "tls-server", key, None, ()),
                 ("issuing/user-auth", "issuing", "user-auth", key, None, ()),
                 ("widen-issuing", "root", "sub-ca", issuing_spki, "issuing", ("sub-ca",)),
                 ("issuing/tls-server", "issuing", "tls-server", key, None, ())]
        for i, (label, ca, profile, spki, install_as, kinds) in enumerate(cases, 2):
            sans = (("dns", "www.example.org"),) if profile == "tls-server" else (("email", "u@example.org"),) if profile == "user-auth" else ()
            cn = "www.example.org" if profile == "tls-server" else f"standin {i}"
            item = S.IssueItem(profile=profile, spki=spki, subject=(("CN", cn),), sans=sans, serial=os.urandom(15) + b"\x01",
                               validity=S.Validity(now - 60, now + 86400), install_as=install_as, allowed_kinds=kinds)
            fac.send(S.Issue(id=i, ca=ca, self_signed=False, items=[item]))
            m = fac.recv()
            if isinstance(m, S.Refused):
                out[label] = m.reason
            else:
                o = m.outcomes[0]
                out[label] = o.cert.hex() if o.cert else o.error
        fac.send(S.GetAuditCert(id=99))
        m = fac.recv()
        out["audit-cert"] = m.cert.hex() if isinstance(m, S.AuditCert) else m.reason
        sup.send(S.Shutdown())
        log = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sup_a.close()
        fac_a.close()
    return out

"""Officers on the real appliance: the role x operation matrix (every denial refused and audited),
bootstrap, TOTP, and dual control (M-1 approvals do nothing, M run it)."""

from __future__ import annotations

import base64
import json
import time
import typing

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from appliance.client import AdminClient, ClientError
from appliance.factory import admin
from appliance.ipc import schema as S
from tests.conftest import PASSWORD

PUBLIC = {"status", "activate", "activate-shares", "login", "resume", "logout", "ca-list", "officer-unlock-shares"}
READ = {"ca-show", "ca-export", "cert-show", "cert-list", "crl-export", "ocsp-status", "pending-list", "approve",
        "audit-cert", "audit-checkpoint", "ceremony-record", "ceremony-begin", "ceremony-witness", "ceremony-records", "dist-status", "dist-list", "ocsp-tenant-list",
        "crl-calendar-status", "cmp-credential-list", "cmp-request-list", "acme-eab-list", "kgs-cards"}
# What the issue asks for, written independently of the Factory's table.
EXPECTED = {
    "administrator": READ | {"officer-add", "officer-remove", "officer-unlock", "officer-list", "officer-passwd", "officer-totp",
                             "backup", "shutdown-request", "config-set", "keys-backup", "keys-backup-fetch",
                             "ocsp-tenant-add", "ocsp-tenant-update", "ocsp-tenant-remove", "ocsp-tenant-csr", "clock-set",
                             "officer-ssh-key", "acme-eab-add", "acme-eab-revoke"},
    "operator": READ | {"ca-create", "ca-sign-csr", "issue", "revoke", "unrevoke", "crl-generate", "ocsp-responder-cert", "reconcile",
                        "ca-create-root", "dist-retry", "ocsp-tenant-crl", "ocsp-tenant-serials",
                        "cmp-credential-add", "cmp-credential-revoke", "cmp-decide",
                        "kgs-personalise-req", "kgs-letters-req", "kgs-letter-status", "kgs-reprint", "kgs-recover-req", "kgs-recover-take",
                        "ca-request", "ca-install", "crl-presign", "crl-calendar-load",
                        "enrol-secret-create", "enrol-secret-revoke", "enrol-secret-list", "enrol-waiting", "enrol-decide"},
    "auditor": READ | {"audit-export", "reconcile", "officer-list", "enrol-secret-list", "enrol-waiting"},
}
# One harmless instance of every non-public admin request (names that do not exist, passwords too short).
SAMPLES = [
    S.ACaShow(id=1, name="nope"), S.ACaExport(id=1, name="nope"),
    S.ACertShow(id=1, ca="nope", serial=b"\x01"), S.ACertList(id=1, ca="nope"), S.ACrlExport(id=1, ca="nope"),
    S.AOcspStatus(id=1), S.APendingList(id=1), S.AApprove(id=1, request=999999), S.AAuditCert(id=1), S.AAuditCheckpoint(id=1),
    S.ACaCreate(id=1, name="m-x", parent="nope", profile="sub-ca", key_type="p256", subject=(("CN", "x"),), validity_days=10),
    S.ACaSignCsr(id=1, parent="nope", profile="sub-ca", csr=b"junk", validity_days=10),
    S.AIssue(id=1, ca="nope", profile="tls-server", csrs=[b"junk"]), S.ARevoke(id=1, ca="nope", serial=b"\x01", reason=0),
    S.AUnrevoke(id=1, ca="nope", serial=b"\x01"),
    S.ACrlGenerate(id=1, ca="nope"), S.AOcspResponderCert(id=1, ca="nope"), S.AAuditExport(id=1), S.AReconcile(id=1),
    S.AOfficerAdd(id=1, name="m-new", roles=("operator",), password="short"), S.AOfficerList(id=1),
    S.AOfficerRemove(id=1, name="nobody"), S.AOfficerPasswd(id=1, name="nobody", password="short"),
    S.AOfficerUnlock(id=1, name="nobody"), S.AOfficerTotp(id=1, name="nobody", enable=False),
    S.ADistStatus(id=1), S.ADistList(id=1), S.ADistRetry(id=1, rule="nope"),
    S.AOcspTenantList(id=1), S.AOcspTenantAdd(id=1, name="nope", ca_cert=b"junk"), S.AOcspTenantUpdate(id=1, name="nope"),
    S.AOcspTenantRemove(id=1, name="nope"), S.AOcspTenantCsr(id=1, name="nope"), S.AOcspTenantCrl(id=1, name="nope", crl=b"junk"),
    S.AOcspTenantSerials(id=1, name="nope", data=None),
    S.ACaCreateRoot(id=1, name="m-root", profile="nope", key_type="p256", subject=(("CN", "x"),), validity_days=10),
    S.ABackup(id=1), S.ACeremonyRecord(id=1, ceremony="m-x", transcript_sha256=b"\0" * 32, ceremony_seq=999999, witnesses=["nobody"]),
    S.ACeremonyBegin(id=1, ceremony="m-x"), S.ACeremonyWitness(id=1, ceremony_seq=999999), S.ACeremonyRecords(id=1, ceremony_seq=999999),
    S.AConfigSet(id=1, key="nope", value="x"),
    S.AKeysBackup(id=1, so_pin="not-the-so-pin", threshold=2, shares=2), S.AKeysBackupFetch(id=1, backup=999999),
    S.ACmpCredentialAdd(id=1, ca="nope", profile="nope"), S.ACmpCredentialList(id=1), S.ACmpCredentialRevoke(id=1, ref="nope"),
    S.ACmpRequestList(id=1), S.ACmpDecide(id=1, request=999999, approve=False),
    S.ACaRequest(id=1, name="m-x", profile="nope", key_type="p256", subject=(("CN", "x"),)),
    S.ACaInstall(id=1, name="nope", cert=b"junk"), S.ACrlPresign(id=1, ca="nope", periods=1, every_seconds=3600),
    S.ACrlCalendarLoad(id=1, bundle=b"junk"), S.ACrlCalendarStatus(id=1),
    S.AClockSet(id=1, time=1), S.AOfficerSshKey(id=1, name="nobody"),  # refused for its value (before 2023) where allowed: the clock is never set here
    S.AEnrolSecretCreate(id=1, protocol="scep", ca="nope", profile="nope"), S.AEnrolSecretList(id=1),
    S.AEnrolSecretRevoke(id=1, ref="nope"), S.AEnrolWaiting(id=1), S.AEnrolDecide(id=1, request="nope", approve=False),
    S.AAcmeEabAdd(id=1, profiles=("nope",)), S.AAcmeEabList(id=1), S.AAcmeEabRevoke(id=1, kid="nope"),
    S.AKgsPersonalise(id=1, profile="nope", batch="m-x", data=b"junk"), S.AKgsCards(id=1), S.AKgsLetters(id=1, batch="nope"),
    S.AKgsLetterStatus(id=1, card=999999, status="sent"), S.AKgsReprint(id=1, card=999999),
    S.AKgsRecover(id=1, card=999999, reason="x"), S.AKgsRecoverTake(id=1, recovery=999999),
]
# Sent only where they must be refused (allowed, they stop the appliance: tests/integration/test_console.py).
DISRUPTIVE = [S.AShutdown(id=1)]


def tag(m) -> str:
    return type(m).__struct_config__.tag


def attempt(c: AdminClient, msg):
    """Send one request as is; the first answer (a stream is drained)."""
    c.chan.send(msg)
    m = c.chan.recv()
    first = m
    while isinstance(m, S.BlobChunk) and not m.last:
        m = c.chan.recv()
    return first


def audit_records(a) -> list[dict]:
    return [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]


def test_every_admin_request_is_in_the_matrix():
    covered = {tag(m) for m in SAMPLES + DISRUPTIVE} | PUBLIC
    every = {c.__struct_config__.tag for c in typing.get_args(S.AdminRequest) if c is not S.Hello}
    assert every == covered, f"add these to SAMPLES/EXPECTED: {sorted(every - covered)}"
    # The Factory's admin-request table has a row for every request, with the permission written above.
    assert not admin.missing_rows(), f"no row in appliance/factory/admin.py TABLE: {admin.missing_rows()}"
    for cls in typing.get_args(S.AdminRequest):
        if cls is S.Hello:
            continue
        op, row = cls.__struct_config__.tag, admin.TABLE[cls]
        want = None if op in PUBLIC else frozenset(r for r in EXPECTED if op in EXPECTED[r])
        assert row.allowed == want, (op, row.allowed, want)


@pytest.fixture(scope="module")
def officers_box(module_appliance):
    """One appliance for the matrix, the sessions and the TOTP tests (in that order: only the last turns on
    a second factor, for `oper`); each looks only at its own audit records and officers."""
    return module_appliance


def test_role_operation_matrix_denials_refused_and_audited(officers_box):
    a = officers_box
    denied: list[tuple[str, str]] = []
    for officer, role in (("admin", "administrator"), ("oper", "operator"), ("aud", "auditor"), (None, None)):
        with AdminClient(str(a.home), session=a.session(officer) if officer else None) as c:
            for msg in SAMPLES + DISRUPTIVE:
                op = tag(msg)
                allowed = role is not None and op in EXPECTED[role]
                if msg in DISRUPTIVE and allowed:
                    continue
                m = attempt(c, msg)
                if allowed:
                    assert not (isinstance(m, S.Refused) and m.code in ("denied", "auth", "login-required")), (officer, op, m)
                else:
                    # without a session: the typed "login-required" refusal (the CLI's cue to log in), never "auth"
                    assert isinstance(m, S.Refused) and m.code == ("denied" if officer else "login-required"), (officer, op, m)
                    denied.append((officer or "", op))
    assert len(denied) > 40
    recs = audit_records(a)
    for officer, op in denied:
        who = f"officer:{officer} " if officer else "admin:"
        assert any(r["action"] == op and r["outcome"] == "denied" and r["actor"].startswith(who) for r in recs), \
            f"no audit record for the denial of {op} to {officer or 'a client without a session'}"
    # and the whole chain still verifies
    assert b"audit chain intact" in a.cli("audit", "verify").stdout


def test_sessions_logout_and_cli_login(officers_box):
    a = officers_box
    env = {"DONJON_OFFICER": "", "DONJON_PASSWORD": PASSWORD}
    r = a.cli("login", "--officer", "admin", officer="admin", env=env)
    assert b"logged in as admin (administrator)" in r.stdout
    assert (a.session_file("admin").stat().st_mode & 0o777) == 0o600
    token = a.session_file("admin").read_text().strip()
    with AdminClient(str(a.home), session=token) as c:
        assert c.officer == "admin" and c.call(S.AOfficerList)["officers"]
    env_no_auto = {"DONJON_OFFICER": "", "DONJON_PASSWORD": ""}
    assert b"oper" in a.cli("officer", "list", env=env_no_auto).stdout
    a.cli("logout", officer="admin", env=env_no_auto)
    r = a.cli("officer", "list", env=env_no_auto, check=False)
    assert r.returncode == 1 and b"log in first" in r.stderr
    with pytest.raises(ClientError) as e:
        AdminClient(str(a.home), session=token)
    assert e.value.code == "auth"
    # the auditor role is exclusive, passwords have 12 characters at least
    r = a.cli("officer", "add", "mixed", "--role", "auditor", "--role", "operator", check=False)
    assert r.returncode == 1 and b"exclusive" in r.stderr
    r = a.cli("officer", "add", "shorty", "--role", "operator", env={"DONJON_PASSWORD": "short-pass"}, check=False)
    assert r.returncode == 1 and b"12 characters" in r.stderr


# Failed logins slow the peer down instead of locking the account: tests/security/test_lockout.py.


def test_totp_second_factor(officers_box):
    a = officers_box
    out = a.cli("officer", "totp", "oper", "--enable").stdout.decode()
    secret = out.split("secret ")[1].split()[0]
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    totp = TOTP(key, 6, hashes.SHA1(), 30, enforce_key_length=False)
    with AdminClient(str(a.home)) as c, pytest.raises(ClientError):
        c.login("oper", PASSWORD)  # no code
    code = totp.generate(time.time()).decode()
    with AdminClient(str(a.home)) as c:
        c.login("oper", PASSWORD, code)
    with AdminClient(str(a.home)) as c, pytest.raises(ClientError):
        c.login("oper", PASSWORD, code)  # the same code again: a replay
    recs = [r for r in audit_records(a) if r["action"] == "login" and r["object"] == "oper"]
    assert "replayed" in recs[-1]["detail"]


def test_bootstrap_allows_only_the_first_administrator(appliance_factory):
    a = appliance_factory(officers={})
    env = {"DONJON_OFFICER": "", "DONJON_PASSWORD": PASSWORD}
    r = a.cli("cert", "list", env=env, check=False)  # (ca list is public: it is not refused)
    assert r.returncode == 1 and b"officer add" in r.stderr
    r = a.cli("officer", "add", "first", "--role", "operator", env=env, check=False)
    assert r.returncode == 1 and b"administrator" in r.stderr
    a.cli("officer", "add", "first", "--role", "administrator", env=env)
    r = a.cli("officer", "add", "second", "--role", "administrator", env=env, check=False)
    assert r.returncode == 1 and b"log in first" in r.stderr
    recs = [json.loads(x) for x in a.cli("audit", "export", env={"DONJON_OFFICER": "first", "DONJON_PASSWORD": PASSWORD}, check=False).stdout.splitlines()]
    assert recs == []  # an administrator may not read the audit log
    with AdminClient(str(a.home)) as c:
        c.login("first", PASSWORD)
        c.call(S.AOfficerAdd, name="aud1", roles=("auditor",), password=PASSWORD)
    recs = [json.loads(x) for x in a.cli("audit", "export", env={"DONJON_OFFICER": "aud1", "DONJON_PASSWORD": PASSWORD}).stdout.splitlines()]
    adds = [(r["action"], r["object"], r["outcome"]) for r in recs if r["action"] == "officer-add"]
    assert adds == [("officer-add", "first", "denied"), ("officer-add", "first", "ok"), ("officer-add", "second", "denied"),
                    ("officer-add", "aud1", "ok")]


DUAL = """
[dual-control]
approvals = 2
expiry-minutes = 1

[officers]
session-idle-minutes = 1

[audit]
checkpoint-minutes = 1
"""
FIVE = {"admin": "administrator", "admin2": "administrator", "oper": "operator", "oper2": "operator", "aud": "auditor"}


def test_dual_control_m_minus_1_does_nothing_m_runs(appliance_factory):
    a = appliance_factory(config=DUAL, officers=FIVE)
    r = a.cli("ca", "create", "sub2", "--parent", "root", "--subject", "CN=Dual Sub,O=Donjon Test")
    assert b"pending" in r.stdout
    pid = int(r.stdout.split(b"#")[1].split()[0])
    # one approval of two (the requester's): nothing happened
    assert "sub2" not in [c["name"] for c in json.loads(a.cli("ca", "list", "--json").stdout)]
    pend = json.loads(a.cli("pending", "list", "--json").stdout)
    assert [(p["id"], p["approvals"], p["state"]) for p in pend] == [(pid, ["oper"], "open")]
    r = a.cli("approve", str(pid), check=False)  # the requester again
    assert r.returncode == 1 and b"another officer" in r.stderr
    r = a.cli("approve", str(pid), officer="aud", check=False)  # not a role that may create CAs
    assert r.returncode == 1 and b"may not approve" in r.stderr
    assert "sub2" not in [c["name"] for c in json.loads(a.cli("ca", "list", "--json").stdout)]
    # the second distinct operator: it runs
    r = a.cli("approve", str(pid), officer="oper2")
    assert b"executed" in r.stdout
    cas = {c["name"]: c for c in json.loads(a.cli("ca", "list", "--json").stdout)}
    assert "sub2" in cas
    r = a.cli("approve", str(pid), officer="admin", check=False)
    assert r.returncode == 1 and b"done" in r.stderr

    # revoking a CA certificate is guarded too; an end-entity revocation is not
    serial = cas["sub2"]["serial"]
    r = a.cli("revoke", "--ca", "root", serial, "--reason", "cessationOfOperation")
    assert b"pending" in r.stdout
    rid = int(r.stdout.split(b"#")[1].split()[0])
    assert not json.loads(a.cli("cert", "show", "--ca", "root", serial).stdout).get("revoked_at")
    a.cli("approve", str(rid), officer="oper2")
    assert json.loads(a.cli("cert", "show", "--ca", "root", serial).stdout).get("revoked_at")

    # officer changes need two administrators
    r = a.cli("officer", "add", "newbie", "--role", "operator")
    assert b"pending" in r.stdout
    oid = int(r.stdout.split(b"#")[1].split()[0])
    assert "newbie" not in a.cli("officer", "list").stdout.decode()
    r = a.cli("approve", str(oid), officer="oper", check=False)
    assert r.returncode == 1 and b"may not approve" in r.stderr
    a.cli("approve", str(oid), officer="admin2")
    assert "newbie" in a.cli("officer", "list").stdout.decode()

    recs = audit_records(a)
    trail = [(r["action"], r["object"], r["outcome"]) for r in recs if r["object"] == f"request#{pid}"]
    assert trail == [("dual-control", f"request#{pid}", "pending"), ("approve", f"request#{pid}", "refused"),
                     ("approve", f"request#{pid}", "denied"), ("approve", f"request#{pid}", "ok"),
                     ("dual-control", f"request#{pid}", "done"), ("approve", f"request#{pid}", "refused")]
    made = [r for r in recs if r["action"] == "ca-create" and r["object"] == "sub2"]
    assert len(made) == 1 and "approved-by:oper2" in made[0]["actor"] and made[0]["actor"].startswith("officer:oper ")

    # a request left waiting expires with its approvals; an idle session ends
    r = a.cli("officer", "add", "late", "--role", "operator")
    lid = int(r.stdout.split(b"#")[1].split()[0])
    idle = AdminClient(str(a.home))
    idle.login("aud", PASSWORD)
    time.sleep(62)
    r = a.cli("approve", str(lid), officer="admin2", check=False)
    assert r.returncode == 1 and b"expired" in r.stderr
    assert "late" not in a.cli("officer", "list").stdout.decode()
    with pytest.raises(ClientError) as e:
        idle.call(S.APendingList)
    assert e.value.code == "auth" and "expired" in str(e.value)
    idle.close()
    recs = audit_records(a)
    trail = [(r["action"], r["outcome"]) for r in recs if r["object"] == f"request#{lid}"]
    assert trail == [("dual-control", "pending"), ("dual-control", "expired"), ("approve", "refused")]
    # the schedule signed the moving head meanwhile (every minute here)
    assert any(r["action"] == "audit-checkpoint" and r["actor"] == "factory:checkpoint-scheduler" and r["outcome"] == "ok" for r in recs)
    assert b"audit checkpoint: seq" in a.cli("status").stdout

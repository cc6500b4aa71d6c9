"""Issue 15's restore scenario: backup -> issue, revoke, CRL #7 -> restore. The revocations survive (OCSP
and the next CRL), CRL numbers resume above 7, no destination ever gets a lower number than it holds,
an older backup needs a quorum, and a kill -9 during the restore leaves the old CMDB or the restored one."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import tarfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509

from policy import shamir
from tests.conftest import PASSWORD, make_csr, openssl
from tests.integration.test_distribution import wait_drained
from tests.servers import ADMIN_DN, ADMIN_PW, BASE, Receiver, Slapd

WEB = """
[distribution]
backoff-max = 1
[[distribution.rule]]
name = "web"
url = "{url}/pub/{{name}}"
publish = ["crl", "issued-serials"]
cas = ["issuing"]
[[distribution.rule]]
name = "directory"
url = "{ldap}"
bind-dn = "{bind_dn}"
secret-file = "{secret}"
publish = ["crl"]
ca-dn = "cn={{CN}},ou=CAs,{base}"
timeout = 2.0
"""


def _number(der: bytes) -> int:
    return x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _ocsp_status(a, tmp_path: Path, cert: Path) -> bytes:
    r = openssl("ocsp", "-issuer", str(tmp_path / "issuing.pem"), "-cert", str(cert), "-url", a.endpoint + "/ocsp",
                "-CAfile", str(tmp_path / "root.pem"), "-no_nonce", check=False)
    return r.stdout


def _this_update(out: bytes, field: str = "This Update") -> datetime:
    line = next(ln for ln in out.decode().splitlines() if f"{field}:" in ln)
    return datetime.strptime(" ".join(line.split(":", 1)[1].split()), "%b %d %H:%M:%S %Y GMT")


def _next_update(out: bytes) -> datetime:
    return _this_update(out, "Next Update")


def _cmdb_sha(home: Path) -> str:
    return hashlib.sha256((home / "cmdb" / "cmdb.sqlite").read_bytes()).hexdigest()


def test_restore_never_goes_back(appliance_factory, homes, tmp_path):
    web, ldap = Receiver(homes / "web"), Slapd(homes / "slapd")
    try:
        ldap.start()
        _scenario(appliance_factory, web, ldap, homes, tmp_path, kills=0)
    finally:
        web.stop()
        ldap.stop()


@pytest.mark.slow
def test_restore_killed_at_random_moments(appliance_factory, homes, tmp_path):
    """The same scenario with kill -9 at random moments of the restore first (just drills)."""
    web, ldap = Receiver(homes / "web"), Slapd(homes / "slapd")
    try:
        ldap.start()
        _scenario(appliance_factory, web, ldap, homes, tmp_path, kills=int(os.environ.get("DONJON_RESTORE_KILLS", "12")))
    finally:
        web.stop()
        ldap.stop()


def _list_number(der: bytes) -> int:
    from policy import serials
    return serials.decode(der).number


def _scenario(appliance_factory, web: Receiver, ldap: Slapd, homes: Path, tmp_path: Path, kills: int) -> None:
    a = appliance_factory(start=False)
    (homes / "ldap.secret").write_text(ADMIN_PW + "\n")
    with open(a.home / "donjon.toml", "a") as f:
        f.write(WEB.format(url=web.url, ldap=ldap.url, bind_dn=ADMIN_DN, secret=homes / "ldap.secret", base=BASE))
    a.start()
    a.export("root", tmp_path / "root.pem")
    a.export("issuing", tmp_path / "issuing.pem")

    def issue(name: str) -> tuple[str, Path]:
        csr = make_csr(tmp_path, name, san=f"DNS:{name}.example.org")
        out = tmp_path / f"{name}.pem"
        a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(out))
        return format(x509.load_pem_x509_certificate(out.read_bytes()).serial_number, "x"), out

    a.cli("officer", "add", "admin2", "--role", "administrator")  # the restore's second administrator (dual control)
    a.officers["admin2"] = "administrator"
    before, before_pem = issue("before")  # in the backup; revoked after it
    a.cli("backup", "--out", str(tmp_path / "b.tar"), officer="admin")
    after, after_pem = issue("after")  # issued and revoked after the backup: the CMDB will never have seen it
    good, good_pem = issue("good")  # issued after the backup, never revoked: known only from the endpoint's response
    for s in (before, after):
        a.cli("revoke", "--ca", "issuing", s, "--reason", "keyCompromise")
    crls: dict[int, bytes] = {}
    for _ in range(10):
        der = a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "gen.crl")) and (tmp_path / "gen.crl").read_bytes()
        crls[_number(der)] = der
        if max(crls) >= 7:
            break
    assert max(crls) == 7
    for n in range(1, 7):
        crls.setdefault(n, a.cli("crl", "export", "--ca", "issuing", "--number", str(n)).stdout)
    # an issued-serials list published after the backup: only its destination holds it
    a.cli("crl", "generate", "--ca", "issuing", "--issued-serials", "--out", str(tmp_path / "gen.serials"))
    wait_drained(a)
    held_list = _list_number((homes / "web" / "pub_issuing.serials").read_bytes())
    ca_dn = f"cn=Donjon Test Issuing CA,ou=CAs,{BASE}"
    assert _number(ldap.search(ca_dn, "certificateRevocationList;binary")[0]) == 7
    for pem in (before_pem, after_pem):
        assert b": revoked" in _ocsp_status(a, tmp_path, pem)
    # what the endpoint holds: a fresh signature after the restore has a later nextUpdate (its thisUpdate may
    # equal the held one: a revoked certificate's floor is its revocation time, backdating reaches it)
    held_tu = {p: _next_update(_ocsp_status(a, tmp_path, p)) for p in (after_pem, good_pem)}
    assert b": good" in _ocsp_status(a, tmp_path, good_pem)
    a.cli("audit", "checkpoint", "--out", str(tmp_path / "head.json"))  # the published anchor
    assert a.stop() == 0

    # The backup checks, then a restore an operator would try: refused, it is older than the anchor.
    assert b"backup intact" in a.cli("backup", "verify", str(tmp_path / "b.tar")).stdout
    bad = tmp_path / "bad.tar"
    with tarfile.open(tmp_path / "b.tar") as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "cmdb.key":
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.addfile(m, __import__("io").BytesIO(data))
    r = a.cli("backup", "verify", str(bad), check=False)
    assert r.returncode == 1 and b"cmdb.key does not match its SHA-256" in r.stderr
    old_sha = _cmdb_sha(a.home)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "bad-pw").write_text("not the password\n")
    two = ["--officer", "admin", "--password-file", str(tmp_path / "pw"), "--officer", "admin2", "--password-file", str(tmp_path / "pw")]
    base = ["restore", str(tmp_path / "b.tar"), "--home", str(a.home), "--max-age-days", "30"]
    # Dual control: one administrator alone (or the same one twice) is refused before anything is read.
    r = a.cli(*base, "--officer", "admin", check=False)
    assert r.returncode == 1 and b"two distinct administrators" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    # Two names, but checked against the backup's own officers: a wrong password and a non-administrator.
    r = a.cli(*base, "--officer", "admin2", "--password-file", str(tmp_path / "bad-pw"), "--officer", "oper",
              "--password-file", str(tmp_path / "pw"), check=False)
    assert r.returncode == 1 and b"admin2: wrong password or code" in r.stderr and b"oper: not an administrator" in r.stderr, r.stderr
    assert _cmdb_sha(a.home) == old_sha and not (a.home / "cmdb.restoring").exists()
    assert not (a.home / "cmdb" / "restore-check.sqlite").exists() and not (a.home / "cmdb" / "restore.json").exists()
    r = a.cli(*base[:-2], "--anchor", str(tmp_path / "head.json"), *two, check=False)
    assert r.returncode == 1 and b"before the published anchor" in r.stderr and b"quorum" in r.stderr, r.stderr
    assert _cmdb_sha(a.home) == old_sha and not (a.home / "cmdb.restoring").exists()
    pin = (a.home / "pin").read_text().strip()
    shares = shamir.split_pin(pin, 2, 3, os.urandom)  # the officers' activation shares (this test made them)
    wrong = shamir.split_pin("not-the-pin", 2, 3, os.urandom)
    argv = ["restore", str(tmp_path / "b.tar"), "--home", str(a.home), "--anchor", str(tmp_path / "head.json"), *two]
    r = a.cli(*argv, "--confirm-share", wrong[0], "--confirm-share", wrong[2], check=False)
    assert r.returncode == 1 and b"do not give this appliance's PIN" in r.stderr
    assert _cmdb_sha(a.home) == old_sha

    # kill -9 at random moments of a restore: the old CMDB or the restored one, nothing else.
    with tarfile.open(tmp_path / "b.tar") as t:
        restored_sha = hashlib.sha256(t.extractfile("cmdb.sqlite").read()).hexdigest()
    rnd = random.Random(15)
    for _ in range(kills):
        cur = _cmdb_sha(a.home)
        p = subprocess.Popen(a.argv(*argv, "--confirm-share", shares[0], "--confirm-share", shares[1]), env=a.env("admin"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rnd.uniform(0.3, 8.0))  # the officers' check (a one-job run of the roles) comes before the swap
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
        now = _cmdb_sha(a.home)
        assert now in (cur, restored_sha)
        if now == restored_sha:  # restored, not yet reconciled: the evidence is there with it
            assert (a.home / "cmdb" / "restore.json").exists()
        assert (a.home / "cmdb" / "cmdb.key").exists()
    r = a.cli(*argv, "--confirm-share", shares[0], "--confirm-share", shares[1], "--json")
    doc = json.loads(r.stdout)
    assert doc["older_confirmed"] is True and doc["officers"] == ["admin", "admin2"] and doc["unread_destinations"] == []
    # read back: the CRL held by the HTTP destination and by the directory, the list held by the HTTP destination
    assert doc["evidence"]["issuing"]["destination_crls"] == 2 and doc["evidence"]["issuing"]["destination_lists"] == 1
    assert _cmdb_sha(a.home) == restored_sha and (a.home / "cmdb" / "restore.json").exists()

    a.start()  # activation reconciles with what the endpoint had published
    for pem in (before_pem, after_pem):
        assert b": revoked" in _ocsp_status(a, tmp_path, pem)
    # The certificates the restored CMDB never saw get freshly signed responses (re-entered by serial, migration 17):
    # still revoked, still good, never unknown, and newer than what the endpoint held.
    for pem, status in ((after_pem, b": revoked"), (good_pem, b": good")):
        for _ in range(100):
            out = _ocsp_status(a, tmp_path, pem)
            if _next_update(out) > held_tu[pem]:
                break
            time.sleep(0.1)
        assert status in out and _next_update(out) > held_tu[pem], out
    latest = a.cli("crl", "export", "--ca", "issuing").stdout
    n = _number(latest)
    assert n > 7
    revoked = {format(r.serial_number, "x"): r.extensions.get_extension_for_class(x509.CRLReason).value.reason
               for r in x509.load_der_x509_crl(latest)}
    assert revoked[before] == revoked[after] == x509.ReasonFlags.key_compromise  # with their reason
    crls[n] = latest
    wait_drained(a)
    by_sha = {hashlib.sha256(d).hexdigest(): k for k, d in crls.items()}
    pushed = [by_sha[ln[4]] for ln in web.log() if ln[1].endswith("issuing.crl") or "crl" in ln[1]]
    assert pushed and all(x < y for x, y in zip(pushed, pushed[1:])), pushed  # never lower than the destination holds
    assert pushed[-1] == n
    assert _number(ldap.search(ca_dn, "certificateRevocationList;binary")[0]) == n  # the directory moved on, up
    # The issued-serials list resumes above the one its destination holds (the restored CMDB's counter was lower).
    new_list = a.cli("crl", "generate", "--ca", "issuing", "--issued-serials", "--out", str(tmp_path / "new.serials")) \
        and (tmp_path / "new.serials").read_bytes()
    assert _list_number(new_list) > held_list
    wait_drained(a)
    assert _list_number((homes / "web" / "pub_issuing.serials").read_bytes()) >= _list_number(new_list)
    recs = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]
    recovered = {x["object"] for x in recs if x["action"] == "recovered"}
    assert f"issuing/{before}" in recovered and f"issuing/{after}" in recovered and f"issuing/{good}" in recovered
    restore_rec = [x for x in recs if x["action"] == "restore" and x["outcome"] == "ok"][-1]
    assert "are lost" in restore_rec["detail"] and "confirmed by a quorum" in restore_rec["detail"]
    assert "authorised by admin and admin2 (dual control)" in restore_rec["detail"]
    refused = [x for x in recs if x["action"] == "restore" and x["outcome"] == "refused" and x["actor"] == "restore:admin2+oper"]
    assert len(refused) == 1 and "admin2: wrong password or code" in refused[0]["detail"]  # the refused attempt, audited
    assert b"audit chain intact" in a.cli("audit", "verify").stdout
    # A certificate issued now never takes a serial known issued.
    new, _ = issue("new")
    assert new not in (before, after, good)

    # A certificate known only by its serial is still revocable (a key can be compromised after a restore too):
    # on hold, released, then revoked for good; the endpoint says each state, the next full CRL carries it.
    def ocsp_says(status: bytes) -> bytes:
        for _ in range(150):
            out = _ocsp_status(a, tmp_path, good_pem)
            if status in out:
                return out
            time.sleep(0.1)
        raise AssertionError(out)

    r = a.cli("revoke", "--ca", "issuing", good, "--reason", "certificateHold")
    assert b"known only by its serial" in r.stdout, r.stdout
    ocsp_says(b": revoked")
    a.cli("revoke", "--ca", "issuing", good, "--release")
    ocsp_says(b": good")
    r = a.cli("revoke", "--ca", "issuing", good, "--reason", "keyCompromise", "--json")
    assert json.loads(r.stdout)["known_by_serial_only"] is True
    assert b"Reason: keyCompromise" in ocsp_says(b": revoked")
    r = a.cli("revoke", "--ca", "issuing", good, "--reason", "keyCompromise", check=False)
    assert r.returncode == 1 and b"already revoked" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    r = a.cli("revoke", "--ca", "issuing", good, "--release", check=False)
    assert r.returncode == 1 and b"only a certificateHold can be released" in r.stderr, r.stderr
    r = a.cli("revoke", "--ca", "issuing", "7fffffffffff0001", "--reason", "keyCompromise", check=False)
    assert r.returncode == 1 and b"no certificate" in r.stderr, r.stderr  # neither issued nor recovered: refused as before
    a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "after-revoke.crl"))
    full = x509.load_der_x509_crl((tmp_path / "after-revoke.crl").read_bytes())
    entry = full.get_revoked_certificate_by_serial_number(int(good, 16))
    assert entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    r = openssl("crl", "-in", str(tmp_path / "after-revoke.crl"), "-inform", "DER", "-CAfile", str(tmp_path / "issuing.pem"),
                "-noout", check=False)
    assert r.returncode == 0 and b"verify OK" in r.stdout + r.stderr, r.stderr  # openssl checks its signature
    recs = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]
    mine = [x for x in recs if x["object"] == f"issuing/{good}" and x["action"] in ("revoke", "unrevoke")]
    assert [(x["action"], x["outcome"]) for x in mine] == [("revoke", "ok"), ("unrevoke", "ok"), ("revoke", "ok"),
                                                           ("revoke", "refused"), ("unrevoke", "refused")], mine
    assert all("known only by its serial" in x["detail"] for x in mine if x["outcome"] == "ok")

"""Revocation states judged by openssl, curl, snmptrapd and pkilint on one appliance (issue 11 items
5-8): removeFromCRL refused; certificateHold released or made permanent; no OCSP response dated before
the revocation it reports; Botan's OCSP request form answered; the delegated responder renewed before
it lapses, and an SNMP notification when that fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from appliance import adminops as ops
from appliance.client import AdminClient, ClientError
from appliance.ipc import schema as S
from appliance.snmp import mib as M
from policy import lint
from policy.ocsp import issuer_hashes
from tests.conftest import OFFICERS, Appliance, make_ceremony, openssl
from tests.data.ocsp.make import botan
from tests.integration.test_distribution import issue_user, wait_drained
from tests.integration.test_ocsp import BOUND, _free_port, _issue, _wait_for
from tests.integration.test_snmp_appliance import TRAP_COMMUNITY, _oid, _udp_port
from tests.servers import ADMIN_DN, ADMIN_PW, BASE, Slapd, snmptrapd


@pytest.fixture(scope="module")
def trap_log(tmp_path_factory):
    d = tmp_path_factory.mktemp("traps")
    env = dict(os.environ, SNMP_PERSISTENT_DIR=str(d), MIBS="", MIBDIRS="")
    with snmptrapd(d, f"authCommunity log {TRAP_COMMUNITY}\n", env) as (port, log):
        yield port, log


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    d = Slapd(tmp_path_factory.mktemp("slapd"))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def rev(src_path, tmp_path_factory, trap_log, slapd):
    """One appliance for the module: endpoint on a known port (CRL DP and AIA point at it), delegated
    responders renewed when less than 2 days remain, notifications to the module's snmptrapd, two
    operators' approvals for what touches a CA certificate, user certificates published to slapd."""
    base = Path(tempfile.mkdtemp(prefix="donjon-test-"))
    os.chmod(base, 0o711)
    tmp = tmp_path_factory.mktemp("revocation")
    a = Appliance(base / "home", src_path)
    a.init(make_ceremony(tmp / "ceremony.toml"), officers={**OFFICERS, "oper2": "operator"})
    port = _free_port()
    (base / "ldap.secret").write_text(ADMIN_PW + "\n")
    (a.home / "secrets").mkdir(mode=0o700)
    (a.home / "secrets" / "trap").write_text(TRAP_COMMUNITY + "\n")
    os.chmod(a.home / "secrets" / "trap", 0o600)  # SNMP secrets: 0600 files, never in donjon.toml
    (a.home / "donjon.toml").write_text(f"""
[ocsp]
listen = "127.0.0.1:{port}"
responder-days = 30
responder-renew-days = 2
[endpoint]
base-url = "http://127.0.0.1:{port}"
[dual-control]
approvals = 2
[snmp]
enabled = true
listen = "127.0.0.1:{_udp_port()}"
[[snmp.targets]]
host = "127.0.0.1"
port = {trap_log[0]}
version = "v2c"
community-file = "secrets/trap"
[distribution]
backoff-max = 2
[[distribution.rule]]
name = "directory"
url = "{slapd.url}"
bind-dn = "{ADMIN_DN}"
secret-file = "{base / 'ldap.secret'}"
publish = ["certs"]
profiles = ["user-auth"]
dn = "cn={{CN}},ou=people,{BASE}"
timeout = 2.0
""")
    a.start()
    try:
        yield a, tmp, a.export("root", tmp / "root.pem"), a.export("issuing", tmp / "issuing.pem"), \
            a.export("issuing", tmp / "chain.pem", chain=True)
    finally:
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


def _serial(pem: Path) -> str:
    return format(x509.load_pem_x509_certificate(pem.read_bytes()).serial_number, "x")


def _admin(a: Appliance) -> AdminClient:
    """In-process admin calls where the CLI itself is not what is judged (a CLI process costs ~1 s)."""
    return AdminClient(str(a.home), timeout=60, session=a.session())


def _crl(a: Appliance, tmp: Path, name: str) -> tuple[Path, str]:
    """A new CRL of `issuing` (DER file for pkilint, PEM file for openssl verify) and its text."""
    der = tmp / f"{name}.crl"
    with _admin(a) as c:
        der.write_bytes(ops.crl_generate(c, "issuing"))
    assert lint.lint_crl(der.read_bytes()) == []
    pem = tmp / f"{name}.crl.pem"
    openssl("crl", "-inform", "DER", "-in", str(der), "-out", str(pem))
    return pem, openssl("crl", "-in", str(pem), "-noout", "-text").stdout.decode()


def _entry(crl_text: str, serial: str) -> str | None:
    """The text of one CRL entry (serial, date, extensions), or None when it is not listed."""
    blocks = crl_text.split("Serial Number: ")
    for b in blocks[1:]:
        if b.split()[0].lower().lstrip("0") == serial.lstrip("0"):
            return b.split("Serial Number: ")[0][:400]
    return None


def _verify(root: Path, issuing: Path, crl_pem: Path, leaf: Path) -> subprocess.CompletedProcess:
    return openssl("verify", "-crl_check", "-CRLfile", str(crl_pem), "-CAfile", str(root), "-untrusted", str(issuing),
                   str(leaf), check=False)


def _single(resp_der: Path) -> ocsp.OCSPResponse:
    r = ocsp.load_der_ocsp_response(resp_der.read_bytes())
    assert r.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return r


def _refused(a: Appliance, *args: str) -> str:
    """A refused command: exit 1 and one line on stderr, no traceback."""
    r = a.cli(*args, check=False)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 1 and "Traceback" not in out and len(r.stderr.decode().strip().splitlines()) == 1, out
    return r.stderr.decode()


def _audit(a: Appliance) -> list[dict]:
    with AdminClient(str(a.home), timeout=60, session=a.session("aud")) as c:
        text = ops.audit_export(c).decode()
    return [d for line in text.splitlines() if line.strip() and "action" in (d := json.loads(line))]


def test_hold_release_permanent_and_remove_from_crl(rev):
    a, tmp, root, issuing, chain = rev
    held, perm = _issue(a, tmp, "held"), _issue(a, tmp, "perm")
    sh, sp = _serial(held), _serial(perm)
    _wait_for(a, issuing, chain, held, "good", "-no_nonce")

    # removeFromCRL is no revocation reason: the CLI says so, and so does the Factory (audited) to a
    # client that sends code 8 anyway; nothing is revoked.
    assert "removeFromCRL is not a revocation reason" in _refused(a, "revoke", "--ca", "issuing", sh, "--reason", "removeFromCRL")
    with _admin(a) as c:
        with pytest.raises(ClientError, match="removeFromCRL"):
            c.call(S.ARevoke, ca="issuing", serial=int(sh, 16).to_bytes((len(sh) + 1) // 2, "big"), reason=8)
        assert ops.cert_show(c, "issuing", int(sh, 16).to_bytes((len(sh) + 1) // 2, "big"))["revoked_at"] is None

    # On hold: OCSP revoked (certificateHold), and thisUpdate is never before the revocation (item 6).
    a.cli("revoke", "--ca", "issuing", sh, "--reason", "certificateHold")
    r = _wait_for(a, issuing, chain, held, "revoked", "-no_nonce", "-respout", str(tmp / "held.der"))
    assert b"Reason: certificateHold" in r.stdout
    resp = _single(tmp / "held.der")
    hold_time = resp.revocation_time_utc
    assert resp.this_update_utc >= hold_time, (resp.this_update_utc, hold_time)
    assert lint.lint_ocsp_response((tmp / "held.der").read_bytes()) == []
    crl_pem, text = _crl(a, tmp, "on-hold")
    assert "Certificate Hold" in (_entry(text, sh) or "")
    r = _verify(root, issuing, crl_pem, held)
    assert r.returncode != 0 and b"certificate revoked" in r.stdout + r.stderr
    assert "already on hold" in _refused(a, "revoke", "--ca", "issuing", sh, "--reason", "certificateHold")

    # Released: OCSP good again, off the next full CRL, audited; a second release is refused.
    assert f"released issuing/{sh}" in a.cli("unrevoke", "--ca", "issuing", sh).stdout.decode()
    r = _wait_for(a, issuing, chain, held, "good", "-no_nonce")
    crl_pem, text = _crl(a, tmp, "released")
    assert _entry(text, sh) is None
    assert _verify(root, issuing, crl_pem, held).returncode == 0
    assert "not revoked" in _refused(a, "unrevoke", "--ca", "issuing", sh)

    # Hold, then a permanent reason: the same entry, its date kept, reason now keyCompromise.
    a.cli("revoke", "--ca", "issuing", sp, "--reason", "certificateHold")
    _wait_for(a, issuing, chain, perm, "revoked", "-no_nonce", "-respout", str(tmp / "perm-hold.der"))
    held_at = _single(tmp / "perm-hold.der").revocation_time_utc
    assert "(was certificateHold)" in a.cli("revoke", "--ca", "issuing", sp, "--reason", "keyCompromise").stdout.decode()
    deadline = time.monotonic() + BOUND
    while b"Reason: keyCompromise" not in (r := _wait_for(a, issuing, chain, perm, "revoked", "-no_nonce",
                                                           "-respout", str(tmp / "perm.der"))).stdout:
        assert time.monotonic() < deadline, r.stdout.decode()
        time.sleep(0.2)
    resp = _single(tmp / "perm.der")
    assert resp.revocation_time_utc == held_at and resp.this_update_utc >= held_at
    assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    crl_pem, text = _crl(a, tmp, "permanent")
    entry = _entry(text, sp) or ""
    assert "Key Compromise" in entry and "Certificate Hold" not in entry
    assert _verify(root, issuing, crl_pem, perm).returncode != 0
    assert "only a certificateHold can be released" in _refused(a, "revoke", "--ca", "issuing", sp, "--release")
    assert "already revoked" in _refused(a, "revoke", "--ca", "issuing", sp, "--reason", "certificateHold")
    assert "--release takes no --reason" in _refused(a, "revoke", "--ca", "issuing", sp, "--release", "--reason", "keyCompromise")

    audit = _audit(a)
    mine = [(r["action"], r["object"].split("/")[-1], r["outcome"], r["detail"]) for r in audit
            if r["action"] in ("revoke", "unrevoke") and r["object"].split("/")[-1] in (sh, sp)]
    assert ("revoke", sh, "refused", "removeFromCRL is not a revocation reason") in mine
    assert any(x[:3] == ("unrevoke", sh, "ok") and "released from certificateHold" in x[3] for x in mine)
    assert ("unrevoke", sh, "refused", "not revoked") in mine
    assert any(x[:3] == ("revoke", sp, "ok") and "was certificateHold" in x[3] for x in mine)

    # Item 8: Botan's request form (explicit default version) for a real certificate, POSTed with curl.
    nh, kh = issuer_hashes(x509.load_pem_x509_certificate(issuing.read_bytes()).public_bytes(Encoding.DER))["sha1"]
    for name, serial, word in (("held", sh, "good"), ("perm", sp, "revoked")):
        (tmp / f"botan-{name}.der").write_bytes(botan(nh=nh, kh=kh, serial=int(serial, 16)))
        subprocess.run(["curl", "-sS", "--max-time", "20", "-H", "Content-Type: application/ocsp-request",
                        "--data-binary", f"@{tmp / f'botan-{name}.der'}", "-o", str(tmp / f"botan-{name}.resp"),
                        f"{a.endpoint}/ocsp"], check=True, timeout=30)
        r = openssl("ocsp", "-respin", str(tmp / f"botan-{name}.resp"), "-issuer", str(issuing),
                    "-cert", str(held if name == "held" else perm), "-CAfile", str(chain), check=False)
        assert r.returncode == 0 and b"Response verify OK" in r.stderr and f": {word}".encode() in r.stdout, r


def test_released_certificate_is_published_again(rev, slapd):
    """On hold the certificate leaves the directory (remove-on-revoke); released, it comes back."""
    a, tmp, root, issuing, chain = rev
    cert = issue_user(a, tmp, "Holly Example")
    dn = f"cn=Holly Example,ou=people,{BASE}"
    serial = format(cert.serial_number, "x")
    wait_drained(a)
    assert len(slapd.search(dn, "userCertificate;binary")) == 1
    a.cli("revoke", "--ca", "issuing", serial, "--reason", "certificateHold")
    wait_drained(a)
    assert slapd.search(dn, "userCertificate;binary") == []
    a.cli("unrevoke", "--ca", "issuing", serial)
    wait_drained(a)
    assert slapd.search(dn, "userCertificate;binary") == [cert.public_bytes(Encoding.DER)]


def _responder_certs(a: Appliance) -> list[dict]:
    with _admin(a) as c:
        return [x for x in ops.cert_list(c, "issuing", 1000) if x["profile"] == "ocsp-responder"]


def _until(pred, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout}s: {what}")


def _kill_endpoint(a: Appliance) -> None:
    """SIGKILL the endpoint role; return once the supervisor has restarted it."""
    before = a.log.read_text().count("ocsp restarted")
    os.kill(a.role_pids()["ocsp"], signal.SIGKILL)
    _until(lambda: a.log.read_text().count("ocsp restarted") > before, "the endpoint to be restarted")


def test_delegated_responder_renewed_before_it_lapses_and_failure_notified(rev, trap_log):
    a, tmp, root, issuing, chain = rev
    _, traps = trap_log
    leaf = _issue(a, tmp, "live")
    _wait_for(a, issuing, chain, leaf, "good", "-no_nonce")

    # An officer's responder with 1 day left, inside the 2-day renewal margin. The endpoint's token
    # then goes away: the renewal (tried when the endpoint reconnects) fails, and SNMP says so.
    a.cli("ocsp", "responder-cert", "--ca", "issuing", "--days", "1", "--out", str(tmp / "r1.pem"))
    first = x509.load_pem_x509_certificate((tmp / "r1.pem").read_bytes())
    tokens = a.home / "ocsp-token" / "tokens"
    os.rename(tokens, tokens.with_name("tokens.away"))
    try:
        _kill_endpoint(a)
        _until(lambda: _oid(M.NOTIFY_OID["responder-cert-expiring"]) in (traps.read_text() if traps.exists() else "")
               and "not renewed" in traps.read_text(), "a responder-cert-expiring notification")
        assert "notify responder-cert-expiring issuing: issuing: delegated responder" in a.log.read_text()
        assert len(_responder_certs(a)) == 1
    finally:
        os.rename(tokens.with_name("tokens.away"), tokens)

    # The token back, the endpoint restarted: renewed at once with a new key, 30 days, now serving.
    _kill_endpoint(a)
    renewed = _until(lambda: (rc := _responder_certs(a)) and len(rc) == 2 and rc, "a renewed responder certificate")
    assert {int(c["serial"], 16) for c in renewed} - {first.serial_number}
    deadline = time.monotonic() + BOUND
    while True:  # a nonce: signed live by the renewed responder, whose certificate the response carries
        r = openssl("ocsp", "-issuer", str(issuing), "-cert", str(leaf), "-url", f"{a.endpoint}/ocsp", "-CAfile", str(chain),
                    "-respout", str(tmp / "live.der"), check=False)
        if r.returncode == 0 and b"Response verify OK" in r.stderr:
            signer = _single(tmp / "live.der").certificates
            if signer and signer[0].serial_number != first.serial_number:
                break
        assert time.monotonic() < deadline, (r.stdout + r.stderr).decode()
        time.sleep(0.3)
    new = signer[0]
    assert new.public_key() != first.public_key()
    life = new.not_valid_after_utc - new.not_valid_before_utc
    assert 29.9 < life.total_seconds() / 86400 <= 30
    assert x509.ExtendedKeyUsageOID.OCSP_SIGNING in new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    audit = _audit(a)
    assert any(r["actor"] == "factory:responder-renewal" and r["action"] == "ocsp-responder" and r["outcome"] == "refused"
               for r in audit)
    assert any(r["actor"] == "factory:responder-renewal" and r["action"] == "ocsp-responder" and r["outcome"] == "ok"
               for r in audit)


def test_releasing_a_ca_certificate_from_hold_is_dual_controlled(rev):
    """Lifting a CA certificate's hold brings the CA back: guarded like its revocation (revoke-ca)."""
    a, tmp, root, issuing, chain = rev
    serial = _serial(issuing)
    r = a.cli("revoke", "--ca", "root", serial, "--reason", "certificateHold")
    a.cli("approve", r.stdout.split(b"#")[1].split()[0].decode(), officer="oper2")
    with _admin(a) as c:
        sb = int(serial, 16).to_bytes((len(serial) + 1) // 2, "big")
        assert ops.cert_show(c, "root", sb)["reason"] == 6
        r = a.cli("unrevoke", "--ca", "root", serial)
        assert b"pending" in r.stdout
        assert ops.cert_show(c, "root", sb)["reason"] == 6  # one approval of two: still on hold
        a.cli("approve", r.stdout.split(b"#")[1].split()[0].decode(), officer="oper2")
        assert ops.cert_show(c, "root", sb)["revoked_at"] is None

"""The Distribution agent against a real slapd and a real HTTP receiver: publication, removal on
revocation, outages, broken peers, and kill -9 of the whole appliance mid-publication."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from appliance.client import AdminClient
from appliance.ipc import schema as S
from policy import audit
from policy import serials as serials_list
from tests.conftest import make_csr, openssl
from tests.servers import ADMIN_DN, ADMIN_PW, BASE, Receiver, Slapd, make_tls


@pytest.fixture
def slapd(homes):
    d = Slapd(homes / "slapd")
    d.start()
    yield d
    d.stop()


@pytest.fixture
def receiver(homes):
    r = Receiver(homes / "web", token="push-token")
    yield r
    r.stop()


def rules(homes: Path, ldap_url: str, http_url: str | None = None, extra: str = "", max_attempts: int = 50) -> str:
    (homes / "ldap.secret").write_text(ADMIN_PW + "\n")
    (homes / "web.secret").write_text("push-token\n")
    cfg = f"""
[distribution]
backoff-max = 2
max-attempts = {max_attempts}
[[distribution.rule]]
name = "directory"
url = "{ldap_url}"
bind-dn = "{ADMIN_DN}"
secret-file = "{homes / 'ldap.secret'}"
publish = ["ca-cert", "certs", "crl"]
profiles = ["user-auth"]
dn = "cn={{CN}},ou=people,{BASE}"
ca-dn = "cn={{CN}},ou=CAs,{BASE}"
timeout = 2.0
{extra}
"""
    if http_url:
        cfg += f"""
[[distribution.rule]]
name = "web"
url = "{http_url}/pub/{{name}}"
secret-file = "{homes / 'web.secret'}"
publish = ["ca-cert", "crl", "issued-serials"]
cas = ["issuing"]
"""
    return cfg


def dist_status(a) -> dict:
    """What `donjon dist status --json` prints (the same admin request), asked in-process: the drain waits
    poll it every 0.2 s, and a CLI process per poll was most of this module's CPU."""
    with AdminClient(str(a.home), timeout=30, session=a.session()) as c:
        return c.call(S.ADistStatus)


def wait_drained(a, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = dist_status(a)
        if doc["agent"] and all(d["pending"] == 0 and d["in_flight"] == 0 for d in doc["destinations"]):
            return doc
        time.sleep(0.2)
    tail = "\n".join(a.log.read_text(errors="replace").splitlines()[-60:]) if a.log.exists() else ""
    raise AssertionError(f"backlog not drained in {timeout}s: {doc}\nappliance log (tail):\n{tail}")


def issue_user(a, tmp: Path, cn: str) -> x509.Certificate:
    csr = make_csr(tmp, cn.replace(" ", "_"), san=f"email:{cn.split()[0].lower()}@example.org", subj=f"/CN={cn}")
    out = tmp / f"{cn.replace(' ', '_')}.pem"
    a.cli("issue", "--ca", "issuing", "--profile", "user-auth", "--csr", str(csr), "--out", str(out))
    return x509.load_pem_x509_certificate(out.read_bytes())


def crl_number(der: bytes) -> int:
    return x509.load_der_x509_crl(der).extensions.get_extension_for_oid(ExtensionOID.CRL_NUMBER).value.crl_number


def test_publish_issue_revoke_ldap_and_http(appliance_factory, slapd, receiver, homes, tmp_path):
    a = appliance_factory(run_config=rules(homes, slapd.url, receiver.url))
    cert = issue_user(a, tmp_path, "Alice Example")
    wait_drained(a)
    dn = f"cn=Alice Example,ou=people,{BASE}"
    values = slapd.search(dn, "userCertificate;binary")
    assert len(values) == 1
    (tmp_path / "alice.der").write_bytes(values[0])
    text = openssl("x509", "-inform", "DER", "-in", str(tmp_path / "alice.der"), "-noout", "-serial", "-subject").stdout.decode()
    serial_line = next(ln for ln in text.splitlines() if ln.startswith("serial="))
    assert int(serial_line[len("serial="):], 16) == cert.serial_number and "Alice Example" in text
    # CA entries carry their certificate and CRL (the root's also as the authority revocation list).
    issuing = x509.load_pem_x509_certificate(a.export("issuing", tmp_path / "issuing.pem").read_bytes())
    ca_dn = f"cn=Donjon Test Issuing CA,ou=CAs,{BASE}"
    assert slapd.search(ca_dn, "cACertificate;binary") == [issuing.public_bytes(Encoding.DER)]
    before = crl_number(slapd.search(ca_dn, "certificateRevocationList;binary")[0])
    assert slapd.search(f"cn=Donjon Test Root CA,ou=CAs,{BASE}", "authorityRevocationList;binary")
    # Over HTTP: the issuing CA's certificate and CRL, with the bearer token, as DER.
    web = {row[1]: row for row in receiver.log()}
    assert web["/pub/issuing.crl"][3] == "application/pkix-crl"
    assert web["/pub/issuing.crt"][3] == "application/pkix-cert"

    a.cli("revoke", "--ca", "issuing", f"{cert.serial_number:x}", "--reason", "keyCompromise")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        crls = slapd.search(ca_dn, "certificateRevocationList;binary")
        if crls and crl_number(crls[0]) > before:
            break
        time.sleep(0.2)
    wait_drained(a)
    assert slapd.search(dn, "userCertificate;binary") == []  # removed on revocation
    crl = x509.load_der_x509_crl(slapd.search(ca_dn, "certificateRevocationList;binary")[0])
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    pub = x509.load_der_x509_crl((receiver.dir / "pub_issuing.crl").read_bytes())
    assert pub.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl_number(pub.public_bytes(Encoding.DER)) > before
    # The issued-serials list went over HTTP too, signed by the issuing CA, listing the certificate.
    lst = serials_list.decode((receiver.dir / "pub_issuing.serials").read_bytes())
    assert cert.serial_number in lst.serials
    issuing.public_key().verify(lst.signature, lst.tbs, ec.ECDSA(serials_list.hash_for(lst.signature_oid)))
    # Beside it, the signed audit head (the rollback anchor), verified with the audit certificate.
    a.cli("audit", "cert", "--out", str(tmp_path / "audit.pem"))
    head = json.loads((receiver.dir / "pub_issuing.audit-head.json").read_bytes())
    seq, _, _ = audit.verify_checkpoint(head, x509.load_pem_x509_certificate((tmp_path / "audit.pem").read_bytes()))
    assert seq > 0
    doc = dist_status(a)
    assert {d["rule"] for d in doc["destinations"]} == {"directory", "web"}
    assert all(d["parked"] == 0 and d["last_success"] for d in doc["destinations"])


def test_slapd_outage_during_500_issuances(appliance_factory, slapd, homes, tmp_path):
    """Every publication arrives exactly once in effect; nothing lost; the backlog drains."""
    # Backoff is capped at 2 s here (not an hour): allow the attempts a real outage would take.
    a = appliance_factory(run_config=rules(homes, slapd.url, max_attempts=100000))
    wait_drained(a)
    slapd.stop()
    csrs = []
    for i in range(10):
        csrs.append(str(make_csr(tmp_path, f"u{i}", san=f"email:u{i}@example.org", subj=f"/CN=user {i}")))
    ders = [x509.load_pem_x509_csr(Path(c).read_bytes()).public_bytes(Encoding.DER) for c in csrs]
    serials = set()
    with AdminClient(str(a.home), timeout=60, session=a.session()) as client:
        for _ in range(50):  # 50 × 10 = 500 issuances while the directory is down (in-process: 50 CLI starts cost more than the issuance)
            # Every CSR again: a new certificate (new serial) for the same subject each round.
            r = client.issue(ca="issuing", profile="user-auth", csrs=ders)
            for res in r.results:
                assert res.cert is not None, res.error
                serials.add(x509.load_der_x509_certificate(res.cert).serial_number)
    assert len(serials) == 500
    doc = dist_status(a)
    d = next(x for x in doc["destinations"] if x["rule"] == "directory")
    assert d["pending"] >= 500 and d["last_error"]
    slapd.start()
    wait_drained(a, timeout=300)
    seen = []
    for i in range(10):
        seen += [x509.load_der_x509_certificate(v).serial_number for v in slapd.search(f"cn=user {i},ou=people,{BASE}", "userCertificate;binary")]
    assert sorted(seen) == sorted(serials)  # each exactly once (a value set: duplicates impossible, none missing)
    assert dist_status(a)["destinations"][0]["parked"] == 0


def _wait_for(pred, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _directory(a) -> dict:
    return next(d for d in dist_status(a)["destinations"] if d["rule"] == "directory")


@pytest.mark.parametrize("mode", ["garbage", "hang"])
def test_broken_directory_no_crash_retried_visible(appliance_factory, homes, tmp_path, mode):
    """A peer answering junk (a fake: slapd cannot be made to) or a real slapd frozen with SIGSTOP:
    the agent survives, the job stays pending with a visible error, and later succeeds."""
    if mode == "garbage":
        broken = Receiver(homes / "junk", mode="garbage")
        url = broken.url.replace("http", "ldap")
    else:
        broken = Slapd(homes / "frozen")
        broken.start()
        broken.pause()
        url = broken.url
    try:
        a = appliance_factory(run_config=rules(homes, url))
        pids = a.role_pids()
        issue_user(a, tmp_path, "Carol Example")
        d = _wait_for(lambda: (lambda x: x if x["last_error"] and x["consecutive_failures"] >= 2 else None)(_directory(a)),
                      what="two failed attempts")
        assert d["pending"] >= 1 and d["parked"] == 0
        assert "slapd-test-secret" not in json.dumps(d)  # credentials never in errors
        assert a.role_pids()["distribution"] == pids["distribution"]  # no crash, no restart
        if mode == "hang":
            broken.resume()  # the directory answers again: the backlog drains
            wait_drained(a)
            assert broken.search(f"cn=Carol Example,ou=people,{BASE}", "userCertificate;binary")
    finally:
        broken.stop()


def test_http_refusal_parks_and_retry_requeues(appliance_factory, slapd, homes, tmp_path):
    web = Receiver(homes / "web401", token="another-token")  # our token is refused: HTTP 401, permanent
    try:
        a = appliance_factory(run_config=rules(homes, slapd.url, web.url))
        _wait_for(lambda: next(d for d in dist_status(a)["destinations"] if d["rule"] == "web")["parked"] >= 2,
                  what="parked jobs")
        parked = json.loads(a.cli("dist", "list", "--state", "parked", "--json").stdout)["jobs"]
        assert parked and all("HTTP 401" in j["last_error"] for j in parked)
        out = a.cli("dist", "retry", "--rule", "web").stdout.decode()
        assert f"{len(parked)} job(s) back in the queue" in out
        _wait_for(lambda: next(d for d in dist_status(a)["destinations"] if d["rule"] == "web")["parked"] == len(parked),
                  what="parked again")
        audit = a.cli("audit", "export").stdout.decode()
        assert '"dist-park"' in audit and '"dist-retry"' in audit
    finally:
        web.stop()


def test_kill9_mid_publication_resumes(appliance_factory, slapd, homes, tmp_path):
    a = appliance_factory(run_config=rules(homes, slapd.url))
    wait_drained(a)
    slapd.pause()  # publications are in flight, none acknowledged
    csrs = [str(make_csr(tmp_path, f"k{i}", san=f"email:k{i}@example.org", subj=f"/CN=kill {i}")) for i in range(20)]
    out = tmp_path / "k.pem"
    a.cli("issue", "--ca", "issuing", "--profile", "user-auth", *sum((["--csr", c] for c in csrs), []), "--out", str(out))
    serials = {c.serial_number for c in x509.load_pem_x509_certificates(out.read_bytes())}
    _wait_for(lambda: _directory(a)["in_flight"] or _directory(a)["last_error"], what="jobs in flight")
    a.kill()  # the whole appliance, kill -9, mid-publication
    slapd.resume()
    a.start()
    wait_drained(a)
    seen = set()
    for i in range(20):
        seen |= {x509.load_der_x509_certificate(v).serial_number
                 for v in slapd.search(f"cn=kill {i},ou=people,{BASE}", "userCertificate;binary")}
    assert seen == serials


@pytest.mark.parametrize("how", ["ldaps", "starttls"])
def test_tls_to_the_directory_with_a_trust_anchor(appliance_factory, homes, tmp_path, how):
    """LDAPS and StartTLS verify slapd's certificate against the configured anchor; a rule trusting
    another anchor never sends anything (visible error, nothing published)."""
    d = Slapd(homes / "tls-slapd", tls=True)
    d.start()
    try:
        url = f"ldaps://127.0.0.1:{d.tls_port}" if how == "ldaps" else d.url
        tls = f'ca-file = "{d.tls_ca}"\n' + ("starttls = true\n" if how == "starttls" else "")
        a = appliance_factory(run_config=rules(homes, url, extra=tls))
        cert = issue_user(a, tmp_path, "Dave Example")
        wait_drained(a)
        values = d.search(f"cn=Dave Example,ou=people,{BASE}", "userCertificate;binary")
        assert [x509.load_der_x509_certificate(v).serial_number for v in values] == [cert.serial_number]
    finally:
        d.stop()


def test_tls_refuses_an_untrusted_directory(appliance_factory, homes, tmp_path):
    d = Slapd(homes / "tls-slapd2", tls=True)
    d.start()
    try:
        other_ca, _, _ = make_tls(homes / "other-tls")
        a = appliance_factory(run_config=rules(homes, f"ldaps://127.0.0.1:{d.tls_port}", extra=f'ca-file = "{other_ca}"\n'))
        issue_user(a, tmp_path, "Eve Example")
        dd = _wait_for(lambda: (lambda x: x if x["last_error"] else None)(_directory(a)), what="a TLS error")
        assert dd["pending"] >= 1
        assert d.search(f"cn=Eve Example,ou=people,{BASE}", "userCertificate;binary") == []
    finally:
        d.stop()


def test_https_publication_with_basic_auth(appliance_factory, slapd, homes, tmp_path):
    """CRLs and CA certificates PUT over HTTPS (trust anchor from ca-file) with HTTP basic credentials."""
    web = Receiver(homes / "tls-web", tls=True)
    try:
        (homes / "basic.secret").write_text("basic-pass\n")
        extra = f"""
[[distribution.rule]]
name = "secure-web"
url = "{web.url}/{{ca}}/{{name}}"
username = "donjon"
secret-file = "{homes / 'basic.secret'}"
ca-file = "{web.tls_ca}"
method = "POST"
publish = ["ca-cert", "crl"]
"""
        a = appliance_factory(run_config=rules(homes, slapd.url) + extra)
        wait_drained(a)
        names = {row[1] for row in web.log()}
        assert {"/issuing/issuing.crl", "/issuing/issuing.crt", "/root/root.crl", "/root/root.crt"} <= names
        assert all(row[0] == "POST" for row in web.log())
        import base64
        assert {row[5] for row in web.log()} == {"Basic_" + base64.b64encode(b"donjon:basic-pass").decode()}
        crl = x509.load_der_x509_crl((web.dir / "issuing_issuing.crl").read_bytes())
        issuing = x509.load_pem_x509_certificate(a.export("issuing", tmp_path / "i.pem").read_bytes())
        assert crl.is_signature_valid(issuing.public_key())
    finally:
        web.stop()


def test_crl_shards_and_delta_named_by_file_http_and_ldap(appliance_factory, slapd, receiver, homes, tmp_path):
    """A shard or delta never overwrites <ca>.crl: each CRL object is named by its file at HTTP destinations,
    a shard has its own entry (cRLDistributionPoint) below its CA's, a delta goes to deltaRevocationList."""
    (homes / "ldap.secret").write_text(ADMIN_PW + "\n")
    (homes / "web.secret").write_text("push-token\n")
    a = appliance_factory(start=False)
    (a.home / "donjon.toml").write_text(f"""
[crl]
shards = {{ issuing = 2 }}
delta = {{ root = 60 }}
[distribution]
backoff-max = 2
[[distribution.rule]]
name = "directory"
url = "{slapd.url}"
bind-dn = "{ADMIN_DN}"
secret-file = "{homes / 'ldap.secret'}"
publish = ["crl", "delta-crl"]
ca-dn = "cn={{CN}},ou=CAs,{BASE}"
timeout = 2.0
[[distribution.rule]]
name = "web"
url = "{receiver.url}/pub/{{name}}"
secret-file = "{homes / 'web.secret'}"
publish = ["crl", "delta-crl"]
""")
    a.start()
    a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "i.crl"))  # complete + both shards
    a.cli("crl", "generate", "--ca", "root", "--delta", "--out", str(tmp_path / "d.crl"))
    wait_drained(a)

    def idp(der: bytes):
        try:
            v = x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
            return str(v.full_name[0].value)
        except x509.ExtensionNotFound:
            return None

    def is_delta(der: bytes) -> bool:
        try:
            x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.DeltaCRLIndicator)
            return True
        except x509.ExtensionNotFound:
            return False
    files = {p.name: p.read_bytes() for p in receiver.dir.glob("pub_*.crl")}
    assert idp(files["pub_issuing.crl"]) is None and not is_delta(files["pub_issuing.crl"])  # still the complete CRL
    for k in (0, 1):
        assert idp(files[f"pub_issuing-{k}.crl"]).endswith(f"/crl/issuing-{k}.crl")
    assert is_delta(files["pub_root-delta.crl"]) and not is_delta(files["pub_root.crl"])
    assert files["pub_root-delta.crl"] == (tmp_path / "d.crl").read_bytes()
    assert "pub_issuing-delta.crl" not in files  # no deltas for a CA without crl.delta
    web = {row[1]: row for row in receiver.log()}
    assert web["/pub/issuing-1.crl"][3] == web["/pub/root-delta.crl"][3] == "application/pkix-crl"
    issuing_dn = f"cn=Donjon Test Issuing CA,ou=CAs,{BASE}"
    root_dn = f"cn=Donjon Test Root CA,ou=CAs,{BASE}"
    full = slapd.search(issuing_dn, "certificateRevocationList;binary")
    assert len(full) == 1 and idp(full[0]) is None
    for k in (0, 1):
        got = slapd.search(f"cn=issuing-{k},{issuing_dn}", "certificateRevocationList;binary")
        assert len(got) == 1 and idp(got[0]).endswith(f"/crl/issuing-{k}.crl")
    delta = slapd.search(root_dn, "deltaRevocationList;binary")
    assert len(delta) == 1 and is_delta(delta[0]) and delta[0] == (tmp_path / "d.crl").read_bytes()
    base = slapd.search(root_dn, "certificateRevocationList;binary")
    assert len(base) == 1 and not is_delta(base[0])
    assert all(d["parked"] == 0 for d in dist_status(a)["destinations"])
    # A rule added later gets the current complete CRL, every shard and the delta at its next start.
    a.stop()
    with open(a.home / "donjon.toml", "a") as f:
        f.write(f"""
[[distribution.rule]]
name = "late"
url = "{receiver.url}/late/{{name}}"
secret-file = "{homes / 'web.secret'}"
publish = ["crl", "delta-crl"]
""")
    a.start()
    wait_drained(a)
    late = {p.name: p.read_bytes() for p in receiver.dir.glob("late_*.crl")}
    assert {"late_issuing.crl", "late_issuing-0.crl", "late_issuing-1.crl", "late_root.crl", "late_root-delta.crl"} <= set(late)
    assert late["late_issuing-1.crl"] == files["pub_issuing-1.crl"] and is_delta(late["late_root-delta.crl"])
    assert idp(late["late_issuing.crl"]) is None

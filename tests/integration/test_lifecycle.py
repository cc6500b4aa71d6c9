"""Root -> issuing CA -> leaves, revocation and CRLs, end to end through the real appliance."""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from policy import lint, profiles
from tests.conftest import DATA, make_csr, openssl

P = profiles.builtin_profiles()


def _pem_to_der(path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(__import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)


@pytest.mark.parametrize("root_key,issuing_key", [("p384", "p256"), ("rsa3072", "rsa2048"), ("ed25519", "ed25519")])
def test_chain_issue_revoke_crl(appliance_factory, tmp_path, root_key, issuing_key):
    a = appliance_factory(root_key=root_key, issuing_key=issuing_key)
    root = a.export("root", tmp_path / "root.pem")
    issuing = a.export("issuing", tmp_path / "issuing.pem")
    csr = make_csr(tmp_path, "www", san="DNS:www.example.org,DNS:api.example.org")
    leaf = tmp_path / "www.pem"
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(leaf))
    openssl("verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(root), "-untrusted", str(issuing), str(leaf))

    # Lint every certificate and CRL the appliance produced, at WARNING, for its profile.
    root_der, issuing_der, leaf_der = (_pem_to_der(p) for p in (root, issuing, leaf))
    assert lint.lint_certificate(root_der, P["root-ca"]) == []
    assert lint.lint_certificate(issuing_der, P["sub-ca"], root_der) == []
    assert lint.lint_certificate(leaf_der, P["tls-server"], issuing_der) == []

    serial = format(x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number, "x")
    a.cli("revoke", "--ca", "issuing", serial, "--reason", "keyCompromise")
    crls = []
    for ca in ("issuing", "root"):
        out = tmp_path / f"{ca}.crl"
        a.cli("crl", "generate", "--ca", ca, "--out", str(out))
        der = out.read_bytes()
        assert lint.lint_crl(der) == []
        crls.append(openssl("crl", "-inform", "DER", "-in", str(out)).stdout)
    crl_pem = tmp_path / "crls.pem"
    crl_pem.write_bytes(b"".join(crls))
    r = openssl("verify", "-x509_strict", "-crl_check_all", "-CAfile", str(root), "-untrusted", str(issuing),
                "-CRLfile", str(crl_pem), str(leaf), check=False)
    assert r.returncode != 0 and b"certificate revoked" in r.stdout + r.stderr
    issuing_crl = x509.load_der_x509_crl((tmp_path / "issuing.crl").read_bytes())
    entry = issuing_crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert b"audit chain intact" in a.cli("audit", "verify").stdout


def test_crl_numbers_are_monotonic(shared_appliance, tmp_path):
    appliance = shared_appliance
    numbers = []
    for i in range(3):
        out = tmp_path / f"c{i}.crl"
        appliance.cli("crl", "generate", "--ca", "issuing", "--out", str(out))
        crl = x509.load_der_x509_crl(out.read_bytes())
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    assert numbers == sorted(set(numbers)) and len(numbers) == 3


def test_subordinate_ca_create_and_external_csr(shared_appliance, tmp_path):
    appliance = shared_appliance  # the module's only test that adds a CA (the others look at no CA list)
    appliance.cli("ca", "create", "issuing2", "--parent", "root", "--subject", "CN=Issuing CA 2,O=Donjon Test,C=FR",
                  "--key-type", "rsa2048", "--path-length", "0")
    listed = json.loads(appliance.cli("ca", "list", "--json").stdout)
    assert {c["name"] for c in listed} == {"root", "issuing", "issuing2"}
    # The offline root's main job: certify an external subordinate from its CSR.
    csr = make_csr(tmp_path, "ext", san=None, subj="/C=FR/O=Donjon Test/CN=External Issuing CA")
    out = tmp_path / "ext.pem"
    appliance.cli("ca", "sign-csr", str(csr), "--parent", "root", "--path-length", "0", "--out", str(out))
    root = appliance.export("root", tmp_path / "root.pem")
    openssl("verify", "-x509_strict", "-CAfile", str(root), str(out))
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # An issuing CA issues no CA certificate (its policy; its pathLen 0 would refuse it too).
    r = appliance.cli("ca", "create", "deep", "--parent", "issuing", "--subject", "CN=Too Deep", check=False)
    assert r.returncode == 1 and b"may not issue profile 'sub-ca'" in r.stderr


def _counts(a) -> tuple[int, list[dict]]:
    """The certificate count and the audit log, as `status --json` and `audit export` give them (the same
    requests, in-process: four CLI starts per refused CSR were most of the refusal test's time)."""
    from appliance.client import AdminClient
    from appliance.ipc import schema as S
    with AdminClient(str(a.home), timeout=30, session=a.session()) as c:
        count = c.call(S.AStatus)["certificates"]
    with AdminClient(str(a.home), timeout=30, session=a.session("aud")) as c:
        audit = [json.loads(line) for line in b"".join(c.stream(S.AAuditExport)).splitlines()]
    return count, audit


# tests/unit/test_policy_csr.py checks each bad CSR's reason; here, one appliance checks what only the
# whole path shows for each: a one-line refusal naming it, no certificate, exactly one audit record.
BAD_CSRS = [
    ("bad-signature.der", "signature"),
    ("bad-rsa-1024.der", "size"),
    ("bad-rsa-exponent-3.der", "exponent"),
    ("bad-rsa-fermat.der", "fermat"),
    ("bad-unknown-extension.der", "extension"),
    ("bad-truncated.der", "malformed"),
]


def test_bad_csr_refused_leaves_only_an_audit_record(shared_appliance):
    appliance = shared_appliance  # refusals only: nothing another test looks at changes
    for name, needle in BAD_CSRS:
        path = DATA / "csr" / name
        assert path.exists(), f"missing test data {path}"
        before, audit_before = _counts(appliance)
        r = appliance.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(path), check=False)
        assert r.returncode == 1, name
        err = r.stderr.decode()
        assert needle in err.lower() and err.count("\n") <= 2, (name, err)
        after, audit_after = _counts(appliance)
        assert after == before, name
        new = [x for x in audit_after[len(audit_before):] if x["action"] not in ("audit-export", "login")]  # the export itself is audited
        assert [(x["action"], x["outcome"]) for x in new] == [("issue", "refused")], name


def test_unknown_ca_and_profile_are_clear_errors(shared_appliance, tmp_path):
    appliance = shared_appliance  # refusals only: nothing another test looks at changes
    csr = make_csr(tmp_path, "x")
    r = appliance.cli("issue", "--ca", "nope", "--profile", "tls-server", "--csr", str(csr), check=False)
    assert r.returncode == 1 and b"no CA named 'nope'" in r.stderr
    r = appliance.cli("issue", "--ca", "issuing", "--profile", "nope", "--csr", str(csr), check=False)
    assert r.returncode == 1 and b"unknown profile 'nope'" in r.stderr
    r = appliance.cli("revoke", "--ca", "issuing", "abcdef", check=False)
    assert r.returncode == 1 and b"no certificate abcdef" in r.stderr


def test_cmdb_holds_no_plaintext(shared_appliance, tmp_path):
    appliance = shared_appliance
    marker = "zq7-plaintext-marker.example.org"
    csr = make_csr(tmp_path, "m", san=f"DNS:{marker}", subj=f"/CN={marker}")
    out = tmp_path / "m.pem"
    appliance.cli("issue", "--ca", "issuing", "--profile", "tls-client", "--csr", str(csr), "--out", str(out))
    appliance.cli("revoke", "--ca", "issuing", format(x509.load_pem_x509_certificate(out.read_bytes()).serial_number, "x"))
    files = list((appliance.home / "cmdb").glob("cmdb.sqlite*"))
    assert any(f.name.endswith("-wal") for f in files) or files
    for f in files:
        data = f.read_bytes()
        for needle in (marker.encode(), b"Donjon Test Issuing CA", b"SQLite format 3", b"tls-client"):
            assert needle not in data, f"{needle!r} in plaintext in {f.name}"


def test_not_running_says_how_to_start(tmp_path, src_path):
    from tests.conftest import Appliance
    a = Appliance(tmp_path / "nothing", src_path)
    r = a.cli("status", check=False)
    assert r.returncode == 1 and b"donjon run --home" in r.stderr


def test_init_refuses_to_overwrite(shared_appliance, tmp_path):
    appliance = shared_appliance  # refusals only: nothing another test looks at changes
    from tests.conftest import make_ceremony
    r = appliance.cli("init", "--home", str(appliance.home), "--ceremony", str(make_ceremony(tmp_path / "c.toml")), check=False)
    assert r.returncode == 1 and b"refusing to overwrite" in r.stderr


def test_bad_ceremony_names_file_and_key(tmp_path, src_path):
    from tests.conftest import Appliance
    bad = tmp_path / "bad.toml"
    bad.write_text('[root]\nname = "root"\nkey-type = "rsa1024"\nsubject = { CN = "x" }\nvalidity-days = 10\n')
    a = Appliance(tmp_path / "h", src_path)
    r = a.cli("init", "--home", str(tmp_path / "h"), "--ceremony", str(bad), check=False)
    assert r.returncode == 1
    assert str(bad).encode() in r.stderr and b"line 3" in r.stderr and b"key-type" in r.stderr
    assert not (tmp_path / "h").exists()


def test_revocation_schedules_a_new_crl(shared_appliance, tmp_path):
    appliance = shared_appliance
    import time
    csr = make_csr(tmp_path, "r")
    leaf = tmp_path / "r.pem"
    appliance.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(leaf))
    serial = x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number
    out = tmp_path / "latest.crl"
    appliance.cli("crl", "export", "--ca", "issuing", "--out", str(out))
    first = x509.load_der_x509_crl(out.read_bytes())
    assert first.get_revoked_certificate_by_serial_number(serial) is None
    appliance.cli("revoke", "--ca", "issuing", format(serial, "x"), "--reason", "superseded")
    deadline = time.monotonic() + 20  # the bound: the scheduler's debounce plus one signing
    while time.monotonic() < deadline:
        appliance.cli("crl", "export", "--ca", "issuing", "--out", str(out))
        crl = x509.load_der_x509_crl(out.read_bytes())
        if crl.get_revoked_certificate_by_serial_number(serial) is not None:
            n0 = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > n0
            return
        time.sleep(0.2)
    raise AssertionError("the revocation did not reach a stored CRL within 20 s")


def test_login_required_is_a_typed_refusal_and_the_deferred_login_cue(shared_appliance):
    from appliance.client import AdminClient, ClientError
    from appliance.ipc import schema as S
    from tests.conftest import PASSWORD
    a = shared_appliance
    # No session: the Factory's typed "login-required" refusal (not "auth"), with the hint the CLI prints.
    with AdminClient(str(a.home), timeout=30) as c:
        with pytest.raises(ClientError) as e:
            c.call(S.ACertList, ca=None, limit=1)
        assert e.value.code == "login-required" and "log in first" in str(e.value)
    # A client holding a deferred login logs in on that cue and gets its answer...
    with AdminClient(str(a.home), timeout=30) as c:
        c.deferred_login = ("oper", PASSWORD, None)
        assert "certs" in c.call(S.ACertList, ca=None, limit=1) and c.officer == "oper" and c.deferred_login is None
    # ...but an "auth" refusal (bad credentials) is no cue: the deferred login stays unused.
    with AdminClient(str(a.home), timeout=30) as c:
        c.deferred_login = ("oper", PASSWORD, None)
        with pytest.raises(ClientError) as e:
            c.call(S.ALogin, officer="nobody", password="wrong password here")
        assert e.value.code == "auth" and c.deferred_login is not None and c.session is None
    r = a.cli("cert", "list", env={"DONJON_OFFICER": "", "DONJON_PASSWORD": "", "DONJON_SESSION_FILE": str(a.home.parent / "none")},
              check=False)
    assert r.returncode == 1 and r.stderr.decode().strip().endswith("log in first (donjon login --officer NAME)")

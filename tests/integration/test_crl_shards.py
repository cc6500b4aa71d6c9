"""CRL shards in the appliance (`crl.shards`), judged by openssl and pkilint: each certificate's CRL DP names
its shard, each shard a complete CRL for its partition with its own number and an IDP naming exactly that URL."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from appliance import adminops as ops
from appliance.client import AdminClient
from policy import lint
from tests.conftest import openssl
from tests.conftest import make_csr
from tests.integration.test_ocsp import BOUND, _issue, _setup

# One appliance for the module: `issuing` in 2 shards, a second issuing CA `deltas` with delta CRLs, a third
# `sdeltas` in 2 shards with a delta per shard (each its own revocations, CRLs and files: the tests don't look
# at each other's CA).
CONFIG = "[crl]\nshards = { issuing = 2, sdeltas = 2 }\ndelta = { deltas = 60, sdeltas = 60 }\n"


@pytest.fixture(scope="module")
def crl_appliance(module_appliance_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crl")
    a, root, issuing, chain = _setup(module_appliance_factory, tmp, extra=CONFIG)
    a.cli("ca", "create", "deltas", "--parent", "root", "--subject", "CN=Donjon Test Delta CA,O=Donjon Test", "--path-length", "0")
    a.cli("ca", "create", "sdeltas", "--parent", "root", "--subject", "CN=Donjon Test Shard Delta CA,O=Donjon Test", "--path-length", "0")
    return a, root, issuing, a.export("deltas", tmp / "deltas.pem")


def _get(url: str) -> bytes:
    return subprocess.run(["curl", "-sSf", url], capture_output=True, timeout=30, check=True).stdout


def _dp(pem) -> str:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    return cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value


def test_shards_crl_download_revocation_and_lint(crl_appliance, tmp_path):
    a, root, issuing, _ = crl_appliance
    by_shard: dict[int, list] = {0: [], 1: []}
    for i in range(12):  # random serials: both shards get leaves soon (bounded)
        leaf = _issue(a, tmp_path, f"s{i}")
        serial = x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number
        by_shard[serial % 2].append(leaf)
        assert _dp(leaf) == f"{a.endpoint}/crl/issuing-{serial % 2}.crl"
        if all(len(v) >= 1 for v in by_shard.values()) and len(by_shard[1]) + len(by_shard[0]) >= 3:
            break
    assert by_shard[0] and by_shard[1]
    assert _dp(issuing).endswith("/crl/root.crl")  # the unsharded root: exactly as before (made at init)
    a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "full.crl"))
    numbers = {}
    for k in (0, 1):
        der = _get(f"{a.endpoint}/crl/issuing-{k}.crl")
        assert lint.lint_crl(der) == [], k
        crl = x509.load_der_x509_crl(der)
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical and idp.value.full_name == [x509.UniformResourceIdentifier(f"{a.endpoint}/crl/issuing-{k}.crl")]
        numbers[k] = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    # every shard URL of the CA, as CCADB asks; none for an unsharded CA
    assert json.loads(_get(f"{a.endpoint}/crl/issuing.json")) == [f"{a.endpoint}/crl/issuing-{k}.crl" for k in (0, 1)]
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{a.endpoint}/crl/root.json"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == "404"
    full = x509.load_der_x509_crl(_get(f"{a.endpoint}/crl/issuing.crl"))
    try:
        full.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        raise AssertionError("the complete CRL has no IDP")
    except x509.ExtensionNotFound:
        pass
    for k in (0, 1):
        r = openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(root), "-untrusted", str(issuing),
                    str(by_shard[k][0]), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    victim = by_shard[1][0]
    serial = x509.load_pem_x509_certificate(victim.read_bytes()).serial_number
    a.cli("revoke", "--ca", "issuing", format(serial, "x"), "--reason", "keyCompromise")
    deadline = time.monotonic() + BOUND
    while True:  # the scheduler re-signs the complete CRL and every shard after a revocation
        r = openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(root), "-untrusted", str(issuing),
                    str(victim), check=False)
        if b"certificate revoked" in r.stdout + r.stderr:
            break
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.3)
    r = openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(root), "-untrusted", str(issuing),
                str(by_shard[0][0]), check=False)
    assert r.returncode == 0, r.stdout + r.stderr  # the other shard's certificate stays good
    for k in (0, 1):
        der = _get(f"{a.endpoint}/crl/issuing-{k}.crl")
        crl = x509.load_der_x509_crl(der)
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > numbers[k]  # never reused
        assert [e.serial_number for e in crl] == ([serial] if k == 1 else [])
        assert lint.lint_crl(der) == []
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{a.endpoint}/crl/issuing-2.crl"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == "404"  # no third shard
    r = a.cli("ca", "create", "issuing-7", "--parent", "root", "--subject", "CN=Collide,O=Donjon Test", check=False)
    assert r.returncode != 0 and b"CRL shard name of CA 'issuing'" in r.stderr, r.stderr  # its CRL would be issuing-7.crl
    assert len(r.stderr.strip().splitlines()) == 1 and b"Traceback" not in r.stderr


def _pem_crl(tmp_path, name: str, der: bytes):
    (tmp_path / f"{name}.der").write_bytes(der)
    openssl("crl", "-inform", "DER", "-in", str(tmp_path / f"{name}.der"), "-out", str(tmp_path / f"{name}.pem"))
    return tmp_path / f"{name}.pem"


def _number(der: bytes) -> int:
    return x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _issue_delta(a, tmp_path, name, ca="deltas"):
    csr = make_csr(tmp_path, name, san=f"DNS:{name}.example.org")
    out = tmp_path / f"{name}.pem"
    a.cli("issue", "--ca", ca, "--profile", "tls-server", "--csr", str(csr), "--out", str(out))
    return out


def test_delta_crls_base_plus_delta_remove_from_crl_and_lint(crl_appliance, tmp_path):
    a, root, _, issuing = crl_appliance  # here "issuing" is the delta CA's certificate
    good, bad, held = (_issue_delta(a, tmp_path, n) for n in ("dgood", "dbad", "dheld"))
    delta_url = f"{a.endpoint}/crl/deltas-delta.crl"
    fresh = x509.load_pem_x509_certificate(good.read_bytes()).extensions.get_extension_for_class(x509.FreshestCRL)
    assert fresh.value[0].full_name == [x509.UniformResourceIdentifier(delta_url)]  # certificates name the delta
    a.cli("crl", "generate", "--ca", "deltas", "--out", str(tmp_path / "base.der"))
    base_der = (tmp_path / "base.der").read_bytes()
    base = x509.load_der_x509_crl(base_der)
    assert base.extensions.get_extension_for_class(x509.FreshestCRL).value[0].full_name == [
        x509.UniformResourceIdentifier(delta_url)]  # the full CRL points at its delta
    assert lint.lint_crl(base_der) == []
    base_pem = _pem_crl(tmp_path, "base", base_der)

    def serial(p) -> int:
        return x509.load_pem_x509_certificate(p.read_bytes()).serial_number
    a.cli("revoke", "--ca", "deltas", format(serial(bad), "x"), "--reason", "keyCompromise")
    deadline = time.monotonic() + BOUND
    while True:  # a revocation goes out in a delta (the scheduler's), not in a new base
        r = subprocess.run(["curl", "-sf", delta_url], capture_output=True, timeout=30)
        if r.returncode == 0 and serial(bad) in [e.serial_number for e in x509.load_der_x509_crl(r.stdout)]:
            break
        assert time.monotonic() < deadline, r
        time.sleep(0.3)
    delta_der = r.stdout
    delta = x509.load_der_x509_crl(delta_der)
    ind = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert ind.critical and ind.value.crl_number == _number(base_der) < _number(delta_der)  # same sequence, after it
    assert lint.lint_crl(delta_der) == []
    delta_pem = _pem_crl(tmp_path, "delta", delta_der)
    text = openssl("crl", "-in", str(delta_pem), "-noout", "-text").stdout
    assert b"Delta CRL Indicator" in text
    assert _number(_get(f"{a.endpoint}/crl/deltas.crl")) == _number(base_der)  # no new base for a revocation

    def verify(cert, *crls):
        args = [x for c in crls for x in ("-CRLfile", str(c))]
        return openssl("verify", "-crl_check", "-use_deltas", "-CAfile", str(root), "-untrusted", str(issuing),
                       *args, str(cert), check=False)
    r = verify(bad, base_pem)
    assert r.returncode == 0, r.stdout + r.stderr  # the base alone predates the revocation
    r = verify(bad, base_pem, delta_pem)
    assert b"certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr
    r = verify(good, base_pem, delta_pem)
    assert r.returncode == 0, r.stdout + r.stderr

    # A hold released after the base: the delta says removeFromCRL (delta CRLs only)
    a.cli("revoke", "--ca", "deltas", format(serial(held), "x"), "--reason", "certificateHold")
    a.cli("crl", "generate", "--ca", "deltas", "--out", str(tmp_path / "base2.der"))
    base2 = (tmp_path / "base2.der").read_bytes()
    assert serial(held) in [e.serial_number for e in x509.load_der_x509_crl(base2)]
    a.cli("unrevoke", "--ca", "deltas", format(serial(held), "x"))
    a.cli("crl", "generate", "--ca", "deltas", "--delta", "--out", str(tmp_path / "d2.der"))
    d2 = (tmp_path / "d2.der").read_bytes()
    crl2 = x509.load_der_x509_crl(d2)
    assert crl2.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == _number(base2)
    assert _number(d2) > _number(base2) > _number(delta_der)  # never reused
    entry = crl2.get_revoked_certificate_by_serial_number(serial(held))
    assert entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.remove_from_crl
    assert lint.lint_crl(d2) == []
    r = verify(held, _pem_crl(tmp_path, "base2", base2), _pem_crl(tmp_path, "d2", d2))
    assert r.returncode == 0, r.stdout + r.stderr  # released: not revoked through base + delta
    assert _number(_get(delta_url)) == _number(d2)  # the endpoint serves the newest delta
    r = a.cli("crl", "generate", "--ca", "root", "--delta", "--out", str(tmp_path / "x.der"), check=False)
    assert r.returncode != 0 and b"no delta CRLs" in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "x.der").exists()
    r = a.cli("ca", "create", "deltas-delta", "--parent", "root", "--subject", "CN=Collide,O=Donjon Test", check=False)
    assert r.returncode != 0 and b"delta CRL name of CA 'deltas'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and b"Traceback" not in r.stderr


def test_a_delta_per_shard_judged_by_openssl_use_deltas_and_pkilint(crl_appliance, tmp_path):
    """A sharded CA with deltas (RFC 5280 §5.2.4/§5.2.5): each shard is a scope with its own delta
    (<ca>-<k>-delta.crl), which has the shard's IDP, is based on the shard's latest full CRL and numbered from
    the shard's sequence; certificates and the shard's base name it in freshestCRL; the complete CRL has none."""
    a, root, _, _ = crl_appliance
    ca_pem = a.export("sdeltas", tmp_path / "sdeltas.pem")
    leaves: dict[int, list] = {0: [], 1: []}
    for batch in range(3):  # random serials: 12 leaves in one call put two in each shard but rarely (bounded)
        csrs = [x for i in range(12) for x in ("--csr", str(make_csr(tmp_path, f"sd{batch}-{i}", san=f"DNS:sd{i}.example.org")))]
        a.cli("issue", "--ca", "sdeltas", "--profile", "tls-server", *csrs, "--out", str(tmp_path / "sd.pem"))
        for i, cert in enumerate(x509.load_pem_x509_certificates((tmp_path / "sd.pem").read_bytes())):
            (tmp_path / f"sd{batch}-{i}.pem").write_bytes(cert.public_bytes(Encoding.PEM))
            leaves[cert.serial_number % 2].append(tmp_path / f"sd{batch}-{i}.pem")
        if all(len(v) >= 2 for v in leaves.values()):
            break
    assert all(len(v) >= 2 for v in leaves.values())
    for k in (0, 1):
        fresh = x509.load_pem_x509_certificate(leaves[k][0].read_bytes()).extensions.get_extension_for_class(x509.FreshestCRL)
        assert fresh.value[0].full_name == [x509.UniformResourceIdentifier(f"{a.endpoint}/crl/sdeltas-{k}-delta.crl")]
    c = AdminClient(str(a.home), timeout=60, session=a.session())  # in-process: a CLI process costs ~1 s
    complete = x509.load_der_x509_crl(ops.crl_generate(c, "sdeltas"))
    with pytest.raises(x509.ExtensionNotFound):  # the complete CRL is no delta's base
        complete.extensions.get_extension_for_class(x509.FreshestCRL)
    bases = {k: _get(f"{a.endpoint}/crl/sdeltas-{k}.crl") for k in (0, 1)}
    for k, der in bases.items():
        crl = x509.load_der_x509_crl(der)
        assert crl.extensions.get_extension_for_class(x509.FreshestCRL).value[0].full_name == [
            x509.UniformResourceIdentifier(f"{a.endpoint}/crl/sdeltas-{k}-delta.crl")]
        assert lint.lint_crl(der) == [], k

    def serial(p) -> int:
        return x509.load_pem_x509_certificate(p.read_bytes()).serial_number
    victim, bystander = leaves[1][0], leaves[0][0]
    ops.revoke(c, "sdeltas", serial(victim).to_bytes(20, "big").lstrip(b"\0"), "keyCompromise")
    url = f"{a.endpoint}/crl/sdeltas-1-delta.crl"
    deadline = time.monotonic() + BOUND
    while True:  # the scheduler signs every shard's delta right after a revocation
        r = subprocess.run(["curl", "-sf", url], capture_output=True, timeout=30)
        if r.returncode == 0 and serial(victim) in [e.serial_number for e in x509.load_der_x509_crl(r.stdout)]:
            break
        assert time.monotonic() < deadline, r
        time.sleep(0.3)
    deltas = {1: r.stdout, 0: _get(f"{a.endpoint}/crl/sdeltas-0-delta.crl")}
    for k, der in deltas.items():
        crl = x509.load_der_x509_crl(der)
        assert lint.lint_crl(der) == [], k
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)  # the base's scope
        assert idp.critical and idp.value.full_name == [x509.UniformResourceIdentifier(f"{a.endpoint}/crl/sdeltas-{k}.crl")]
        ind = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        assert ind.critical and ind.value.crl_number == _number(bases[k]) < _number(der)  # the shard's sequence
        assert all(e.serial_number % 2 == k for e in crl)  # only its own shard's changes
    assert serial(victim) not in [e.serial_number for e in x509.load_der_x509_crl(deltas[0])]
    pems = {(k, w): _pem_crl(tmp_path, f"sd-{w}-{k}", d) for k in (0, 1) for w, d in (("base", bases[k]), ("delta", deltas[k]))}

    def verify(cert, k, *which):
        args = [x for w in which for x in ("-CRLfile", str(pems[(k, w)]))]
        return openssl("verify", "-crl_check", "-use_deltas", "-CAfile", str(root), "-untrusted", str(ca_pem),
                       *args, str(cert), check=False)
    r = verify(victim, 1, "base")
    assert r.returncode == 0, r.stdout + r.stderr  # its shard's base predates the revocation
    r = verify(victim, 1, "base", "delta")
    assert b"certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr
    for k, leaf in ((0, bystander), (1, leaves[1][1])):
        r = verify(leaf, k, "base", "delta")
        assert r.returncode == 0, r.stdout + r.stderr
    # `crl generate --delta` signs every shard's delta and answers shard 0's
    d0_der = ops.crl_generate(c, "sdeltas", delta=True)
    c.close()
    d0 = x509.load_der_x509_crl(d0_der)
    assert d0.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value.full_name == [
        x509.UniformResourceIdentifier(f"{a.endpoint}/crl/sdeltas-0.crl")]
    assert _number(d0_der) > _number(deltas[0])
    # a CA named like a shard's delta is refused in one line
    r = a.cli("ca", "create", "sdeltas-1-delta", "--parent", "root", "--subject", "CN=Collide2,O=Donjon Test", check=False)
    assert r.returncode != 0 and b"delta CRL name of a CRL shard of CA 'sdeltas'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and b"Traceback" not in r.stderr
    # crl.delta through `donjon config set` (an administrator's session; written for the next start)
    out = a.cli("config", "set", "crl.delta", "{ deltas = 60, sdeltas = 30 }", officer="admin").stdout.decode()
    assert "takes effect" in out and 'delta = { "deltas" = 60, "sdeltas" = 30 }' in (a.home / "donjon.toml").read_text()
    r = a.cli("config", "set", "crl.delta", "{ sdeltas = 0 }", officer="admin", check=False)
    assert r.returncode == 1 and b"1..1440" in r.stderr and b"Traceback" not in r.stderr

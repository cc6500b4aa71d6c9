"""CRL shards in the appliance (`crl.shards`), judged by openssl and pkilint: each certificate's CRL DP names
its shard, each shard a complete CRL for its partition with its own number and an IDP naming exactly that URL."""

from __future__ import annotations

import json
import subprocess
import time

from cryptography import x509

from policy import lint
from tests.conftest import openssl
from tests.integration.test_ocsp import BOUND, _issue, _setup


def _get(url: str) -> bytes:
    return subprocess.run(["curl", "-sSf", url], capture_output=True, timeout=30, check=True).stdout


def _dp(pem) -> str:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    return cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value


def test_shards_crl_download_revocation_and_lint(appliance_factory, tmp_path):
    a, root, issuing, chain = _setup(appliance_factory, tmp_path, extra="[crl]\nshards = { issuing = 2 }\n")
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

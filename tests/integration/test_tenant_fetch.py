"""CRL-fed tenants whose CRL the Distribution agent fetches: over HTTP from a real web server and over
LDAP from a real slapd, then answered by `openssl ocsp`; a dead or bad source is visible in
`donjon dist status` and never replaces the CRL in use."""

from __future__ import annotations

import json
import time


from tests.integration.test_ocsp_tenants import OpensslCa, ask, tenants, wait
from tests.servers import BASE, Receiver, Slapd


def add_tenant(a, ca: OpensslCa, tmp_path, *urls: str) -> None:
    args = ["ocsp", "tenant", "add", "partner", "--ca-cert", str(ca.pem), "--unissued", "revoked"]
    for u in urls:
        args += ["--crl-url", u]
    a.cli(*args)
    csr = tmp_path / "responder.csr"
    a.cli("ocsp", "tenant", "csr", "partner", "--out", str(csr))
    a.cli("ocsp", "tenant", "update", "partner", "--responder-cert", str(ca.sign(csr, tmp_path / "responder.pem", "responder")))


def fetches(a) -> dict:
    return {t["tenant"]: t for t in json.loads(a.cli("dist", "status", "--json").stdout)["tenant_fetches"]}


def test_tenant_crl_fetched_over_http(appliance_factory, homes, tmp_path):
    web = Receiver(homes / "partner-web")
    try:
        a = appliance_factory()
        ca = OpensslCa(tmp_path / "partner")
        good, bad = ca.leaf("good"), ca.leaf("bad")
        ca.revoke(bad)
        (web.dir / "partner.crl").write_bytes(ca.crl("one").read_bytes())
        # The first URL is dead: the agent goes on to the next one.
        add_tenant(a, ca, tmp_path, "http://127.0.0.1:9/nothing.crl", f"{web.url}/partner.crl")
        wait(a, ca, str(good), ": good", bound=30)
        r = ask(a, ca, str(bad))
        assert b": revoked" in r.stdout and b"Response verify OK" in r.stderr, r.stdout + r.stderr
        assert tenants(a)["partner"]["crl_number"] == 1
        f = fetches(a)["partner"]
        assert f["last_result"] == "accepted" and f["failures"] == 0
    finally:
        web.stop()


def test_tenant_crl_fetched_over_ldap(appliance_factory, homes, tmp_path):
    d = Slapd(homes / "partner-ldap")
    d.start()
    try:
        a = appliance_factory()
        ca = OpensslCa(tmp_path / "partner")
        good, bad = ca.leaf("good"), ca.leaf("bad")
        ca.revoke(bad)
        dn = f"cn=Partner Test CA,{BASE}"
        d.put_binary(dn, "certificateRevocationList;binary", ca.crl("one").read_bytes())
        add_tenant(a, ca, tmp_path, f"{d.url}/{dn.replace(' ', '%20')}?certificateRevocationList;binary")
        wait(a, ca, str(bad), ": revoked", bound=30)
        assert b": good" in ask(a, ca, str(good)).stdout
    finally:
        d.stop()


def test_dead_and_bad_sources_are_visible_and_change_nothing(appliance_factory, homes, tmp_path):
    web = Receiver(homes / "bad-web")
    try:
        a = appliance_factory()
        ca = OpensslCa(tmp_path / "partner")
        good = ca.leaf("good")
        crl = ca.crl("one").read_bytes()
        (web.dir / "partner.crl").write_bytes(crl[: len(crl) // 2])  # truncated: never used
        add_tenant(a, ca, tmp_path, f"{web.url}/partner.crl")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            f = fetches(a).get("partner")
            if f and f["last_error"]:
                break
            time.sleep(0.2)
        assert f["last_error"] and "partner.crl" in f["last_error"]
        t = tenants(a)["partner"]
        assert t["crl_number"] is None and t["last_refusal"]
        r = ask(a, ca, str(good))
        assert b"trylater" in (r.stdout + r.stderr).lower().replace(b" ", b"")  # never an answer without a CRL
    finally:
        web.stop()

"""The SNMP role inside the running appliance, judged by net-snmp: live values that follow issuance
and CRLs, nothing for wrong credentials, and notifications at snmptrapd when the HSM token goes
away, when a CRL comes within its lead time, and when a role is killed."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from appliance.snmp import mib as M
from tests.conftest import make_csr
from tests.servers import free_udp_port, snmptrapd

USER, AUTH, PRIV = "ops", "auth-secret-123", "priv-secret-456"
TRAP_COMMUNITY = "trap-community"
BOUND = 30.0  # status is pushed every 5 s; the CIS probes its token every 5 s


_udp_port = free_udp_port


def _oid(base, *sub) -> str:
    return ".".join(map(str, base + sub))


@pytest.fixture
def snmp_env(tmp_path):
    d = tmp_path / "snmp-persist"
    d.mkdir()
    return dict(os.environ, SNMP_PERSISTENT_DIR=str(d), MIBS="", MIBDIRS="")


@pytest.fixture
def trapd(tmp_path, snmp_env):
    with snmptrapd(tmp_path, f"authCommunity log {TRAP_COMMUNITY}\n", snmp_env) as (port, log):
        yield port, log


def _walk(env, port, *auth) -> dict[str, str]:
    r = subprocess.run(["snmpwalk", *auth, "-On", "-m", "", "-t", "2", "-r", "0", f"udp:127.0.0.1:{port}", _oid(M.ROOT)],
                       env=env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return {}
    out = {}
    for line in r.stdout.splitlines():
        if " = " in line:
            k, v = line.split(" = ", 1)
            out[k.strip().lstrip(".")] = v.strip()
    return out


V3 = ("-v3", "-l", "authPriv", "-u", USER, "-a", "SHA-256", "-A", AUTH, "-x", "AES", "-X", PRIV)


def _ca_value(vals: dict[str, str], column: int, ca_name: str) -> str | None:
    for k, v in vals.items():
        if k.startswith(_oid(M.CA_ENTRY, M.CA_NAME) + ".") and ca_name in v:
            idx = k.rsplit(".", 1)[1]
            return vals.get(_oid(M.CA_ENTRY, column, int(idx)))
    return None


def _until(pred, what: str, timeout: float = BOUND):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_snmp_in_the_appliance(appliance_factory, tmp_path, snmp_env, trapd):
    trap_port, traplog = trapd
    agent_port = _udp_port()
    a = appliance_factory(start=False)
    (a.home / "secrets").mkdir(mode=0o700)
    for name, value in (("ro", "ro-test"), ("auth", AUTH), ("priv", PRIV), ("trap", TRAP_COMMUNITY)):
        (a.home / "secrets" / name).write_text(value + "\n")
        os.chmod(a.home / "secrets" / name, 0o600)  # SNMP secrets: 0600 files, never in donjon.toml
    (a.home / "donjon.toml").write_text(f"""
[ocsp]
listen = "127.0.0.1:0"
[crl]
validity-hours = 1
[snmp]
enabled = true
listen = "127.0.0.1:{agent_port}"
community-file = "secrets/ro"
community-sources = ["127.0.0.0/8"]
lead-time-hours = 2
[[snmp.users]]
name = "{USER}"
auth-key-file = "secrets/auth"
priv-key-file = "secrets/priv"
[[snmp.targets]]
host = "127.0.0.1"
port = {trap_port}
version = "v2c"
community-file = "secrets/trap"
[distribution]
backoff-max = 1
[[distribution.rule]]
name = "dead-directory"
url = "ldap://127.0.0.1:9"
publish = ["ca-cert"]
ca-dn = "cn={{CN}},dc=example,dc=org"
timeout = 1.0
""")
    a.start()

    # Live values over v3 authPriv (and v2c from an allowed source), following issuance and CRLs.
    vals = _until(lambda: (v := _walk(snmp_env, agent_port, *V3)) and _ca_value(v, M.CA_ISSUED, "issuing") and v,
                  "a v3 walk with the CA table")
    issued0 = int(_ca_value(vals, M.CA_ISSUED, "issuing").split()[-1])
    crl0 = int(_ca_value(vals, M.CA_CRL_NUMBER, "issuing").split()[-1])
    assert _walk(snmp_env, agent_port, "-v2c", "-c", "ro-test")
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(make_csr(tmp_path, "s")))
    a.cli("crl", "generate", "--ca", "issuing")
    _until(lambda: (v := _walk(snmp_env, agent_port, *V3))
           and int(_ca_value(v, M.CA_ISSUED, "issuing").split()[-1]) == issued0 + 1
           and int(_ca_value(v, M.CA_CRL_NUMBER, "issuing").split()[-1]) > crl0, "issued and CRL number to change")

    # Wrong credentials get nothing at all.
    assert _walk(snmp_env, agent_port, "-v3", "-l", "authPriv", "-u", USER, "-a", "SHA-256", "-A", "wrong-auth-key",
                 "-x", "AES", "-X", PRIV) == {}
    assert _walk(snmp_env, agent_port, "-v2c", "-c", "wrong-community") == {}
    assert _walk(snmp_env, agent_port, "-v1", "-c", "ro-test") == {}

    def trapped(kind: str, subject: str) -> bool:
        text = traplog.read_text() if traplog.exists() else ""
        return _oid(M.NOTIFY_OID[kind]) in text and subject in text

    # A CRL valid for 1 h with a 2 h lead time is within its lead time at once.
    _until(lambda: trapped("crl-expiring", "issuing"), "a crl-expiring notification")

    # The HSM token goes away: the CIS notices, the supervisor notifies.
    tokens = a.home / "softhsm" / "tokens"
    os.rename(tokens, tokens.with_name("tokens.away"))
    try:
        _until(lambda: trapped("token-unavailable", "donjon"), "a token-unavailable notification")
    finally:
        os.rename(tokens.with_name("tokens.away"), tokens)
    _until(lambda: trapped("token-recovered", "donjon"), "a token-recovered notification")

    # A destination nobody answers at: destination-failing after three failed attempts.
    _until(lambda: trapped("destination-failing", "dead-directory"), "a destination-failing notification")

    # A role is killed: role-died, then it is restarted.
    os.kill(a.role_pids()["ocsp"], 9)
    _until(lambda: trapped("role-died", "ocsp"), "a role-died notification")
    _until(lambda: trapped("role-restarted", "ocsp"), "a role-restarted notification")

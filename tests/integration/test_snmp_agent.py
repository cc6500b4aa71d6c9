"""The SNMP role as a real process, judged by net-snmp's snmpwalk/snmpget and snmptrapd."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.ipc import schema as S
from appliance.ipc.channel import SyncChannel, encode
from appliance.snmp import agent as A
from appliance.snmp import mib as M
from tests.servers import free_udp_port, snmptrapd

# The tools are installed by .ci/setup: a missing one is a failure, not a skip.
assert all(shutil.which(t) for t in ("snmpwalk", "snmpget", "snmptrapd")), "net-snmp tools missing: run bash .ci/setup"

ROOT = Path(__file__).resolve().parents[2]
USER, AUTH, PRIV = "donjon", "auth-secret-123", "priv-secret-456"
COMMUNITY, TRAP_COMMUNITY = "ro-community", "trap-community"
ENT = "1.3.6.1.4.1.99999"


def status(issued=10, crl=3, pid=4242, ocsp=True) -> S.ApplianceStatus:
    return S.ApplianceStatus(
        activated=True,
        roles=[S.RoleState("cis", "running", 0, pid), S.RoleState("factory", "running", 1, pid + 1)],
        tokens=[S.TokenState("donjon", True)],
        cas=[S.CaState(name="root", key_type="p384", not_after=2_000_000_000, crl_number=crl,
                       crl_next_update=1_900_000_000, issued=issued, revoked=2),
             S.CaState(name="issuing", key_type="p256", not_after=1_950_000_000, crl_number=1,
                       crl_next_update=None, issued=5, revoked=0)],
        ocsp=S.OcspStats(requests=100, good=90, revoked=5, unauthorized=3, malformed=1, errors=1,
                         responses_held=17, oldest_this_update=None) if ocsp else None,
        oldest_response_age=321,
        destinations=[S.DestinationState("ldap", 4, True)],
        audit_records=777,
        audit_checkpoint=1_800_000_000,
        gateway=S.GatewayCounters(requests=55, errors=1, issued=9, refused=2, orders_open=4),
    )


class Role:
    """Acts as the supervisor: a socketpair, the role started as a child process."""

    def __init__(self, tmp: Path, drop: bool = True):
        self.sup, child = socket.socketpair()
        args = [sys.executable, "-m", "appliance.snmp.main", "--fd", f"sup-snmp={child.fileno()}"]
        if not drop:
            args.append("--no-drop")
        self.proc = subprocess.Popen(args, pass_fds=(child.fileno(),), cwd=ROOT, stderr=subprocess.PIPE)
        child.close()
        self.sup.settimeout(20)
        self.chan = SyncChannel(self.sup, "sup-snmp", S.SnmpToSup)

    def start(self, cfg: S.SnmpConfig) -> S.Ready:
        self.chan.handshake()
        self.chan.send(cfg)
        ready = self.chan.recv()
        assert isinstance(ready, S.Ready) and ready.role == "snmp" and ready.pid == self.proc.pid
        return ready

    def wait(self, timeout=20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stderr.close()
        self.sup.close()


@pytest.fixture
def snmpenv(tmp_path):
    env = dict(os.environ, SNMP_PERSISTENT_DIR=str(tmp_path / "snmp"), SNMPCONFPATH=str(tmp_path / "snmp"), MIBS="")
    (tmp_path / "snmp").mkdir()
    return env


def tool(env, *args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def v3(env, port, *, auth=AUTH, priv=PRIV, user=USER, cmd="snmpwalk", oid=ENT):
    return tool(env, cmd, "-v3", "-l", "authPriv", "-u", user, "-a", "SHA-256", "-A", auth, "-x", "AES",
                "-X", priv, "-On", "-m", "", "-t", "1", "-r", "0", f"udp:127.0.0.1:{port}", oid)


def v2c(env, port, community=COMMUNITY, version="2c", oid=ENT):
    return tool(env, "snmpwalk", f"-v{version}", "-c", community, "-On", "-m", "", "-t", "1", "-r", "0",
                f"udp:127.0.0.1:{port}", oid)


def parse(out: str) -> dict[str, str]:
    vals = {}
    for line in out.splitlines():
        if " = " in line:
            k, v = line.split(" = ", 1)
            vals[k.strip().lstrip(".")] = v.strip()
    return vals


def oid(base, *sub) -> str:
    return ".".join(map(str, base + sub))


@pytest.fixture
def trapd(tmp_path, snmpenv):
    """snmptrapd on a free port, logging to a file, accepting our v3 user (by engine id) and v2c community."""
    port = free_udp_port()
    targets = [S.SnmpTarget(host="127.0.0.1", port=port, kind="trap", version="v3", user=USER),
               S.SnmpTarget(host="127.0.0.1", port=port, kind="trap", version="v2c", community=TRAP_COMMUNITY)]
    eid = A.notifier_engine_id(targets[0]).hex()
    conf = (f"createUser -e 0x{eid} {USER} SHA-256 {AUTH} AES {PRIV}\n"
            f"authUser log {USER} authPriv\nauthCommunity log {TRAP_COMMUNITY}\n")
    with snmptrapd(tmp_path, conf, snmpenv, port) as (_, log):
        yield targets, log


def config(port, targets=()) -> S.SnmpConfig:
    return S.SnmpConfig(listen=f"127.0.0.1:{port}",
                        users=[S.SnmpUser(name=USER, auth="sha256", auth_key=AUTH, priv="aes128", priv_key=PRIV)],
                        community=COMMUNITY, community_sources=["127.0.0.0/8"], targets=list(targets))


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_walk_update_credentials_and_traps(tmp_path, snmpenv, trapd):
    targets, traplog = trapd
    port = free_udp_port()
    role = Role(tmp_path)
    try:
        t0 = time.monotonic()
        role.start(config(port, targets))
        started = time.monotonic() - t0
        role.chan.send(status())
        # The status arrives asynchronously: walk until it shows (bounded).
        assert wait_for(lambda: parse(v3(snmpenv, port).stdout).get(oid(M.CA_ENTRY, M.CA_ISSUED, 1)) == "Counter64: 10")
        r = v3(snmpenv, port)
        assert r.returncode == 0, r.stderr
        vals = parse(r.stdout)
        assert vals[oid(M.APPLIANCE_STATE, 0)] == "INTEGER: 2"  # degraded: the LDAP destination fails
        assert vals[oid(M.ACTIVATION_STATE, 0)] == "INTEGER: 2"
        assert vals[oid(M.ROLE_ENTRY, M.ROLE_NAME, 1)] == 'STRING: "cis"'
        assert vals[oid(M.ROLE_ENTRY, M.ROLE_PID, 2)] == "INTEGER: 4243"
        assert vals[oid(M.ROLE_ENTRY, M.ROLE_RESTARTS, 2)] == "Counter32: 1"
        assert vals[oid(M.TOKEN_ENTRY, M.TOKEN_AVAILABLE, 1)] == "INTEGER: 1"
        assert vals[oid(M.CA_ENTRY, M.CA_NAME, 2)] == 'STRING: "issuing"'
        assert vals[oid(M.CA_ENTRY, M.CA_KEY_TYPE, 1)] == "INTEGER: 5"
        assert vals[oid(M.CA_ENTRY, M.CA_CRL_NUMBER, 1)] == "Counter64: 3"
        assert vals[oid(M.CA_ENTRY, M.CA_NOT_AFTER, 1)].startswith("Hex-STRING: 07 F1 05 12 03 21 14 00 2B 00 00")
        assert oid(M.CA_ENTRY, M.CA_CRL_NEXT_UPDATE, 2) not in vals  # None: sparse, not made up
        assert vals[oid(M.OCSP, M.OCSP_REQUESTS, 0)] == "Counter64: 100"
        assert vals[oid(M.OCSP, M.OCSP_RESPONSES_HELD, 0)] == "Gauge32: 17"
        assert vals[oid(M.OCSP, M.OCSP_OLDEST_RESPONSE_AGE, 0)] == "Gauge32: 321"
        assert vals[oid(M.DESTINATION_ENTRY, M.DESTINATION_BACKLOG, 1)] == "Gauge32: 4"
        assert vals[oid(M.AUDIT_RECORDS, 0)] == "Counter64: 777"
        assert vals[oid(M.GATEWAY, M.GATEWAY_ISSUED, 0)] == "Counter64: 9" and vals[oid(M.GATEWAY, M.GATEWAY_REFUSED, 0)] == "Counter64: 2"
        assert oid(M.STATUS_AGE, 0) in vals

        # A changed status is served at once.
        role.chan.send(status(issued=11, crl=4))
        assert wait_for(lambda: parse(v3(snmpenv, port).stdout).get(oid(M.CA_ENTRY, M.CA_ISSUED, 1)) == "Counter64: 11")
        assert parse(v3(snmpenv, port).stdout)[oid(M.CA_ENTRY, M.CA_CRL_NUMBER, 1)] == "Counter64: 4"

        # v2c with the community from 127.0.0.0/8: the same values; a GET too.
        r = v2c(snmpenv, port)
        assert r.returncode == 0 and parse(r.stdout)[oid(M.CA_ENTRY, M.CA_ISSUED, 1)] == "Counter64: 11", r.stderr
        r = v3(snmpenv, port, cmd="snmpget", oid=oid(M.AUDIT_RECORDS, 0))
        assert r.returncode == 0 and "Counter64: 777" in r.stdout, r.stderr

        # Wrong credentials, v1, an unknown user: no answer at all (timeout, non-zero exit).
        for r in (v3(snmpenv, port, auth="wrong-auth-key"), v3(snmpenv, port, priv="wrong-priv-key"),
                  v3(snmpenv, port, user="nobody"), v2c(snmpenv, port, community="public"),
                  v2c(snmpenv, port, version="1")):
            assert r.returncode != 0
            assert r.stdout.strip() == ""
            assert "Timeout" in r.stderr, r.stderr

        # Notifications: v3 trap and v2c trap per Notify, numeric OIDs and the subject in snmptrapd's log.
        sent = [("token-unavailable", "hsm-token-7"), ("role-died", "factory"), ("crl-expiring", "issuing-ca")]
        for kind, subject in sent:
            role.chan.send(S.Notify(kind=kind, subject=subject, detail=f"detail of {kind}"))

        def logged():
            text = traplog.read_text()
            return all(text.count(f'"{subject}"') >= 2 for _, subject in sent)
        assert wait_for(logged, 15), traplog.read_text()
        text = traplog.read_text()
        for kind, subject in sent:
            assert f".1.3.6.1.6.3.1.1.4.1.0 = OID: .{oid(M.NOTIFY_OID[kind])}" in text
            assert f'.{oid(M.NOTIFY_SUBJECT, 0)} = STRING: "{subject}"' in text
            assert f'.{oid(M.NOTIFY_DETAIL, 0)} = STRING: "detail of {kind}"' in text
        # Once per target (v3 and v2c, each from its own engine and socket), not twice.
        assert text.count(f"OID: .{oid(M.NOTIFY_OID['role-died'])}\t") == 2
        import re
        assert len(set(re.findall(r"\[127\.0\.0\.1\]:(\d+)->", text))) == 2

        role.chan.send(S.Shutdown())
        assert role.wait() == 0
        print(f"role start to Ready: {started:.3f} s")
    finally:
        role.stop()


@pytest.mark.parametrize("frames", [
    [b"\x00\x00\x00\x03abc"],  # undecodable
    [b"\xff\xff\xff\xff"],  # longer than the link maximum: refused before reading
    ["status-first"],  # an ApplianceStatus before the SnmpConfig
    ["hello-again"],  # a second Hello after the handshake
])
def test_malformed_frames_exit_3(tmp_path, frames):
    role = Role(tmp_path)
    try:
        role.chan.handshake()
        for f in frames:
            if f == "status-first":
                f = encode(status())
            elif f == "hello-again":
                f = encode(S.Hello(link="sup-snmp", version=S.VERSION))
            role.sup.sendall(f)
        assert role.wait() == 3
        err = role.proc.stderr.read().decode()
        assert err.count("\n") == 1 and "protocol violation" in err, err
    finally:
        role.stop()


def test_unexpected_after_ready_and_wrong_hello_exit_3(tmp_path):
    port = free_udp_port()
    role = Role(tmp_path)
    try:
        role.start(config(port))
        role.chan.send(config(port))  # a second SnmpConfig
        assert role.wait() == 3
    finally:
        role.stop()
    role = Role(tmp_path)
    try:
        role.chan.send(S.Hello(link="sup-ocsp", version=S.VERSION))
        assert role.wait() == 3
    finally:
        role.stop()

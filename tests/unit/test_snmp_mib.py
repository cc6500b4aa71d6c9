"""DONJON-MIB: smilint-clean, and appliance/snmp/mib.py agrees with it OID for OID."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from appliance.ipc import schema as S
from appliance.snmp import agent as A
from appliance.snmp import mib as M

MIB = Path(M.__file__).with_name("DONJON-MIB.txt")

# Debian's libsmi ships no IETF modules (non-free); Erlang/OTP's snmp application (erlang-snmp, in
# main) carries SNMPv2-SMI, -TC, -CONF and SNMP-FRAMEWORK-MIB as text.
SMIPATH = os.environ.get("DONJON_SMIPATH") or ":".join(sorted(glob.glob("/usr/lib/erlang/lib/snmp-*/mibs")))



def needs_smi(fn):
    """smilint and the base MIBs come with .ci/setup: their absence fails the test, it never skips it."""
    def wrapped(*a, **k):
        assert shutil.which("smilint") and SMIPATH, "smilint or the IETF base MIBs missing: run bash .ci/setup"
        return fn(*a, **k)
    wrapped.__name__ = fn.__name__
    return wrapped


def _smi(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool, *args, str(MIB)], env=dict(os.environ, SMIPATH=SMIPATH),
                          capture_output=True, text=True, timeout=60)


@needs_smi
def test_smilint_level_6_is_silent():
    # smilint exits 0 even on errors: judge its output. Nothing at all: no error, no warning.
    r = _smi("smilint", "-l", "6", "-s")
    assert r.stdout + r.stderr == ""


@needs_smi
def test_python_constants_match_the_mib():
    r = _smi("smidump", "-f", "identifiers")
    assert r.returncode == 0, r.stderr
    ids = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "DONJON-MIB":
            ids[parts[1]] = tuple(int(x) for x in parts[3].split("."))
    assert ids["donjonMIB"] == M.ROOT
    expect = {
        "donjonApplianceState": M.APPLIANCE_STATE, "donjonActivationState": M.ACTIVATION_STATE,
        "donjonStatusAge": M.STATUS_AGE,
        "donjonRoleName": M.ROLE_ENTRY + (M.ROLE_NAME,), "donjonRoleState": M.ROLE_ENTRY + (M.ROLE_STATE,),
        "donjonRoleRestarts": M.ROLE_ENTRY + (M.ROLE_RESTARTS,), "donjonRolePid": M.ROLE_ENTRY + (M.ROLE_PID,),
        "donjonTokenLabel": M.TOKEN_ENTRY + (M.TOKEN_LABEL,), "donjonTokenAvailable": M.TOKEN_ENTRY + (M.TOKEN_AVAILABLE,),
        "donjonCaName": M.CA_ENTRY + (M.CA_NAME,), "donjonCaKeyType": M.CA_ENTRY + (M.CA_KEY_TYPE,),
        "donjonCaNotAfter": M.CA_ENTRY + (M.CA_NOT_AFTER,), "donjonCaCrlNumber": M.CA_ENTRY + (M.CA_CRL_NUMBER,),
        "donjonCaCrlNextUpdate": M.CA_ENTRY + (M.CA_CRL_NEXT_UPDATE,), "donjonCaIssued": M.CA_ENTRY + (M.CA_ISSUED,),
        "donjonCaRevoked": M.CA_ENTRY + (M.CA_REVOKED,),
        "donjonOcspRequests": M.OCSP + (M.OCSP_REQUESTS,), "donjonOcspGood": M.OCSP + (M.OCSP_GOOD,),
        "donjonOcspRevoked": M.OCSP + (M.OCSP_REVOKED,), "donjonOcspUnauthorized": M.OCSP + (M.OCSP_UNAUTHORIZED,),
        "donjonOcspMalformed": M.OCSP + (M.OCSP_MALFORMED,), "donjonOcspErrors": M.OCSP + (M.OCSP_ERRORS,),
        "donjonOcspResponsesHeld": M.OCSP + (M.OCSP_RESPONSES_HELD,),
        "donjonOcspOldestResponseAge": M.OCSP + (M.OCSP_OLDEST_RESPONSE_AGE,),
        "donjonDestinationName": M.DESTINATION_ENTRY + (M.DESTINATION_NAME,),
        "donjonDestinationBacklog": M.DESTINATION_ENTRY + (M.DESTINATION_BACKLOG,),
        "donjonDestinationFailure": M.DESTINATION_ENTRY + (M.DESTINATION_FAILURE,),
        "donjonAuditRecords": M.AUDIT_RECORDS, "donjonAuditCheckpoint": M.AUDIT_CHECKPOINT,
        "donjonNotifySubject": M.NOTIFY_SUBJECT, "donjonNotifyDetail": M.NOTIFY_DETAIL,
        "donjonGatewayRequests": M.GATEWAY + (M.GATEWAY_REQUESTS,), "donjonGatewayErrors": M.GATEWAY + (M.GATEWAY_ERRORS,),
        "donjonGatewayIssued": M.GATEWAY + (M.GATEWAY_ISSUED,), "donjonGatewayRefused": M.GATEWAY + (M.GATEWAY_REFUSED,),
        "donjonGatewayOrdersOpen": M.GATEWAY + (M.GATEWAY_ORDERS_OPEN,),
    }
    for name, oid in expect.items():
        assert ids[name] == oid, name
    for kind, oid in M.NOTIFY_OID.items():
        assert ids[M.NOTIFY_NAME[kind]] == oid, kind


def test_every_notify_kind_has_a_notification():
    assert set(M.NOTIFY_OID) == set(typing.get_args(S.NotifyKind))
    assert len(set(M.NOTIFY_OID.values())) == len(M.NOTIFY_OID)


def test_instances_are_sparse_and_bounded():
    st = S.ApplianceStatus(
        activated=False, roles=[S.RoleState("ocsp", "failed", 2**40, -1)], tokens=[S.TokenState("t", False)],
        cas=[S.CaState(name="c", key_type="ed25519", not_after=0, crl_number=2**70, crl_next_update=None,
                       issued=1, revoked=0)],
        ocsp=None, oldest_response_age=None, destinations=[], audit_records=0, audit_checkpoint=None)
    got = M.instances(st)
    assert int(got[M.APPLIANCE_STATE + (0,)]) == M.STATE_FAILED
    assert int(got[M.ACTIVATION_STATE + (0,)]) == 1
    assert int(got[M.ROLE_ENTRY + (M.ROLE_RESTARTS, 1)]) == 2**32 - 1  # clamped, never an encoding error
    assert int(got[M.ROLE_ENTRY + (M.ROLE_PID, 1)]) == 0
    assert int(got[M.CA_ENTRY + (M.CA_CRL_NUMBER, 1)]) == 2**64 - 1
    assert M.CA_ENTRY + (M.CA_CRL_NEXT_UPDATE, 1) not in got
    assert not any(o[:len(M.OCSP)] == M.OCSP for o in got)
    assert M.AUDIT_CHECKPOINT + (0,) not in got
    assert int(M.instances(None)[M.APPLIANCE_STATE + (0,)]) == M.STATE_UNKNOWN


def test_admin_string_cuts_on_a_character_boundary():
    s = M.admin_string("é" * 200)
    assert len(bytes(s)) == 254 and bytes(s).decode("utf-8") == "é" * 127


def test_date_and_time_is_utc():
    assert bytes(M.date_and_time(0)) == bytes([7, 178, 1, 1, 0, 0, 0, 0, ord("+"), 0, 0])


@pytest.mark.parametrize("data,version", [
    (bytes.fromhex("302602010104067075626c6963"), 1),
    (bytes.fromhex("3081ff020103"), 3),
    (bytes.fromhex("3026020100"), 0),
    (b"", None), (b"\x30", None), (bytes.fromhex("3026020200"), None), (bytes.fromhex("3126020100"), None),
    (bytes.fromhex("3085ffffffffff020103"), None),
])
def test_message_version_peek(data, version):
    assert A._message_version(data) == version


def test_engine_ids_are_stable_rfc3411_format_5():
    t = S.SnmpTarget(host="192.0.2.1", port=162, kind="trap", version="v3", user="u")
    eid = A.notifier_engine_id(t)
    assert eid == A.notifier_engine_id(t) and eid[:5] == bytes.fromhex("8001869f05") and len(eid) == 17
    assert eid != A.notifier_engine_id(S.SnmpTarget(host="192.0.2.1", port=163, kind="trap", version="v3", user="u"))


def test_parse_hostport():
    assert A.parse_hostport("127.0.0.1:161") == ("127.0.0.1", 161)
    assert A.parse_hostport("[::1]:1161") == ("::1", 1161)
    with pytest.raises(ValueError):
        A.parse_hostport("localhost")


def test_gateway_counters_when_it_reports():
    base = dict(activated=True, roles=[], tokens=[], cas=[], ocsp=None, oldest_response_age=None, destinations=[],
                audit_records=0, audit_checkpoint=None)
    assert not any(k[: len(M.GATEWAY)] == M.GATEWAY for k in M.instances(S.ApplianceStatus(**base)))
    got = M.instances(S.ApplianceStatus(**base, gateway=S.GatewayCounters(7, 1, 5, 2, 3)))
    assert [int(got[M.GATEWAY + (c, 0)]) for c in range(1, 6)] == [7, 1, 5, 2, 3]


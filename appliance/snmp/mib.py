"""DONJON-MIB as Python constants (written by hand from DONJON-MIB.txt; a test compares them with
smidump) and the mapping of an ApplianceStatus snapshot onto instance OIDs and SMI values."""

from __future__ import annotations

import datetime

from pysnmp.proto import rfc1902

from appliance.ipc import schema as S

OID = tuple[int, ...]

ROOT: OID = (1, 3, 6, 1, 4, 1, 99999)  # 99999: an unassigned placeholder, not an IANA PEN of ours
NOTIFICATIONS: OID = ROOT + (0,)
OBJECTS: OID = ROOT + (1,)

APPLIANCE_STATE: OID = OBJECTS + (1, 1)
ACTIVATION_STATE: OID = OBJECTS + (1, 2)
STATUS_AGE: OID = OBJECTS + (1, 3)

ROLE_ENTRY: OID = OBJECTS + (2, 1)
ROLE_NAME, ROLE_STATE, ROLE_RESTARTS, ROLE_PID = 2, 3, 4, 5

TOKEN_ENTRY: OID = OBJECTS + (3, 1)
TOKEN_LABEL, TOKEN_AVAILABLE = 2, 3

CA_ENTRY: OID = OBJECTS + (4, 1)
CA_NAME, CA_KEY_TYPE, CA_NOT_AFTER, CA_CRL_NUMBER, CA_CRL_NEXT_UPDATE, CA_ISSUED, CA_REVOKED = 2, 3, 4, 5, 6, 7, 8

OCSP: OID = OBJECTS + (5,)
OCSP_REQUESTS, OCSP_GOOD, OCSP_REVOKED, OCSP_UNAUTHORIZED, OCSP_MALFORMED, OCSP_ERRORS = 1, 2, 3, 4, 5, 6
OCSP_RESPONSES_HELD, OCSP_OLDEST_RESPONSE_AGE = 7, 8

DESTINATION_ENTRY: OID = OBJECTS + (6, 1)
DESTINATION_NAME, DESTINATION_BACKLOG, DESTINATION_FAILURE = 2, 3, 4

GATEWAY: OID = OBJECTS + (9,)
GATEWAY_REQUESTS, GATEWAY_ERRORS, GATEWAY_ISSUED, GATEWAY_REFUSED, GATEWAY_ORDERS_OPEN = 1, 2, 3, 4, 5

AUDIT_RECORDS: OID = OBJECTS + (7, 1)
AUDIT_CHECKPOINT: OID = OBJECTS + (7, 2)

NOTIFY_SUBJECT: OID = OBJECTS + (8, 1)
NOTIFY_DETAIL: OID = OBJECTS + (8, 2)

# NotifyKind -> NOTIFICATION-TYPE
NOTIFY_OID: dict[str, OID] = {
    kind: NOTIFICATIONS + (i,)
    for i, kind in enumerate(
        ("role-died", "role-restarted", "token-unavailable", "token-recovered", "activated", "deactivated",
         "login-lockout", "ca-cert-expiring", "responder-cert-expiring", "crl-expiring", "crl-lapsed",
         "ocsp-expiring", "ocsp-lapsed", "destination-failing", "audit-verify-failed", "disk-nearly-full",
         "role-unresponsive"),
        start=1,
    )
}

# Names of the NOTIFICATION-TYPEs, for the cross-check against the MIB.
NOTIFY_NAME: dict[str, str] = {
    kind: "donjon" + "".join(p.capitalize() for p in kind.split("-")) for kind in NOTIFY_OID
}

SYS_UPTIME: OID = (1, 3, 6, 1, 2, 1, 1, 3, 0)
SNMP_TRAP_OID: OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)

ROLE_STATES = {"starting": 1, "running": 2, "restarting": 3, "stopped": 4, "failed": 5, "unresponsive": 6}
KEY_TYPES = {"rsa2048": 1, "rsa3072": 2, "rsa4096": 3, "p256": 4, "p384": 5, "ed25519": 6}
STATE_OK, STATE_DEGRADED, STATE_FAILED, STATE_UNKNOWN = 1, 2, 3, 4
_TRUE, _FALSE = 1, 2  # TruthValue

_U32 = 2**32 - 1
_U64 = 2**64 - 1


def admin_string(text: str, limit: int = 255) -> rfc1902.OctetString:
    """UTF-8, cut at `limit` octets without splitting a character (SnmpAdminString is 0..255)."""
    raw = text.encode("utf-8")[:limit]
    return rfc1902.OctetString(raw.decode("utf-8", "ignore").encode("utf-8"))


def date_and_time(epoch: int) -> rfc1902.OctetString:
    """SNMPv2-TC DateAndTime, 11-octet form, UTC."""
    t = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return rfc1902.OctetString(
        bytes([t.year >> 8, t.year & 0xFF, t.month, t.day, t.hour, t.minute, t.second, 0, ord("+"), 0, 0])
    )


def _c64(n: int) -> rfc1902.Counter64:
    return rfc1902.Counter64(min(max(n, 0), _U64))


def _g32(n: int) -> rfc1902.Gauge32:
    return rfc1902.Gauge32(min(max(n, 0), _U32))


def _c32(n: int) -> rfc1902.Counter32:
    return rfc1902.Counter32(min(max(n, 0), _U32))


def _i32(n: int) -> rfc1902.Integer32:
    return rfc1902.Integer32(min(max(n, 0), 2**31 - 1))


def appliance_state(st: S.ApplianceStatus | None) -> int:
    if st is None:
        return STATE_UNKNOWN
    if any(r.state == "failed" for r in st.roles):
        return STATE_FAILED
    if (any(r.state != "running" for r in st.roles) or any(not t.available for t in st.tokens)
            or any(d.failing for d in st.destinations)):
        return STATE_DEGRADED
    return STATE_OK


def instances(st: S.ApplianceStatus | None) -> dict[OID, object]:
    """Every instance the snapshot defines (STATUS_AGE.0 excepted: it is computed when read).

    Tables are indexed by position from 1 (65535 rows at most); a None in the snapshot leaves the
    instance out (a sparse row), never a made-up value."""
    out: dict[OID, object] = {APPLIANCE_STATE + (0,): rfc1902.Integer32(appliance_state(st))}
    if st is None:
        return out
    out[ACTIVATION_STATE + (0,)] = rfc1902.Integer32(2 if st.activated else 1)
    for i, r in enumerate(st.roles[:65535], start=1):
        out[ROLE_ENTRY + (ROLE_NAME, i)] = admin_string(r.name, 64)
        out[ROLE_ENTRY + (ROLE_STATE, i)] = rfc1902.Integer32(ROLE_STATES[r.state])
        out[ROLE_ENTRY + (ROLE_RESTARTS, i)] = _c32(r.restarts)
        out[ROLE_ENTRY + (ROLE_PID, i)] = _i32(r.pid)
    for i, t in enumerate(st.tokens[:65535], start=1):
        out[TOKEN_ENTRY + (TOKEN_LABEL, i)] = admin_string(t.label, 32)
        out[TOKEN_ENTRY + (TOKEN_AVAILABLE, i)] = rfc1902.Integer32(_TRUE if t.available else _FALSE)
    for i, c in enumerate(st.cas[:65535], start=1):
        out[CA_ENTRY + (CA_NAME, i)] = admin_string(c.name, 64)
        out[CA_ENTRY + (CA_KEY_TYPE, i)] = rfc1902.Integer32(KEY_TYPES[c.key_type])
        out[CA_ENTRY + (CA_NOT_AFTER, i)] = date_and_time(c.not_after)
        out[CA_ENTRY + (CA_CRL_NUMBER, i)] = _c64(c.crl_number)
        if c.crl_next_update is not None:
            out[CA_ENTRY + (CA_CRL_NEXT_UPDATE, i)] = date_and_time(c.crl_next_update)
        out[CA_ENTRY + (CA_ISSUED, i)] = _c64(c.issued)
        out[CA_ENTRY + (CA_REVOKED, i)] = _c64(c.revoked)
    if st.ocsp is not None:
        o = st.ocsp
        for col, n in ((OCSP_REQUESTS, o.requests), (OCSP_GOOD, o.good), (OCSP_REVOKED, o.revoked),
                       (OCSP_UNAUTHORIZED, o.unauthorized), (OCSP_MALFORMED, o.malformed), (OCSP_ERRORS, o.errors)):
            out[OCSP + (col, 0)] = _c64(n)
        out[OCSP + (OCSP_RESPONSES_HELD, 0)] = _g32(o.responses_held)
    if st.oldest_response_age is not None:
        out[OCSP + (OCSP_OLDEST_RESPONSE_AGE, 0)] = _g32(st.oldest_response_age)
    for i, d in enumerate(st.destinations[:65535], start=1):
        out[DESTINATION_ENTRY + (DESTINATION_NAME, i)] = admin_string(d.name, 64)
        out[DESTINATION_ENTRY + (DESTINATION_BACKLOG, i)] = _g32(d.backlog)
        out[DESTINATION_ENTRY + (DESTINATION_FAILURE, i)] = rfc1902.Integer32(_TRUE if d.failing else _FALSE)
    if st.gateway is not None:
        g = st.gateway
        for col, n in ((GATEWAY_REQUESTS, g.requests), (GATEWAY_ERRORS, g.errors), (GATEWAY_ISSUED, g.issued),
                       (GATEWAY_REFUSED, g.refused)):
            out[GATEWAY + (col, 0)] = _c64(n)
        out[GATEWAY + (GATEWAY_ORDERS_OPEN, 0)] = _g32(g.orders_open)
    out[AUDIT_RECORDS + (0,)] = _c64(st.audit_records)
    if st.audit_checkpoint is not None:
        out[AUDIT_CHECKPOINT + (0,)] = date_and_time(st.audit_checkpoint)
    return out

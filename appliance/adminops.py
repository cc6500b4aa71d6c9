"""The admin operations shared by the CLI, the console menu and the SSH shell: one body per operation."""

from __future__ import annotations

import base64
import os
import re
import typing
from datetime import datetime, timezone
from typing import Any

from appliance.client import AdminClient, ClientError
from appliance.config import SETTINGS
from appliance.ipc import schema as S

REASONS = {"unspecified": 0, "keyCompromise": 1, "cACompromise": 2, "affiliationChanged": 3, "superseded": 4,
           "cessationOfOperation": 5, "certificateHold": 6, "privilegeWithdrawn": 9, "aACompromise": 10}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the schema's Name: CAs, profiles, officers
HEX_RE = re.compile(r"^(0x)?[0-9A-Fa-f]{1,40}$|^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){0,19}$")


class OpError(Exception):
    """One line for the operator (the CLI prints it and exits 1; the console prints it and stays)."""


class PendingApproval(Exception):
    """Dual control filed the request instead of running it: other officers approve it (`approve ID`)."""

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        super().__init__(f"request #{doc['pending']} ({doc['operation']}) is pending: {doc['approvals']} of "
                         f"{doc['required']} approvals; other officers run `donjon approve {doc['pending']}`")


def check_name(s: str, what: str = "name") -> str:
    if not NAME_RE.match(s) or ".." in s:
        raise OpError(f"invalid {what} {s[:40]!r}: letters, digits, '.', '_', '-' only (at most 64)")
    return s


KEY_TYPES = typing.get_args(S.KeyType)
MAX_DAYS = 40 * 366  # the schema's bound on every validity in days
MAX_CSRS = 1024  # CSRs in one issue request (the schema's bound)
MAX_CSR_BYTES = 64 * 1024  # one CSR (the schema's Der)


def check_range(v: int, lo: int, hi: int, what: str) -> int:
    """The admin API refuses out-of-range values too; say so here, before anything is sent."""
    if not lo <= v <= hi:
        raise OpError(f"{what} {v}: must be {lo} to {hi}")
    return v


def check_key_type(s: str) -> str:
    if s not in KEY_TYPES:
        raise OpError(f"key type {s[:20]!r}: one of {', '.join(KEY_TYPES)}")
    return s


def parse_serial(s: str) -> bytes:
    if not HEX_RE.match(s):
        raise OpError(f"serial {s[:48]!r} is not hexadecimal")
    v = int(s.removeprefix("0x").replace(":", ""), 16)
    if v <= 0 or v.bit_length() > 159:
        raise OpError("a serial is positive and at most 20 octets")
    return v.to_bytes((v.bit_length() + 7) // 8, "big")


def parse_reason(s: str) -> int:
    if s == "removeFromCRL":  # RFC 5280 §5.3.1: delta CRLs only; a full CRL entry with it is read both ways
        raise OpError("removeFromCRL is not a revocation reason (RFC 5280: delta CRLs only); "
                      "to lift a certificateHold use `donjon unrevoke --ca CA SERIAL`")
    if s not in REASONS:
        raise OpError(f"unknown reason {s!r} (one of: {', '.join(REASONS)})")
    return REASONS[s]


def parse_invalidity(s: str | None) -> int | None:
    if not s:
        return None
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise OpError(f"invalidity date {s!r} is not ISO 8601") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return int(d.timestamp())


def parse_subject(s: str) -> tuple[tuple[str, str], ...]:
    """'CN=Issuing CA 1,O=Example,C=FR' -> attribute pairs (commas inside values: escape as \\,)."""
    parts, cur, esc = [], "", False
    for ch in s:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if "=" not in p:
            raise OpError(f"subject part {p!r} is not ATTR=value")
        k, v = p.split("=", 1)
        out.append((k.strip(), v.strip()))
    return tuple(out)


def der_of(data: bytes, label: str) -> bytes:
    """Accept DER or PEM."""
    if data.lstrip().startswith(b"-----BEGIN"):
        m = re.search(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", data, re.S)
        if not m:
            raise OpError(f"the {label} is not valid PEM")
        try:
            return base64.b64decode(b"".join(m.group(2).split()), validate=True)
        except ValueError:
            raise OpError(f"the {label} is not valid PEM") from None
    return data


MAX_CSR_FILE = 128 * 1024  # a CSR file read at most this far (PEM of a 64 KiB DER)
_NOT_CSR = {"CERTIFICATE": "a certificate", "X509 CERTIFICATE": "a certificate", "TRUSTED CERTIFICATE": "a certificate",
            "PUBLIC KEY": "a public key", "RSA PUBLIC KEY": "a public key", "PKCS7": "a PKCS#7 bundle", "X509 CRL": "a CRL"}


def csr_der(data: bytes, name: str) -> bytes:
    """The DER of a CSR file (PEM or DER); a certificate, a key or an oversize file is named as such,
    before anything reaches the appliance."""
    m = re.match(rb"\s*-----BEGIN ([A-Z0-9 ]+)-----", data)
    if m:
        kind = m.group(1).decode()
        what = "a private key" if "PRIVATE KEY" in kind else _NOT_CSR.get(kind)
        if what:
            raise OpError(f"{name} is {what}, not a certificate request (make a CSR: openssl req -new -key KEY)")
    if len(data) > MAX_CSR_FILE:
        raise OpError(f"{name} is larger than {MAX_CSR_FILE // 1024} KiB: not a certificate request")
    der = der_of(data, f"CSR {name}")
    if len(der) > MAX_CSR_BYTES:
        raise OpError(f"{name} is larger than {MAX_CSR_BYTES // 1024} KiB: not a certificate request")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    try:
        x509.load_der_x509_csr(der)
        return der
    except ValueError:
        pass
    try:
        x509.load_der_x509_certificate(der)
        raise OpError(f"{name} is a certificate, not a certificate request")
    except ValueError:
        pass
    from cryptography.exceptions import UnsupportedAlgorithm
    try:
        serialization.load_der_private_key(der, password=None)
        is_key = True
    except TypeError:  # an encrypted key
        is_key = True
    except (ValueError, UnsupportedAlgorithm):
        is_key = False
    if is_key:
        raise OpError(f"{name} is a private key, not a certificate request (make a CSR: openssl req -new -key KEY)")
    return der  # malformed: the appliance names what is wrong (and audits it)


def _batches(ders: list[bytes]) -> list[tuple[int, int]]:
    """[start, end) ranges of at most MAX_CSRS CSRs and 6 MiB each: every request fits in one admin frame."""
    out, start, size = [], 0, 0
    for i, d in enumerate(ders):
        if i > start and (i - start >= MAX_CSRS or size + len(d) > 6 * 1024 * 1024):
            out.append((start, i))
            start, size = i, 0
        size += len(d) + 8
    if ders:
        out.append((start, len(ders)))
    return out


def _wrap(fn, *a, **kw):
    try:
        doc = fn(*a, **kw)
    except ClientError as e:
        raise OpError(str(e)) from None
    if isinstance(doc, dict) and "pending" in doc and "required" in doc:
        raise PendingApproval(doc)
    return doc


# ---------------------------------------------------------------- operations (each: client in, data out)


def status(c: AdminClient) -> dict[str, Any]:
    return _wrap(c.call, S.AStatus)


def status_lines(doc: dict[str, Any]) -> list[str]:
    lines = [f"activated: {'yes' if doc['activated'] else 'no'}"]
    silent = [name for name, state in (doc.get("cis") or {}).items() if state != "responsive"]
    if silent:  # activated or not, nothing gets signed while the CIS does not answer
        lines.append(f"CIS: UNRESPONSIVE ({', '.join(silent)}): signing requests fail until it answers again")
    if doc.get("token"):
        lines.append(f"token: {doc['token']}")
    if doc["activated"]:
        lines.append(f"CAs: {', '.join(doc['cas']) or '-'}; certificates: {doc['certificates']}; revoked: {doc['revoked']}")
        lines.append(f"audit: {doc['audit_records']} records, head {doc['audit_head']}")
        cp = doc.get("audit_checkpoint")
        lines.append(f"audit checkpoint: seq {cp['seq']} head {cp['head']} signed "
                     f"{datetime.fromtimestamp(cp['time'], timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}Z"
                     if cp else "audit checkpoint: none yet (donjon audit checkpoint)")
    return lines


def activate(c: AdminClient, pin: str) -> dict[str, Any]:
    return _wrap(c.call, S.AActivate, pin=pin)


def ca_list(c: AdminClient) -> list[dict[str, Any]]:
    return _wrap(c.call, S.ACaList)["cas"]


def ca_list_lines(cas: list[dict[str, Any]]) -> list[str]:
    return [f"{c['name']:<20} {c['key_type']:<8} parent={c['parent'] or '-':<16} {c.get('state', '?'):<8} "
            f"until {c['not_after'][:10]}  {c['subject']}" for c in cas]


def ca_create(c: AdminClient, name: str, parent: str | None, subject: tuple, profile: str | None, key_type: str,
              days: int, path_length: int | None, allowed_profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    check_name(name, "CA name")
    if parent is not None:
        check_name(parent, "parent CA name")
    if profile is not None:
        check_name(profile, "profile name")
    for p in allowed_profiles:
        check_name(p, "profile")
    check_key_type(key_type)
    check_range(days, 1, MAX_DAYS, "validity in days")
    if path_length is not None:
        check_range(path_length, 0, 16, "path length")
    if parent is None:  # a new root (first root or a root rollover): self-signed
        return _wrap(c.call, S.ACaCreateRoot, name=name, profile=profile or "root-ca", key_type=key_type, subject=subject,
                     validity_days=days, path_length=path_length, allowed_profiles=allowed_profiles)
    return _wrap(c.call, S.ACaCreate, name=name, parent=parent, profile=profile or "sub-ca", key_type=key_type,
                 subject=subject, validity_days=days, path_length=path_length, allowed_profiles=allowed_profiles)


def ca_sign_csr(c: AdminClient, parent: str, profile: str, csr_der: bytes, days: int, path_length: int | None) -> dict[str, Any]:
    check_name(parent, "parent CA name")
    check_name(profile, "profile name")
    check_range(days, 1, MAX_DAYS, "validity in days")
    if path_length is not None:
        check_range(path_length, 0, 16, "path length")
    return _wrap(c.call, S.ACaSignCsr, parent=parent, profile=profile, csr=csr_der, validity_days=days, path_length=path_length)


def ca_chain_pem(c: AdminClient, name: str, chain: bool) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    ders = [bytes.fromhex(h) for h in _wrap(c.call, S.ACaExport, name=check_name(name, "CA name"))["chain"]]
    if not chain:
        ders = ders[:1]
    return b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM) for d in ders)


def issue(c: AdminClient, ca: str, profile: str, csr_ders: list[bytes], days: int | None,
          labels: list[str]) -> tuple[bytes, list[dict[str, Any]], int]:
    """Returns (PEM of the issued certificates, one document per CSR, number refused). Many CSRs go
    as several requests, each within the admin API's bounds."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    check_name(ca, "CA name")
    check_name(profile, "profile name")
    if days is not None:
        check_range(days, 1, MAX_DAYS, "validity in days")
    for label, der in zip(labels, csr_ders):
        if len(der) > MAX_CSR_BYTES:
            raise OpError(f"{label} is larger than {MAX_CSR_BYTES // 1024} KiB: not a certificate request")
    pem, docs, failed = b"", [], 0
    for start, end in _batches(csr_ders):
        r = _wrap(c.issue, ca=ca, profile=profile, csrs=csr_ders[start:end], validity_days=days)
        for label, res, serial in zip(labels[start:end], r.results, r.serials):
            if res.cert is None:
                failed += 1
                docs.append({"csr": label, "error": res.error})
            else:
                p = x509.load_der_x509_certificate(res.cert).public_bytes(Encoding.PEM)
                pem += p
                docs.append({"csr": label, "serial": serial, "pem": p.decode()})
    return pem, docs, failed


def cert_show(c: AdminClient, ca: str, serial: bytes) -> dict[str, Any]:
    check_name(ca, "CA name")
    return _wrap(c.call, S.ACertShow, ca=ca, serial=serial)


def cert_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A certificate's record for printing: the PEM left out, its times in ISO 8601 exactly as `ca show` prints them."""
    iso = ("not_before", "not_after", "issued_at", "revoked_at")
    return {k: (datetime.fromtimestamp(v, timezone.utc).isoformat() if k in iso and isinstance(v, int) else v)
            for k, v in doc.items() if k != "pem"}


CERT_STATUSES = ("valid", "revoked", "expired")


def cert_list(c: AdminClient, ca: str | None, limit: int, subject: str | None = None, san: str | None = None,
              status: str | None = None, expires_within: int | None = None, profile: str | None = None) -> list[dict[str, Any]]:
    if status is not None and status not in CERT_STATUSES:
        raise OpError(f"unknown status {status!r} (one of: {', '.join(CERT_STATUSES)})")
    if expires_within is not None and not 0 <= expires_within <= 40 * 366:
        raise OpError("--expires-within is a number of days, 0 to 14640")
    check_range(limit, 1, 10000, "limit")
    for what, v in (("subject", subject), ("SAN", san)):
        if v is not None and not 1 <= len(v) <= 256:
            raise OpError(f"the {what} filter is 1 to 256 characters")
    if profile is not None:
        check_name(profile, "profile")
    if ca is not None:
        check_name(ca, "CA name")
    return _wrap(c.call, S.ACertList, ca=ca, limit=limit, subject=subject, san=san, status=status,
                 expires_within_days=expires_within, profile=profile)["certs"]


def cert_list_lines(certs: list[dict[str, Any]]) -> list[str]:
    def state(c: dict[str, Any]) -> str:
        return "REVOKED" if c["revoked"] else "expired" if c.get("expired") else "valid  "
    return [f"{c['ca']:<12} {c['serial']:<34} {state(c)} {c['profile']:<12} {c['subject']}"
            for c in certs]


def revoke(c: AdminClient, ca: str, serial: bytes, reason: str, invalidity: str | None = None) -> dict[str, Any]:
    code = parse_reason(reason)
    inv = parse_invalidity(invalidity)
    return _wrap(c.call, S.ARevoke, ca=ca, serial=serial, reason=code, invalidity=inv)


def unrevoke(c: AdminClient, ca: str, serial: bytes) -> dict[str, Any]:
    """Release a certificate from certificateHold (any other revocation is permanent)."""
    return _wrap(c.call, S.AUnrevoke, ca=ca, serial=serial)


def crl_generate(c: AdminClient, ca: str, kind: str = "crl", delta: bool = False) -> bytes:
    """Sign a new CRL (a delta CRL with delta=True; kind="issued-serials": a new issued-serials list) and return its DER."""
    check_name(ca, "CA name")
    return _wrap(lambda: b"".join(c.stream(S.ACrlGenerate, ca=ca, kind=kind, delta=delta)))


def crl_export(c: AdminClient, ca: str, number: int | None = None, kind: str = "crl") -> bytes:
    check_name(ca, "CA name")
    if number is not None:
        check_range(number, 1, 2**62 - 1, "CRL number")
    return _wrap(lambda: b"".join(c.stream(S.ACrlExport, ca=ca, number=number, kind=kind)))


def crl_number(der: bytes) -> int:
    from cryptography import x509
    crl = x509.load_der_x509_crl(der)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def audit_export(c: AdminClient) -> bytes:
    return _wrap(lambda: b"".join(c.stream(S.AAuditExport)))


def audit_verify(data: bytes, cert_pem: bytes | None = None, anchor: bytes | None = None) -> str:
    """Check an exported log offline (chain, checkpoint signatures with the audit certificate, a
    published anchor against rollback); returns the summary line, raises OpError naming the break."""
    import json

    from policy import audit as A
    entries = []
    for i, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            raise OpError(f"line {i}: not JSON") from None
        if not isinstance(e, dict):
            raise OpError(f"line {i}: not a record")
        entries.append(e)
    try:
        crt = A.load_cert(cert_pem) if cert_pem else None
    except ValueError:
        raise OpError("the audit certificate is not a certificate") from None
    anc = None
    if anchor:
        try:
            anc = json.loads(anchor)
        except ValueError:
            raise OpError("the anchor is not a signed checkpoint (JSON)") from None
        if crt is None:
            raise OpError("--anchor needs --cert (the anchor is only worth its signature)")
    summary, problem = A.verify_export(entries, crt, anc)
    if problem:
        raise OpError(f"audit chain broken: {problem}")
    extra = ""
    if summary["checkpoints"]:
        extra = f", {summary['checkpoints']} checkpoints" + (" with valid signatures" if crt else " (signatures not checked: no --cert)")
    if "anchor_seq" in summary:
        extra += f", consistent with the anchor at seq {summary['anchor_seq']}"
    return f"audit chain intact: {summary['records']} records{extra}"


def audit_checkpoint(c: AdminClient) -> dict[str, Any]:
    return _wrap(c.call, S.AAuditCheckpoint)


def audit_cert(c: AdminClient) -> str:
    return _wrap(c.call, S.AAuditCert)["cert"]


def ceremony_record(c: AdminClient, ceremony: str, digest: bytes, ceremony_seq: int, witnesses: list[str],
                    operations: list[tuple[int, str]]) -> dict[str, Any]:
    """The transcript digest as an audit record bound to the ceremony's opening, witness and operation
    records, with a checkpoint of it signed by the HSM's audit key."""
    ops_ = [S.CeremonyOperation(seq=q, hash=bytes.fromhex(h)) for q, h in operations]
    return _wrap(c.call, S.ACeremonyRecord, ceremony=ceremony, transcript_sha256=digest, ceremony_seq=ceremony_seq,
                 witnesses=witnesses, operations=ops_)


def ceremony_begin(c: AdminClient, ceremony: str) -> dict[str, Any]:
    return _wrap(c.call, S.ACeremonyBegin, ceremony=ceremony)


def ceremony_witness(c: AdminClient, ceremony_seq: int) -> dict[str, Any]:
    return _wrap(c.call, S.ACeremonyWitness, ceremony_seq=ceremony_seq)


def ceremony_records(c: AdminClient, ceremony_seq: int) -> list[dict[str, Any]]:
    return _wrap(c.call, S.ACeremonyRecords, ceremony_seq=ceremony_seq)["records"]


# ---------------------------------------------------------------- officers and dual control


def activate_shares(c: AdminClient, shares: list[str]) -> dict[str, Any]:
    from policy import shamir
    from policy.errors import PolicyError
    for t in shares:
        try:
            shamir.parse_share(t)
        except PolicyError as e:
            raise OpError(e.message) from None
    return _wrap(c.call, S.AActivateShares, shares=shares)


def officer_list(c: AdminClient) -> list[dict[str, Any]]:
    return _wrap(c.call, S.AOfficerList)["officers"]


def officer_list_lines(docs: list[dict[str, Any]]) -> list[str]:
    return [f"{o['name']:<20} {','.join(o['roles']):<24} totp={'on ' if o['totp'] else 'off'} "
            f"failures={o['failures']}{'  LOCKED' if o['locked'] else ''}" for o in docs]


ROLE_NAMES = ("administrator", "operator", "auditor")


def officer_add(c: AdminClient, name: str, roles: tuple[str, ...], password: str) -> dict[str, Any]:
    check_name(name, "officer name")
    for r in roles:
        if r not in ROLE_NAMES:
            raise OpError(f"unknown role {r!r} (one of: {', '.join(ROLE_NAMES)})")
    return _wrap(c.call, S.AOfficerAdd, name=name, roles=tuple(roles), password=password)


def officer_remove(c: AdminClient, name: str) -> dict[str, Any]:
    return _wrap(c.call, S.AOfficerRemove, name=check_name(name, "officer name"))


def officer_passwd(c: AdminClient, name: str, password: str) -> dict[str, Any]:
    return _wrap(c.call, S.AOfficerPasswd, name=check_name(name, "officer name"), password=password)


def officer_unlock(c: AdminClient, name: str) -> dict[str, Any]:
    return _wrap(c.call, S.AOfficerUnlock, name=check_name(name, "officer name"))


def officer_unlock_shares(c: AdminClient, name: str, shares: list[str], password: str | None = None) -> dict[str, Any]:
    """Break-glass: unlock an officer (and set a new password) with a quorum of activation shares."""
    from policy import shamir
    from policy.errors import PolicyError
    for t in shares:
        try:
            shamir.parse_share(t)
        except PolicyError as e:
            raise OpError(e.message) from None
    return _wrap(c.call, S.AOfficerUnlockShares, name=check_name(name, "officer name"), shares=shares, password=password)


def pending_list(c: AdminClient, open_only: bool = True) -> list[dict[str, Any]]:
    return _wrap(c.call, S.APendingList, open_only=open_only)["pending"]


def pending_lines(docs: list[dict[str, Any]]) -> list[str]:
    return [f"#{p['id']:<5} {p['state']:<8} {p['operation']:<12} by {p['requester']:<12} "
            f"approvals {len(p['approvals'])}/{p['required']} ({', '.join(p['approvals'])}) "
            f"expires {datetime.fromtimestamp(p['expires'], timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}Z  {p['summary']}"
            for p in docs]


def approve(c: AdminClient, request: int) -> dict[str, Any]:
    """Approve a pending request; the M-th approval runs it (then `result` is its answer)."""
    try:
        return c.call(S.AApprove, request=request)
    except ClientError as e:
        raise OpError(str(e)) from None


def ocsp_status(c: AdminClient) -> dict[str, Any]:
    return _wrap(c.call, S.AOcspStatus)


def ocsp_status_lines(doc: dict[str, Any]) -> list[str]:
    ep = doc.get("endpoint")
    lines = [f"endpoint: {'connected' if doc['endpoint_connected'] else 'not connected'}"
             + (f"; requests {ep['requests']} good {ep['good']} revoked {ep['revoked']} unauthorized {ep['unauthorized']} "
                f"malformed {ep['malformed']} errors {ep['errors']} held {ep['responses_held']}" if ep else "")]
    tc = doc.get("tenant_crls")
    if tc and tc["tenants"]:
        lines.append(f"CRL-fed tenants: {tc['tenants']}; CRLs accepted {tc['accepted']} refused {tc['refused']} since start"
                     " (see `donjon ocsp tenant list`)")
    for c in doc["cas"]:
        nu = when(c["earliest_next_update"])
        lines.append(f"{c['ca']:<16} responses {c['responses']:<8} revoked {c['revoked']:<6} queued {c['queued']:<6} "
                     f"earliest nextUpdate {nu}{'  LAPSED' if c['lapsed'] else ''}")
    return lines


def when(t) -> str:
    """An epoch as ISO 8601 UTC (seconds), or '-': every face prints times this way."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"


def dist_status(c: AdminClient) -> dict[str, Any]:
    return _wrap(c.call, S.ADistStatus)


def dist_status_lines(doc: dict[str, Any]) -> list[str]:
    """Per destination: state, backlog, oldest pending job, parked jobs, last success, last error;
    then each CRL-fed tenant's CRL fetch."""
    lines = [f"agent: {'connected' if doc['agent'] else 'not connected'}"]
    for d in doc["destinations"]:
        age = f"{d['oldest_pending_age']}s" if d["oldest_pending_age"] is not None else "-"
        state = "FAILING" if d["failing"] else ("not configured" if not d["configured"] else "ok")
        lines.append(f"{d['rule']:<16} {state:<8} pending {d['pending']:<6} oldest {age:<8} parked {d['parked']:<5} "
                     f"last success {when(d['last_success'])}")
        if d["last_error"]:
            lines.append(f"{'':<16} last error {when(d['last_error_at'])}: {d['last_error']}"
                         + (f" (retry in {d['retry_in']}s)" if d["retry_in"] else ""))
    for t in doc.get("tenant_fetches", []):
        lines.append(f"tenant {t['tenant']:<9} CRL fetch: last {when(t['last_fetch'])} ({t['last_result'] or '-'})"
                     + (f"; last error {when(t['last_error_at'])}: {t['last_error']}" if t["last_error"] else "")
                     + (f" (retry in {t['retry_in']}s)" if t["retry_in"] else ""))
    return lines


def dist_list(c: AdminClient, state: str = "parked", rule: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    if state not in ("pending", "parked", "done"):
        raise OpError("the state is pending, parked or done")
    if rule is not None:
        check_name(rule, "destination name")
    check_range(limit, 1, 10000, "limit")
    return _wrap(c.call, S.ADistList, state=state, rule=rule, limit=limit)["jobs"]


def dist_list_lines(jobs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for j in jobs:
        what = j["serial"] or (f"#{j['number']}" if j["number"] else "")
        lines.append(f"{j['id']:<8} {j['rule']:<16} {j['action']:<15} {j['ca']}/{what:<20} attempts {j['attempts']:<3} "
                     f"{j['last_error'] or ''}")
    return lines


def dist_retry(c: AdminClient, rule: str | None = None, job: int | None = None) -> int:
    """Parked publications back in the queue; returns how many."""
    return _wrap(c.call, S.ADistRetry, rule=rule, job=job)["requeued"]


def backup_to(c: AdminClient, path: str) -> tuple[int, str]:
    """Write the appliance's online backup (tar: encrypted cmdb.sqlite, wrapped cmdb.key, manifest.json)
    to a new file, never over an existing one. Returns (bytes, sha256)."""
    import hashlib
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise OpError(f"{path} already exists: refusing to overwrite it") from None
    except OSError as e:
        raise OpError(f"cannot write {path}: {e.strerror}") from None
    h, n, ok = hashlib.sha256(), 0, False
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in c.stream(S.ABackup):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        ok = True
    except ClientError as e:
        raise OpError(str(e)) from None
    finally:
        if not ok:
            os.unlink(path)  # no partial backup left looking like a good one
    return n, h.hexdigest()


def shutdown(c: AdminClient) -> dict[str, Any]:
    """Ask the appliance to stop cleanly (the supervisor stops every role as on SIGTERM)."""
    return _wrap(c.call, S.AShutdown)


# ---------------------------------------------------------------- configuration (donjon.toml, edited in place)

# The settings an operator may change from any face; each validated by the full configuration loader
# before the file is replaced. They take effect at the next start of the appliance.
# SETTINGS (from appliance.config): the keys `config set` may change, re-exported for the faces.


def endpoint_url(listen: str) -> str:
    """The URL a client on this machine reaches the endpoint at, from `ocsp.listen` (a wildcard address
    is reached on loopback)."""
    host, _, port = listen.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"http://{host}:{port}"


def settings_show(home: str) -> list[tuple[str, str]]:
    from appliance import config as C
    try:
        cfg = C.load(home)
    except C.ConfigError as e:
        raise OpError(str(e)) from None
    out = []
    for key in SETTINGS:
        sect, field = key.split(".")
        v = getattr(getattr(cfg, sect), field.replace("-", "_"))
        out.append((key, str(v)))
    return out


def settings_set(c: AdminClient, key: str, value: str) -> str:
    """Change one setting through the admin socket: an administrator's session, permission-checked
    and audited by the Factory; the supervisor validates it again and writes HOME/donjon.toml."""
    from appliance import config as C
    try:
        C.setting_literal(key, value)  # the same check the supervisor makes: a clear error before any round trip
    except C.ConfigError as e:
        raise OpError(str(e)) from None
    return _wrap(c.call, S.AConfigSet, key=key, value=value)["message"]


# ---------------------------------------------------------------- key backup under custodian shares (issue 15)


def keys_backup_request(c: AdminClient, so_pin: str, threshold: int, shares: int) -> dict[str, Any]:
    """Ask for a key backup (dual control "keys-backup": may raise PendingApproval): its number and digest."""
    if not 2 <= threshold <= shares <= 16:
        raise OpError(f"need 2 <= threshold <= shares <= 16 (got {threshold} of {shares})")
    return _wrap(c.call, S.AKeysBackup, so_pin=so_pin, threshold=threshold, shares=shares)


def keys_backup(c: AdminClient, so_pin: str, threshold: int, shares: int) -> dict[str, Any]:
    """Ask for a key backup, then take it (blob and shares)."""
    return keys_backup_fetch(c, keys_backup_request(c, so_pin, threshold, shares)["backup"])


def keys_backup_fetch(c: AdminClient, backup: int) -> dict[str, Any]:
    return _wrap(c.call, S.AKeysBackupFetch, backup=backup)


def key_backup_blob(doc: dict[str, Any]) -> bytes:
    blob = doc["blob"]
    return base64.b64decode(blob) if isinstance(blob, str) else blob  # the JSON form of bytes is base64


def write_key_backup(doc: dict[str, Any], out_dir: str, with_blob: bool = True) -> tuple[str, list[str]]:
    """The blob to OUT/keys-backup-<sha>.json and share i to OUT/custodian-i/key-share-i.txt (one folder
    per custodian's medium) with a printable sheet key-share-i.pdf, each file new (O_EXCL) and fsynced,
    each share with its own SHA-256."""
    import hashlib

    from appliance.console.pdf import text_pdf
    digest = doc["manifest_sha256"]
    blob_path = os.path.join(out_dir, f"keys-backup-{digest[:16]}.json")
    files: list[tuple[str, bytes]] = [(blob_path, key_backup_blob(doc))] if with_blob else []
    n = len(doc["shares"])
    for i, text in enumerate(doc["shares"], 1):
        body = (f"Donjon CA key backup: custodian share {i} of {n} (any {doc['threshold']} recover the keys)\n"
                f"backup: keys-backup-{digest[:16]}.json sha256 {digest}\n"
                f"share: {text}\n"
                f"share-sha256: {hashlib.sha256(text.encode()).hexdigest()}\n")
        folder = os.path.join(out_dir, f"custodian-{i}")
        files.append((os.path.join(folder, f"key-share-{i}.txt"), body.encode()))
        sheet = body.splitlines() + ["", "Keep this sheet apart from the other shares and from the backup file.",
                                     "", "Custodian: ______________________   Date: ____________   Signature: ____________"]
        files.append((os.path.join(folder, f"key-share-{i}.pdf"), text_pdf(sheet, f"Donjon key share {i} of {n}")))
    for path, _ in files:
        if os.path.lexists(path):
            raise OpError(f"{path} already exists: refusing to overwrite it")
    # the text files are the shares (the PDF sheets, written beside them, are their printable form)
    written = []
    for path, data in files:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.endswith(".txt") or path == blob_path:
            written.append(path)
    return blob_path, written[1:] if with_blob else written


def read_share_file(path: str) -> str:
    """The share text of a custodian's file, checked against the SHA-256 written beside it."""
    import hashlib
    try:
        with open(path, "rb") as f:
            data = f.read(8192)
    except OSError as e:
        raise OpError(f"cannot read {path}: {e.strerror}") from None
    fields = dict(line.split(": ", 1) for line in data.decode("utf-8", "replace").splitlines() if ": " in line)
    text, check = fields.get("share", "").strip(), fields.get("share-sha256", "").strip()
    if not text or hashlib.sha256(text.encode()).hexdigest() != check:
        raise OpError(f"{path}: not a key share, or its SHA-256 does not match (altered or mistyped)")
    return text


# ---------------------------------------------------------------- two tiers (CA requests and installs, CRL calendars)

MAX_CERT_FILE = 256 * 1024  # a certificate or chain file (PEM or DER)
MAX_BUNDLE = 4 * 1024 * 1024  # a CRL calendar bundle (the schema's bound)
_PERIOD_UNITS = {"h": 3600, "d": 86400}


def certs_of(data: bytes, what: str, limit: int = 9) -> list[bytes]:
    """Every certificate of a PEM file (or the one of a DER file), as DER; one clear line if there is none."""
    if len(data) > MAX_CERT_FILE:
        raise OpError(f"{what}: larger than {MAX_CERT_FILE // 1024} KiB")
    if b"-----BEGIN" not in data:
        return [data]
    import base64
    import re
    ders = []
    for m in re.finditer(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----", data):
        try:
            ders.append(base64.b64decode(b"".join(m.group(1).split()), validate=True))
        except ValueError:
            raise OpError(f"{what}: a PEM certificate is not valid base64") from None
    if not ders:
        raise OpError(f"{what}: no PEM certificate in it")
    if len(ders) > limit:
        raise OpError(f"{what}: at most {limit} certificates")
    return ders


def parse_period(s: str, what: str) -> int:
    """'30d', '12h' (or seconds) as seconds."""
    unit = _PERIOD_UNITS.get(s[-1:], 1)
    num = s[:-1] if s[-1:] in _PERIOD_UNITS else s
    if not num.isdigit() or len(num) > 8:
        raise OpError(f"invalid {what} {s[:20]!r}: a number of days or hours, e.g. 30d or 12h")
    return int(num) * unit


def ca_request(c: AdminClient, name: str, subject: tuple, key_type: str, profile: str, path_length: int | None,
               allowed_profiles: tuple[str, ...], mode: str) -> dict[str, Any]:
    check_name(name, "CA name")
    check_name(profile, "profile name")
    check_key_type(key_type)
    for p in allowed_profiles:
        check_name(p, "profile")
    if path_length is not None:
        check_range(path_length, 0, 16, "path length")
    return _wrap(c.call, S.ACaRequest, name=name, profile=profile, key_type=key_type, subject=subject, path_length=path_length,
                 allowed_profiles=allowed_profiles, mode=mode)


def ca_install(c: AdminClient, name: str, cert: bytes, chain: list[bytes], anchor: bytes | None) -> dict[str, Any]:
    check_name(name, "CA name")
    return _wrap(c.call, S.ACaInstall, name=name, cert=cert, chain=chain, anchor=anchor)


def crl_presign(c: AdminClient, ca: str, periods: int, every: int, overlap: int) -> dict[str, Any]:
    check_name(ca, "CA name")
    check_range(periods, 1, 120, "periods")
    check_range(every, 3600, 366 * 86400, "period in seconds")
    check_range(overlap, 0, every, "overlap in seconds")
    return _wrap(c.call, S.ACrlPresign, ca=ca, periods=periods, every_seconds=every, overlap_seconds=overlap)


def crl_calendar_load(c: AdminClient, bundle: bytes) -> dict[str, Any]:
    if len(bundle) > MAX_BUNDLE:
        raise OpError(f"a CRL calendar bundle is at most {MAX_BUNDLE // (1024 * 1024)} MiB")
    return _wrap(c.call, S.ACrlCalendarLoad, bundle=bundle)


def crl_calendar_status(c: AdminClient) -> list[dict[str, Any]]:
    return _wrap(c.call, S.ACrlCalendarStatus)["calendars"]


def calendar_lines(cals: list[dict[str, Any]]) -> list[str]:
    import time as _t

    def at(t):
        return _t.strftime("%Y-%m-%d %H:%M", _t.gmtime(t)) if t else "-"
    out = []
    for d in cals:
        out.append(f"{d['ca']:<16} current #{d['current'] or '-'} until {at(d['current_next_update'])}  "
                   f"{d['remaining']} waiting, covered until {at(d['covered_until'])}")
        if d.get("warning"):
            out.append(f"  WARNING: {d['warning']}")
    return out


def parse_utc(s: str) -> int:
    """'YYYY-MM-DD HH:MM:SS' (UTC) as seconds since 1970."""
    import calendar
    import time as _t
    try:
        return calendar.timegm(_t.strptime(s, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        raise OpError(f"{s[:30]!r} is not a UTC time as YYYY-MM-DD HH:MM:SS") from None


def clock_set(c: AdminClient, epoch: int) -> str:
    from appliance.clock import check_epoch
    try:
        check_epoch(str(epoch))
    except ValueError as e:
        raise OpError(str(e)) from None
    return _wrap(c.call, S.AClockSet, time=epoch)["message"]


def officer_ssh_key(c: AdminClient, name: str, key: str | None) -> dict[str, Any]:
    """Enrol (or, key None, remove) an officer's SSH public key for the SSH console account."""
    check_name(name, "officer name")
    if key is not None:
        from policy.errors import PolicyError
        from policy.sshkey import check_key
        try:
            check_key(key)
        except PolicyError as e:
            raise OpError(str(e)) from None
    return _wrap(c.call, S.AOfficerSshKey, name=name, key=key.strip() if key is not None else None)


# ---------------------------------------------------------------- EST/SCEP enrolment secrets


def enrol_secret_create(c: AdminClient, protocol: str, ca: str, profile: str, ttl_seconds: int, uses: int,
                        ref: str | None, subject: str | None, approval: bool = False) -> dict[str, Any]:
    if protocol not in ("est", "scep"):
        raise OpError("protocol must be est or scep")
    check_name(ca, "CA name")
    check_name(profile, "profile name")
    if ref is not None:
        check_name(ref, "reference")
    return _wrap(c.call, S.AEnrolSecretCreate, protocol=protocol, ca=ca, profile=profile, ttl_seconds=ttl_seconds,
                 uses=uses, ref=ref, subject=subject, approval=approval)


def enrol_secret_list(c: AdminClient) -> list[dict[str, Any]]:
    return _wrap(c.call, S.AEnrolSecretList)["secrets"]


def enrol_secret_revoke(c: AdminClient, ref: str) -> dict[str, Any]:
    return _wrap(c.call, S.AEnrolSecretRevoke, ref=check_name(ref, "reference"))


def enrol_waiting(c: AdminClient) -> list[dict[str, Any]]:
    return _wrap(c.call, S.AEnrolWaiting)["requests"]


def enrol_decide(c: AdminClient, request: str, approve: bool, reason: str) -> dict[str, Any]:
    if not request or len(request) > 64:
        raise OpError("request: the id `donjon enrol-secret waiting` shows")
    return _wrap(c.call, S.AEnrolDecide, request=request, approve=approve, reason=reason[:500])["requests"][0]

def acme_eab_add(c: AdminClient, profiles: list[str] | None = None, names: list[str] | None = None) -> dict:
    """A new ACME EAB key: {"eab": {...}, "hmac_key": base64url} (the key is shown this once)."""
    return _wrap(c.call, S.AAcmeEabAdd, profiles=tuple(profiles or ()), name_patterns=tuple(names or ()))


def acme_eab_list(c: AdminClient) -> list[dict]:
    return _wrap(c.call, S.AAcmeEabList)["keys"]


def acme_eab_revoke(c: AdminClient, kid: str) -> dict:
    return _wrap(c.call, S.AAcmeEabRevoke, kid=kid)["eab"]


# ---------------------------------------------------------------- the KGS: cards, PIN letters, key recovery


def kgs_personalise(c: AdminClient, profile: str, batch: str, data: bytes) -> dict[str, Any]:
    """Start (or finish) a batch; the KGS works on while kgs_cards reports its progress."""
    from policy.cards import MAX_BATCH_BYTES, parse_batch
    from policy.errors import PolicyError
    check_name(profile, "card profile")
    check_name(batch, "batch")
    if len(data) > MAX_BATCH_BYTES:
        raise OpError(f"the batch file is larger than {MAX_BATCH_BYTES} bytes")
    try:
        parse_batch(data)  # the KGS checks it again: this only names the error before anything is sent
    except PolicyError as e:
        raise OpError(str(e)) from None
    return _wrap(c.call, S.AKgsPersonalise, profile=profile, batch=batch, data=data)


def kgs_cards(c: AdminClient, batch: str | None = None) -> dict[str, Any]:
    return _wrap(c.call, S.AKgsCards, batch=batch)


def kgs_cards_lines(cards: list[dict[str, Any]]) -> list[str]:
    return [f"#{x['card']:<5} {x['batch']:<12} {x['subject_id']:<12} {x['label']:<20} {x['state']:<7} letter {x['letter']:<12} "
            f"{' '.join(x['certs'])}" + (f"  error: {x['error']}" if x.get("error") else "") for x in cards]


def kgs_letters(c: AdminClient, batch: str, limit: int = 100000) -> list[tuple[int, bytes]]:
    """Every letter waiting in the spool for the batch (the KGS hands them over a few MiB at a time)."""
    import base64
    out: list[tuple[int, bytes]] = []
    while len(out) < limit:
        doc = _wrap(c.call, S.AKgsLetters, batch=batch)
        if not doc["letters"]:
            break
        out += [(card, base64.b64decode(pdf)) for card, pdf in doc["letters"]]
    return out


def kgs_letter_status(c: AdminClient, card: int, status: str) -> dict[str, Any]:
    return _wrap(c.call, S.AKgsLetterStatus, card=card, status=status)


def kgs_reprint(c: AdminClient, card: int) -> dict[str, Any]:
    return _wrap(c.call, S.AKgsReprint, card=card)


def kgs_recover(c: AdminClient, card: int, reason: str) -> dict[str, Any]:
    return _wrap(c.call, S.AKgsRecover, card=card, reason=reason)


def kgs_recover_take(c: AdminClient, recovery: int) -> tuple[bytes, str]:
    import base64
    doc = _wrap(c.call, S.AKgsRecoverTake, recovery=recovery)
    return base64.b64decode(doc["p12"]), doc["password"]

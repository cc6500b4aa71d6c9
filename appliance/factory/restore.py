"""After `donjon restore`: reconcile the restored CMDB with what the appliance had already published.

`donjon restore` (appliance/restore.py, the appliance stopped) swaps the CMDB for the backup's and
leaves `restore.json` beside it: the backup's manifest, the anchor it was checked against, and the
evidence read from the endpoint's store (each CA's latest CRL and every pre-signed OCSP response it
served). At the next activation, before anything else runs, this module verifies every piece of
evidence with the CA's own public key (a forged file proves nothing), then in one transaction:
re-enters revocations the CMDB lost (audited as recovered), reserves every serial known issued,
resumes CRL numbers above the highest published, supersedes queued publications of lower numbers,
and records the restore and the audit gap. The marker is retired only after that commit: a crash
redoes it (idempotent). The caller then signs a fresh CRL for every CA that needs one.
"""

from __future__ import annotations

import os
import time

import msgspec
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp

from appliance.ipc import schema as S
from policy import crl as crlenc
from policy import serials as serials_list

from .cis_link import CisLink, CisRefused
from .cmdb import CmdbError, serial_bytes
from .errors import FactoryError, _log
from .store import Store, officers_of_file

MARKER = "restore.json"
_REASONS = {f: code for code, f in {  # ReasonFlags -> RFC 5280 reason code
    1: x509.ReasonFlags.key_compromise, 2: x509.ReasonFlags.ca_compromise, 3: x509.ReasonFlags.affiliation_changed,
    4: x509.ReasonFlags.superseded, 5: x509.ReasonFlags.cessation_of_operation, 6: x509.ReasonFlags.certificate_hold,
    9: x509.ReasonFlags.privilege_withdrawn, 10: x509.ReasonFlags.aa_compromise}.items()}


class Evidence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    crl: bytes | None = None  # the endpoint's latest CRL of this CA
    responses: list[bytes] = []  # every pre-signed OCSP response it held
    crls: list[bytes] = []  # the CRLs the Distribution's HTTP and LDAP destinations held
    lists: list[bytes] = []  # the issued-serials lists its HTTP destinations held


class Marker(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    backup_sha256: str
    backup_created: int
    backup_audit_seq: int
    anchor_seq: int | None
    older_confirmed: bool
    restored_at: int
    evidence: dict[str, Evidence]
    endpoint_seq: int = 0  # the highest publication seq the endpoint's stores held
    unread: list[str] = []  # destinations whose held CRL could not be read
    officers: list[str] = []  # the two (or more) administrators of the backup who authorised the restore


CHECK_COPY = "restore-check.sqlite"  # the backup's database, put beside the CMDB by `donjon restore` for the check


async def check_officers(cis: CisLink, home: str, cipher: str, m: S.CheckRestoreOfficers) -> list[str]:
    """Dual control of `donjon restore`: every officer named is an administrator of the backup being
    restored (its own officers table: the people who will run the restored CA), unlocked, with the right
    password (and TOTP code when it has one), and they are at least two distinct people. Raises
    FactoryError with one line naming what failed; reads the backup's copy only, writes nothing."""
    from .officers import check_password, dummy_check, totp_match
    names = [o.name for o in m.officers]
    if len(set(names)) < 2:
        raise FactoryError("policy", "restore refused (dual control): two distinct officers are needed")
    try:
        reply = await cis.request(S.Activate(id=cis.new_id(), pin=m.pin, wrapped_db_key=m.wrapped_db_key))
    except CisRefused as e:
        raise FactoryError("auth", f"the backup's CMDB key: {e.reason}") from None
    try:
        rows = await trio.to_thread.run_sync(officers_of_file, os.path.join(home, CHECK_COPY), reply.db_key, cipher, names)
    except CmdbError as e:
        raise FactoryError("internal", str(e)) from None
    bad: list[str] = []
    for o in m.officers:
        row = rows.get(o.name)
        if row is None:  # the same KDF time as a known name
            await trio.to_thread.run_sync(dummy_check, o.password)
            bad.append(f"{o.name}: no such officer in the backup")
            continue
        roles, pwhash, totp, locked = row
        ok = await trio.to_thread.run_sync(check_password, pwhash, o.password)
        if not ok or (totp is not None and totp_match(totp, o.code, time.time(), 0) is None):
            bad.append(f"{o.name}: wrong password or code")
        elif locked:
            bad.append(f"{o.name}: locked")
        elif "administrator" not in roles.split(","):
            bad.append(f"{o.name}: not an administrator")
    if bad:
        why = "restore refused (dual control): " + "; ".join(bad)
        _note_refusal(home, names, why)
        raise FactoryError("auth", why)
    return names


REFUSALS = "restore-refused.jsonl"  # refused restores, recorded in the audit chain at the next activation
_REFUSALS_MAX = 64 * 1024


def _note_refusal(home: str, names: list[str], why: str) -> None:
    """The CMDB is closed (the appliance is stopped): keep the refusal beside it, bounded, for the audit chain."""
    path = os.path.join(home, REFUSALS)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        _log(f"restore refusal not kept for the audit ({e.strerror}): {why}")
        return
    with os.fdopen(fd, "ab") as f:
        if f.tell() < _REFUSALS_MAX:  # a flood of refusals keeps the first ones, never fills the disk
            f.write(msgspec.json.encode({"ts": int(time.time()), "officers": names[:4], "why": why[:1000]}) + b"\n")
            f.flush()
            os.fsync(f.fileno())


def record_refusals(store: Store, home: str) -> int:
    """On the DB thread at activation: the restores refused while the appliance was stopped become audit
    records (actor: the officers named), then the file goes. Their number."""
    path = os.path.join(home, REFUSALS)
    try:
        with open(path, "rb") as f:
            data = f.read(_REFUSALS_MAX + 4096)
    except FileNotFoundError:
        return 0
    recs = []
    for line in data.splitlines():
        try:
            r = msgspec.json.decode(line)
            recs.append((int(r["ts"]), "+".join(str(n)[:64] for n in r["officers"][:4]), str(r["why"])[:1000]))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            recs.append((int(time.time()), "unknown", "a restore refusal record was unreadable"))
    db = store.require_active()
    with db.tx():
        for ts, who, why in recs:
            db.audit(f"restore:{who}", "restore", "cmdb", "refused", why, ts=ts)
    os.unlink(path)
    return len(recs)


def _verify(pub, sig: bytes, data: bytes, halg) -> bool:
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, data, padding.PKCS1v15(), halg)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, data, ec.ECDSA(halg))
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(sig, data)
        else:
            return False
    except Exception:  # noqa: BLE001 - InvalidSignature or an unusable key: not our CA's signature
        return False
    return True


def published(cert_der: bytes, ev: Evidence) -> tuple[int, dict[int, tuple[int, int | None]], set[int], int]:
    """What this CA verifiably published: (highest CRL number, revoked serial -> (time, reason),
    serials known issued, pieces refused because not signed by this CA)."""
    cert = x509.load_der_x509_certificate(cert_der)
    pub = cert.public_key()
    revoked: dict[int, tuple[int, int | None]] = {}
    issued: set[int] = set()
    number, refused = 0, 0
    for der in ([ev.crl] if ev.crl else []) + list(ev.crls):
        try:
            c = x509.load_der_x509_crl(der)
            if c.issuer != cert.subject or not c.is_signature_valid(pub):  # type: ignore[arg-type]
                raise ValueError("not this CA's")
            number = max(number, c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
            for r in c:
                try:
                    reason = _REASONS.get(r.extensions.get_extension_for_class(x509.CRLReason).value.reason)
                except x509.ExtensionNotFound:
                    reason = None
                revoked.setdefault(r.serial_number, (int(r.revocation_date_utc.timestamp()), reason))
                issued.add(r.serial_number)
        except Exception:  # noqa: BLE001 - a damaged or foreign CRL is no evidence
            refused += 1
    for der in ev.responses:
        try:
            resp = ocsp.load_der_ocsp_response(der)
            if not _verify(pub, resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm):
                raise ValueError("not this CA's")
            if resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN:
                continue
            serial = resp.serial_number
            issued.add(serial)
            if resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                rr = resp.revocation_reason
                reason = _REASONS.get(rr) if rr is not None else None
                revoked.setdefault(serial, (int(resp.revocation_time_utc.timestamp()), reason))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - idem
            refused += 1
    return number, revoked, issued, refused


def published_lists(cert_der: bytes, lists: list[bytes]) -> tuple[int, set[int], int]:
    """What this CA verifiably published as issued-serials lists: (highest list number, serials named,
    lists refused because not signed by this CA)."""
    cert = x509.load_der_x509_certificate(cert_der)
    pub = cert.public_key()
    number, refused = 0, 0
    issued: set[int] = set()
    for der in lists:
        try:
            lst = serials_list.decode(der)
            if lst.issuer_der != cert.subject.public_bytes() or \
                    not _verify(pub, lst.signature, lst.tbs, serials_list.hash_for(lst.signature_oid)):
                raise ValueError("not this CA's")
            number = max(number, lst.number)
            issued |= lst.serials
        except Exception:  # noqa: BLE001 - a damaged or foreign list is no evidence
            refused += 1
    return number, issued, refused


def pending(home: str) -> bool:
    return os.path.exists(os.path.join(home, MARKER))


def reconcile(store: Store, home: str, actor: str) -> list[str]:
    """On the DB thread, right after the CMDB opens: apply the marker's evidence; the CAs whose next
    CRL must be signed now. No marker: nothing to do."""
    path = os.path.join(home, MARKER)
    try:
        with open(path, "rb") as f:
            m = msgspec.msgpack.decode(f.read(), type=Marker)
    except FileNotFoundError:
        return []
    db = store.require_active()
    now = int(time.time())
    need_crl: list[str] = []
    lines: list[str] = []
    with db.tx():
        for ca, cert_der, crl_number in list(db.db.execute("SELECT name, cert, crl_number FROM cas ORDER BY name")):
            ev = m.evidence.get(ca)
            if ev is None:
                continue
            number, revoked, issued, refused = published(cert_der, ev)
            list_number, listed, list_refused = published_lists(cert_der, ev.lists)
            issued |= listed
            refused += list_refused
            if refused:
                db.audit(actor, "restore", ca, "refused", f"{refused} published object(s) not signed by {ca}: ignored")
            re_entered, reserved, answered = 0, 0, 0
            ca_end = int(x509.load_der_x509_certificate(cert_der).not_valid_after_utc.timestamp())
            for serial in sorted(issued):
                sb = serial_bytes(serial)
                known = db.db.execute("SELECT 1 FROM certs WHERE ca=? AND serial=?", (ca, sb)).fetchone()
                if not known and not db.db.execute("SELECT 1 FROM recovered_certs WHERE ca=? AND serial=?", (ca, sb)).fetchone():
                    # Its body is not in the evidence; its serial and status are: fresh responses keep saying
                    # good or revoked for it (never "unknown"), re-signed like any other (migration 17).
                    db.db.execute("INSERT INTO recovered_certs VALUES (?,?,?,?)", (ca, sb, ca_end, now))
                    db.db.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, sb))
                    answered += 1
                    db.audit(actor, "recovered", f"{ca}/{serial:x}", "ok", "certificate published but unknown to the restored "
                             "CMDB: re-entered by serial (its status answered by fresh OCSP responses until the CA expires)")
                state = db.db.execute("SELECT state FROM serials WHERE serial=?", (sb,)).fetchone()
                if state is None:
                    db.db.execute("INSERT INTO serials(serial, ca, state, reserved) VALUES (?,?,'issued',?)", (sb, ca, now))
                    reserved += 1
                    db.audit(actor, "recovered", f"{ca}/{serial:x}", "ok", "serial published but unknown to the restored CMDB: "
                             "reserved as issued (never reused)")
                elif state[0] != "issued":
                    db.db.execute("UPDATE serials SET state='issued' WHERE serial=?", (sb,))
                    reserved += 1
                    db.audit(actor, "recovered", f"{ca}/{serial:x}", "ok", f"serial published while the CMDB said {state[0]}: issued")
                if serial not in revoked:
                    continue
                at, reason = revoked[serial]
                if known:
                    if db.db.execute("SELECT 1 FROM revocations WHERE ca=? AND serial=?", (ca, sb)).fetchone():
                        continue
                    db.db.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)",
                                  (ca, sb, at, reason, None, crlenc.entry_length(serial, at, reason, None)))
                    db.db.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (ca, sb))
                else:
                    if db.db.execute("SELECT 1 FROM recovered_revocations WHERE ca=? AND serial=?", (ca, sb)).fetchone():
                        continue
                    db.db.execute("INSERT INTO recovered_revocations VALUES (?,?,?,?,?,?,?)",
                                  (ca, sb, at, reason, None, crlenc.entry_length(serial, at, reason, None), now))
                re_entered += 1
                db.audit(actor, "recovered", f"{ca}/{serial:x}", "ok",
                         f"revocation published at {at} (reason={reason}) but missing from the restored CMDB: re-entered")
            superseded = 0
            if number > crl_number:
                db.db.execute("UPDATE cas SET crl_number=? WHERE name=?", (number, ca))
                # a queued publication of a lower number would push a destination back: never sent
                db.db.execute("UPDATE dist_jobs SET state='superseded' WHERE ca=? AND action='crl' AND number<=? "
                              "AND state IN ('pending','parked')", (ca, number))
                superseded = db.db.changes()
            held_list = db.db.execute("SELECT list_number FROM cas WHERE name=?", (ca,)).fetchone()[0]
            if list_number > held_list:  # the same for the issued-serials list's numbers
                db.db.execute("UPDATE cas SET list_number=? WHERE name=?", (list_number, ca))
                db.db.execute("UPDATE dist_jobs SET state='superseded' WHERE ca=? AND action='issued-serials' AND number<=? "
                              "AND state IN ('pending','parked')", (ca, list_number))
                superseded += db.db.changes()
            if number > crl_number or re_entered:
                need_crl.append(ca)
            lines.append(f"{ca}: CRL numbers resume above {max(number, crl_number)} (restored CMDB had {crl_number}), "
                         f"issued-serials lists above {max(list_number, held_list)} (had {held_list}), "
                         f"{re_entered} revocation(s) re-entered, {reserved} serial(s) reserved, {answered} certificate(s) re-entered by serial, "
                         f"{superseded} publication(s) superseded")
        if m.endpoint_seq:
            # The endpoint resumes after the highest seq it holds: every response of the restored CMDB
            # moves above it (resent once; the endpoint keeps whichever response is newer).
            db.db.execute("UPDATE ocsp SET seq = -seq")
            db.db.execute("UPDATE ocsp SET seq = ? - seq", (m.endpoint_seq,))
        head = db.db.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0
        gap = (f"audit records {m.backup_audit_seq + 1}..{m.anchor_seq} of the published anchor are lost"
               if m.anchor_seq is not None and m.anchor_seq > m.backup_audit_seq else "no published anchor beyond the backup")
        db.audit(actor, "restore", "cmdb", "ok",
                 f"backup sha256={m.backup_sha256} created={m.backup_created} audit_seq={m.backup_audit_seq} "
                 f"(chain resumes at {head + 1}); {gap}{'; older backup confirmed by a quorum' if m.older_confirmed else ''}; "
                 + "; ".join(lines) + (f"; authorised by {' and '.join(m.officers)} (dual control)" if m.officers else "")
                 + ("; destinations not read: " + ", ".join(m.unread) if m.unread else ""))
    os.replace(path, os.path.join(home, f"restore-done-{now}.json"))  # after the commit: a crash before it redoes the above
    _log("restore reconciled: " + "; ".join(lines))
    return need_crl


"""`donjon restore FILE`, the appliance stopped: checks, evidence of what was published, an atomic CMDB swap.

The CMDB folder is replaced in one step, renameat2(RENAME_EXCHANGE) of `cmdb.restoring` (the backup's
database and key, and restore.json: the evidence the Factory reconciles with at the next activation,
appliance/factory/restore.py) with `cmdb`: a kill -9 at any moment leaves either the old folder or the
restored one, never a mix. The old folder is kept beside it as `cmdb.pre-restore-<time>`.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any

import msgspec
from cryptography import x509

from appliance import backupfile
from appliance.ocsp.store import Store as EndpointStore
from appliance.ocsp.store import StoreError
from policy import audit as audit_policy
from policy import shamir
from policy.errors import PolicyError

_RENAME_EXCHANGE = 2
_STORE_DIR = re.compile(r"^ocsp(\.[0-9]+)?$")


class RestoreError(Exception):
    """A restore refused or failed before the swap: nothing was changed."""


class _Evidence(msgspec.Struct, frozen=True):
    crl: bytes | None = None
    responses: list[bytes] = []
    crls: list[bytes] = []  # read back from the Distribution's HTTP and LDAP destinations
    lists: list[bytes] = []  # the issued-serials lists its HTTP destinations hold


class _Marker(msgspec.Struct, frozen=True):
    format: str
    backup_sha256: str
    backup_created: int
    backup_audit_seq: int
    anchor_seq: int | None
    older_confirmed: bool
    restored_at: int
    evidence: dict[str, _Evidence]
    endpoint_seq: int = 0
    unread: list[str] = []  # destinations whose held CRL could not be read
    officers: list[str] = []  # who authorised the restore (dual control)


CHECK_COPY = "restore-check.sqlite"  # appliance/factory/restore.py reads it there (the Factory's folder)


def check_officers(home: str, backup: str, officers: list[tuple[str, str, str]], pin: str) -> list[str]:
    """Dual control with the appliance stopped: a one-job run of the roles in which the Factory unwraps the
    backup's CMDB key through the CIS and checks each officer (name, password, TOTP code) against the
    backup's own officers table (appliance/factory/restore.py check_officers). Their names, or RestoreError."""
    import trio

    from appliance import config as C
    from appliance import safefs
    from appliance.ipc import schema as S
    from appliance.supervisor import Supervisor, SupervisorError
    if len({n for n, _, _ in officers}) < 2:
        raise RestoreError("restore refused (dual control): two distinct officers of the backup authorise it "
                           "(--officer NAME twice, each with their password)")
    cfg = C.load(home)
    cmdb = os.path.join(home, "cmdb")
    os.makedirs(cmdb, mode=0o700, exist_ok=True)
    with backupfile._open(backup) as tar:
        kf = tar.extractfile("cmdb.key")
        wrapped = kf.read(4097) if kf is not None else b""
        if not wrapped or len(wrapped) > 4096:
            raise RestoreError(f"{backup}: its cmdb.key is not a wrapped CMDB key")
        src = tar.extractfile("cmdb.sqlite")
        assert src is not None
        # The copy goes where the Factory may read it; the folder is the Factory's: no link followed.
        dfd = safefs.open_root(cmdb)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CHECK_COPY, dir_fd=dfd)  # left by a check killed earlier
            fd = safefs.open_beneath(dfd, CHECK_COPY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                while chunk := src.read(backupfile.CHUNK):
                    f.write(chunk)
        finally:
            os.close(dfd)
    msg = S.CheckRestoreOfficers(pin=pin, wrapped_db_key=wrapped,
                                 officers=[S.RestoreOfficer(name=n, password=p, code=c) for n, p, c in officers])
    try:
        sup = Supervisor(home, cfg)
        rc = trio.run(lambda: sup.run(restore_check=msg))
    except (C.ConfigError, SupervisorError) as e:
        raise RestoreError(f"restore refused: the officers could not be checked: {e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cmdb, CHECK_COPY))
    if rc != 0:
        raise RestoreError(sup.failed or "restore refused: the officers could not be checked")
    return [n for n, _, _ in officers]


def appliance_running(home: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.path.join(home, "run", "admin.sock"))
        return True
    except OSError:
        return False
    finally:
        s.close()


def anchor_seq(path: str) -> int:
    """The seq of a published signed head (donjon audit checkpoint --out)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(65536))
        return audit_policy.parse_checkpoint_tbs(base64.b64decode(doc["tbs"]))[0]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RestoreError(f"{path}: not a published audit anchor ({type(e).__name__})") from None


@contextlib.contextmanager
def _as_endpoint_user():
    """Root reads the endpoint's stores as the endpoint's own user: a link it planted there reaches
    nothing root alone may read (ARCHITECTURE.md §1: root never follows a link in a role's folder)."""
    import pwd
    try:
        pw = pwd.getpwnam("donjon-ocsp")
    except KeyError:
        pw = None
    if os.geteuid() != 0 or pw is None:  # developer mode: the stores are this user's own
        yield
        return
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def collect_evidence(home: str) -> tuple[dict[str, _Evidence], int, list[str], dict[str, bytes]]:
    """Every CA's latest CRL and every pre-signed response the endpoint's stores hold, their highest seq,
    a note per store that could not be read (it is named in the restore's audit record), and each CA's
    certificate (to find its entry at the LDAP destinations)."""
    found: dict[str, tuple[tuple[int, bytes] | None, dict[int, bytes]]] = {}
    certs: dict[str, bytes] = {}
    top = 0
    notes: list[str] = []
    for entry in sorted(os.listdir(home)):  # HOME's own entries are root's
        path = os.path.join(home, entry)
        if not _STORE_DIR.match(entry) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            with _as_endpoint_user():
                top = max(top, _read_store(path, found, certs))
        except (OSError, StoreError, ValueError) as e:
            notes.append(f"endpoint store {entry}: {type(e).__name__}")
    return ({n: _Evidence(crl=c[1] if c else None, responses=list(r.values())) for n, (c, r) in found.items()}, top, notes,
            certs)


def _read_store(path: str, found: dict[str, tuple[tuple[int, bytes] | None, dict[int, bytes]]],
                certs: dict[str, bytes] | None = None) -> int:
    """One endpoint store into `found` (CA -> latest CRL, serial -> response) and `certs`; its highest seq."""
    st = EndpointStore.open(path)
    try:
        for name, ca in st.cas.items():
            if certs is not None and ca.cert:
                certs.setdefault(name, bytes(ca.cert))
            crl, responses = found.setdefault(name, (None, {}))
            if ca.crl is not None and (crl is None or ca.crl_number > crl[0]):
                crl = (ca.crl_number, ca.crl)
            for alg in ("sha256", "sha1"):
                for serial in list(ca.index[alg]):
                    held = st.get(ca, alg, serial)
                    if held is not None and serial not in responses:
                        responses[serial] = bytes(held.der)
            found[name] = (crl, responses)
        return st.max_seq()
    finally:
        st.close()


MAX_FETCH = 64 << 20  # a CRL read back from a destination (the endpoint caps its own CRLs alike)


def fetch_destinations(home: str, cas: list[str], kind: str = "crl") -> tuple[dict[str, list[bytes]], list[str]]:
    """What each HTTP destination holds for each CA (as the agent names it: {ca}.crl, or {ca}.serials for
    kind "issued-serials"), and a note per destination that could not be read."""
    import http.client
    from urllib.parse import urlsplit

    from appliance import config as C
    from appliance.distribution.publish import auth_headers, object_url
    try:
        cfg = C.load(home)
        rules = C.dist_rules(home, cfg, with_secrets=True)
    except C.ConfigError as e:
        return {}, [f"configuration: {e}"]
    got: dict[str, list[bytes]] = {}
    notes: list[str] = []
    suffix = ".crl" if kind == "crl" else ".serials"
    for r in rules:
        if not r.url.startswith(("http://", "https://")) or kind not in r.publish:
            continue
        for ca in cas:
            if r.cas and ca not in r.cas:
                continue
            u = urlsplit(object_url(r, ca, f"{ca}{suffix}"))  # where the agent puts it, with its credentials
            headers = {"User-Agent": "donjon-restore", **auth_headers(r)}
            conn: http.client.HTTPConnection
            if u.scheme == "https":
                import ssl
                ctx = ssl.create_default_context(cadata=r.ca_file_pem.decode() if r.ca_file_pem else None)
                conn = http.client.HTTPSConnection(u.hostname or "", u.port or 443, timeout=r.timeout, context=ctx)
            else:
                conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=r.timeout)
            try:
                conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""), headers=headers)
                resp = conn.getresponse()
                body = resp.read(MAX_FETCH + 1)
                if resp.status == 200 and len(body) <= MAX_FETCH:
                    got.setdefault(ca, []).append(body)
                elif resp.status != 404:
                    notes.append(f"{r.name}: {ca}{suffix}: HTTP {resp.status}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                notes.append(f"{r.name}: {ca}{suffix}: {type(e).__name__}")
            finally:
                conn.close()
    return got, notes


def fetch_ldap(home: str, certs: dict[str, bytes]) -> tuple[dict[str, list[bytes]], list[str]]:
    """The CRL each LDAP destination holds in each CA's entry (certificateRevocationList;binary at the rule's
    ca-dn, rendered from the CA certificate as the agent renders it), and a note per destination that could
    not be read. Read with the agent's own publisher code: the same DN, bind and TLS settings."""
    from appliance import config as C
    from appliance.distribution.publish import Job, LdapPublisher, PublishError
    from appliance.factory.dist import subject_fields
    try:
        cfg = C.load(home)
        rules = C.dist_rules(home, cfg, with_secrets=True)
    except C.ConfigError as e:
        return {}, [f"configuration: {e}"]
    got: dict[str, list[bytes]] = {}
    notes: list[str] = []
    attr = "certificateRevocationList;binary"
    for r in rules:
        if not r.url.startswith(("ldap://", "ldaps://")) or "crl" not in r.publish or not r.ca_dn:
            continue
        p = LdapPublisher(r)
        try:
            for ca, der in sorted(certs.items()):
                if r.cas and ca not in r.cas:
                    continue
                try:
                    fields = dict(subject_fields(x509.load_der_x509_certificate(der)))
                    dn = p._dn(Job(action="crl", ca=ca, ca_root=False, issuer=der, subject=fields, number=0, data=b""))
                    conn = p.conn or p._connect()
                    if not conn.search(dn, "(objectClass=*)", search_scope="BASE", attributes=[attr]):
                        if (conn.result or {}).get("result") != 32:  # 32: no such entry, nothing held
                            notes.append(f"{r.name}: {ca}: LDAP {(conn.result or {}).get('description', 'error')}")
                        continue
                    for e in conn.response or []:
                        for v in ((e.get("raw_attributes") or {}).get(attr) or [])[:4]:
                            if len(v) <= MAX_FETCH:
                                got.setdefault(ca, []).append(bytes(v))
                except PublishError as e:
                    notes.append(f"{r.name}: {ca}: {e}")
                except Exception as e:  # noqa: BLE001 - ldap3 raises IndexError, socket errors, its own types
                    notes.append(f"{r.name}: {ca}: {type(e).__name__}")
        finally:
            p.close()
    return got, notes


def _exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), _RENAME_EXCHANGE) != 0:  # AT_FDCWD
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


KEEP = ("activation-failures.json", "restore-refused.jsonl")  # both go into the restored CMDB's audit chain


def carry_over(cmdb: str, staging: str) -> list[str]:
    """Copy the CMDB folder's pending audit notes into the restored one. The folder is the Factory's: a link
    or anything but a small plain file there is refused (named), never followed by root. What was copied."""
    from appliance import safefs
    done: list[str] = []
    if not os.path.isdir(cmdb):
        return done
    dfd = safefs.open_root(cmdb)
    try:
        for name in KEEP:
            try:
                data = safefs.read_file(dfd, name, 128 * 1024)
            except (safefs.UnsafePath, OSError) as e:
                print(f"donjon restore: {name} not carried over: {e}", file=sys.stderr)
                continue
            if data is not None:
                fd = os.open(os.path.join(staging, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                done.append(name)
    finally:
        os.close(dfd)
    return done


def restore(home: str, backup: str, anchor: str | None, max_age_days: int, confirm_shares: list[str],
            officers: list[tuple[str, str, str]], pin: str | None) -> dict[str, Any]:
    """Check (the backup, its age, two of its administrators), collect, swap. Returns what was done (for the CLI)."""
    home = os.path.abspath(home)
    if appliance_running(home):
        raise RestoreError("the appliance is running: stop it first (donjon shutdown), then restore")
    try:
        manifest = backupfile.verify(backup)
    except backupfile.BackupFileError as e:
        raise RestoreError(str(e)) from None
    created = int(manifest.get("created", 0))
    seq = int(manifest["cmdb.sqlite"].get("audit_seq", 0))
    why_older = []
    if time.time() - created > max_age_days * 86400:
        why_older.append(f"it is {int((time.time() - created) / 86400)} days old (limit {max_age_days})")
    a_seq = anchor_seq(anchor) if anchor else None
    if a_seq is not None and a_seq > seq:
        why_older.append(f"it ends at audit record {seq}, before the published anchor's {a_seq}")
    if why_older and not confirm_shares:
        raise RestoreError("restore refused: the backup is older than allowed (" + "; ".join(why_older) +
                           "): a quorum of officers confirms it with --confirm-share (their activation PIN shares)")
    if why_older:
        try:
            pin = shamir.combine_pin(confirm_shares)
        except PolicyError as e:
            raise RestoreError(f"restore refused: the confirming shares: {e.message}") from None
        pin_file = os.path.join(home, "pin")
        if os.path.exists(pin_file):
            with open(pin_file) as f:
                if f.read().strip() != pin:
                    raise RestoreError("restore refused: the confirming shares do not give this appliance's PIN")
    if pin is None and confirm_shares:
        try:
            pin = shamir.combine_pin(confirm_shares)
        except PolicyError as e:
            raise RestoreError(f"restore refused: the confirming shares: {e.message}") from None
    if pin is None:
        raise RestoreError("restore refused: the token PIN is needed to check the officers (--pin-file, or the PIN file)")
    names = check_officers(home, backup, officers, pin)
    evidence, top, unread, certs = collect_evidence(home)
    fetched, notes = fetch_destinations(home, sorted(evidence))
    lists, list_notes = fetch_destinations(home, sorted(evidence), "issued-serials")
    in_ldap, ldap_notes = fetch_ldap(home, certs)
    notes = unread + notes + list_notes + ldap_notes
    evidence = {n: msgspec.structs.replace(e, crls=fetched.get(n, []) + in_ldap.get(n, []), lists=lists.get(n, []))
                for n, e in evidence.items()}
    cmdb = os.path.join(home, "cmdb")
    staging = os.path.join(home, "cmdb.restoring")
    now = int(time.time())
    tag = f"{now}-{time.time_ns() % 10**9:09d}"  # two restores in one second keep both old folders
    if os.path.lexists(staging):  # a restore killed earlier: the old CMDB or a partial copy, kept aside
        os.rename(staging, os.path.join(home, f"cmdb.pre-restore-{tag}-partial"))
    os.mkdir(staging, 0o700)
    carry_over(cmdb, staging)
    backupfile.install_cmdb(backup, staging)
    with open(backup, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    marker = _Marker(format="donjon-restore/1", backup_sha256=digest, backup_created=created, backup_audit_seq=seq,
                     anchor_seq=a_seq, older_confirmed=bool(why_older), restored_at=now, evidence=evidence, endpoint_seq=top,
                     unread=notes, officers=names)
    fd = os.open(os.path.join(staging, "restore.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.msgpack.encode(marker))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(staging)
    if os.path.isdir(cmdb):
        _exchange(staging, cmdb)  # the one step: old or new, never a mix
        _fsync_dir(home)
        os.rename(staging, os.path.join(home, f"cmdb.pre-restore-{tag}"))
    else:
        os.rename(staging, cmdb)
    _fsync_dir(home)
    return {"backup": backup, "sha256": digest, "audit_seq": seq, "anchor_seq": a_seq, "older_confirmed": bool(why_older),
            "evidence": {n: {"crl": e.crl is not None, "responses": len(e.responses), "destination_crls": len(e.crls),
                             "destination_lists": len(e.lists)}
                         for n, e in evidence.items()},
            "unread_destinations": notes, "officers": names,
            "kept": f"cmdb.pre-restore-{tag}"}


PROMOTE_MARKER = "promote.json"  # in HOME/cmdb while a promote is committed but not finished


def _crash_point(step: str) -> None:
    """Where a promote may be cut short (kill -9, power loss): tests make it stop here."""


def promote_pending(home: str) -> bool:
    """A promote was committed (its marker written) but not finished: the appliance must not start on the
    half-switched folder; `donjon standby promote` again finishes it."""
    return os.path.exists(os.path.join(home, "cmdb", PROMOTE_MARKER))


def _write_marker(cmdb: str, doc: dict[str, Any]) -> None:
    tmp = os.path.join(cmdb, PROMOTE_MARKER + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(cmdb, PROMOTE_MARKER))
    _fsync_dir(cmdb)


def _copy_durably(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def promote_standby(home: str) -> dict[str, Any]:
    """Put the standby CMDB (HOME/cmdb/standby, appliance/factory/standby.py) in place of the primary's,
    the appliance stopped; the primary's files are kept in cmdb/pre-promote-<time>/.

    Atomic by roll-forward: the standby's files are first copied into cmdb/promoting/ and fsynced (a crash
    there leaves the old state, and the next promote discards the partial copy); then the marker
    promote.json is written durably (the commit point); then the old files go aside and the staged ones
    in, each step recorded in the marker. A crash after the commit point leaves the marker: the appliance
    refuses to start on it and `donjon standby promote` again finishes the same promote, never redoes it."""
    home = os.path.abspath(home)
    if appliance_running(home):
        raise RestoreError("the appliance is running: stop it first, then promote the standby")
    cmdb = os.path.join(home, "cmdb")
    if promote_pending(home):
        return _finish_promote(home, cmdb)
    sb = os.path.join(cmdb, "standby")
    src = os.path.join(sb, "cmdb.sqlite")
    if not os.path.isfile(src):
        raise RestoreError(f"no standby CMDB at {src}")
    if os.path.exists(os.path.join(sb, "STALE")):
        raise RestoreError("the standby missed a commit (STALE): it is not a complete copy; restore a backup instead")
    staging = os.path.join(cmdb, "promoting")
    if os.path.lexists(staging):  # a promote killed before its commit point: its partial copy goes
        shutil.rmtree(staging)
    os.mkdir(staging, 0o700)
    for suffix in ("", "-wal"):
        if os.path.exists(src + suffix):
            _crash_point(f"copy{suffix}")
            _copy_durably(src + suffix, os.path.join(staging, "cmdb.sqlite" + suffix))
    if not os.path.exists(os.path.join(cmdb, "cmdb.key")):  # the primary disk lost its key too: the standby kept a copy
        _copy_durably(os.path.join(sb, "cmdb.key"), os.path.join(staging, "cmdb.key"))
    _fsync_dir(staging)
    _crash_point("staged")
    tag = f"{int(time.time())}-{time.time_ns() % 10**9:09d}"
    _write_marker(cmdb, {"tag": tag, "phase": "aside", "promoted": src})  # the commit point
    return _finish_promote(home, cmdb)


def _finish_promote(home: str, cmdb: str) -> dict[str, Any]:
    """The steps after the commit point; each is idempotent, so a promote cut anywhere here is finished by
    running this again."""
    try:
        with open(os.path.join(cmdb, PROMOTE_MARKER)) as f:
            doc = json.load(f)
        tag, phase = str(doc["tag"]), doc["phase"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RestoreError(f"{cmdb}/{PROMOTE_MARKER}: unreadable ({type(e).__name__}); nothing more was changed") from None
    if not re.fullmatch(r"[0-9]+-[0-9]{9}", tag) or phase not in ("aside", "in"):
        raise RestoreError(f"{cmdb}/{PROMOTE_MARKER}: not a promote marker; nothing more was changed")
    aside = os.path.join(cmdb, f"pre-promote-{tag}")
    staging = os.path.join(cmdb, "promoting")
    if phase == "aside":
        os.makedirs(aside, mode=0o700, exist_ok=True)
        for name in ("cmdb.sqlite-shm", "cmdb.sqlite-wal", "cmdb.sqlite"):
            if os.path.exists(os.path.join(cmdb, name)):
                _crash_point(f"aside {name}")
                os.rename(os.path.join(cmdb, name), os.path.join(aside, name))
        _fsync_dir(aside)
        _fsync_dir(cmdb)
        _crash_point("aside done")
        _write_marker(cmdb, {**doc, "phase": "in"})
    for name in ("cmdb.key", "cmdb.sqlite-wal", "cmdb.sqlite"):  # the database last
        if os.path.exists(os.path.join(staging, name)):
            _crash_point(f"in {name}")
            os.rename(os.path.join(staging, name), os.path.join(cmdb, name))
    _fsync_dir(cmdb)
    _crash_point("in done")
    os.unlink(os.path.join(cmdb, PROMOTE_MARKER))
    if os.path.isdir(staging):
        os.rmdir(staging)
    _fsync_dir(cmdb)
    return {"promoted": doc.get("promoted", ""), "kept": os.path.relpath(aside, home)}

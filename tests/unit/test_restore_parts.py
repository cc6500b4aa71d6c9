"""The parts of a restore that read untrusted files: a backup tar (appliance/backupfile.py), a published
anchor (appliance/restore.py), and the published evidence the Factory verifies (factory/restore.py)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import backupfile
from appliance import restore as R
from appliance.factory import restore as FR


def _tar(path: Path, members: dict[str, bytes], manifest: dict | None = None, extra: list[tarfile.TarInfo] = ()) -> Path:
    if manifest is None:
        manifest = {"format": "donjon-backup/1", "created": 1,
                    "cmdb.sqlite": {"bytes": len(members["cmdb.sqlite"]), "sha256": hashlib.sha256(members["cmdb.sqlite"]).hexdigest(),
                                    "audit_seq": 3},
                    "cmdb.key": {"bytes": len(members["cmdb.key"]), "sha256": hashlib.sha256(members["cmdb.key"]).hexdigest()}}
    with tarfile.open(path, "w") as t:
        for name, data in [*members.items(), ("manifest.json", json.dumps(manifest).encode())]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        for ti in extra:
            t.addfile(ti)
    return path


GOOD = {"cmdb.sqlite": b"\x01" * 3000, "cmdb.key": b"\x02" * 61}


def test_backup_file_checks(tmp_path):
    good = _tar(tmp_path / "good.tar", GOOD)
    assert backupfile.verify(str(good))["cmdb.sqlite"]["audit_seq"] == 3
    with tarfile.open(good) as t:
        good_manifest = json.loads(t.extractfile("manifest.json").read())
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    cases = {
        "sha": (_tar(tmp_path / "sha.tar", {**GOOD, "cmdb.key": b"\x03" * 61},
                     manifest=good_manifest), "does not match its SHA-256"),
        "missing": (_tar(tmp_path / "missing.tar", {"cmdb.sqlite": GOOD["cmdb.sqlite"]}, manifest={}), "not a Donjon backup"),
        "extra": (_tar(tmp_path / "extra.tar", GOOD, extra=[link]), "not a Donjon backup"),
        "format": (_tar(tmp_path / "format.tar", GOOD, manifest={"format": "other"}), "unknown backup format"),
        "size": (_tar(tmp_path / "size.tar", GOOD, manifest={"format": "donjon-backup/1", "cmdb.sqlite": {"bytes": 1},
                                                             "cmdb.key": {"bytes": 61}}), "not the size"),
    }
    for path, why in cases.values():
        with pytest.raises(backupfile.BackupFileError, match=why):
            backupfile.verify(str(path))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(backupfile.BackupFileError, match="not a Donjon backup"):
        backupfile.verify(str(tmp_path / "junk.tar"))
    # install_cmdb never overwrites a CMDB
    d = tmp_path / "cmdb"
    backupfile.install_cmdb(str(good), str(d))
    assert (d / "cmdb.sqlite").read_bytes() == GOOD["cmdb.sqlite"]
    with pytest.raises(backupfile.BackupFileError, match="refusing to overwrite"):
        backupfile.install_cmdb(str(good), str(d))


def test_backup_file_fuzz(tmp_path):
    """Bounded mutation fuzz: a damaged backup is a BackupFileError, never another exception."""
    base = _tar(tmp_path / "base.tar", GOOD).read_bytes()
    rnd = random.Random(15)
    p = tmp_path / "m.tar"
    accepted = 0
    for _ in range(400):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(b))
            if rnd.random() < 0.8:
                b[i] = rnd.randrange(256)
            else:
                del b[i:i + rnd.randint(1, 600)]
        p.write_bytes(bytes(b))
        try:
            backupfile.verify(str(p))
            accepted += 1
        except backupfile.BackupFileError:
            pass
    assert accepted < 400  # the checks do refuse damage (a flip in tar padding is harmless, and accepted)


def test_anchor_parsing(tmp_path):
    import base64

    from policy import audit
    good = tmp_path / "head.json"
    good.write_text(json.dumps({"tbs": base64.b64encode(audit.checkpoint_tbs(42, b"\0" * 32, 5)).decode()}))
    assert R.anchor_seq(str(good)) == 42
    for i, junk in enumerate(['{"tbs": "!!"}', "[]", "not json", '{"tbs": "' + base64.b64encode(b"seq: 9").decode() + '"}']):
        p = tmp_path / f"bad{i}.json"
        p.write_text(junk)
        with pytest.raises(R.RestoreError, match="not a published audit anchor"):
            R.anchor_seq(str(p))


def _ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    n = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return key, cert


def _crl(key, cert, number: int, revoked: dict[int, x509.ReasonFlags]) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding
    now = datetime.now(timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject).last_update(now)
         .next_update(now + timedelta(days=1)).add_extension(x509.CRLNumber(number), critical=False))
    for serial, reason in revoked.items():
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                                      .add_extension(x509.CRLReason(reason), critical=False).build())
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_published_evidence_counts_only_what_the_ca_signed():
    from cryptography.hazmat.primitives.serialization import Encoding
    key, cert = _ca("CA")
    other_key, _ = _ca("CA")  # same name, another key: a forger
    der = cert.public_bytes(Encoding.DER)
    number, revoked, issued, refused = FR.published(der, FR.Evidence(crl=_crl(key, cert, 7, {0x1234: x509.ReasonFlags.key_compromise})))
    assert (number, set(revoked), issued, refused) == (7, {0x1234}, {0x1234}, 0) and revoked[0x1234][1] == 1
    number, revoked, issued, refused = FR.published(der, FR.Evidence(crl=_crl(other_key, cert, 99, {0x9: x509.ReasonFlags.superseded})))
    assert (number, revoked, issued, refused) == (0, {}, set(), 1)  # a forged CRL #99 moves nothing
    number, revoked, issued, refused = FR.published(der, FR.Evidence(crl=b"\x30\x03junk", responses=[b"", b"\x30\x00", b"x" * 100]))
    assert (number, revoked, issued, refused) == (0, {}, set(), 4)


def test_crls_read_back_from_an_http_destination(tmp_path):
    """The restore reads the CRL each HTTP destination holds (a real HTTP server: tests/servers.py)."""
    from appliance import config as C
    from tests.servers import Receiver
    web = Receiver(tmp_path / "web")
    try:
        (tmp_path / "web" / "pub_issuing.crl").write_bytes(b"held CRL bytes")
        home = tmp_path / "home"
        home.mkdir()
        (home / "donjon.toml").write_text(C.DEFAULT_TOML + f"""
[[distribution.rule]]
name = "web"
url = "{web.url}/pub/{{name}}"
publish = ["crl"]
cas = ["issuing"]
""")
        got, notes = R.fetch_destinations(str(home), ["issuing", "root"])
        assert got == {"issuing": [b"held CRL bytes"]} and notes == []  # root is not this destination's
        web.stop()
        got, notes = R.fetch_destinations(str(home), ["issuing"])
        assert got == {} and len(notes) == 1 and notes[0].startswith("web: issuing.crl: ")  # unreachable: said so
    finally:
        web.stop()


def test_an_old_backup_needs_a_quorum(tmp_path):
    """Refused before anything is read or written: the home is left exactly as it was."""
    import os
    old = _tar(tmp_path / "old.tar", GOOD)  # made in 1970
    home = tmp_path / "home"
    (home / "cmdb").mkdir(parents=True)
    (home / "cmdb" / "cmdb.sqlite").write_bytes(b"current")
    with pytest.raises(R.RestoreError, match=r"days old \(limit 7\).*quorum"):
        R.restore(str(home), str(old), None, 7, [], [], None)
    from policy import shamir
    with pytest.raises(R.RestoreError, match="the confirming shares: the shares come from different sets"):
        R.restore(str(home), str(old), None, 7, shamir.split_pin("1234-pin", 2, 3, os.urandom)[:1] +
                  shamir.split_pin("other-pin", 2, 3, os.urandom)[1:2], [], None)
    assert sorted(p.name for p in home.rglob("*")) == ["cmdb", "cmdb.sqlite"]
    assert (home / "cmdb" / "cmdb.sqlite").read_bytes() == b"current"


def test_evidence_is_read_as_the_endpoint_user(tmp_path):
    """A link the endpoint planted in its store (here: to a root-only file) reaches nothing: root reads
    the store as donjon-ocsp, the store is named unreadable, and the secret is in no evidence."""
    import os

    from appliance import privdrop
    from appliance.roletable import ROLES
    assert os.geteuid() == 0, "the suite runs as root (CI); this checks root's reading of a role's folder"
    privdrop.ensure_role_users(ROLES)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * 8 + b"root-only secret")
    os.chmod(secret, 0o600)
    home = tmp_path / "home"
    (home / "ocsp" / "evil").mkdir(parents=True)
    os.chmod(tmp_path, 0o711)
    os.chmod(home, 0o711)
    (home / "ocsp" / "evil" / "crl.bin").symlink_to(secret)
    import pwd
    pw = pwd.getpwnam("donjon-ocsp")
    for d in (home / "ocsp", home / "ocsp" / "evil"):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    evidence, top, notes, _ = R.collect_evidence(str(home))
    assert notes == ["endpoint store ocsp: PermissionError"] and evidence == {} and top == 0
    assert os.geteuid() == 0 and os.getegid() == 0  # root again afterwards


def test_crls_read_back_from_an_ldap_destination(tmp_path):
    """The restore reads the CRL an LDAP destination holds in the CA's entry (a real slapd: tests/servers.py),
    at the DN the agent renders from the CA certificate; only the CA's own signature makes it evidence."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from appliance import config as C
    from tests.servers import ADMIN_DN, ADMIN_PW, BASE, Slapd
    import gc
    import warnings
    with warnings.catch_warnings():  # ldap3's import trips pyasn1's deprecation warning (the agent imports it alike)
        warnings.simplefilter("ignore", DeprecationWarning)
        import ldap3  # noqa: F401
    key, cert = _ca("Restore Test CA")
    forger, _ = _ca("Restore Test CA")
    d = Slapd(tmp_path / "slapd")
    d.start()
    try:
        subprocess.run(["ldapadd", "-x", "-H", d.url, "-D", ADMIN_DN, "-w", ADMIN_PW], text=True, check=True, capture_output=True,
                       input=f"dn: ou=CAs,{BASE}\nobjectClass: organizationalUnit\nou: CAs\n")
        d.put_binary(f"cn=Restore Test CA,ou=CAs,{BASE}", "certificateRevocationList;binary", _crl(key, cert, 9, {0x77: x509.ReasonFlags.key_compromise}))
        d.put_binary(f"cn=Other,ou=CAs,{BASE}", "certificateRevocationList;binary", _crl(forger, cert, 50, {}))
        (tmp_path / "ldap.secret").write_text(ADMIN_PW + "\n")
        home = tmp_path / "home"
        home.mkdir()
        (home / "donjon.toml").write_text(C.DEFAULT_TOML + f"""
[[distribution.rule]]
name = "directory"
url = "{d.url}"
bind-dn = "{ADMIN_DN}"
secret-file = "{tmp_path / 'ldap.secret'}"
publish = ["crl"]
ca-dn = "cn={{CN}},ou=CAs,{BASE}"
timeout = 2.0
""")
        der = cert.public_bytes(Encoding.DER)
        got, notes = R.fetch_ldap(str(home), {"issuing": der})
        assert notes == [] and len(got["issuing"]) == 1
        number, revoked, issued, refused = FR.published(der, FR.Evidence(crls=got["issuing"]))
        assert (number, set(revoked), refused) == (9, {0x77}, 0)  # #9 held in the directory: numbers resume above it
        _, other = _ca("Other")  # its entry holds a CRL signed by someone else: no evidence
        got, _ = R.fetch_ldap(str(home), {"other": other.public_bytes(Encoding.DER)})
        assert FR.published(other.public_bytes(Encoding.DER), FR.Evidence(crls=got["other"]))[0] == 0
        _, nobody = _ca("Nobody")  # no entry: nothing held, nothing to say
        assert R.fetch_ldap(str(home), {"x": nobody.public_bytes(Encoding.DER)}) == ({}, [])
        assert FR.published_lists(der, [b"", b"\x30\x03abc", b"x" * 64]) == (0, set(), 3)  # damaged lists prove nothing
        d.stop()
        with warnings.catch_warnings():  # ldap3 leaves the socket of a refused connection to the collector
            warnings.simplefilter("ignore", ResourceWarning)
            got, notes = R.fetch_ldap(str(home), {"issuing": der})
            gc.collect()
        assert got == {} and len(notes) == 1 and notes[0].startswith("directory: issuing: ")  # unreachable: said so
    finally:
        d.stop()


class _Cut(BaseException):
    """The promote stops here, as a kill -9 would: no cleanup runs (promote_standby has no finally)."""


def _promote_home(tmp_path: Path, lost: bool = False) -> Path:
    home = tmp_path / "home"
    (home / "cmdb" / "standby").mkdir(parents=True)
    if not lost:
        for name, data in (("cmdb.sqlite", b"OLD"), ("cmdb.sqlite-wal", b"OLDWAL"), ("cmdb.sqlite-shm", b"OLDSHM"), ("cmdb.key", b"KEY")):
            (home / "cmdb" / name).write_bytes(data)
    for name, data in (("cmdb.sqlite", b"SB"), ("cmdb.sqlite-wal", b"SBWAL"), ("cmdb.key", b"KEY")):
        (home / "cmdb" / "standby" / name).write_bytes(data)
    return home


def _promoted(home: Path) -> None:
    c = home / "cmdb"
    assert (c / "cmdb.sqlite").read_bytes() == b"SB" and (c / "cmdb.sqlite-wal").read_bytes() == b"SBWAL"
    assert not (c / "cmdb.sqlite-shm").exists() and (c / "cmdb.key").read_bytes() == b"KEY"
    assert not (c / R.PROMOTE_MARKER).exists() and not (c / "promoting").exists() and not R.promote_pending(str(home))


def test_standby_promote_cut_at_every_step(tmp_path, monkeypatch):
    """Cut at each step of a promote: either the old primary is intact (and the next promote starts over), or
    the marker is there (the appliance refuses to start) and the next promote finishes it; never a mix."""
    steps: list[str] = []
    monkeypatch.setattr(R, "_crash_point", steps.append)
    home = _promote_home(tmp_path / "all")
    doc = R.promote_standby(str(home))
    _promoted(home)
    aside = home / doc["kept"]
    assert doc["kept"].startswith("cmdb/pre-promote-") and {p.name: p.read_bytes() for p in aside.iterdir()} == {
        "cmdb.sqlite": b"OLD", "cmdb.sqlite-wal": b"OLDWAL", "cmdb.sqlite-shm": b"OLDSHM"}
    assert len(steps) >= 8, steps
    for i, step in enumerate(steps):
        home = _promote_home(tmp_path / f"cut{i}")

        def cut(name: str, at: str = step) -> None:
            if name == at:
                raise _Cut(name)
        monkeypatch.setattr(R, "_crash_point", cut)
        with pytest.raises(_Cut):
            R.promote_standby(str(home))
        monkeypatch.setattr(R, "_crash_point", lambda name: None)
        c = home / "cmdb"
        if not R.promote_pending(str(home)):  # before the commit point: the old primary, untouched
            assert [(c / n).read_bytes() for n in ("cmdb.sqlite", "cmdb.sqlite-wal", "cmdb.sqlite-shm")] == [b"OLD", b"OLDWAL", b"OLDSHM"], step
        R.promote_standby(str(home))  # starts over, or finishes the committed one
        _promoted(home)
        kept = [p for p in c.iterdir() if p.name.startswith("pre-promote-")]
        assert len(kept) == 1 and (kept[0] / "cmdb.sqlite").read_bytes() == b"OLD", step  # one promote, never two
    # The primary disk lost with its key: the standby's copy of the wrapped key comes along.
    home = _promote_home(tmp_path / "lost", lost=True)
    R.promote_standby(str(home))
    _promoted(home)
    # A damaged marker: refused in one line, nothing more touched.
    home = _promote_home(tmp_path / "bad")
    (home / "cmdb" / R.PROMOTE_MARKER).write_text('{"tag": "../../x", "phase": "aside"}')
    with pytest.raises(R.RestoreError, match="not a promote marker"):
        R.promote_standby(str(home))
    assert (home / "cmdb" / "cmdb.sqlite").read_bytes() == b"OLD"


def test_the_appliance_refuses_a_half_promoted_cmdb(tmp_path):
    """The supervisor, on a folder with an unfinished promote: a one-line refusal before any role starts, no
    CMDB opened or created."""
    from appliance import config as C
    from appliance.supervisor import Supervisor, SupervisorError
    home = _promote_home(tmp_path)
    (home / "donjon.toml").write_text(C.DEFAULT_TOML)
    (home / "cmdb" / R.PROMOTE_MARKER).write_text('{"tag": "1-000000000", "phase": "in"}')
    (home / "cmdb" / "cmdb.sqlite").unlink()
    with pytest.raises(SupervisorError, match=r"a standby promote was interrupted: run `donjon standby promote` again"):
        Supervisor(str(home), C.load(str(home))).prepare()
    assert not (home / "cmdb" / "cmdb.sqlite").exists() and not (home / "run").exists()


def test_published_lists_and_promote_marker_fuzz(tmp_path):
    """The issued-serials lists read back from destinations and the promote marker are untrusted input:
    random and mutated bytes give a counted refusal or a one-line RestoreError, never anything else."""
    from cryptography.hazmat.primitives.serialization import Encoding
    key, cert = _ca("CA")
    der = cert.public_bytes(Encoding.DER)
    rnd = random.Random(15)
    seed = _crl(key, cert, 3, {5: x509.ReasonFlags.superseded})  # DER of the right shape, not a list
    inputs = [rnd.randbytes(rnd.randrange(0, 300)) for _ in range(150)]
    for _ in range(150):
        b = bytearray(seed)
        for _ in range(rnd.randrange(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        inputs.append(bytes(b))
    assert FR.published_lists(der, inputs) == (0, set(), len(inputs))
    home = _promote_home(tmp_path)
    marker = home / "cmdb" / R.PROMOTE_MARKER
    for i in range(200):
        marker.write_bytes(rnd.randbytes(rnd.randrange(0, 80)) if i % 2 else
                           json.dumps({"tag": rnd.choice(["1-000000000", "../x", 7, None]),
                                       "phase": rnd.choice(["aside", "in", "?", 1])}).encode())
        try:
            R.promote_standby(str(home))
        except R.RestoreError as e:
            assert "\n" not in str(e)
        home = _promote_home(tmp_path / f"f{i}")  # a marker that did pass finished a promote: a fresh home
        marker = home / "cmdb" / R.PROMOTE_MARKER


def test_carry_over_never_follows_a_link_in_the_factorys_folder(tmp_path):
    """A compromised Factory plants activation-failures.json -> a root-only file: root's restore refuses it
    (named on stderr) and copies only the plain notes into the restored folder."""
    cmdb, staging = tmp_path / "cmdb", tmp_path / "staging"
    cmdb.mkdir()
    staging.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root-only secret")
    (cmdb / "activation-failures.json").symlink_to(secret)
    (cmdb / "restore-refused.jsonl").write_bytes(b'{"ts": 1, "officers": ["a"], "why": "x"}\n')
    assert R.carry_over(str(cmdb), str(staging)) == ["restore-refused.jsonl"]
    assert sorted(p.name for p in staging.iterdir()) == ["restore-refused.jsonl"]
    assert all(b"root-only" not in p.read_bytes() for p in staging.iterdir())
    (cmdb / "restore-refused.jsonl").unlink()
    (cmdb / "restore-refused.jsonl").write_bytes(b"x" * (200 * 1024))  # oversize: refused, not copied
    assert R.carry_over(str(cmdb), str(tmp_path / "new")) == [] if (tmp_path / "new").mkdir() is None else False

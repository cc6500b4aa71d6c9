"""Online backup of the encrypted CMDB (console and CLI share it), and a restore from it."""

from __future__ import annotations

import hashlib
import json
import tarfile

from tests.conftest import make_csr


def _issue(a, tmp_path, name: str) -> str:
    csr = make_csr(tmp_path, name, san=f"DNS:{name}.example.org")
    doc = json.loads(a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--json").stdout)
    return doc[0]["serial"]


def test_backup_and_restore(appliance, tmp_path):
    a = appliance
    kept = _issue(a, tmp_path, "kept")
    out = tmp_path / "backup.tar"
    r = a.cli("backup", "--out", str(out))
    assert b"sha256" in r.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() in r.stdout.decode()
    r = a.cli("backup", "--out", str(out), check=False)
    assert r.returncode == 1 and b"refusing to overwrite" in r.stderr
    lost = _issue(a, tmp_path, "lost")
    audit = [json.loads(ln) for ln in a.cli("audit", "export").stdout.splitlines()]
    assert audit[-2]["action"] == "backup" and audit[-2]["outcome"] == "ok"

    with tarfile.open(out) as tar:
        assert tar.getnames() == ["cmdb.sqlite", "cmdb.key", "manifest.json"]
        files = {n: tar.extractfile(n).read() for n in tar.getnames()}
    manifest = json.loads(files["manifest.json"])
    for n in ("cmdb.sqlite", "cmdb.key"):
        assert hashlib.sha256(files[n]).hexdigest() == manifest[n]["sha256"]
    assert files["cmdb.key"] == (a.home / "cmdb" / "cmdb.key").read_bytes()
    assert b"SQLite format 3" not in files["cmdb.sqlite"][:16]  # still encrypted
    assert b"kept.example.org" not in files["cmdb.sqlite"]

    # Restore: stop, put the copy back, start and activate with the same token.
    assert a.stop() == 0
    cmdb = a.home / "cmdb"
    for suffix in ("-wal", "-shm"):
        (cmdb / f"cmdb.sqlite{suffix}").unlink(missing_ok=True)
    (cmdb / "cmdb.sqlite").write_bytes(files["cmdb.sqlite"])
    a.start()
    serials = {c["serial"] for c in json.loads(a.cli("cert", "list", "--json").stdout)}
    assert kept in serials and lost not in serials
    assert b"audit chain intact" in a.cli("audit", "verify").stdout

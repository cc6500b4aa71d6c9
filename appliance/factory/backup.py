"""Online backup of the CMDB: the encrypted database file and its HSM-wrapped key, consistent, as one tar."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time

from .service import Factory, FactoryError

CHUNK = 1 << 20


def _snapshot(f: Factory, out) -> dict:
    """In the database thread, so no write can land between the checkpoint and the copy: fold the
    WAL into the main file, then copy the main file's (still encrypted) pages as they are."""
    db = f._require_active()
    busy, log, done = db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy or log != done:
        raise FactoryError("busy", "a reader holds an old snapshot (a CRL is being made?): try the backup again")
    h = hashlib.sha256()
    n = 0
    with open(os.path.join(f.home, "cmdb.sqlite"), "rb") as src:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
    seq, head = db.db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone() or (0, b"")
    return {"bytes": n, "sha256": h.hexdigest(), "audit_seq": seq, "audit_head": head.hex()}


async def backup_tar(f: Factory, actor: str):
    """Yield the backup (a tar: cmdb.sqlite, cmdb.key, manifest.json) in chunks; audited."""
    import trio
    with open(os.path.join(f.home, "cmdb.key"), "rb") as k:
        wrapped = k.read()
    with tempfile.TemporaryFile(dir=f.home) as dbcopy, tempfile.TemporaryFile(dir=f.home) as tarf:
        info = await f.run_db(_snapshot, f, dbcopy)
        manifest = {"format": "donjon-backup/1", "created": int(time.time()), "cmdb.sqlite": info,
                    "cmdb.key": {"bytes": len(wrapped), "sha256": hashlib.sha256(wrapped).hexdigest()},
                    "restore": "stop the appliance, put both files in HOME/cmdb (remove cmdb.sqlite-wal/-shm), "
                               "start and activate with the same HSM token"}

        def build():
            dbcopy.seek(0)
            with tarfile.open(fileobj=tarf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, size, fobj in (("cmdb.sqlite", info["bytes"], dbcopy), ("cmdb.key", len(wrapped), io.BytesIO(wrapped)),
                                         ("manifest.json", None, None)):
                    if fobj is None:
                        data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
                        size, fobj = len(data), io.BytesIO(data)
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mode, ti.mtime = size, 0o600, manifest["created"]
                    tar.addfile(ti, fobj)
            tarf.seek(0)
        await trio.to_thread.run_sync(build)
        await f.audit(actor, "backup", "cmdb", "ok",
                      f"sha256={info['sha256']} bytes={info['bytes']} audit_seq={info['audit_seq']}")
        while chunk := await trio.to_thread.run_sync(tarf.read, CHUNK):
            yield chunk

"""Online backup of the CMDB: the encrypted database file and its HSM-wrapped key, consistent, as one tar."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time

from .store import Store

CHUNK = 1 << 20


async def backup_tar(store: Store, home: str, actor: str):
    """Yield the backup (a tar: cmdb.sqlite, cmdb.key, manifest.json) in chunks; audited."""
    import trio
    with open(os.path.join(home, "cmdb.key"), "rb") as k:
        wrapped = k.read()
    with tempfile.TemporaryFile(dir=home) as dbcopy, tempfile.TemporaryFile(dir=home) as tarf:
        n, sha, seq, head = await store.run(store.copy_consistent, os.path.join(home, "cmdb.sqlite"), dbcopy, CHUNK)
        info = {"bytes": n, "sha256": sha, "audit_seq": seq, "audit_head": head.hex()}
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
        await store.audit(actor, "backup", "cmdb", "ok",
                      f"sha256={info['sha256']} bytes={info['bytes']} audit_seq={info['audit_seq']}")
        while chunk := await trio.to_thread.run_sync(tarf.read, CHUNK):
            yield chunk

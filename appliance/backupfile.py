"""A `donjon backup` file read back: its manifest and members checked, and the CMDB put into a home."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Any

MEMBERS = ("cmdb.sqlite", "cmdb.key", "manifest.json")
MANIFEST_MAX = 64 * 1024
CHUNK = 1 << 20


class BackupFileError(Exception):
    """The backup file is unreadable, incomplete or altered: the message says which."""


def _open(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as e:
        raise BackupFileError(f"{path}: not a Donjon backup ({e.__class__.__name__})") from None


def verify(path: str) -> dict[str, Any]:
    """The manifest, once every member is there exactly once, a regular file, of the size and SHA-256 it names."""
    with _open(path) as tar:
        try:
            infos = tar.getmembers()
        except tarfile.TarError:
            raise BackupFileError(f"{path}: the tar is truncated or corrupt") from None
        names = [i.name for i in infos]
        if sorted(names) != sorted(MEMBERS) or not all(i.isreg() for i in infos):
            raise BackupFileError(f"{path}: not a Donjon backup (members {', '.join(names[:5])})")
        by = {i.name: i for i in infos}
        if by["manifest.json"].size > MANIFEST_MAX:
            raise BackupFileError(f"{path}: the manifest is too large")
        try:
            manifest = json.loads(tar.extractfile(by["manifest.json"]).read())  # type: ignore[union-attr]
        except (ValueError, tarfile.TarError):
            raise BackupFileError(f"{path}: the manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "donjon-backup/1":
            raise BackupFileError(f"{path}: unknown backup format")
        for name in ("cmdb.sqlite", "cmdb.key"):
            want = manifest.get(name)
            if not isinstance(want, dict) or by[name].size != want.get("bytes"):
                raise BackupFileError(f"{path}: {name} is not the size its manifest names")
            h = hashlib.sha256()
            f = tar.extractfile(by[name])
            assert f is not None
            while chunk := f.read(CHUNK):
                h.update(chunk)
            if h.hexdigest() != want.get("sha256"):
                raise BackupFileError(f"{path}: {name} does not match its SHA-256 in the manifest (altered or damaged)")
    return manifest


def install_cmdb(path: str, cmdb_dir: str) -> None:
    """Write the backup's cmdb.sqlite and cmdb.key into a CMDB folder that holds neither (new files, fsynced)."""
    verify(path)
    os.makedirs(cmdb_dir, mode=0o700, exist_ok=True)
    for name in ("cmdb.sqlite", "cmdb.key", "cmdb.sqlite-wal", "cmdb.sqlite-shm"):
        if os.path.lexists(os.path.join(cmdb_dir, name)):
            raise BackupFileError(f"{cmdb_dir}/{name} exists: refusing to overwrite a CMDB")
    with _open(path) as tar:
        for name in ("cmdb.key", "cmdb.sqlite"):  # the database last: no database without its key
            src = tar.extractfile(name)
            assert src is not None
            fd = os.open(os.path.join(cmdb_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                while chunk := src.read(CHUNK):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
    dfd = os.open(cmdb_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

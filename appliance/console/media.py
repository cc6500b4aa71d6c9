"""The removable-media folder: plain file names only, never a path out of it, never an overwrite."""

from __future__ import annotations

import os
import re

from appliance.adminops import OpError

FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_READ = 4 * 1024 * 1024


def media_dir(home: str) -> str:
    from appliance import config as C
    try:
        cfg = C.load(home)
    except C.ConfigError as e:
        raise OpError(str(e)) from None
    p = cfg.console.media
    path = p if os.path.isabs(p) else os.path.join(home, p)
    if not os.path.isabs(p):
        os.makedirs(path, mode=0o700, exist_ok=True)  # developer mode: a folder standing in for the media
    if not os.path.isdir(path):
        raise OpError(f"no removable media at {path} (insert and mount it)")
    return os.path.realpath(path)


def media_path(home: str) -> str:
    """The media folder's path, whether or not something is mounted there (the mount point of removable media)."""
    from appliance import config as C
    try:
        cfg = C.load(home)
    except C.ConfigError as e:
        raise OpError(str(e)) from None
    p = cfg.console.media
    return os.path.realpath(p if os.path.isabs(p) else os.path.join(home, p))


def check_file_name(name: str) -> str:
    if not FILE_RE.match(name) or ".." in name:
        raise OpError(f"invalid file name {name[:40]!r}: a plain name in the media folder (letters, digits, '.', '_', '-')")
    return name


def path_in(media: str, name: str) -> str:
    """A plain name in the media folder, or `FOLDER/NAME` one level down (a ceremony's output folder
    carried from the other appliance); never a symbolic link on the way, never a path out of it."""
    folder, _, base = name.rpartition("/")
    check_file_name(base)
    where = media
    if folder:
        check_file_name(folder)
        where = os.path.join(media, folder)
        if os.path.islink(where) or not os.path.isdir(where):
            raise OpError(f"invalid file name {name[:40]!r}: {folder[:40]} is not a folder on the media")
    path = os.path.join(where, base)
    if os.path.dirname(os.path.abspath(path)) != where or os.path.realpath(where) != os.path.join(os.path.realpath(media), folder).rstrip("/"):
        raise OpError(f"invalid file name {name[:40]!r}")
    return path


def list_files(media: str, suffixes: tuple[str, ...], subfolders: bool = False) -> list[str]:
    """Regular files with one of the suffixes; with subfolders, also `FOLDER/NAME` one level down."""
    out = []
    for fn in sorted(os.listdir(media)):
        if FILE_RE.match(fn) and ".." not in fn:
            st = os.lstat(os.path.join(media, fn))
            if os.path.stat.S_ISREG(st.st_mode) and fn.lower().endswith(suffixes):
                out.append(fn)
            elif subfolders and os.path.stat.S_ISDIR(st.st_mode):
                out += [f"{fn}/{x}" for x in list_files(os.path.join(media, fn), suffixes)][:200]
    return out[:1000]


def read(media: str, name: str) -> bytes:
    path = path_in(media, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise OpError(f"cannot read {name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not os.path.stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OpError(f"{name} is not a regular file")
        data = f.read(MAX_READ + 1)
    if len(data) > MAX_READ:
        raise OpError(f"{name} is larger than {MAX_READ} bytes")
    return data


def write_new(path: str, data: bytes, mode: int = 0o644) -> None:
    """Create `path` with `data`, durably; refuse (OpError) if anything is already there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise OpError(f"{os.path.basename(path)} already exists: refusing to overwrite it") from None
    except OSError as e:
        raise OpError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OpError(f"cannot write {path}: {e.strerror}") from None


def write_to_media(media: str, name: str, data: bytes) -> str:
    path = path_in(media, name)
    write_new(path, data)
    return path

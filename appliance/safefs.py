"""Root's file operations inside folders a role can write: through fds, never following a link."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Callable

# openat2(2): include/uapi/linux/openat2.h; the syscall number is 437 on x86_64 and aarch64 alike.
_NR_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_AT_EMPTY_PATH = 0x1000
MAX_ENTRIES = 100_000  # a role cannot keep the supervisor walking its folder for ever
MAX_DEPTH = 32


class UnsafePath(Exception):
    """A path in a role's folder that root refuses to use (a link, a hard link, not a plain file)."""


_libc: ctypes.CDLL | None = None
_have_openat2: bool | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
        _libc = lib
    return _libc


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    how = struct.pack("=QQQ", flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _RESOLVE)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _lib().syscall(ctypes.c_long(_NR_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(os.fsencode(path)),
                        ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(len(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk_open(dirfd: int, path: str, flags: int, mode: int) -> int:
    """openat2's resolution by hand, for kernels before 5.6: one component at a time, O_NOFOLLOW each."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts or path.startswith("/"):
        raise OSError(errno.EXDEV, "path escapes its folder", path)
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=dirfd)
    cur = dirfd
    try:
        for p in parts[:-1]:
            nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)


def open_beneath(dirfd: int, path: str, flags: int, mode: int = 0o600) -> int:
    """Open `path` relative to `dirfd`, refusing any symlink on the way and any escape from `dirfd`
    (ELOOP, EXDEV); O_NOFOLLOW is always added."""
    global _have_openat2
    if path.startswith("/") or ".." in path.split("/"):
        raise OSError(errno.EXDEV, "path escapes its folder", path)
    flags |= os.O_NOFOLLOW
    if _have_openat2 is not False:
        try:
            fd = _openat2(dirfd, path, flags, mode)
            _have_openat2 = True
            return fd
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return _walk_open(dirfd, path, flags, mode)


def open_dir(dirfd: int, path: str) -> int:
    """A directory beneath `dirfd`, opened without following links."""
    return open_beneath(dirfd, path, os.O_RDONLY | os.O_DIRECTORY)


def open_root(path: str) -> int:
    """The state folder itself (root's, not a role's): a plain open of the configured path."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _plain(fd: int, what: str, owners: tuple[int, ...] | None) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{what} is not a plain file")
    if st.st_nlink != 1:
        raise UnsafePath(f"{what} has {st.st_nlink} links (a hard link planted there?)")
    if owners is not None and st.st_uid not in owners:
        raise UnsafePath(f"{what} is owned by uid {st.st_uid}")
    return st


def read_file(dirfd: int, path: str, limit: int, owners: tuple[int, ...] | None = None,
              where: str | None = None) -> bytes | None:
    """A small plain file beneath `dirfd`, or None when it does not exist. UnsafePath when it is a
    link, a hard link, not a plain file, owned by someone else, or larger than `limit`."""
    what = where or path
    try:
        fd = open_beneath(dirfd, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            raise UnsafePath(f"{what} is or goes through a symbolic link") from None
        raise
    try:
        st = _plain(fd, what, owners)
        if st.st_size > limit:
            raise UnsafePath(f"{what} is larger than {limit} bytes")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise UnsafePath(f"{what} is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def write_file(dirfd: int, name: str, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replace `name` (one component) in `dirfd` atomically: a new file made with O_EXCL|O_NOFOLLOW,
    chowned through its fd, renamed over the old name (rename never follows a link)."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a single file name: {name!r}")
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dirfd)  # a leftover (or a link planted under that name)
    except FileNotFoundError:
        pass
    fd = open_beneath(dirfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dirfd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)


def _fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """fchown on an O_PATH fd (plain fchown refuses those): fchownat(fd, "", AT_EMPTY_PATH)."""
    if _lib().fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def chown_tree(dirfd: int, uid: int, gid: int, refused: Callable[[str], None] | None = None) -> int:
    """Give the folder `dirfd` and everything in it to uid:gid, through fds only: symbolic links are
    left alone, and so is a file with several names (a hard link planted there could name a file
    outside the folder). Returns how many entries changed owner; `refused` hears of each one skipped."""
    seen = [0]

    def fix(fd: int, st: os.stat_result) -> int:
        if (st.st_uid, st.st_gid) == (uid, gid):
            return 0
        _fchown_path_fd(fd, uid, gid)
        return 1

    def walk(fd: int, rel: str, depth: int) -> int:
        changed = fix(fd, os.fstat(fd))
        if depth >= MAX_DEPTH:
            if refused:
                refused(f"{rel or '.'}: deeper than {MAX_DEPTH} levels: not walked")
            return changed
        for name in os.listdir(fd):
            seen[0] += 1
            if seen[0] > MAX_ENTRIES:
                raise UnsafePath(f"more than {MAX_ENTRIES} entries: not walked further")
            sub = f"{rel}/{name}" if rel else name
            try:
                efd = open_beneath(fd, name, os.O_PATH)
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as e:  # swapped for something that cannot be opened even as O_PATH
                if refused:
                    refused(f"{sub}: {e.strerror}: owner left as it is")
                continue
            try:
                st = os.fstat(efd)
                if stat.S_ISDIR(st.st_mode):
                    dfd = open_dir(efd, ".")
                    try:
                        changed += walk(dfd, sub, depth + 1)
                    finally:
                        os.close(dfd)
                elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    changed += fix(efd, st)
                elif (st.st_uid, st.st_gid) != (uid, gid) and refused:
                    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else (
                        f"{st.st_nlink} links" if stat.S_ISREG(st.st_mode) else "not a plain file")
                    refused(f"{sub}: {kind}: owner left as it is")
            finally:
                os.close(efd)
        return changed

    return walk(dirfd, "", 0)

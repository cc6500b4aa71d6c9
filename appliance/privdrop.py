"""Drop a role process's privileges: the only module that calls setres*id, setgroups, prctl,
setrlimit, Landlock or seccomp.

A role imports everything and opens its privileged resources first, then calls ``drop()`` once,
while it is still single-threaded. ``drop()`` does, in this order:

1. ``RLIMIT_CORE`` = 0 (soft and hard) and ``PR_SET_DUMPABLE`` 0: no core file, no ptrace attach,
   ``/proc/PID/*`` owned by root.
2. Close every fd not in ``keep_fds`` ∪ {0, 1, 2}.
3. ``PR_SET_NO_NEW_PRIVS`` 1. (Set here, before Landlock, because an unprivileged process may only
   call ``landlock_restrict_self`` once no_new_privs is set; it does not hinder the uid switch.)
4. Landlock, if the kernel has it: read/write beneath ``rw_paths``, read/execute beneath
   ``ro_paths`` and the paths Python itself needs (see ``auto_paths()``), nothing else.
   Without Landlock the report says ``landlock=False`` and the drop goes on.
5. Appliance mode (``identity`` given): empty the capability bounding set, setgroups([]),
   setresgid, setresuid, then verify the ids and that uid 0 / gid 0 cannot be regained and no
   capability is left (bounding set included); abort otherwise.
6. seccomp deny-list (see ``_DENIED``): EPERM for exec, ptrace, mount, module, key, bpf, uid
   syscalls and friends; EPERM for socket()/socketpair() other than AF_UNIX when ``network`` is
   False; kill the process for a foreign syscall ABI (i386 on x86_64, arm32 on aarch64).

Paths added to the read-only set automatically, so lazy imports, time zones, CA
bundles and ``/proc/self`` keep working: ``sys.prefix``, ``sys.base_prefix``, ``sys.exec_prefix``
and the stdlib/site-packages directories, the ``appliance``, ``hsm`` and ``policy`` package
directories (an editable install lives outside the prefix), ``/usr/lib``, ``/lib``,
``/usr/share/zoneinfo``, ``/etc/localtime``, ``/etc/ld.so.cache``, ``/etc/ssl``,
``/usr/share/ca-certificates``, ``/dev/urandom``, ``/proc/self``; and ``/dev/null`` read/write.
Missing paths are skipped. ``auto_paths()`` returns them.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import platform
import pwd
import resource
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.roletable import ROLES

__all__ = [
    "ADMIN_GROUP",
    "ROLE_USERS",
    "DropReport",
    "DropSpec",
    "Identity",
    "current_confinement",
    "drop",
    "auto_paths",
    "ensure_role_users",
]

log = logging.getLogger("donjon.privdrop")

ROLE_USERS: dict[str, str] = {r.name: r.user for r in ROLES.values()}  # one user per role of the role table
ADMIN_GROUP = "donjon-admin"


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


@dataclass(frozen=True)
class DropSpec:
    role: str
    identity: Identity | None  # None in developer mode: no uid switch
    keep_fds: frozenset[int]  # fds to keep open besides 0, 1, 2
    rw_paths: tuple[str, ...] = ()  # Landlock: read/write beneath these
    ro_paths: tuple[str, ...] = ()  # Landlock: read (+execute, for .so mapping) beneath these
    network: bool = False  # False: socket()/socketpair() fail with EPERM unless AF_UNIX

    def __post_init__(self) -> None:
        if not isinstance(self.keep_fds, frozenset) or not all(
            isinstance(fd, int) and fd >= 0 for fd in self.keep_fds
        ):
            raise ValueError("keep_fds must be a frozenset of non-negative ints")
        for paths in (self.rw_paths, self.ro_paths):
            if not isinstance(paths, tuple) or not all(isinstance(p, str) and p for p in paths):
                raise ValueError("rw_paths/ro_paths must be tuples of non-empty strings")
        if self.identity is not None and (self.identity.uid == 0 or self.identity.gid == 0):
            raise ValueError("a role identity must not be uid 0 or gid 0")


@dataclass(frozen=True)
class DropReport:
    uid: int
    gid: int
    no_new_privs: bool
    dumpable: bool
    seccomp: bool
    landlock: bool
    closed_fds: int


# --------------------------------------------------------------------------------------------
# libc plumbing

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        lib.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        _libc = lib
    return _libc


def _syscall(nr: int, *args: int) -> int:
    ret = _lib().syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _lib().prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_PR_GET_SECCOMP = 21
_PR_SET_SECCOMP = 22
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39


def _abort(role: str, msg: str) -> SystemExit:
    return SystemExit(f"privdrop[{role}]: {msg}")


# --------------------------------------------------------------------------------------------
# Syscall tables. Numbers from arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h (aarch64); tests compare them with the installed headers.

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_AARCH64 = 0xC00000B7
_X32_SYSCALL_BIT = 0x40000000

_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "execve": 59, "execveat": 322, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311,
        "kexec_load": 246, "kexec_file_load": 320,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442,
        "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setresuid": 117,
        "setresgid": 119, "setgroups": 116, "setfsuid": 122, "setfsgid": 123,
        "init_module": 175, "finit_module": 313, "delete_module": 176,
        "bpf": 321, "perf_event_open": 298,
        "keyctl": 250, "add_key": 248, "request_key": 249,
        "userfaultfd": 323, "personality": 135,
        "unshare": 272, "setns": 308, "pidfd_getfd": 438,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435,
        "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
    },
    "aarch64": {
        "execve": 221, "execveat": 281, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271,
        "kexec_load": 104, "kexec_file_load": 294,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442,
        "setuid": 146, "setgid": 144, "setreuid": 145, "setregid": 143, "setresuid": 147,
        "setresgid": 149, "setgroups": 159, "setfsuid": 151, "setfsgid": 152,
        "init_module": 105, "finit_module": 273, "delete_module": 106,
        "bpf": 280, "perf_event_open": 241,
        "keyctl": 219, "add_key": 217, "request_key": 218,
        "userfaultfd": 282, "personality": 92,
        "unshare": 97, "setns": 268, "pidfd_getfd": 438,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435,
        "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
    },
}
_AUDIT_ARCH = {"x86_64": _AUDIT_ARCH_X86_64, "aarch64": _AUDIT_ARCH_AARCH64}

# Answered with EPERM. Beyond the brief's list: the new mount API (same power as mount),
# unshare/setns (no new namespaces: a user namespace reopens kernel attack surface),
# pidfd_getfd (steals fds like ptrace), io_uring (performs socket/open work that seccomp
# never sees), kexec_file_load (kexec_load's twin).
_DENIED: tuple[str, ...] = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
    "kexec_load", "kexec_file_load",
    "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid",
    "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "personality",
    "unshare", "setns", "pidfd_getfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
)

_AF_UNIX = 1
# clone() flags that create namespaces; clone3 hides its flags behind a pointer, so clone3 gets
# ENOSYS and glibc falls back to clone(), whose flags the filter can see.
_CLONE_NS_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)


def _machine() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m.lower(), m)


# --------------------------------------------------------------------------------------------
# seccomp: classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06

_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_MODE_FILTER = 2

_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0_LO = 16  # args[0] low 32 bits (little-endian); family and clone flags fit in them


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _ret(action: int) -> bytes:
    return _insn(_BPF_RET_K, 0, 0, action)


def _build_filter(machine: str, network: bool) -> bytes:
    """The seccomp program as packed struct sock_filter[]; only short forward jumps are used."""
    nrs = _SYSCALLS[machine]
    eperm = _ret(_SECCOMP_RET_ERRNO | errno.EPERM)
    prog = [
        _insn(_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        _insn(_BPF_JEQ_K, 1, 0, _AUDIT_ARCH[machine]),
        _ret(_SECCOMP_RET_KILL_PROCESS),  # i386/x32-via-int80/arm32 entry points: no table
        _insn(_BPF_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if machine == "x86_64":
        # x32 syscalls carry the native arch value and alias native ones under another number.
        prog += [_insn(_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT), eperm]
    for name in _DENIED:
        prog += [_insn(_BPF_JEQ_K, 0, 1, nrs[name]), eperm]
    prog += [
        _insn(_BPF_JEQ_K, 0, 1, nrs["clone3"]),
        _ret(_SECCOMP_RET_ERRNO | errno.ENOSYS),
        _insn(_BPF_JEQ_K, 0, 4, nrs["clone"]),
        _insn(_BPF_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
        _insn(_BPF_JSET_K, 0, 1, _CLONE_NS_FLAGS),
        eperm,
        _ret(_SECCOMP_RET_ALLOW),
    ]
    if not network:
        for name in ("socket", "socketpair"):
            prog += [
                _insn(_BPF_JEQ_K, 0, 4, nrs[name]),
                _insn(_BPF_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
                _insn(_BPF_JEQ_K, 0, 1, _AF_UNIX),
                _ret(_SECCOMP_RET_ALLOW),
                eperm,
            ]
    prog.append(_ret(_SECCOMP_RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp(machine: str, network: bool) -> None:
    code = _build_filter(machine, network)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# --------------------------------------------------------------------------------------------
# Landlock

_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_V1 = (1 << 13) - 1  # execute .. make_sym
# Rights that make sense on a non-directory; the kernel rejects the others in a rule on a file.
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_FS_RO = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR


def _landlock_abi(machine: str) -> int:
    """Highest Landlock ABI of the running kernel, 0 if it has none (not built, or disabled)."""
    try:
        return _syscall(
            _SYSCALLS[machine]["landlock_create_ruleset"], 0, 0, _LANDLOCK_CREATE_RULESET_VERSION
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def _handled_fs(abi: int) -> int:
    handled = _FS_V1
    if abi >= 2:
        handled |= _FS_REFER
    if abi >= 3:
        handled |= _FS_TRUNCATE
    if abi >= 5:
        handled |= _FS_IOCTL_DEV
    return handled


# Resolved at import: sysconfig imports its data module lazily, and drop() must not import.
_SYSCONFIG_PATHS = sysconfig.get_paths()


def _package_dirs() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))  # .../appliance
    root = os.path.dirname(here)
    return [here] + [os.path.join(root, name) for name in ("hsm", "policy")]


def auto_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(read-only, read-write) paths every role gets beside its own; missing ones are skipped."""
    ro = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    ro += [_SYSCONFIG_PATHS[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")
           if k in _SYSCONFIG_PATHS]
    ro += _package_dirs()
    if getattr(sys, "frozen", False):
        # A PyInstaller bundle keeps its module archive inside the executable: lazy imports read it.
        ro.append(sys.executable)
    ro += [
        "/usr/lib", "/lib", "/usr/share/zoneinfo", "/etc/localtime", "/etc/ld.so.cache",
        "/etc/ssl", "/usr/share/ca-certificates", "/dev/urandom", "/proc/self",
    ]
    # A prefix of "/" would make the whole tree readable; the sysconfig paths cover that case.
    return tuple(p for p in ro if p and os.path.abspath(p) != "/"), ("/dev/null",)


def _apply_landlock(
    machine: str, abi: int, rules: Iterable[tuple[str, bool, bool]]
) -> None:
    """rules: (path, writable, automatic). Missing paths are skipped, and so are automatic
    paths this user may not even look up."""
    nrs = _SYSCALLS[machine]
    handled = _handled_fs(abi)
    # Only handled_access_fs is passed (size 8): every ABI accepts that prefix of the struct.
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled), 8)
    ruleset = _syscall(nrs["landlock_create_ruleset"], ctypes.addressof(attr), 8, 0)
    try:
        for path, writable, automatic in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError:
                if automatic:
                    continue
                raise
            try:
                allowed = handled if writable else _FS_RO & handled
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    allowed &= _FS_FILE_RIGHTS
                rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
                _syscall(
                    nrs["landlock_add_rule"], ruleset, _LANDLOCK_RULE_PATH_BENEATH,
                    ctypes.addressof(rule), 0,
                )
            finally:
                os.close(fd)
        _syscall(nrs["landlock_restrict_self"], ruleset, 0)
    finally:
        os.close(ruleset)


# --------------------------------------------------------------------------------------------
# fds


def _close_fds(keep: frozenset[int]) -> int:
    listed = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    # The listing's own directory fd is in `listed` but already closed: probe before counting.
    closing = 0
    for fd in listed:
        if fd in keep:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue
        closing += 1
    if not listed:
        return 0
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, max(listed) + 1)
    return closing


# --------------------------------------------------------------------------------------------
# status


def _status(pid: int | str) -> dict[str, str]:
    # Binary read and the built-in UTF-8 decoder: after the uid switch a codec module may no
    # longer be importable (an interpreter under a 0700 home, say).
    fields = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f.read().decode().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def current_confinement(pid: int) -> dict:
    """What the kernel says about a process's confinement, from /proc/PID/status.

    Returns {"uid": (real, effective, saved, fs), "gid": (real, effective, saved, fs),
    "no_new_privs": bool, "seccomp": int (0 none, 1 strict, 2 filter), "cap_eff": int,
    "cap_bnd": int}.
    """
    s = _status(pid)
    return {
        "uid": tuple(int(x) for x in s["Uid"].split()),
        "gid": tuple(int(x) for x in s["Gid"].split()),
        "no_new_privs": s.get("NoNewPrivs", "0") == "1",
        "seccomp": int(s.get("Seccomp", "0")),
        "cap_eff": int(s["CapEff"], 16),
        "cap_bnd": int(s["CapBnd"], 16),
    }


# --------------------------------------------------------------------------------------------
# users


def ensure_role_users(roles: Iterable[str]) -> dict[str, Identity]:
    """Create the missing per-role system users and the admin group (root only); idempotent."""
    roles = list(roles)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        raise PermissionError("ensure_role_users needs root (appliance mode)")
    groupadd = shutil.which("groupadd", path="/usr/sbin:/sbin:/usr/bin:/bin") or "groupadd"
    useradd = shutil.which("useradd", path="/usr/sbin:/sbin:/usr/bin:/bin") or "useradd"
    try:
        grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        _run([groupadd, "--system", ADMIN_GROUP])
    identities = {}
    for role in roles:
        name = ROLES[role].user
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            try:
                grp.getgrnam(name)
                group_opt = ["--gid", name]  # a same-named group survived an earlier userdel
            except KeyError:
                group_opt = ["--user-group"]
            _run([
                useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                "--shell", "/usr/sbin/nologin", *group_opt, name,
            ])
            pw = pwd.getpwnam(name)
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            raise SystemExit(f"privdrop: user {name} has uid or gid 0; refusing to use it")
        identities[role] = Identity(uid=pw.pw_uid, gid=pw.pw_gid)
    return identities


def _run(argv: list[str]) -> None:
    # A clean environment: a frozen bundle's LD_LIBRARY_PATH must not reach useradd/groupadd.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{os.path.basename(argv[0])} {argv[-1]} failed: {detail}")


# --------------------------------------------------------------------------------------------
# the drop


def _drop_bounding_set(role: str) -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP, so before the uid switch): nothing the
    process or a child could ever execute can gain a capability back."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63  # unknown kernel: try every bit; EINVAL past the last one is ignored below
    for cap in range(last + 1):
        try:
            # Only what is there: a service manager may have narrowed the set already (the image's
            # unit does), and dropping an absent capability still needs CAP_SETPCAP.
            if _prctl(_PR_CAPBSET_READ, cap) == 0:
                continue
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise _abort(role, f"cannot drop capability {cap} from the bounding set: {exc.strerror}") from None


def _switch_ids(role: str, ident: Identity) -> None:
    _drop_bounding_set(role)
    try:
        os.setgroups([])
        os.setresgid(ident.gid, ident.gid, ident.gid)
        os.setresuid(ident.uid, ident.uid, ident.uid)
    except OSError as exc:
        raise _abort(role, f"uid switch failed: {exc.strerror}") from None
    if os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3:
        raise _abort(role, "ids after the switch are not the target ids")
    if os.getgroups():
        raise _abort(role, "supplementary groups survived the switch")
    # Try to get back; a success means the switch did not hold (OpenSSH uidswap.c does the same).
    for regain in (lambda: os.setuid(0), lambda: os.setgid(0)):
        try:
            regain()
        except PermissionError:
            continue
        raise _abort(role, "old privileges could be regained after the switch")
    s = _status("self")
    if s["Uid"].split() != [str(ident.uid)] * 4 or s["Gid"].split() != [str(ident.gid)] * 4:
        raise _abort(role, "kernel reports other ids than the target ids")
    if any(int(s[k], 16) for k in ("CapPrm", "CapEff", "CapAmb", "CapBnd") if k in s):
        raise _abort(role, "capabilities left after the switch")


def drop(spec: DropSpec) -> DropReport:
    """Drop this process's privileges for good (see the module docstring for the order)."""
    role = spec.role
    machine = _machine()
    if machine not in _SYSCALLS:
        raise _abort(role, f"no seccomp table for {machine}")
    # prctl and Landlock act on the calling thread only: another thread would stay unconfined.
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise _abort(role, "drop() must run while the process is single-threaded")
    _lib()  # load before the fds and paths go away

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _prctl(_PR_SET_DUMPABLE, 0)
    except OSError as exc:
        raise _abort(role, f"cannot disable core dumps: {exc.strerror}") from None

    closed = _close_fds(spec.keep_fds | {0, 1, 2})

    try:
        _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except OSError as exc:
        raise _abort(role, f"cannot set no_new_privs: {exc.strerror}") from None

    try:
        abi = _landlock_abi(machine)
    except OSError as exc:
        raise _abort(role, f"landlock probe failed: {exc.strerror}") from None
    if abi:
        auto_ro, auto_rw = auto_paths()
        rules = (
            [(os.path.abspath(p), True, False) for p in spec.rw_paths]
            + [(os.path.abspath(p), False, False) for p in spec.ro_paths]
            + [(p, True, True) for p in auto_rw]
            + [(p, False, True) for p in auto_ro]
        )
        try:
            _apply_landlock(machine, abi, rules)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise _abort(role, f"landlock failed: {exc.strerror}{where}") from None
    else:
        log.warning("role %s: kernel has no Landlock; filesystem not confined", role)

    if spec.identity is not None:
        _switch_ids(role, spec.identity)
        # Changing the euid resets dumpable to fs.suid_dumpable, which may be 2.
        try:
            _prctl(_PR_SET_DUMPABLE, 0)
        except OSError as exc:
            raise _abort(role, f"cannot disable core dumps: {exc.strerror}") from None
    elif os.geteuid() == 0:
        log.warning("role %s: running as root without a uid switch (developer mode)", role)

    try:
        _install_seccomp(machine, spec.network)
    except OSError as exc:
        raise _abort(role, f"seccomp failed: {exc.strerror}") from None

    return DropReport(
        uid=os.geteuid(),
        gid=os.getegid(),
        no_new_privs=_prctl(_PR_GET_NO_NEW_PRIVS) == 1,
        dumpable=_prctl(_PR_GET_DUMPABLE) != 0,
        seccomp=_prctl(_PR_GET_SECCOMP) == _SECCOMP_MODE_FILTER,
        landlock=bool(abi),
        closed_fds=closed,
    )


"""privdrop in developer mode (no uid switch), against the real kernel: each test forks, drops in
the child and reports back through a pipe."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import resource
import socket
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import privdrop

MACHINE = privdrop._machine()
NR = privdrop._SYSCALLS[MACHINE]
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long


def raw_syscall(nr: int, *args: int) -> int | None:
    """None on success, else the errno."""
    ret = LIBC.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if ret < 0 else None


def errno_of(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def run_dropped(body: Callable[[object], dict], *, before: Callable[[], object] | None = None,
                **spec: object) -> dict:
    """Fork; in the child run before(), drop with DropSpec(**spec) (the report pipe and the fds
    listed under before()'s "keep" are kept), then body(before's result).
    Returns {"report": ..., "body": ...} from the child."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            ctx = before() if before else None
            extra = ctx.get("keep", []) if isinstance(ctx, dict) else []
            spec["keep_fds"] = frozenset(spec.get("keep_fds", ())) | {w, *extra}
            spec.setdefault("identity", None)
            spec.setdefault("role", "ocsp")
            report = privdrop.drop(privdrop.DropSpec(**spec))
            out = {"ok": True, "report": dataclasses.asdict(report), "body": body(ctx)}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: {status:#x}"
    out = json.loads(b"".join(chunks))
    assert out["ok"], out["error"]
    return out


def own_status() -> dict[str, str]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


# ---------------------------------------------------------------------------------------------


def test_report_status_dumpable_and_core_limit():
    def body(_):
        s = own_status()
        return {
            "nnp": s["NoNewPrivs"], "seccomp": s["Seccomp"],
            "core": resource.getrlimit(resource.RLIMIT_CORE),
            "conf": privdrop.current_confinement(os.getpid()),
        }

    out = run_dropped(body)
    rep, got = out["report"], out["body"]
    assert rep["no_new_privs"] is True
    assert rep["seccomp"] is True
    assert rep["dumpable"] is False
    assert rep["uid"] == os.geteuid() and rep["gid"] == os.getegid()
    assert got["nnp"] == "1" and got["seccomp"] == "2"
    assert got["core"] == [0, 0]
    assert got["conf"]["no_new_privs"] is True and got["conf"]["seccomp"] == 2


def test_current_confinement_seen_from_the_parent():
    """What the supervisor will do: read a live child's confinement from outside."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            privdrop.drop(privdrop.DropSpec(role="ocsp", identity=None,
                                            keep_fds=frozenset({go_r, ready_w})))
            os.write(ready_w, b"r")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        conf = privdrop.current_confinement(pid)
        before = privdrop.current_confinement(os.getpid())
    finally:
        os.write(go_w, b"g")
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)
    assert conf["no_new_privs"] is True and conf["seccomp"] == 2
    assert conf["uid"] == (os.getuid(), os.geteuid(), os.getresuid()[2], os.geteuid())
    assert len(conf["gid"]) == 4 and isinstance(conf["cap_eff"], int)
    assert before["seccomp"] == 0


def test_exec_is_denied():
    out = run_dropped(lambda _: {"execv": errno_of(lambda: os.execv("/bin/true", ["true"]))})
    assert out["body"]["execv"] == errno.EPERM


def test_no_network_allows_only_af_unix():
    def body(_):
        def sock(family, kind=socket.SOCK_STREAM, proto=0):
            return lambda: socket.socket(family, kind, proto).close()

        a, b = socket.socketpair(socket.AF_UNIX)
        a.send(b"x")
        return {
            "unix": errno_of(sock(socket.AF_UNIX)),
            "unix_pair": b.recv(1).decode(),
            "inet": errno_of(sock(socket.AF_INET)),
            "inet6": errno_of(sock(socket.AF_INET6)),
            "udp": errno_of(sock(socket.AF_INET, socket.SOCK_DGRAM)),
            "netlink": errno_of(sock(socket.AF_NETLINK, socket.SOCK_RAW)),
            "inet_pair": errno_of(lambda: socket.socketpair(socket.AF_INET)),
            # Only the low 32 bits are the family (int); garbage above them must not help.
            "inet_high_bits": raw_syscall(NR["socket"], (1 << 32) | socket.AF_INET,
                                          socket.SOCK_STREAM, 0),
        }

    got = run_dropped(body, network=False)["body"]
    assert got["unix"] is None and got["unix_pair"] == "x"
    for key in ("inet", "inet6", "udp", "netlink", "inet_pair", "inet_high_bits"):
        assert got[key] == errno.EPERM, key


def test_network_allows_inet():
    def body(_):
        return {"inet": errno_of(lambda: socket.socket(socket.AF_INET).close()),
                "unix": errno_of(lambda: socket.socket(socket.AF_UNIX).close())}

    got = run_dropped(body, network=True)["body"]
    assert got == {"inet": None, "unix": None}


def test_unkept_fds_are_closed_and_kept_fds_survive():
    def before():
        kept = os.open("/dev/null", os.O_RDONLY)
        lost = os.open("/dev/null", os.O_RDONLY)
        high = os.dup2(lost, 200)
        return {"keep": [kept], "fds": [kept, lost, high]}

    def body(ctx):
        return [errno_of(lambda fd=fd: os.fstat(fd)) for fd in ctx["fds"]]

    out = run_dropped(body, before=before)
    assert out["body"] == [None, errno.EBADF, errno.EBADF]
    assert out["report"]["closed_fds"] >= 2


def test_landlock_confines_the_filesystem(tmp_path: Path):
    if privdrop._landlock_abi(MACHINE) == 0:
        pytest.skip("this kernel has no Landlock")
    inside, ro, outside = tmp_path / "rw", tmp_path / "ro", tmp_path / "out"
    for d in (inside, ro, outside):
        d.mkdir()
        (d / "f").write_text("data")

    def body(_):
        def write(path):
            return lambda: Path(path).write_text("new")

        return {
            "rw_read": errno_of(lambda: (inside / "f").read_text()),
            "rw_create": errno_of(write(inside / "g")),
            "rw_rename": errno_of(lambda: os.rename(inside / "g", inside / "h")),
            "ro_read": errno_of(lambda: (ro / "f").read_text()),
            "ro_list": errno_of(lambda: os.listdir(ro)),
            "ro_write": errno_of(write(ro / "f")),
            "ro_create": errno_of(write(ro / "g")),
            "out_read": errno_of(lambda: (outside / "f").read_text()),
            "out_list": errno_of(lambda: os.listdir(outside)),
            "etc_passwd": errno_of(lambda: open("/etc/passwd").close()),
            "stdlib": errno_of(lambda: __import__("xml.dom.minidom")),  # a lazy import
            "urandom": errno_of(lambda: open("/dev/urandom", "rb").read(8)),
            "devnull": errno_of(lambda: open("/dev/null", "w").write("x")),
        }

    out = run_dropped(body, rw_paths=(str(inside),), ro_paths=(str(ro),))
    got = out["body"]
    assert out["report"]["landlock"] is True
    for key in ("rw_read", "rw_create", "rw_rename", "ro_read", "ro_list", "stdlib", "urandom",
                "devnull"):
        assert got[key] is None, key
    for key in ("ro_write", "ro_create", "out_read", "out_list", "etc_passwd"):
        assert got[key] == errno.EACCES, key
    assert (inside / "h").read_text() == "new"


def test_every_denied_syscall_gets_eperm():
    # kexec_load with zero segments would unload a loaded kexec image if the filter were wrong.
    names = [n for n in privdrop._DENIED if not n.startswith("kexec")]

    def body(_):
        got = {name: raw_syscall(NR[name], 0, 0, 0, 0, 0, 0) for name in names}
        got["os.setuid"] = errno_of(lambda: os.setuid(os.getuid()))
        got["os.setgroups"] = errno_of(lambda: os.setgroups([]))
        got["os.chroot"] = errno_of(lambda: os.chroot("/"))
        return got

    got = run_dropped(body)["body"]
    assert {k: v for k, v in got.items() if v != errno.EPERM} == {}


@pytest.mark.skipif(MACHINE != "x86_64", reason="x32 exists only on x86_64")
def test_x32_syscalls_are_denied():
    getpid = 39
    got = run_dropped(lambda _: {"x32_getpid": raw_syscall(0x40000000 | getpid)})["body"]
    assert got["x32_getpid"] == errno.EPERM


def test_threads_and_fork_work_but_namespaces_do_not():
    clone_newuser = 0x10000000

    def body(_):
        seen = []
        t = threading.Thread(target=lambda: seen.append(1))
        t.start()
        t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        sigchld = 17
        ret = LIBC.syscall(ctypes.c_long(NR["clone"]), ctypes.c_long(clone_newuser | sigchld),
                           ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0),
                           ctypes.c_long(0))
        if ret == 0:  # the filter failed and we are the clone: leave at once
            os._exit(0)
        return {
            "thread": seen, "fork_status": os.WEXITSTATUS(status),
            "clone_newuser": ctypes.get_errno() if ret < 0 else "created",
            "unshare": raw_syscall(NR["unshare"], clone_newuser),
            "clone3": raw_syscall(NR["clone3"], 0, 0),
        }

    got = run_dropped(body)["body"]
    assert got["thread"] == [1] and got["fork_status"] == 7
    assert got["clone_newuser"] == errno.EPERM and got["unshare"] == errno.EPERM
    assert got["clone3"] == errno.ENOSYS


def test_drop_refuses_a_multithreaded_process():
    def before():
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        return None

    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            before()
            try:
                privdrop.drop(privdrop.DropSpec(role="ocsp", identity=None,
                                                keep_fds=frozenset({w})))
                msg = "dropped"
            except SystemExit as exc:
                msg = str(exc)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert msg == "privdrop[ocsp]: drop() must run while the process is single-threaded"


def test_syscall_numbers_match_the_installed_headers():
    header = {
        "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "aarch64": "/usr/include/asm-generic/unistd.h",
    }[MACHINE]
    if not os.path.exists(header):
        raise AssertionError(f"{header} missing: bash .ci/setup installs linux-libc-dev")
    text = Path(header).read_text()
    defined = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)\b", text)}
    checked = {name: nr for name, nr in NR.items() if name in defined}
    assert len(checked) >= 40
    assert {n: (nr, defined[n]) for n, nr in checked.items() if defined[n] != nr} == {}


def test_filter_builds_for_every_arch():
    for machine in privdrop._SYSCALLS:
        assert set(privdrop._DENIED) <= set(privdrop._SYSCALLS[machine])
        for network in (False, True):
            prog = privdrop._build_filter(machine, network)
            assert len(prog) % 8 == 0 and len(prog) // 8 < 4096


def test_spec_validation():
    with pytest.raises(ValueError):
        privdrop.DropSpec(role="cis", identity=privdrop.Identity(0, 0), keep_fds=frozenset())
    with pytest.raises(ValueError):
        privdrop.DropSpec(role="cis", identity=None, keep_fds={3})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        privdrop.DropSpec(role="cis", identity=None, keep_fds=frozenset({-1}))
    with pytest.raises(ValueError):
        privdrop.DropSpec(role="cis", identity=None, keep_fds=frozenset(),
                          rw_paths=["/x"])  # type: ignore[arg-type]


def test_ensure_role_users_rejects_unknown_roles():
    with pytest.raises(ValueError, match="unknown role"):
        privdrop.ensure_role_users(["cis", "mallory"])


def test_auto_paths_never_include_root():
    ro, rw = privdrop.auto_paths()
    assert "/" not in ro and rw == ("/dev/null",)
    assert "/proc/self" in ro and "/usr/share/zoneinfo" in ro

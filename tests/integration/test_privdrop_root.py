"""privdrop in appliance mode (started as root): per-role users and the uid switch, against the
real kernel. CI runs the suite as root; these tests do not skip."""

from __future__ import annotations

import dataclasses
import errno
import grp
import json
import os
import pwd
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import privdrop

pytestmark = pytest.mark.root


def errno_of(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def run_dropped(body: Callable[[], dict], spec: privdrop.DropSpec, *,
                before: Callable[[], None] | None = None,
                while_alive: Callable[[int], object] | None = None) -> dict:
    """Fork; the child runs before(), drops with `spec` (plus the pipes it needs) and runs
    body(); while the dropped child waits, the parent may look at it with while_alive(pid)."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            os.close(go_w)
            if before is not None:
                before()
            spec = dataclasses.replace(spec, keep_fds=spec.keep_fds | {w, go_r})
            report = privdrop.drop(spec)
            out = {"ok": True, "report": dataclasses.asdict(report), "body": body()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(out).encode() + b"\n"
            while data:
                data = data[os.write(w, data):]
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    seen = None
    try:
        with os.fdopen(r, "rb") as f:
            line = f.readline()
            if while_alive is not None and line:
                seen = while_alive(pid)
    finally:
        os.write(go_w, b"g")
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: {status:#x}"
    out = json.loads(line)
    assert out["ok"], out["error"]
    out["seen"] = seen
    return out


@pytest.fixture(scope="module")
def identities() -> dict[str, privdrop.Identity]:
    assert os.geteuid() == 0, "appliance-mode tests need root (CI runs them as root)"
    return privdrop.ensure_role_users(privdrop.ROLE_USERS)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory every user may traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="donjon-privdrop-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_ensure_role_users_is_idempotent(identities):
    again = privdrop.ensure_role_users(privdrop.ROLE_USERS)
    assert again == identities
    assert set(identities) == set(privdrop.ROLE_USERS)
    grp.getgrnam(privdrop.ADMIN_GROUP)
    uids = set()
    for role, ident in identities.items():
        pw = pwd.getpwnam(privdrop.ROLE_USERS[role])
        assert (pw.pw_uid, pw.pw_gid) == (ident.uid, ident.gid)
        assert ident.uid != 0 and ident.gid != 0
        assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_dir == "/nonexistent"
        assert not os.path.exists(pw.pw_dir)
        assert grp.getgrgid(pw.pw_gid).gr_name == pw.pw_name  # its own group
        uids.add(pw.pw_uid)
    assert len(uids) == len(identities)


def test_drop_switches_to_the_role_user_for_good(identities, shared_dir):
    ident = identities["factory"]
    public = shared_dir / "public"
    secret = shared_dir / "secret"
    public.write_text("public")
    public.chmod(0o644)
    secret.write_text("secret")
    secret.chmod(0o600)

    def body():
        s = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                s[key] = value.split()
        return {
            "status_uid": s["Uid"], "status_gid": s["Gid"], "cap_eff": s["CapEff"][0],
            "cap_prm": s["CapPrm"][0], "groups": os.getgroups(),
            "resuid": os.getresuid(), "resgid": os.getresgid(),
            "setuid0": errno_of(lambda: os.setuid(0)),
            "setgid0": errno_of(lambda: os.setgid(0)),
            "public": errno_of(lambda: public.read_text()),
            "secret": errno_of(lambda: secret.read_text()),
        }

    spec = privdrop.DropSpec(role="factory", identity=ident, keep_fds=frozenset(),
                             ro_paths=(str(shared_dir),))
    out = run_dropped(body, spec, while_alive=privdrop.current_confinement)
    rep, got, seen = out["report"], out["body"], out["seen"]

    assert (rep["uid"], rep["gid"]) == (ident.uid, ident.gid)
    assert rep["no_new_privs"] and rep["seccomp"] and not rep["dumpable"]
    assert got["status_uid"] == [str(ident.uid)] * 4  # real, effective, saved, fs
    assert got["status_gid"] == [str(ident.gid)] * 4
    assert got["resuid"] == [ident.uid] * 3 and got["resgid"] == [ident.gid] * 3
    assert got["groups"] == []
    assert int(got["cap_eff"], 16) == 0 and int(got["cap_prm"], 16) == 0
    assert got["setuid0"] == errno.EPERM and got["setgid0"] == errno.EPERM
    assert got["public"] is None  # so the refusal below is the file's mode, not Landlock
    assert got["secret"] == errno.EACCES

    # The supervisor's view of the same, still-running child.
    assert seen["uid"] == (ident.uid,) * 4 and seen["gid"] == (ident.gid,) * 4
    assert seen["cap_eff"] == 0 and seen["no_new_privs"] is True and seen["seccomp"] == 2


def test_each_role_gets_its_own_uid(identities):
    def body():
        return {"resuid": os.getresuid()}

    for role in ("cis", "ocsp"):
        ident = identities[role]
        spec = privdrop.DropSpec(role=role, identity=ident, keep_fds=frozenset())
        out = run_dropped(body, spec)
        assert out["body"]["resuid"] == [ident.uid] * 3


def test_developer_mode_as_a_normal_user(identities):
    """Developer mode proper: started by a normal user, no uid switch. Landlock then needs
    no_new_privs first (no CAP_SYS_ADMIN), which the drop order provides."""
    user = identities["snmp"]

    def become_a_normal_user():
        # Test setup standing in for a login shell; not how Donjon switches users.
        os.setgroups([])
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)

    def body():
        return {
            "resuid": os.getresuid(),
            "passwd": errno_of(lambda: open("/etc/passwd", "rb").close()),
            "hostname": errno_of(lambda: open("/etc/hostname", "rb").close()),
            "exec": errno_of(lambda: os.execv("/bin/true", ["true"])),
        }

    spec = privdrop.DropSpec(role="snmp", identity=None, keep_fds=frozenset(),
                             ro_paths=("/etc/hostname",))
    out = run_dropped(body, spec, before=become_a_normal_user,
                      while_alive=privdrop.current_confinement)
    rep, got, seen = out["report"], out["body"], out["seen"]
    assert rep["uid"] == user.uid and rep["no_new_privs"] and rep["seccomp"]
    assert rep["landlock"] is (privdrop._landlock_abi(privdrop._machine()) > 0)
    assert got["resuid"] == [user.uid] * 3
    assert got["hostname"] is None and got["exec"] == errno.EPERM
    if rep["landlock"]:
        assert got["passwd"] == errno.EACCES
    assert seen["cap_eff"] == 0 and seen["seccomp"] == 2


def test_drop_aborts_when_the_switch_does_not_hold(identities):
    """Fault injection: a setresuid that keeps saved uid 0 must abort the role, not run it."""
    ident = identities["cis"]
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            real = os.setresuid
            os.setresuid = lambda ruid, euid, suid: real(ruid, euid, 0)  # type: ignore[assignment]
            try:
                privdrop.drop(privdrop.DropSpec(role="cis", identity=ident,
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
    assert msg == "privdrop[cis]: ids after the switch are not the target ids"

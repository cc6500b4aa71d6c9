"""`donjon role` is dispatched before the CLI is imported: role processes load no typer, admin client
or other role's code, and the CLI (with the supervisor it runs) loads no role's code."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from appliance.ipc import schema as S
from appliance.ipc.channel import encode
from appliance.roletable import ROLES
from appliance.supervisor import role_argv

CLI_ONLY = ("typer", "click", "appliance.cli", "appliance.adminops", "appliance.client", "appliance.console")
ROLE_CODE = {"cis": ("hsm.cis", "pkcs11"), "factory": ("appliance.factory", "apsw"), "ocsp": ("appliance.ocsp",),
             "distribution": ("appliance.distribution", "ldap3"), "snmp": ("appliance.snmp", "pysnmp"),
             "gateway": ("appliance.gateway",), "kgs": ("appliance.kgs",)}


def _imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}


def _under(mods: set[str], prefixes) -> set[str]:
    return {m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("name", sorted(ROLES))
def test_a_role_process_imports_no_cli_and_no_other_role(name, src_path):
    """The supervisor's own argv for the role, under -X importtime: the role takes its Hello, gets
    Shutdown where its configuration should be, and exits 3 with one line, having imported its code only."""
    spec = ROLES[name]
    ours, theirs = socket.socketpair()
    argv = role_argv(name)
    argv[1:1] = ["-X", "importtime"]
    proc = subprocess.Popen([*argv, "--fd", f"{spec.control.name}={theirs.fileno()}"], pass_fds=[theirs.fileno()],
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src_path}, stderr=subprocess.PIPE, cwd="/")
    try:
        theirs.close()
        ours.sendall(encode(S.Hello(link=spec.control.name, version=S.VERSION)) + encode(S.Shutdown()))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()
    text = err.decode()
    lines = [x for x in text.splitlines() if not x.startswith("import time:")]
    assert proc.returncode == 3 and len(lines) == 1, text[-2000:]
    assert f"expected {spec.config.__name__}, got Shutdown" in lines[0] and "protocol violation" in lines[0], lines
    mods = _imported(text)
    assert _under(mods, ROLE_CODE[name]), f"{name}: its own code was not imported?"
    assert not _under(mods, CLI_ONLY), f"{name} imported the CLI: {sorted(_under(mods, CLI_ONLY))}"
    others = [p for other, ps in ROLE_CODE.items() if other != name for p in ps if p not in ROLE_CODE[name]]
    if name in ("ocsp", "gateway", "kgs"):  # their own tokens (the KGS's directly, for its cards), never through the CIS
        others = [p for p in others if p != "pkcs11"]
    assert not _under(mods, others), f"{name} imported another role's code: {sorted(_under(mods, others))}"


def test_the_cli_and_supervisor_never_import_a_role(src_path):
    """Every CLI face (commands, console, the supervisor `donjon run` starts) and `--help` itself."""
    code = ("import sys; import appliance.entry, appliance.cli, appliance.supervisor, appliance.console.menu, "
            "appliance.console.sshshell, appliance.console.ceremony; print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src_path},
                       capture_output=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    mods = set(r.stdout.decode().split())
    assert "typer" in mods and "appliance.roletable" in mods  # the harness sees what the CLI loads
    assert not _under(mods, [p for ps in ROLE_CODE.values() for p in ps]), sorted(_under(mods, [p for ps in ROLE_CODE.values() for p in ps]))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "appliance.entry", "--help"],
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src_path}, capture_output=True, cwd="/", timeout=60)
    assert r.returncode == 0 and b"Usage" in r.stdout, r.stderr.decode()[-2000:]
    mods = _imported(r.stderr.decode())
    assert "typer" in mods and not _under(mods, [p for ps in ROLE_CODE.values() for p in ps])


def test_role_dispatch_refuses_unknown_roles_and_bad_fds(src_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": src_path}
    r = subprocess.run([sys.executable, "-m", "appliance.entry", "role", "no-such-role"], env=env, capture_output=True, cwd="/", timeout=60)
    assert r.returncode == 2 and r.stderr.decode().strip() == "donjon: unknown role 'no-such-role'", r.stderr
    r = subprocess.run([sys.executable, "-m", "appliance.entry", "role", "cis", "--fd", "sup-cis"], env=env, capture_output=True,
                       cwd="/", timeout=60)
    assert r.returncode == 2 and b"expected LINK=FD" in r.stderr and b"Traceback" not in r.stderr, r.stderr

"""Privilege separation of the running appliance: who maps the PKCS#11 module, who runs as whom,
what each role can open, and that a role exits on anything it does not expect."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from appliance import privdrop
from appliance.ipc import schema as S
from appliance.ipc.channel import encode

IS_ROOT = os.geteuid() == 0


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_only_the_cis_maps_the_pkcs11_module(shared_appliance):
    appliance = shared_appliance  # observes only
    pids = appliance.role_pids()
    assert set(pids) == {"cis", "cis.1", "factory", "ocsp", "distribution"}  # two signing processes by default
    # The CIS processes reach the CA token; the endpoint maps the module for its own token (delegated
    # responder keys only); the Factory and the supervisor never map it.
    for name, pid in pids.items():
        assert ("libsofthsm2" in _maps(pid)) == (name.startswith("cis") or name == "ocsp"), name
    with open(f"/proc/{pids['ocsp']}/environ", "rb") as f:
        env = f.read().split(b"\0")
    assert f"SOFTHSM2_CONF={appliance.home / 'ocsp-token' / 'softhsm2.conf'}".encode() in env
    assert "libsofthsm2" not in _maps(appliance.proc.pid)


def test_roles_are_confined(shared_appliance):
    appliance = shared_appliance  # observes only
    pids = appliance.role_pids()
    for role, pid in pids.items():
        c = privdrop.current_confinement(pid)
        assert c["no_new_privs"] and c["seccomp"] == 2, (role, c)
        assert c["cap_eff"] == 0, (role, c)
        if IS_ROOT:
            user = privdrop.ROLE_USERS[role.split(".")[0]]
            import pwd
            uid = pwd.getpwnam(user).pw_uid
            assert c["uid"] == (uid, uid, uid, uid), (role, c)
    if IS_ROOT:
        assert privdrop.current_confinement(pids["cis"])["uid"] != privdrop.current_confinement(pids["factory"])["uid"]


@pytest.mark.skipif(not IS_ROOT, reason="uid separation exists only in appliance mode (CI runs as root)")
def test_role_users_cannot_reach_each_others_state(shared_appliance):
    appliance = shared_appliance  # observes only
    home = appliance.home

    def as_user(user: str, path: str) -> int:
        return subprocess.run(["runuser", "-u", user, "--", "cat", path], capture_output=True).returncode

    assert as_user("donjon-cis", str(home / "cmdb" / "cmdb.sqlite")) != 0
    assert as_user("donjon-cis", str(home / "cmdb" / "cmdb.key")) != 0
    tokens = next((home / "softhsm" / "tokens").iterdir())
    token_file = next(tokens.iterdir())
    assert as_user("donjon-factory", str(token_file)) != 0
    assert as_user("donjon-factory", str(home / "pin")) != 0
    assert as_user("donjon-ocsp", str(home / "cmdb" / "cmdb.sqlite")) != 0
    assert as_user("donjon-ocsp", str(token_file)) != 0
    assert as_user("donjon-cis", str(home / "ocsp-token" / "pin")) != 0
    for path in (home / "cmdb" / "cmdb.sqlite", token_file, home / "pin", home / "ocsp-token" / "pin"):
        assert as_user("donjon-dist", str(path)) != 0, path  # the agent holds destination credentials only
    # No role is reachable by a path: the only named socket is the admin socket, owned by root:admin.
    socks = [p for p in home.rglob("*") if p.is_socket()]
    assert socks == [home / "run" / "admin.sock"]
    st = os.stat(home / "run" / "admin.sock")
    assert st.st_mode & 0o007 == 0


@pytest.mark.skipif(not IS_ROOT, reason="needs another uid to connect from")
def test_admin_socket_refuses_other_users(shared_appliance):
    appliance = shared_appliance  # observes only
    r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c",
                        f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(appliance.home / 'run' / 'admin.sock')!r})"],
                       capture_output=True)
    assert r.returncode != 0 and b"PermissionError" in r.stderr


def _feed_role(src_path: str, role: str, links: list[str], link: str, payload: bytes) -> tuple[int, str]:
    """Start one role by hand with socketpairs, as the supervisor would, write `payload` on `link`,
    and return its exit status and stderr."""
    ours, fds, theirs = {}, [], []
    for name in links:
        a, b = socket.socketpair()
        ours[name] = a
        theirs.append(b)
        fds += ["--fd", f"{name}={b.fileno()}"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": src_path}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "role", role, *fds],
                            pass_fds=[b.fileno() for b in theirs], env=env, stderr=subprocess.PIPE, cwd="/")
    try:
        for b in theirs:
            b.close()
        ours[link].sendall(payload)
        _, err = proc.communicate(timeout=30)
        return proc.returncode, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for a in ours.values():
            a.close()
        if proc.stderr:
            proc.stderr.close()


def _hello(link: str) -> bytes:
    return encode(S.Hello(link=link, version=S.VERSION))


@pytest.mark.parametrize("after_hello,garbage", [
    (True, b"\x00\x00\x00\x05hello"),                       # not msgpack of any known message
    (True, struct.pack(">I", 1 << 30) + b"x"),              # oversize frame: refused before reading
    (True, encode(S.Shutdown())[:-1] + b"\xc1"),            # invalid msgpack
    (True, encode(S.Ready(role="cis", pid=1))),             # a valid message the supervisor never sends
    (False, encode(S.Hello(link="sup-factory", version=S.VERSION))),  # wrong link in the handshake
    (False, encode(S.Hello(link="sup-cis", version=S.VERSION + 1))),  # version mismatch
])
def test_malformed_frame_makes_the_cis_exit(src_path, after_hello, garbage):
    rc, err = _feed_role(src_path, "cis", ["sup-cis", "factory-cis"], "sup-cis",
                         (_hello("sup-cis") if after_hello else b"") + garbage)
    assert rc == 3, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "protocol violation" in lines[0], err


def test_unexpected_message_type_makes_the_factory_exit(src_path):
    # A message of another link's union (CisConfig is for the CIS) is not decodable here.
    cfg = S.CisConfig(module="/x", token_label="t", softhsm_conf=None, profiles={}, base_url=None)
    rc, err = _feed_role(src_path, "factory", ["sup-factory", "factory-cis"], "sup-factory", _hello("sup-factory") + encode(cfg))
    assert rc == 3 and "protocol violation" in err, err


def test_supervisor_stops_everything_when_the_cis_dies(appliance):
    pids = appliance.role_pids()
    os.kill(pids["cis"], 9)
    rc = appliance.proc.wait(timeout=60)
    assert rc != 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pids['factory']}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pids['factory']}") or open(f"/proc/{pids['factory']}/stat").read().split()[2] == "Z"


def test_sigterm_stops_cleanly(appliance):
    assert appliance.stop() == 0
    log = appliance.log.read_text()
    assert "factory" in log and "stopped cleanly" in log


def test_schema_hash_is_pinned():
    # A changed schema fails here until schema.VERSION is bumped and the new hash pinned under it; an
    # entry is never edited (peers of the old version speak the old schema), only added.
    assert S.VERSION == max(PINNED_SCHEMA_HASHES), f"schema.VERSION {S.VERSION}: pin its hash under that key"
    assert len(set(PINNED_SCHEMA_HASHES.values())) == len(PINNED_SCHEMA_HASHES), "a hash pinned under two versions"
    assert S.schema_hash() == PINNED_SCHEMA_HASHES[S.VERSION], \
        f"the schema changed: bump schema.VERSION to {S.VERSION + 1} and pin {S.schema_hash()} under it"


PINNED_SCHEMA_HASHES = {
    2: "c13c81ddadbb16a3220f5182b620e99c973910835a5238461e9c83ecb8f82e98",
    3: "04ab501a300ad2df4e9ea7f3353411ca8c2d6c8e9cfda06261e03e1492de4866",
    4: "d36f02f7789fb348f4cfc25c244c61ec537317a97f9cdaab0eedf5906e8dbcdb",
    5: "bc8b9c49119c0d486cac57ee71fe3ba3c7504953f37ef7193e18e92f6a9ee4f2",
    6: "ff5f28ece79280598e5653f945cd781ff343398a05a445dae005d576c4395b6f",  # RevokeReply.known_by_serial_only
}

"""Idle connections cannot starve the admin socket: a handshake deadline and per-peer connection caps."""

from __future__ import annotations

import json
import socket
import time

from appliance.console.session import Session
from appliance.factory.main import HANDSHAKE_SECONDS, MAX_PER_PID, MAX_PER_UID, AdminGate
from appliance.ipc import schema as S

from .peers import HOLD, run


def test_gate_caps_per_pid_per_uid_and_total():
    g = AdminGate(total=5, per_pid=2, per_uid=3)
    assert g.admit(10, 1000) is None and g.admit(10, 1000) is None
    assert "pid 10" in g.admit(10, 1000)  # a third from one process
    assert g.admit(11, 1000) is None
    assert "uid 1000" in g.admit(12, 1000)  # a fourth from one non-root user, whatever its pids
    assert g.admit(20, 1001) is None and g.admit(21, 1001) is None
    assert "5 admin connections open by members of the admin group" in g.admit(22, 1002)
    assert g.admit(30, 0) is None and g.admit(30, 0) is None  # root draws on its own total: not starved
    assert "pid 30" in g.admit(30, 0)  # root's processes are bounded per pid too
    for pid in (31, 31, 32):
        assert g.admit(pid, 0) is None
    assert "5 admin connections open by root" in g.admit(33, 0)
    g.release(10, 1000)
    assert g.admit(12, 1000) is None  # a released slot is free again
    for pid, uid in ((10, 1000), (11, 1000), (12, 1000), (20, 1001), (21, 1001), (30, 0), (30, 0), (31, 0), (31, 0), (32, 0)):
        g.release(pid, uid)
    assert g.n == 0 and not g.pids and not g.uids and g.pools == {True: 0, False: 0}


def test_64_idle_connections_do_not_block_status_and_the_console_reconnects(appliance):
    a = appliance
    path = str(a.home / "run" / "admin.sock")
    idle = []
    try:
        for _ in range(64):  # connect and say nothing (the reported attack)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(HANDSHAKE_SECONDS + 10)
            s.connect(path)
            idle.append(s)
        t0 = time.monotonic()
        r = a.cli("status", timeout=30)
        assert r.returncode == 0 and b"activ" in r.stdout.lower()
        # The Factory closed all but MAX_PER_PID of them at once; those got its Hello, then were closed
        # when they did not answer within the handshake deadline. None is left holding a slot.
        greeted = 0
        for s in idle:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            greeted += bool(data)
        assert greeted <= MAX_PER_PID
        assert time.monotonic() - t0 < HANDSHAKE_SECONDS + 10  # closed by the deadline, not by our timeout
    finally:
        for s in idle:
            s.close()
    assert a.cli("status").returncode == 0

    # A member of donjon-admin (no officer account) holding 64 handshaken, idle connections keeps 16
    # (its user's cap); root's commands still answer at once.
    holder = run(a, HOLD, 64, stranger=True)
    try:
        kept, refused = json.loads(holder.stdout.readline())
        assert (kept, refused) == (MAX_PER_UID, 64 - MAX_PER_UID)
        r = a.cli("status", timeout=30)
        assert r.returncode == 0 and b"activ" in r.stdout.lower()
    finally:
        holder.communicate(timeout=30)  # closes its stdin: it lets go of its connections

    # The console keeps a connection without a session at its PIN prompt: once the Factory has closed
    # it (idle deadline), the next action opens a new one instead of failing.
    s = Session(str(a.home))
    first = s.client
    assert first.call(S.AStatus)["activated"] and not first.dropped()
    first.chan.sock.shutdown(socket.SHUT_WR)  # the Factory ends the connection, as at its idle deadline
    deadline = time.monotonic() + 10
    while not first.dropped() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.dropped() and s.client is not first
    assert s.client.call(S.AStatus)["activated"]
    s.close()


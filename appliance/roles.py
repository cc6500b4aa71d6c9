"""`donjon role NAME`: the entry point of every child process (hidden from help)."""

from __future__ import annotations

import os
import signal
import sys

import trio

from appliance import privdrop
from appliance.ipc.channel import ProtocolViolation

ROLES = ("cis", "factory", "ocsp", "snmp", "distribution")


def _close_inherited(keep: set[int]) -> None:
    """Close every fd the supervisor did not mean to pass (before any of our own are opened)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def run_role(name: str, fds: dict[str, int], rw: list[str], ro: list[str], uid: int | None, gid: int | None) -> int:
    if name not in ROLES:
        print(f"donjon: unknown role {name!r}", file=sys.stderr)
        return 2
    # No PR_SET_PDEATHSIG: trio forks from a worker thread, and the signal fires when that thread
    # exits. A role notices its supervisor's death as EOF on its link instead, and exits.
    _close_inherited(set(fds.values()))
    # A role has a process group of its own, in the background of the terminal `donjon run` may run
    # in: with `stty tostop` its log lines would stop it (SIGTTOU) instead of being written.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    identity = privdrop.Identity(uid, gid) if uid is not None and gid is not None else None

    def drop() -> None:
        # Everything open now was opened by this role on purpose (its links, trio's wakeup fds,
        # the PKCS#11 module's files): keep it; the inherited ones were closed at start.
        keep = frozenset(int(f) for f in os.listdir("/proc/self/fd"))
        privdrop.drop(privdrop.DropSpec(role=name, identity=identity, keep_fds=keep, rw_paths=tuple(rw),
                                        ro_paths=tuple(ro), network=name == "distribution"))

    if name == "snmp":
        # pysnmp 7 is asyncio-only: this role runs its own asyncio loop, not trio.
        from appliance.snmp.main import run as run_snmp
        try:
            return run_snmp(fds, drop)
        except ProtocolViolation as e:
            print(f"donjon[snmp {os.getpid()}]: protocol violation: {e}", file=sys.stderr, flush=True)
            return 3
    if name == "cis":
        from hsm.cis import main
    elif name == "ocsp":
        from appliance.ocsp.main import main
    elif name == "distribution":
        from appliance.distribution.main import main
    else:
        from appliance.factory.main import main
    try:
        trio.run(main, fds, drop)
    except BaseException as e:  # noqa: BLE001 - classify what ended the role, then exit
        leaves = list(_leaves(e))
        for leaf in leaves:
            if isinstance(leaf, ProtocolViolation):
                # A role that receives a message it does not expect exits: one line, non-zero.
                print(f"donjon[{name} {os.getpid()}]: protocol violation: {leaf}", file=sys.stderr, flush=True)
                return 3
        if all(isinstance(x, KeyboardInterrupt) for x in leaves):
            return 130
        raise
    return 0


def _leaves(e: BaseException):
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from _leaves(sub)
    else:
        yield e

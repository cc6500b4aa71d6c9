"""`donjon role NAME`: the entry of every child process, and the start-up skeleton every role shares."""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from appliance import privdrop
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation
from appliance.roletable import ROLES, RoleSpec


def _log(name: str, msg: str) -> None:
    print(f"donjon[{name} {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _close_inherited(keep: set[int]) -> None:
    """Close every fd the supervisor did not mean to pass (before any of our own are opened)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    """`donjon role NAME --fd LINK=FD ... [--rw P] [--ro P] [--uid N --gid N]` (the supervisor's argv)."""
    ap = argparse.ArgumentParser(prog="donjon role", description="Run one role (started by the supervisor only).")
    ap.add_argument("name")
    ap.add_argument("--fd", action="append", default=[], help="LINK=FD")
    ap.add_argument("--rw", action="append", default=[])
    ap.add_argument("--ro", action="append", default=[])
    ap.add_argument("--uid", type=int)
    ap.add_argument("--gid", type=int)
    a = ap.parse_args(argv)
    fds = {}
    for spec in a.fd:
        link, _, num = spec.partition("=")
        if not num.isdigit():
            ap.error(f"--fd {spec!r}: expected LINK=FD")
        fds[link] = int(num)
    return run_role(a.name, fds, a.rw, a.ro, a.uid, a.gid)


def run_role(name: str, fds: dict[str, int], rw: list[str], ro: list[str], uid: int | None, gid: int | None) -> int:
    spec = ROLES.get(name)
    if spec is None:
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
                                        ro_paths=tuple(ro), network=spec.may_open_sockets))

    module, _, function = spec.entry.partition(":")
    entry = getattr(importlib.import_module(module), function)  # only this role's code is ever imported
    if spec.own_loop:
        try:
            return entry(fds, drop)
        except ProtocolViolation as e:
            _log(name, f"protocol violation: {e}")
            return 3
    try:
        trio.run(entry, fds, drop)
    except BaseException as e:  # noqa: BLE001 - classify what ended the role, then exit
        leaves = list(_leaves(e))
        for leaf in leaves:
            if isinstance(leaf, ProtocolViolation):
                # A role that receives a message it does not expect exits: one line, non-zero.
                _log(name, f"protocol violation: {leaf}")
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


# ---------------------------------------------------------------- the start-up skeleton (trio roles)


@dataclass
class Body:
    """What a role adds to the skeleton; everything but `serve` is optional."""

    serve: Callable[[trio.Nursery], Awaitable[None]]  # the role's work, started once Ready is sent
    connect: Callable[[], Awaitable[None]] | None = None  # after the drop, before Ready: links it needs to serve
    control: Callable[[Any], Awaitable[None]] | None = None  # a supervisor message other than Shutdown
    close: Callable[[], None] | None = None  # after Shutdown, once its work is cancelled


async def config(spec: RoleSpec, fds: dict[str, int]) -> tuple[Channel, Any]:
    """Handshake on the control link and take the configuration message, nothing else."""
    link = spec.control
    sup = Channel.from_fd(fds[link.name], link.name, link.down, accept_fds=link.carries_fds)
    await sup.handshake()
    cfg = await sup.recv()
    if not isinstance(cfg, spec.config):
        raise ProtocolViolation(f"{link.name}: expected {spec.config.__name__}, got {type(cfg).__name__}")
    return sup, cfg


GC_THRESHOLDS = (10000, 50, 50)


def settle_gc() -> None:
    """After setup, every role: what it imported and built (modules, pkilint's validators, profiles) is never
    garbage, so it is frozen out of every later collection, and the youngest generation is collected
    every 10,000 allocations instead of 700. pkilint makes thousands of short-lived objects per
    certificate (document trees with parent links: cycles, so the collector stays on): ≈15% less CIS
    CPU per linted leaf, in the appliance and in-process (alternated A/B), for a few MB more at rest."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(name: str, fds: dict[str, int], drop: Callable[[], None],
                setup: Callable[[Channel, Any], Awaitable[Body]]) -> None:
    """handshake -> config -> setup (imports, privileged resources) -> drop -> connect -> Ready ->
    serve, until Shutdown. Anything else on the control link is a protocol violation."""
    spec = ROLES[name]
    sup, cfg = await config(spec, fds)
    stopped = False
    try:
        body = await setup(sup, cfg)
        settle_gc()
        drop()
        if body.connect is not None:
            await body.connect()
        await sup.send(S.Ready(role=name, pid=os.getpid()))
        async with trio.open_nursery() as n:
            n.start_soon(body.serve, n)
            while True:
                m = await sup.recv()
                if isinstance(m, S.Shutdown):
                    stopped = True
                    n.cancel_scope.cancel()
                    break
                if body.control is None or isinstance(m, (S.Hello, spec.config)):
                    raise ProtocolViolation(f"{spec.control.name}: unexpected {type(m).__name__}")
                await body.control(m)
    finally:
        with trio.CancelScope(shield=True):
            await sup.aclose()
    if stopped:
        if body.close is not None:
            body.close()
        _log(name, "stopped cleanly")

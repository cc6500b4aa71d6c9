"""The SNMP role: handshake on sup-snmp, open the UDP sockets, drop privileges, then serve the
DONJON-MIB from the latest ApplianceStatus and turn each Notify into notifications.

pysnmp 7 is asyncio-only, so this role runs an asyncio loop where the others run trio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from appliance.ipc import schema as S
from appliance.ipc.channel import ProtocolViolation

from .agent import Agent
from .link import Link


def _log(line: str) -> None:
    print(f"donjon[snmp {os.getpid()}]: {line}", file=sys.stderr, flush=True)


async def main(fds: dict[str, int], drop) -> None:
    link = Link(fds["sup-snmp"])
    await link.handshake()
    cfg = await link.recv()
    if not isinstance(cfg, S.SnmpConfig):
        raise ProtocolViolation(f"sup-snmp: expected SnmpConfig, got {type(cfg).__name__}")
    agent = Agent()
    agent.configure(cfg)  # every socket (agent and notifications) is open after this
    await agent.start()
    drop()
    await link.send(S.Ready(role="snmp", pid=os.getpid()))
    pending: set[asyncio.Task] = set()

    def on_error(detail: str) -> None:
        task = asyncio.get_running_loop().create_task(
            link.send(S.Event(kind="snmp-notify-failed", detail=detail[:4096])))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        while True:
            msg = await link.recv()
            if isinstance(msg, S.ApplianceStatus):
                agent.update(msg)
            elif isinstance(msg, S.Notify):
                agent.notify(msg, on_error)
            elif isinstance(msg, S.Shutdown):
                return
            else:  # a second Hello or SnmpConfig
                raise ProtocolViolation(f"sup-snmp: unexpected {type(msg).__name__}")
    finally:
        agent.close()


def run(fds: dict[str, int], drop) -> int:
    """Entry point for the role runner: 0 on Shutdown, 3 on a protocol violation (one log line)."""
    try:
        asyncio.run(main(fds, drop))
    except ProtocolViolation as e:
        _log(f"protocol violation: {e}")
        return 3
    except ValueError as e:  # a configuration the agent cannot use (bad CIDR, unknown user, ...)
        _log(f"bad configuration: {e}")
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


def _dev_drop(fds: dict[str, int]):
    """What appliance.roles does for a role (developer mode: no uid switch)."""
    from appliance import privdrop

    def drop() -> None:
        keep = frozenset(int(f) for f in os.listdir("/proc/self/fd"))
        privdrop.drop(privdrop.DropSpec(role="snmp", identity=None, keep_fds=keep, network=False))
    return drop


if __name__ == "__main__":  # python -m appliance.snmp.main --fd sup-snmp=N  (tests, until roles.py knows "snmp")
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", action="append", default=[], help="LINK=FD")
    ap.add_argument("--no-drop", action="store_true")
    a = ap.parse_args()
    fds = {k: int(v) for k, v in (x.split("=", 1) for x in a.fd)}
    sys.exit(run(fds, (lambda: None) if a.no_drop else _dev_drop(fds)))

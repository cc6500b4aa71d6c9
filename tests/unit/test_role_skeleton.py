"""The role start-up skeleton (appliance.roles.serve) over real socketpairs: its order, and its refusals."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from appliance import roles
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation

FACTORY_CFG = S.FactoryConfig(home="/nonexistent", cipher="chacha20", profiles={}, base_url=None, crl_validity_hours=1,
                              admin_gid=None, dev_uid=None)


async def _run(name: str, cfg, after_ready: list, body_extra: dict | None = None) -> tuple[list[str], BaseException | None]:
    """Run the skeleton for `name` in this process; play the supervisor on the other end of its link.
    `drop` is a stand-in (a fake: dropping privileges would confine the test process itself)."""
    spec = roles.ROLES[name]
    ours, theirs = socket.socketpair()
    steps: list[str] = []

    async def setup(sup, c):
        assert c == cfg
        steps.append("setup")

        async def serve(n):
            steps.append("serve")
            await trio.sleep_forever()

        async def connect():
            steps.append("connect")

        async def control(m):
            steps.append(f"control {type(m).__name__}")
        return roles.Body(serve=serve, connect=connect, close=lambda: steps.append("close"),
                          **({"control": control} if body_extra is None else body_extra))

    def drop():
        steps.append("drop")

    sup = Channel.from_fd(ours.detach(), spec.control.name, spec.control.up)
    error: BaseException | None = None
    async with trio.open_nursery() as n:
        async def role():
            nonlocal error
            try:
                await roles.serve(name, {spec.control.name: theirs.detach()}, drop, setup)
            except BaseException as e:  # noqa: BLE001 - trio wraps it in an ExceptionGroup: keep the leaf
                leaves = [x for x in roles._leaves(e) if isinstance(x, ProtocolViolation)]
                if not leaves:
                    raise
                error = leaves[0]
        n.start_soon(role)
        await sup.handshake()
        await sup.send(cfg)
        ready = await sup.recv()
        assert isinstance(ready, S.Ready) and ready.role == name and ready.pid == os.getpid()
        steps.append("ready")
        for m in after_ready:
            await sup.send(m)
        with trio.fail_after(10):
            while error is None and "close" not in steps:
                await trio.sleep(0.01)
    await sup.aclose()
    return steps, error


def test_the_skeleton_runs_setup_drop_connect_ready_serve_control_then_close():
    steps, error = trio.run(_run, "factory", FACTORY_CFG, [S.OcspStats(requests=1, good=0, revoked=0, unauthorized=0,
                                                                       malformed=0, errors=0, responses_held=0,
                                                                       oldest_this_update=None), S.Shutdown()])
    assert error is None
    # Privileged work before the drop, links the role needs after it, Ready only then.
    assert steps[:4] == ["setup", "drop", "connect", "ready"]
    assert "serve" in steps and steps[-2:] == ["control OcspStats", "close"]


@pytest.mark.parametrize("late", [FACTORY_CFG, S.Hello(link="sup-factory", version=S.VERSION)])
def test_a_second_config_or_hello_after_ready_is_a_protocol_violation(late):
    steps, error = trio.run(_run, "factory", FACTORY_CFG, [late])
    assert isinstance(error, ProtocolViolation) and f"unexpected {type(late).__name__}" in str(error)
    assert "close" not in steps and not any(s.startswith("control") for s in steps)


def test_a_role_without_control_messages_refuses_them():
    cfg = S.DistConfig(rules=[])
    # The Distribution agent takes nothing but Shutdown from the supervisor: a second DistConfig ends it.
    steps, error = trio.run(_run, "distribution", cfg, [cfg], {})
    assert isinstance(error, ProtocolViolation) and "sup-distribution: unexpected DistConfig" in str(error), error

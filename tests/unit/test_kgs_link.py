"""The factory-kgs link's plumbing: calls matched to replies by id, and the recovery rule that needs two officers."""

from __future__ import annotations

import socket

import pytest
import trio

from appliance.factory.errors import FactoryError
from appliance.factory.kgs import KgsLink
from appliance.factory.store import Store
from appliance.ipc import schema as S
from appliance.ipc.calls import Calls
from appliance.ipc.channel import Channel, LinkClosed
from appliance.ipc.links import FACTORY_KGS


def test_calls_match_replies_by_id_and_fail_when_the_link_goes():
    async def main():
        a, b = socket.socketpair()
        up = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(a)), FACTORY_KGS.name, FACTORY_KGS.up)
        down = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(b)), FACTORY_KGS.name, FACTORY_KGS.down)
        calls = Calls(up)
        got = []

        async def peer():
            m = await down.recv()
            assert isinstance(m, S.KgsTakeLetters)
            assert not calls.resolve(S.Ok(id=m.id + 7))  # a reply to no request of ours
            assert calls.resolve(S.KgsLetters(id=m.id, letters=[]))
            assert not calls.resolve(S.KgsLetters(id=m.id, letters=[]))  # a second reply to the same id

        async with trio.open_nursery() as n:
            async def ask():
                got.append(await calls.call(lambda i: S.KgsTakeLetters(id=i, batch="b")))
            n.start_soon(ask)
            await peer()
        assert isinstance(got[0], S.KgsLetters)

        async def waiting():
            with pytest.raises(LinkClosed):
                await calls.call(lambda i: S.KgsTakeLetters(id=i, batch="b"))
        async with trio.open_nursery() as n:
            n.start_soon(waiting)
            await down.recv()
            calls.close()
        with pytest.raises(LinkClosed):
            await calls.call(lambda i: S.KgsTakeLetters(id=i, batch="b"))
        await up.aclose()
        await down.aclose()
    trio.run(main)


@pytest.mark.parametrize("approvers", [None, ["oper"], ["oper", "oper"]])
def test_recovery_needs_two_distinct_officers(approvers):
    """Run outside dual control (no approvers: dual control off or the operation not guarded) or with
    one officer, the recovery is refused before anything is read."""
    link = KgsLink(Store(), issue=None, card_profiles={})  # type: ignore[arg-type] - an inactive CMDB: nothing to read
    req = S.AKgsRecover(id=1, card=1, reason="lost")
    with pytest.raises(FactoryError) as e:
        trio.run(link.recover, req, "officer:oper", approvers)
    assert e.value.code == "policy" and "two officers" in e.value.reason


def test_no_kgs_no_request():
    link = KgsLink(Store(), issue=None, card_profiles={})  # type: ignore[arg-type]
    with pytest.raises(FactoryError) as e:
        trio.run(link.call, lambda i: S.KgsTakeLetters(id=i, batch="b"))
    assert e.value.code == "inactive" and "[kgs] enabled" in e.value.reason

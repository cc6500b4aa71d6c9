"""The gateway's link to the Factory: numbered requests, their replies, a deadline each."""

from __future__ import annotations

from typing import Any, Callable

import trio

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation
from appliance.ipc.links import FACTORY_GATEWAY

DEADLINE = 60.0  # seconds for a Factory answer (issuance waits for the CIS and a durable commit)


class FactoryUnavailable(Exception):
    """No answer: the link is not up yet, or the Factory did not answer in time."""


class FactoryLink:
    def __init__(self) -> None:
        self.chan: Channel | None = None
        self.ready = trio.Event()
        self._ids = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}

    async def run(self, fd: int) -> None:
        """Handshake, then hand each reply to its requester. The link's end (the Factory or the
        supervisor gone) ends the role: the supervisor restarts it with a new link."""
        chan = Channel.from_fd(fd, FACTORY_GATEWAY.name, FACTORY_GATEWAY.down)
        await chan.handshake()
        self.chan = chan
        self.ready.set()
        while True:
            msg = await chan.recv()
            if isinstance(msg, S.Hello):
                raise ProtocolViolation("factory-gateway: second Hello")
            w = self._waiting.pop(msg.id, None)
            if w is not None:  # a reply whose requester gave up is dropped
                w.send_nowait(msg)

    async def request(self, make: Callable[[int], Any], timeout: float = DEADLINE) -> Any:
        """Send make(id) and wait for the reply with that id."""
        if self.chan is None:
            raise FactoryUnavailable("the Factory link is not up")
        self._ids += 1
        rid = self._ids
        send, recv = trio.open_memory_channel(1)
        self._waiting[rid] = send
        try:
            with trio.move_on_after(timeout):
                await self.chan.send(make(rid))
                return await recv.receive()
            raise FactoryUnavailable("the Factory did not answer in time")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise FactoryUnavailable("the Factory link closed") from None
        finally:
            self._waiting.pop(rid, None)

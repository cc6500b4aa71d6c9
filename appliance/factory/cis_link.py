"""The Factory's end of the Factory <-> CIS link: request ids, reply routing, streamed replies."""

from __future__ import annotations

import itertools
import math
from typing import Any

import trio

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation


class CisRefused(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class CisLink:
    def __init__(self, chan: Channel):
        self.chan = chan
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}

    def new_id(self) -> int:
        return next(self._ids)

    async def run(self) -> None:
        """Route every reply to whoever waits for its id; an unknown id is a protocol violation."""
        while True:
            m = await self.chan.recv()
            if isinstance(m, S.Hello):
                raise ProtocolViolation("unexpected Hello from the CIS")
            ch = self._waiting.get(m.id)
            if ch is None:
                raise ProtocolViolation(f"reply for unknown request id {m.id} from the CIS")
            ch.send_nowait(m)

    def open(self, mid: int) -> trio.MemoryReceiveChannel:
        send, recv = trio.open_memory_channel(math.inf)
        self._waiting[mid] = send
        return recv

    def close(self, mid: int) -> None:
        self._waiting.pop(mid, None)

    async def request(self, msg: Any) -> Any:
        recv = self.open(msg.id)
        try:
            await self.chan.send(msg)
            reply = await recv.receive()
        finally:
            self.close(msg.id)
        if isinstance(reply, S.Refused):
            raise CisRefused(reply.code, reply.reason)
        return reply

"""The Factory's end of the Factory <-> CIS link: request ids, reply routing, streamed replies,
a deadline on every reply and a liveness check."""

from __future__ import annotations

import itertools
import math
from typing import Any

import trio

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation

PING_SECONDS = 5.0  # how often an idle link is checked
OUT_FRAMES = 16  # messages queued for the writer; a sender waits (cancellably) beyond that
ABANDONED_MAX = 4096  # request ids given up on whose replies may still come (a stopped CIS resumed)


class CisRefused(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class CisUnresponsive(CisRefused):
    """No reply within the deadline: the CIS is stopped, hung or overloaded (maybe it signed)."""

    def __init__(self, name: str, deadline: float):
        super().__init__("unavailable", f"the CIS ({name}) did not answer in {deadline:g} s: it is unresponsive")


class CisLink:
    def __init__(self, chan: Channel, name: str = "cis", deadline: float = 30.0):
        self.chan = chan
        self.name = name  # the CIS process: "cis", "cis.1", ...
        self.deadline = deadline
        self.responsive = True
        self._changed = trio.Event()  # wakes watch() when a request or a reply flips `responsive`
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._abandoned: dict[int, None] = {}  # insertion-ordered set
        # One writer task sends whole frames: a requester cancelled by its deadline never leaves half
        # a frame on the link (the CIS would read garbage once it runs again).
        self._out_send, self._out_recv = trio.open_memory_channel[Any](OUT_FRAMES)

    def new_id(self) -> int:
        return next(self._ids)

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._write)
            await self._read()

    async def _write(self) -> None:
        async for msg in self._out_recv:
            await self.chan.send(msg)

    async def send(self, msg: Any) -> None:
        """Queue one message for the CIS (whole or not at all, whenever the caller is cancelled)."""
        await self._out_send.send(msg)

    async def _read(self) -> None:
        """Route every reply to whoever waits for its id; an unknown id is a protocol violation,
        except one given up on after its deadline (its reply is late, not forged)."""
        while True:
            m = await self.chan.recv()
            if isinstance(m, S.Hello):
                raise ProtocolViolation("unexpected Hello from the CIS")
            self._set_responsive(True)  # any reply proves it runs again
            ch = self._waiting.get(m.id)
            if ch is None:
                if m.id in self._abandoned:
                    continue
                raise ProtocolViolation(f"reply for unknown request id {m.id} from the CIS")
            ch.send_nowait(m)

    def open(self, mid: int) -> trio.MemoryReceiveChannel:
        send, recv = trio.open_memory_channel(math.inf)
        self._waiting[mid] = send
        return recv

    def close(self, mid: int, answered: bool = True) -> None:
        """Stop routing replies of `mid`; unanswered, its late replies are dropped, not fatal."""
        if self._waiting.pop(mid, None) is not None and not answered:
            self._abandoned[mid] = None
            while len(self._abandoned) > ABANDONED_MAX:
                del self._abandoned[next(iter(self._abandoned))]

    async def receive(self, recv: trio.MemoryReceiveChannel) -> Any:
        """The next reply on an open request, or CisUnresponsive after the deadline."""
        with trio.move_on_after(self.deadline):
            return await recv.receive()
        self._set_responsive(False)
        raise CisUnresponsive(self.name, self.deadline)

    async def request(self, msg: Any) -> Any:
        recv = self.open(msg.id)
        reply = None
        try:
            with trio.move_on_after(self.deadline):
                await self.send(msg)
                reply = await recv.receive()
        finally:
            self.close(msg.id, answered=reply is not None)
        if reply is None:
            self._set_responsive(False)
            raise CisUnresponsive(self.name, self.deadline)
        if isinstance(reply, S.Refused):
            raise CisRefused(reply.code, reply.reason)
        return reply

    def _set_responsive(self, value: bool) -> None:
        if value != self.responsive:
            self.responsive = value
            self._changed.set()

    async def watch(self, on_change) -> None:
        """Ping the CIS every few seconds; `on_change(link)` hears when it stops or starts answering."""
        reported = True
        while True:
            if self.responsive != reported:  # whoever noticed: a request's deadline, a late reply, a ping
                reported = self.responsive
                await on_change(self)
                continue
            with trio.move_on_after(PING_SECONDS):
                await self._changed.wait()
            self._changed = trio.Event()
            if self.responsive == reported:  # a quiet interval: ask
                try:
                    await self.request(S.Ping(id=self.new_id()))
                except CisUnresponsive:
                    pass

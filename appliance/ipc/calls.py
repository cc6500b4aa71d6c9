"""Requests one end of a link sent and awaits by id, for links that carry requests both ways (factory-kgs)."""

from __future__ import annotations

from typing import Any, Callable

import trio

from .channel import Channel, LinkClosed


class Calls:
    """Ids are this end's own (replies to the peer's requests carry the peer's ids and never come here)."""

    def __init__(self, chan: Channel):
        self.chan = chan
        self._next = 1
        self._waiting: dict[int, list[Any]] = {}
        self._events: dict[int, trio.Event] = {}
        self.closed = False

    async def call(self, make: Callable[[int], Any], timeout: float | None = None) -> Any:
        """Send make(id) and return the peer's reply to it (LinkClosed if the link goes first)."""
        if self.closed:
            raise LinkClosed(f"{self.chan.link}: closed")
        rid = self._next
        self._next += 1
        ev = self._events[rid] = trio.Event()
        self._waiting[rid] = []
        try:
            await self.chan.send(make(rid))
            if timeout is None:
                await ev.wait()
            else:
                with trio.fail_after(timeout):
                    await ev.wait()
            if not self._waiting[rid]:
                raise LinkClosed(f"{self.chan.link}: closed before the reply to request {rid}")
            return self._waiting[rid][0]
        finally:
            self._events.pop(rid, None)
            self._waiting.pop(rid, None)

    def resolve(self, reply: Any) -> bool:
        """Deliver a reply; False when no request of ours waits for that id (the caller decides: a violation)."""
        ev = self._events.get(reply.id)
        if ev is None or self._waiting[reply.id]:
            return False
        self._waiting[reply.id].append(reply)
        ev.set()
        return True

    def close(self) -> None:
        """The link went: every waiting call raises LinkClosed."""
        self.closed = True
        for ev in self._events.values():
            ev.set()

"""The sup-snmp link on asyncio: the same framing and checks as appliance.ipc.channel (trio)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from appliance.ipc import schema as S
from appliance.ipc.channel import Frames, LinkClosed, check_hello, encode
from appliance.ipc.links import SUP_SNMP

LINK = SUP_SNMP.name


class Link:
    """Framed messages on the inherited socketpair end; one writer at a time."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self._frames = Frames(LINK, SUP_SNMP.down)
        self._lock = asyncio.Lock()

    async def recv(self) -> Any:
        loop = asyncio.get_running_loop()
        while (m := self._frames.next()) is None:
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise LinkClosed(f"{LINK}: peer closed the link")
            self._frames.feed(chunk)
        return m

    async def send(self, msg: Any) -> None:
        data = encode(msg)
        async with self._lock:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def handshake(self) -> None:
        await self.send(S.Hello(link=LINK, version=S.VERSION))
        check_hello(await self.recv(), LINK)

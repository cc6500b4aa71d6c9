"""The sup-snmp link on asyncio: the same framing and checks as appliance.ipc.channel (trio)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import msgspec

from appliance.ipc import schema as S
from appliance.ipc.channel import LinkClosed, ProtocolViolation, _LEN, check_hello, encode

LINK = "sup-snmp"


class Link:
    """Framed messages on the inherited socketpair end; one writer at a time."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.max = S.MAX_FRAME[LINK]
        self._decoder = msgspec.msgpack.Decoder(S.SupToSnmp)
        self._lock = asyncio.Lock()
        self._buf = bytearray()

    async def _read_exactly(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        while len(self._buf) < n:
            chunk = await loop.sock_recv(self.sock, max(65536, n - len(self._buf)))
            if not chunk:
                raise LinkClosed(f"{LINK}: peer closed the link")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def recv(self) -> Any:
        (length,) = _LEN.unpack(await self._read_exactly(4))
        if length > self.max:  # checked before the body is read
            raise ProtocolViolation(f"{LINK}: frame of {length} bytes exceeds the link maximum {self.max}")
        body = await self._read_exactly(length)
        try:
            return self._decoder.decode(body)
        except (msgspec.MsgspecError, ValueError, TypeError, OverflowError) as e:
            raise ProtocolViolation(f"{LINK}: undecodable frame: {e}") from None

    async def send(self, msg: Any) -> None:
        data = encode(msg)
        async with self._lock:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def handshake(self) -> None:
        await self.send(S.Hello(link=LINK, version=S.VERSION))
        check_hello(await self.recv(), LINK)

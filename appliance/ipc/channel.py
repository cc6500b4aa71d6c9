"""Framing and handshake for every Donjon link: 4-byte big-endian length, then one msgpack message.

The length is checked against the link's maximum before the body is read; a receiver decodes with
its peer's union only. Anything unexpected raises ProtocolViolation, and roles exit on it.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, cast

import msgspec
import trio

from . import links, schema

_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()


class ProtocolViolation(Exception):
    """The peer sent something we do not expect: the caller must close the link (roles exit)."""


class LinkClosed(ProtocolViolation):
    """The peer closed the link."""


class Undecodable(ProtocolViolation):
    """A whole frame that does not decode as the peer's union (the stream stays in step): roles exit on
    it, the admin server answers it with a typed refusal instead (an admin client is not a role)."""

    def __init__(self, message: str, body: bytes, detail: str):
        super().__init__(message)
        self.body = body
        self.detail = detail


def encode(msg: Any) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


class Frames:
    """Sans-IO frame reader shared by every link flavour (trio, blocking, asyncio): feed bytes,
    take whole messages. The length is checked against the link maximum before the body is read."""

    def __init__(self, link: str, incoming: Any):
        self.link = link
        self.max = links.max_frame(link)
        self._decoder = msgspec.msgpack.Decoder(incoming)
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def next(self) -> Any | None:
        """The next message, or None while more bytes are needed."""
        if len(self._buf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self.max:
            raise ProtocolViolation(f"{self.link}: frame of {length} bytes exceeds the link maximum {self.max}")
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[4:4 + length])
        del self._buf[:4 + length]
        try:
            return self._decoder.decode(body)
        # msgspec also raises UnicodeDecodeError, and RecursionError on deeply nested values (a frame of
        # nested one-element arrays): both are the peer's fault, never a crash of the receiver.
        except (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError) as e:
            raise Undecodable(f"{self.link}: undecodable frame: {e}", body, str(e)) from None


class Channel:
    """A trio stream carrying framed messages of one link.

    `incoming` is the union type the peer may send. One writer lock per link: two tasks calling
    send_all on one stream raise BusyResourceError.
    """

    def __init__(self, stream: trio.abc.Stream, link: str, incoming: Any, accept_fds: bool = False):
        self.stream = stream
        self.link = link
        self.max = links.max_frame(link)
        self._frames = Frames(link, incoming)
        self._send_lock = trio.Lock()
        self.accept_fds = accept_fds  # a link that may carry new links (SCM_RIGHTS): supervisor -> Factory
        self._fds: list[int] = []

    @classmethod
    def from_fd(cls, fd: int, link: str, incoming: Any, accept_fds: bool = False) -> "Channel":
        sock = socket.socket(fileno=fd)
        return cls(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), link, incoming, accept_fds)

    async def send_fd(self, msg: Any, fd: int) -> None:
        """Send a message with a file descriptor attached (the NewLink of a restarted role)."""
        data = encode(msg)
        sock = cast(trio.SocketStream, self.stream).socket  # accept_fds links are socketpairs
        async with self._send_lock:
            n = await sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            if n != 1:
                raise ProtocolViolation(f"{self.link}: could not pass a descriptor")
            await self.stream.send_all(data[1:])

    def take_fd(self) -> int:
        """The descriptor that came with the NewLink just received."""
        if not self._fds:
            raise ProtocolViolation(f"{self.link}: a NewLink arrived without its descriptor")
        return self._fds.pop(0)

    def _frame(self, msg: Any) -> bytes:
        """The message's frame, refused if the peer would refuse it (larger than the link's maximum)."""
        data = encode(msg)
        if len(data) - 4 > self.max:
            raise ProtocolViolation(f"{self.link}: refusing to send a {len(data)}-byte frame")
        return data

    async def send(self, msg: Any) -> None:
        data = self._frame(msg)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_many(self, msgs: list[Any]) -> None:
        """Several messages in one write (each its own frame: the peer reads them one by one as ever);
        nothing is written if any of them is refused."""
        frames = [self._frame(m) for m in msgs]
        async with self._send_lock:
            await self.stream.send_all(b"".join(frames))

    async def _receive(self, n: int) -> bytes | bytearray:
        if not self.accept_fds:
            return await self.stream.receive_some(n)
        data, anc, flags, _ = await cast(trio.SocketStream, self.stream).socket.recvmsg(n, socket.CMSG_SPACE(4 * struct.calcsize("i")))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                k = len(payload) // 4
                self._fds.extend(struct.unpack(f"{k}i", payload[:4 * k]))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolViolation(f"{self.link}: too many descriptors in one message")
        return data

    async def recv(self) -> Any:
        while (m := self._frames.next()) is None:
            chunk = await self._receive(65536)
            if not chunk:
                raise LinkClosed(f"{self.link}: peer closed the link")
            self._frames.feed(chunk)
        return m

    async def handshake(self) -> None:
        await self.send(schema.Hello(link=self.link, version=schema.VERSION))  # type: ignore[arg-type]
        hello = await self.recv()
        check_hello(hello, self.link)

    async def aclose(self) -> None:
        await self.stream.aclose()


def check_hello(hello: Any, link: str) -> None:
    if not isinstance(hello, schema.Hello):
        raise ProtocolViolation(f"{link}: expected Hello, got {type(hello).__name__}")
    if hello.link != link or hello.version != schema.VERSION:
        raise ProtocolViolation(f"{link}: handshake mismatch (peer {hello.link} v{hello.version}, ours v{schema.VERSION})")


class SyncChannel:
    """Blocking counterpart for admin clients (CLI, console)."""

    def __init__(self, sock: socket.socket, link: str, incoming: Any):
        self.sock = sock
        self.link = link
        self._frames = Frames(link, incoming)

    def send(self, msg: Any) -> None:
        data = encode(msg)
        if len(data) - 4 > self._frames.max:  # the peer would drop the link on it: say so instead
            raise ProtocolViolation(f"the request is {len(data)} bytes: more than the {self._frames.max >> 20} MiB "
                                    f"the {self.link} link carries")
        self.sock.sendall(data)

    def recv(self) -> Any:
        while (m := self._frames.next()) is None:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise LinkClosed(f"{self.link}: peer closed the link")
            self._frames.feed(chunk)
        return m

    def handshake(self) -> None:
        self.send(schema.Hello(link=self.link, version=schema.VERSION))  # type: ignore[arg-type]
        check_hello(self.recv(), self.link)

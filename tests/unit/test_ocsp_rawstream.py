"""The endpoint's direct socket stream: it still yields, can still be cancelled, and fails as a stream should."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from appliance.ocsp.http import _YIELD_EVERY, _RawStream


def test_a_connection_that_never_waits_still_lets_others_run_and_be_cancelled():
    a, b = socket.socketpair()
    b.sendall(b"x" * 100_000)  # always something to read: no call ever waits
    ticks = []
    reads = [0]

    async def main():
        s = _RawStream(a)

        async def other():
            for _ in range(5):
                ticks.append(reads[0])
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            n.start_soon(other)
            with trio.move_on_after(0) as scope:  # cancelled from the start
                for _ in range(1000):  # bounded
                    await s.receive_some(10)
                    reads[0] += 1
            assert scope.cancelled_caught

    trio.run(main)
    assert reads[0] < _YIELD_EVERY  # the cancellation was seen at the first yield
    a2, b2 = socket.socketpair()
    b2.sendall(b"y" * 100_000)
    ticks.clear()

    async def fair():
        s = _RawStream(a2)
        count = [0]

        async def other():
            for _ in range(3):
                ticks.append(count[0])
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            n.start_soon(other)
            for _ in range(200):
                await s.receive_some(10)
                count[0] += 1

    trio.run(fair)
    # the other task ran while the reader was still reading, a few yields apart
    # (trio runs each ready task once per scheduling batch, in random order: two slices at most between ticks)
    assert ticks[-1] < 200 and all(y - x <= 2 * _YIELD_EVERY for x, y in zip(ticks, ticks[1:]))
    for s in (a, b, a2, b2):
        s.close()


def test_end_of_stream_reset_and_close_behave_as_a_stream():
    async def main():
        a, b = socket.socketpair()
        s = _RawStream(a)
        b.sendall(b"hello")
        b.close()
        assert await s.receive_some(100) == b"hello"
        assert await s.receive_some(100) == b""  # the peer closed: end of stream
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # bounded: the first sends may still be buffered
                await s.send_all(b"z" * 65536)
        await s.aclose()
        await s.aclose()  # idempotent

        c, d = socket.socketpair()
        s2 = _RawStream(c)
        woken = []

        async def reader():
            try:
                await s2.receive_some(10)
            except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
                woken.append(type(e).__name__)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await s2.aclose()  # a waiter is woken, not left on a reused fd number
        assert woken
        d.close()

        # A large answer to a slow reader: send_all waits for room and delivers every byte.
        e, f = socket.socketpair()
        s3 = _RawStream(e)
        payload = bytes(range(256)) * 4096  # 1 MiB
        got = bytearray()

        async def slow_reader():
            f.setblocking(False)
            while len(got) < len(payload):
                await trio.lowlevel.wait_readable(f)
                got.extend(f.recv(7000))

        async with trio.open_nursery() as n:
            n.start_soon(slow_reader)
            await s3.send_all(payload)
        assert bytes(got) == payload
        await s3.aclose()
        f.close()

    trio.run(main)


def test_reads_and_writes_that_do_not_wait():
    async def main():
        a, b = socket.socketpair()
        s = _RawStream(a)
        assert s.receive_now(100) is None  # nothing yet: no wait, and the next receive_some waits first
        late = []

        async def writer():
            await trio.sleep(0.05)
            late.append(b.send(b"later"))

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            assert await s.receive_some(100) == b"later" and late  # it waited for the data, then read it
        b.sendall(b"now")
        assert s.receive_now(100) == b"now"
        assert s.send_now(b"answer") == 6 and b.recv(100) == b"answer"
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = sum(s.send_now(b"x" * 65536) for _ in range(64))  # a reader that does not read: takes what fits
        assert 0 < sent < 64 * 65536 and s.send_now(b"x" * 65536) == 0
        b.close()  # with our bytes unread: a reset, which a read reports as a broken stream
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                s.send_now(b"z" * 65536)
        with pytest.raises(trio.BrokenResourceError):
            s.receive_now(100)
        await s.aclose()
        c, d = socket.socketpair()
        s2 = _RawStream(c)
        d.close()
        assert s2.receive_now(100) == b""  # end of stream
        await s2.aclose()

    trio.run(main)

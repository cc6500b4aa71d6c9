"""Framing and decoding: every byte string a peer can send either decodes to a message of the
link's union or raises ProtocolViolation; nothing else escapes."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.ipc import links
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation, encode


def _recv_all(data: bytes, union=S.FactoryToCis, link="factory-cis"):
    async def go():
        a, b = trio.testing.memory_stream_pair()
        ch = Channel(b, link, union)
        await a.send_all(data)
        await a.aclose()
        out = []
        try:
            while True:
                out.append(await ch.recv())
        except ProtocolViolation as e:
            return out, e
    return trio.run(go)


def test_round_trip_of_every_request():
    msgs = [
        S.Hello(link="factory-cis", version=S.VERSION),
        S.Activate(id=1, pin="1234", wrapped_db_key=None),
        S.Issue(id=2, ca="issuing", self_signed=False, items=[S.IssueItem(
            profile="tls-server", spki=b"\x30\x00", subject=(("CN", "x"),), sans=(("dns", "x.example"),),
            serial=b"\x7f" * 16, validity=S.Validity(1, 2))]),
        S.CrlBegin(id=3, ca="issuing", crl_number=1, this_update=1, next_update=2, entry_count=1, entries_length=40),
        S.CrlEntries(id=3, entries=[(b"\x01", 1, 1, None)]),
        S.CrlEnd(id=3),
    ]
    out, err = _recv_all(b"".join(encode(m) for m in msgs))
    assert out == msgs and "closed" in str(err)


def test_oversize_frame_is_refused_before_reading():
    out, err = _recv_all(struct.pack(">I", links.max_frame("factory-cis") + 1))
    assert out == [] and "exceeds" in str(err)


def test_other_links_messages_are_refused():
    out, err = _recv_all(encode(S.AStatus(id=1)))
    assert out == [] and "undecodable" in str(err)


def test_extra_or_missing_fields_are_refused():
    import msgspec
    raw = msgspec.msgpack.encode({"t": "ping", "id": 1, "extra": 2})
    out, err = _recv_all(struct.pack(">I", len(raw)) + raw)
    assert out == [] and "undecodable" in str(err)
    raw = msgspec.msgpack.encode({"t": "ping"})
    out, err = _recv_all(struct.pack(">I", len(raw)) + raw)
    assert out == [] and "undecodable" in str(err)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_frames_only_raise_protocol_violation(body):
    _recv_all(struct.pack(">I", len(body)) + body)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_frames_only_raise_protocol_violation(data):
    frame = bytearray(encode(S.CrlEntries(id=3, entries=[(b"\x01\x02", 1, 1, 5), (b"\x03", 2, None, None)])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(4, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    _recv_all(bytes(frame))


def test_a_new_link_travels_with_its_descriptor():
    import os
    import socket

    async def go():
        a, b = socket.socketpair()
        sup = Channel.from_fd(a.detach(), "sup-factory", S.FactoryToSup)
        fac = Channel.from_fd(b.detach(), "sup-factory", S.SupToFactory, accept_fds=True)
        r, w = os.pipe()
        await sup.send_fd(S.NewLink(link="factory-ocsp"), r)
        os.close(r)
        m = await fac.recv()
        assert isinstance(m, S.NewLink)
        fd = fac.take_fd()
        os.write(w, b"ping")
        assert os.read(fd, 4) == b"ping"
        os.close(fd)
        os.close(w)
        with pytest.raises(ProtocolViolation):
            fac.take_fd()  # one descriptor per NewLink, no more
        await sup.aclose()
        await fac.aclose()
    trio.run(go)


def test_a_list_request_never_asks_for_more_than_its_reply_may_hold():
    """cert-list's limit once allowed 100,000 while its reply holds 10,000: a CA past 10,000 certificates
    answered `cert list --limit 20000` with an internal error (found by the kill -9 torture's check)."""
    import typing

    import msgspec

    from appliance.ipc import schema as S

    def bound(cls, field: str, key: str) -> int:
        hint = typing.get_type_hints(cls, include_extras=True)[field]
        for h in (hint, *typing.get_args(hint)):
            for meta in getattr(h, "__metadata__", ()):
                if isinstance(meta, msgspec.Meta) and getattr(meta, key) is not None:
                    return getattr(meta, key)
        raise AssertionError(f"{cls.__name__}.{field} has no {key}")
    assert bound(S.ACertList, "limit", "le") <= bound(S.CertListReply, "certs", "max_length")

"""The admin-request table: a row for every admin request, and the check that says so can fail."""

from __future__ import annotations

import typing

import msgspec
import pytest

from appliance.factory import admin
from appliance.ipc import schema as S


def test_every_admin_request_has_a_row_and_the_check_can_fail():
    assert admin.missing_rows() == set()
    assert set(admin.TABLE) == set(typing.get_args(S.AdminRequest)) - {S.Hello}  # no row for a type outside the union
    # A request type of the union without a row is reported (a new request added to the schema alone).
    partial = {t: r for t, r in admin.TABLE.items() if t is not S.ARevoke}
    assert admin.missing_rows(S.AdminRequest, partial) == {S.ARevoke}


def test_rows_are_consistent():
    for cls, row in admin.TABLE.items():
        name = cls.__name__
        if row.reply is admin.STREAM:  # a stream has no single result to file and run later
            assert row.guard is None and not row.session_bound, name
        if row.session_bound:
            assert row.guard is None, name
        if row.self_service:
            assert "name" in cls.__struct_fields__, name
        if row.guard == "revoke-ca":
            assert {"ca", "serial"} <= set(cls.__struct_fields__), name
        assert row.allowed is admin.PUBLIC or row.allowed <= set(admin.ROLES), name


def test_every_typed_reply_has_a_row_and_every_row_a_reply_of_the_admin_union():
    typed = set(typing.get_args(S.TypedReply))
    used = {row.reply for row in admin.TABLE.values()}
    assert typed <= used, f"typed replies no row answers with: {typed - used}"
    assert used <= set(typing.get_args(S.AdminReply)), "a row answers with a type the client cannot decode"


def test_documents_become_strict_typed_replies_and_back():
    revoke = {"ca": "issuing", "serial": "1f2e", "revoked_at": 1700000000, "reason": 1, "was_on_hold": False}
    r = admin.as_reply(S.RevokeReply, revoke)
    wire = msgspec.msgpack.encode(admin.reply_message(7, r))
    back = msgspec.msgpack.decode(wire, type=S.AdminReply)
    assert isinstance(back, S.RevokeReply) and back.id == 7 and back.serial == "1f2e"
    assert admin._plain(back) == revoke  # the document every face read before, key for key
    # An optional field left out stays out (resume has no token), a None that is part of the shape stays.
    login = admin._plain(admin.as_reply(S.LoginReply, {"officer": "alice", "roles": ["operator"]}))
    assert login == {"officer": "alice", "roles": ["operator"]}
    cert = {"ca": "issuing", "serial": "0a", "profile": "tls-server", "subject": "CN=x", "not_before": 1, "not_after": 2,
            "issued_at": 1, "revoked_at": None, "reason": None, "pem": "-----BEGIN CERTIFICATE-----"}
    assert admin._plain(admin.as_reply(S.CertReply, cert)) == cert
    # A shape the table does not promise is the Factory's error, not a reply: extra key, wrong type, bad value.
    for bad in ({**revoke, "extra": 1}, {**revoke, "reason": "keyCompromise"}, {**revoke, "serial": "0x1F"}):
        with pytest.raises(msgspec.ValidationError):
            admin.as_reply(S.RevokeReply, bad)
    with pytest.raises(TypeError):
        admin.as_reply(S.Reply, r)
    # The client decodes strictly too: a reply with a field it does not know is refused.
    forged = msgspec.msgpack.encode({**msgspec.to_builtins(back), "extra": 1})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(forged, type=S.AdminReply)

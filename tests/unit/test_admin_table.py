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
    # FiledReply answers any guarded row until its M-th approval (admin.serve), on no row of its own.
    assert typed <= used | {S.FiledReply}, f"typed replies no row answers with: {typed - used}"
    assert used | {S.FiledReply} <= set(typing.get_args(S.AdminReply)), "a row answers with a type the client cannot decode"


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


CP = {"type": "checkpoint", "seq": 12, "head": "ab" * 32, "time": 1700000000, "tbs": "AAA=", "signature": "BBB=",
      "alg": "ecdsa-with-SHA256"}
TENANT = {"name": "other", "ca": "CN=Other CA", "crl_urls": ["http://127.0.0.1:9/other.crl"], "refresh_seconds": 3600,
          "unissued": "unknown", "push": False, "key_label": None, "responder": None, "crl_number": None,
          "crl_this_update": None, "crl_next_update": None, "crl_source": None, "stale": False, "issued_serials": False,
          "last_refusal": None}
# The documents the handlers build, as the faces read them (key for key, nulls kept, absent keys absent).
DOCS = [
    (S.StatusReply, {"activated": False, "token": "", "stats": {"issued": 0, "refused": 0, "revoked": 0, "crls": 0}, "pending": 0,
                     "cis": {"cis": "responsive", "cis.1": "unresponsive"}}),
    (S.StatusReply, {"activated": True, "token": "donjon", "stats": {"issued": 3, "refused": 0, "revoked": 1, "crls": 2},
                     "pending": 0, "cis": {"cis": "responsive"}, "cas": ["root", "issuing"], "certificates": 5, "revoked": 1,
                     "audit_records": 40, "audit_head": "cd" * 32, "audit_checkpoint": None}),
    (S.StatusReply, {"activated": True, "token": "t", "stats": {}, "pending": 2, "cis": {}, "cas": [], "certificates": 0,
                     "revoked": 0, "audit_records": 0, "audit_head": None, "distribution": {"ldap": {"backlog": 3, "failing": True}},
                     "audit_checkpoint": {"seq": 3, "head": "ef" * 32, "time": 1700000000}}),
    (S.ActivateReply, {"activated": True, "token": "donjon", "voided_intents": 2}),
    (S.CheckpointReply, CP),
    (S.ReconcileReply, {"voided": [{"seq": 9, "ts": 1700000000, "object": "issuing/1f", "detail": "possibly signed"}]}),
    (S.DistStatusReply, {"destinations": [{"rule": "ldap", "url": "ldap://127.0.0.1:389", "configured": True, "pending": 1,
                                           "parked": 0, "oldest_pending_age": None, "in_flight": 0, "failing": False,
                                           "consecutive_failures": 0, "last_success": None, "last_error": None,
                                           "last_error_at": None, "retry_in": 0.0}],
                         "agent": True, "tenant_fetches": []}),
    (S.OcspStatusReply, {"endpoint_connected": False, "endpoints": [], "cas": [{"ca": "issuing", "responses": 4, "revoked": 1,
                         "oldest_this_update": 1, "earliest_next_update": 2, "next_refresh": None, "queued": 0, "lapsed": False}],
                         "endpoint": None, "tenant_crls": {"tenants": 0, "accepted": 0, "refused": 0}}),
    (S.FiledReply, {"pending": 4, "operation": "ca-create", "summary": "ca-create name=x", "approvals": 1, "required": 2,
                    "expires": 1700000000}),
    (S.PendingListReply, {"pending": [{"id": 4, "operation": "officer", "summary": "officer-add name=bob", "requester": "alice",
                                       "created": 1, "expires": 2, "state": "done", "approvals": ["alice", "carol"], "required": 2,
                                       "result": {"name": "bob", "roles": ["operator"]}}]}),
    (S.ApproveReply, {"request": 4, "approvals": 1, "required": 2, "executed": False}),
    (S.TenantListReply, {"tenants": [TENANT]}),
    (S.TenantReply, {**TENANT, "responder_nocheck": None}),
    (S.TenantReply, {"removed": "other"}),
    (S.TenantReply, {"tenant": "other", "serials": None}),
    (S.CeremonyReply, {"ceremony_seq": 5, "hash": "01" * 32, "window_start": 4}),
    (S.CeremonyReply, {"records": [{"seq": 6, "hash": "02" * 32, "action": "ca-create", "object": "x", "outcome": "ok",
                                    "officer": None}]}),
    (S.CeremonyReply, {"record": {"seq": 7, "ts": 1, "actor": "officer:alice", "action": "ceremony", "object": "m", "outcome": "ok",
                                  "detail": "d", "prev": "03" * 32, "hash": "04" * 32}, "checkpoint": CP, "audit_cert": "PEM"}),
]


@pytest.mark.parametrize("cls, doc", DOCS)
def test_every_family_reads_back_as_the_document_it_was(cls, doc):
    wire = msgspec.msgpack.encode(admin.reply_message(3, admin.as_reply(cls, doc)))
    back = msgspec.msgpack.decode(wire, type=S.AdminReply)
    assert type(back) is cls and admin._plain(back) == doc


def test_no_row_answers_with_an_untyped_document():
    assert [t.__name__ for t, row in admin.TABLE.items() if row.reply is S.Reply] == []

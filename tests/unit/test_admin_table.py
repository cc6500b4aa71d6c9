"""The admin-request table: a row for every admin request, and the check that says so can fail."""

from __future__ import annotations

import typing

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

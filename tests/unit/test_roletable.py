"""The role table is the one place the supervisor, the role entry and privdrop read role facts from."""

from __future__ import annotations

import dataclasses
import socket
import typing

import pytest

from appliance import config as C
from appliance import privdrop, roletable
from appliance.ipc import links
from appliance.ipc import schema as S
from appliance.roletable import ROLES, Launch, RoleSpec
from appliance.supervisor import Supervisor


def _members(union) -> set[type]:
    return set(typing.get_args(union))


def test_links_match_the_hello_link_names_and_carry_their_limits():
    assert set(typing.get_args(S.LinkName)) == set(links.LINKS)
    for link in links.LINKS.values():
        assert S.Hello in _members(link.down) and S.Hello in _members(link.up), link.name
        assert 0 < link.max_frame <= 16 * 1024 * 1024, link.name
    assert links.max_frame("factory-ocsp") == 16 * 1024 * 1024 and links.max_frame("sup-cis") == 256 * 1024
    with pytest.raises(KeyError):
        links.max_frame("gateway-nowhere")


def test_every_role_entry_is_complete_and_consistent():
    users = [r.user for r in ROLES.values()]
    assert len(set(users)) == len(users)
    assert privdrop.ROLE_USERS == {r.name: r.user for r in ROLES.values()}
    for spec in ROLES.values():
        # The control link brings its config message and Shutdown down, Ready and events up.
        assert spec.config in _members(spec.control.down) and S.Shutdown in _members(spec.control.down), spec.name
        assert S.Ready in _members(spec.control.up) and S.Event in _members(spec.control.up), spec.name
        assert spec.control is links.LINKS[spec.control.name] and (spec.feed is None or spec.feed is links.LINKS[spec.feed.name])
        module, _, function = spec.entry.partition(":")
        assert module and function, spec.entry
    assert {r.name for r in ROLES.values() if r.restart == "fatal"} == {"cis", "factory"}
    # seccomp: socket() for the two roles that connect out (publication; ACME/CMP validation traffic) alone
    assert {r.name for r in ROLES.values() if r.may_open_sockets} == {"distribution", "gateway"}
    # Stop order: the Factory's clients first, then the Factory (it closes the CMDB), then the CIS.
    assert [r.name for r in sorted(ROLES.values(), key=lambda r: r.stop_order)] == ["ocsp", "gateway", "distribution", "kgs", "snmp", "factory", "cis"]


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(str(tmp_path), C.Config(hsm=C.Hsm(module="/usr/lib/softhsm/libsofthsm2.so", signers=2),
                                             ocsp=C.Ocsp(workers=2), snmp=C.Snmp(enabled=True)))
    sup.profiles = {}
    sup.snmp_config = C.snmp_config(str(tmp_path), sup.cfg)  # as prepare() reads it
    return sup


def _links(sup: Supervisor, admin, listen):
    sup.listen = listen  # as run() keeps it for restarts
    roles, keep = sup._roles(admin, listen)
    try:
        return {name: (set(r.fds), r.rw, type(r.config).__name__) for name, r in roles.items()}
    finally:
        for s in keep + list(sup._sup_ends.values()):
            s.close()


def test_the_supervisor_builds_every_link_from_the_table(supervisor):
    admin, listen = socket.socket(socket.AF_UNIX), socket.socket()
    try:
        got = _links(supervisor, admin, listen)
    finally:
        admin.close()
        listen.close()
    assert got["factory"][0] == {"sup-factory", "admin", "factory-cis", "factory-cis.1", "factory-ocsp", "factory-ocsp.1",
                                 "factory-distribution"}
    assert got["cis.1"][0] == {"sup-cis", "factory-cis"} and got["cis.1"][2] == "CisConfig"
    assert got["ocsp.1"][0] == {"sup-ocsp", "factory-ocsp", "listen"} and got["ocsp.1"][1][0].endswith("/ocsp.1")
    assert got["distribution"][0] == {"sup-distribution", "factory-distribution"}
    assert got["snmp"][0] == {"sup-snmp"} and got["snmp"][2] == "SnmpConfig"
    assert set(got) == {"cis", "cis.1", "factory", "ocsp", "ocsp.1", "distribution", "snmp"}
    # The init ceremony has no admin socket and no endpoint: no endpoint processes, no feeds for them.
    ceremony = _links(supervisor, None, None)
    assert "ocsp" not in ceremony and ceremony["factory"][0] == {"sup-factory", "factory-cis", "factory-cis.1",
                                                                 "factory-distribution"}


def test_a_new_role_is_one_table_entry(supervisor, monkeypatch):
    """What the next role (the gateway) will be: a RoleSpec, its package and its messages; the
    supervisor makes its links and the Factory's end of its feed, privdrop knows its user."""
    probe = RoleSpec("probe", "appliance.probe.main:main", "donjon-probe", links.SUP_DIST, S.DistConfig,
                     restart="backoff", network="none", processes=lambda h: 1,
                     launch=lambda h, name: Launch(S.DistConfig(rules=[]), rw=("/nonexistent/probe",)),
                     feed=links.FACTORY_DIST)
    monkeypatch.setitem(ROLES, "probe", probe)
    monkeypatch.setattr(supervisor, "dist_enabled", lambda: False)
    got = _links(supervisor, None, None)
    assert got["probe"] == ({"sup-distribution", "factory-distribution"}, ["/nonexistent/probe"], "DistConfig")
    assert "factory-distribution" in got["factory"][0]
    with pytest.raises(ValueError, match="unknown role"):  # no user for a role the table does not have
        privdrop.ensure_role_users(["no-such-role"])


def test_role_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ROLES["cis"].restart = "backoff"  # type: ignore[misc]
    assert roletable.role("cis.3") is ROLES["cis"]

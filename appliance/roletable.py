"""The role table (OpenBSD's procs[]): every fact about a role, read by the supervisor, the role entry and privdrop."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

import msgspec

from appliance.ipc import links as L
from appliance.ipc import schema as S

if TYPE_CHECKING:
    from appliance import config as C

Restart = Literal["fatal", "backoff"]
Network = Literal["none", "inbound", "outbound"]


class Host(Protocol):
    """What the supervisor knows when it starts a role (the table's functions read it, never write it)."""

    cfg: C.Config
    appliance: bool  # started as root: per-role users
    admin_gid: int | None
    profiles: dict
    dist_rules: list[S.DistRule]
    ocsp_pin: str | None
    listen: Any  # the endpoint's listening socket (None during the init ceremony: no endpoint then)
    auto_activate: bool  # an AutoActivate follows the Factory's configuration (run with a PIN file)
    snmp_config: S.SnmpConfig | None  # when SNMP is enabled

    @property
    def layout(self) -> Any: ...

    def dist_enabled(self) -> bool: ...


@dataclass(frozen=True)
class Launch:
    """One process of a role: its configuration message and what its sandbox lets it reach."""

    config: msgspec.Struct
    rw: tuple[str, ...] = ()  # Landlock: read/write beneath these
    ro: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RoleSpec:
    name: str
    entry: str  # "module:function", imported only in the role process: async main(fds, drop), or run(fds, drop) -> int
    user: str  # its system user in appliance mode
    control: L.LinkSpec  # with the supervisor: Hello, the config message, Ready, events, Shutdown
    config: type  # the configuration message, the first after Hello on the control link
    restart: Restart  # fatal: its death stops the appliance; backoff: restarted, throttled if it dies early
    network: Network  # none and inbound (inherited or pre-opened sockets): socket() is denied after the drop
    processes: Callable[[Host], int]  # how many to run (0: not at all): "name", "name.1", ...
    launch: Callable[[Host, str], Launch]  # the config message and sandbox of the process named so
    feed: L.LinkSpec | None = None  # its link with the Factory (the supervisor makes both ends)
    inherits: tuple[str, ...] = ()  # sockets the supervisor opened for it, passed as fds of these names
    own_loop: bool = False  # entry is run(fds, drop) -> int on its own event loop (pysnmp is asyncio-only)
    stop_order: int = 0  # lower stops first on Shutdown: the Factory's clients, the Factory, then the CIS

    @property
    def may_open_sockets(self) -> bool:
        """The seccomp filter allows socket() other than AF_UNIX only to roles that reach out."""
        return self.network == "outbound"

    def process_names(self, host: Host) -> list[str]:
        return [self.name if i == 0 else f"{self.name}.{i}" for i in range(self.processes(host))]


def _module_dir(h: Host) -> str:
    return os.path.dirname(os.path.realpath(h.cfg.hsm.module))


def _cis(h: Host, name: str) -> Launch:
    embedded = h.cfg.hsm.embedded
    return Launch(
        S.CisConfig(module=h.cfg.hsm.module, token_label=h.cfg.hsm.token,
                    softhsm_conf=h.layout.softhsm_conf if embedded else None,
                    profiles=h.profiles, base_url=h.cfg.endpoint.base_url),
        rw=(h.layout.softhsm,) if embedded else (), ro=(_module_dir(h), "/etc/softhsm"),
        env=(("SOFTHSM2_CONF", h.layout.softhsm_conf),) if embedded else ())


def _factory(h: Host, name: str) -> Launch:
    from appliance import config as C

    cfg = h.cfg
    return Launch(
        S.FactoryConfig(home=h.layout.cmdb, cipher=cfg.cmdb.cipher, standby=cfg.cmdb.standby, profiles=h.profiles,
                        base_url=cfg.endpoint.base_url, crl_validity_hours=cfg.crl.validity_hours,
                        admin_gid=h.admin_gid, dev_uid=None if h.appliance else os.getuid(),
                        ocsp_validity_hours=cfg.ocsp.validity_hours, ocsp_hashes=cfg.ocsp.hashes,
                        responder_days=cfg.ocsp.responder_days, responder_renew_days=cfg.ocsp.responder_renew_days,
                        dist_rules=[msgspec.structs.replace(r, secret=None) for r in h.dist_rules],
                        dist_max_attempts=cfg.distribution.max_attempts, dist_backoff_max=cfg.distribution.backoff_max,
                        ca_profiles={k: tuple(v) for k, v in cfg.ca_profiles.items()}, auto_activate=h.auto_activate,
                        cis_deadline_seconds=cfg.hsm.deadline_seconds, **C.officer_settings(cfg)),
        rw=(h.layout.cmdb,))


def _ocsp(h: Host, name: str) -> Launch:
    o = h.cfg.ocsp
    embedded = h.cfg.hsm.embedded and h.ocsp_pin is not None
    conf = os.path.join(h.layout.ocsp_token, "softhsm2.conf")
    return Launch(
        S.OcspConfig(store_dir=h.layout.ocsp_store(name), max_connections=o.max_connections, read_timeout=o.read_timeout,
                     max_age=o.max_age, max_per_source=o.max_connections_per_source, head_timeout=o.head_timeout,
                     token_module=h.cfg.hsm.module if embedded else None, token_pin=h.ocsp_pin if embedded else None,
                     softhsm_conf=conf if embedded else None, unissued_default=o.unissued, unissued=dict(o.unissued_by_ca)),
        rw=(h.layout.ocsp_store(name),) + ((h.layout.ocsp_token,) if h.cfg.hsm.embedded else ()),
        ro=(_module_dir(h), "/etc/softhsm") if h.cfg.hsm.embedded else (),
        env=(("SOFTHSM2_CONF", conf),) if h.cfg.hsm.embedded else ())


def _distribution(h: Host, name: str) -> Launch:
    # Outbound only: name resolution files (the system trust store comes with every role).
    return Launch(S.DistConfig(rules=h.dist_rules),
                  ro=("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf"))


def _snmp(h: Host, name: str) -> Launch:
    # Read at prepare(), its secrets from their 0600 files; the agent opens its UDP sockets itself, before its drop.
    if h.snmp_config is None:
        raise ValueError("the SNMP agent's configuration is read by prepare()")
    return Launch(h.snmp_config)


ROLES: dict[str, RoleSpec] = {r.name: r for r in (
    RoleSpec("cis", "hsm.cis:main", "donjon-cis", L.SUP_CIS, S.CisConfig, restart="fatal", network="none",
             processes=lambda h: h.cfg.hsm.signers, launch=_cis, feed=L.FACTORY_CIS, stop_order=4),
    RoleSpec("factory", "appliance.factory.main:main", "donjon-factory", L.SUP_FACTORY, S.FactoryConfig,
             restart="fatal", network="none", processes=lambda h: 1, launch=_factory, inherits=("admin",), stop_order=3),
    RoleSpec("ocsp", "appliance.ocsp.main:main", "donjon-ocsp", L.SUP_OCSP, S.OcspConfig, restart="backoff",
             network="inbound", processes=lambda h: h.cfg.ocsp.workers if h.cfg.ocsp.enabled and h.listen is not None else 0, launch=_ocsp,
             feed=L.FACTORY_OCSP, inherits=("listen",), stop_order=0),
    RoleSpec("distribution", "appliance.distribution.main:main", "donjon-dist", L.SUP_DIST, S.DistConfig,
             restart="backoff", network="outbound", processes=lambda h: 1 if h.dist_enabled() else 0,
             launch=_distribution, feed=L.FACTORY_DIST, stop_order=1),
    RoleSpec("snmp", "appliance.snmp.main:run", "donjon-snmp", L.SUP_SNMP, S.SnmpConfig, restart="backoff",
             network="inbound", processes=lambda h: 1 if h.cfg.snmp.enabled else 0, launch=_snmp, own_loop=True, stop_order=2),
)}


def role(process: str) -> RoleSpec:
    """The spec of a process name ("cis.1" is a CIS); KeyError for an unknown role."""
    return ROLES[process.split(".")[0]]

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
    gateway_listen: Any  # the gateway's HTTPS listening socket (None when it does not run)
    gateway_pin: str | None  # the PIN of the gateway's own token (embedded mode)
    kgs_pin: str | None  # the KGS's own token's PIN (when the KGS is enabled)
    card_profiles: dict[str, str]

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
                    profiles=h.profiles, base_url=h.cfg.endpoint.base_url, crl_shards=dict(h.cfg.crl.shards),
                    crl_delta=tuple(sorted(h.cfg.crl.delta))),
        rw=(h.layout.softhsm,) if embedded else (), ro=(_module_dir(h), "/etc/softhsm"),
        env=(("SOFTHSM2_CONF", h.layout.softhsm_conf),) if embedded else ())


def _factory(h: Host, name: str) -> Launch:
    from appliance import config as C

    cfg = h.cfg
    return Launch(
        S.FactoryConfig(home=h.layout.cmdb, cipher=cfg.cmdb.cipher, standby=cfg.cmdb.standby, profiles=h.profiles,
                        base_url=cfg.endpoint.base_url, crl_validity_hours=cfg.crl.validity_hours,
                        crl_shards=dict(cfg.crl.shards), crl_delta=dict(cfg.crl.delta),
                        admin_gid=h.admin_gid, dev_uid=None if h.appliance else os.getuid(),
                        ocsp_validity_hours=cfg.ocsp.validity_hours, ocsp_hashes=cfg.ocsp.hashes,
                        responder_days=cfg.ocsp.responder_days, responder_renew_days=cfg.ocsp.responder_renew_days,
                        dist_rules=[msgspec.structs.replace(r, secret=None) for r in h.dist_rules],
                        dist_max_attempts=cfg.distribution.max_attempts, dist_backoff_max=cfg.distribution.backoff_max,
                        ca_profiles={k: tuple(v) for k, v in cfg.ca_profiles.items()}, auto_activate=h.auto_activate,
                        cis_deadline_seconds=cfg.hsm.deadline_seconds, card_profiles=dict(h.card_profiles),
                        calendar_warn_remaining=cfg.crl.calendar_warn_remaining, calendar_warn_hours=cfg.crl.calendar_warn_hours,
                        **C.officer_settings(cfg), **_gateway_policy(h)),
        rw=(h.layout.cmdb,),
        # TEST MODE ONLY: a simulated clock for the CRL calendar (appliance/factory/tier.py test_clock), from the harness.
        env=tuple((k, os.environ[k]) for k in ("DONJON_TEST_CLOCK_FILE",) if k in os.environ))


def _gateway_policy(h: Host) -> dict:
    """What the Factory checks again of every gateway enrolment (FactoryConfig fields)."""
    g = h.cfg.gateway
    if not g.enabled:
        return {}
    pairs = [(p.profile, p.ca) for p in g.acme.profile] if "acme" in g.protocols else []
    if "acme" in g.protocols and not g.acme.profile:
        pairs.append(("tls-server", g.tls_ca or ""))
    return {"gateway_profiles": tuple(dict.fromkeys(pairs)), "gateway_name_patterns": tuple(g.acme.name_patterns),
            "gateway_tls_names": tuple(g.tls_names)}


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


def _gateway(h: Host, name: str) -> Launch:
    g = h.cfg.gateway
    embedded = h.cfg.hsm.embedded and h.gateway_pin is not None
    conf = os.path.join(h.layout.gateway_token, "softhsm2.conf")
    host, _, port = g.listen.rpartition(":")
    bound = h.gateway_listen.getsockname()[1] if h.gateway_listen is not None else port
    # Clients reach it by the listen address when that is a name of its certificate, else by the first name.
    lhost = host.strip("[]")
    shown = lhost if lhost in g.tls_names else g.tls_names[0]
    base = g.base_url or f"https://{'[' + shown + ']' if ':' in shown else shown}:{bound}"
    a = g.acme
    profiles = [S.AcmeProfile(name=p.name, profile=p.profile, ca=p.ca, description=p.description) for p in a.profile] \
        or [S.AcmeProfile(name="default", profile="tls-server", ca=g.tls_ca, description="TLS server (tls-server)")]
    acme = S.AcmeSettings(
        profiles=profiles, default_profile=a.default_profile or profiles[0].name, eab_required=a.eab_required,
        name_patterns=tuple(a.name_patterns), order_lifetime=a.order_lifetime, authz_lifetime=a.authz_lifetime,
        orders_per_hour=a.orders_per_hour, new_accounts_per_hour=a.new_accounts_per_hour, max_open_orders=a.max_open_orders,
        resolver=a.resolver, http01_port=a.http01_port, tlsalpn01_port=a.tlsalpn01_port, renewal_fraction=a.renewal_fraction)
    # Outbound for validation only: name resolution files when no resolver of its own is configured.
    resolv = () if a.resolver else ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf")
    return Launch(
        S.GatewayConfig(store_dir=h.layout.gateway, base_url=base.rstrip("/"), protocols=tuple(g.protocols),
                        tls_names=tuple(g.tls_names), tls_ca=g.tls_ca, validation_networks=tuple(g.validation_networks),
                        max_connections=g.max_connections, max_per_source=g.max_connections_per_source,
                        head_timeout=g.head_timeout, read_timeout=g.read_timeout,
                        token_module=h.cfg.hsm.module if embedded else None, token_pin=h.gateway_pin if embedded else None,
                        softhsm_conf=conf if embedded else None, acme=acme if "acme" in g.protocols else None,
                        estscep=S.EstScepSettings(ca=g.estscep.ca, est_channel_binding=g.estscep.est_channel_binding,
                                                  est_key_types=tuple(g.estscep.est_key_types),
                                                  scep_allow_des=g.estscep.scep_allow_des,
                                                  scep_allow_weak_digest=g.estscep.scep_allow_weak_digest)
                        if {"est", "scep"} & set(g.protocols) else None),
        rw=(h.layout.gateway,) + ((h.layout.gateway_token,) if embedded else ()),
        ro=((_module_dir(h), "/etc/softhsm") if embedded else ()) + resolv,
        env=(("SOFTHSM2_CONF", conf),) if embedded else ())


def _kgs(h: Host, name: str) -> Launch:
    # Its own token folder (archival and sealing keys; with SoftHSM2 also the reader's "cards": one
    # SoftHSM2 configuration per process) and its spool of PIN letters; the card module read-only.
    if h.kgs_pin is None:
        raise ValueError("the KGS token is made by prepare()")
    L = h.layout
    conf = os.path.join(L.kgs_token, "softhsm2.conf")
    card_module = h.cfg.kgs.card_module or h.cfg.hsm.module
    return Launch(
        S.KgsConfig(card_module=card_module, hsm_module=h.cfg.hsm.module, hsm_label="donjon-kgs", hsm_pin=h.kgs_pin,
                    softhsm_conf=conf, card_profiles=dict(h.card_profiles), profiles=h.profiles, spool=L.kgs_spool),
        rw=(L.kgs_token, L.kgs_spool), ro=(_module_dir(h), os.path.dirname(os.path.realpath(card_module)), "/etc/softhsm"),
        env=(("SOFTHSM2_CONF", conf),))


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
    # Inbound HTTPS (the listener the supervisor opened) and outbound for challenge validation only,
    # to the networks its configuration allows (checked in the role before every connection).
    RoleSpec("gateway", "appliance.gateway.main:main", "donjon-gateway", L.SUP_GATEWAY, S.GatewayConfig,
             restart="backoff", network="outbound",
             processes=lambda h: 1 if h.cfg.gateway.enabled and h.gateway_listen is not None else 0, launch=_gateway,
             feed=L.FACTORY_GATEWAY, inherits=("gateway-listen",), stop_order=0),
    RoleSpec("kgs", "appliance.kgs.main:main", "donjon-kgs", L.SUP_KGS, S.KgsConfig, restart="backoff", network="none",
             processes=lambda h: 1 if h.cfg.kgs.enabled and h.kgs_pin is not None else 0, launch=_kgs, feed=L.FACTORY_KGS, stop_order=1),
)}


def role(process: str) -> RoleSpec:
    """The spec of a process name ("cis.1" is a CIS); KeyError for an unknown role."""
    return ROLES[process.split(".")[0]]

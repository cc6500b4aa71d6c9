"""The supervisor: creates every link with socketpair(), starts the roles, watches and stops them.

It holds the configuration and the listening sockets it opens for the children, never reads them,
and never touches PKCS#11 or the CMDB. If the CIS or the Factory dies, it stops everything and exits
non-zero (the service manager restarts the appliance).
"""

from __future__ import annotations

import errno
import grp
import hmac
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from appliance import config as C
from appliance import clock, privdrop, safefs
from appliance.ceremonyspec import CeremonySpec
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation
from appliance.roletable import ROLES, Launch, RoleSpec

# Seconds for the roles to be ready at a start. A software-emulated machine (an image booted without
# KVM) imports far slower: the image's units raise it with DONJON_START_TIMEOUT (10 to 3600).
_start_env = os.environ.get("DONJON_START_TIMEOUT", "")
START_TIMEOUT = min(max(int(_start_env), 10), 3600) if _start_env.isdigit() else 60
STOP_TIMEOUT = 20
THROTTLE_AFTER = 10.0  # a role that dies sooner than this after starting backs off exponentially
MAX_BACKOFF = 60.0
STATUS_SECONDS = 5
DISK_LOW = 0.10  # notify when less than this fraction of the state folder's filesystem is free


def log(msg: str) -> None:
    print(f"donjon[supervisor {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class SupervisorError(Exception):
    pass


@dataclass
class Layout:
    """Where each role's state lives under DONJON_HOME (one folder per owner, so uids separate them)."""

    home: str

    @property
    def cmdb(self) -> str:
        return os.path.join(self.home, "cmdb")

    @property
    def softhsm(self) -> str:
        return os.path.join(self.home, "softhsm")

    @property
    def softhsm_conf(self) -> str:
        return os.path.join(self.softhsm, "softhsm2.conf")

    def ocsp_store(self, role: str) -> str:
        """Each endpoint process has its own store: HOME/ocsp, HOME/ocsp.1, ..."""
        return os.path.join(self.home, role)

    @property
    def ocsp_token(self) -> str:
        return os.path.join(self.home, "ocsp-token")

    @property
    def gateway(self) -> str:
        return os.path.join(self.home, "gateway")

    @property
    def gateway_token(self) -> str:
        return os.path.join(self.home, "gateway-token")

    @property
    def gateway_file(self) -> str:
        return os.path.join(self.run, "gateway")

    @property
    def kgs_token(self) -> str:
        return os.path.join(self.home, "kgs-token")

    @property
    def kgs_spool(self) -> str:
        return os.path.join(self.home, "kgs-spool")

    @property
    def endpoint_file(self) -> str:
        return os.path.join(self.run, "endpoint")

    @property
    def run(self) -> str:
        return os.path.join(self.home, "run")

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.run, "admin.sock")


def role_argv(name: str) -> list[str]:
    """Re-execute this same program as a role (frozen bundle or source tree)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "role", name]
    return [sys.executable, "-m", "appliance.entry", "role", name]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment: nothing inherited but what a role needs (no LD_LIBRARY_PATH from a bundle)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    for k in ("PYTHONPATH", "COVERAGE_PROCESS_START", "DONJON_TEST_CLOCK"):
        if k in os.environ:
            env[k] = os.environ[k]
    if extra:
        env.update(extra)
    return env


@dataclass
class Role:
    name: str  # "factory", "cis", "cis.1", ...: the CIS runs as several signing processes
    fds: dict[str, int]  # link -> fd number in the child (same as ours: pass_fds keeps numbers)
    rw: list[str] = field(default_factory=list)
    ro: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: trio.Process | None = None
    chan: Channel | None = None
    restarts: int = 0
    backoff: float = 0.5
    config: msgspec.Struct | None = None  # sent after the handshake (the role table's launch())

    @property
    def kind(self) -> str:
        return self.name.split(".")[0]

    @property
    def spec(self) -> RoleSpec:
        return ROLES[self.kind]


class Supervisor:
    def __init__(self, home: str, cfg: C.Config):
        self.home = os.path.abspath(home)
        self.layout = Layout(self.home)
        self.cfg = cfg
        self.appliance = os.geteuid() == 0
        self.ids: dict[str, privdrop.Identity] = {}
        self.admin_gid: int | None = None
        self.failed: str | None = None
        self.events: list[S.Event] = []
        self._event = trio.Event()
        self.stopping = False
        self.ocsp_stats: S.OcspStats | None = None
        self._ocsp_stats: dict[str, S.OcspStats] = {}
        self.roles: dict[str, Role] = {}
        self.factory_status: S.StatusReport | None = None
        self.tokens: dict[str, bool] = {}
        self.unresponsive: set[str] = set()  # CIS processes the Factory reports silent past their deadline
        self.ocsp_pin: str | None = None
        self.kgs_pin: str | None = None
        self.card_profiles: dict[str, str] = {}
        self._disk_low = False
        self.listen: socket.socket | None = None
        self.gateway_listen: socket.socket | None = None
        self.gateway_pin: str | None = None
        self.gateway_stats: S.GatewayStats | None = None
        self.dist_rules: list[S.DistRule] = []
        self.auto_activate = False  # the Factory is told an AutoActivate follows (run with a PIN file)
        self.snmp_config: S.SnmpConfig | None = None

    # ------------------------------------------------------------ preparation

    def prepare(self) -> None:
        L = self.layout
        if not os.path.isdir(self.home):
            raise SupervisorError(f"{self.home} does not exist (run `donjon init --home {self.home} --ceremony FILE`)")
        from appliance import restore
        if restore.promote_pending(self.home):  # the CMDB folder is half-switched: never open or create a CMDB there
            raise SupervisorError("a standby promote was interrupted: run `donjon standby promote` again to finish it")
        # Configuration errors first: a refused configuration leaves nothing behind.
        self.dist_rules = C.dist_rules(self.home, self.cfg, with_secrets=True)  # ConfigError names the rule
        if self.cfg.snmp.enabled:
            self.snmp_config = C.snmp_config(self.home, self.cfg)  # secrets from their 0600 files
        os.makedirs(L.cmdb, mode=0o700, exist_ok=True)
        os.makedirs(L.run, mode=0o750, exist_ok=True)
        for name in self._endpoint_names():
            os.makedirs(L.ocsp_store(name), mode=0o700, exist_ok=True)
        if self.cfg.gateway.enabled:
            os.makedirs(L.gateway, mode=0o700, exist_ok=True)
        if self.appliance:
            self.ids = privdrop.ensure_role_users(ROLES)  # every role's user, whether it runs now or not
            self.admin_gid = grp.getgrnam(privdrop.ADMIN_GROUP).gr_gid
            os.chmod(self.home, 0o711)
        _protect_config(self.home, self.admin_gid)
        # HOME's own entries are root's (HOME is 0711): below them, a role's folder is the role's to
        # fill with links, so everything there goes through fds that never follow one (safefs).
        home_fd = safefs.open_root(self.home)
        try:
            if self.cfg.hsm.embedded and self.cfg.ocsp.enabled:
                self.ocsp_pin = _ensure_softhsm_token(home_fd, L.ocsp_token, "donjon-ocsp", self.ids.get("ocsp"))
            if self.cfg.hsm.embedded and self.cfg.gateway.enabled:  # its TLS key, made the endpoint's way
                self.gateway_pin = _ensure_softhsm_token(home_fd, L.gateway_token, "donjon-gateway", self.ids.get("gateway"))
            if self.cfg.kgs.enabled:
                # The KGS's own token (archival key, sealing key; in tests its reader's "cards" too): its own PIN.
                os.makedirs(L.kgs_spool, mode=0o700, exist_ok=True)
                self.kgs_pin = _ensure_softhsm_token(home_fd, L.kgs_token, "donjon-kgs", self.ids.get("kgs"))
            if self.appliance:
                _hand_over(home_fd, "cmdb", self.ids["factory"])
                for name in self._endpoint_names():
                    _hand_over(home_fd, name, self.ids["ocsp"])
                _hand_over(home_fd, "ocsp-token", self.ids["ocsp"], must_exist=False)
                if self.cfg.gateway.enabled:
                    _hand_over(home_fd, "gateway", self.ids["gateway"])
                    _hand_over(home_fd, "gateway-token", self.ids["gateway"], must_exist=False)
                _hand_over(home_fd, "kgs-token", self.ids["kgs"], must_exist=False)
                _hand_over(home_fd, "kgs-spool", self.ids["kgs"], must_exist=False)
                if self.cfg.hsm.embedded:
                    _hand_over(home_fd, "softhsm", self.ids["cis"], must_exist=False)
                os.chown(L.run, 0, self.admin_gid)
                os.chmod(L.run, 0o750)
            elif self.cfg.hsm.embedded:
                _fix_mode(home_fd, "softhsm", 0o700)  # installs made before 0700 was enforced
        finally:
            os.close(home_fd)

    def keep_ca_pin_from_endpoint(self, ca_pin: str | None) -> None:
        """Each token has its own PIN: the CA token's reaches the CIS and nothing else, even when the
        endpoint's folder holds it (the role could only have stolen or guessed it)."""
        if ca_pin is not None and self.ocsp_pin is not None and hmac.compare_digest(ca_pin.encode(), self.ocsp_pin.encode()):
            log("the endpoint's token PIN is the CA token's PIN: not handed to the endpoint (no live signing)")
            self.ocsp_pin = None
        if ca_pin is not None and self.gateway_pin is not None and hmac.compare_digest(ca_pin.encode(), self.gateway_pin.encode()):
            log("the gateway's token PIN is the CA token's PIN: not handed to the gateway (it does not start)")
            self.gateway_pin = None
        if ca_pin is not None and self.kgs_pin is not None and hmac.compare_digest(ca_pin.encode(), self.kgs_pin.encode()):
            log("the KGS token's PIN is the CA token's PIN: not handed to the KGS (it does not start)")
            self.kgs_pin = None

    def dist_enabled(self) -> bool:
        """The agent runs when there is something to publish, or CRL-fed tenants may need fetching
        (tenants live in the CMDB and come and go at run time: whenever the endpoint runs)."""
        return bool(self.dist_rules) or self.cfg.ocsp.enabled

    def _endpoint_names(self) -> list[str]:
        if not self.cfg.ocsp.enabled:
            return []
        return ["ocsp"] + [f"ocsp.{i}" for i in range(1, self.cfg.ocsp.workers)]

    def open_endpoint_socket(self) -> socket.socket:
        """The OCSP/CRL HTTP listener: opened here, handed to the OCSP role, never read by us."""
        host, _, port = self.cfg.ocsp.listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        # No SO_REUSEPORT: the endpoint's workers share this one socket, and with it a second
        # appliance on the same port would silently split the traffic (and serve another CA's CRLs).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            s.listen(1024)
        except OSError as e:
            s.close()
            why = "the port is already in use (another Donjon or another server?)" if e.errno == errno.EADDRINUSE else e.strerror
            raise SupervisorError(f"cannot listen on {self.cfg.ocsp.listen} (ocsp.listen): {why}") from None
        except ValueError as e:
            s.close()
            raise SupervisorError(f"cannot listen on {self.cfg.ocsp.listen} (ocsp.listen): {e}") from None
        bound = s.getsockname()
        with open(self.layout.endpoint_file, "w", encoding="utf-8") as f:
            f.write(f"http://{'[' + bound[0] + ']' if family == socket.AF_INET6 else bound[0]}:{bound[1]}\n")
        return s

    def open_gateway_socket(self) -> socket.socket:
        """The gateway's HTTPS listener: opened here, handed to the gateway role, never read by us."""
        g = self.cfg.gateway.listen
        host, _, port = g.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            s.listen(1024)
        except (OSError, ValueError) as e:
            s.close()
            why = "the port is already in use" if getattr(e, "errno", None) == errno.EADDRINUSE else (getattr(e, "strerror", None) or str(e))
            raise SupervisorError(f"cannot listen on {g} (gateway.listen): {why}") from None
        bound = s.getsockname()
        with open(self.layout.gateway_file, "w", encoding="utf-8") as f:
            f.write(f"https://{'[' + bound[0] + ']' if family == socket.AF_INET6 else bound[0]}:{bound[1]}\n")
        return s

    def open_admin_socket(self) -> socket.socket:
        path = self.layout.admin_socket
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                    raise SupervisorError(f"another Donjon is already running on {self.home}")
                except (ConnectionRefusedError, FileNotFoundError):
                    os.unlink(path)
                finally:
                    probe.close()
        except FileNotFoundError:
            pass
        # Bound and listening under a temporary name, then renamed into place: a client never finds
        # the socket before it accepts (between bind and listen a connect is refused, and the client
        # would say "not running" to a script started right after `donjon run`).
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(tmp)
            if self.appliance:
                os.chown(tmp, 0, self.admin_gid)
                os.chmod(tmp, 0o660)
            else:
                os.chmod(tmp, 0o600)
            s.listen(64)
            os.rename(tmp, path)
        except BaseException:
            s.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return s

    # ------------------------------------------------------------ roles

    def _roles(self, admin: socket.socket | None, listen: socket.socket | None) -> tuple[dict[str, Role], list[socket.socket]]:
        """Every link is a socketpair made here, as the role table says; the graph (supervisor-each
        role, Factory-each role with a feed) is enforced by construction: no role can open a path to
        reach another."""
        keep: list[socket.socket] = []

        def pair():
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            keep.extend([a, b])
            return a, b
        inherited = {"admin": admin, "listen": listen, "gateway-listen": self.gateway_listen}
        roles: dict[str, Role] = {}
        self._sup_ends = {}
        fac_fds: dict[str, int] = {}  # the Factory's ends of every feed: factory-cis, factory-cis.1, factory-ocsp, ...
        for spec in ROLES.values():
            for name in spec.process_names(self):
                sup_end, role_end = pair()
                fds = {spec.control.name: role_end.fileno()}
                if spec.feed is not None:
                    fac_end, role_fac = pair()
                    fds[spec.feed.name] = role_fac.fileno()
                    fac_fds[spec.feed.name + name[len(spec.name):]] = fac_end.fileno()
                fds.update({k: inherited[k].fileno() for k in spec.inherits if inherited.get(k) is not None})
                roles[name] = self._role(name, fds)
                self._sup_ends[name] = sup_end
        roles["factory"].fds.update(fac_fds)
        return roles, keep

    def _role(self, name: str, fds: dict[str, int]) -> Role:
        launch: Launch = ROLES[name.split(".")[0]].launch(self, name)
        return Role(name, fds, rw=list(launch.rw), ro=list(launch.ro), env=dict(launch.env), config=launch.config)

    async def _start(self, role: Role) -> None:
        argv = role_argv(role.kind)
        for link, fd in role.fds.items():
            argv += ["--fd", f"{link}={fd}"]
        for p in role.rw:
            argv += ["--rw", p]
        for p in role.ro:
            argv += ["--ro", p]
        ident = self.ids.get(role.kind)
        if ident is not None:
            argv += ["--uid", str(ident.uid), "--gid", str(ident.gid)]
        role.proc = await trio.lowlevel.open_process(
            argv, pass_fds=list(role.fds.values()), env=child_env(role.env), stdin=subprocess_devnull(),
            # Its own process group: Ctrl-C at the terminal reaches the supervisor only, which
            # then stops the roles in order (a role killed by the same SIGINT broke its links).
            process_group=0)
        sock = self._sup_ends[role.name]
        link = role.spec.control
        role.chan = Channel.from_fd(os.dup(sock.fileno()), link.name, link.up)
        sock.close()

    async def _wait_ready(self, role: Role) -> None:
        await role.chan.handshake()
        await role.chan.send(role.config)
        m = await role.chan.recv()
        if not isinstance(m, S.Ready):
            raise ProtocolViolation(f"{role.name}: expected Ready, got {type(m).__name__}")
        log(f"{role.name} ready (pid {m.pid})")

    async def _listen(self, role: Role) -> None:
        try:
            while True:
                m = await role.chan.recv()
                if not isinstance(m, (S.Event, S.OcspStats, S.StatusReport, S.ConfigSet, S.GatewayStats)):
                    raise ProtocolViolation(f"unexpected {type(m).__name__}")
                if isinstance(m, S.ConfigSet):
                    if role.kind != "factory":
                        raise ProtocolViolation("a settings change from a role other than the Factory")
                    if m.key == clock.CLOCK_KEY:  # the clock helper may take seconds to start: not on the event loop
                        await role.chan.send(await trio.to_thread.run_sync(self._config_set, m))
                    else:
                        await role.chan.send(self._config_set(m))
                    continue
                if isinstance(m, S.StatusReport):
                    self.factory_status = m
                    continue
                if isinstance(m, S.GatewayStats):
                    if role.kind != "gateway":
                        raise ProtocolViolation("gateway statistics from another role")
                    self.gateway_stats = m
                    continue
                if isinstance(m, S.OcspStats):
                    self._ocsp_stats[role.name] = m
                    self.ocsp_stats = m = _sum_stats(list(self._ocsp_stats.values()))
                    factory = self.roles.get("factory")
                    if factory is not None and factory.chan is not None and not self.stopping:
                        await factory.chan.send(m)  # the admin API (Factory) answers `donjon ocsp status`
                    continue
                log(f"event from {role.name}: {m.kind}: {m.detail}")
                if m.kind in ("token-unavailable", "token-recovered"):
                    self.tokens[m.detail] = m.kind == "token-recovered"
                    await self.notify(m.kind, m.detail, f"reported by {role.name}")
                elif m.kind == "destination-failing" and role.kind == "factory":
                    await self.notify("destination-failing", m.detail.split(":")[0], m.detail)
                elif m.kind == "activated" and role.kind == "factory":
                    await self.notify("activated", "appliance", m.detail)
                elif m.kind == "activated" and role.kind == "cis":
                    self.tokens.setdefault(self.cfg.hsm.token, True)
                elif m.kind in ("cis-unresponsive", "cis-responsive") and role.kind == "factory":
                    # The Factory pings each CIS: a stopped or hung one shows in status and SNMP.
                    if m.kind == "cis-unresponsive":
                        self.unresponsive.add(m.detail)
                        await self.notify("role-unresponsive", m.detail, "no answer to the Factory within its deadline")
                    else:
                        self.unresponsive.discard(m.detail)
                elif m.kind == "shutdown-requested" and role.kind == "factory":
                    # An officer asked (audited by the Factory): stop exactly as an operator's SIGTERM does.
                    os.kill(os.getpid(), signal.SIGTERM)
                elif m.kind == "responder-renewal-failed" and role.kind == "factory":
                    await self.notify("responder-cert-expiring", m.detail.split(":")[0], m.detail)
                elif m.kind == "crl-calendar-low" and role.kind == "factory":
                    # An offline root's calendar runs short or its current CRL nears nextUpdate (appliance/factory/tier.py).
                    await self.notify("crl-lapsed" if "lapsed" in m.detail else "crl-expiring", m.detail.split(":")[0], m.detail)
                elif m.kind == "login-lockout" and role.kind == "factory":
                    await self.notify("login-lockout", m.detail.split()[1] if len(m.detail.split()) > 1 else "officer", m.detail)
                self.events.append(m)
                self._event.set()
                self._event = trio.Event()
        except ProtocolViolation as e:
            if self.failed is None and not self.stopping:
                log(f"{role.name}: {e}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            # A role that died resets its link (its watcher reports the death); while stopping it is normal.
            if self.failed is None and not self.stopping:
                log(f"{role.name}: link lost: {e}")

    def _config_set(self, m: S.ConfigSet) -> S.ConfigSetDone:
        """Write one setting for the Factory (which checked the officer and audits the answer); validated
        here again, whole file included: a compromised Factory gets no more than an administrator could."""
        if m.key == clock.CLOCK_KEY:  # setting the time: dual control and audit done by the Factory; checked here again
            try:
                msg = clock.set_clock(clock.check_epoch(m.value))
            except (ValueError, OSError) as e:
                return S.ConfigSetDone(id=m.id, message=f"the clock was not set: {e}"[:4000], ok=False)
            log(f"clock: {msg}")
            return S.ConfigSetDone(id=m.id, message=msg, ok=True)
        if m.key.startswith("ssh-key:"):  # an officer's SSH key (checked and audited by the Factory; checked here again)
            try:
                msg = clock.write_ssh_key(self.home, m.key.removeprefix("ssh-key:"), m.value or None)
            except (ValueError, OSError) as e:
                return S.ConfigSetDone(id=m.id, message=f"the SSH key was not written: {e}"[:4000], ok=False)
            log(f"ssh keys: {msg}")
            return S.ConfigSetDone(id=m.id, message=msg, ok=True)
        try:
            msg = C.write_setting(self.home, m.key, m.value)
        except C.ConfigError as e:
            return S.ConfigSetDone(id=m.id, message=str(e)[:4000], ok=False)
        log(f"settings: {msg}")
        return S.ConfigSetDone(id=m.id, message=msg, ok=True)

    async def wait_event(self, *kinds: str) -> S.Event:
        while True:
            for ev in self.events:
                if ev.kind in kinds:
                    self.events.remove(ev)
                    return ev
            await self._event.wait()

    async def _watch(self, role: Role, nursery: trio.Nursery) -> None:
        """CIS or Factory death stops the appliance; a stateless role is restarted with backoff,
        throttled (Postfix-style) when it dies soon after starting."""
        while True:
            started = trio.current_time()
            rc = await role.proc.wait()
            if self.stopping:
                return
            if role.spec.restart == "fatal":
                self.failed = f"{role.name} exited with status {rc}"
                with trio.move_on_after(2):
                    await self.notify("role-died", role.name, f"exit status {rc}: the appliance stops")
                log(f"{self.failed}: stopping the appliance")
                nursery.cancel_scope.cancel()
                return
            role.restarts += 1
            quick = trio.current_time() - started < THROTTLE_AFTER
            role.backoff = min(MAX_BACKOFF, role.backoff * 2) if quick else 1.0
            log(f"{role.name} exited with status {rc}: restart #{role.restarts} in {role.backoff:.0f}s")
            await self.notify("role-died", role.name, f"exit status {rc}; restart #{role.restarts} in {role.backoff:.0f}s")
            await trio.sleep(role.backoff)
            if self.stopping:
                return
            try:
                await self._restart(role, nursery)
            except (ProtocolViolation, trio.TooSlowError, OSError) as e:
                log(f"{role.name} restart failed: {e}")  # its process is watched again just below
                if role.proc.returncode is None:
                    role.proc.kill()

    async def _restart(self, role: Role, nursery: trio.Nursery) -> None:
        """New links for the role (the Factory gets its end of the endpoint's feed link by SCM_RIGHTS)."""
        sup_end, role_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine = [role_end]
        try:
            spec = role.spec
            role.fds = {spec.control.name: role_end.fileno()}
            if spec.feed is not None:
                fac_end, role_fac = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                mine += [fac_end, role_fac]
                role.fds[spec.feed.name] = role_fac.fileno()
                await self.roles["factory"].chan.send_fd(S.NewLink(link=spec.feed.name, role=role.name), fac_end.fileno())
            if "listen" in spec.inherits:
                role.fds["listen"] = self.listen.fileno()
            if "gateway-listen" in spec.inherits:
                role.fds["gateway-listen"] = self.gateway_listen.fileno()
            self._sup_ends[role.name] = sup_end
            await self._start(role)
        finally:
            for sk in mine:
                sk.close()
        with trio.fail_after(START_TIMEOUT):
            await self._wait_ready(role)
        nursery.start_soon(self._listen, role)
        log(f"{role.name} restarted")
        await self.notify("role-restarted", role.name, f"restart #{role.restarts}")

    # ------------------------------------------------------------ operator notifications (SNMP)

    async def notify(self, kind: str, subject: str, detail: str) -> None:
        """Hand an operator-facing event to the SNMP agent, if it runs (and always to the log)."""
        log(f"notify {kind} {subject}: {detail}")
        snmp = self.roles.get("snmp")
        if snmp is None or snmp.chan is None or snmp.proc is None or snmp.proc.returncode is not None:
            return
        try:
            await snmp.chan.send(S.Notify(kind=kind, subject=subject[:255], detail=detail[:4000]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def appliance_status(self) -> S.ApplianceStatus:
        fs = self.factory_status
        roles = []
        for r in self.roles.values():
            alive = r.proc is not None and r.proc.returncode is None
            state = "running" if alive else ("restarting" if r.spec.restart == "backoff" and not self.stopping else "stopped")
            if alive and r.name in self.unresponsive:
                state = "unresponsive"
            roles.append(S.RoleState(name=r.name, state=state, restarts=r.restarts, pid=r.proc.pid if r.proc else 0))
        return S.ApplianceStatus(
            activated=bool(fs and fs.activated), roles=roles,
            tokens=[S.TokenState(label=k, available=v) for k, v in sorted(self.tokens.items())],
            cas=list(fs.cas) if fs else [], ocsp=self.ocsp_stats,
            oldest_response_age=fs.oldest_response_age if fs else None, destinations=[],
            audit_records=fs.audit_records if fs else 0, audit_checkpoint=fs.audit_checkpoint if fs else None,
            gateway=_gateway_counters(self.gateway_stats))

    async def watch_deadlines(self) -> None:
        """Every few seconds: push the status to the SNMP agent, and warn once per CRL and CA
        certificate when it comes within the lead time of lapsing, and again when it lapses."""
        warned: set[tuple] = set()
        lead = self.cfg.snmp.lead_time_hours * 3600
        while True:
            snmp = self.roles.get("snmp")
            if snmp is not None and snmp.chan is not None and snmp.proc is not None and snmp.proc.returncode is None:
                try:
                    await snmp.chan.send(self.appliance_status())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            fs = self.factory_status
            now = int(time.time())
            for ca in fs.cas if fs else []:
                if ca.crl_next_update is not None:
                    for kind, when in (("crl-lapsed", ca.crl_next_update), ("crl-expiring", ca.crl_next_update - lead)):
                        key = (kind, ca.name, ca.crl_number)
                        if now >= when and key not in warned:
                            warned.add(key)
                            await self.notify(kind, ca.name, f"CRL #{ca.crl_number} nextUpdate {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ca.crl_next_update))}")
                            break
                key = ("ca-cert-expiring", ca.name, ca.not_after)
                if now >= ca.not_after - max(lead, 30 * 86400) and key not in warned:
                    warned.add(key)
                    await self.notify("ca-cert-expiring", ca.name, f"notAfter {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ca.not_after))}")
            # Pre-produced OCSP responses are re-signed at half validity: one near its nextUpdate
            # means the CA cannot sign (not activated, token gone), and relying parties will soon fail.
            nu = fs.ocsp_earliest_next_update if fs else None
            if nu is not None:
                ocsp_lead = min(lead, self.cfg.ocsp.validity_hours * 3600 // 4)
                for kind, when in (("ocsp-lapsed", nu), ("ocsp-expiring", nu - ocsp_lead)):
                    key = (kind, nu)
                    if now >= when and key not in warned:
                        warned.add(key)
                        await self.notify(kind, "ocsp", f"earliest nextUpdate {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(nu))}")
                        break
            try:
                st = os.statvfs(self.home)
                free = st.f_bavail / st.f_blocks if st.f_blocks else 1.0
            except OSError:
                free = 1.0
            low = free < DISK_LOW
            if low and not self._disk_low:
                await self.notify("disk-nearly-full", self.home, f"{free:.1%} free")
            self._disk_low = low
            await trio.sleep(STATUS_SECONDS)

    # ------------------------------------------------------------ main

    async def run(self, ceremony: CeremonySpec | None = None, pin: str | None = None, on_ready=None,
                  recover: S.RecoverKeys | None = None, restore_check: S.CheckRestoreOfficers | None = None) -> int:
        """Serve until a signal; with `ceremony` (donjon init), `recover` (donjon keys recover) or
        `restore_check` (donjon restore's dual control) do that one job with no admin socket and no
        listener, then stop."""
        self.stopping = False
        one_job = ceremony is not None or recover is not None or restore_check is not None
        self.auto_activate = not one_job and pin is not None
        self.prepare()
        self.keep_ca_pin_from_endpoint(pin)
        self.profiles = C.profile_overrides(self.home, self.cfg)
        C.check_ca_profiles(self.home, self.cfg, self.profiles)
        self.card_profiles = C.card_profiles(self.home, self.cfg, self.profiles)
        admin = self.open_admin_socket() if not one_job else None
        try:
            listen = self.open_endpoint_socket() if not one_job and self.cfg.ocsp.enabled else None
            if not one_job and self.cfg.gateway.enabled and self.gateway_pin is not None:  # its token holds its TLS key
                self.gateway_listen = self.open_gateway_socket()
            elif not one_job and self.cfg.gateway.enabled:
                log("the gateway does not start: it needs a token of its own for its TLS key (hsm.embedded = true)")
        except BaseException:  # e.g. the port is taken: leave no admin socket behind that answers nothing
            if admin is not None:
                admin.close()
                os.unlink(self.layout.admin_socket)
            raise
        self.listen = listen  # kept (never read) so that a restarted endpoint gets the same listener
        roles, keep = self._roles(admin, listen)
        self.roles = roles
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as n:
                    for role in roles.values():
                        await self._start(role)
                    for s in keep:
                        s.close()
                    if admin is not None:
                        admin.close()  # the Factory owns it now
                    for role in roles.values():
                        n.start_soon(self._watch, role, n)
                    with trio.fail_after(START_TIMEOUT):
                        async with trio.open_nursery() as ready:  # they handshake with each other too
                            for role in roles.values():
                                ready.start_soon(self._wait_ready, role)
                    for role in roles.values():
                        n.start_soon(self._listen, role)
                    async def do_one_job(role: str, msg: Any, done: str, failed: str, detail_always: bool) -> int:
                        """A run for one job (init's ceremony, a key recovery, a restore's officer check): send
                        it, wait for its outcome event, stop; the event's detail is what the caller prints."""
                        await roles[role].chan.send(msg)
                        ev = await self.wait_event(done, failed)
                        result = 0 if ev.kind == done else 2
                        if result or detail_always:
                            self.failed = ev.detail
                        await self._stop(roles)
                        n.cancel_scope.cancel()
                        return result
                    if ceremony is not None:
                        return await do_one_job("factory", S.Ceremony(pin=pin, spec=msgspec.msgpack.encode(ceremony),
                                                                   officers=list(getattr(self, "init_officers", []))),
                                             "ceremony-done", "ceremony-failed", detail_always=False)
                    if recover is not None:
                        return await do_one_job("cis", recover, "keys-recovered", "keys-recover-failed", detail_always=True)
                    if restore_check is not None:
                        return await do_one_job("factory", restore_check, "restore-officers-ok", "restore-officers-refused",
                                             detail_always=True)
                    if pin is not None:
                        await roles["factory"].chan.send(S.AutoActivate(pin=pin))
                        ev = await self.wait_event("activated", "activation-failed")
                        if ev.kind == "activation-failed":
                            log(f"activation from the PIN file failed: {ev.detail}")
                    n.start_soon(self.watch_deadlines)
                    if on_ready is not None:
                        on_ready()
                    log(f"running; admin socket {self.layout.admin_socket}")
                    async for sig in signals:
                        log(f"signal {signal.Signals(sig).name}: stopping")
                        await self._stop(roles)
                        n.cancel_scope.cancel()
                        return 0
        finally:
            for r in roles.values():
                if r.proc is not None and r.proc.returncode is None:
                    r.proc.kill()
            if self.listen is not None:
                self.listen.close()
            if self.gateway_listen is not None:
                self.gateway_listen.close()
            if not one_job:
                try:
                    os.unlink(self.layout.admin_socket)
                except FileNotFoundError:
                    pass
        log(f"stopped: {self.failed}")
        return 1

    async def _stop(self, roles: dict[str, Role]) -> None:
        """The endpoint and the agents first (they are the Factory's clients), then the Factory (it
        finishes its transaction and closes the CMDB), then the CIS."""
        self.stopping = True
        for r in sorted(roles.values(), key=lambda r: r.spec.stop_order):
            if r.proc is None or r.proc.returncode is not None:
                continue
            try:
                await r.chan.send(S.Shutdown())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(STOP_TIMEOUT):
                await r.proc.wait()
            if r.proc.returncode is None:
                log(f"{r.name} did not stop in {STOP_TIMEOUT}s: killing it")
                r.proc.kill()
                await r.proc.wait()


def subprocess_devnull() -> int:
    import subprocess
    return subprocess.DEVNULL


def _gateway_counters(g: S.GatewayStats | None) -> S.GatewayCounters | None:
    if g is None:
        return None
    return S.GatewayCounters(max(0, g.requests), max(0, g.errors), max(0, g.issued), max(0, g.refused), max(0, g.orders_open))


def _sum_stats(all_stats: list[S.OcspStats]) -> S.OcspStats:
    """The endpoint's counters over all its processes (each holds every response: the max, not the sum)."""
    olds = [s.oldest_this_update for s in all_stats if s.oldest_this_update is not None]
    return S.OcspStats(
        requests=sum(s.requests for s in all_stats), good=sum(s.good for s in all_stats),
        revoked=sum(s.revoked for s in all_stats), unauthorized=sum(s.unauthorized for s in all_stats),
        malformed=sum(s.malformed for s in all_stats), errors=sum(s.errors for s in all_stats),
        responses_held=max((s.responses_held for s in all_stats), default=0), oldest_this_update=min(olds) if olds else None)


def _ensure_softhsm_token(home_fd: int, folder: str, label: str, ident: privdrop.Identity | None) -> str:
    """The endpoint's own SoftHSM2 token (embedded mode), made on first start; returns its user PIN.
    It only ever holds delegated OCSP responder keys, never a CA key.

    The folder belongs to the endpoint's user: root reads and writes in it only through fds that
    follow no link (a `pin` linked to the CA's PIN file is refused, never read), and the token tool
    runs as that user, so whatever the folder holds gives it nothing it did not have."""
    import secrets
    import subprocess
    name = os.path.basename(folder)
    try:
        os.mkdir(name, 0o700, dir_fd=home_fd)
    except FileExistsError:
        pass
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=home_fd)
    try:
        os.fchmod(fd, 0o700)
        if ident is not None:
            os.fchown(fd, ident.uid, ident.gid)
        owners = (os.geteuid(),) + ((ident.uid,) if ident is not None else ())
        pin_path = os.path.join(folder, "pin")
        try:
            raw = safefs.read_file(fd, "pin", 256, owners, where=pin_path)
            pin = raw.decode("ascii").strip() if raw is not None else ""
            if raw is not None and not (pin and pin.isprintable() and len(pin) <= 128):
                raise safefs.UnsafePath(f"{pin_path} does not hold a PIN")
        except (safefs.UnsafePath, UnicodeDecodeError) as e:
            log(f"refused {pin_path}: {e if isinstance(e, safefs.UnsafePath) else 'not text'}: a new endpoint token is made")
            pin = ""
        if pin:
            return pin
        # As the endpoint's user: its own folder, its own power (rm -rf removes a planted link, not its target).
        as_role = {"user": ident.uid, "group": ident.gid, "extra_groups": []} if ident is not None else {}
        tokens = os.path.join(folder, "tokens")
        for argv in (["rm", "-rf", "--", tokens], ["mkdir", "-m", "700", "--", tokens]):
            r = subprocess.run(argv, env=child_env(), capture_output=True, text=True, cwd="/", check=False, **as_role)
            if r.returncode != 0:
                raise SupervisorError(f"cannot prepare {tokens}: {r.stderr.strip() or r.stdout.strip()}")
        owner = (ident.uid, ident.gid) if ident is not None else None
        conf = f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        safefs.write_file(fd, "softhsm2.conf", conf.encode(), 0o600, owner)
        pin = secrets.token_urlsafe(18)
        r = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", secrets.token_urlsafe(18),
                            "--pin", pin], env=child_env({"SOFTHSM2_CONF": os.path.join(folder, "softhsm2.conf")}),
                           capture_output=True, text=True, cwd="/", check=False, **as_role)
        if r.returncode != 0:
            raise SupervisorError(f"cannot create the endpoint's token: {r.stderr.strip() or r.stdout.strip()}")
        safefs.write_file(fd, "pin", (pin + "\n").encode(), 0o600, owner)
        return pin
    finally:
        os.close(fd)


def _hand_over(home_fd: int, name: str, ident: privdrop.Identity, must_exist: bool = True) -> None:
    """Give HOME/name and what it holds to a role's user, through fds (safefs.chown_tree): a link or
    a hard link the role planted there is left as it is, never followed, never re-owned."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=home_fd)  # HOME's entry: root's
    except FileNotFoundError:
        if must_exist:
            raise
        return
    try:
        os.fchmod(fd, 0o700)
        refused: list[str] = []
        safefs.chown_tree(fd, ident.uid, ident.gid, refused.append)
        for r in refused[:20]:
            log(f"not re-owned in {name}/: {r}")
        if len(refused) > 20:
            log(f"... and {len(refused) - 20} more in {name}/")
    except safefs.UnsafePath as e:
        log(f"ownership of {name}/: {e}")
    finally:
        os.close(fd)


def _protect_config(home: str, admin_gid: int | None) -> None:
    """donjon.toml: 0640 at most, readable by the admin group in appliance mode (its secrets are
    files of their own, 0600)."""
    try:
        fd = os.open(os.path.join(home, "donjon.toml"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # none (the defaults), or a link the operator made: theirs to protect
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():  # someone else's file is theirs to protect
            if admin_gid is not None and st.st_uid == 0 and st.st_gid != admin_gid:
                os.fchown(fd, 0, admin_gid)
            if st.st_mode & 0o137:
                os.fchmod(fd, st.st_mode & 0o640)
    finally:
        os.close(fd)


def _fix_mode(home_fd: int, name: str, mode: int) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=home_fd)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, mode)
    finally:
        os.close(fd)

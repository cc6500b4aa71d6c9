"""The SNMP agent (read-only DONJON-MIB over v3 authPriv or a source-restricted v2c community)
and the notification senders (one pysnmp engine per target)."""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import socket
import time
from collections.abc import Callable

from pysnmp.carrier.asyncio.dgram import udp, udp6
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context, ntforg
from pysnmp.proto import errind, error, rfc1902, rfc1905
from pysnmp.proto.mpmod.rfc3412 import SnmpV3MessageProcessingModel

# Imported here, not on first use: after the privilege drop the role may not read site-packages.
from cryptography.hazmat.decrepit.ciphers.modes import CFB  # noqa: F401  (AES-CFB, rfc3826)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms  # noqa: F401

from appliance.ipc import schema as S

from . import mib

AUTH = {"sha256": config.USM_AUTH_HMAC192_SHA256, "sha384": config.USM_AUTH_HMAC256_SHA384,
        "sha512": config.USM_AUTH_HMAC384_SHA512}
# aes192/aes256: the Blumenthal key extension, what net-snmp calls AES192/AES256 (AES192C is Reeder's).
PRIV = {"aes128": config.USM_PRIV_CFB128_AES, "aes192": config.USM_PRIV_CFB192_AES_BLUMENTHAL,
        "aes256": config.USM_PRIV_CFB256_AES_BLUMENTHAL}

# pysnmp loads these MIB modules lazily; they are loaded before the drop and the builder's sources
# are then removed, so a module missing here fails loudly in tests instead of reading files later.
_MIB_MODULES = ("SNMPv2-SMI", "SNMPv2-TC", "SNMPv2-MIB", "SNMP-FRAMEWORK-MIB", "SNMP-MPD-MIB",
                "SNMP-TARGET-MIB", "SNMP-NOTIFICATION-MIB", "SNMP-COMMUNITY-MIB", "SNMP-USER-BASED-SM-MIB",
                "SNMP-VIEW-BASED-ACM-MIB", "SNMP-USM-HMAC-SHA2-MIB", "SNMP-USM-AES-MIB",
                "PYSNMP-USM-MIB", "__SNMP-FRAMEWORK-MIB", "__SNMPv2-MIB", "__SNMP-TARGET-MIB", "__SNMP-MPD-MIB",
                "__SNMP-USER-BASED-SM-MIB", "__SNMP-VIEW-BASED-ACM-MIB", "__SNMP-COMMUNITY-MIB",
                "__SNMP-NOTIFICATION-MIB", "__PYSNMP-USM-MIB")

# Reports a wrong or unknown credential would earn are not sent: only the two that an honest
# manager needs (engine discovery and time synchronisation) go out. No user enumeration, no
# "wrong key" oracle: wrong credentials get no answer at all.
_REPORTS_SENT = {
    (1, 3, 6, 1, 6, 3, 15, 1, 1, 4, 0),  # usmStatsUnknownEngineIDs (discovery)
    (1, 3, 6, 1, 6, 3, 15, 1, 1, 2, 0),  # usmStatsNotInTimeWindows (sent authenticated)
}

_ENTERPRISE = 99999  # placeholder enterprise number, as in DONJON-MIB
_EPOCH_2020 = 1577836800


def engine_id(purpose: str) -> bytes:
    """RFC 3411 SnmpEngineID, format 5 (octets): stable for a given purpose string, so that
    receivers of v3 traps can be configured with it (`createUser -e 0x...`)."""
    return (0x80000000 | _ENTERPRISE).to_bytes(4, "big") + b"\x05" + hashlib.sha256(purpose.encode()).digest()[:12]


def notifier_engine_id(t: S.SnmpTarget) -> bytes:
    return engine_id(f"donjon-notify|{t.host}|{t.port}|{t.version}|{t.user or ''}|{t.community or ''}")


def _boots() -> int:
    # snmpEngineBoots must grow at every start and the role has no state to count them in: the
    # seconds since 2020 do, as long as the clock does not go back (fits 31 bits until 2088).
    return max(1, min(int(time.time()) - _EPOCH_2020, 2**31 - 2))


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def _resolve(host: str, port: int) -> tuple[int, tuple]:
    """Resolved once, before the drop (no resolver afterwards)."""
    fam, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return fam, addr


def _udp_socket(family: int, bind: tuple) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind(bind)
    return s


def _transport(family: int):
    return (udp6.DOMAIN_NAME, udp6.Udp6AsyncioTransport) if family == socket.AF_INET6 else (udp.DOMAIN_NAME, udp.UdpAsyncioTransport)


def _new_engine(eid: bytes) -> engine.SnmpEngine:
    # Not SnmpEngine(snmpEngineID=...): that reads and writes a boots file under /tmp.
    e = engine.SnmpEngine()
    e.message_processing_subsystems[SnmpV3MessageProcessingModel.MESSAGE_PROCESSING_MODEL_ID] = _QuietV3()
    mb = e.get_mib_builder()
    mb.load_modules(*(m for m in _MIB_MODULES if _has_module(mb, m)))
    sym_id, sym_boots = mb.import_symbols("__SNMP-FRAMEWORK-MIB", "snmpEngineID", "snmpEngineBoots")
    sym_id.syntax = sym_id.syntax.clone(eid)
    e.snmpEngineID = sym_id.syntax
    sym_boots.syntax = sym_boots.syntax.clone(_boots())
    return e


def _has_module(mb, name: str) -> bool:
    try:
        mb.load_modules(name)
        return True
    except Exception:  # noqa: BLE001 - a module this pysnmp does not ship
        return False


def _seal(e: engine.SnmpEngine) -> None:
    """No more MIB files after this point (see _MIB_MODULES)."""
    e.get_mib_builder().set_mib_sources()


class _QuietV3(SnmpV3MessageProcessingModel):
    def prepare_response_message(self, snmpEngine, messageProcessingModel, securityModel, securityName,
                                 securityLevel, contextEngineId, contextName, pduVersion, pdu,
                                 maxSizeResponseScopedPDU, stateReference, statusInformation):
        if (statusInformation is not None and "oid" in statusInformation
                and tuple(statusInformation["oid"]) not in _REPORTS_SENT):
            cached = self._cache.pop_by_state_reference(stateReference)
            sm = snmpEngine.security_models.get(cached["securityModel"]) if cached else None
            if sm is not None:
                sm.release_state_information(cached["securityStateReference"])
            raise error.StatusInformation(errorIndication=errind.loopTerminated)
        return super().prepare_response_message(
            snmpEngine, messageProcessingModel, securityModel, securityName, securityLevel, contextEngineId,
            contextName, pduVersion, pdu, maxSizeResponseScopedPDU, stateReference, statusInformation)


def _message_version(datagram: bytes) -> int | None:
    """msgVersion of an SNMP message (SEQUENCE { INTEGER version, ... }), None if not one."""
    if len(datagram) < 5 or datagram[0] != 0x30:
        return None
    i = 1
    if datagram[i] & 0x80:
        n = datagram[i] & 0x7F
        if n == 0 or n > 4:
            return None
        i += 1 + n
    else:
        i += 1
    if len(datagram) < i + 3 or datagram[i] != 0x02 or datagram[i + 1] != 1:
        return None
    return datagram[i + 2]


class _AgentTransport:
    """Mixin for the listening transport: drops, before any parsing, SNMPv1, anything that is not
    SNMP, and v2c from outside the community's source CIDRs (or v2c at all without a community)."""

    v2c_sources: tuple = ()

    def datagram_received(self, datagram, transportAddress):
        version = _message_version(datagram)
        if version == 3 or (version == 1 and self._v2c_allowed(transportAddress[0])):
            super().datagram_received(datagram, transportAddress)

    def _v2c_allowed(self, host: str) -> bool:
        if not self.v2c_sources:
            return False
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.v2c_sources)


class _AgentUdp(_AgentTransport, udp.UdpAsyncioTransport):
    pass


class _AgentUdp6(_AgentTransport, udp6.Udp6AsyncioTransport):
    pass


class StatusMib:
    """The MIB instrumentation pysnmp's command responders call: a sorted snapshot of instances,
    replaced whole on every ApplianceStatus (reads never see half an update)."""

    def __init__(self):
        self.received_at: float | None = None
        self._set(mib.instances(None))

    def _set(self, values: dict) -> None:
        values = dict(values)
        values[mib.STATUS_AGE + (0,)] = None  # computed when read
        self._values = values
        self._oids = sorted(values)

    def update(self, st: S.ApplianceStatus) -> None:
        self.received_at = time.monotonic()
        self._set(mib.instances(st))

    def _value(self, oid):
        if oid == mib.STATUS_AGE + (0,):
            age = 0 if self.received_at is None else int(time.monotonic() - self.received_at)
            return rfc1902.Gauge32(min(age, 2**32 - 1))
        return self._values[oid]

    @staticmethod
    def _denied(name, val, idx, ctx) -> bool:
        # True: not in the requester's view (VACM); authorization errors propagate as pysnmp's.
        return bool(ctx["acFun"]("read", (name, val), idx=idx, **{k: v for k, v in ctx.items() if k != "idx"}))

    def read_variables(self, *varBinds, **ctx):
        out = []
        for idx, (name, _) in enumerate(varBinds):
            oid = tuple(name)
            if oid in self._values:
                val = self._value(oid)
                if not self._denied(name, val, idx, ctx):
                    out.append((name, val))
                    continue
                out.append((name, rfc1905.noSuchObject))
            elif oid[:-1] and any(o[:len(oid) - 1] == oid[:-1] for o in self._oids):
                out.append((name, rfc1905.noSuchInstance))
            else:
                out.append((name, rfc1905.noSuchObject))
        return out

    def read_next_variables(self, *varBinds, **ctx):
        out = []
        for idx, (name, _) in enumerate(varBinds):
            i = bisect.bisect_right(self._oids, tuple(name))
            while i < len(self._oids):
                oid = self._oids[i]
                val = self._value(oid)
                if not self._denied(rfc1902.ObjectName(oid), val, idx, ctx):
                    out.append((rfc1902.ObjectName(oid), val))
                    break
                i += 1
            else:
                out.append((name, rfc1905.endOfMibView))
        return out


class _Notifier:
    """One engine, one transport, one target (FIELD-NOTES: one engine for several sent a v2c trap twice)."""

    def __init__(self, t: S.SnmpTarget, users: dict[str, S.SnmpUser]):
        self.target = t
        family, addr = _resolve(t.host, t.port)
        self.sock = _udp_socket(family, ("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        domain, cls = _transport(family)
        self.engine = e = _new_engine(notifier_engine_id(t))
        self.transport = cls().open_server_mode(sock=self.sock)  # our own socket: opened before the drop
        config.add_transport(e, domain, self.transport)
        if t.version == "v3":
            u = users[t.user]  # checked by Agent.configure
            config.add_v3_user(e, u.name, AUTH[u.auth], u.auth_key, PRIV[u.priv], u.priv_key)
            config.add_target_parameters(e, "donjon-params", u.name, "authPriv", 3)
            config.add_vacm_user(e, 3, u.name, "authPriv", (), (), (1, 3, 6))
        else:
            config.add_v1_system(e, "donjon-trap", t.community)
            config.add_target_parameters(e, "donjon-params", "donjon-trap", "noAuthNoPriv", 1)
            config.add_vacm_user(e, 2, "donjon-trap", "noAuthNoPriv", (), (), (1, 3, 6))
        config.add_target_address(e, "donjon-target", domain, addr[:2] if family == socket.AF_INET else addr,
                                  "donjon-params", timeout=300, retryCount=3, tagList="donjon-nms")
        config.add_notification_target(e, "donjon-notification", "donjon-params", "donjon-nms", t.kind)
        config.add_context(e, "")
        self.originator = ntforg.NotificationOriginator()

    def send(self, varbinds, on_error: Callable[[str], None]) -> None:
        def done(snmpEngine, handle, errorIndication, errorStatus, errorIndex, varBinds, cbCtx):
            if errorIndication:
                on_error(f"{self.target.kind} to {self.target.host}:{self.target.port}: {errorIndication}")
        self.originator.send_varbinds(self.engine, "donjon-notification", None, b"", varbinds, done)


class Agent:
    def __init__(self):
        self.mib = StatusMib()
        self.engine: engine.SnmpEngine | None = None
        self.notifiers: list[_Notifier] = []
        self._transports: list = []
        self._started = time.monotonic()

    def configure(self, cfg: S.SnmpConfig) -> None:
        """Open every socket and build every engine (before the privilege drop)."""
        users = {u.name: u for u in cfg.users}
        if len(users) != len(cfg.users):
            raise ValueError("duplicate SNMP user names")
        for t in cfg.targets:
            if t.version == "v3" and t.user not in users:
                raise ValueError(f"target {t.host}:{t.port}: unknown user {t.user!r}")
            if t.version == "v2c" and not t.community:
                raise ValueError(f"target {t.host}:{t.port}: v2c needs a community")
        sources = tuple(ipaddress.ip_network(c, strict=False) for c in cfg.community_sources)

        host, port = parse_hostport(cfg.listen)
        family, addr = _resolve(host, port)
        self.sock = _udp_socket(family, addr)
        self.address = self.sock.getsockname()
        domain = udp6.DOMAIN_NAME if family == socket.AF_INET6 else udp.DOMAIN_NAME
        tr = (_AgentUdp6 if family == socket.AF_INET6 else _AgentUdp)()
        tr.v2c_sources = sources if cfg.community else ()
        tr.open_server_mode(sock=self.sock)
        self._transports.append(tr)

        self.engine = e = _new_engine(engine_id(f"donjon-agent|{self.address[0]}|{self.address[1]}"))
        config.add_transport(e, domain, tr)
        for u in cfg.users:
            config.add_v3_user(e, u.name, AUTH[u.auth], u.auth_key, PRIV[u.priv], u.priv_key)
            config.add_vacm_user(e, 3, u.name, "authPriv", mib.ROOT)
        if cfg.community:
            config.add_v1_system(e, "donjon-ro", cfg.community)
            config.add_vacm_user(e, 2, "donjon-ro", "noAuthNoPriv", mib.ROOT)
        ctx = context.SnmpContext(e)
        ctx.unregister_context_name(b"")
        ctx.register_context_name(b"", self.mib)
        cmdrsp.GetCommandResponder(e, ctx)
        cmdrsp.NextCommandResponder(e, ctx)
        cmdrsp.BulkCommandResponder(e, ctx)
        # No SetCommandResponder: a SET gets no answer.
        self.notifiers = [_Notifier(t, users) for t in cfg.targets]
        self._transports += [n.transport for n in self.notifiers]

    async def start(self) -> None:
        """Wait until asyncio has wrapped every socket; then seal the MIB builders."""
        for tr in self._transports:
            if tr._lport is not None:
                await tr._lport
        for e in [self.engine] + [n.engine for n in self.notifiers]:
            _seal(e)

    def update(self, st: S.ApplianceStatus) -> None:
        self.mib.update(st)

    def notify(self, n: S.Notify, on_error: Callable[[str], None]) -> None:
        uptime = int((time.monotonic() - self._started) * 100) % 2**32
        varbinds = [
            (mib.SYS_UPTIME, rfc1902.TimeTicks(uptime)),
            (mib.SNMP_TRAP_OID, rfc1902.ObjectIdentifier(mib.NOTIFY_OID[n.kind])),
            (mib.NOTIFY_SUBJECT + (0,), mib.admin_string(n.subject)),
            (mib.NOTIFY_DETAIL + (0,), mib.admin_string(n.detail)),
        ]
        for notifier in self.notifiers:
            try:
                notifier.send(varbinds, on_error)
            except Exception as e:  # noqa: BLE001 - one failing target must not silence the others
                on_error(f"{notifier.target.host}:{notifier.target.port}: {type(e).__name__}: {e}")

    def close(self) -> None:
        for e in [self.engine] + [n.engine for n in self.notifiers]:
            if e is not None and e.transport_dispatcher is not None:
                e.transport_dispatcher.close_dispatcher()

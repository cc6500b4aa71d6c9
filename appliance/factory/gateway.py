"""The Factory's side of the protocol gateway link: enrolments, revocations, EAB, state; each checked again and audited."""

# The gateway parses untrusted protocol input and holds no CA key and no CMDB: what it sends here is
# treated as a claim. The Factory checks again what it can (the profile and CA are among those the
# gateway may ask for, the names within the gateway's and the EAB key's patterns, the CSR's names are
# the order's, an EAB key is valid and bound to that account, a revocation by account concerns a
# certificate that account obtained), then issues through the normal pipeline: a compromised gateway
# gets at most what its configuration allows. Every record names the protocol and the credential.

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, LinkClosed, ProtocolViolation
from policy import csr as csrcheck
from policy import gwpolicy
from policy import profiles as profmod
from policy.errors import PolicyError

from .cmdb import serial_bytes, serial_int
from .cmp import CMP_REQUESTS
from .errors import FactoryError, _log
from .gwestscep import EstScepGate
from .gwestscep import KINDS as ESTSCEP_KINDS
from .store import Store

TLS_DAYS = 90
TLS_PROFILE = "tls-server"
BACKDATE = 60
EAB_ALGS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
MAX_INFLIGHT = 256  # requests from the gateway handled at once (more wait: the link is read no faster)


@dataclass
class GatewayHost:
    """What the gateway service uses of the Factory: its store and a few operations, by name."""

    store: Store
    cfg: S.FactoryConfig
    profiles: dict[str, profmod.Profile]
    issue: Callable[[S.AIssue, str], Awaitable[S.IssueReply]]
    issue_one: Callable[..., Awaitable[x509.Certificate]]  # (ca, IssueItem, serial, actor, action, request, detail)
    revoke: Callable[[S.ARevoke, str], Awaitable[dict[str, Any]]]
    check_issuer: Callable[[str, profmod.Profile, str, str], Awaitable[None]]
    ca_chain: Callable[[str], Awaitable[list[bytes]]]
    audit: Callable[[str, str, str, str, str], Awaitable[None]]


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def new_serial() -> int:
    while True:
        s = secrets.randbits(127)
        if s >> 63:
            return s


class GatewayService:
    def __init__(self, host: GatewayHost):
        self.h = host
        self.extra: Callable[[Any], Awaitable[Any]] | None = None  # another protocol's messages (CMP: factory/cmp.py)
        self.stats = {"issued": 0, "refused": 0}
        self.estscep = EstScepGate(host, self.issue_admitted)

    # ------------------------------------------------------------ the link

    async def serve(self, chan: Channel) -> None:
        """Until the link ends (the gateway stopped or broke the protocol: the supervisor restarts it);
        never raises into the Factory."""
        await chan.handshake()
        limit = trio.CapacityLimiter(MAX_INFLIGHT)
        async with trio.open_nursery() as n:
            try:
                while True:
                    msg = await chan.recv()
                    if isinstance(msg, S.Hello):
                        raise ProtocolViolation("factory-gateway: second Hello")
                    await limit.acquire_on_behalf_of(msg)
                    n.start_soon(self._one, chan, msg, limit)
            except LinkClosed:
                pass
            except ProtocolViolation as e:
                _log(f"gateway link: {e}")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            n.cancel_scope.cancel()

    async def _one(self, chan: Channel, msg, limit: trio.CapacityLimiter) -> None:
        try:
            try:
                reply = await self.answer(msg)
            except FactoryError as e:
                code = {"inactive": "inactive", "not-found": "not-found", "busy": "busy", "bad-request": "bad-request",
                        "auth": "unauthorized", "denied": "unauthorized", "exists": "already-revoked"}.get(e.code, "policy")
                reply = S.GwRefused(id=msg.id, code=code, reason=e.reason[:4000])
            except Exception as e:  # noqa: BLE001 - one request's failure, logged; never exception text across the link
                _log(f"gateway request {type(msg).__name__} failed: {type(e).__name__}: {e}")
                reply = S.GwRefused(id=msg.id, code="internal", reason="internal error in the Factory (see its log)")
            if isinstance(reply, S.GwRefused):
                self.stats["refused"] += 1
            try:
                await chan.send(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        finally:
            limit.release_on_behalf_of(msg)

    async def answer(self, msg):
        if isinstance(msg, S.GwEnroll):
            return await self.enroll(msg)
        if isinstance(msg, S.GwPoll):
            return await self.estscep.poll(msg)  # EST/SCEP enrolments waiting for an officer
        if isinstance(msg, S.GwChainRequest):
            return await self.estscep.chain(msg)
        if isinstance(msg, S.GwRaRequest):
            return await self.estscep.ra_cert(msg)
        if isinstance(msg, S.GwFetch):
            return await self.estscep.fetch(msg)
        if isinstance(msg, S.GwRevoke):
            return await self.revoke(msg)
        if isinstance(msg, S.GwCertStatus):
            return await self.cert_status(msg)
        if isinstance(msg, S.GwEabCheck):
            return await self.eab_check(msg)
        if isinstance(msg, S.GwTlsRequest):
            return await self.tls_cert(msg)
        if isinstance(msg, S.GwStateGet):
            return await self.state_get(msg)
        if isinstance(msg, S.GwStatePut):
            return await self.state_put(msg)
        if self.extra is not None and isinstance(msg, CMP_REQUESTS):
            return await self.extra(msg)
        raise ProtocolViolation(f"factory-gateway: unexpected {type(msg).__name__}")

    # ------------------------------------------------------------ enrolment

    def _actor(self, protocol: str, auth: S.GwAuth) -> str:
        return f"gateway/{protocol}:{auth.ident}"[:400]

    async def _refuse(self, actor: str, action: str, obj: str, rid: int, code: str, reason: str) -> S.GwRefused:
        await self.h.audit(actor, action, obj, "refused", reason[:4000])
        return S.GwRefused(id=rid, code=code, reason=reason[:4000])

    async def _pick_ca(self, profile: str, wanted: str | None) -> str:
        """The CA asked for, or the first issuing CA (one with a parent), else the first CA."""
        if wanted:
            return wanted
        rows = await self.h.store.run(self.h.store.ca_rows)
        subs = [r[0] for r in rows if r[2] is not None] or [r[0] for r in rows]
        if not subs:
            raise FactoryError("not-found", "no CA to issue from")
        return sorted(subs)[0]

    async def _eab_row(self, kid: str):
        return await self.h.store.run(self.h.store.eab_key, kid)

    async def _admitted(self, msg: S.GwEnroll, actor: str) -> tuple[str, S.GwRefused | None]:
        """The CA, or the refusal (audited): profile pair, EAB key, name patterns."""
        cfg = self.h.cfg
        obj = msg.ca or "-"
        pairs = set(cfg.gateway_profiles)
        if (msg.profile, msg.ca or "") not in pairs and (msg.profile, "") not in pairs:
            return obj, await self._refuse(actor, "issue", obj, msg.id, "policy",
                                           f"the gateway may not ask for profile {msg.profile!r} from CA {msg.ca or 'any'!r}")
        sets: list[tuple[str, ...]] = [tuple(cfg.gateway_name_patterns)]  # a name must be in each
        if msg.auth.eab_kid is not None:
            row = await self._eab_row(msg.auth.eab_kid)
            if row is None or row[4] is not None:
                return obj, await self._refuse(actor, "issue", obj, msg.id, "unauthorized",
                                               f"EAB key {msg.auth.eab_kid!r} is {'revoked' if row else 'unknown'}")
            if row[3] != msg.auth.ident:
                return obj, await self._refuse(actor, "issue", obj, msg.id, "unauthorized",
                                               f"EAB key {msg.auth.eab_kid!r} is not bound to this account")
            if row[2]:
                sets.append(tuple(row[2].split()))
        refused = sorted({v for pats in sets for v in gwpolicy.names_refused([(k, v) for k, v in msg.names], pats)})
        if refused:
            return obj, await self._refuse(actor, "issue", obj, msg.id, "rejected-identifier",
                                           f"names outside this account's policy: {', '.join(refused[:5])}")
        try:
            ca = await self._pick_ca(msg.profile, msg.ca)
        except FactoryError as e:
            return obj, await self._refuse(actor, "issue", obj, msg.id, "not-found", e.reason)
        return ca, None

    async def enroll(self, msg: S.GwEnroll) -> S.GwIssued | S.GwRefused | S.GwPending:
        self.h.store.require_active()
        actor = self._actor(msg.protocol, msg.auth)
        if msg.auth.kind in ESTSCEP_KINDS:
            # EST/SCEP credentials (secrets, current certificates) are checked again and spent there; the
            # CA and profile come from the credential; an officer's approval may be needed first.
            r = await self.estscep.admit(msg, actor)
            if not isinstance(r, tuple):
                return r
            msg, ca, spent = r
            refused = gwpolicy.names_refused([(k, v) for k, v in msg.names], tuple(self.h.cfg.gateway_name_patterns))
            if refused:
                out = await self._refuse(actor, "issue", ca, msg.id, "rejected-identifier",
                                         f"names outside the gateway's policy: {', '.join(sorted(refused)[:5])}")
            else:
                out = await self.issue_admitted(msg, ca, actor)
            if isinstance(out, S.GwRefused) and spent is not None:
                await self.estscep.give_back(spent, actor)
            return out
        ca, refusal = await self._admitted(msg, actor)
        if refusal is not None:
            return refusal
        if msg.approval_wait:
            return await self._refuse(actor, "issue", ca, msg.id, "policy", "approval-wait enrolment is not offered by this Factory")
        return await self.issue_admitted(msg, ca, actor)

    async def issue_admitted(self, msg: S.GwEnroll, ca: str, actor: str) -> S.GwIssued | S.GwRefused:
        """Issue an admitted request through the normal pipeline (at once, or at an officer's approval)."""
        profile = self.h.profiles.get(msg.profile)
        if profile is None or profile.kind in profmod.CA_KINDS:
            return await self._refuse(actor, "issue", ca, msg.id, "policy", f"profile {msg.profile!r} is not for the gateway")
        if msg.csr is None:
            return await self._refuse(actor, "issue", ca, msg.id, "bad-request", "an enrolment needs a CSR")
        try:
            info = await trio.to_thread.run_sync(csrcheck.check_csr, msg.csr, profile)
        except PolicyError as e:
            return await self._refuse(actor, "issue", ca, msg.id, "bad-csr", str(e))
        try:
            want = {(k, gwpolicy.normal_name(k, v)) for k, v in msg.names}
            got = {(k, gwpolicy.normal_name(k, v)) for k, v in info.sans}
        except ValueError:
            return await self._refuse(actor, "issue", ca, msg.id, "bad-csr", "a name is not a DNS name or an IP address")
        if want != got:
            return await self._refuse(actor, "issue", ca, msg.id, "bad-csr",
                                      "the CSR's names differ from the authorised names "
                                      f"(CSR: {', '.join(sorted(v for _, v in got))[:300]}; authorised: {', '.join(sorted(v for _, v in want))[:300]})")
        days = None
        if msg.not_after is not None:
            days = max(1, min(40 * 366, (msg.not_after - int(time.time()) + 86399) // 86400))
        reply = await self.h.issue(S.AIssue(id=msg.id, ca=ca, profile=msg.profile, csrs=[msg.csr], validity_days=days), actor)
        out = reply.results[0]
        if out.cert is None:
            return S.GwRefused(id=msg.id, code="policy", reason=(out.error or "refused")[:4000])  # audited by issue()
        cert = x509.load_der_x509_certificate(out.cert)
        sb = serial_bytes(cert.serial_number)

        def record():
            db = self.h.store.require_active()
            with db.tx():
                self.h.store.gateway_issued_add(ca, sb, msg.protocol, msg.auth.ident, msg.replaces)
                if msg.replaces:
                    db.audit(actor, "gateway-replaces", f"{ca}/{cert.serial_number:x}", "ok", f"replaces {msg.replaces}"[:4000])
        await self.h.store.run(record)
        self.stats["issued"] += 1
        return S.GwIssued(id=msg.id, ca=ca, cert=out.cert, chain=(await self.h.ca_chain(ca))[:8], serial=sb)

    # ------------------------------------------------------------ revocation and status

    async def _find_issuer(self, cert: x509.Certificate) -> str | None:
        rows = await self.h.store.run(self.h.store.ca_rows)
        for name, _, _, _, der in rows:
            ca = x509.load_der_x509_certificate(der)
            if ca.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(ca)
                except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends: not this CA
                    continue
                return name
        return None

    async def revoke(self, msg: S.GwRevoke) -> S.GwRevoked | S.GwRefused:
        self.h.store.require_active()
        actor = self._actor(msg.protocol, msg.auth)
        try:
            cert = x509.load_der_x509_certificate(msg.cert)
        except ValueError:
            return await self._refuse(actor, "revoke", "-", msg.id, "bad-request", "not a certificate")
        ca = await self._find_issuer(cert)
        obj = f"{ca or '-'}/{cert.serial_number:x}"
        if ca is None:
            return await self._refuse(actor, "revoke", obj, msg.id, "not-found", "not a certificate of this appliance")
        sb = serial_bytes(cert.serial_number)
        if msg.proof == "account":
            to = await self.h.store.run(self.h.store.gateway_issued_to, ca, sb)
            if to is None or to != msg.auth.ident:
                return await self._refuse(actor, "revoke", obj, msg.id, "unauthorized", "this account did not obtain this certificate")
        elif msg.proof == "authorized-names":
            return await self._refuse(actor, "revoke", obj, msg.id, "unauthorized", "revocation by authorised names is not offered")
        try:
            await self.h.revoke(S.ARevoke(id=msg.id, ca=ca, serial=sb, reason=msg.reason), actor)
        except FactoryError as e:
            if e.code == "exists":
                return S.GwRefused(id=msg.id, code="already-revoked", reason=e.reason)
            raise
        return S.GwRevoked(id=msg.id, ca=ca, serial=sb)

    async def cert_status(self, msg: S.GwCertStatus) -> S.GwCertInfo:
        self.h.store.require_active()
        row = await self.h.store.run(self.h.store.cert_row, msg.ca, serial_int(msg.serial))
        if row is None:
            return S.GwCertInfo(id=msg.id, found=False)
        ca_row = await self.h.store.run(self.h.store.ca_row, msg.ca)
        ca_end = int(x509.load_der_x509_certificate(ca_row[4]).not_valid_after_utc.timestamp()) if ca_row else 0
        return S.GwCertInfo(id=msg.id, found=True, not_before=row[2], not_after=row[3], revoked=row[6] is not None,
                            ca_not_after=ca_end)

    # ------------------------------------------------------------ external account binding

    async def eab_check(self, msg: S.GwEabCheck) -> S.GwEabResult:
        """RFC 8555 §7.3.4: the inner JWS is MACed with the key the officer made; its `kid` is the key
        id, its `url` the newAccount URL (checked by the gateway), its payload the account key."""
        actor = f"gateway/acme:{msg.account}"[:400]
        row = await self._eab_row(msg.kid)

        async def no(why: str) -> S.GwEabResult:
            await self.h.audit(actor, "eab-bind", msg.kid, "refused", why)
            return S.GwEabResult(id=msg.id, ok=False, reason=why)
        if row is None:
            return await no("unknown EAB key id")
        if row[4] is not None:
            return await no("EAB key revoked")
        try:
            prot = json.loads(_b64d(msg.protected))
            sig = _b64d(msg.signature)
        except (ValueError, UnicodeDecodeError):
            return await no("malformed EAB JWS")
        if not isinstance(prot, dict) or prot.get("kid") != msg.kid or prot.get("alg") not in EAB_ALGS or "nonce" in prot:
            return await no("EAB JWS header: want alg HS256/384/512, this kid, no nonce")
        mac = hmac.new(row[0], f"{msg.protected}.{msg.payload}".encode(), EAB_ALGS[prot["alg"]]).digest()
        if not hmac.compare_digest(mac, sig):
            return await no("EAB MAC does not verify")
        if row[3] is not None and row[3] != msg.account:
            return await no("EAB key already bound to another account")

        def bind():
            db = self.h.store.require_active()
            with db.tx():
                self.h.store.eab_bind(msg.kid, msg.account, int(time.time()))
                db.audit(actor, "eab-bind", msg.kid, "ok", "")
        await self.h.store.run(bind)
        return S.GwEabResult(id=msg.id, ok=True, profiles=tuple(row[1].split()), name_patterns=tuple(row[2].split()))

    # ------------------------------------------------------------ the gateway's own server certificate

    async def tls_cert(self, msg: S.GwTlsRequest) -> S.GwIssued | S.GwRefused:
        self.h.store.require_active()
        actor = "gateway/tls"
        names = tuple(msg.names)
        if names != tuple(self.h.cfg.gateway_tls_names):
            return await self._refuse(actor, "gateway-tls", msg.ca or "-", msg.id, "policy",
                                      "the names asked for are not the configured gateway.tls-names")
        profile = self.h.profiles.get(TLS_PROFILE)
        if profile is None:
            return await self._refuse(actor, "gateway-tls", msg.ca or "-", msg.id, "policy", f"no profile {TLS_PROFILE}")
        ca = await self._pick_ca(TLS_PROFILE, msg.ca)
        await self.h.check_issuer(ca, profile, actor, "gateway-tls")
        ca_row = await self.h.store.run(self.h.store.ca_row, ca)
        ca_end = int(x509.load_der_x509_certificate(ca_row[4]).not_valid_after_utc.timestamp())
        sans = []
        for n in names:
            try:
                sans.append(("ip", gwpolicy.normal_name("ip", n)))
            except ValueError:
                sans.append(("dns", n.lower()))
        try:
            serialization.load_der_public_key(msg.spki)
        except ValueError:
            return await self._refuse(actor, "gateway-tls", ca, msg.id, "bad-request", "not a public key")
        now = int(time.time()) - BACKDATE
        serial = new_serial()
        item = S.IssueItem(profile=TLS_PROFILE, spki=msg.spki, subject=(("CN", names[0][:64]),), sans=tuple(sans),
                           serial=serial_bytes(serial), validity=S.Validity(now, min(now + TLS_DAYS * 86400, ca_end)))
        cert = await self.h.issue_one(ca, item, serial, actor, "gateway-tls", None, "the gateway's HTTPS server certificate")
        return S.GwIssued(id=msg.id, ca=ca, cert=cert.public_bytes(serialization.Encoding.DER),
                          chain=(await self.h.ca_chain(ca))[:8], serial=serial_bytes(serial))

    # ------------------------------------------------------------ key-value state

    async def state_get(self, msg: S.GwStateGet) -> S.GwState:
        value = await self.h.store.run(self.h.store.gateway_state_get, msg.ns, msg.key)
        return S.GwState(id=msg.id, value=value)

    async def state_put(self, msg: S.GwStatePut) -> S.Ok:
        def w():
            with self.h.store.tx():
                self.h.store.gateway_state_put(msg.ns, msg.key, msg.value)
        await self.h.store.run(w)
        return S.Ok(id=msg.id)


def eab_new() -> tuple[str, bytes]:
    """A fresh EAB key id and 256-bit HMAC key. The id never starts with "-" (1 in 64 of base64url's
    would): officers and clients type it as a command-line argument (`donjon acme eab-revoke KID`,
    `certbot --eab-kid`, `lego --eab.kid`), where it would be read as an option."""
    kid = secrets.token_urlsafe(12)
    while kid.startswith("-"):
        kid = secrets.token_urlsafe(12)
    return kid, secrets.token_bytes(32)


async def eab_admin(store: Store, audit: Callable[..., Awaitable[None]], actor: str, req) -> S.EabReply | S.EabListReply:
    """Officers' EAB keys (RFC 8555 §7.3.4): made, listed, revoked; each change audited."""
    def info(r) -> S.EabInfo:
        return S.EabInfo(kid=r[0], created_by=r[1], created_at=r[2], profiles=tuple(r[3].split()), name_patterns=tuple(r[4].split()),
                         account=r[5], revoked_at=r[6])
    if isinstance(req, S.AAcmeEabList):
        rows = await store.run(store.eab_rows)
        return S.EabListReply(id=req.id, keys=[info(r) for r in rows])
    if isinstance(req, S.AAcmeEabAdd):
        kid, key = eab_new()
        now = int(time.time())

        def add():
            db = store.require_active()
            with db.tx():
                store.eab_add(kid, key, actor, now, " ".join(req.profiles), " ".join(req.name_patterns))
                db.audit(actor, "acme-eab-add", kid, "ok", f"profiles={','.join(req.profiles) or 'all'} "
                                                           f"names={','.join(req.name_patterns) or 'any the gateway allows'}")
            return store.eab_row(kid)
        row = await store.run(add)
        return S.EabReply(id=req.id, eab=info(row), hmac_key=base64.urlsafe_b64encode(key).rstrip(b"=").decode())
    kid = req.kid

    def revoke():
        db = store.require_active()
        with db.tx():
            row = store.eab_row(kid)
            if row is None:
                db.audit(actor, "acme-eab-revoke", kid, "refused", "no such EAB key")
                return None
            if row[6] is None:
                store.eab_revoke(kid, int(time.time()))
                db.audit(actor, "acme-eab-revoke", kid, "ok", f"account {row[5] or '-'}")
            return store.eab_row(kid)
    row = await store.run(revoke)
    if row is None:
        raise FactoryError("not-found", f"no EAB key {kid!r}")
    return S.EabReply(id=req.id, eab=info(row))


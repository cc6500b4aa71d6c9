"""CRL-fed OCSP tenants in the Factory: configuration in the CMDB, CRL intake, feed to every endpoint.

A tenant is another CA the endpoint answers for from that CA's CRL. Every CRL, whatever brought it
(an officer's upload, an HTTP push to an endpoint, the Distribution agent's fetch), enters through
`crl_received`, which verifies it (policy.tenants.check_crl), stores it with its audit record in one
transaction and pushes it to every endpoint process; a refused CRL changes nothing (the previous one
keeps serving), is audited and reported as one line.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.ipc import schema as S
from appliance.ipc.channel import Channel
from policy.ocsp import issuer_hashes
from policy.responder import ResponderRefused, check_responder_cert
from policy.tenants import CrlRefused, check_ca_cert, check_crl, parse_issued_serials

from .cis_link import CisRefused
from .errors import FactoryError, _log
from .store import Store


class Feed(Protocol):
    """The endpoints' feed (ocsp.OcspProducer), named here so that neither module imports the other."""

    async def publish(self, msg: Any, only: Channel | None = None) -> None: ...
    async def ask_endpoint(self, make: Any, expect: Any) -> Any: ...

CHUNK = 4 * 1024 * 1024
RETRY_SECONDS = 60  # next fetch after an attempt that found no newer CRL past nextUpdate
_SECRET = re.compile(rb"^[A-Za-z0-9._~+/=-]{16,512}$")  # RFC 6750 b64token, at least 16 characters
_URL = re.compile(r"^(https?|ldaps?)://[^\s]+$")
@dataclass
class Info:
    """What the Factory keeps in memory of a tenant (the fetch plan is computed from it)."""

    name: str
    ca_der: bytes
    crl_urls: list[str]
    refresh: int
    unissued: str
    secret_sha256: bytes | None
    key_label: str | None  # the latest key `tenant csr` made (its certificate may not be installed yet)
    key_spki: bytes | None
    responder_label: str | None  # the key of the installed responder certificate
    responder_cert: bytes | None
    crl_number: int | None
    crl_this_update: int | None
    crl_next_update: int | None
    crl_source: str | None
    crl_at: int | None
    has_serials: bool
    last_refusal: str | None

    @property
    def ca(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.ca_der)

    def config(self) -> S.TenantConfig:
        return S.TenantConfig(tenant=self.name, ca_cert=self.ca_der, unissued=self.unissued,
                              push_secret_sha256=self.secret_sha256, responder_label=self.responder_label,
                              responder_cert=self.responder_cert)


def _fail(code: str, reason: str) -> FactoryError:
    return FactoryError(code, reason)


class TenantManager:
    def __init__(self, store: Store, ocsp: Feed, send_event: Callable[[S.Event], Awaitable[None]]):
        self.store = store
        self.ocsp = ocsp  # the endpoints' feed
        self.send_event = send_event
        self.info: dict[str, Info] = {}
        self.loaded = False
        self.attempts: dict[str, float] = {}  # last CRL intake attempt per tenant (any outcome)
        self.accepted = 0
        self.refused = 0
        self._locks: dict[str, trio.Lock] = {}
        self._pushes: dict[tuple[int, int], list[bytes]] = {}

    # ------------------------------------------------------------ state

    async def run(self) -> None:
        """Load the tenants once the CMDB is open (activation)."""
        while self.store.db is None:
            await trio.sleep(0.2)
        await self._reload()

    def _row(self, r) -> Info:
        return Info(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13],
                    r[14], bool(r[15]), r[16])

    async def _reload(self, name: str | None = None) -> None:
        if name is None:
            rows = await self.store.run(self.store.tenant_rows)
            self.info = {r[0]: self._row(r) for r in rows}
            self.loaded = True
            return
        row = await self.store.run(self.store.tenant_row, name)
        if row is None:
            self.info.pop(name, None)
        else:
            self.info[name] = self._row(row)

    async def _get(self, name: str) -> Info:
        self.store.require_active()
        if not self.loaded:
            await self._reload()
        t = self.info.get(name)
        if t is None:
            raise _fail("not-found", f"no OCSP tenant named {name!r}")
        return t

    def fetch_plan(self, now: float | None = None) -> list[tuple[str, list[str], float]]:
        """(tenant, CRL URLs, next fetch time) for every tenant with URLs: a refresh interval after
        the last intake attempt, or at the current CRL's nextUpdate if sooner; at once when nothing
        was ever received; a minute after an attempt that brought no usable CRL while none is held,
        or nothing newer once nextUpdate has passed.
        A fetch that fails before reaching `crl_received` is the fetcher's to back off."""
        now = time.time() if now is None else now
        plan = []
        for t in self.info.values():
            if not t.crl_urls:
                continue
            last = self.attempts.get(t.name) or t.crl_at
            if last is None or t.crl_next_update is None:
                nxt = now if last is None else last + RETRY_SECONDS
            else:
                nxt = last + t.refresh
                nxt = min(nxt, t.crl_next_update if t.crl_next_update > last else last + RETRY_SECONDS)
            plan.append((t.name, list(t.crl_urls), float(nxt)))
        return plan

    # ------------------------------------------------------------ feed

    async def publish(self, msgs: list, only: Channel | None = None) -> None:
        for m in msgs:
            await self.ocsp.publish(m, only)

    @staticmethod
    def _chunks(cls, tenant: str, data: bytes, **kw) -> list:
        out = []
        for i in range(0, max(len(data), 1), CHUNK):
            out.append(cls(tenant=tenant, data=data[i:i + CHUNK], last=i + CHUNK >= len(data), **kw))
        return out

    async def sync_endpoint(self, chan: Channel) -> None:
        """A (re)connected endpoint process: the tenant list, then each tenant's config, CRL and serials."""
        if not self.loaded:
            await self._reload()
        await self.publish([S.TenantSync(tenants=sorted(self.info))], chan)
        for name, t in sorted(self.info.items()):
            crl, serials = await self.store.run(self.store.tenant_crl_and_serials, name)
            msgs = [t.config()]
            if crl:
                msgs += self._chunks(S.TenantCrl, name, crl, number=t.crl_number or 0)
            if serials is not None:
                msgs += self._chunks(S.TenantSerials, name, serials)
            await self.publish(msgs, chan)

    async def on_push(self, chan: Channel, m: S.TenantCrlPush) -> None:
        """An endpoint forwards a CRL pushed to it over HTTP (it checked the bearer secret)."""
        key = (id(chan), m.id)
        parts = self._pushes.setdefault(key, [])
        parts.append(bytes(m.data))
        if sum(len(p) for p in parts) > 64 << 20 or len(self._pushes) > 64:
            self._pushes.clear()
            await chan.send(S.TenantPushResult(id=m.id, outcome="too large"))
            return
        if not m.last:
            return
        der = b"".join(self._pushes.pop(key))
        try:
            outcome = await self.crl_received(m.tenant, der, "http-push")
        except FactoryError as e:
            outcome = e.reason
        except Exception:  # noqa: BLE001 - a bug is logged whole; the endpoint gets one line and the Factory runs on
            _log("tenant CRL push:\n" + traceback.format_exc(limit=8))
            outcome = "internal error in the Factory"
        await chan.send(S.TenantPushResult(id=m.id, outcome=outcome[:4000]))

    # ------------------------------------------------------------ CRL intake

    async def crl_received(self, tenant: str, der: bytes, source: str) -> str:
        """The one entry point of every tenant CRL: 'accepted' or a one-line reason."""
        if self.store.db is None:
            return "unavailable: the CA is not activated"
        try:
            t = await self._get(tenant)
        except Exception as e:  # noqa: BLE001 - FactoryError
            return getattr(e, "reason", "no such tenant")
        lock = self._locks.setdefault(tenant, trio.Lock())
        async with lock:
            t = self.info.get(tenant, t)
            now = time.time()
            self.attempts[tenant] = now
            current = (t.crl_number, t.crl_this_update) if t.crl_number is not None else None
            try:
                crl = await trio.to_thread.run_sync(check_crl, t.ca, der, now, current)
            except CrlRefused as e:
                await self._refuse(t, source, str(e))
                return str(e)
            db = self.store.db
            same = await self.store.run(self.store.tenant_crl_is, tenant, der)
            if same:
                return "accepted"  # the CRL already in use (a scheduled fetch found nothing new)

            def store():
                with db.tx():
                    self.store.tenant_set_crl(tenant, crl.number, crl.this_update, crl.next_update, der, source[:200], int(now))
                    db.audit(source[:200], "tenant-crl", f"{tenant}#{crl.number}", "ok",
                             f"entries={len(crl.revoked)} nextUpdate={crl.next_update} sha256={hashlib.sha256(der).hexdigest()}")
            await self.store.run(store)
            await self._reload(tenant)
            self.accepted += 1
            await self.publish(self._chunks(S.TenantCrl, tenant, der, number=crl.number))
            return "accepted"

    async def _refuse(self, t: Info, source: str, reason: str) -> None:
        self.refused += 1
        db = self.store.db

        def w():
            with db.tx():
                self.store.tenant_set_refusal(t.name, f"{int(time.time())} {source[:100]}: {reason}")
                db.audit(source[:200], "tenant-crl", t.name, "refused", reason)
        await self.store.run(w)
        await self._reload(t.name)
        await self.send_event(S.Event(kind="tenant-crl-refused", detail=f"{t.name} ({source[:100]}): {reason}"[:4000]))

    # ------------------------------------------------------------ admin

    def _check_urls(self, urls) -> list[str]:
        for u in urls:
            if not _URL.match(u):
                raise _fail("bad-request", f"CRL URL {u!r}: only http://, https://, ldap:// and ldaps:// URLs")
        return list(urls)

    def _check_secret(self, secret: bytes | None) -> bytes | None:
        if secret is None:
            return None
        secret = secret.strip()
        if not _SECRET.match(secret):
            raise _fail("bad-request", "the push secret must be 16 to 512 characters of A-Z a-z 0-9 . _ ~ + / = -")
        return hashlib.sha256(secret).digest()

    async def _check_issuer_free(self, name: str, ca_der: bytes) -> None:
        mine = issuer_hashes(ca_der)["sha256"]
        cas = await self.store.run(self.store.ca_certs)
        for ca_name, der in cas:
            if issuer_hashes(der)["sha256"] == mine:
                raise _fail("exists", f"that CA is this appliance's own CA {ca_name!r}: it is answered from its own data")
        for other in self.info.values():
            if other.name != name and issuer_hashes(other.ca_der)["sha256"] == mine:
                raise _fail("exists", f"tenant {other.name!r} already answers for that CA")

    async def admin(self, req, actor: str) -> dict[str, Any]:
        if isinstance(req, S.AOcspTenantAdd):
            return await self.add(req, actor)
        if isinstance(req, S.AOcspTenantUpdate):
            return await self.update(req, actor)
        if isinstance(req, S.AOcspTenantRemove):
            return await self.remove(req.name, actor)
        if isinstance(req, S.AOcspTenantList):
            return {"tenants": await self.list()}
        if isinstance(req, S.AOcspTenantCsr):
            return await self.csr(req.name, actor)
        if isinstance(req, S.AOcspTenantCrl):
            await self._get(req.name)
            outcome = await self.crl_received(req.name, req.crl, f"cli:{actor}")
            if outcome != "accepted":
                raise _fail("policy", f"CRL refused: {outcome} (the previous CRL stays in use)")
            t = self.info[req.name]
            return {"tenant": req.name, "crl_number": t.crl_number, "next_update": t.crl_next_update}
        if isinstance(req, S.AOcspTenantSerials):
            return await self.serials(req.name, req.data, actor)
        raise _fail("bad-request", f"unsupported request {type(req).__name__}")

    async def add(self, req: S.AOcspTenantAdd, actor: str) -> dict[str, Any]:
        db = self.store.require_active()
        if not self.loaded:
            await self._reload()
        if req.name in self.info:
            raise _fail("exists", f"OCSP tenant {req.name!r} already exists (use `donjon ocsp tenant update`)")
        try:
            ca = check_ca_cert(req.ca_cert)
        except CrlRefused as e:
            await self.store.audit(actor, "tenant-add", req.name, "refused", str(e))
            raise _fail("bad-request", str(e)) from None
        urls = self._check_urls(req.crl_urls)
        secret = self._check_secret(req.push_secret)
        await self._check_issuer_free(req.name, req.ca_cert)

        def w():
            with db.tx():
                self.store.tenant_add(req.name, req.ca_cert, json.dumps(urls), req.refresh_seconds, req.unissued, secret, int(time.time()))
                db.audit(actor, "tenant-add", req.name, "ok",
                         f"{ca.subject.rfc4514_string()} urls={','.join(urls) or '-'} unissued={req.unissued} "
                         f"refresh={req.refresh_seconds}s push={'yes' if secret else 'no'}")
        await self.store.run(w)
        await self._reload(req.name)
        await self.publish([self.info[req.name].config()])
        return self._doc(self.info[req.name])

    async def update(self, req: S.AOcspTenantUpdate, actor: str) -> dict[str, Any]:
        t = await self._get(req.name)
        db = self.store.db
        sets: dict[str, Any] = {}
        what = []
        if req.crl_urls is not None:
            sets["crl_urls"] = json.dumps(self._check_urls(req.crl_urls))
            what.append(f"urls={','.join(req.crl_urls) or '-'}")
        if req.refresh_seconds is not None:
            sets["refresh_seconds"] = req.refresh_seconds
            what.append(f"refresh={req.refresh_seconds}s")
        if req.unissued is not None:
            sets["unissued"] = req.unissued
            what.append(f"unissued={req.unissued}")
        if req.push_secret is not None:
            sets["push_secret_sha256"] = self._check_secret(req.push_secret)
            what.append("push secret replaced")
        nocheck = None
        if req.responder_cert is not None:
            try:
                cert, nocheck = self._check_responder(t, req.responder_cert)
            except ResponderRefused as e:
                await self.store.audit(actor, "tenant-responder", req.name, "refused", str(e))
                raise _fail("policy", str(e)) from None
            sets["responder_cert"] = req.responder_cert
            sets["responder_label"] = t.key_label  # a new `tenant csr` later does not disturb this one
            what.append(f"responder certificate serial={cert.serial_number:x} until {cert.not_valid_after_utc.isoformat()}")
        if not sets:
            raise _fail("bad-request", "nothing to change")

        def w():
            with db.tx():
                self.store.tenant_update(req.name, sets)
                db.audit(actor, "tenant-update", req.name, "ok", "; ".join(what))
        await self.store.run(w)
        await self._reload(req.name)
        await self.publish([self.info[req.name].config()])
        doc = self._doc(self.info[req.name])
        if nocheck is not None:
            doc["responder_nocheck"] = nocheck
        return doc

    def _check_responder(self, t: Info, der: bytes) -> tuple[x509.Certificate, bool]:
        """The certificate the tenant CA issued for the key `tenant csr` made: that key, that issuer,
        id-kp-OCSPSigning, valid now. Returns it and whether it carries id-pkix-ocsp-nocheck."""
        if t.key_spki is None:
            raise ResponderRefused(f"tenant {t.name} has no responder key yet: run `donjon ocsp tenant csr {t.name}` first")
        return check_responder_cert(der, t.key_spki, issuer=t.ca, now=time.time())

    async def remove(self, name: str, actor: str) -> dict[str, Any]:
        await self._get(name)
        db = self.store.db

        def w():
            with db.tx():
                self.store.tenant_remove(name)
                db.audit(actor, "tenant-remove", name, "ok")
        await self.store.run(w)
        self.info.pop(name, None)
        self.attempts.pop(name, None)
        await self.publish([S.TenantRemove(tenant=name)])
        return {"removed": name}

    async def csr(self, name: str, actor: str) -> dict[str, Any]:
        """The endpoint makes the responder key in its own token and a CSR signed by it."""
        await self._get(name)
        try:
            m = await self.ocsp.ask_endpoint(lambda rid: S.TenantKeyRequest(id=rid, tenant=name), S.TenantCsr)
        except (CisRefused, trio.TooSlowError) as e:
            reason = getattr(e, "reason", "the OCSP endpoint did not answer")
            await self.store.audit(actor, "tenant-csr", name, "refused", reason)
            raise _fail("hsm", reason) from None
        try:
            csr = x509.load_der_x509_csr(m.csr)
            ok = csr.is_signature_valid and csr.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == m.spki
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            raise _fail("internal", "the endpoint returned a CSR that does not match its key")
        db = self.store.db

        def w():
            with db.tx():
                self.store.tenant_set_key(name, m.label, m.spki)
                db.audit(actor, "tenant-csr", name, "ok", f"key {m.label} in the endpoint's token")
        await self.store.run(w)
        await self._reload(name)
        return {"tenant": name, "label": m.label, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}

    async def serials(self, name: str, data: bytes | None, actor: str) -> dict[str, Any]:
        info = await self._get(name)
        count = None
        if data is not None:
            try:
                ca = x509.load_der_x509_certificate(info.ca_der)
                count = len(await trio.to_thread.run_sync(parse_issued_serials, data, ca))
            except CrlRefused as e:
                await self.store.audit(actor, "tenant-serials", name, "refused", str(e))
                raise _fail("bad-request", str(e)) from None
        db = self.store.db

        def w():
            with db.tx():
                self.store.tenant_set_serials(name, data)
                db.audit(actor, "tenant-serials", name, "ok",
                         f"{count} serials sha256={hashlib.sha256(data).hexdigest()}" if data is not None else "cleared")
        await self.store.run(w)
        await self._reload(name)
        if data is None:
            await self.publish([S.TenantSerials(tenant=name, data=b"", last=True, present=False)])
        else:
            await self.publish(self._chunks(S.TenantSerials, name, data))
        return {"tenant": name, "serials": count}

    async def list(self) -> list[dict[str, Any]]:
        self.store.require_active()
        if not self.loaded:
            await self._reload()
        return [self._doc(t) for _, t in sorted(self.info.items())]

    def _doc(self, t: Info) -> dict[str, Any]:
        resp = None
        if t.responder_cert:
            c = x509.load_der_x509_certificate(t.responder_cert)
            resp = {"serial": f"{c.serial_number:x}", "not_after": c.not_valid_after_utc.isoformat()}
        return {"name": t.name, "ca": t.ca.subject.rfc4514_string(), "crl_urls": t.crl_urls, "refresh_seconds": t.refresh,
                "unissued": t.unissued, "push": t.secret_sha256 is not None, "key_label": t.key_label, "responder": resp,
                "crl_number": t.crl_number, "crl_this_update": t.crl_this_update, "crl_next_update": t.crl_next_update,
                "crl_source": t.crl_source, "stale": t.crl_next_update is not None and t.crl_next_update <= time.time(),
                "issued_serials": t.has_serials, "last_refusal": t.last_refusal}

"""ACME's routes on the gateway (RFC 8555): directory, nonces, accounts, orders, authorizations, challenges, finalize, certificates, revocation, ARI (RFC 9773), profiles."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import secrets
import sys
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.ipc import schema as S
from policy import gwpolicy

from ..factory_link import FactoryUnavailable
from ..server import Reply, Request, Route
from .jose import Jwk, JoseError, Jws, b64d, b64e, jwk_of_key, key_authorization, parse_jwk, parse_jws
from .store import AcmeStore, Nonces
from .validate import Failed, Validator

ERR = "urn:ietf:params:acme:error:"
STATUS = {"badNonce": 400, "malformed": 400, "unauthorized": 403, "accountDoesNotExist": 400, "rateLimited": 429,
          "serverInternal": 500, "rejectedIdentifier": 400, "badCSR": 400, "orderNotReady": 403, "alreadyRevoked": 400,
          "badRevocationReason": 400, "externalAccountRequired": 400, "badPublicKey": 400, "badSignatureAlgorithm": 400,
          "invalidProfile": 400, "unsupportedIdentifier": 400, "conflict": 409, "incorrectResponse": 403, "connection": 400,
          "dns": 400, "tls": 400, "userActionRequired": 403}
FACTORY_ERRORS = {"unauthorized": "unauthorized", "rejected-identifier": "rejectedIdentifier", "bad-csr": "badCSR",
                  "policy": "rejectedIdentifier", "already-revoked": "alreadyRevoked", "not-found": "malformed",
                  "bad-request": "malformed", "inactive": "serverInternal", "busy": "serverInternal", "internal": "serverInternal"}
REVOCATION_REASONS = (0, 1, 3, 4, 5, 9)  # RFC 5280 reasons a subscriber may give (no CA compromise, hold or removeFromCRL)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_IDENTIFIERS = 100
ARI_RETRY = 6 * 3600
JOSE = b"application/jose+json"


class Problem(Exception):
    def __init__(self, kind: str, detail: str, status: int | None = None, headers: list | None = None, extra: dict | None = None):
        super().__init__(detail)
        self.kind, self.detail = kind, detail
        self.status = status or STATUS.get(kind, 400)
        self.headers = headers or []
        self.extra = extra or {}


def _now() -> int:
    return int(time.time())


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_identifier(ident: Any, wildcard_ok: bool = True) -> tuple[str, str]:
    """(type, value) of a newOrder identifier, normalised; Problem if it is not one we issue for."""
    if not isinstance(ident, dict) or set(ident) - {"type", "value"}:
        raise Problem("malformed", "an identifier is an object with type and value")
    t, v = ident.get("type"), ident.get("value")
    if not isinstance(v, str) or not v or len(v) > 253:
        raise Problem("malformed", "identifier value missing or too long")
    if t == "ip":
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise Problem("malformed", f"{v[:64]!r} is not an IP address") from None
        return "ip", str(ip)
    if t != "dns":
        raise Problem("unsupportedIdentifier", f"identifier type {str(t)[:20]!r} is not supported (dns, ip)")
    v = v.lower()
    labels = v.split(".")
    if labels[0] == "*" and wildcard_ok:
        labels = labels[1:]
    if len(labels) < 2 or not all(_LABEL.match(lb) for lb in labels) or labels[-1].isdigit():
        raise Problem("rejectedIdentifier", f"{v[:64]!r} is not a fully qualified DNS name")
    return "dns", v


class Acme:
    """The ACME server: sans-IO-ish handlers over the store, the Factory link and the validator."""

    def __init__(self, ctx, store: AcmeStore):
        self.ctx = ctx
        self.cfg: S.AcmeSettings = ctx.cfg.acme
        self.base = ctx.cfg.base_url + "/acme"
        self.store = store
        self.nonces = Nonces()
        self.validator = Validator(ctx.net, self.cfg.resolver, self.cfg.http01_port, self.cfg.tlsalpn01_port)
        self.profiles = {p.name: p for p in self.cfg.profiles}
        self.db_limiter = trio.CapacityLimiter(1)
        self.validations = trio.CapacityLimiter(64)
        self.nursery: trio.Nursery | None = None
        self.new_accounts: dict[str, deque] = {}

    async def db(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.db_limiter)

    async def run(self) -> None:
        """Background: the nursery challenge validations run in, and the expiry sweep."""
        async with trio.open_nursery() as n:
            self.nursery = n
            while True:
                await self.db(self.store.purge, _now())
                await trio.sleep(300)

    # ------------------------------------------------------------ HTTP

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def _reply(self, status: int, doc: Any = None, headers: list | None = None, ctype: bytes = b"application/json",
               body: bytes | None = None) -> Reply:
        hdrs = [(b"replay-nonce", self.nonces.new().encode()), (b"cache-control", b"no-store"),
                (b"link", f'<{self.url("directory")}>;rel="index"'.encode())]
        hdrs += headers or []
        if body is None and doc is not None:
            body = json.dumps(doc).encode()
        if body is not None:
            hdrs.append((b"content-type", ctype))
        return Reply(status, hdrs, body or b"")

    def problem(self, p: Problem) -> Reply:
        doc = {"type": ERR + p.kind, "detail": p.detail[:1000], "status": p.status, **p.extra}
        return self._reply(p.status, doc, p.headers, ctype=b"application/problem+json")

    async def handle(self, req: Request) -> Reply:
        try:
            return await self._route(req)
        except Problem as p:
            if p.kind == "serverInternal":
                self.ctx.stats.errors += 1
            return self.problem(p)
        except JoseError as e:
            extra = {"algorithms": ["ES256", "ES384", "RS256", "EdDSA"]} if e.kind == "badSignatureAlgorithm" else None
            return self.problem(Problem(e.kind, e.detail, extra=extra))
        except FactoryUnavailable as e:
            return self.problem(Problem("serverInternal", f"the CA is unavailable: {e}", 503, [(b"retry-after", b"10")]))

    async def _route(self, req: Request) -> Reply:
        p = req.path.removeprefix("/acme/")
        if p == "directory":
            return self.directory()
        if p == "new-nonce":
            if req.method not in (b"GET", b"HEAD"):
                raise Problem("malformed", "newNonce takes HEAD or GET")
            return self._reply(200 if req.method == b"HEAD" else 204)
        if p.startswith("renewal-info/") and req.method in (b"GET", b"HEAD"):
            return await self.renewal_info(p.removeprefix("renewal-info/"))
        if req.method != b"POST":
            raise Problem("malformed", "ACME resources take POST (or POST-as-GET)", 405, [(b"allow", b"POST")])
        if req.headers.get(b"content-type", b"").split(b";")[0].strip().lower() != JOSE:
            raise Problem("malformed", "Content-Type must be application/jose+json", 415)
        jws = parse_jws(req.body)
        if jws.url != self.base + "/" + p:
            raise Problem("unauthorized", "the JWS url is not this resource's URL")
        if not self.nonces.use(jws.nonce or ""):
            raise Problem("badNonce", "nonce unknown, used already or from before a restart")
        if p == "new-account":
            return await self.new_account(req, jws)
        if p == "revoke-cert":
            return await self.revoke(jws)
        acct = await self.account_of(jws)
        if p == "key-change":
            return await self.key_change(jws, acct)
        if p == "new-order":
            return await self.new_order(jws, acct)
        parts = p.split("/")
        if parts[0] == "acct" and len(parts) == 2:
            return await self.account_update(jws, acct, parts[1])
        if parts[0] == "acct" and len(parts) == 3 and parts[2] == "orders":
            return await self.orders_list(jws, acct, parts[1])
        if parts[0] == "order" and len(parts) == 2:
            return await self.order_get(jws, acct, parts[1])
        if parts[0] == "order" and len(parts) == 3 and parts[2] == "finalize":
            return await self.finalize(jws, acct, parts[1])
        if parts[0] == "authz" and len(parts) == 2:
            return await self.authz_post(jws, acct, parts[1])
        if parts[0] == "chall" and len(parts) == 3:
            return await self.challenge(jws, acct, parts[1], parts[2])
        if parts[0] == "cert" and len(parts) == 2:
            return await self.cert_get(jws, acct, parts[1])
        raise Problem("malformed", "no such resource", 404)

    def directory(self) -> Reply:
        doc = {"newNonce": self.url("new-nonce"), "newAccount": self.url("new-account"), "newOrder": self.url("new-order"),
               "revokeCert": self.url("revoke-cert"), "keyChange": self.url("key-change"), "renewalInfo": self.url("renewal-info"),
               "meta": {"profiles": {p.name: p.description or f"Donjon profile {p.profile}" for p in self.cfg.profiles},
                        "externalAccountRequired": self.cfg.eab_required}}
        return Reply(200, [(b"content-type", b"application/json"), (b"cache-control", b"public, max-age=60")], json.dumps(doc).encode())

    # ------------------------------------------------------------ accounts

    def acct_url(self, aid: int) -> str:
        return self.url(f"acct/{aid}")

    async def account_of(self, jws: Jws) -> dict:
        """The account of a kid-signed JWS, its signature checked; Problem if unknown or not valid."""
        if jws.kid is None:
            raise Problem("malformed", "this resource wants a JWS with kid (the account URL), not jwk")
        prefix = self.url("acct/")
        if not jws.kid.startswith(prefix) or not jws.kid[len(prefix):].isdigit() or len(jws.kid) - len(prefix) > 18:
            raise Problem("accountDoesNotExist", "kid is not an account URL of this server")
        acct = await self.db(self.store.account, int(jws.kid[len(prefix):]))
        if acct is None:
            raise Problem("accountDoesNotExist", "no such account")
        jws.verify(parse_jwk(json.loads(acct["jwk"])))
        if acct["status"] != "valid":
            raise Problem("unauthorized", f"account is {acct['status']}")
        return acct

    def account_doc(self, acct: dict) -> dict:
        doc: dict[str, Any] = {"status": acct["status"], "contact": acct["contact"], "orders": self.url(f"acct/{acct['id']}/orders"),
                               "key": json.loads(acct["jwk"]), "createdAt": rfc3339(acct["created"])}
        if acct["eab_kid"]:
            doc["externalAccountBinding"] = {"kid": acct["eab_kid"]}
        return doc

    def _contact(self, v: Any) -> list[str]:
        if v is None:
            return []
        if not isinstance(v, list) or len(v) > 8 or not all(isinstance(c, str) and c.startswith("mailto:") and 8 < len(c) < 256 for c in v):
            raise Problem("malformed", "contact: up to 8 mailto: URLs")
        return v

    async def new_account(self, req: Request, jws: Jws) -> Reply:
        if jws.jwk is None:
            raise Problem("malformed", "newAccount wants a JWS with jwk")
        jws.verify(jws.jwk)
        payload = jws.payload_json()
        existing = await self.db(self.store.account_by_thumbprint, jws.jwk.thumbprint)
        if existing is not None:
            return self._reply(200, self.account_doc(existing), [(b"location", self.acct_url(existing["id"]).encode())])
        if payload.get("onlyReturnExisting") is True:
            raise Problem("accountDoesNotExist", "no account for this key")
        contact = self._contact(payload.get("contact"))
        src = req.source or "-"
        q = self.new_accounts.setdefault(src, deque())
        now = time.monotonic()
        while q and now - q[0] > 3600:
            q.popleft()
        if len(q) >= self.cfg.new_accounts_per_hour:
            raise Problem("rateLimited", f"too many new accounts from {src} in the last hour", headers=[(b"retry-after", b"3600")])
        if len(self.new_accounts) > 100_000:
            self.new_accounts.clear()  # bounded memory: a flood of sources forgets the counts
        aid = await self.db(self.store.next_account_id)
        eab = payload.get("externalAccountBinding")
        kid, profiles, patterns = None, (), ()
        if eab is None and self.cfg.eab_required:
            raise Problem("externalAccountRequired", "this server requires an external account binding (ask an officer for an EAB key)")
        if eab is not None:
            kid, profiles, patterns = await self.bind(eab, jws, aid)
        q.append(now)
        acct = await self.db(self.store.create_account, aid, jws.jwk.thumbprint, jws.jwk.canonical, contact, kid, profiles, patterns)
        return self._reply(201, self.account_doc(acct), [(b"location", self.acct_url(acct["id"]).encode())])

    async def bind(self, eab: Any, jws: Jws, aid: int) -> tuple[str, tuple, tuple]:
        """RFC 8555 §7.3.4: the inner JWS's url is newAccount's, its payload the account key; the
        Factory checks the MAC with the officer-made key and binds it to the account."""
        if not isinstance(eab, dict):
            raise Problem("malformed", "externalAccountBinding must be a JWS object")
        try:
            prot = json.loads(b64d(eab.get("protected"), "eab.protected", 4096))
            payload = json.loads(b64d(eab.get("payload"), "eab.payload", 8192))
        except (ValueError, UnicodeDecodeError):
            raise Problem("malformed", "externalAccountBinding: not a JWS") from None
        if not isinstance(prot, dict) or prot.get("url") != self.url("new-account") or not isinstance(prot.get("kid"), str):
            raise Problem("malformed", "externalAccountBinding: its url must be newAccount's and it must name a kid")
        if not isinstance(payload, dict) or parse_jwk(payload).thumbprint != jws.jwk.thumbprint:  # type: ignore[union-attr]
            raise Problem("malformed", "externalAccountBinding: its payload must be the account key")
        sig = eab.get("signature")
        if not isinstance(sig, str) or len(prot["kid"]) > 128:
            raise Problem("malformed", "externalAccountBinding: signature missing")
        r = await self.ctx.factory.request(lambda i: S.GwEabCheck(id=i, kid=prot["kid"], protected=eab["protected"],
                                                                  payload=eab["payload"], signature=sig, account=self.acct_url(aid)))
        if isinstance(r, S.GwRefused):
            raise Problem(FACTORY_ERRORS.get(r.code, "serverInternal"), r.reason)
        if not r.ok:
            raise Problem("unauthorized", f"external account binding refused: {r.reason}")
        return prot["kid"], tuple(r.profiles), tuple(r.name_patterns)

    async def account_update(self, jws: Jws, acct: dict, aid: str) -> Reply:
        if aid != str(acct["id"]):
            raise Problem("unauthorized", "this is another account")
        if jws.payload == b"":
            return self._reply(200, self.account_doc(acct))
        payload = jws.payload_json()
        if payload.get("status") == "deactivated":
            await self.db(lambda: self.store.update_account(acct["id"], status="deactivated"))
            acct = {**acct, "status": "deactivated"}
        elif "status" in payload:
            raise Problem("malformed", "an account's status can only be set to deactivated")
        if "contact" in payload:
            contact = self._contact(payload["contact"])
            await self.db(lambda: self.store.update_account(acct["id"], contact=contact))
            acct = {**acct, "contact": contact}
        return self._reply(200, self.account_doc(acct))

    async def key_change(self, jws: Jws, acct: dict) -> Reply:
        inner = parse_jws(jws.payload, outer=False)
        if inner.jwk is None:
            raise Problem("malformed", "key change: the inner JWS must carry the new key (jwk)")
        if inner.url != jws.url:
            raise Problem("malformed", "key change: the inner JWS url must be keyChange's")
        inner.verify(inner.jwk)
        payload = inner.payload_json()
        if payload.get("account") != self.acct_url(acct["id"]):
            raise Problem("malformed", "key change: account is not the signer's")
        try:
            old = parse_jwk(payload.get("oldKey"))
        except JoseError:
            raise Problem("malformed", "key change: oldKey is not a key") from None
        if old.thumbprint != acct["thumbprint"]:
            raise Problem("malformed", "key change: oldKey is not the account's current key")
        other = await self.db(self.store.account_by_thumbprint, inner.jwk.thumbprint)
        if other is not None:
            raise Problem("conflict", "the new key belongs to an account already", headers=[(b"location", self.acct_url(other["id"]).encode())])
        if not await self.db(self.store.key_change, acct["id"], acct["thumbprint"], inner.jwk.thumbprint, inner.jwk.canonical):
            raise Problem("conflict", "the key changed meanwhile")
        acct = await self.db(self.store.account, acct["id"])
        return self._reply(200, self.account_doc(acct))

    # ------------------------------------------------------------ orders

    def order_doc(self, o: dict) -> dict:
        return {k: v for k, v in o.items() if not k.startswith("_")}

    async def new_order(self, jws: Jws, acct: dict) -> Reply:
        payload = jws.payload_json()
        idents = payload.get("identifiers")
        if not isinstance(idents, list) or not idents or len(idents) > MAX_IDENTIFIERS:
            raise Problem("malformed", f"identifiers: 1 to {MAX_IDENTIFIERS}")
        names = sorted({check_identifier(i) for i in idents})
        if payload.get("notBefore") is not None:
            raise Problem("malformed", "notBefore is not supported (certificates start when issued)")
        not_after = None
        if payload.get("notAfter") is not None:
            try:
                not_after = int(datetime.fromisoformat(str(payload["notAfter"]).replace("Z", "+00:00")).timestamp())
            except ValueError:
                raise Problem("malformed", "notAfter: an RFC 3339 date") from None
        pname = payload.get("profile", self.cfg.default_profile)
        if pname not in self.profiles or (acct["profiles"] and pname not in acct["profiles"]):
            allowed = [n for n in self.profiles if not acct["profiles"] or n in acct["profiles"]]
            raise Problem("invalidProfile", f"profile {str(pname)[:64]!r} is not offered to this account (offered: {', '.join(allowed)})")
        pats = [tuple(self.cfg.name_patterns)] + ([acct["patterns"]] if acct["patterns"] else [])
        subs = []
        for t, v in names:
            if any(not gwpolicy.name_allowed(t, v, p) for p in pats):
                subs.append({"type": ERR + "rejectedIdentifier", "detail": f"{v} is outside this account's names",
                             "identifier": {"type": t, "value": v}})
        if subs:
            raise Problem("rejectedIdentifier", "identifiers outside this account's policy: " +
                          ", ".join(s["identifier"]["value"] for s in subs)[:500], extra={"subproblems": subs})
        replaces = payload.get("replaces")
        if replaces is not None:
            old = await self.db(self.store.cert_by_ari, replaces) if isinstance(replaces, str) and len(replaces) < 256 else None
            if old is None or old["account"] != acct["id"]:
                raise Problem("malformed", "replaces: not a certificate of this account")
            if old["replaced_by"]:
                raise Problem("conflict", "replaces: that certificate was replaced already")
        now = _now()
        if await self.db(self.store.orders_since, acct["id"], now - 3600) >= self.cfg.orders_per_hour:
            raise Problem("rateLimited", f"more than {self.cfg.orders_per_hour} new orders in the last hour", headers=[(b"retry-after", b"600")])
        if await self.db(self.store.open_orders_of, acct["id"]) >= self.cfg.max_open_orders:
            raise Problem("rateLimited", "too many open orders for this account", headers=[(b"retry-after", b"600")])
        oid = secrets.token_urlsafe(12)
        expires = now + self.cfg.order_lifetime
        az_expires = min(expires, now + self.cfg.authz_lifetime)
        items = []
        authz_urls = []
        for t, v in names:
            zid = secrets.token_urlsafe(12)
            wildcard = v.startswith("*.")
            types = ["dns-01"] if wildcard else (["http-01", "tls-alpn-01"] if t == "ip" else ["http-01", "dns-01", "tls-alpn-01"])
            chals = [{"type": ty, "url": self.url(f"chall/{zid}/{i}"), "token": secrets.token_urlsafe(32), "status": "pending"}
                     for i, ty in enumerate(types)]
            doc = {"identifier": {"type": t, "value": v.removeprefix("*.")}, "status": "pending", "expires": rfc3339(az_expires),
                   "challenges": chals, "_order": oid, "_exp": az_expires, "_created": now}
            if wildcard:
                doc["wildcard"] = True
            items.append(("authz", zid, acct["id"], az_expires, "pending", doc))
            authz_urls.append(self.url(f"authz/{zid}"))
        order = {"status": "pending", "expires": rfc3339(expires), "identifiers": [{"type": t, "value": v} for t, v in names],
                 "authorizations": authz_urls, "finalize": self.url(f"order/{oid}/finalize"), "profile": pname,
                 "_exp": expires, "_created": now, "_notafter": not_after}
        if replaces:
            order["replaces"] = replaces
        if not_after:
            order["notAfter"] = rfc3339(not_after)
        items.insert(0, ("order", oid, acct["id"], expires, "pending", order))
        await self.db(self.store.put_many, items)
        return self._reply(201, self.order_doc(order), [(b"location", self.url(f"order/{oid}").encode())])

    async def _order(self, acct: dict, oid: str) -> dict:
        o = await self.db(self.store.get, "order", oid) if _ID.match(oid) else None
        if o is None:
            raise Problem("malformed", "no such order", 404)
        if await self.db(self.store.owner, oid) != acct["id"]:
            raise Problem("unauthorized", "this order belongs to another account")
        return await self._refresh(oid, acct["id"], o)

    async def _refresh(self, oid: str, account: int, o: dict) -> dict:
        """An order's status from its authorizations and its expiry."""
        if o["status"] in ("pending", "ready"):
            status = o["status"]
            if _now() >= o["_exp"]:
                status = "invalid"
                o["error"] = {"type": ERR + "malformed", "detail": "the order expired"}
            elif o["status"] == "pending":
                states = []
                for u in o["authorizations"]:
                    z = await self.db(self.store.get, "authz", u.rsplit("/", 1)[1])
                    states.append(self._authz_status(z) if z else "invalid")
                if any(s in ("invalid", "deactivated", "expired", "revoked") for s in states):
                    status = "invalid"
                    o["error"] = {"type": ERR + "unauthorized", "detail": "an authorization of this order is not valid"}
                elif all(s == "valid" for s in states):
                    status = "ready"
            if status != o["status"]:
                o["status"] = status
                await self.db(lambda: self.store.put("order", oid, account, o["_exp"], status, o))
        return o

    def _authz_status(self, z: dict) -> str:
        if z["status"] == "pending" and _now() >= z["_exp"]:
            return "expired"
        return z["status"]

    async def order_get(self, jws: Jws, acct: dict, oid: str) -> Reply:
        o = await self._order(acct, oid)
        return self._reply(200, self.order_doc(o), [(b"location", self.url(f"order/{oid}").encode())] +
                           ([(b"retry-after", b"1")] if o["status"] == "processing" else []))

    async def orders_list(self, jws: Jws, acct: dict, aid: str) -> Reply:
        if aid != str(acct["id"]):
            raise Problem("unauthorized", "this is another account")
        ids = await self.db(self.store.orders_of, acct["id"])
        return self._reply(200, {"orders": [self.url(f"order/{i}") for i in ids]})

    async def authz_post(self, jws: Jws, acct: dict, zid: str) -> Reply:
        z = await self._authz(acct, zid)
        if jws.payload != b"":
            payload = jws.payload_json()
            if payload.get("status") != "deactivated":
                raise Problem("malformed", "an authorization can only be deactivated")
            if z["status"] in ("pending", "valid"):
                z["status"] = "deactivated"
                await self.db(lambda: self.store.put("authz", zid, acct["id"], z["_exp"], "deactivated", z))
        z = {**z, "status": self._authz_status(z)}
        return self._reply(200, self.order_doc(z))

    async def _authz(self, acct: dict, zid: str) -> dict:
        z = await self.db(self.store.get, "authz", zid) if _ID.match(zid) else None
        if z is None:
            raise Problem("malformed", "no such authorization", 404)
        if await self.db(self.store.owner, zid) != acct["id"]:
            raise Problem("unauthorized", "this authorization belongs to another account")
        return z

    async def challenge(self, jws: Jws, acct: dict, zid: str, idx: str) -> Reply:
        z = await self._authz(acct, zid)
        if not idx.isdigit() or int(idx) >= len(z["challenges"]):
            raise Problem("malformed", "no such challenge", 404)
        ch = z["challenges"][int(idx)]
        link = [(b"link", f'<{self.url(f"authz/{zid}")}>;rel="up"'.encode())]
        if jws.payload != b"" and self._authz_status(z) == "pending" and ch["status"] == "pending":
            if jws.payload_json() != {}:
                raise Problem("malformed", "a challenge is answered with {}")
            if any(c["status"] == "processing" for c in z["challenges"]):
                return self._reply(200, ch, link)
            ch["status"] = "processing"
            await self.db(lambda: self.store.put("authz", zid, acct["id"], z["_exp"], "pending", z))
            jwk = parse_jwk(json.loads(acct["jwk"]))
            assert self.nursery is not None
            self.nursery.start_soon(self._validate, zid, int(idx), acct["id"], jwk)
        return self._reply(200, ch, link)

    async def _validate(self, zid: str, idx: int, account: int, jwk: Jwk) -> None:
        async with self.validations:
            z = await self.db(self.store.get, "authz", zid)
            ch = z["challenges"][idx]
            ident = z["identifier"]
            ka = key_authorization(ch["token"], jwk)
            value = ("*." if z.get("wildcard") else "") + ident["value"]
            try:
                if ch["type"] == "http-01":
                    await self.validator.http01(ident["type"], ident["value"], ch["token"], ka)
                elif ch["type"] == "dns-01":
                    await self.validator.dns01(value, ka)
                else:
                    await self.validator.tlsalpn01(ident["type"], ident["value"], ka)
                ch["status"], ch["validated"] = "valid", rfc3339(_now())
                z["status"] = "valid"
            except Failed as e:
                ch["status"] = "invalid"
                ch["error"] = {"type": ERR + e.kind, "detail": e.detail[:500], "status": STATUS.get(e.kind, 400)}
                z["status"] = "invalid"
            except Exception as e:  # noqa: BLE001 - a validation bug fails this challenge, never the role
                print(f"donjon[gateway]: validation error: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                ch["status"] = "invalid"
                ch["error"] = {"type": ERR + "serverInternal", "detail": "validation failed on the server", "status": 500}
                z["status"] = "invalid"
            await self.db(lambda: self.store.put("authz", zid, account, z["_exp"], z["status"], z))

    # ------------------------------------------------------------ finalize and certificates

    async def finalize(self, jws: Jws, acct: dict, oid: str) -> Reply:
        o = await self._order(acct, oid)
        if o["status"] != "ready":
            raise Problem("orderNotReady", f"the order is {o['status']}, not ready")
        try:
            der = b64d(jws.payload_json().get("csr"), "csr", 16 * 1024)
            csr = x509.load_der_x509_csr(der)
            if not csr.is_signature_valid:
                raise Problem("badCSR", "the CSR's signature does not verify")
            try:
                san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                got = {("dns", n.lower()) for n in san.get_values_for_type(x509.DNSName)}
                got |= {("ip", str(ip)) for ip in san.get_values_for_type(x509.IPAddress)}
            except x509.ExtensionNotFound:
                got = set()
            cns = [a.value for a in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        except Problem:
            raise
        except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType, NotImplementedError):
            raise Problem("badCSR", "the CSR cannot be parsed") from None
        want = {(i["type"], i["value"]) for i in o["identifiers"]}
        if got != want or any(str(cn).lower() not in {v for _, v in want} for cn in cns):
            raise Problem("badCSR", "the CSR's names are not the order's identifiers")
        o["status"] = "processing"
        await self.db(lambda: self.store.put("order", oid, acct["id"], o["_exp"], "processing", o))
        prof = self.profiles[o["profile"]]
        try:
            r = await self.ctx.factory.request(lambda i: S.GwEnroll(
                id=i, protocol="acme", auth=S.GwAuth(kind="eab" if acct["eab_kid"] else "acme-account", ident=self.acct_url(acct["id"]),
                                                     eab_kid=acct["eab_kid"]),
                ca=prof.ca, profile=prof.profile, names=tuple(sorted(want)), csr=der, not_after=o.get("_notafter"),
                replaces=o.get("replaces")))
        except FactoryUnavailable:
            o["status"] = "ready"  # nothing was issued: the client may finalize again
            await self.db(lambda: self.store.put("order", oid, acct["id"], o["_exp"], "ready", o))
            raise
        if isinstance(r, S.GwIssued):
            cert = x509.load_der_x509_certificate(r.cert)
            chain = [cert] + [x509.load_der_x509_certificate(d) for d in r.chain]
            chain = [c for c in chain if c.issuer != c.subject or c is cert]  # the root is the relying party's
            pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
            cid = secrets.token_urlsafe(12)
            await self.db(self.store.add_cert, cid, acct["id"], oid, r.ca, f"{cert.serial_number:x}", ari_id(cert),
                          int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp()), pem, o.get("replaces"))
            o["status"], o["certificate"] = "valid", self.url(f"cert/{cid}")
            self.ctx.stats.issued += 1
        else:
            code = r.code if isinstance(r, S.GwRefused) else "internal"
            reason = r.reason if isinstance(r, S.GwRefused) else "no certificate"
            if code == "unauthorized" and "revoked" in reason:  # its EAB key was revoked by an officer
                await self.db(lambda: self.store.update_account(acct["id"], status="revoked"))
            o["status"] = "invalid"
            o["error"] = {"type": ERR + FACTORY_ERRORS.get(code, "serverInternal"), "detail": reason[:500]}
            self.ctx.stats.refused += 1
        await self.db(lambda: self.store.put("order", oid, acct["id"], o["_exp"], o["status"], o))
        if o["status"] == "invalid":
            raise Problem(o["error"]["type"].removeprefix(ERR), o["error"]["detail"])
        return self._reply(200, self.order_doc(o), [(b"location", self.url(f"order/{oid}").encode())])

    async def cert_get(self, jws: Jws, acct: dict, cid: str) -> Reply:
        c = await self.db(self.store.cert, cid) if _ID.match(cid) else None
        if c is None:
            raise Problem("malformed", "no such certificate", 404)
        if c["account"] != acct["id"]:
            raise Problem("unauthorized", "this certificate belongs to another account")
        return self._reply(200, headers=[], body=c["chain"].encode(), ctype=b"application/pem-certificate-chain")

    # ------------------------------------------------------------ revocation

    async def revoke(self, jws: Jws) -> Reply:
        payload = jws.payload_json()
        try:
            der = b64d(payload.get("certificate"), "certificate", 16 * 1024)
            cert = x509.load_der_x509_certificate(der)
        except (ValueError, JoseError):
            raise Problem("malformed", "certificate: a base64url DER certificate") from None
        reason = payload.get("reason", 0)
        if not isinstance(reason, int) or isinstance(reason, bool) or reason not in REVOCATION_REASONS:
            raise Problem("badRevocationReason", f"reason must be one of {', '.join(map(str, REVOCATION_REASONS))}")
        if jws.jwk is not None:  # signed with the certificate's own key
            jws.verify(jws.jwk)
            ck = jwk_of_key(cert.public_key())
            if ck is None or ck.thumbprint != jws.jwk.thumbprint:
                raise Problem("unauthorized", "the JWS key is not the certificate's key")
            auth = S.GwAuth(kind="acme-account", ident=f"certificate-key:{jws.jwk.thumbprint}")
            proof = "cert-key"
        else:
            acct = await self.account_of(jws)
            auth = S.GwAuth(kind="eab" if acct["eab_kid"] else "acme-account", ident=self.acct_url(acct["id"]), eab_kid=acct["eab_kid"])
            proof = "account"
        r = await self.ctx.factory.request(lambda i: S.GwRevoke(id=i, protocol="acme", auth=auth, cert=der, reason=reason, proof=proof))
        if isinstance(r, S.GwRefused):
            raise Problem(FACTORY_ERRORS.get(r.code, "serverInternal"), r.reason)
        return self._reply(200)

    # ------------------------------------------------------------ ARI (RFC 9773)

    async def renewal_info(self, cert_id: str) -> Reply:
        if len(cert_id) > 200 or cert_id.count(".") != 1:
            raise Problem("malformed", "a renewalInfo id is base64url(AKI keyIdentifier).base64url(serial)", 400)
        aki, serial = cert_id.split(".")
        try:
            b64d(aki, "AKI", 100)
            sb = b64d(serial, "serial", 40)
        except JoseError as e:
            raise Problem("malformed", e.detail) from None
        c = await self.db(self.store.cert_by_ari, cert_id)
        if c is None:
            raise Problem("malformed", "no certificate of this server with that id", 404)
        r = await self.ctx.factory.request(lambda i: S.GwCertStatus(id=i, ca=c["ca"], serial=sb.lstrip(b"\x00") or b"\x00"))
        if isinstance(r, S.GwRefused):
            raise Problem(FACTORY_ERRORS.get(r.code, "serverInternal"), r.reason)
        start, end = renewal_window(c["not_before"], c["not_after"], cert_id, self.cfg.renewal_fraction, r.revoked, r.ca_not_after)
        doc: dict[str, Any] = {"suggestedWindow": {"start": rfc3339(start), "end": rfc3339(end)}}
        if r.revoked:
            doc["explanationURL"] = self.url("directory")
        return Reply(200, [(b"content-type", b"application/json"), (b"retry-after", str(ARI_RETRY).encode())], json.dumps(doc).encode())


def ari_id(cert: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(DER serial content)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    n = cert.serial_number
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")  # two's complement: a leading zero when the top bit is set
    if len(raw) > 1 and raw[0] == 0 and raw[1] < 0x80:
        raw = raw[1:]
    return f"{b64e(aki)}.{b64e(raw)}"


def renewal_window(nb: int, na: int, cert_id: str, fraction: float, revoked: bool, ca_not_after: int) -> tuple[int, int]:
    """The suggested window: in the last `fraction` of the lifetime, each certificate its own slice
    (a hash of its id), so that certificates issued together do not renew together. A revoked
    certificate's window is now; a CA ending before the certificate moves it before the CA's end."""
    now = _now()
    if revoked:
        return now - 3600, now
    life = max(1, na - nb)
    span = life * fraction
    h = int.from_bytes(hashlib.sha256(cert_id.encode()).digest()[:4], "big") / 2**32
    start = na - span + h * span * 0.5
    end = start + span * 0.25
    if ca_not_after and ca_not_after < na:  # the CA retires first: renew well before it does
        end = min(end, ca_not_after - span * 0.5)
        start = min(start, end - span * 0.25)
    return int(start), int(max(end, start + 60))


def routes(ctx, body_cap: int) -> list[Route]:
    """The ACME routes, its store (in the gateway's folder) and its background task."""
    store = AcmeStore(ctx.cfg.store_dir)
    acme = Acme(ctx, store)
    ctx.background.append(acme.run)
    ctx.closers.append(store.close)
    ctx.orders_open = lambda: store.open_orders
    return [Route("/acme/", acme.handle, body_cap=body_cap)]

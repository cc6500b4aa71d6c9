"""Activation: the PIN (or a quorum of its shares) to the CIS, the CMDB opened, wrong PINs counted and locked out."""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from appliance.ipc import schema as S

from .cis_link import CisLink, CisRefused
from .cmdb import CmdbError
from .dist import Dist
from .errors import FactoryError, _log
from .store import Store


class Activation:
    def __init__(self, cfg: S.FactoryConfig, store: Store, cis: CisLink, signers: list[CisLink], dist: Dist,
                 send_event: Callable[[Any], Awaitable[None]]):
        self.cfg = cfg
        self.store = store
        self.cis = cis
        self.signers = signers
        self.dist = dist
        self.send_event = send_event
        self.token_info = ""
        self._activating = trio.Lock()
        # The activation PIN, as a MAC under a key that never leaves this process: break-glass requests
        # prove a quorum of shares against it without another token login. Bad share sets are counted.
        self._pin_key = secrets.token_bytes(32)
        self._pin_mac: bytes | None = None
        self._share_failures: dict[int, list[float]] = {}  # per peer uid: a stranger locks out only himself


    # Wrong PINs are counted here, outside the still-locked CMDB (SoftHSM never locks a PIN), and
    # written to the audit log with their times once the CMDB opens.
    def _failures_path(self) -> str:
        return os.path.join(self.cfg.home, "activation-failures.json")

    def _failures(self) -> dict[str, Any]:
        try:
            with open(self._failures_path(), "rb") as f:
                doc = msgspec.json.decode(f.read())
            return doc if isinstance(doc, dict) and isinstance(doc.get("count"), int) else {"count": 0, "last": 0, "log": []}
        except (OSError, msgspec.DecodeError):
            return {"count": 0, "last": 0, "log": []}

    def _check_lockout(self) -> None:
        doc = self._failures()
        wait = doc["count"] >= self.cfg.activation_max_failures and doc["last"] + self.cfg.activation_lockout_seconds - time.time()
        if wait and wait > 0:
            raise FactoryError("auth", f"activation locked after {doc['count']} failed attempts: try again in {int(wait) + 1} s")

    def _count_failure(self, actor: str, reason: str) -> None:
        doc = self._failures()
        now = int(time.time())
        doc["count"] += 1
        doc["last"] = now
        doc["log"] = (doc.get("log") or [])[-99:] + [[now, actor[:200], reason[:200]]]
        _write_durably(self._failures_path(), msgspec.json.encode(doc))
        if doc["count"] >= self.cfg.activation_max_failures:
            _log(f"activation locked for {self.cfg.activation_lockout_seconds} s after {doc['count']} failed attempts")

    async def activate_shares(self, shares: list[str], actor: str) -> dict[str, Any]:
        """Quorum activation: combine M PIN shares (policy.shamir), then activate with the PIN."""
        from policy import shamir
        from policy.errors import PolicyError
        if self.store.active:
            raise FactoryError("exists", "already activated")
        self._check_lockout()
        try:
            pin = shamir.combine_pin(list(shares))
        except PolicyError as e:
            if e.rule == "combine":  # a forged or mixed set: counted like a wrong PIN
                self._count_failure(actor, e.message)
            raise FactoryError("auth", f"activation refused: {e.message}") from None
        return await self.activate(pin, actor + " (quorum of shares)")

    def check_shares(self, shares: list[str], uid: int) -> None:
        """Refuse (FactoryError) unless these shares combine to the PIN this appliance was activated with;
        after activation.max-failures bad sets from one peer user in a lockout period, refuse its sets
        for that period (others' are still heard: a stranger cannot block the custodians)."""
        from policy import shamir
        from policy.errors import PolicyError
        now = time.monotonic()
        failed = [t for t in self._share_failures.get(uid, []) if now - t < self.cfg.activation_lockout_seconds]
        self._share_failures[uid] = failed
        if len(failed) >= self.cfg.activation_max_failures:
            wait = failed[0] + self.cfg.activation_lockout_seconds - now
            raise FactoryError("auth", f"refused after {len(failed)} bad share sets from this user: try again in {int(wait) + 1} s")
        try:
            pin = shamir.combine_pin(list(shares))
        except PolicyError as e:
            if e.rule == "combine":
                failed.append(now)
            raise FactoryError("auth", f"refused: {e.message}") from None
        if self._pin_mac is None or not hmac.compare_digest(self._pin_mac, hmac.new(self._pin_key, pin.encode(), "sha256").digest()):
            failed.append(now)
            raise FactoryError("auth", "refused: these shares do not give this appliance's activation PIN")

    async def activate(self, pin: str, actor: str) -> dict[str, Any]:
        async with self._activating:
            if self.store.active:
                raise FactoryError("exists", "already activated")
            self._check_lockout()
            key_path = os.path.join(self.cfg.home, "cmdb.key")
            db_path = os.path.join(self.cfg.home, "cmdb.sqlite")
            wrapped = None
            if os.path.exists(key_path):
                with open(key_path, "rb") as f:
                    wrapped = f.read()
            elif os.path.exists(db_path):
                raise FactoryError("internal", f"{db_path} exists but its wrapped key {key_path} is missing")
            try:
                reply = await self.cis.request(S.Activate(id=self.cis.new_id(), pin=pin, wrapped_db_key=wrapped))
            except CisRefused as e:
                _log(f"activation refused: {e.reason}")
                if "PIN" in e.reason:
                    self._count_failure(actor, e.reason)
                raise FactoryError("auth" if "PIN" in e.reason else "hsm", e.reason) from None
            for other in self.signers[1:]:
                try:
                    more = await other.request(S.Activate(id=other.new_id(), pin=pin, wrapped_db_key=reply.wrapped_db_key))
                except CisRefused as e:
                    raise FactoryError("hsm", f"a signing process could not activate: {e.reason}") from None
                if more.db_key != reply.db_key:
                    raise FactoryError("hsm", "the signing processes disagree on the CMDB key")
            if wrapped is None:
                _write_durably(key_path, reply.wrapped_db_key)
            create = not os.path.exists(db_path)

            try:
                await self.store.open(db_path, reply.db_key, self.cfg.cipher, create=create)
            except CmdbError as e:
                raise FactoryError("internal", str(e)) from None
            self.token_info = reply.token
            if self.cfg.standby:  # before anything else commits: every later commit reaches the standby first
                from . import standby
                await self.store.run(standby.attach, self.store.require_active(), self.cfg.home, reply.db_key, self.cfg.cipher)
            from . import restore  # issue 15: a restored CMDB first catches up with what was published
            restored_cas = await self.store.run(restore.reconcile, self.store, self.cfg.home, actor)
            await self.store.run(restore.record_refusals, self.store, self.cfg.home)
            voided = await self.store.run(self.store.reconcile, actor)
            await self.store.run(self.dist.catch_up)
            self.dist.poke()
            failed = self._failures()
            if failed["count"] or failed.get("log"):
                def record():
                    with self.store.tx():
                        for ts, who, why in failed.get("log") or []:
                            self.store.audit_in_tx(str(who), "activate", "appliance", "refused", str(why), ts=int(ts))
                await self.store.run(record)
                os.unlink(self._failures_path())
            self._pin_mac = hmac.new(self._pin_key, pin.encode(), "sha256").digest()
            await self.store.audit(actor, "activate", "appliance", "ok", reply.token)
            await self.send_event(S.Event(kind="activated", detail=f"CMDB open; {voided} stale intents voided"))
            doc = {"activated": True, "token": reply.token, "voided_intents": voided}
            if restored_cas:
                doc["restored_cas"] = restored_cas  # Factory.activate signs their next CRL, then drops this key
            return doc


def _write_durably(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

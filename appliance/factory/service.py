"""The Certificate Factory's business: activation, CAs, issuance with group commit, revocation, CRLs.

Every database call runs in one DB thread (a CapacityLimiter(1)); CRL generation reads from its own
WAL snapshot connection so that issuance keeps committing while a large CRL streams to the CIS.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import apsw
import msgspec
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance.ceremonyspec import CeremonyCa, CeremonySpec
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, ProtocolViolation
from policy import crl as crlenc
from policy import csr as csrcheck
from policy import profiles as profmod
from policy.capolicy import CaPolicy, default_policy, named_policy
from policy.errors import PolicyError

from .checkpoints import Checkpoints
from .cis_link import CisLink, CisRefused, CisUnresponsive
from .dist import Dist
from .ocsp import OcspProducer
from .tenants import TenantManager
from .cmdb import Cmdb, CmdbError, cert_facts, serial_bytes, serial_int
from .errors import FactoryError, _log
from .store import Store

BACKDATE = 60  # seconds: tolerate client clock skew without predating the issuer
BATCH_MAX = 64  # small enough that every signer always has a batch waiting
CRL_CHUNK = 10000
CRL_CHECK_SECONDS = 60
SERIALS_MIN_INTERVAL = 5.0  # seconds between two issued-serials lists of one CA
HOLD = 6  # CRLReason certificateHold: the one revocation that can be released or made permanent
STATUS_SECONDS = 5


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def new_serial() -> int:
    """127 CSPRNG bits, positive, 16 octets at most in DER; uniqueness is enforced by the CMDB."""
    while True:
        s = secrets.randbits(127)
        if s >> 63:  # at least 64 significant bits
            return s


@dataclass
class _Pending:
    ca: str
    profile: str
    csr: bytes
    info: csrcheck.CsrInfo
    validity_days: int | None
    actor: str = "factory"  # who asked: every audit record of the pipeline names them
    done: trio.Event = field(default_factory=trio.Event)
    result: S.IssueOutcome | None = None
    serial: int | None = None


class Factory:
    def __init__(self, cfg: S.FactoryConfig, cis: CisLink, send_event, profiles: dict[str, profmod.Profile],
                 signers: list[CisLink] | None = None):
        self.cfg = cfg
        self.cis = cis  # the primary CIS: activation, keys, CA certificates, CRLs
        self.signers = signers or [cis]  # every CIS process, for issuance batches
        self.send_event = send_event
        self.profiles = profiles
        self.store = Store()  # the CMDB: the DB thread, transactions, audit write, named queries
        self.token_info = ""
        self._activating = trio.Lock()
        # The activation PIN, as a MAC under a key that never leaves this process: break-glass requests
        # prove a quorum of shares against it without another token login. Bad share sets are counted.
        self._pin_key = secrets.token_bytes(32)
        self._pin_mac: bytes | None = None
        self._share_failures: dict[int, list[float]] = {}  # per peer uid: a stranger locks out only himself
        # Set once the supervisor's AutoActivate (PIN file) is done, when one is coming (cfg.auto_activate).
        self.auto_activation: trio.Event | None = trio.Event() if cfg.auto_activate else None
        self._pending: list[_Pending] = []
        self._wake = trio.Event()
        self._crl_locks: dict[str, trio.Lock] = {}
        self._crl_dirty: set[str] = set()
        self._crl_wake = trio.Event()
        self.ocsp_feeds: dict[str, Channel] = {}  # the endpoint processes' links, by role name, when they run
        self.ocsp_stats: S.OcspStats | None = None  # the endpoint's counters, relayed by the supervisor
        self.ocsp = OcspProducer(self)
        self.dist = Dist(self)
        self._serials_dirty: set[str] = set()
        self._serials_last: dict[str, float] = {}
        self.tenants = TenantManager(self.store, self.ocsp, send_event)  # CRL-fed OCSP tenants
        self.stats = {"issued": 0, "refused": 0, "revoked": 0, "crls": 0}
        self.sup_send = None  # the supervisor link's send (set by main): asks it to write donjon.toml
        self._sup_waiting: dict[int, tuple[trio.Event, list]] = {}
        self._sup_ids = 0
        self._claims: dict[tuple[str, ...], bytes] = {}  # subjects and keys being issued now (uniqueness options)
        self.checkpoints: Checkpoints | None = None  # set by main once the CIS link is up

    # ------------------------------------------------------------ plumbing

    @property
    def home(self) -> str:
        return self.cfg.home

    # The store owns these; the Factory and the helpers not yet moved onto the store reach them here.
    @property
    def db(self) -> Cmdb | None:
        return self.store.db

    @property
    def reader(self) -> Cmdb | None:
        return self.store.reader

    async def run_db(self, fn, *args):
        return await self.store.run(fn, *args)

    def _require_active(self) -> Cmdb:
        return self.store.require_active()

    async def audit(self, actor: str, action: str, obj: str, outcome: str, detail: str = "") -> None:
        await self.store.audit(actor, action, obj, outcome, detail)

    # ------------------------------------------------------------ activation

    # Wrong PINs are counted here, outside the still-locked CMDB (SoftHSM never locks a PIN), and
    # written to the audit log with their times once the CMDB opens.
    def _failures_path(self) -> str:
        return os.path.join(self.home, "activation-failures.json")

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
        if self.db is not None:
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
            if self.db is not None:
                raise FactoryError("exists", "already activated")
            self._check_lockout()
            key_path = os.path.join(self.home, "cmdb.key")
            db_path = os.path.join(self.home, "cmdb.sqlite")
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
            from . import restore as restored  # issue 15: a restored CMDB first catches up with what was published
            restored_cas = await self.run_db(restored.reconcile, self.store, self.home, actor)
            voided = await self.run_db(self.store.reconcile, actor)
            await self.run_db(self.dist.catch_up)
            self.dist.poke()
            failed = self._failures()
            if failed["count"] or failed.get("log"):
                def record():
                    with self.db.tx():
                        for ts, who, why in failed.get("log") or []:
                            self.db.audit(str(who), "activate", "appliance", "refused", str(why), ts=int(ts))
                await self.run_db(record)
                os.unlink(self._failures_path())
            self._pin_mac = hmac.new(self._pin_key, pin.encode(), "sha256").digest()
            await self.audit(actor, "activate", "appliance", "ok", reply.token)
            await self.send_event(S.Event(kind="activated", detail=f"CMDB open; {voided} stale intents voided"))
            for ca in restored_cas:  # the next CRL, numbered above every one published, with the recovered revocations
                try:
                    await self.generate_crl(ca, actor)
                except FactoryError as e:
                    _log(f"after the restore, the CRL of {ca} could not be signed yet: {e.reason}")
            return {"activated": True, "token": reply.token, "voided_intents": voided}

    # ------------------------------------------------------------ CAs

    async def ceremony(self, spec: CeremonySpec, actor: str) -> list[str]:
        made = []
        self._require_active()
        exists = await self.run_db(self.store.ca_count)
        if exists:
            raise FactoryError("exists", "this appliance already has a CA: the ceremony refuses to overwrite it")
        await self.create_ca(spec.root, parent=None, actor=actor)
        made.append(spec.root.name)
        for sub in spec.issuing:
            await self.create_ca(sub, parent=spec.root.name, actor=actor)
            made.append(sub.name)
        return made

    async def create_ca(self, c: CeremonyCa | S.ACaCreate, parent: str | None, actor: str) -> dict[str, Any]:
        db = self._require_active()
        name = c.name
        profile = getattr(c, "profile", None) or ("root-ca" if parent is None else "sub-ca")
        if isinstance(c, CeremonyCa):
            subject = tuple((k, v) for k, v in c.subject.items())
        else:
            subject = tuple(c.subject)
        if profile not in self.profiles:
            raise FactoryError("not-found", f"unknown profile {profile!r}")
        if name == "donjon-audit":
            raise FactoryError("policy", "the name donjon-audit is the audit key's: choose another CA name")
        if parent is not None:
            await self.check_issuer(parent, self.profiles[profile], actor, "ca-create")
        try:
            names = tuple(getattr(c, "allowed_profiles", ()) or self.cfg.ca_profiles.get(name, ()))
            policy = named_policy(names, self.profiles) if names else default_policy(parent is None)
        except PolicyError as e:
            await self.audit(actor, "ca-create", name, "refused", str(e))
            raise FactoryError("bad-request", str(e)) from None
        row = await self.run_db(lambda: db.db.execute("SELECT name FROM cas WHERE name=? OR key_label=?", (name, name)).fetchone())
        if row:
            raise FactoryError("exists", f"CA {name!r} already exists")
        parent_cert = None
        if parent is not None:
            prow = await self.run_db(lambda: db.db.execute("SELECT cert FROM cas WHERE name=?", (parent,)).fetchone())
            if not prow:
                raise FactoryError("not-found", f"no parent CA {parent!r}")
            parent_cert = x509.load_der_x509_certificate(prow[0])
        try:
            pub = await self.cis.request(S.GenerateKey(id=self.cis.new_id(), label=name, key_type=c.key_type))
        except CisRefused as e:
            await self.audit(actor, "ca-create", name, "refused", e.reason)
            raise FactoryError(e.code, e.reason) from None
        now = int(time.time()) - BACKDATE
        not_after = now + c.validity_days * 86400 - 1  # RFC 5280 validity is inclusive
        if parent_cert is not None:
            not_after = min(not_after, int(parent_cert.not_valid_after_utc.timestamp()))
        serial = new_serial()
        item = S.IssueItem(profile=profile, spki=pub.spki, subject=subject, sans=(), serial=serial_bytes(serial),
                           validity=S.Validity(now, not_after), path_length=c.path_length, install_as=name,
                           allowed_kinds=policy.kinds, allowed_profiles=policy.profiles)  # type: ignore[arg-type]
        await self.run_db(self.store.reserve, [(serial, parent or name, None)])
        try:
            issued = await self.cis.request(S.Issue(id=self.cis.new_id(), ca=parent or name, self_signed=parent is None, items=[item]))
            outcome = issued.outcomes[0]
            if outcome.cert is None:
                raise CisRefused("policy", outcome.error or "refused")
        except CisRefused as e:
            await self.run_db(self.store.void, [serial], actor, "ca-create", e.reason)
            await self.cis.request(S.DeleteKey(id=self.cis.new_id(), label=name))
            raise FactoryError(e.code, e.reason) from None
        cert = x509.load_der_x509_certificate(outcome.cert)

        def store():
            with db.tx():
                self.store.add_ca(name, c.key_type, parent, profile, outcome.cert, policy.encode().decode())
                self._store_cert(serial, parent or name, profile, cert, outcome.cert, None)
                self.dist.enqueue_object(db.db, "ca-cert", name)
                db.audit(actor, "ca-create", name, "ok", f"{c.key_type} {_cn(cert)} serial={serial:x} parent={parent or '-'} "
                                                         f"issues: {policy.describe()}")
        await self.run_db(store)
        await self.ocsp.publish(S.PublishCa(ca=name, cert=outcome.cert))
        self.ocsp.poke()
        return self._ca_doc(name, c.key_type, parent, profile, outcome.cert)

    def _ca_doc(self, name, key_type, parent, profile, der) -> dict[str, Any]:
        cert = x509.load_der_x509_certificate(der)
        return {"name": name, "key_type": key_type, "parent": parent, "profile": profile,
                "subject": _cn(cert), "serial": f"{cert.serial_number:x}",
                "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
                "sha256": hashlib.sha256(der).hexdigest()}

    async def ca_list(self) -> list[dict[str, Any]]:
        self._require_active()

        def q():
            return [{**self._ca_doc(*r), **self._ca_extra(r[0])} for r in self.store.ca_rows()]
        return await self.run_db(q)

    async def ca_show(self, name: str) -> dict[str, Any]:
        row = await self.ca_row(name)
        return {**self._ca_doc(*row), **await self.run_db(self._ca_extra, name)}

    def _ca_extra(self, name: str) -> dict[str, Any]:
        state, why = self._ca_state(name)
        return {"state": state, "state_reason": why, "issues": self._ca_policy(name).describe()}

    def _ca_state(self, name: str) -> tuple[str, str]:
        return ca_state(self.db.db, name, time.time())

    def _ca_policy(self, name: str) -> CaPolicy:
        row = self.store.ca_policy_row(name)
        if row is None:
            raise FactoryError("not-found", f"no CA named {name!r}")
        return CaPolicy.decode(row[1].encode()) if row[1] else default_policy(row[0] is None)

    async def check_issuer(self, ca: str, profile: profmod.Profile, actor: str, action: str) -> None:
        """Refuse (audited, with the reason) issuance by a CA that is revoked or expired, or of a
        profile the CA may not issue (its policy, narrowed by donjon.toml [ca-profiles])."""
        self._require_active()

        def q():
            if self.store.ca_row(ca) is None:
                return "not-found", f"no CA named {ca!r}"
            state, why = self._ca_state(ca)
            if state != "active":
                return "policy", f"CA {ca!r} is {state}: {why}; it issues nothing more"
            pol = self._ca_policy(ca)
            narrowed = self.cfg.ca_profiles.get(ca)
            if not pol.allows(profile) or (narrowed is not None and profile.name not in narrowed):
                allowed = pol.describe() + (f"; donjon.toml [ca-profiles] narrows it to {', '.join(narrowed)}" if narrowed is not None else "")
                return "policy", f"CA {ca!r} may not issue profile {profile.name!r} (it issues: {allowed})"
            return None
        bad = await self.run_db(q)
        if bad is not None:
            await self.audit(actor, action, ca, "refused", bad[1])
            raise FactoryError(*bad)

    async def ca_row(self, name: str):
        self._require_active()
        row = await self.run_db(self.store.ca_row, name)
        if not row:
            raise FactoryError("not-found", f"no CA named {name!r}")
        return row

    async def ca_chain(self, name: str) -> list[bytes]:
        chain = []
        cur: str | None = name
        while cur is not None:
            row = await self.ca_row(cur)
            chain.append(row[4])
            cur = row[2]
        return chain

    # ------------------------------------------------------------ settings (`donjon config set`)

    def sup_reply(self, m: S.ConfigSetDone) -> None:
        waiting = self._sup_waiting.pop(m.id, None)
        if waiting is None:
            raise ProtocolViolation(f"the supervisor answered request {m.id}, which is not waiting")
        waiting[1].append(m)
        waiting[0].set()

    async def config_set(self, key: str, value: str, actor: str) -> dict[str, Any]:
        """Ask the supervisor (which alone may write HOME/donjon.toml) to set one key; audited either way."""
        self._require_active()
        from appliance import config as C
        try:
            C.setting_literal(key, value)
        except C.ConfigError as e:
            await self.audit(actor, "config-set", key[:64], "refused", str(e))
            raise FactoryError("bad-request", str(e)) from None
        if self.sup_send is None:
            raise FactoryError("internal", "no supervisor link")
        self._sup_ids += 1
        mid = self._sup_ids
        done: tuple[trio.Event, list] = (trio.Event(), [])
        self._sup_waiting[mid] = done
        await self.sup_send(S.ConfigSet(id=mid, key=key, value=value))
        with trio.move_on_after(30):
            await done[0].wait()
        if not done[1]:
            self._sup_waiting.pop(mid, None)
            await self.audit(actor, "config-set", key, "refused", "the supervisor did not answer")
            raise FactoryError("internal", "the supervisor did not answer: nothing is known to be written")
        r: S.ConfigSetDone = done[1][0]
        await self.audit(actor, "config-set", key, "ok" if r.ok else "refused", r.message)
        if not r.ok:
            raise FactoryError("bad-request", r.message)
        return {"key": key, "message": r.message}

    # ------------------------------------------------------------ issuance

    def _store_cert(self, serial: int, ca: str, profile: str, cert: x509.Certificate, der: bytes, request: bytes | None) -> None:
        spki_hash, sans = cert_facts(der)
        self.store.store_issued(serial, ca, profile, _cn(cert), int(cert.not_valid_before_utc.timestamp()),
                                int(cert.not_valid_after_utc.timestamp()), der, request, spki_hash, sans)
        self.dist.enqueue_cert(self.db.db, ca, serial, profile)  # published with the same commit
        if self.dist.wants_serials(ca):
            self._serials_dirty.add(ca)  # the scheduler is woken by the caller, in the trio thread

    async def issue(self, req: S.AIssue, actor: str) -> S.IssueReply:
        """Check every CSR, then hand the good ones to the group-commit pipeline."""
        db = self._require_active()
        profile = self.profiles.get(req.profile)
        if profile is None:
            raise FactoryError("not-found", f"unknown profile {req.profile!r}")
        if profile.kind in profmod.CA_KINDS:
            # A CA certificate only ever comes from the guarded CA operations (dual control).
            why = (f"profile {req.profile!r} makes CA certificates: they are issued only by `donjon ca sign-csr` "
                   f"or `donjon ca create` (dual control), never by `issue`")
            await self.audit(actor, "issue", req.ca, "refused", why)
            raise FactoryError("policy", why)
        await self.check_issuer(req.ca, profile, actor, "issue")
        def check_all() -> list[csrcheck.CsrInfo | PolicyError]:  # one thread hop for the whole request
            out: list[csrcheck.CsrInfo | PolicyError] = []
            for der in req.csrs:
                try:
                    out.append(csrcheck.check_csr(der, profile))
                except PolicyError as e:
                    out.append(e)
            return out
        pend: list[_Pending | S.IssueOutcome] = []
        refusals = []
        infos = await trio.to_thread.run_sync(check_all)
        claimed: list[tuple[str, ...]] = []
        if profile.unique_subject or profile.unique_key:
            infos = await self._check_unique(req.ca, profile, infos, claimed)
        for der, info in zip(req.csrs, infos):
            if isinstance(info, PolicyError):
                pend.append(S.IssueOutcome(cert=None, error=str(info)))
                refusals.append(str(info))
            else:
                pend.append(_Pending(req.ca, req.profile, der, info, req.validity_days, actor))
        if refusals:
            def w():
                with db.tx():
                    for r in refusals:
                        db.audit(actor, "issue", req.ca, "refused", r)
            await self.run_db(w)
            self.stats["refused"] += len(refusals)
        todo = [p for p in pend if isinstance(p, _Pending)]
        self._pending.extend(todo)
        self._wake.set()
        try:
            for p in todo:
                await p.done.wait()
        finally:
            for k in claimed:  # stored (or refused) by now: the CMDB answers for them from here on
                self._claims.pop(k, None)
        results = [p.result if isinstance(p, _Pending) else p for p in pend]
        serials = [f"{p.serial:x}" if isinstance(p, _Pending) and p.result and p.result.cert else None for p in pend]
        return S.IssueReply(id=req.id, results=results, serials=serials)

    async def _check_unique(self, ca: str, profile: profmod.Profile, infos: list, claimed: list) -> list:
        """The profile's uniqueness options: refuse a subject that already has a valid certificate of
        this CA for another key, and a key already certified. Claims (in this trio thread, before any
        wait) cover requests in flight, so two concurrent requests cannot both pass."""
        from policy.certs import subject_name
        now = int(time.time())
        wanted: list[tuple[bytes, str] | PolicyError | None] = []
        for info in infos:
            if isinstance(info, PolicyError):
                wanted.append(None)
                continue
            spki = hashlib.sha256(info.public_key_der).digest()
            subj = subject_name(info.subject, profile).rfc4514_string()
            why = None
            if profile.unique_subject:
                sk = ("subject", ca, subj)
                if sk in self._claims and self._claims[sk] != spki:
                    why = f"a certificate for {subj!r} with another key is being issued now"
            if why is None and profile.unique_key and ("key", spki.hex()) in self._claims:
                why = "a certificate for this public key is being issued now"
            if why is not None:
                wanted.append(PolicyError("csr", "unique", f"{why} (profile {profile.name} requires it to be unique)"))
                continue
            keys: list[tuple[str, ...]] = [("subject", ca, subj)] if profile.unique_subject else []
            keys += [("key", spki.hex())] if profile.unique_key else []
            for k in keys:
                if k not in self._claims:
                    self._claims[k] = spki
                    claimed.append(k)
            wanted.append((spki, subj))
        db = self.db

        def q():
            out = []
            for w in wanted:
                if w is None or isinstance(w, PolicyError):
                    out.append(w)
                    continue
                spki, subj = w
                why = None
                if profile.unique_key:
                    row = db.db.execute("SELECT ca, serial FROM certs WHERE spki_sha256=? LIMIT 1", (spki,)).fetchone()
                    if row:
                        why = (f"this public key is already certified (CA {row[0]} serial {serial_int(row[1]):x}): "
                               f"profile {profile.name} forbids key re-use")
                if why is None and profile.unique_subject:
                    row = db.db.execute(
                        "SELECT c.serial FROM certs c LEFT JOIN revocations r ON r.ca=c.ca AND r.serial=c.serial "
                        "WHERE c.ca=? AND c.subject=? AND c.not_after >= ? AND r.serial IS NULL AND c.spki_sha256 IS NOT ? LIMIT 1",
                        (ca, subj, now, spki)).fetchone()
                    if row:
                        why = (f"{subj!r} already has a valid certificate from CA {ca} for another key (serial "
                               f"{serial_int(row[0]):x}): profile {profile.name} requires unique names (revoke it first)")
                out.append(PolicyError("csr", "unique", why) if why else None)
            return out
        try:
            verdicts = await self.run_db(q)
        except BaseException:
            for k in claimed:
                self._claims.pop(k, None)
            raise
        return [v if isinstance(v, PolicyError) else info for v, info in zip(verdicts, infos)]

    async def issuance_worker(self, signer: CisLink) -> None:
        """Take a batch of pending requests for one CA and have `signer` sign it; several workers
        overlap DB commits with signing, and several signers sign in parallel."""
        while True:
            while not self._pending:
                if self._wake.is_set():  # every idle worker waits on the same event
                    self._wake = trio.Event()
                await self._wake.wait()
            ca = self._pending[0].ca
            batch = [p for p in self._pending if p.ca == ca][:BATCH_MAX]
            ids = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in ids]
            if self._pending:
                self._wake.set()  # more work: wake another worker
            try:
                await self._issue_batch(ca, batch, signer)
            except apsw.Error as e:  # the CMDB refused a write: no certificate without its stored record
                _log(f"issuance batch stopped by a CMDB failure: {type(e).__name__}: {e}")
                for p in batch:
                    if p.result is None:
                        p.result = S.IssueOutcome(cert=None, error=f"audit storage failure ({type(e).__name__}): nothing was issued")
            except Exception as e:  # noqa: BLE001 - never leave a requester waiting
                _log(f"issuance batch failed: {type(e).__name__}: {e}")
                for p in batch:
                    if p.result is None:
                        p.result = S.IssueOutcome(cert=None, error="internal error during issuance")
            finally:
                for p in batch:
                    p.done.set()

    async def _issue_batch(self, ca: str, batch: list[_Pending], signer: CisLink) -> None:
        cert_row = await self.ca_row(ca)
        ca_cert = x509.load_der_x509_certificate(cert_row[4])
        ca_end = int(ca_cert.not_valid_after_utc.timestamp())
        now = int(time.time()) - BACKDATE
        items = []
        for p in batch:
            prof = self.profiles[p.profile]
            days = min(p.validity_days or prof.max_validity_days, prof.max_validity_days)
            p.serial = new_serial()
            items.append(S.IssueItem(profile=p.profile, spki=p.info.public_key_der, subject=p.info.subject, sans=p.info.sans,
                                     serial=serial_bytes(p.serial), validity=S.Validity(now, min(now + days * 86400 - 1, ca_end))))
        await self.run_db(self.store.reserve, [(p.serial, ca, p.csr) for p in batch])
        try:
            reply = await signer.request(S.Issue(id=signer.new_id(), ca=ca, self_signed=False, items=items))
            outcomes = reply.outcomes
            if len(outcomes) != len(batch):
                raise CisRefused("internal", "the CIS answered a different number of items")
        except CisRefused as e:
            reason = e.reason

            def void_each():
                for p in batch:
                    self.store.void([p.serial], p.actor, "issue", reason)
            await self.run_db(void_each)
            for p in batch:
                p.result = S.IssueOutcome(cert=None, error=e.reason)
            return

        def store():
            db = self.db
            with db.tx():
                for p, o in zip(batch, outcomes):
                    if o.cert is not None:
                        cert = x509.load_der_x509_certificate(o.cert)
                        if cert.serial_number != p.serial:
                            raise CmdbError("the CIS returned a certificate with another serial")
                        self._store_cert(p.serial, ca, p.profile, cert, o.cert, p.csr)
                        db.audit(p.actor, "issue", f"{ca}/{p.serial:x}", "ok", f"{p.profile} {_cn(cert)}")
                    else:
                        self.store.void_in_tx(p.serial)
                        db.audit(p.actor, "issue", f"{ca}/{p.serial:x}", "refused", o.error or "")
        await self.run_db(store)
        self.ocsp.poke()
        self.dist.poke()
        if self._serials_dirty:
            self._crl_wake.set()
        # Only now, with certificate and audit record committed, do requesters get their results.
        for p, o in zip(batch, outcomes):
            p.result = o
            self.stats["issued" if o.cert else "refused"] += 1

    async def _issue_one(self, ca: str, item: S.IssueItem, serial: int, actor: str, action: str,
                         request: bytes | None, detail: str = "") -> x509.Certificate:
        """Reserve the serial, have the CIS sign one certificate, store it with its audit record.
        A refusal voids the serial (audited) and raises FactoryError."""
        db = self._require_active()
        await self.run_db(self.store.reserve, [(serial, ca, request)])
        try:
            reply = await self.cis.request(S.Issue(id=self.cis.new_id(), ca=ca, self_signed=False, items=[item]))
            o = reply.outcomes[0]
            if o.cert is None:
                raise CisRefused("policy", o.error or "refused")
        except CisRefused as e:
            await self.run_db(self.store.void, [serial], actor, action, e.reason)
            raise FactoryError(e.code, e.reason) from None
        cert = x509.load_der_x509_certificate(o.cert)

        def store():
            with db.tx():
                self._store_cert(serial, ca, item.profile, cert, o.cert, request)
                db.audit(actor, action, f"{ca}/{serial:x}", "ok", detail or _cn(cert))
        await self.run_db(store)
        self.ocsp.poke()
        self.dist.poke()
        if self._serials_dirty:
            self._crl_wake.set()
        return cert

    async def sign_csr_ca(self, req: S.ACaSignCsr, actor: str) -> dict[str, Any]:
        """An external subordinate CA: the offline root's main job."""
        profile = self.profiles.get(req.profile)
        if profile is None or profile.kind != "sub-ca":
            raise FactoryError("policy", f"profile {req.profile!r} is not a subordinate-CA profile")
        self._require_active()
        await self.check_issuer(req.parent, profile, actor, "ca-sign-csr")
        try:
            info = await trio.to_thread.run_sync(csrcheck.check_csr, req.csr, profile)
        except PolicyError as e:
            await self.audit(actor, "ca-sign-csr", req.parent, "refused", str(e))
            raise FactoryError("policy", str(e)) from None
        row = await self.ca_row(req.parent)
        parent_cert = x509.load_der_x509_certificate(row[4])
        now = int(time.time()) - BACKDATE
        not_after = min(now + req.validity_days * 86400 - 1, int(parent_cert.not_valid_after_utc.timestamp()))
        serial = new_serial()
        item = S.IssueItem(profile=req.profile, spki=info.public_key_der, subject=info.subject, sans=info.sans,
                           serial=serial_bytes(serial), validity=S.Validity(now, not_after), path_length=req.path_length)
        cert = await self._issue_one(req.parent, item, serial, actor, "ca-sign-csr", req.csr)
        return {"serial": f"{serial:x}", "cert": cert.public_bytes(serialization.Encoding.PEM).decode()}

    # ------------------------------------------------------------ certificates

    async def cert_get(self, ca: str, serial: int) -> dict[str, Any]:
        self._require_active()
        row = await self.run_db(self.store.cert_row, ca, serial)
        if not row:
            raise FactoryError("not-found", f"no certificate {serial:x} issued by {ca!r}")
        profile, subject, nb, na, issued, der, rev_at, reason = row
        return {"ca": ca, "serial": f"{serial:x}", "profile": profile, "subject": subject, "not_before": nb,
                "not_after": na, "issued_at": issued, "revoked_at": rev_at, "reason": reason,
                "pem": x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()}

    async def cert_list(self, req: S.ACertList) -> list[dict[str, Any]]:
        db = self._require_active()
        now = int(time.time())
        q = ("SELECT c.ca, c.serial, c.profile, c.subject, c.not_after, r.revoked_at, c.sans FROM certs c "
             "LEFT JOIN revocations r ON r.ca=c.ca AND r.serial=c.serial ")
        where: list[str] = []
        args: list[Any] = []

        def like(s: str) -> str:  # a literal substring: LIKE's wildcards escaped
            return "%" + s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        if req.ca:
            where.append("c.ca=?")
            args.append(req.ca)
        if req.profile:
            where.append("c.profile=?")
            args.append(req.profile)
        if req.subject:
            where.append("c.subject LIKE ? ESCAPE '\\'")
            args.append(like(req.subject))
        if req.san:
            where.append("c.sans LIKE ? ESCAPE '\\'")
            args.append(like(req.san))
        if req.status == "revoked":
            where.append("r.serial IS NOT NULL")
        elif req.status == "expired":
            where.append("r.serial IS NULL AND c.not_after < ?")
            args.append(now)
        elif req.status == "valid" or req.expires_within_days is not None:
            where.append("r.serial IS NULL AND c.not_after >= ?")
            args.append(now)
        if req.expires_within_days is not None:
            where.append("c.not_after <= ?")
            args.append(now + req.expires_within_days * 86400)
        if where:
            q += "WHERE " + " AND ".join(where) + " "
        q += "ORDER BY c.issued_at DESC LIMIT ?"
        args.append(req.limit)
        rows = await self.run_db(lambda: db.db.execute(q, tuple(args)).fetchall())
        return [{"ca": r[0], "serial": f"{serial_int(r[1]):x}", "profile": r[2], "subject": r[3], "not_after": r[4],
                 "revoked": r[5] is not None, "expired": r[5] is None and r[4] < now, "sans": r[6] or ""} for r in rows]

    # ------------------------------------------------------------ revocation and CRLs

    async def revoke(self, req: S.ARevoke, actor: str) -> dict[str, Any]:
        """Revoke a certificate, or change a certificateHold to a permanent reason (the entry keeps its
        revocation date: the certificate has not been trusted since the hold)."""
        db = self._require_active()
        serial = serial_int(req.serial)
        if req.reason == 7:
            raise FactoryError("policy", "reason code 7 is not used (RFC 5280 §5.3.1)")
        if req.reason == 8:  # delta CRLs only: in a full CRL relying parties read it as revoked or as not
            await self.audit(actor, "revoke", f"{req.ca}/{serial:x}", "refused", "removeFromCRL is not a revocation reason")
            raise FactoryError("policy", "removeFromCRL is not a revocation reason (RFC 5280 §5.3.1: delta CRLs only); "
                                         "to lift a certificateHold, release it (donjon unrevoke)")
        sb = serial_bytes(serial)
        now = int(time.time())
        reason = req.reason or None
        entry_len = crlenc.entry_length(serial, now, reason, req.invalidity)
        obj = f"{req.ca}/{serial:x}"

        def w():
            with db.tx():
                row = db.db.execute("SELECT profile FROM certs WHERE ca=? AND serial=?", (req.ca, sb)).fetchone()
                if not row:
                    db.audit(actor, "revoke", obj, "refused", "no such certificate")
                    return "not-found", now
                old = db.db.execute("SELECT revoked_at, reason, invalidity FROM revocations WHERE ca=? AND serial=?",
                                    (req.ca, sb)).fetchone()
                if old is not None and (old[1] != HOLD or reason == HOLD):
                    why = "already on hold" if old[1] == HOLD else "already revoked"
                    db.audit(actor, "revoke", obj, "refused", why)
                    return why, old[0]
                if old is not None:  # certificateHold -> a permanent reason
                    inv = req.invalidity if req.invalidity is not None else old[2]
                    db.db.execute("UPDATE revocations SET reason=?, invalidity=?, entry_len=? WHERE ca=? AND serial=?",
                                  (reason, inv, crlenc.entry_length(serial, old[0], reason, inv), req.ca, sb))
                    db.db.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (req.ca, sb))
                    db.audit(actor, "revoke", obj, "ok", f"reason={req.reason} (was certificateHold since {old[0]})")
                    return "changed", old[0]
                db.db.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?)", (req.ca, sb, now, reason, req.invalidity, entry_len))
                db.db.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (req.ca, sb))
                self.dist.enqueue_uncert(db.db, req.ca, serial, row[0])
                db.audit(actor, "revoke", obj, "ok", f"reason={req.reason}")
                return "ok", now
        r, revoked_at = await self.run_db(w)
        if r == "not-found":
            raise FactoryError("not-found", f"no certificate {serial:x} issued by {req.ca!r}")
        if r == "already on hold":
            raise FactoryError("exists", f"certificate {serial:x} is already on hold")
        if r == "already revoked":
            raise FactoryError("exists", f"certificate {serial:x} is already revoked")
        if r == "ok":
            self.stats["revoked"] += 1
        self._revocations_changed(req.ca)
        return {"ca": req.ca, "serial": f"{serial:x}", "revoked_at": revoked_at, "reason": req.reason,
                "was_on_hold": r == "changed"}

    async def unrevoke(self, req: S.AUnrevoke, actor: str) -> dict[str, Any]:
        """Release a certificate from certificateHold: its entry leaves the CRL (the next full CRL omits
        it) and its OCSP response is re-signed `good`. A permanent revocation is never undone."""
        db = self._require_active()
        serial = serial_int(req.serial)
        sb = serial_bytes(serial)
        obj = f"{req.ca}/{serial:x}"

        def w():
            with db.tx():
                row = db.db.execute("SELECT profile FROM certs WHERE ca=? AND serial=?", (req.ca, sb)).fetchone()
                old = db.db.execute("SELECT revoked_at, reason FROM revocations WHERE ca=? AND serial=?", (req.ca, sb)).fetchone()
                why = ("no such certificate" if not row else "not revoked" if old is None
                       else None if old[1] == HOLD else "revoked permanently, not on hold")
                if why:
                    db.audit(actor, "unrevoke", obj, "refused", why)
                    return why, None
                db.db.execute("DELETE FROM revocations WHERE ca=? AND serial=?", (req.ca, sb))
                db.db.execute("INSERT OR IGNORE INTO ocsp_queue VALUES (?,?)", (req.ca, sb))
                self.dist.enqueue_cert(db.db, req.ca, serial, row[0])  # published again where revocation removed it
                db.audit(actor, "unrevoke", obj, "ok", f"released from certificateHold (held since {old[0]})")
                return "ok", old[0]
        r, held_since = await self.run_db(w)
        if r == "no such certificate":
            raise FactoryError("not-found", f"no certificate {serial:x} issued by {req.ca!r}")
        if r != "ok":
            raise FactoryError("policy", f"certificate {serial:x} is {r}: only a certificateHold can be released")
        self._revocations_changed(req.ca)
        return {"ca": req.ca, "serial": f"{serial:x}", "released": True, "held_since": held_since}

    def _revocations_changed(self, ca: str) -> None:
        """A new CRL soon (debounced), fresh OCSP responses, distribution jobs on their way."""
        self._crl_dirty.add(ca)
        self._crl_wake.set()
        self.ocsp.poke()
        self.dist.poke()

    async def generate_crl(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        """Stream the CA's revocations to the CIS and store the signed CRL. Returns (number, entries, sha256)."""
        lock = self._crl_locks.setdefault(ca, trio.Lock())
        async with lock:
            return await self._generate_signed_list(ca, actor, "crl")

    async def generate_serials_list(self, ca: str, actor: str) -> tuple[int, int, bytes]:
        """Stream every serial the CA issued to the CIS and store the signed issued-serials list. A fresh
        signed audit checkpoint comes first: it is published beside the list (the rollback anchor)."""
        lock = self._crl_locks.setdefault("serials:" + ca, trio.Lock())
        async with lock:
            if self.checkpoints is not None:
                try:
                    await self.checkpoints.sign(actor)
                except FactoryError as e:
                    _log(f"no fresh audit checkpoint for the issued-serials list of {ca}: {e.reason}")
            return await self._generate_signed_list(ca, actor, "issued-serials")

    async def _generate_signed_list(self, ca: str, actor: str, kind: str) -> tuple[int, int, bytes]:
        """One streaming path for both signed lists: a CRL (revocations) and the issued-serials list
        (every serial in state 'issued'), read from a WAL snapshot, encoded and signed by the CIS."""
        db = self._require_active()
        await self.ca_row(ca)
        crl = kind == "crl"
        action = kind
        this_update = int(time.time())
        next_update = this_update + self.cfg.crl_validity_hours * 3600

        store = self.store
        number = await store.run(store.next_list_number, ca, kind)

        def give_back():
            # Nothing was signed under this number: it is reused, so CRL numbers stay without gaps.
            with db.tx():
                store.give_back_list_number(ca, kind, number)

        count, length = await store.read(store.list_snapshot_begin, ca, kind)
        mid = self.cis.new_id()
        replies = self.cis.open(mid)
        tmp = tempfile.TemporaryFile(dir=self.home)
        tbs_hash = hashlib.sha256()
        tbs_len = 0
        signed: S.CrlSigned | None = None
        refused: S.Refused | None = None
        late: CisUnresponsive | None = None
        try:
            async with trio.open_nursery() as n:
                async def sender():
                    try:
                        await self.cis.send(S.CrlBegin(id=mid, ca=ca, crl_number=number, this_update=this_update,
                                                       next_update=next_update, entry_count=count, entries_length=length,
                                                       kind=kind))
                        after = b""
                        while True:
                            rows = await store.read(store.list_page, ca, kind, after, CRL_CHUNK)
                            if not rows:
                                break
                            after = rows[-1][0]
                            await self.cis.send(S.CrlEntries(id=mid, entries=rows) if crl else
                                                S.SerialEntries(id=mid, serials=[r[0] for r in rows]))
                        await self.cis.send(S.CrlEnd(id=mid))
                    finally:
                        with trio.CancelScope(shield=True):  # the reader's snapshot ends even when the CIS refused
                            await store.read(store.list_snapshot_end)
                n.start_soon(sender)
                while True:
                    try:
                        m = await self.cis.receive(replies)
                    except CisUnresponsive as e:
                        late = e
                        n.cancel_scope.cancel()
                        break
                    if isinstance(m, S.CrlChunk):
                        tbs_hash.update(m.data)
                        tbs_len += len(m.data)
                        await trio.to_thread.run_sync(tmp.write, m.data)
                    elif isinstance(m, S.CrlSigned):
                        signed = m
                        break
                    else:  # Refused: stop the sender; audit and answer outside the cancelled scope
                        refused = m
                        n.cancel_scope.cancel()
                        break
            if late is not None:  # it may yet sign: the number is not given back
                await self.audit(actor, action, f"{ca}#{number}", "failed", f"{late.reason}; number {number} skipped")
                raise FactoryError(late.code, late.reason)
            if refused is not None:
                await self.run_db(give_back)
                what = "CRL" if crl else "issued-serials list"
                await self.audit(actor, action, f"{ca}#{number}", "refused", f"{refused.code}: {refused.reason}; number {number} not used")
                raise FactoryError("lint" if refused.code == "lint" else refused.code,
                                   f"the CIS refused to sign {what} #{number} of {ca}: {refused.reason}")
            if signed is None:
                raise FactoryError("internal", f"no signed {'CRL' if crl else 'issued-serials list'} from the CIS")
            if tbs_hash.digest() != signed.tbs_sha256:
                raise FactoryError("internal", "the bytes received differ from what the CIS signed")

            def keep():
                total = len(signed.prefix) + tbs_len + len(signed.suffix)

                def parts():
                    yield signed.prefix
                    tmp.seek(0)
                    while chunk := tmp.read(1 << 20):
                        yield chunk
                    yield signed.suffix
                with db.tx():
                    digest = store.store_signed_list(kind, ca, number, this_update, next_update, count, parts(), total)
                    self.dist.enqueue_object(db.db, action, ca, number)  # published with the same commit
                    db.audit(actor, action, f"{ca}#{number}", "ok", f"entries={count} sha256={digest.hex()}")
                return digest
            digest = await self.run_db(keep)
        finally:
            self.cis.close(mid, answered=late is None)
            tmp.close()
        self.dist.poke()
        if crl:
            self.stats["crls"] += 1
            await self.ocsp.publish_crl(ca, number)
        return number, count, digest

    async def crl_scheduler(self) -> None:
        """Sign a new CRL right after revocations (debounced), and re-sign each CA's CRL once half
        of its validity has passed, so that a published CRL never lapses."""
        while True:
            with trio.move_on_after(SERIALS_MIN_INTERVAL if self._serials_dirty else CRL_CHECK_SECONDS):
                await self._crl_wake.wait()
            self._crl_wake = trio.Event()
            if self.db is None:
                continue
            await trio.sleep(0.2)  # let a burst of revocations land in one CRL
            todo = self._crl_dirty | await self.run_db(self.store.crls_due, int(time.time()))
            self._crl_dirty = set()
            for ca in sorted(todo):
                try:
                    number, count, _ = await self.generate_crl(ca, "factory:crl-scheduler")
                    _log(f"CRL {ca} #{number} signed ({count} entries)")
                except FactoryError as e:
                    self._crl_dirty.add(ca)
                    await self.send_event(S.Event(kind="crl-failed", detail=f"{ca}: {e.reason}"[:4000]))
                if self.dist.wants_serials(ca):
                    self._serials_dirty.add(ca)  # the list is re-signed with each CRL, so it never lapses first
            await self._sign_serials_lists()

    async def _sign_serials_lists(self) -> None:
        """Issued-serials lists for CAs with a destination that wants them: after issuance (at most
        every SERIALS_MIN_INTERVAL seconds per CA) and with every CRL."""
        now = trio.current_time()
        for ca in sorted(self._serials_dirty):
            if now - self._serials_last.get(ca, -1e9) < SERIALS_MIN_INTERVAL:
                continue
            self._serials_dirty.discard(ca)
            self._serials_last[ca] = now
            try:
                number, count, _ = await self.generate_serials_list(ca, "factory:crl-scheduler")
                _log(f"issued-serials list {ca} #{number} signed ({count} serials)")
            except FactoryError as e:
                self._serials_dirty.add(ca)
                await self.send_event(S.Event(kind="crl-failed", detail=f"{ca} issued-serials: {e.reason}"[:4000]))

    async def crl_chunks(self, ca: str, number: int | None = None, table: str = "crls"):
        """Yield the stored CRL (or issued-serials list) DER in 1 MiB pieces (latest unless a number is given)."""
        self._require_active()
        row = await self.run_db(self.store.signed_list_blob, table, ca, number)
        if not row:
            what = "CRL" if table == "crls" else "issued-serials list"
            raise FactoryError("not-found", f"no {what} for CA {ca!r} yet")
        rowid, size = row
        off = 0
        while off < size:
            n = min(1 << 20, size - off)
            yield await self.run_db(self.store.read_blob, table, rowid, off, n)
            off += n

    async def ocsp_responder_cert(self, ca: str, days: int, actor: str) -> dict[str, Any]:
        """A delegated responder for CA `ca`: the endpoint makes the key in its own token, the CA
        certifies it under the ocsp-responder profile (id-kp-OCSPSigning, ocsp-nocheck)."""
        self._require_active()
        row = await self.ca_row(ca)
        ca_cert = x509.load_der_x509_certificate(row[4])
        await self.check_issuer(ca, self.profiles["ocsp-responder"], actor, "ocsp-responder")
        try:
            key = await self.ocsp.request_responder_key(ca)
        except (CisRefused, trio.TooSlowError) as e:
            reason = getattr(e, "reason", "the OCSP endpoint did not answer")
            await self.audit(actor, "ocsp-responder", ca, "refused", reason)
            raise FactoryError("hsm", reason) from None
        org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        subject = ((("O", org[0].value),) if org else ()) + (("CN", f"{ca} OCSP Responder"[:64]),)
        now = int(time.time()) - BACKDATE
        serial = new_serial()
        item = S.IssueItem(profile="ocsp-responder", spki=key.spki, subject=subject, sans=(), serial=serial_bytes(serial),
                           validity=S.Validity(now, min(now + days * 86400 - 1, int(ca_cert.not_valid_after_utc.timestamp()))))
        cert = await self._issue_one(ca, item, serial, actor, "ocsp-responder", None, f"key {key.label} in the endpoint's token")
        der = cert.public_bytes(serialization.Encoding.DER)
        await self.ocsp.publish(S.ResponderCert(ca=ca, label=key.label, cert=der))
        return {"ca": ca, "serial": f"{serial:x}", "label": key.label, "not_after": cert.not_valid_after_utc.isoformat(),
                "cert": cert.public_bytes(serialization.Encoding.PEM).decode()}

    async def tenant_crl_received(self, tenant: str, der: bytes, source: str) -> str:
        """Every tenant CRL enters here (officer upload, HTTP push, the Distribution agent's fetch):
        verified, stored and audited, pushed to every endpoint; returns "accepted" or a one-line reason."""
        return await self.tenants.crl_received(tenant, der, source)

    def tenant_fetch_plan(self) -> list[tuple[str, list[str], float]]:
        """What to fetch: (tenant, CRL URLs, next fetch unix time) for every tenant with URLs."""
        return self.tenants.fetch_plan()

    async def ocsp_status(self) -> dict[str, Any]:
        """What the endpoint reports, and what the CMDB holds per CA (responses, queue, oldest, next refresh)."""
        self._require_active()
        now = int(time.time())
        rows, queued = await self.run_db(self.store.ocsp_summary)
        cas = [{"ca": ca, "responses": n, "revoked": rev or 0, "oldest_this_update": tu, "earliest_next_update": nu,
                "next_refresh": rf, "queued": queued.get(ca, 0), "lapsed": nu is not None and nu <= now}
               for ca, n, rev, tu, nu, rf in rows]
        st = self.ocsp_stats
        return {"endpoint_connected": bool(self.ocsp_feeds), "endpoints": sorted(self.ocsp_feeds), "cas": cas,
                "endpoint": msgspec.structs.asdict(st) if st else None,
                "tenant_crls": {"tenants": len(self.tenants.info), "accepted": self.tenants.accepted,
                                "refused": self.tenants.refused}}

    async def status_reporter(self, send) -> None:
        """Every few seconds, the Factory's part of the appliance status (SNMP reads it)."""
        while True:
            try:
                await send(await self.status_report())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(STATUS_SECONDS)

    async def status_report(self) -> S.StatusReport:
        if self.db is None:
            return S.StatusReport(activated=False, cas=[], audit_records=0, audit_checkpoint=None, oldest_response_age=None)
        db = self.db
        now = int(time.time())

        def q():
            cas = []
            for name, key_type, der, crl_number in db.db.execute("SELECT name, key_type, cert, crl_number FROM cas ORDER BY created"):
                nu = db.db.execute("SELECT next_update FROM crls WHERE ca=? ORDER BY number DESC LIMIT 1", (name,)).fetchone()
                issued = db.db.execute("SELECT count(*) FROM certs WHERE ca=?", (name,)).fetchone()[0]
                revoked = db.db.execute("SELECT count(*) FROM revocations WHERE ca=?", (name,)).fetchone()[0]
                cert = x509.load_der_x509_certificate(der)
                cas.append(S.CaState(name=name, key_type=key_type, not_after=int(cert.not_valid_after_utc.timestamp()),
                                     crl_number=crl_number, crl_next_update=nu[0] if nu else None, issued=issued, revoked=revoked))
            n_audit = db.db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0]
            oldest, earliest = db.db.execute("SELECT min(this_update), min(next_update) FROM ocsp").fetchone()
            cp = db.db.execute("SELECT max(ts) FROM checkpoints").fetchone()[0]
            return cas, n_audit, oldest, earliest, cp, self.dist.backlog()
        cas, n_audit, oldest, earliest, cp, backlog = await self.run_db(q)
        dests = [S.DestinationState(name=d.name, backlog=backlog.get(d.name, 0), failing=d.failing) for d in self.dist.states()]
        return S.StatusReport(activated=True, cas=cas, audit_records=n_audit, audit_checkpoint=cp,
                              oldest_response_age=max(0, now - oldest) if oldest else None,
                              ocsp_earliest_next_update=earliest, destinations=dests)

    async def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"activated": self.db is not None, "token": self.token_info, "stats": dict(self.stats),
                               "pending": len(self._pending),
                               "cis": {s.name: "responsive" if s.responsive else "unresponsive" for s in self.signers}}
        if self.db is not None:
            db = self.db

            def q():
                cas = db.db.execute("SELECT name FROM cas ORDER BY created").fetchall()
                certs = db.db.execute("SELECT count(*) FROM certs").fetchone()[0]
                revoked = db.db.execute("SELECT count(*) FROM revocations").fetchone()[0]
                audit = db.db.execute("SELECT count(*), max(seq) FROM audit").fetchone()
                head = db.db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                return [c[0] for c in cas], certs, revoked, audit[0], head[0].hex() if head else None
            cas, certs, revoked, n_audit, head = await self.run_db(q)
            doc.update(cas=cas, certificates=certs, revoked=revoked, audit_records=n_audit, audit_head=head)
            if self.dist.rules:
                backlog = await self.run_db(self.dist.backlog)
                doc["distribution"] = {d.name: {"backlog": backlog.get(d.name, 0), "failing": d.failing} for d in self.dist.states()}
            cp = await self.checkpoints.latest() if self.checkpoints is not None else None
            doc["audit_checkpoint"] = {k: cp[k] for k in ("seq", "head", "time")} if cp else None
        return doc

    async def audit_export(self) -> bytes:
        """JSON Lines: every record in order, each signed checkpoint right after the record it covers."""
        from policy.audit import checkpoint_doc
        db = self._require_active()

        def q():
            cps: dict[int, list[bytes]] = {}
            for seq, tbs, sig in db.db.execute("SELECT seq, tbs, signature FROM checkpoints ORDER BY id"):
                cps.setdefault(seq, []).append(msgspec.json.encode(checkpoint_doc(tbs, sig)) + b"\n")
            out = [b"".join(cps.pop(0, []))]
            for r in db.audit_records():
                out.append(msgspec.json.encode(r) + b"\n")
                out.extend(cps.pop(r["seq"], []))
            out.extend(b"".join(v) for v in cps.values())
            return b"".join(out)
        return await self.run_db(q)


def ca_state(db: apsw.Connection, name: str, now: float) -> tuple[str, str]:
    """A CA's state with its reason: active; revoked or expired (its certificate, or one above it);
    awaiting certificate. DB thread."""
    cur: str | None = name
    while cur is not None:
        row = db.execute("SELECT parent, cert FROM cas WHERE name=?", (cur,)).fetchone()
        if row is None or not row[1]:
            return "awaiting certificate", f"CA {cur!r} has no certificate yet"
        parent, der = row
        cert = x509.load_der_x509_certificate(der)
        whose = f"CA {name!r}" if cur == name else f"its parent CA {cur!r}"
        if cert.not_valid_after_utc.timestamp() < now:
            return "expired", f"the certificate of {whose} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if parent is not None:
            rev = db.execute("SELECT revoked_at, reason FROM revocations WHERE ca=? AND serial=?",
                             (parent, serial_bytes(cert.serial_number))).fetchone()
            if rev is not None:
                at = time.strftime("%Y-%m-%d %H:%M", time.gmtime(rev[0]))
                return "revoked", f"the certificate of {whose} was revoked on {at} UTC (reason {rev[1] or 0})"
        cur = parent
    return "active", ""


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

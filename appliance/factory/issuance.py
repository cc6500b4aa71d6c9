"""Issuance: CSR checks, uniqueness claims, the group-commit pipeline over the CIS signers, single
issuances (CA-signed CSRs, responder certificates), and reading issued certificates back."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import apsw
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance.ipc import schema as S
from policy import csr as csrcheck
from policy import profiles as profmod
from policy.errors import PolicyError

from .cis_link import CisLink, CisRefused
from .cmdb import CmdbError, cert_facts, serial_bytes, serial_int
from .crls import SignedLists
from .dist import Dist
from .errors import FactoryError, _log
from .issuers import Issuers
from .ocsp import OcspProducer
from .store import Store

BACKDATE = 60  # seconds: tolerate client clock skew without predating the issuer
BATCH_MAX = 64  # small enough that every signer always has a batch waiting


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


class Issuance:
    def __init__(self, store: Store, cis: CisLink, signers: list[CisLink], profiles: dict[str, profmod.Profile],
                 issuers: Issuers, lists: SignedLists, dist: Dist, ocsp: OcspProducer, stats: dict[str, int]):
        self.store = store
        self.cis = cis  # single issuances (CA certificates, responders, signed CSRs)
        self.signers = signers  # every CIS process, for issuance batches
        self.profiles = profiles
        self.issuers = issuers
        self.lists = lists
        self.dist = dist
        self.ocsp = ocsp
        self.stats = stats
        self.pending: list[_Pending] = []
        self._wake = trio.Event()
        self._claims: dict[tuple[str, ...], bytes] = {}  # subjects and keys being issued now (uniqueness options)

    def store_cert(self, serial: int, ca: str, profile: str, cert: x509.Certificate, der: bytes, request: bytes | None) -> None:
        spki_hash, sans = cert_facts(der)
        self.store.store_issued(serial, ca, profile, _cn(cert), int(cert.not_valid_before_utc.timestamp()),
                                int(cert.not_valid_after_utc.timestamp()), der, request, spki_hash, sans)
        self.dist.enqueue_cert(self.store.require_active().db, ca, serial, profile)  # published with the same commit
        self.lists.cert_issued(ca, serial)

    async def issue(self, req: S.AIssue, actor: str) -> S.IssueReply:
        """Check every CSR, then hand the good ones to the group-commit pipeline."""
        db = self.store.require_active()
        profile = self.profiles.get(req.profile)
        if profile is None:
            raise FactoryError("not-found", f"unknown profile {req.profile!r}")
        if profile.kind in profmod.CA_KINDS:
            # A CA certificate only ever comes from the guarded CA operations (dual control).
            why = (f"profile {req.profile!r} makes CA certificates: they are issued only by `donjon ca sign-csr` "
                   f"or `donjon ca create` (dual control), never by `issue`")
            await self.store.audit(actor, "issue", req.ca, "refused", why)
            raise FactoryError("policy", why)
        await self.issuers.check_issuer(req.ca, profile, actor, "issue")
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
            await self.store.run(w)
            self.stats["refused"] += len(refusals)
        todo = [p for p in pend if isinstance(p, _Pending)]
        self.pending.extend(todo)
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
        store = self.store

        def q():
            out = []
            for w in wanted:
                if w is None or isinstance(w, PolicyError):
                    out.append(w)
                    continue
                spki, subj = w
                why = None
                if profile.unique_key:
                    row = store.cert_with_key(spki)
                    if row:
                        why = (f"this public key is already certified (CA {row[0]} serial {serial_int(row[1]):x}): "
                               f"profile {profile.name} forbids key re-use")
                if why is None and profile.unique_subject:
                    other = store.valid_cert_for_other_key(ca, subj, spki, now)
                    if other:
                        why = (f"{subj!r} already has a valid certificate from CA {ca} for another key (serial "
                               f"{serial_int(other):x}): profile {profile.name} requires unique names (revoke it first)")
                out.append(PolicyError("csr", "unique", why) if why else None)
            return out
        try:
            verdicts = await self.store.run(q)
        except BaseException:
            for k in claimed:
                self._claims.pop(k, None)
            raise
        return [v if isinstance(v, PolicyError) else info for v, info in zip(verdicts, infos)]

    async def issuance_worker(self, signer: CisLink) -> None:
        """Take a batch of pending requests for one CA and have `signer` sign it; several workers
        overlap DB commits with signing, and several signers sign in parallel."""
        while True:
            while not self.pending:
                if self._wake.is_set():  # every idle worker waits on the same event
                    self._wake = trio.Event()
                await self._wake.wait()
            ca = self.pending[0].ca
            batch = [p for p in self.pending if p.ca == ca][:BATCH_MAX]
            ids = {id(p) for p in batch}
            self.pending = [p for p in self.pending if id(p) not in ids]
            if self.pending:
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
        cert_row = await self.issuers.ca_row(ca)
        ca_cert = x509.load_der_x509_certificate(cert_row[4])
        ca_end = int(ca_cert.not_valid_after_utc.timestamp())
        # Backdated, but never before the issuer's own start (a CA certified elsewhere a moment ago: ca install).
        now = max(int(time.time()) - BACKDATE, int(ca_cert.not_valid_before_utc.timestamp()))
        items = []
        for p in batch:
            prof = self.profiles[p.profile]
            days = min(p.validity_days or prof.max_validity_days, prof.max_validity_days)
            p.serial = new_serial()
            items.append(S.IssueItem(profile=p.profile, spki=p.info.public_key_der, subject=p.info.subject, sans=p.info.sans,
                                     serial=serial_bytes(p.serial), validity=S.Validity(now, min(now + days * 86400 - 1, ca_end))))
        await self.store.run(self.store.reserve, [(p.serial, ca, p.csr) for p in batch])
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
            await self.store.run(void_each)
            for p in batch:
                p.result = S.IssueOutcome(cert=None, error=e.reason)
            return

        def store():
            db = self.store.require_active()
            with db.tx():
                for p, o in zip(batch, outcomes):
                    if o.cert is not None:
                        cert = x509.load_der_x509_certificate(o.cert)
                        if cert.serial_number != p.serial:
                            raise CmdbError("the CIS returned a certificate with another serial")
                        self.store_cert(p.serial, ca, p.profile, cert, o.cert, p.csr)
                        db.audit(p.actor, "issue", f"{ca}/{p.serial:x}", "ok", f"{p.profile} {_cn(cert)}")
                    else:
                        self.store.void_in_tx(p.serial)
                        db.audit(p.actor, "issue", f"{ca}/{p.serial:x}", "refused", o.error or "")
        await self.store.run(store)
        self.ocsp.poke()
        self.dist.poke()
        self.lists.wake_if_due()
        # Only now, with certificate and audit record committed, do requesters get their results.
        for p, o in zip(batch, outcomes):
            p.result = o
            self.stats["issued" if o.cert else "refused"] += 1

    async def issue_one(self, ca: str, item: S.IssueItem, serial: int, actor: str, action: str,
                         request: bytes | None, detail: str = "") -> x509.Certificate:
        """Reserve the serial, have the CIS sign one certificate, store it with its audit record.
        A refusal voids the serial (audited) and raises FactoryError."""
        db = self.store.require_active()
        await self.store.run(self.store.reserve, [(serial, ca, request)])
        try:
            reply = await self.cis.request(S.Issue(id=self.cis.new_id(), ca=ca, self_signed=False, items=[item]))
            o = reply.outcomes[0]
            if o.cert is None:
                raise CisRefused("policy", o.error or "refused")
        except CisRefused as e:
            await self.store.run(self.store.void, [serial], actor, action, e.reason)
            raise FactoryError(e.code, e.reason) from None
        cert = x509.load_der_x509_certificate(o.cert)

        def store():
            with db.tx():
                self.store_cert(serial, ca, item.profile, cert, o.cert, request)
                db.audit(actor, action, f"{ca}/{serial:x}", "ok", detail or _cn(cert))
        await self.store.run(store)
        self.ocsp.poke()
        self.dist.poke()
        self.lists.wake_if_due()
        return cert

    async def sign_csr_ca(self, req: S.ACaSignCsr, actor: str) -> dict[str, Any]:
        """An external subordinate CA: the offline root's main job."""
        profile = self.profiles.get(req.profile)
        if profile is None or profile.kind != "sub-ca":
            raise FactoryError("policy", f"profile {req.profile!r} is not a subordinate-CA profile")
        self.store.require_active()
        await self.issuers.check_issuer(req.parent, profile, actor, "ca-sign-csr")
        try:
            info = await trio.to_thread.run_sync(csrcheck.check_csr, req.csr, profile)
        except PolicyError as e:
            await self.store.audit(actor, "ca-sign-csr", req.parent, "refused", str(e))
            raise FactoryError("policy", str(e)) from None
        row = await self.issuers.ca_row(req.parent)
        parent_cert = x509.load_der_x509_certificate(row[4])
        now = int(time.time()) - BACKDATE
        not_after = min(now + req.validity_days * 86400 - 1, int(parent_cert.not_valid_after_utc.timestamp()))
        serial = new_serial()
        item = S.IssueItem(profile=req.profile, spki=info.public_key_der, subject=info.subject, sans=info.sans,
                           serial=serial_bytes(serial), validity=S.Validity(now, not_after), path_length=req.path_length)
        cert = await self.issue_one(req.parent, item, serial, actor, "ca-sign-csr", req.csr)
        return {"serial": f"{serial:x}", "cert": cert.public_bytes(serialization.Encoding.PEM).decode()}

    # ------------------------------------------------------------ certificates

    async def cert_get(self, ca: str, serial: int) -> dict[str, Any]:
        self.store.require_active()
        row = await self.store.run(self.store.cert_row, ca, serial)
        if not row:
            raise FactoryError("not-found", f"no certificate {serial:x} issued by {ca!r}")
        profile, subject, nb, na, issued, der, rev_at, reason = row
        return {"ca": ca, "serial": f"{serial:x}", "profile": profile, "subject": subject, "not_before": nb,
                "not_after": na, "issued_at": issued, "revoked_at": rev_at, "reason": reason,
                "pem": x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()}

    async def cert_list(self, req: S.ACertList) -> list[dict[str, Any]]:
        self.store.require_active()
        now = int(time.time())
        rows = await self.store.run(self.store.cert_list, req.ca, req.profile, req.subject, req.san, req.status,
                                    req.expires_within_days, req.limit, now)
        return [{"ca": r[0], "serial": f"{serial_int(r[1]):x}", "profile": r[2], "subject": r[3], "not_after": r[4],
                 "revoked": r[5] is not None, "expired": r[5] is None and r[4] < now, "sans": r[6] or ""} for r in rows]

    async def ocsp_responder_cert(self, ca: str, days: int, actor: str) -> dict[str, Any]:
        """A delegated responder for CA `ca`: the endpoint makes the key in its own token, the CA
        certifies it under the ocsp-responder profile (id-kp-OCSPSigning, ocsp-nocheck)."""
        self.store.require_active()
        row = await self.issuers.ca_row(ca)
        ca_cert = x509.load_der_x509_certificate(row[4])
        await self.issuers.check_issuer(ca, self.profiles["ocsp-responder"], actor, "ocsp-responder")
        try:
            key = await self.ocsp.request_responder_key(ca)
        except (CisRefused, trio.TooSlowError) as e:
            reason = getattr(e, "reason", "the OCSP endpoint did not answer")
            await self.store.audit(actor, "ocsp-responder", ca, "refused", reason)
            raise FactoryError("hsm", reason) from None
        org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        subject = ((("O", org[0].value),) if org else ()) + (("CN", f"{ca} OCSP Responder"[:64]),)
        now = int(time.time()) - BACKDATE
        serial = new_serial()
        item = S.IssueItem(profile="ocsp-responder", spki=key.spki, subject=subject, sans=(), serial=serial_bytes(serial),
                           validity=S.Validity(now, min(now + days * 86400 - 1, int(ca_cert.not_valid_after_utc.timestamp()))))
        cert = await self.issue_one(ca, item, serial, actor, "ocsp-responder", None, f"key {key.label} in the endpoint's token")
        der = cert.public_bytes(serialization.Encoding.DER)
        await self.ocsp.publish(S.ResponderCert(ca=ca, label=key.label, cert=der))
        return {"ca": ca, "serial": f"{serial:x}", "label": key.label, "not_after": cert.not_valid_after_utc.isoformat(),
                "cert": cert.public_bytes(serialization.Encoding.PEM).decode()}

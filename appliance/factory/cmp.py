"""The Factory's side of CMP: officer-issued credentials (shared secrets, RA certificates), their checks, approvals, issuance."""

# The gateway parses CMP and holds no secret: it sends the MAC parameters, the protected bytes and the
# MAC value (or the signer certificate and signature), and the Factory checks them again here with the
# secret it alone holds. A compromised gateway gets at most what the credentials it can see allow: the
# Factory also checks that the key (or the CSR) it is asked to certify is inside the protected bytes.

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.ipc import schema as S
from policy import cmpmac
from policy import csr as csrcheck
from policy import profiles as profmod
from policy.errors import PolicyError

from .cmdb import serial_bytes, serial_int
from .errors import FactoryError
from .store import Store

MAX_FAILURES = 10  # consecutive wrong MACs before a reference is locked (an online guess costs us a KDF each)
CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")
REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BACKDATE = 60
PROTECTION_PROFILE = "tls-client"  # digitalSignature: what openssl cmp wants of a CMP signer certificate
PROTECTION_DAYS = 90
# The gateway-link messages this module answers (GatewayService hands them over).
CMP_REQUESTS = (S.CmpCheck, S.CmpEnroll, S.CmpPoll, S.CmpConfirm, S.CmpRevoke, S.CmpInfo, S.CmpProtectionCert)


@dataclass
class CmpHost:
    """What CMP uses of the Factory, by name (narrow collaborators, not the Factory)."""

    store: Store
    profiles: dict[str, profmod.Profile]
    issue_one: Callable[..., Awaitable[x509.Certificate]]  # (ca, IssueItem, serial, actor, action, request, detail)
    revoke: Callable[[S.ARevoke, str], Awaitable[dict[str, Any]]]
    check_issuer: Callable[[str, profmod.Profile, str, str], Awaitable[None]]
    ca_chain: Callable[[str], Awaitable[list[bytes]]]
    audit: Callable[[str, str, str, str, str], Awaitable[None]]


@dataclass(frozen=True)
class Cred:
    ref: str
    kind: str
    ca: str
    profile: str
    subject: str | None
    approval: bool
    created_by: str


def new_secret() -> str:
    """160 random bits as 8 groups of 4 base32 letters: typed by a person, read by openssl as pass:TEXT."""
    t = base64.b32encode(secrets.token_bytes(20)).decode()
    return "-".join(t[i:i + 4] for i in range(0, 32, 4))


def _new_serial() -> int:
    while True:
        s = secrets.randbits(127)
        if s >> 63:
            return s


def _spki_content(spki: bytes) -> bytes:
    """The content octets of the SPKI: in a CRMF template it is [6] IMPLICIT, so only these appear verbatim."""
    n = spki[1]
    return spki[2 + (n & 0x7F if n & 0x80 else 0):]


class CmpService:
    def __init__(self, host: CmpHost) -> None:
        self.h = host

    async def answer(self, msg: Any) -> Any:
        self.h.store.require_active()
        if isinstance(msg, S.CmpCheck):
            return await self.mac_check(msg)
        if isinstance(msg, S.CmpEnroll):
            return await self.enrol(msg)
        if isinstance(msg, S.CmpPoll):
            return await self.poll(msg)
        if isinstance(msg, S.CmpConfirm):
            return await self.confirm(msg)
        if isinstance(msg, S.CmpRevoke):
            return await self.revoke(msg)
        if isinstance(msg, S.CmpInfo):
            return await self.info(msg)
        return await self.protection_cert(msg)

    async def protection_cert(self, msg: S.CmpProtectionCert) -> S.GwIssued | S.GwRefused:
        """The gateway's CMP protection certificate, for the key in its own token (first issuing CA, tls-client profile)."""
        actor = "gateway/cmp-protection"
        rows = await self.h.store.run(self.h.store.ca_rows)
        subs = sorted(r[0] for r in rows if r[2] is not None) or sorted(r[0] for r in rows)
        if not subs:
            return S.GwRefused(id=msg.id, code="not-found", reason="no CA to issue from")
        try:
            serialization.load_der_public_key(msg.spki)
            cert = await self._issue(subs[0], PROTECTION_PROFILE, msg.spki, (("CN", "Donjon CMP gateway"),), (), actor, "gateway",
                                     days=PROTECTION_DAYS, record=False)
        except (ValueError, FactoryError) as e:
            return await self._refuse(actor, subs[0], msg.id, "policy", getattr(e, "reason", "not a public key"))
        return S.GwIssued(id=msg.id, ca=subs[0], cert=cert.public_bytes(serialization.Encoding.DER), chain=(await self.h.ca_chain(subs[0]))[:8],
                          serial=serial_bytes(cert.serial_number))

    # ------------------------------------------------------------ officers: credentials and approvals

    async def credential_add(self, req: S.ACmpCredentialAdd, actor: str) -> S.CmpCredentialReply:
        db = self.h.store.require_active()
        ref = req.ref or f"{secrets.randbelow(10**10):010d}"
        if not REF.match(ref):
            raise FactoryError("bad-request", "a reference is 1-64 letters, digits, '.', '_' or '-'")
        profile = self.h.profiles.get(req.profile)
        if profile is None or profile.kind in profmod.CA_KINDS:
            raise FactoryError("policy", f"profile {req.profile!r} is not an end-entity profile")
        if await self.h.store.run(self.h.store.ca_row, req.ca) is None:
            raise FactoryError("not-found", f"no CA {req.ca!r}")
        await self.h.check_issuer(req.ca, profile, actor, "cmp-credential")
        secret = None
        ra_der = None
        if req.ra_cert is not None:
            ra_der = await self._ra_cert_ok(req.ra_cert)
            ref = f"ra-{x509.load_der_x509_certificate(ra_der).serial_number:x}"[:64]
        else:
            secret = new_secret()
        if req.subject is not None:
            try:
                x509.Name.from_rfc4514_string(req.subject)
            except ValueError as e:
                raise FactoryError("bad-request", f"subject: {e}") from None
        now = int(time.time())
        expires = now + req.days * 86400

        def w() -> None:
            with db.tx():
                if self.h.store.cmp_credential_exists(ref):
                    db.audit(actor, "cmp-credential-add", ref, "refused", "exists")
                    raise FactoryError("exists", f"CMP reference {ref!r} exists")
                self.h.store.cmp_credential_add(ref, "ra" if ra_der else "secret", secret.encode() if secret else None, ra_der, req.ca,
                                                req.profile, req.subject, req.approval, -1 if ra_der else req.uses, now, actor, expires)
                db.audit(actor, "cmp-credential-add", ref, "ok",
                         f"{'RA certificate' if ra_der else 'shared secret'} for {req.ca}/{req.profile}"
                         f"{' subject ' + req.subject if req.subject else ''}{', approval by a second officer' if req.approval else ''}"
                         f"{'' if ra_der else f', {req.uses} use(s)'}, until {expires}")
        await self.h.store.run(w)
        return S.CmpCredentialReply(id=0, ref=ref, kind="ra" if ra_der else "secret", ca=req.ca, profile=req.profile,
                                    expires=expires, secret=secret)

    async def _ra_cert_ok(self, der: bytes) -> bytes:
        try:
            cert = x509.load_der_x509_certificate(der)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, x509.ExtensionNotFound):
            raise FactoryError("bad-request", "an RA certificate (DER, with extendedKeyUsage id-kp-cmcRA) is needed") from None
        if CMC_RA not in eku:
            raise FactoryError("policy", "the RA certificate lacks extendedKeyUsage id-kp-cmcRA")
        row = await self._cert_of_ours(cert)
        if row is None:
            raise FactoryError("policy", "the RA certificate was not issued by this appliance (or is revoked)")
        return der

    async def _cert_of_ours(self, cert: x509.Certificate) -> tuple[str, str] | None:
        """(CA, profile) of a certificate this appliance issued and has not revoked, byte for byte; else None."""
        der = cert.public_bytes(serialization.Encoding.DER)
        sb = serial_bytes(cert.serial_number)

        row = await self.h.store.run(self.h.store.issued_by_serial, sb)
        if row is None or bytes(row[2]) != der or row[3] is not None:
            return None
        return row[0], row[1]

    async def credential_list(self) -> S.CmpCredentialListReply:
        rows = await self.h.store.run(self.h.store.cmp_credential_rows)
        return S.CmpCredentialListReply(id=0, credentials=[
            S.CmpCredentialInfo(ref=r[0], kind=r[1], ca=r[2], profile=r[3], subject=r[4], approval=bool(r[5]), uses_left=r[6],
                                created=r[7], created_by=r[8], expires=r[9], failures=r[10], revoked=r[11]) for r in rows])

    async def credential_revoke(self, ref: str, actor: str) -> S.CmpCredentialListReply:
        def w() -> None:
            db = self.h.store.require_active()
            with db.tx():
                if not self.h.store.cmp_credential_revoke(ref, int(time.time())):
                    db.audit(actor, "cmp-credential-revoke", ref, "refused", "no such active reference")
                    raise FactoryError("not-found", f"no active CMP reference {ref!r}")
                db.audit(actor, "cmp-credential-revoke", ref, "ok", "")
        await self.h.store.run(w)
        return await self.credential_list()

    async def request_list(self, open_only: bool) -> S.CmpRequestListReply:
        rows = await self.h.store.run(self.h.store.cmp_request_rows, open_only)
        return S.CmpRequestListReply(id=0, requests=[
            S.CmpRequestInfo(id=r[0], ref=r[1], ca=r[2], profile=r[3], subject=r[4], sans=r[5], created=r[6], state=r[7],
                             decided_by=r[8], reason=r[9], serial=f"{serial_int(r[10]):x}" if r[10] else None) for r in rows])

    async def decide(self, request_id: int, approve: bool, reason: str, officer: str, actor: str) -> S.CmpRequestListReply:
        """An officer's decision on a waiting enrolment: never the officer who issued the credential (dual control)."""
        row = await self.h.store.run(self.h.store.cmp_request_to_decide, request_id)
        obj = f"cmp-request#{request_id}"
        if row is None:
            raise FactoryError("not-found", f"no CMP request #{request_id}")
        ref, ca, prof, spki, subject, sans, state, created_by = row
        if state != "waiting":
            raise FactoryError("exists", f"CMP request #{request_id} is {state}")
        if created_by.split(" ")[0] == f"officer:{officer}":
            await self.h.audit(actor, "cmp-approve", obj, "denied", "the officer who issued the credential may not also approve")
            raise FactoryError("denied", "dual control: the officer who issued this credential may not decide its requests")
        if not approve:
            await self._close(request_id, "rejected", actor, reason or "refused by an officer", None)
            return await self.request_list(False)
        try:
            cert = await self._issue(ca, prof, bytes(spki), _attrs(subject), _attrs(sans), f"gateway/cmp:{ref} approved by {actor}", ref)
        except FactoryError as e:
            await self._close(request_id, "failed", actor, e.reason, None)
            raise
        await self._close(request_id, "issued", actor, "", serial_bytes(cert.serial_number))
        return await self.request_list(False)

    async def _close(self, request_id: int, state: str, actor: str, reason: str, serial: bytes | None) -> None:
        def w() -> None:
            db = self.h.store.require_active()
            with db.tx():
                self.h.store.cmp_request_close(request_id, state, actor, reason[:400], serial)
                db.audit(actor, "cmp-approve" if state == "issued" else "cmp-reject", f"cmp-request#{request_id}", state, reason[:400])
        await self.h.store.run(w)

    # ------------------------------------------------------------ the gateway: credential checks

    async def _credential(self, ev: S.CmpEvidence, actor: str, enrol: bool = False) -> Cred:
        """The credential that protects the message, checked again; FactoryError("auth") if it does not hold.
        Uses are counted by enrolments only: a used-up secret still polls, confirms and revokes what it obtained."""
        if ev.kind == "mac":
            return await self._mac(ev, actor, enrol)
        return await self._signer(ev, actor)

    async def _mac(self, ev: S.CmpEvidence, actor: str, enrol: bool) -> Cred:
        if ev.mac is None:
            raise FactoryError("auth", "MAC evidence without parameters")
        spec = cmpmac.MacSpec(kind=ev.mac.kind, salt=ev.mac.salt, iterations=ev.mac.iterations, owf=ev.mac.owf, mac=ev.mac.mac,
                              key_len=ev.mac.key_len)
        now = int(time.time())

        row = await self.h.store.run(self.h.store.cmp_secret, ev.ref)
        why = None
        if row is None:
            why = "unknown reference"
        elif row[8] is not None:
            why = "reference revoked"
        elif row[6] < now:
            why = "reference expired"
        elif row[5] == 0 and enrol:
            why = "reference used up"
        elif row[7] >= MAX_FAILURES:
            why = f"reference locked after {MAX_FAILURES} wrong MACs"
        ok = why is None and cmpmac.verify(spec, bytes(row[0]), ev.protected, ev.protection)
        if not ok:
            why = why or "wrong MAC"

            def fail() -> None:
                db = self.h.store.require_active()
                with db.tx():
                    if row is not None and why == "wrong MAC":
                        self.h.store.cmp_failure(ev.ref)
                    db.audit(actor, "cmp-auth", ev.ref[:64], "refused", why)
            await self.h.store.run(fail)
            raise FactoryError("auth", f"MAC protection refused: {why}")
        if row[7]:
            await self.h.store.run(self._reset_failures, ev.ref)
        return Cred(ref=ev.ref, kind="secret", ca=row[1], profile=row[2], subject=row[3], approval=bool(row[4]), created_by=row[9])

    def _reset_failures(self, ref: str) -> None:
        with self.h.store.tx():
            self.h.store.cmp_reset_failures(ref)

    async def _signer(self, ev: S.CmpEvidence, actor: str) -> Cred:
        try:
            cert = x509.load_der_x509_certificate(ev.signer_cert or b"")
            cmpmac.verify_signature(cert, ev.sig_alg, ev.protection, ev.protected)
        except (ValueError, cmpmac.VerifyError) as e:
            await self.h.audit(actor, "cmp-auth", "-", "refused", f"signature: {e}")
            raise FactoryError("auth", "signature protection does not verify") from None
        ours = await self._cert_of_ours(cert)
        if ours is None:
            await self.h.audit(actor, "cmp-auth", f"{cert.serial_number:x}", "refused", "signer not issued here or revoked")
            raise FactoryError("auth", "the signer certificate was not issued by this appliance or is revoked")
        ref = f"ra-{cert.serial_number:x}"[:64]

        row = await self.h.store.run(self.h.store.cmp_ra, ref)
        if row is not None and row[5] is None and row[4] >= time.time() and bytes(row[7]) == ev.signer_cert:
            return Cred(ref=ref, kind="ra", ca=row[0], profile=row[1], subject=row[2], approval=bool(row[3]), created_by=row[6])
        # Not a registered RA: the device's own certificate (kur, cr for the same subject, rr of itself).
        return Cred(ref=f"cert-{ours[0]}/{cert.serial_number:x}"[:64], kind="device", ca=ours[0], profile=ours[1],
                    subject=cert.subject.rfc4514_string(), approval=False, created_by="")

    async def mac_check(self, msg: S.CmpCheck) -> S.CmpChecked:
        actor = f"gateway/cmp:{msg.evidence.ref}"[:400]
        try:
            await self._credential(msg.evidence, actor)
        except FactoryError as e:
            return S.CmpChecked(id=msg.id, ok=False, reason=e.reason)
        return S.CmpChecked(id=msg.id, ok=True)

    # ------------------------------------------------------------ the gateway: enrolment, polling, confirmation, revocation

    async def enrol(self, msg: S.CmpEnroll) -> S.GwIssued | S.GwPending | S.GwRefused:
        actor = f"gateway/cmp:{msg.evidence.ref}"[:400]
        obj = "-"
        try:
            cred = await self._credential(msg.evidence, actor, enrol=True)
            obj = cred.ca
            spki, subject, sans = msg.spki, tuple(msg.subject), tuple(msg.sans)
            if msg.csr is not None:
                if msg.csr not in msg.evidence.protected:
                    raise FactoryError("auth", "the CSR is not in the protected part of the message")
                info = csrcheck.check_csr(msg.csr, self._profile(cred.profile))
                spki, subject, sans = info.public_key_der, info.subject, info.sans
            elif _spki_content(spki) not in msg.evidence.protected:
                raise FactoryError("auth", "the public key is not in the protected part of the message")
            if cred.kind == "device":
                if msg.op not in ("kur", "cr"):
                    raise FactoryError("denied", f"{msg.op} signed by an end-entity certificate: only kur and cr are (an RA may ir)")
                old = x509.load_der_x509_certificate(msg.evidence.signer_cert or b"")
                want = tuple((csrcheck._OID_ATTRS.get(a.oid, a.oid.dotted_string), str(a.value)) for a in old.subject)
                if subject and tuple(subject) != want:
                    raise FactoryError("policy", "a key update keeps the subject of the certificate it updates")
                subject = want
                if not sans:
                    try:
                        sans = tuple(csrcheck._general_name(g) for g in old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
                    except x509.ExtensionNotFound:
                        sans = ()
            elif msg.op == "kur":
                raise FactoryError("denied", "kur must be signed with the certificate it updates")
            if msg.profile is not None and msg.profile != cred.profile:
                raise FactoryError("policy", f"this credential allows profile {cred.profile!r}, not {msg.profile!r}")
            if cred.subject is not None and _rfc4514(subject) != x509.Name.from_rfc4514_string(cred.subject).rfc4514_string():
                raise FactoryError("policy", f"this credential allows subject {cred.subject!r} only")
            profile = self._profile(cred.profile)
            csrcheck.check_public_key(spki, profile.key_types)
            sans = csrcheck.check_names(tuple(subject), tuple(sans), profile)
        except PolicyError as e:
            return await self._refuse(actor, obj, msg.id, "policy", str(e))
        except FactoryError as e:
            return await self._refuse(actor, obj, msg.id, "unauthorized" if e.code in ("auth", "denied") else "policy", e.reason)
        if cred.approval:
            if not await self._use(cred):
                return await self._refuse(actor, obj, msg.id, "unauthorized", "the credential has no use left")
            rid = await self._file(cred, spki, subject, sans)
            await self.h.audit(actor, "cmp-enrol", f"cmp-request#{rid}", "pending", f"{msg.op} {_rfc4514(subject)}: waits for an officer")
            return S.GwPending(id=msg.id, request_id=str(rid), retry_after=1)
        try:
            cert = await self._issue(cred.ca, cred.profile, spki, subject, sans, f"{actor} ({msg.op})", cred.ref, use=cred)
        except FactoryError as e:
            if e.code == "auth":
                return await self._refuse(actor, obj, msg.id, "unauthorized", e.reason)
            await self._give_back(cred)  # nothing was issued: the use is not spent
            return await self._refuse(actor, obj, msg.id, "policy", e.reason)
        return S.GwIssued(id=msg.id, ca=cred.ca, cert=cert.public_bytes(serialization.Encoding.DER), chain=(await self.h.ca_chain(cred.ca))[:8],
                          serial=serial_bytes(cert.serial_number))

    def _profile(self, name: str) -> profmod.Profile:
        p = self.h.profiles.get(name)
        if p is None or p.kind in profmod.CA_KINDS:
            raise FactoryError("policy", f"profile {name!r} is not an end-entity profile")
        return p

    async def _refuse(self, actor: str, obj: str, rid: int, code: str, reason: str) -> S.GwRefused:
        await self.h.audit(actor, "cmp-enrol", obj, "refused", reason[:4000])
        return S.GwRefused(id=rid, code=code, reason=reason[:4000])  # type: ignore[arg-type]

    async def _use(self, cred: Cred) -> bool:
        """Take one use of a secret (none to take for an RA or a device certificate); atomic, so two racing requests cannot share one."""
        if cred.kind != "secret":
            return True

        def w() -> bool:
            with self.h.store.tx():
                return self.h.store.cmp_take_use(cred.ref)
        return await self.h.store.run(w)

    async def _give_back(self, cred: Cred) -> None:
        if cred.kind != "secret":
            return

        def w() -> None:
            with self.h.store.tx():
                self.h.store.cmp_give_back_use(cred.ref)
        await self.h.store.run(w)

    async def _file(self, cred: Cred, spki: bytes, subject, sans) -> int:
        def w() -> int:
            with self.h.store.tx():
                return self.h.store.cmp_request_add(cred.ref, cred.ca, cred.profile, spki, _text(subject), _text(sans), int(time.time()))
        return await self.h.store.run(w)

    async def _issue(self, ca: str, profile_name: str, spki: bytes, subject, sans, actor: str, ref: str, days: int | None = None,
                     record: bool = True, use: Cred | None = None) -> x509.Certificate:
        """Issue through the Factory's pipeline. The credential's use (`use`, a secret) is taken and the serial
        recorded as this credential's in one transaction before the CIS signs: one durable commit fewer per
        enrolment; a serial that then fails to be issued is voided by the pipeline and matches no certificate."""
        profile = self._profile(profile_name)
        await self.h.check_issuer(ca, profile, actor, "issue")
        ca_row = await self.h.store.run(self.h.store.ca_row, ca)
        if ca_row is None:
            raise FactoryError("not-found", f"no CA {ca!r}")
        ca_end = int(x509.load_der_x509_certificate(ca_row[4]).not_valid_after_utc.timestamp())
        now = int(time.time()) - BACKDATE
        serial = _new_serial()
        item = S.IssueItem(profile=profile_name, spki=spki, subject=tuple(subject), sans=tuple(sans), serial=serial_bytes(serial),
                           validity=S.Validity(now, min(now + min(days or 10**6, profile.max_validity_days) * 86400 - 1, ca_end)))
        if record:
            def w() -> bool:
                st = self.h.store
                with st.tx():
                    if use is not None and use.kind == "secret" and not st.cmp_take_use(use.ref):
                        return False
                    st.cmp_issued_add(ca, serial_bytes(serial), ref)
                    return True
            if not await self.h.store.run(w):
                raise FactoryError("auth", "the credential has no use left")
        return await self.h.issue_one(ca, item, serial, actor, "issue", None, f"{profile_name} {_rfc4514(subject)} (CMP, {ref})")

    async def poll(self, msg: S.CmpPoll) -> S.GwIssued | S.GwPending | S.GwRefused:
        actor = f"gateway/cmp:{msg.evidence.ref}"[:400]
        try:
            cred = await self._credential(msg.evidence, actor)
        except FactoryError as e:
            return S.GwRefused(id=msg.id, code="unauthorized", reason=e.reason)
        if not msg.request_id.isdigit():
            return S.GwRefused(id=msg.id, code="not-found", reason="no such request")

        row = await self.h.store.run(self.h.store.cmp_request_outcome, int(msg.request_id))
        if row is None or row[0] != cred.ref:
            return S.GwRefused(id=msg.id, code="not-found", reason="no such request for this credential")
        ref, ca, state, reason, der = row
        if state == "waiting":
            return S.GwPending(id=msg.id, request_id=msg.request_id, retry_after=1)
        if state == "issued" and der is not None:
            cert = x509.load_der_x509_certificate(bytes(der))
            return S.GwIssued(id=msg.id, ca=ca, cert=bytes(der), chain=(await self.h.ca_chain(ca))[:8], serial=serial_bytes(cert.serial_number))
        return S.GwRefused(id=msg.id, code="policy", reason=(reason or state)[:4000])

    async def confirm(self, msg: S.CmpConfirm) -> S.Ok | S.GwRefused:
        """certConf: an accepted certificate is only audited; a rejected one is revoked (RFC 9810 §5.3.18: the CA must not keep it valid)."""
        actor = f"gateway/cmp:{msg.evidence.ref}"[:400]
        try:
            cred = await self._credential(msg.evidence, actor)
        except FactoryError as e:
            return S.GwRefused(id=msg.id, code="unauthorized", reason=e.reason)
        sb = msg.serial

        row = await self.h.store.run(self.h.store.cmp_issued_by_serial, sb)
        if row is None or row[1] != cred.ref:
            return S.GwRefused(id=msg.id, code="not-found", reason="not a certificate issued to this credential")
        obj = f"{row[0]}/{serial_int(sb):x}"
        if msg.accepted:
            await self.h.audit(actor, "cmp-confirm", obj, "ok", "certificate accepted")
            return S.Ok(id=msg.id)
        await self.h.audit(actor, "cmp-confirm", obj, "refused", "the client rejected the certificate: revoking it")
        await self.h.revoke(S.ARevoke(id=msg.id, ca=row[0], serial=sb, reason=4), actor)  # superseded
        return S.Ok(id=msg.id)

    async def revoke(self, msg: S.CmpRevoke) -> S.GwRevoked | S.GwRefused:
        actor = f"gateway/cmp:{msg.evidence.ref}"[:400]
        try:
            cred = await self._credential(msg.evidence, actor)
        except FactoryError as e:
            return S.GwRefused(id=msg.id, code="unauthorized", reason=e.reason)
        rows = await self.h.store.run(self.h.store.ca_rows)
        ca = next((r[0] for r in rows if x509.load_der_x509_certificate(r[4]).subject.public_bytes() == msg.issuer), None)
        obj = f"{ca or '-'}/{serial_int(msg.serial):x}"
        if ca is None:
            return await self._refuse_rr(actor, obj, msg.id, "not-found", "the issuer is not a CA of this appliance")
        row = await self.h.store.run(self.h.store.cert_row, ca, serial_int(msg.serial))
        if row is None:
            return await self._refuse_rr(actor, obj, msg.id, "not-found", "no such certificate")
        allowed = False
        if cred.kind == "device":
            allowed = cred.ref == f"cert-{ca}/{serial_int(msg.serial):x}"[:64]  # signed with the certificate's own key
        elif cred.kind == "ra":
            allowed = cred.ca == ca
        else:
            issued = await self.h.store.run(self.h.store.cmp_issued_ref, ca, msg.serial)
            allowed = issued is not None and issued == cred.ref
        if not allowed:
            return await self._refuse_rr(actor, obj, msg.id, "unauthorized", "this credential may not revoke that certificate")
        try:
            await self.h.revoke(S.ARevoke(id=msg.id, ca=ca, serial=msg.serial, reason=msg.reason if msg.reason is not None else 0), actor)
        except FactoryError as e:
            return S.GwRefused(id=msg.id, code="already-revoked" if e.code == "exists" else "policy", reason=e.reason)
        return S.GwRevoked(id=msg.id, ca=ca, serial=msg.serial)

    async def _refuse_rr(self, actor: str, obj: str, rid: int, code: str, reason: str) -> S.GwRefused:
        await self.h.audit(actor, "revoke", obj, "refused", reason)
        return S.GwRefused(id=rid, code=code, reason=reason)  # type: ignore[arg-type]

    async def info(self, msg: S.CmpInfo) -> S.CmpInfoReply:
        """Public data for genm: every CA certificate (caCerts), the latest CRL of a CA (currentCRL)."""
        rows = await self.h.store.run(self.h.store.ca_rows)
        if msg.kind == "ca-certs":
            return S.CmpInfoReply(id=msg.id, items=[bytes(r[4]) for r in rows][:32])
        if msg.kind == "crl":
            ca = msg.ca or next((r[0] for r in rows if r[2] is not None), rows[0][0] if rows else None)
            if ca is None:
                return S.CmpInfoReply(id=msg.id, items=[])
            loc = await self.h.store.run(self.h.store.signed_list_blob, "crls", ca, None)
            if loc is None:
                return S.CmpInfoReply(id=msg.id, items=[])
            rowid, size = loc
            if size > 60 * 1024:
                return S.CmpInfoReply(id=msg.id, items=[])  # too large for one genp: the CRL distribution point serves it
            return S.CmpInfoReply(id=msg.id, items=[await self.h.store.run(self.h.store.read_blob, "crls", rowid, 0, size)])
        return S.CmpInfoReply(id=msg.id, items=[])


def _text(attrs) -> str:
    return "\n".join(f"{k}={v}" for k, v in attrs)


def _attrs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, _, v in (line.partition("=") for line in text.split("\n") if line))


def _rfc4514(subject) -> str:
    oids = csrcheck.ATTR_OIDS
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in subject if k in oids]).rfc4514_string()

"""The Factory's side of EST and SCEP: credentials checked again, renewals, enrolments waiting for an officer, RA certificates."""

# The gateway proved a credential to itself (an EST Basic password, a SCEP challenge, a TLS client
# certificate, a SCEP renewal signature): here it is checked again, against the CMDB, before anything
# is issued. A secret decides the CA and profile (the officer chose them); a renewal keeps those of the
# certificate renewed, which must be this appliance's, unexpired and unrevoked.

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, Awaitable, Callable

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key

from appliance.ipc import schema as S
from policy import profiles as profmod

from .cmdb import serial_bytes, serial_int
from .enrolsecrets import EnrolSecrets
from .errors import FactoryError

SECRET_KINDS = {"est-basic": "est", "scep-challenge": "scep"}
CERT_KINDS = ("est-tls", "scep-renewal")
KINDS = (*SECRET_KINDS, *CERT_KINDS)
BY_CREDENTIAL = "credential"  # the gateway's "as the credential says" for CA and profile
RA_DAYS = 365
RA_PROFILES = {"sign": "user-sign", "decrypt": "user-enc"}  # emailProtection: OpenSSL checks CertReps as S/MIME signatures
RETRY_AFTER = 30  # seconds a waiting client is told to come back after
MAX_BLOB = 1 << 20

Issue = Callable[[S.GwEnroll, str, str], Awaitable[Any]]  # (admitted request, CA, actor) -> GwIssued | GwRefused


class EstScepGate:
    def __init__(self, host: Any, issue: Issue):
        self.h = host  # factory.gateway.GatewayHost: store, profiles, issue_one, check_issuer, ca_chain, audit
        self.issue = issue
        self.secrets = EnrolSecrets(host.store, host.profiles)

    # ------------------------------------------------------------ admission

    async def admit(self, msg: S.GwEnroll, actor: str) -> Any:
        """(request with CA and profile set, CA, the secret spent or None) to issue now, or the reply: a
        refusal, a pending request (parked for an officer), or the answer to a request repeated while it waits."""
        kind = msg.auth.kind
        if msg.csr is None:
            return await self._refuse(actor, msg, "-", "bad-request", "an enrolment needs a CSR")
        try:
            csr = x509.load_der_x509_csr(msg.csr)
            cn_attrs = csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
            cn = str(cn_attrs[0].value) if cn_attrs else None
        except Exception:  # noqa: BLE001 - malformed input from the gateway is refused, never raised
            return await self._refuse(actor, msg, "-", "bad-csr", "not a PKCS#10 request")
        csr_hash = hashlib.sha256(msg.csr).digest()
        if kind in SECRET_KINDS:
            protocol = SECRET_KINDS[kind]
            secret = msg.auth.secret or ""
            ref = msg.auth.ident if protocol == "est" else None
            known = await self.secrets.ref_of(protocol, secret, ref)
            if known is not None:
                again = await self._repeated(f"{protocol}-secret:{known}", csr_hash, msg.id)
                if again is not None:
                    return again
            try:
                g = await self.secrets.spend(protocol, secret, ref, cn, actor)
            except FactoryError as e:
                return S.GwRefused(id=msg.id, code="unauthorized", reason=e.reason)  # audited by spend()
            ca, profile, credential, approval, ref = g.ca, g.profile, g.credential, g.approval, g.ref
        elif kind in CERT_KINDS:
            r = await self._renewal(msg, csr, actor)
            if isinstance(r, S.GwRefused):
                return r
            ca, profile, credential = r
            approval, ref = False, None
        else:
            raise FactoryError("internal", f"not an EST/SCEP credential: {kind}")
        if msg.ca not in (BY_CREDENTIAL, ca) or msg.profile not in (BY_CREDENTIAL, profile):
            return await self._refuse(actor, msg, ca, "policy",
                                      f"this credential admits CA {ca} and profile {profile}, not {msg.ca}/{msg.profile}")
        admitted = msgspec.structs.replace(msg, ca=ca, profile=profile)
        if approval:
            if not msg.approval_wait:
                return await self._refuse(actor, msg, ca, "policy", "this credential's enrolments wait for approval: poll")
            return await self._park(admitted, credential, csr_hash, csr, actor)
        return admitted, ca, ref

    async def give_back(self, ref: str, actor: str) -> None:
        """The issuance a secret admitted was refused (the CSR, the names): the use was not consumed."""
        await self.secrets.give_back(ref, actor)

    async def _refuse(self, actor: str, msg, obj: str, code: str, reason: str) -> S.GwRefused:
        await self.h.audit(actor, "issue", obj, "refused", reason[:4000])
        return S.GwRefused(id=msg.id, code=code, reason=reason[:4000])

    async def _renewal(self, msg: S.GwEnroll, csr: x509.CertificateSigningRequest, actor: str):
        """The current certificate: this appliance's, valid now, not revoked, the same subject."""
        try:
            cert = x509.load_der_x509_certificate(msg.auth.cert or b"")
        except Exception:  # noqa: BLE001
            return await self._refuse(actor, msg, "-", "unauthorized", "no current certificate")
        ca = await self._issuer_of(cert)
        obj = f"{ca or '-'}/{cert.serial_number:x}"
        if ca is None:
            return await self._refuse(actor, msg, obj, "unauthorized", "the current certificate is not from this appliance")
        row = await self.h.store.run(self.h.store.cert_row, ca, cert.serial_number)
        now = int(time.time())
        if row is None or bytes(row[5]) != cert.public_bytes(Encoding.DER):
            return await self._refuse(actor, msg, obj, "unauthorized", "the current certificate is not in the CMDB")
        if row[6] is not None:
            return await self._refuse(actor, msg, obj, "unauthorized", "the current certificate is revoked")
        if not row[2] <= now <= row[3]:
            return await self._refuse(actor, msg, obj, "unauthorized", "the current certificate is not valid now")
        if csr.subject != cert.subject:
            return await self._refuse(actor, msg, obj, "bad-csr", "a renewal keeps the subject of the current certificate")
        return ca, row[0], f"{msg.protocol}-renewal:{ca}/{cert.serial_number:x}"

    async def _issuer_of(self, cert: x509.Certificate) -> str | None:
        for name, _, _, _, der in await self.h.store.run(self.h.store.ca_rows):
            ca = x509.load_der_x509_certificate(der)
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:  # noqa: BLE001 - InvalidSignature and friends: not this CA
                continue
            return name
        return None

    # ------------------------------------------------------------ waiting for an officer

    async def _park(self, msg: S.GwEnroll, credential: str, csr_hash: bytes, csr, actor: str) -> S.GwPending:
        rid = secrets.token_hex(12)
        st = self.h.store
        summary = f"{msg.protocol} {csr.subject.rfc4514_string()[:300]} names={','.join(v for _, v in msg.names)[:300]}"
        now = int(time.time())

        def w() -> None:
            with st.tx():
                st.waiting_add(rid, msg.protocol, credential, csr_hash, msgspec.msgpack.encode(msg), msg.ca, msg.profile, summary, now)
                st.audit_in_tx(actor, "enrol-wait", rid, "pending", f"{credential}: {summary}; waits for an officer")
        await st.run(w)
        return S.GwPending(id=msg.id, request_id=rid, retry_after=RETRY_AFTER)

    async def _repeated(self, credential: str, csr_hash: bytes, rid_msg: int):
        st = self.h.store
        rid = await st.run(st.waiting_for, credential, csr_hash)
        return None if rid is None else await self.poll(S.GwPoll(id=rid_msg, request_id=rid))

    async def poll(self, msg: S.GwPoll):
        st = self.h.store
        row = await st.run(st.waiting_outcome, msg.request_id)
        if row is None:
            return S.GwRefused(id=msg.id, code="not-found", reason="no enrolment waits under this id")
        state, cert, reason, ca = row
        if state == "waiting":
            return S.GwPending(id=msg.id, request_id=msg.request_id, retry_after=RETRY_AFTER)
        if state == "rejected":
            return S.GwRefused(id=msg.id, code="policy", reason=f"rejected by an officer: {reason or 'no reason given'}"[:4000])
        c = x509.load_der_x509_certificate(bytes(cert))
        return S.GwIssued(id=msg.id, cert=bytes(cert), chain=(await self.h.ca_chain(ca))[:8], serial=serial_bytes(c.serial_number),
                          ca=ca)

    async def waiting(self, only_open: bool = False) -> dict[str, Any]:
        st = self.h.store
        rows = await st.run(st.waiting_rows, only_open)
        return {"requests": [self._info(r) for r in rows]}

    @staticmethod
    def _info(r) -> dict[str, Any]:
        serial = f"{x509.load_der_x509_certificate(bytes(r[9])).serial_number:x}" if r[9] else ""
        return {"request": r[0], "protocol": r[1], "credential": r[2], "ca": r[3], "profile": r[4], "summary": r[5],
                "created": r[6], "state": r[7], "decided_by": r[8] or "", "serial": serial}

    async def decide(self, request_id: str, approve: bool, reason: str, officer: str, actor: str) -> dict[str, Any]:
        """An officer's decision. Dual control: the officer who made the secret cannot approve what it admitted."""
        st = self.h.store
        row = await st.run(st.waiting_to_decide, request_id)
        if row is None:
            raise FactoryError("not-found", f"no enrolment {request_id} waits")
        state, blob, credential, ca, maker = row
        if state != "waiting":
            raise FactoryError("exists", f"enrolment {request_id} is already {state}")
        if approve and maker and _officer_of(maker) == officer:
            await st.audit(actor, "enrol-decide", request_id, "denied", "the officer who made the secret cannot approve its enrolment")
            raise FactoryError("denied", "you made this enrolment secret: another officer must approve (dual control)")
        if not approve:
            def rej() -> bool:
                with st.tx():
                    if not st.waiting_reject(request_id, actor, reason[:500]):
                        return False
                    st.audit_in_tx(actor, "enrol-decide", request_id, "rejected", f"{credential}: {reason[:500]}")
                    return True
            if not await st.run(rej):
                raise FactoryError("exists", f"enrolment {request_id} was decided meanwhile")
        else:
            def claim() -> bool:  # one decision only, even with two officers approving at once
                with st.tx():
                    return st.waiting_claim(request_id, actor)
            if not await st.run(claim):
                raise FactoryError("exists", f"enrolment {request_id} is being decided by another officer")
            msg = msgspec.msgpack.decode(bytes(blob), type=S.GwEnroll)
            out = await self.issue(msg, ca, f"{actor} approved {credential}")
            if isinstance(out, S.GwIssued):
                def done() -> None:
                    with st.tx():
                        st.waiting_issued(request_id, out.cert)
                        st.audit_in_tx(actor, "enrol-decide", request_id, "ok", f"{credential}: issued serial {out.serial.hex()}")
                await st.run(done)
            else:
                def failed() -> None:
                    with st.tx():
                        st.waiting_refused(request_id, f"approved, but refused by policy: {out.reason}"[:500])
                await st.run(failed)
                raise FactoryError("policy", f"approved, but the issuance was refused: {out.reason}")
        rows = await st.run(st.waiting_rows, False, request_id)
        return {"requests": [self._info(r) for r in rows]}

    # ------------------------------------------------------------ what SCEP and EST read: chain, RA certificates, GetCert, GetCRL

    async def _ca(self, wanted: str | None) -> str:
        rows = await self.h.store.run(self.h.store.ca_rows)
        if wanted:
            if not any(r[0] == wanted for r in rows):
                raise FactoryError("not-found", f"no CA {wanted!r}")
            return wanted
        subs = [r[0] for r in rows if r[2] is not None] or [r[0] for r in rows]
        if not subs:
            raise FactoryError("not-found", "no CA yet")
        return sorted(subs)[0]

    async def chain(self, msg: S.GwChainRequest) -> S.GwChain:
        ca = await self._ca(msg.ca)
        return S.GwChain(id=msg.id, ca=ca, chain=(await self.h.ca_chain(ca))[:8])

    async def ra_cert(self, msg: S.GwRaRequest) -> S.GwIssued:
        """The SCEP RA's signing or decryption certificate, for a key in the gateway's own token (RSA only:
        SCEP's key transport and CertRep signatures are RSA)."""
        actor = "gateway/scep-ra"
        ca = await self._ca(msg.ca)
        try:
            pub = load_der_public_key(msg.spki)
        except ValueError:
            raise FactoryError("bad-request", "not a public key") from None
        if not isinstance(pub, rsa.RSAPublicKey):
            raise FactoryError("bad-request", "the SCEP RA keys are RSA")
        profile_name = RA_PROFILES[msg.usage]
        profile = self.h.profiles.get(profile_name)
        if profile is None or profile.kind in profmod.CA_KINDS:
            raise FactoryError("policy", f"no profile {profile_name} for the RA certificate")
        await self.h.check_issuer(ca, profile, actor, "gateway-ra")
        ca_row = await self.h.store.run(self.h.store.ca_row, ca)
        ca_end = int(x509.load_der_x509_certificate(ca_row[4]).not_valid_after_utc.timestamp())
        now = int(time.time()) - 60
        serial = _new_serial()
        cn = "Donjon SCEP RA " + ("signing" if msg.usage == "sign" else "decryption")
        item = S.IssueItem(profile=profile_name, spki=msg.spki, subject=(("CN", cn),), sans=(), serial=serial_bytes(serial),
                           validity=S.Validity(now, min(now + RA_DAYS * 86400, ca_end)))
        cert = await self.h.issue_one(ca, item, serial, actor, "gateway-ra", None, f"the SCEP RA's {msg.usage} certificate")
        return S.GwIssued(id=msg.id, cert=cert.public_bytes(Encoding.DER), chain=(await self.h.ca_chain(ca))[:8],
                          serial=serial_bytes(serial), ca=ca)

    async def fetch(self, msg: S.GwFetch):
        """SCEP GetCert (a certificate by issuer and serial) and GetCRL (the issuer's latest CRL)."""
        st = self.h.store
        ca = None
        for name, _, _, _, der in await st.run(st.ca_rows):
            if x509.load_der_x509_certificate(der).subject.public_bytes() == msg.issuer:
                ca = name
                break
        if ca is None:
            return S.GwRefused(id=msg.id, code="not-found", reason="no CA of this appliance has that name")
        if msg.kind == "cert":
            row = await st.run(st.cert_row, ca, serial_int(msg.serial or b"\0"))
            if row is None:
                return S.GwRefused(id=msg.id, code="not-found", reason="no such certificate")
            return S.GwBlob(id=msg.id, der=bytes(row[5]))
        found = await st.run(st.signed_list_blob, "crls", ca, None)
        if found is None:
            return S.GwRefused(id=msg.id, code="not-found", reason=f"CA {ca} has no CRL yet")
        rowid, size = found
        if size > MAX_BLOB:
            return S.GwRefused(id=msg.id, code="policy", reason="the CRL is too large for SCEP: fetch it from its distribution point")
        return S.GwBlob(id=msg.id, der=await st.run(st.read_blob, "crls", rowid, 0, size))


def _officer_of(actor: str) -> str:
    """The officer name in an actor string ("officer:alice uid=0 ..." or a bare name)."""
    first = actor.split()[0] if actor else ""
    return first.split(":", 1)[1] if first.startswith("officer:") else first


def _new_serial() -> int:
    while True:
        s = secrets.randbits(127)
        if s >> 63:
            return s

"""The CMP server: transactions, replay refusal, protection checks, and the flows of RFC 9483 over an issuing backend."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Awaitable, Callable, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from appliance.gateway.cmp import pkimsg as P
from policy.cmpmac import MacSpec, VerifyError, verify_signature

TIME_SKEW = timedelta(minutes=5)  # messageTime must be this close to ours
REPLAY_WINDOW = 30 * 60.0  # seconds a transactionID / nonce is remembered: more than twice TIME_SKEW
MAX_SEEN = 200_000  # remembered transactionIDs + nonces (authenticated messages only)
MAX_OPEN = 10_000  # open transactions (awaiting certConf or approval)
TXN_LIFETIME = 24 * 3600.0  # an approval may take a working day
FIRST_BODIES = ("ir", "cr", "p10cr", "kur", "rr", "genm")
REPLY_BODY = {"ir": "ip", "cr": "cp", "p10cr": "cp", "kur": "kup"}
CHECK_AFTER = 1  # seconds a polling client waits
log = logging.getLogger("donjon.gateway.cmp")


@dataclass(frozen=True)
class Credential:
    """What admitted a message, sent on to the Factory so it can check it again (MAC or signer certificate)."""

    kind: str  # "mac" | "signature"
    ref: str  # MAC: the officer-issued reference (senderKID); signature: the signer certificate's serial (hex)
    protected_part: bytes
    protection: bytes
    mac: MacSpec | None = None
    signer_cert: bytes | None = None
    sig_alg: str = ""

    def same_as(self, other: Credential) -> bool:
        return self.kind == other.kind and self.ref == other.ref and self.signer_cert == other.signer_cert


@dataclass(frozen=True)
class Outcome:
    """The backend's answer to an enrolment, a poll or a revocation."""

    status: str  # "issued" | "pending" | "refused" | "revoked"
    cert_der: bytes | None = None
    chain_der: tuple[bytes, ...] = ()
    request_id: str = ""
    reason: str = ""
    fail_bit: int = P.NOT_AUTHORIZED


class Backend(Protocol):
    """What the CMP server needs from the rest of the appliance (the gateway's link to the Factory)."""

    async def check_mac(self, cred: Credential) -> bool: ...
    async def enrol(self, op: str, req: P.CertReq, cred: Credential, profile: str | None, old_cert: bytes | None) -> Outcome: ...
    async def poll(self, request_id: str, cred: Credential) -> Outcome: ...
    async def confirm(self, cert_der: bytes, accepted: bool, cred: Credential) -> None: ...
    async def revoke(self, issuer_der: bytes, serial: int, reason: int | None, cred: Credential) -> Outcome: ...
    async def ca_certs(self) -> list[bytes]: ...
    async def info(self, info_type: str) -> tuple[bool, bytes | None]: ...


@dataclass
class Txn:
    op: str
    cred: Credential
    cert_req_id: int
    last_nonce: bytes
    state: str  # "confirm" | "waiting"
    expires: float
    cert_der: bytes | None = None
    chain_der: tuple[bytes, ...] = ()
    request_id: str = ""
    implicit: bool = False


@dataclass
class ReplayGuard:
    """transactionIDs and nonces seen in the replay window, bounded in count (only authenticated messages enter)."""

    seen: OrderedDict[bytes, float] = field(default_factory=OrderedDict)

    def _expire(self, now: float) -> None:
        while self.seen:
            k, t = next(iter(self.seen.items()))
            if t > now - REPLAY_WINDOW:
                break
            del self.seen[k]

    def known(self, key: bytes) -> bool:
        self._expire(time.monotonic())
        return key in self.seen

    def remember(self, *keys: bytes) -> bool:
        """Record keys; False (and nothing recorded) if one is known already or the guard is full."""
        now = time.monotonic()
        self._expire(now)
        if any(k in self.seen for k in keys) or len(self.seen) + len(keys) > MAX_SEEN:
            return False
        for k in keys:
            self.seen[k] = now
        return True


Signer = Callable[[bytes], Awaitable[bytes]]


class CmpServer:
    """Answers one PKIMessage at a time (bytes in, bytes out); keeps its transactions in memory."""

    def __init__(self, responder: P.Responder | None, sign: Signer, backend: Backend, *, allow_implicit_confirm: bool = True) -> None:
        self.responder = responder
        self.sign = sign
        self.backend = backend
        self.allow_implicit_confirm = allow_implicit_confirm
        self.guard = ReplayGuard()
        self.txns: dict[bytes, Txn] = {}

    async def handle(self, data: bytes) -> bytes:
        """The response to one request; every refusal is a signed CMP error message naming its PKIFailureInfo."""
        req: P.Request | None = None
        try:
            req = P.decode(data)
            return await self._dispatch(req)
        except P.CmpError as exc:
            if req is not None and exc.fail_bit != P.TRANSACTION_ID_IN_USE:
                self.txns.pop(req.transaction_id, None)  # an error ends the transaction (RFC 9810 §5.3.21)
            return await self._reply(req, P.error_body(exc.fail_bit, exc.reason))
        except Exception as exc:  # noqa: BLE001 (one bad request must not take the listener down; the text stays here)
            log.warning("cmp: internal error answering %s: %s", req.body_type if req else "?", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            if req is not None:
                self.txns.pop(req.transaction_id, None)
            return await self._reply(req, P.error_body(P.SYSTEM_FAILURE, "internal error"))

    async def _reply(self, req: P.Request | None, body: object, *, implicit: bool = False, extra: tuple[bytes, ...] = (),
                     txn: Txn | None = None) -> bytes:
        nonce = os.urandom(P.NONCE_LEN)
        assert self.responder is not None  # the route answers 503 until the protection certificate is there
        _, part = P.prepare(self.responder, req, body, nonce=nonce, implicit_confirm=implicit)  # type: ignore[arg-type]
        if txn is not None:
            txn.last_nonce = nonce
        return P.assemble(self.responder, part, await self.sign(part), extra)

    # ---- checks every request goes through ----

    def _check_time(self, req: P.Request) -> None:
        if req.message_time is None:
            raise P.CmpError(P.BAD_TIME, "messageTime is required (replay protection)")
        if abs(req.message_time - datetime.now(timezone.utc)) > TIME_SKEW:
            raise P.CmpError(P.BAD_TIME, "messageTime too far from the server's time")

    async def _authenticate(self, req: P.Request) -> Credential:
        if req.protection is None or req.protection_alg_oid is None:
            raise P.CmpError(P.BAD_MESSAGE_CHECK, "unprotected requests are refused")
        if req.protection_alg_oid in (P.ID_PBM, P.ID_PBMAC1):
            if not req.sender_kid or len(req.sender_kid) > 64:
                raise P.CmpError(P.BAD_MESSAGE_CHECK, "MAC protection needs the reference number in senderKID")
            spec = P.mac_spec(req)
            cred = Credential(kind="mac", ref=req.sender_kid.decode("ascii", "replace"), protected_part=req.protected_part,
                              protection=req.protection, mac=spec)
            if not await self.backend.check_mac(cred):
                raise P.CmpError(P.BAD_MESSAGE_CHECK, "MAC does not verify (unknown reference or wrong secret)")
            return cred
        if not req.extra_certs:
            raise P.CmpError(P.SIGNER_NOT_TRUSTED, "signature protection needs the signer certificate in extraCerts")
        try:
            signer = x509.load_der_x509_certificate(req.extra_certs[0])
        except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError) as exc:
            raise P.CmpError(P.BAD_DATA_FORMAT, "signer certificate unreadable") from exc
        try:
            verify_signature(signer, req.protection_alg_oid, req.protection, req.protected_part)
        except VerifyError as exc:
            raise P.CmpError(P.BAD_MESSAGE_CHECK, f"protection: {exc}") from exc
        await self._check_signer(signer)
        return Credential(kind="signature", ref=format(signer.serial_number, "x"), protected_part=req.protected_part,
                          protection=req.protection, signer_cert=req.extra_certs[0], sig_alg=req.protection_alg_oid)

    async def _check_signer(self, signer: x509.Certificate) -> None:
        # The gateway checks issuer and validity; the Factory checks it issued it and it is not revoked.
        now = datetime.now(timezone.utc)
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            raise P.CmpError(P.SIGNER_NOT_TRUSTED, "signer certificate is not valid now")
        for der in await self.backend.ca_certs():
            ca = x509.load_der_x509_certificate(der)
            try:
                signer.verify_directly_issued_by(ca)
                return
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
        raise P.CmpError(P.SIGNER_NOT_TRUSTED, "signer certificate was not issued by a CA of this appliance")

    # ---- dispatch ----

    async def _dispatch(self, req: P.Request) -> bytes:
        self._check_time(req)
        first = req.body_type in FIRST_BODIES
        if first:
            if req.recip_nonce is not None and req.body_type != "genm":
                raise P.CmpError(P.BAD_RECIPIENT_NONCE, "a first message carries no recipNonce")
            if req.transaction_id in self.txns or self.guard.known(b"t" + req.transaction_id):
                raise P.CmpError(P.TRANSACTION_ID_IN_USE, "transactionID already used")
        elif req.body_type == "error":
            self.txns.pop(req.transaction_id, None)
            return await self._reply(req, P.pkiconf_body())
        if self.guard.known(b"n" + req.sender_nonce):
            raise P.CmpError(P.BAD_SENDER_NONCE, "senderNonce already used")
        cred = await self._authenticate(req)
        keys = (b"n" + req.sender_nonce,) + ((b"t" + req.transaction_id,) if first else ())
        if not self.guard.remember(*keys):
            # Checked again after the await: two copies of one message racing are still refused once.
            raise P.CmpError(P.TRANSACTION_ID_IN_USE if first else P.BAD_SENDER_NONCE, "replayed transactionID or nonce")
        if req.body_type in REPLY_BODY:
            return await self._enrol(req, cred)
        if req.body_type == "rr":
            return await self._revoke(req, cred)
        if req.body_type == "genm":
            return await self._genm(req)
        txn = self.txns.get(req.transaction_id)
        if txn is None or txn.expires < time.monotonic():
            self.txns.pop(req.transaction_id, None)
            raise P.CmpError(P.BAD_REQUEST, "no open transaction with this transactionID")
        if req.recip_nonce != txn.last_nonce:
            raise P.CmpError(P.BAD_RECIPIENT_NONCE, "recipNonce does not match the last response")
        if not cred.same_as(txn.cred):
            raise P.CmpError(P.NOT_AUTHORIZED, "the transaction was started with another credential")
        if req.body_type == "certConf":
            return await self._cert_conf(req, txn)
        return await self._poll(req, txn)

    async def _enrol(self, req: P.Request, cred: Credential) -> bytes:
        cr = req.cert_reqs[0]
        rep = REPLY_BODY[req.body_type]
        if req.body_type != "p10cr" and cr.cert_req_id != 0:
            raise P.CmpError(P.BAD_REQUEST, "certReqId must be 0")
        self._check_pop(cr)
        old = None
        if req.body_type == "kur":
            if cred.kind != "signature":
                raise P.CmpError(P.NOT_AUTHORIZED, "kur must be signed with the certificate to update")
            old = cred.signer_cert
        if len(self.txns) >= MAX_OPEN:
            self._expire_txns()
            if len(self.txns) >= MAX_OPEN:
                raise P.CmpError(P.SYSTEM_UNAVAIL, "too many open transactions, try later")
        out = await self.backend.enrol(req.body_type, cr, cred, req.cert_profile, old)
        implicit = req.implicit_confirm and self.allow_implicit_confirm
        txn = Txn(op=req.body_type, cred=cred, cert_req_id=cr.cert_req_id, last_nonce=b"", state="waiting",
                  expires=time.monotonic() + TXN_LIFETIME, request_id=out.request_id, implicit=implicit)
        return await self._cert_outcome(req, rep, txn, out)

    async def _cert_outcome(self, req: P.Request, rep: str, txn: Txn, out: Outcome) -> bytes:
        if out.status == "pending":
            txn.state, txn.request_id = "waiting", out.request_id
            self.txns[req.transaction_id] = txn
            return await self._reply(req, P.cert_rep(rep, txn.cert_req_id, P.WAITING, reason="waiting for an officer's approval"), txn=txn)
        if out.status != "issued" or out.cert_der is None:
            self.txns.pop(req.transaction_id, None)
            return await self._reply(req, P.cert_rep(rep, txn.cert_req_id, P.REJECTION, reason=out.reason or "refused", fail_bit=out.fail_bit))
        body = P.cert_rep(rep, txn.cert_req_id, P.ACCEPTED, cert_der=out.cert_der)
        if txn.implicit:
            self.txns.pop(req.transaction_id, None)
            return await self._reply(req, body, implicit=True, extra=out.chain_der)
        txn.state, txn.cert_der, txn.chain_der = "confirm", out.cert_der, out.chain_der
        self.txns[req.transaction_id] = txn
        return await self._reply(req, body, extra=out.chain_der, txn=txn)

    def _check_pop(self, cr: P.CertReq) -> None:
        try:
            if cr.popo == "csr":
                csr = x509.load_der_x509_csr(cr.csr_der or b"")
                if not csr.is_signature_valid:
                    raise P.CmpError(P.BAD_POP, "the PKCS#10 signature does not verify")
                return
            if cr.popo != "signature":
                raise P.CmpError(P.BAD_POP, "proof of possession by signature is required")
            verify_signature(cr.spki_der, cr.popo_alg, cr.popo_sig, cr.popo_input)
        except VerifyError as exc:
            raise P.CmpError(P.BAD_POP, f"proof of possession: {exc}") from exc
        except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError) as exc:
            raise P.CmpError(P.BAD_DATA_FORMAT, "unreadable certificate request") from exc

    def _expire_txns(self) -> None:
        now = time.monotonic()
        for tid in [t for t, x in self.txns.items() if x.expires < now]:
            del self.txns[tid]

    async def _cert_conf(self, req: P.Request, txn: Txn) -> bytes:
        if txn.state != "confirm" or txn.cert_der is None:
            raise P.CmpError(P.BAD_REQUEST, "no certificate awaits confirmation in this transaction")
        (cert_req_id, cert_hash, status, hash_alg) = req.cert_confirms[0] if req.cert_confirms else (txn.cert_req_id, b"", None, None)
        if cert_req_id != txn.cert_req_id:
            raise P.CmpError(P.BAD_CERT_ID, "certReqId does not match the request")
        accepted = status in (None, P.ACCEPTED, P.GRANTED_WITH_MODS)
        if req.cert_confirms and cert_hash != _cert_hash(txn.cert_der, hash_alg):
            raise P.CmpError(P.BAD_CERT_ID, "certHash does not match the issued certificate")
        del self.txns[req.transaction_id]
        await self.backend.confirm(txn.cert_der, accepted and bool(req.cert_confirms), txn.cred)
        return await self._reply(req, P.pkiconf_body())

    async def _poll(self, req: P.Request, txn: Txn) -> bytes:
        if txn.state != "waiting":
            raise P.CmpError(P.BAD_REQUEST, "nothing to poll in this transaction")
        if req.poll_ids[0] != txn.cert_req_id:
            raise P.CmpError(P.BAD_CERT_ID, "certReqId does not match the request")
        out = await self.backend.poll(txn.request_id, txn.cred)
        if out.status == "pending":
            return await self._reply(req, P.poll_rep_body(txn.cert_req_id, CHECK_AFTER, "waiting for an officer's approval"), txn=txn)
        return await self._cert_outcome(req, REPLY_BODY[txn.op], txn, out)

    async def _revoke(self, req: P.Request, cred: Credential) -> bytes:
        issuer, serial, reason = req.revocations[0]
        out = await self.backend.revoke(issuer, serial, reason, cred)
        if out.status == "revoked":
            return await self._reply(req, P.rp_body(P.ACCEPTED))
        return await self._reply(req, P.rp_body(P.REJECTION, out.reason or "refused", out.fail_bit))

    async def _genm(self, req: P.Request) -> bytes:
        items: list[tuple[object, bytes | None]] = []
        for it in req.info_types:
            known, value = await self.backend.info(it)
            if known:
                items.append((P.univ.ObjectIdentifier(it), value))
        return await self._reply(req, P.genp_body(items))


def _cert_hash(cert_der: bytes, hash_alg: str | None) -> bytes:
    """certHash per RFC 9810 §5.3.18: hashAlg if given, else the hash of the certificate's signature algorithm."""
    names = {"2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512"}
    if hash_alg is not None:
        if hash_alg not in names:
            raise P.CmpError(P.BAD_ALG, "certConf hashAlg not accepted")
        return hashlib.new(names[hash_alg], cert_der).digest()
    cert = x509.load_der_x509_certificate(cert_der)
    h = cert.signature_hash_algorithm
    return hashlib.new(h.name if h is not None else "sha512", cert_der).digest()

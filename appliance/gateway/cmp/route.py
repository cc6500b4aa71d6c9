"""CMP over HTTP (RFC 6712) on the gateway: the /.well-known/cmp route, the protection key in the gateway's token, the Factory backend."""

from __future__ import annotations

import os
import time

import msgspec
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pyasn1.codec.der import decoder, encoder
from pyasn1_alt_modules import rfc5280, rfc9810

from appliance.ipc import schema as S

from ..factory_link import FactoryUnavailable
from ..server import Reply, Request, Route
from . import pkimsg as P
from .server import CmpServer, Credential, Outcome

PREFIX = "/.well-known/cmp"
KEY_LABEL = "gateway-cmp"
CERT_FILE = "cmp-protection.pem"
CONTENT_TYPE = b"application/pkixcmp"
CA_CACHE = 60.0  # seconds the CA certificates are reused for signer checks and genm
RETRY = 5.0
ECDSA_SHA256 = "1.2.840.10045.4.3.2"
# Factory refusal codes → PKIFailureInfo.
FAIL = {"unauthorized": P.NOT_AUTHORIZED, "policy": P.BAD_CERT_TEMPLATE, "bad-csr": P.BAD_CERT_TEMPLATE, "bad-request": P.BAD_REQUEST,
        "not-found": P.BAD_CERT_ID, "already-revoked": P.CERT_REVOKED, "inactive": P.SYSTEM_UNAVAIL, "busy": P.SYSTEM_UNAVAIL,
        "internal": P.SYSTEM_FAILURE, "rejected-identifier": P.BAD_CERT_TEMPLATE}


def _checked(msg: object) -> None:
    """Refuse what the Factory's decoder would: a frame out of bounds would cost the gateway its link."""
    try:
        msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=type(msg))
    except msgspec.ValidationError as e:
        raise P.CmpError(P.BAD_REQUEST, f"request out of bounds: {str(e)[:160]}") from None


def _evidence(cred: Credential) -> S.CmpEvidence:
    mac = None
    if cred.mac is not None:
        m = cred.mac
        mac = S.CmpMacParams(kind=m.kind, salt=m.salt, iterations=m.iterations, owf=m.owf, mac=m.mac, key_len=m.key_len)  # type: ignore[arg-type]
    return S.CmpEvidence(kind=cred.kind, ref=cred.ref[:64] or "-", protected=cred.protected_part, protection=cred.protection,  # type: ignore[arg-type]
                         mac=mac, signer_cert=cred.signer_cert, sig_alg=cred.sig_alg)


class FactoryBackend:
    """The CMP server's backend: every decision is the Factory's, asked over the gateway link."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self._cas: tuple[float, list[bytes]] = (0.0, [])

    async def _ask(self, make):
        _checked(make(0))  # a value out of the link's bounds is this client's error, never a frame the Factory must refuse
        try:
            return await self.ctx.factory.request(make)
        except FactoryUnavailable as e:
            raise P.CmpError(P.SYSTEM_UNAVAIL, "the CA is not available, try later") from e

    @staticmethod
    def _outcome(reply) -> Outcome:
        if isinstance(reply, S.GwIssued):
            return Outcome(status="issued", cert_der=reply.cert, chain_der=tuple(reply.chain))
        if isinstance(reply, S.GwPending):
            return Outcome(status="pending", request_id=reply.request_id)
        if isinstance(reply, S.GwRevoked):
            return Outcome(status="revoked")
        if isinstance(reply, S.GwRefused):
            return Outcome(status="refused", reason=reply.reason, fail_bit=FAIL.get(reply.code, P.BAD_REQUEST))
        return Outcome(status="refused", reason="unexpected answer", fail_bit=P.SYSTEM_FAILURE)

    async def check_mac(self, cred: Credential) -> bool:
        reply = await self._ask(lambda i: S.CmpCheck(id=i, evidence=_evidence(cred)))
        return isinstance(reply, S.CmpChecked) and reply.ok

    async def enrol(self, op: str, req: P.CertReq, cred: Credential, profile: str | None, old_cert: bytes | None) -> Outcome:
        subject = P.subject_attrs(req.subject_der) if req.subject_der and req.csr_der is None else ()
        sans = P.template_sans(req.extensions_der) if req.csr_der is None else ()
        ev = _evidence(cred)
        return self._outcome(await self._ask(lambda i: S.CmpEnroll(id=i, op=op, evidence=ev, spki=req.spki_der, subject=subject, sans=sans,  # type: ignore[arg-type]
                                                                   csr=req.csr_der, profile=profile)))

    async def poll(self, request_id: str, cred: Credential) -> Outcome:
        return self._outcome(await self._ask(lambda i: S.CmpPoll(id=i, request_id=request_id, evidence=_evidence(cred))))

    async def confirm(self, cert_der: bytes, accepted: bool, cred: Credential) -> None:
        serial = x509.load_der_x509_certificate(cert_der).serial_number
        sb = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
        await self._ask(lambda i: S.CmpConfirm(id=i, serial=sb, accepted=accepted, evidence=_evidence(cred)))

    async def revoke(self, issuer_der: bytes, serial: int, reason: int | None, cred: Credential) -> Outcome:
        if serial <= 0 or serial.bit_length() > 160 or (reason is not None and not 0 <= reason <= 10):
            return Outcome(status="refused", reason="no such certificate", fail_bit=P.BAD_CERT_ID)
        sb = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
        return self._outcome(await self._ask(lambda i: S.CmpRevoke(id=i, issuer=issuer_der, serial=sb, reason=reason, evidence=_evidence(cred))))

    async def ca_certs(self) -> list[bytes]:
        at, cas = self._cas
        if time.monotonic() - at > CA_CACHE or not cas:
            reply = await self._ask(lambda i: S.CmpInfo(id=i, kind="ca-certs"))
            cas = list(reply.items) if isinstance(reply, S.CmpInfoReply) else []
            self._cas = (time.monotonic(), cas)
        return cas

    async def info(self, info_type: str) -> tuple[bool, bytes | None]:
        if info_type == str(rfc9810.id_it_caCerts):
            v = rfc9810.CaCertsValue()
            for der in await self.ca_certs():
                v.append(decoder.decode(der, asn1Spec=rfc9810.CMPCertificate())[0])
            return True, bytes(encoder.encode(v))
        if info_type == str(rfc9810.id_it_currentCRL):
            reply = await self._ask(lambda i: S.CmpInfo(id=i, kind="crl"))
            items = reply.items if isinstance(reply, S.CmpInfoReply) else []
            return True, (items[0] if items else None)
        if info_type in (str(rfc9810.id_it_rootCaKeyUpdate), str(rfc9810.id_it_certReqTemplate)):
            return True, None  # no root key update pending; no template constraints beyond the credential's profile
        return False, None


class Protection:
    """The gateway's CMP protection key (a P-256 key generated in its own token, never leaving it) and certificate."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.path = os.path.join(ctx.cfg.store_dir, CERT_FILE)
        self.key = None
        self.cert: x509.Certificate | None = None
        self.chain: tuple[bytes, ...] = ()

    def load(self) -> None:
        """Before the drop: the key and the certificate of the last start, if they still match (a new key is made
        after the drop, as the gateway's user: SoftHSM would not read back an object file root wrote)."""
        tok = self.ctx.token
        if tok is None:
            return
        try:
            self.key = tok.key(KEY_LABEL)
        except Exception:  # noqa: BLE001 - no such key yet (TokenError/ObjectMissing): ensure() makes it
            return
        try:
            with open(self.path, "rb") as f:
                certs = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError):
            return
        if certs and self._spki(certs[0]) == self.key.spki and certs[0].not_valid_after_utc.timestamp() > time.time() + 86400:
            self.cert, self.chain = certs[0], tuple(c.public_bytes(serialization.Encoding.DER) for c in certs[1:])

    @staticmethod
    def _spki(cert: x509.Certificate) -> bytes:
        return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    async def ensure(self, server: CmpServer) -> None:
        """Hold a certificate for the protection key: ask the Factory until it gives one, renew before it ends."""
        await self.ctx.factory.ready.wait()
        if self.key is None and self.ctx.token is not None:
            tok = self.ctx.token
            tok.call(lambda: tok.generate(KEY_LABEL, "p256"))
            self.key = tok.call(lambda: tok.key(KEY_LABEL))
        while True:
            if self.key is not None and (self.cert is None or self.cert.not_valid_after_utc.timestamp() < time.time() + 7 * 86400):
                try:
                    reply = await self.ctx.factory.request(lambda i: S.CmpProtectionCert(id=i, spki=self.key.spki))
                except FactoryUnavailable:
                    reply = None
                if isinstance(reply, S.GwIssued):
                    self.cert = x509.load_der_x509_certificate(reply.cert)
                    self.chain = tuple(reply.chain)
                    pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in (reply.cert, *reply.chain))
                    tmp = self.path + ".new"
                    with open(tmp, "wb") as f:
                        f.write(pem)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                else:
                    await trio.sleep(RETRY)
                    continue
            if self.cert is not None:
                server.responder = self.responder()
            await trio.sleep(3600)

    def responder(self) -> P.Responder:
        assert self.cert is not None
        alg = rfc5280.AlgorithmIdentifier()
        alg["algorithm"] = rfc5280.univ.ObjectIdentifier(ECDSA_SHA256)
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ski = x509.SubjectKeyIdentifier.from_public_key(self.cert.public_key()).digest
        return P.Responder(cert_der=self.cert.public_bytes(serialization.Encoding.DER), subject_der=self.cert.subject.public_bytes(),
                           ski=ski, sig_alg_der=bytes(encoder.encode(alg)), chain_der=self.chain)

    async def sign(self, data: bytes) -> bytes:
        # In the event loop's thread: the gateway's one PKCS#11 caller (SoftHSM must not see two threads), ~0.1 ms for P-256.
        # By label through Token.call: a stale handle (the token re-logged in) is found again rather than failing.
        tok = self.ctx.token
        return tok.call(lambda: tok.sign(tok.key(KEY_LABEL), data, hashes.SHA256()))


def routes(ctx, body_cap: int = P.MAX_MESSAGE) -> list[Route]:
    """The CMP route (RFC 6712 §3.6: POST of application/pkixcmp, answered 200 with a PKIMessage, errors included)."""
    prot = Protection(ctx)
    prot.load()
    server = CmpServer(None, prot.sign, FactoryBackend(ctx))  # type: ignore[arg-type]
    ctx.background.append(lambda: prot.ensure(server))

    async def handler(req: Request) -> Reply:
        if req.method != b"POST":
            return Reply(405, [(b"allow", b"POST"), (b"content-type", b"text/plain")], b"CMP takes POST (RFC 6712)\n")
        ctype = req.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != CONTENT_TYPE:
            return Reply(415, [(b"content-type", b"text/plain")], b"Content-Type must be application/pkixcmp\n")
        if server.responder is None:
            return Reply(503, [(b"content-type", b"text/plain"), (b"retry-after", b"5")], b"CMP is starting (no protection certificate yet)\n")
        out = await server.handle(req.body)
        return Reply(200, [(b"content-type", CONTENT_TYPE), (b"cache-control", b"no-store")], out)

    return [Route(PREFIX, handler, body_cap=body_cap, methods=(b"POST",))]

"""What EST and SCEP share in the gateway: the CA chain, the RA identity, Factory enrolments and their outcomes."""

from __future__ import annotations

import os
import ssl
import sys
from dataclasses import dataclass, field

import trio
from cryptography import x509

from appliance.ipc import schema as S

from .factory_link import FactoryUnavailable
from .ra import RaIdentity

CHAIN_EVERY = 3600.0  # refresh the CA chain (a CA renewed by its officers)
RETRY = 5.0  # while the Factory refuses (CA inactive)
BY_CREDENTIAL = "credential"  # CA/profile "as the credential says": the Factory takes them from the secret or the renewed certificate


def _log(msg: str) -> None:
    print(f"donjon[gateway {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """A Factory answer, protocol-neutral: issued (cert + chain), pending (request id), or refused (code, reason)."""

    cert: bytes | None = None
    chain: list[bytes] = field(default_factory=list)
    pending: str | None = None
    retry_after: int = 60
    code: str = ""
    reason: str = ""


class EnrolHub:
    """The CA chain and RA identity EST and SCEP answer with, kept fresh by `maintain`; enrolments through the Factory link."""

    def __init__(self, ctx, ra: RaIdentity, want_ra: bool):
        self.ctx = ctx
        self.ra = ra
        self.want_ra = want_ra
        self.chain: list[bytes] = list(ra.chain)  # issuing CA first
        self.ca_name: str | None = None
        self.ready = trio.Event()
        self.on_chain: list = []  # callbacks(chain) when the chain changes (the TLS client-certificate anchors)

    @property
    def ca_cfg(self) -> str | None:
        return getattr(self.ctx.cfg, "estscep_ca", None)

    async def maintain(self) -> None:
        await self.ctx.factory.ready.wait()
        while True:
            try:
                await self._refresh()
            except FactoryUnavailable as e:
                _log(f"EST/SCEP: {e}; again in {RETRY:g} s")
                await trio.sleep(RETRY)
                continue
            if not self.ready.is_set() and self.chain and (self.ra.ready or not self.want_ra):
                self.ready.set()
            await trio.sleep(CHAIN_EVERY if self.ready.is_set() else RETRY)

    async def _refresh(self) -> None:
        f = self.ctx.factory
        r = await f.request(lambda i: S.GwChainRequest(id=i, ca=self.ca_cfg))
        if isinstance(r, S.GwChain):
            if list(r.chain) != self.chain:
                self.chain = list(r.chain)
                for cb in self.on_chain:
                    cb(self.chain)
            self.ca_name = r.ca
        else:
            _log(f"EST/SCEP: no CA chain yet: {getattr(r, 'reason', r)}")
            return
        if self.want_ra and self.ra.due():
            sl, sspki, dl, dspki = self.ra.new_keys()
            rs = await f.request(lambda i: S.GwRaRequest(id=i, ca=self.ca_cfg, spki=sspki, usage="sign"))
            rd = await f.request(lambda i: S.GwRaRequest(id=i, ca=self.ca_cfg, spki=dspki, usage="decrypt"))
            if isinstance(rs, S.GwIssued) and isinstance(rd, S.GwIssued):
                self.ra.install(sl, rs.cert, dl, rd.cert, list(rs.chain))
                _log(f"SCEP RA certificates {rs.serial.hex()} (signing) and {rd.serial.hex()} (decryption) in use")
            else:
                self.ra.discard(sl, dl)
                bad = rs if not isinstance(rs, S.GwIssued) else rd
                _log(f"SCEP RA certificates refused: {getattr(bad, 'reason', bad)}")

    async def enrol(self, protocol: str, auth: S.GwAuth, csr: bytes, names: tuple[tuple[str, str], ...],
                    can_wait: bool = True) -> Outcome:
        try:
            r = await self.ctx.factory.request(lambda i: S.GwEnroll(
                id=i, protocol=protocol, auth=auth, ca=self.ca_cfg or BY_CREDENTIAL, profile=BY_CREDENTIAL,
                names=names, csr=csr, approval_wait=can_wait))
        except FactoryUnavailable as e:
            return Outcome(code="busy", reason=str(e))
        return self._outcome(r)

    async def poll(self, request_id: str) -> Outcome:
        try:
            r = await self.ctx.factory.request(lambda i: S.GwPoll(id=i, request_id=request_id))
        except FactoryUnavailable as e:
            return Outcome(code="busy", reason=str(e))
        return self._outcome(r)

    async def fetch(self, kind: str, issuer: bytes, serial: int | None) -> Outcome:
        try:
            r = await self.ctx.factory.request(lambda i: S.GwFetch(
                id=i, kind=kind, issuer=issuer, serial=None if serial is None else serial.to_bytes((serial.bit_length() + 8) // 8, "big")))
        except FactoryUnavailable as e:
            return Outcome(code="busy", reason=str(e))
        if isinstance(r, S.GwBlob):
            return Outcome(cert=r.der)
        return self._outcome(r)

    @staticmethod
    def _outcome(r) -> Outcome:
        if isinstance(r, S.GwIssued):
            return Outcome(cert=r.cert, chain=list(r.chain))
        if isinstance(r, S.GwPending):
            return Outcome(pending=r.request_id, retry_after=r.retry_after)
        if isinstance(r, S.GwRefused):
            return Outcome(code=r.code, reason=r.reason)
        return Outcome(code="internal", reason="unexpected answer from the Factory")

    def issued_here(self, cert: x509.Certificate) -> bool:
        """Signed by the EST/SCEP CA (the gateway's check; the Factory checks again, with revocation)."""
        if not self.chain:
            return False
        try:
            cert.verify_directly_issued_by(x509.load_der_x509_certificate(self.chain[0]))
        except Exception:  # noqa: BLE001 - InvalidSignature, a mismatched key type, a bad name: not ours
            return False
        return True


def csr_names(csr: x509.CertificateSigningRequest) -> tuple[tuple[str, str], ...]:
    """The CSR's DNS and IP subjectAltNames, as GwEnroll's names (the Factory checks they are the CSR's)."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[tuple[str, str]] = [("dns", n) for n in san.get_values_for_type(x509.DNSName)]
    out += [("ip", str(a)) for a in san.get_values_for_type(x509.IPAddress)]
    return tuple(out[:100])


def subject_cn(csr: x509.CertificateSigningRequest) -> str | None:
    attrs = csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def routes(ctx) -> list:
    """EST and SCEP routes for the enabled ones, sharing one hub (CA chain, RA identity) kept fresh in the background."""
    from . import scep
    from .est_service import EstService
    from .scep_service import ScepService

    s = ctx.cfg.estscep
    ra = RaIdentity(ctx.token, ctx.cfg.store_dir)
    ra.load()
    hub = EnrolHub(ctx, ra, want_ra="scep" in ctx.cfg.protocols)
    ctx.background.append(hub.maintain)
    out = []
    if "est" in ctx.cfg.protocols:
        def anchors(chain: list[bytes]) -> None:
            if ctx.tls is not None:
                ctx.tls.client_cas = list(chain)
                try:
                    ctx.tls_changed()
                except ssl.SSLError as e:  # keep serving with the previous context
                    _log(f"EST: client-certificate anchors not loaded: {e}")
        hub.on_chain.append(anchors)
        out += EstService(hub, s.est_channel_binding, list(s.est_key_types), ctx.token, ctx.stats).routes(256 * 1024)
    if "scep" in ctx.cfg.protocols:
        algs = scep.Algorithms(allow_des=s.scep_allow_des, allow_weak_digest=s.scep_allow_weak_digest)
        out += ScepService(hub, algs, ctx.cfg.store_dir, ctx.stats).routes(256 * 1024)
    return out


"""EST over HTTPS (RFC 7030): cacerts, simpleenroll (Basic), simplereenroll (client certificate), csrattrs, serverkeygen."""

from __future__ import annotations

import base64
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, load_der_private_key

from appliance.ipc import schema as S

from . import est
from .estscep import EnrolHub, Outcome, csr_names
from .server import Reply, Request, Route, tls_info

# Factory refusal codes -> HTTP statuses (RFC 7030 §4.2.3: 4xx with a human-readable body)
_STATUS = {"unauthorized": 401, "busy": 503, "inactive": 503, "internal": 500}


def _text(status: int, text: str, extra: list | None = None) -> Reply:
    return Reply(status, [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])], (text + "\n").encode(),
                 close=status >= 400)


def _b64(ctype: str, body: bytes) -> Reply:
    return Reply(200, [(b"content-type", ctype.encode()), (b"content-transfer-encoding", b"base64")], body)


class EstService:
    def __init__(self, hub: EnrolHub, channel_binding: str, key_types: list[str], token, stats):
        self.hub = hub
        self.binding = channel_binding  # "off" | "optional" | "required"
        self.key_types = key_types
        self.token = token
        self.stats = stats

    def routes(self, body_cap: int) -> list[Route]:
        return [Route(est.PREFIX, self.handle, body_cap=min(body_cap, est.MAX_BODY), methods=(b"GET", b"POST"))]

    async def handle(self, req: Request) -> Reply:
        try:
            return await self._handle(req)
        except est.EstError as e:
            self.stats.refused += 1
            extra = [(b"www-authenticate", b'Basic realm="donjon-est"')] if e.status == 401 else None
            return _text(e.status, e.text, extra)

    async def _handle(self, req: Request) -> Reply:
        r = est.route(req.path)
        if not est.method_allowed(r.operation, req.method.decode("latin-1")):
            raise est.EstError(405, f"{r.operation} takes {'GET' if r.operation in ('cacerts', 'csrattrs') else 'POST'}")
        if not self.hub.ready.is_set():
            raise est.EstError(503, "EST is not ready yet (no CA chain)")
        if r.operation == "cacerts":
            return _b64(est.CT_PKCS7_CERTS, est.certs_only_b64(self.hub.chain))
        if r.operation == "csrattrs":
            return _b64(est.CT_CSRATTRS, est.csrattrs_b64(self.key_types))
        peer, tls_unique = tls_info()
        # Authenticate before the body is looked at (the server read at most the route's small cap).
        auth = self._auth(req, r.operation, peer)
        ctype = req.headers.get(b"content-type")
        csr = est.read_csr(req.body, ctype.decode("latin-1") if ctype else None)
        if self.binding != "off":
            est.check_channel_binding(csr, tls_unique, required=self.binding == "required")
        if r.operation == "simplereenroll":
            est.check_reenroll(csr, x509.load_der_x509_certificate(peer))  # type: ignore[arg-type]
        if r.operation == "serverkeygen":
            return await self._serverkeygen(auth, csr)
        out = await self.hub.enrol("est", auth, csr.public_bytes(Encoding.DER), csr_names(csr))
        return self._answer(out)

    def _auth(self, req: Request, op: str, peer: bytes | None) -> S.GwAuth:
        if peer is not None:
            cert = x509.load_der_x509_certificate(peer)
            if self.hub.issued_here(cert):
                return S.GwAuth(kind="est-tls", ident=f"{cert.serial_number:x}", cert=peer)
        if op == "simplereenroll":
            raise est.EstError(401, "re-enrolment needs the current certificate as the TLS client certificate")
        creds = est.basic_credentials(req.headers.get(b"authorization", b"").decode("latin-1"))
        if creds is None:
            raise est.EstError(401, "HTTP Basic credentials (an enrolment secret) or a client certificate are required")
        return S.GwAuth(kind="est-basic", ident=creds[0], secret=creds[1])

    def _answer(self, out: Outcome) -> Reply:
        if out.cert is not None:
            self.stats.issued += 1
            return _b64(est.CT_PKCS7_CERTS, est.certs_only_b64([out.cert]))
        if out.pending is not None:
            # RFC 7030 §4.2.3: 202 and Retry-After; the client repeats the same request (the Factory
            # recognises it by its credential and CSR and answers from the waiting request).
            return _text(202, f"waiting for an officer's approval (request {out.pending})",
                         [(b"retry-after", str(out.retry_after).encode())])
        self.stats.refused += 1
        return _text(_STATUS.get(out.code, 400), f"refused ({out.code}): {out.reason[:300]}")

    async def _serverkeygen(self, auth: S.GwAuth, csr: x509.CertificateSigningRequest) -> Reply:
        """The key is made by the gateway's token (an extractable session object, hsm/ra.py), the
        certificate request rebuilt with the client's subject and names and signed with it; the key
        goes back over this TLS channel as PKCS#8 (RFC 7030 §4.4.2, no additional encryption asked)."""
        from hsm import ra as hra
        if self.token is None:
            raise est.EstError(501, "server-side key generation needs the gateway's token")
        pkcs8 = hra.generate_transport_ec(self.token)
        key = load_der_private_key(pkcs8, None)
        b = x509.CertificateSigningRequestBuilder().subject_name(csr.subject)
        try:
            b = b.add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
        except x509.ExtensionNotFound:
            pass
        new = b.sign(key, hashes.SHA256())  # type: ignore[arg-type]
        out = await self.hub.enrol("est", auth, new.public_bytes(Encoding.DER), csr_names(new), can_wait=False)
        if out.cert is None:
            return self._answer(out)
        self.stats.issued += 1
        boundary = "est-" + base64.b32encode(os.urandom(10)).decode().lower()
        ctype, body = est.serverkeygen_body(pkcs8, [out.cert], boundary)
        return Reply(200, [(b"content-type", ctype.encode())], body)

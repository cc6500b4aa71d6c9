"""SCEP over HTTP (RFC 8894 §4): GetCACaps, GetCACert, PKIOperation by GET and POST, answered through the Factory."""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import parse_qs

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.ipc import schema as S

from . import scep
from .estscep import EnrolHub, Outcome, csr_names
from .server import Reply, Request, Route

PREFIX = "/scep"
CT_PKI = b"application/x-pki-message"
POLLS_FILE = "scep-polls.json"
MAX_POLLS = 100_000  # transactions waiting for an officer, remembered for CertPoll
# Factory refusal codes -> failInfo (RFC 8894 §3.2.1.4.5): what the requester did wrong.
_FAIL = {"unauthorized": scep.BAD_REQUEST, "policy": scep.BAD_REQUEST, "bad-csr": scep.BAD_REQUEST,
         "rejected-identifier": scep.BAD_REQUEST, "bad-request": scep.BAD_REQUEST, "not-found": scep.BAD_CERT_ID}


def _text(status: int, text: str) -> Reply:
    return Reply(status, [(b"content-type", b"text/plain; charset=utf-8")], (text + "\n").encode(), close=status >= 400)


class ScepService:
    def __init__(self, hub: EnrolHub, algs: scep.Algorithms, store_dir: str, stats):
        self.hub = hub
        self.algs = algs
        self.stats = stats
        self.path = os.path.join(store_dir, POLLS_FILE)
        # transactionID -> (Factory request id, SHA-256 of the requester's key): a CertPoll must come
        # from the key that made the request (RFC 8894 §3.3.3), kept across restarts.
        self.polls: dict[str, tuple[str, str]] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                self.polls = {k: (v[0], v[1]) for k, v in json.load(f).items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            self.polls = {}

    def routes(self, body_cap: int) -> list[Route]:
        return [Route(PREFIX, self.handle, body_cap=min(body_cap, scep.MAX_MESSAGE), methods=(b"GET", b"POST"))]

    async def handle(self, req: Request) -> Reply:
        query = req.target.split(b"?", 1)[1].decode("latin-1") if b"?" in req.target else ""
        try:
            q = parse_qs(query, max_num_fields=4, strict_parsing=False)
        except ValueError:
            return _text(400, "malformed query")
        op = (q.get("operation") or [""])[0]
        if op == "GetCACaps":
            return Reply(200, [(b"content-type", b"text/plain")], self.algs.caps().encode())
        if not self.hub.ready.is_set():
            return _text(503, "SCEP is not ready yet (no CA chain or RA certificates)")
        if op == "GetCACert":
            # The issuing CA and the RA certificates, not the root: some clients (micromdm's) encrypt to
            # every certificate of the answer, and the root is another key type more often than not.
            ctype, body = scep.ca_cert_response(self.hub.chain[:1], self.hub.ra.ra_certs_der())
            return Reply(200, [(b"content-type", ctype.encode())], body)
        if op != "PKIOperation":
            return _text(400, "unknown SCEP operation")
        try:
            if req.method == b"POST":
                der = req.body
            else:
                der = scep.decode_get_message((q.get("message") or [""])[0])
            msg = scep.parse(der, self.hub.ra, self.algs)
        except scep.Malformed as e:
            self.stats.refused += 1
            return _text(400, f"not an acceptable pkiMessage: {e}")
        except scep.ScepError as e:
            r = scep.request_of(e)
            self.stats.refused += 1
            if r is None:
                return _text(400, e.text)
            return self._rep(r, scep.FAILURE, fail_info=e.fail_info, text=e.text)
        return await self._operation(msg)

    def _rep(self, r: scep.Request, status: str, **kw) -> Reply:
        try:
            body = scep.cert_rep(r, self.hub.ra, status, **kw)
        except scep.ScepError as e:  # nothing to encrypt the certificate to (a non-RSA requester)
            body = scep.cert_rep(r, self.hub.ra, scep.FAILURE, fail_info=e.fail_info, text=e.text)
        return Reply(200, [(b"content-type", CT_PKI)], body)

    async def _operation(self, r: scep.Request) -> Reply:
        if r.message_type in (scep.PKCS_REQ, scep.RENEWAL_REQ):
            assert r.csr is not None
            names = csr_names(r.csr)
            signer = r.signer_cert.public_bytes(Encoding.DER)
            if r.message_type == scep.RENEWAL_REQ or self.hub.issued_here(r.signer_cert):
                # renewal: signed with the current certificate (a RenewalReq, or a PKCSReq as certmonger sends
                # it, spent challenge included), which the Factory checks again (ours, valid, not revoked)
                if not self.hub.issued_here(r.signer_cert):
                    return self._rep(r, scep.FAILURE, fail_info=scep.BAD_MESSAGE_CHECK,
                                     text="a renewal must be signed with a certificate of this CA")
                auth = S.GwAuth(kind="scep-renewal", ident=f"{r.signer_cert.serial_number:x}", cert=signer)
            else:
                if not r.challenge:
                    return self._rep(r, scep.FAILURE, fail_info=scep.BAD_REQUEST, text="a challenge password is required")
                auth = S.GwAuth(kind="scep-challenge", ident=f"txn:{r.transaction_id[:64]}", secret=r.challenge[:256])
            out = await self.hub.enrol("scep", auth, r.csr_der, names)
            return self._answer(r, out)
        if r.message_type == scep.CERT_POLL:
            entry = self.polls.get(r.transaction_id)
            if entry is None or entry[1] != self._key_id(r):
                return self._rep(r, scep.FAILURE, fail_info=scep.BAD_CERT_ID, text="no request waits under this transactionID")
            return self._answer(r, await self.hub.poll(entry[0]))
        kind = "cert" if r.message_type == scep.GET_CERT else "crl"
        out = await self.hub.fetch(kind, r.issuer_der, r.serial if kind == "cert" else None)
        if out.cert is not None:
            return self._rep(r, scep.SUCCESS, **({"certs": [out.cert]} if kind == "cert" else {"crl": out.cert}))
        return self._rep(r, scep.FAILURE, fail_info=_FAIL.get(out.code, scep.BAD_REQUEST), text=out.reason[:200])

    @staticmethod
    def _key_id(r: scep.Request) -> str:
        spki = r.signer_cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()

    def _answer(self, r: scep.Request, out: Outcome) -> Reply:
        if out.cert is not None:
            self.stats.issued += 1
            self._forget(r.transaction_id)
            return self._rep(r, scep.SUCCESS, certs=[out.cert])
        if out.pending is not None:
            self._remember(r.transaction_id, out.pending, self._key_id(r))
            return self._rep(r, scep.PENDING)
        self.stats.refused += 1
        self._forget(r.transaction_id)
        return self._rep(r, scep.FAILURE, fail_info=_FAIL.get(out.code, scep.BAD_REQUEST), text=out.reason[:200])

    def _remember(self, tid: str, request_id: str, key_id: str) -> None:
        if self.polls.get(tid) == (request_id, key_id):
            return
        if len(self.polls) >= MAX_POLLS:
            self.polls.pop(next(iter(self.polls)))
        self.polls[tid] = (request_id, key_id)
        self._save()

    def _forget(self, tid: str) -> None:
        if self.polls.pop(tid, None) is not None:
            self._save()

    def _save(self) -> None:
        tmp = self.path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.polls, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

"""Live OCSP signing with a delegated responder key held in the endpoint's own PKCS#11 token.

Used for what pre-produced responses cannot answer: several CertIDs in one request, and a nonce to
echo (RFC 8954). The statuses come from the held pre-signed responses (so the live answer never says
more than the CA signed); a serial with no held response is `unknown`, never `good`. The key is a
delegated responder key (id-kp-OCSPSigning, ocsp-nocheck), never a CA key. One PKCS#11 caller: the
trio thread; a P-256 signature takes well under a millisecond.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from asn1crypto import core as a_core
from asn1crypto import ocsp as a_ocsp
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from cryptography.x509.oid import NameOID

from hsm.token import Token, TokenError, make_private_key
from policy.responder import check_responder_cert

_REASONS = {
    x509.ReasonFlags.key_compromise: "key_compromise", x509.ReasonFlags.ca_compromise: "ca_compromise",
    x509.ReasonFlags.affiliation_changed: "affiliation_changed", x509.ReasonFlags.superseded: "superseded",
    x509.ReasonFlags.cessation_of_operation: "cessation_of_operation", x509.ReasonFlags.certificate_hold: "certificate_hold",
    x509.ReasonFlags.remove_from_crl: "remove_from_crl", x509.ReasonFlags.privilege_withdrawn: "privilege_withdrawn",
    x509.ReasonFlags.aa_compromise: "aa_compromise", x509.ReasonFlags.unspecified: "unspecified",
}


@dataclass
class Responder:
    label: str
    cert_der: bytes
    key_hash: bytes  # SHA-1 of the responder key's BIT STRING: the ResponderID byKey
    not_after: float


@dataclass(frozen=True)
class Single:
    """One CertID's answer: status from the held response ("good" | "revoked" | "unknown")."""

    hash: str
    name_hash: bytes
    key_hash: bytes
    serial: int
    status: str
    this_update: int
    next_update: int | None
    revoked_at: datetime | None = None
    reason: str | None = None


def single_from_held(cid, held_der: bytes | None, now: int, validity: int) -> Single:
    """The status a held pre-signed response states, or `unknown` when there is none."""
    if held_der is None:
        return Single(cid.hash, cid.name_hash, cid.key_hash, cid.serial, "unknown", now, now + validity)
    r = ocsp.load_der_ocsp_response(held_der)
    if r.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        return Single(cid.hash, cid.name_hash, cid.key_hash, cid.serial, "revoked",
                      int(r.this_update_utc.timestamp()), int(r.next_update_utc.timestamp()),
                      r.revocation_time_utc, _REASONS.get(r.revocation_reason) if r.revocation_reason else None)
    return Single(cid.hash, cid.name_hash, cid.key_hash, cid.serial,
                  "good" if r.certificate_status == ocsp.OCSPCertStatus.GOOD else "unknown",
                  int(r.this_update_utc.timestamp()), int(r.next_update_utc.timestamp()))


def _time(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class LiveSigner:
    """Delegated responder keys by CA name, persisted as `<store>/<ca>/responder.json` + the token key."""

    def __init__(self, token: Token, store_dir: str):
        self.token = token
        self.store_dir = store_dir
        self.responders: dict[str, Responder] = {}

    def load(self) -> None:
        """Before the drop: find every CA's responder certificate and check its key is in the token."""
        if not os.path.isdir(self.store_dir):
            return
        for name in sorted(os.listdir(self.store_dir)):
            meta = os.path.join(self.store_dir, name, "responder.json")
            if os.path.exists(meta):
                with open(meta, encoding="utf-8") as f:
                    doc = json.load(f)
                try:
                    self._install(name, doc["label"], bytes.fromhex(doc["cert"]), persist=False)
                except (TokenError, ValueError, KeyError):
                    continue  # a responder whose key is gone is simply not used

    def generate(self, ca: str) -> tuple[str, bytes]:
        # Unique even for two keys in one second (an officer's and an automatic renewal's).
        label = f"responder-{ca[:32]}-{int(datetime.now(timezone.utc).timestamp())}-{secrets.token_hex(4)}"
        return label, self.token.call(self.token.generate, label, "p256")

    def _install(self, ca: str, label: str, cert_der: bytes, persist: bool = True,
                 issuer: x509.Certificate | None = None) -> None:
        """`ca` is a local CA's name, or `tenant/<name>`; `issuer` (tenants) must have issued the certificate."""
        key = self.token.call(self.token.key, label)
        cert, _ = check_responder_cert(cert_der, key.spki, issuer=issuer)  # ResponderRefused is a ValueError
        bits = a_x509.Certificate.load(cert_der)["tbs_certificate"]["subject_public_key_info"]["public_key"].contents[1:]
        if persist:
            d = os.path.join(self.store_dir, ca)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, "responder.json.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"label": label, "cert": cert_der.hex()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(d, "responder.json"))
        self.responders[ca] = Responder(label, cert_der, hashlib.sha1(bits).digest(), cert.not_valid_after_utc.timestamp())

    def install_tenant(self, key: str, label: str | None, cert_der: bytes | None, issuer: x509.Certificate) -> None:
        """A tenant's responder, kept in the tenant's own record (not persisted here); None removes it."""
        self.responders.pop(key, None)
        if label and cert_der:
            self._install(key, label, cert_der, persist=False, issuer=issuer)

    def generate_tenant(self, tenant: str, subject_cn: str) -> tuple[str, bytes, bytes]:
        """A P-256 key for a tenant's responder and a PKCS#10 CSR signed by it (in the token)."""
        label = f"tenant-{tenant}-{int(datetime.now(timezone.utc).timestamp())}"[:64]
        spki = self.token.call(self.token.generate, label, "p256")
        priv = make_private_key(self.token, self.token.call(self.token.key, label))
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn[:64])]))
               .sign(priv, hashes.SHA256()))
        return label, spki, csr.public_bytes(serialization.Encoding.DER)

    def install(self, ca: str, label: str, cert_der: bytes) -> None:
        self._install(ca, label, cert_der)

    def can_sign(self, ca: str, now: float) -> bool:
        r = self.responders.get(ca)
        return r is not None and r.not_after > now

    def sign(self, ca: str, singles: list[Single], nonce: bytes | None, now: int, extended_revoke: bool = False) -> bytes:
        r = self.responders[ca]
        responses = []
        for s in singles:
            this_update = s.this_update
            if s.status == "revoked":
                # Never "as of T, revoked after T" (a CRL entry may postdate the CRL's thisUpdate).
                this_update = max(this_update, int(s.revoked_at.timestamp()))
                info = {"revocation_time": s.revoked_at}
                if s.reason:
                    info["revocation_reason"] = s.reason
                status = a_ocsp.CertStatus(name="revoked", value=a_ocsp.RevokedInfo(info))
            else:
                status = a_ocsp.CertStatus(name=s.status, value=a_core.Null())
            single = {
                "cert_id": {"hash_algorithm": {"algorithm": s.hash}, "issuer_name_hash": s.name_hash,
                            "issuer_key_hash": s.key_hash, "serial_number": s.serial},
                "cert_status": status, "this_update": _time(this_update),
            }
            if s.next_update is not None:
                single["next_update"] = _time(s.next_update)
            responses.append(single)
        data = {"responder_id": a_ocsp.ResponderId(name="by_key", value=r.key_hash),
                "produced_at": _time(now), "responses": responses}
        exts = []
        if nonce is not None:
            exts.append({"extn_id": "nonce", "critical": False, "extn_value": nonce})  # asn1crypto wraps it in the OCTET STRING
        if extended_revoke:  # RFC 6960 §4.4.8: MUST accompany "revoked" for a serial that was not issued
            exts.append({"extn_id": "extended_revoke", "critical": False, "extn_value": a_core.Null()})
        if exts:
            data["response_extensions"] = exts
        tbs = a_ocsp.ResponseData(data)
        key = self.token.call(self.token.key, r.label)
        sig = self.token.sign(key, tbs.dump(), hashes.SHA256())
        basic = a_ocsp.BasicOCSPResponse({
            "tbs_response_data": tbs, "signature_algorithm": {"algorithm": "sha256_ecdsa"}, "signature": sig,
            "certs": [a_x509.Certificate.load(r.cert_der)]})
        return a_ocsp.OCSPResponse({"response_status": "successful",
                                    "response_bytes": {"response_type": "basic_ocsp_response", "response": basic}}).dump()

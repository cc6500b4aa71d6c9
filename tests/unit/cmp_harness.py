"""The CMP layer under the real `openssl cmp`: a throwaway PKI, an HTTP listener on 127.0.0.1, and FakeIssuer.

FakeIssuer is a fake by necessity, named as such: it stands in for the Factory so that the protocol layer
(appliance/gateway/cmp/) is judged by openssl alone; the appliance tests (tests/integration/test_cmp.py)
run the same clients against the real gateway, Factory, CIS and SoftHSM2.
"""

from __future__ import annotations

import datetime as dt
import http.server
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from appliance.gateway.cmp import pkimsg as P
from appliance.gateway.cmp.server import CmpServer, Credential, Outcome
from policy import cmpmac

CMC_RA = ObjectIdentifier("1.3.6.1.5.5.7.3.28")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False, eku=None, days: int = 30) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if not ca:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


@dataclass
class FakeIssuer:
    """A fake of the Factory's side of CMP (see the module docstring): secrets, issuance, approval, revocation."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    secrets: dict[str, bytes] = field(default_factory=dict)
    issued: dict[int, x509.Certificate] = field(default_factory=dict)
    revoked: dict[int, int | None] = field(default_factory=dict)
    confirmed: list[tuple[int, bool]] = field(default_factory=list)
    pending: dict[str, tuple[P.CertReq, str]] = field(default_factory=dict)  # request id → (request, "wait"|"approve"|"refuse")
    calls: list[str] = field(default_factory=list)

    async def check_mac(self, cred: Credential) -> bool:
        secret = self.secrets.get(cred.ref)
        return secret is not None and cred.mac is not None and cmpmac.verify(cred.mac, secret, cred.protected_part, cred.protection)

    def _issue(self, cr: P.CertReq, old: bytes | None) -> Outcome:
        spki = serialization.load_der_public_key(cr.spki_der)
        if cr.subject_der:
            subject = _name_from_der(cr.subject_der)
        elif old is not None:
            subject = x509.load_der_x509_certificate(old).subject
        else:
            return Outcome(status="refused", reason="no subject", fail_bit=P.BAD_CERT_TEMPLATE)
        if cr.csr_der is not None:
            subject = x509.load_der_x509_csr(cr.csr_der).subject
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_cert.subject).public_key(spki)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        self.issued[cert.serial_number] = cert
        return Outcome(status="issued", cert_der=der(cert), chain_der=(der(self.ca_cert),))

    async def enrol(self, op: str, req: P.CertReq, cred: Credential, profile: str | None, old_cert: bytes | None) -> Outcome:
        self.calls.append(f"enrol {op} {cred.kind}:{cred.ref} {profile}")
        if cred.kind == "signature" and op in ("ir", "cr", "p10cr"):
            signer = x509.load_der_x509_certificate(cred.signer_cert or b"")
            try:
                ekus = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                ekus = []
            if CMC_RA not in ekus and op != "cr":
                return Outcome(status="refused", reason="signer is not an RA", fail_bit=P.NOT_AUTHORIZED)
        if profile == "dual-control":
            rid = f"req-{len(self.pending) + 1}"
            self.pending[rid] = (req, "wait")
            return Outcome(status="pending", request_id=rid)
        return self._issue(req, old_cert)

    async def poll(self, request_id: str, cred: Credential) -> Outcome:
        req, state = self.pending[request_id]
        if state == "wait":
            return Outcome(status="pending", request_id=request_id)
        if state == "refuse":
            return Outcome(status="refused", reason="refused by an officer", fail_bit=P.NOT_AUTHORIZED)
        return self._issue(req, None)

    async def confirm(self, cert_der: bytes, accepted: bool, cred: Credential) -> None:
        self.confirmed.append((x509.load_der_x509_certificate(cert_der).serial_number, accepted))

    async def revoke(self, issuer_der: bytes, serial: int, reason: int | None, cred: Credential) -> Outcome:
        cert = self.issued.get(serial)
        if cert is None or _name_from_der(issuer_der) != self.ca_cert.subject:
            return Outcome(status="refused", reason="unknown certificate", fail_bit=P.BAD_CERT_ID)
        if cred.kind == "signature" and x509.load_der_x509_certificate(cred.signer_cert or b"").serial_number != serial:
            return Outcome(status="refused", reason="only the certificate's own key may revoke it", fail_bit=P.NOT_AUTHORIZED)
        self.revoked[serial] = reason
        return Outcome(status="revoked")

    async def ca_certs(self) -> list[bytes]:
        return [der(self.ca_cert)]

    async def info(self, info_type: str) -> tuple[bool, bytes | None]:
        from pyasn1.codec.der import decoder, encoder
        from pyasn1_alt_modules import rfc9810

        if info_type == str(rfc9810.id_it_caCerts):
            v = rfc9810.CaCertsValue()
            v.append(decoder.decode(der(self.ca_cert), asn1Spec=rfc9810.CMPCertificate())[0])
            return True, bytes(encoder.encode(v))
        if info_type == str(rfc9810.id_it_rootCaKeyUpdate):
            return True, None  # no root key update pending
        return False, None


def _name_from_der(data: bytes) -> x509.Name:
    # cryptography has no loader for a bare Name: rebuild it from pyasn1's decoding (test helper, simple attributes).
    from pyasn1.codec.der import decoder
    from pyasn1_alt_modules import rfc5280

    name, _ = decoder.decode(data, asn1Spec=rfc5280.Name())
    attrs = []
    for rdn in name["rdnSequence"]:
        for atv in rdn:
            value, _ = decoder.decode(bytes(atv["value"]))
            attrs.append(x509.NameAttribute(x509.ObjectIdentifier(str(atv["type"])), str(value)))
    return x509.Name(attrs)


class Listener:
    """openssl cmp's peer: HTTP/1.0 POST of application/pkixcmp on 127.0.0.1, answered by a CmpServer (one thread)."""

    def __init__(self, server: CmpServer) -> None:
        cmp = server
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(min(n, P.MAX_MESSAGE + 1))
                with lock:
                    out = trio.run(cmp.handle, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/pkixcmp")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def openssl_cmp(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `openssl cmp`; its log lines go to stdout or stderr by level, so .stderr holds both (tests read one place)."""
    r = subprocess.run(["openssl", "cmp", "-config", "", "-batch", "-msg_timeout", "10", "-total_timeout", "30", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, stdout=r.stdout, stderr=r.stdout)

"""The gateway's HTTPS identity: a P-256 key kept in its own token, a certificate from a local CA."""

# Python's ssl module cannot sign through PKCS#11, so the key is made here and stored in the gateway's
# own SoftHSM2 token as a private object (encrypted at rest under that token's PIN, which only the
# gateway gets); it is read into this process's memory to build the TLS context and never written to
# disk in clear (a memfd, else a 0600 file removed at once). Never a CA key: those live in the CA token.

from __future__ import annotations

import os
import ssl
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.token import Token

RENEW_FRACTION = 1 / 3  # renew when less than this part of the certificate's lifetime is left
LABEL_FILE = "tls-label"
CERT_FILE = "tls-chain.pem"


class TlsIdentity:
    def __init__(self, token: Token | None, store_dir: str):
        self.token = token
        self.dir = store_dir
        self.key_pem: bytes | None = None
        self.label: str | None = None
        self.chain_pem: bytes | None = None
        self.not_after = 0.0
        self.not_before = 0.0
        self.client_cas: list[bytes] = []  # DER anchors for client certificates (EST); empty: none asked for

    def load(self) -> None:
        """The key and certificate of the last start, if any (before the drop)."""
        try:
            with open(os.path.join(self.dir, LABEL_FILE), encoding="ascii") as f:
                label = f.read().strip()
            with open(os.path.join(self.dir, CERT_FILE), "rb") as f:
                chain = f.read()
        except (OSError, UnicodeDecodeError):
            return
        der = self.token.policy(label) if self.token is not None and label else None
        if der is None:
            return
        key = serialization.load_der_private_key(der, None)
        cert = x509.load_pem_x509_certificate(chain)
        if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            return
        self.label, self.chain_pem = label, chain
        self.key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.not_before = cert.not_valid_before_utc.timestamp()
        self.not_after = cert.not_valid_after_utc.timestamp()

    def due(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.key_pem is None:
            return True
        return now >= self.not_after - (self.not_after - self.not_before) * RENEW_FRACTION

    def new_key(self) -> tuple[str, bytes, bytes]:
        """A fresh key stored in the token: (label, SPKI DER, PKCS#8 PEM)."""
        if self.token is None:
            raise RuntimeError("the gateway has no token for its TLS key")
        key = ec.generate_private_key(ec.SECP256R1())
        label = f"gateway-tls-{int(time.time())}-{os.urandom(3).hex()}"
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.token.store_policy(label, der)  # a private, unmodifiable data object of the gateway's own token
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return label, spki, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def install(self, label: str, key_pem: bytes, cert: bytes, chain: list[bytes]) -> None:
        """Keep the new certificate (and forget the previous key in the token)."""
        pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in [cert, *chain[:-1]])
        tmp = os.path.join(self.dir, CERT_FILE + ".new")
        with open(tmp, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, CERT_FILE))
        with open(tmp, "w", encoding="ascii") as f:
            f.write(label + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, LABEL_FILE))
        old, self.label = self.label, label
        if old and old != label and self.token is not None:
            try:
                self.token.delete(old)
            except Exception:  # noqa: BLE001 - a stale object costs nothing; the new one is in use
                pass
        c = x509.load_der_x509_certificate(cert)
        self.key_pem, self.chain_pem = key_pem, pem
        self.not_before = c.not_valid_before_utc.timestamp()
        self.not_after = c.not_valid_after_utc.timestamp()

    def context(self) -> ssl.SSLContext:
        assert self.key_pem is not None and self.chain_pem is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        if self.client_cas:
            # EST re-enrolment authenticates with the current certificate: asked for, never required
            # (ACME and first enrolments have none); verified against the EST/SCEP CA's chain.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            # As PEM text: with DER, OpenSSL 3 ends the list without an error of its own and Python
            # then reports whatever error was queued before (it failed once with NO_SUCH_ENGINE).
            ctx.load_verify_locations(cadata="".join(ssl.DER_cert_to_PEM_cert(c) for c in self.client_cas))
        data = self.chain_pem + self.key_pem
        try:
            fd = os.memfd_create("gateway-tls", os.MFD_CLOEXEC)
            try:
                os.write(fd, data)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        except (OSError, ssl.SSLError):
            path = os.path.join(self.dir, f".tls-{os.getpid()}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.close(fd)
                ctx.load_cert_chain(path)
            finally:
                os.unlink(path)
        return ctx

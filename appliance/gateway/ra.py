"""The gateway's SCEP RA identity: a sign-only and a decrypt-only RSA key in its own token, their certificates from the Factory."""

from __future__ import annotations

import json
import os
import time

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsm import ra as hra
from hsm.token import Token, TokenError

STATE_FILE = "scep-ra.json"
RENEW_FRACTION = 1 / 3  # renew when a third of the lifetime is left


class RaIdentity:
    """Implements scep.RaKeys. Token calls run in the trio thread: the role's one PKCS#11 caller."""

    def __init__(self, token: Token | None, store_dir: str):
        self.token = token
        self.dir = store_dir
        self.sign_label = self.decrypt_label = ""
        self.sign_cert: x509.Certificate | None = None  # type: ignore[assignment]
        self.decrypt_cert: x509.Certificate | None = None  # type: ignore[assignment]
        self.chain: list[bytes] = []  # the issuing CA first, up to the root

    @property
    def ready(self) -> bool:
        return self.sign_cert is not None and self.decrypt_cert is not None

    def load(self) -> None:
        try:
            with open(os.path.join(self.dir, STATE_FILE), encoding="utf-8") as f:
                d = json.load(f)
            self.sign_label, self.decrypt_label = d["sign_label"], d["decrypt_label"]
            self.sign_cert = x509.load_der_x509_certificate(bytes.fromhex(d["sign_cert"]))
            self.decrypt_cert = x509.load_der_x509_certificate(bytes.fromhex(d["decrypt_cert"]))
            self.chain = [bytes.fromhex(c) for c in d["chain"]]
        except (OSError, ValueError, KeyError, TypeError):
            self.sign_cert = self.decrypt_cert = None

    def due(self, now: float | None = None) -> bool:
        if not self.ready:
            return True
        now = time.time() if now is None else now
        c = min((self.sign_cert, self.decrypt_cert), key=lambda c: c.not_valid_after_utc)  # type: ignore[arg-type, union-attr]
        start, end = c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp()
        return now >= end - (end - start) * RENEW_FRACTION

    def new_keys(self) -> tuple[str, bytes, str, bytes]:
        """Two fresh keys in the token: (sign label, SPKI, decrypt label, SPKI)."""
        if self.token is None:
            raise TokenError("the gateway has no token for its RA keys")
        stamp = f"{int(time.time())}-{os.urandom(3).hex()}"
        sl, dl = f"scep-ra-sign-{stamp}", f"scep-ra-decrypt-{stamp}"
        return sl, hra.generate_signing_key(self.token, sl), dl, hra.generate_decryption_key(self.token, dl)

    def install(self, sign_label: str, sign_cert: bytes, decrypt_label: str, decrypt_cert: bytes, chain: list[bytes]) -> None:
        d = {"sign_label": sign_label, "decrypt_label": decrypt_label, "sign_cert": sign_cert.hex(),
             "decrypt_cert": decrypt_cert.hex(), "chain": [c.hex() for c in chain]}
        tmp = os.path.join(self.dir, STATE_FILE + ".new")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(d, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, STATE_FILE))
        old = (self.sign_label, self.decrypt_label)
        self.load()
        for label in old:
            if label and label not in (sign_label, decrypt_label) and self.token is not None:
                try:
                    self.token.delete(label)
                except TokenError:
                    pass

    def discard(self, *labels: str) -> None:
        for label in labels:
            try:
                if self.token is not None:
                    self.token.delete(label)
            except TokenError:
                pass

    def ra_certs_der(self) -> list[bytes]:
        return [c.public_bytes(Encoding.DER) for c in (self.decrypt_cert, self.sign_cert) if c is not None]

    # scep.RaKeys
    def sign(self, data: bytes, digest: str) -> bytes:
        assert self.token is not None
        return hra.sign(self.token, self.sign_label, data, digest)

    def decrypt(self, ciphertext: bytes) -> bytes:
        assert self.token is not None
        return hra.decrypt(self.token, self.decrypt_label, ciphertext)

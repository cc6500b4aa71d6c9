"""A small ACME client for the negative tests, the fuzz and the benchmark: JWS by hand (ES256), so that a
test can break any part of a request on purpose. Not a judge of conformance (the real clients are)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import time
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwk(key: ec.EllipticCurvePrivateKey) -> dict:
    n = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": b64(n.x.to_bytes(32, "big")), "y": b64(n.y.to_bytes(32, "big"))}


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    return b64(hashlib.sha256(json.dumps(jwk(key), sort_keys=True, separators=(",", ":")).encode()).digest())


def sign(key: ec.EllipticCurvePrivateKey, protected: dict, payload: bytes | None) -> bytes:
    p = b64(json.dumps(protected).encode())
    pl = "" if payload is None else b64(payload)
    der = key.sign(f"{p}.{pl}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return json.dumps({"protected": p, "payload": pl, "signature": b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))}).encode()


def csr_for(names: list[str], key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    gns: list[x509.GeneralName] = []
    for n in names:
        try:
            gns.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            gns.append(x509.DNSName(n))
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(gns), critical=False).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER), key


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def problem(self) -> str:
        """The ACME error type without its prefix ("" if not a problem document)."""
        if self.headers.get("content-type", "").startswith("application/problem+json"):
            return self.json().get("type", "").removeprefix("urn:ietf:params:acme:error:")
        return ""


class Client:
    def __init__(self, directory: str, cafile: str, key: ec.EllipticCurvePrivateKey | None = None):
        u = urlsplit(directory)
        self.host, self.port = u.hostname, u.port or 443
        self.ctx = ssl.create_default_context(cafile=cafile)
        self.conn: http.client.HTTPSConnection | None = None
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.dir = self.get(directory).json()
        self.kid: str | None = None
        self.nonce: str | None = None
        self.last_cert_key: ec.EllipticCurvePrivateKey | None = None  # of the last certificate issue_http01 got

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, url: str, body: bytes | None = None, ctype: str = "application/jose+json") -> Response:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            try:
                path = urlsplit(url).path + (("?" + urlsplit(url).query) if urlsplit(url).query else "")
                self.conn.request(method, path, body=body, headers={"Content-Type": ctype} if body is not None else {})
                r = self.conn.getresponse()
                data = r.read()
                headers = {k.lower(): v for k, v in r.getheaders()}
                if headers.get("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                if "replay-nonce" in headers:
                    self.nonce = headers["replay-nonce"]
                return Response(r.status, headers, data)
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, url: str) -> Response:
        return self._request("GET", url)

    def new_nonce(self) -> str:
        self._request("HEAD", self.dir["newNonce"])
        assert self.nonce
        return self.nonce

    def post(self, url: str, payload: dict | bytes | None, *, key: ec.EllipticCurvePrivateKey | None = None,
             use_jwk: bool = False, nonce: str | None = None, url_in_jws: str | None = None, raw: bytes | None = None) -> Response:
        """A JWS POST; payload None is POST-as-GET. Every part may be overridden to break it."""
        if raw is None:
            key = key or self.key
            prot: dict = {"alg": "ES256", "nonce": nonce or self.nonce or self.new_nonce(), "url": url_in_jws or url}
            if use_jwk or self.kid is None:
                prot["jwk"] = jwk(key)
            else:
                prot["kid"] = self.kid
            body = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
            raw = sign(key, prot, body)
            self.nonce = None
        return self._request("POST", url, raw)

    def register(self, **extra) -> Response:
        r = self.post(self.dir["newAccount"], {"termsOfServiceAgreed": True, **extra}, use_jwk=True)
        if r.status in (200, 201):
            self.kid = r.headers["location"]
        return r

    def order(self, names: list[str], **extra) -> Response:
        ids = [{"type": "ip" if n.replace(".", "").isdigit() else "dns", "value": n} for n in names]
        return self.post(self.dir["newOrder"], {"identifiers": ids, **extra})

    def key_authorization(self, token: str) -> str:
        return f"{token}.{thumbprint(self.key)}"

    def wait(self, url: str, until: tuple[str, ...], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.post(url, None).json()
            if doc.get("status") in until or time.monotonic() > deadline:
                return doc
            time.sleep(0.05)

    def issue_http01(self, names: list[str], webroot, **order_extra) -> tuple[dict, str]:
        """new order -> http-01 (files in `webroot`) -> finalize -> download: (order, PEM chain)."""
        r = self.order(names, **order_extra)
        assert r.status == 201, r.body
        order, order_url = r.json(), r.headers["location"]
        for az in order["authorizations"]:
            z = self.post(az, None).json()
            ch = next(c for c in z["challenges"] if c["type"] == "http-01")
            (webroot / ".well-known" / "acme-challenge" / ch["token"]).write_text(self.key_authorization(ch["token"]))
            assert self.post(ch["url"], {}).status == 200
        order = self.wait(order_url, ("ready", "invalid"))
        assert order["status"] == "ready", order
        der, self.last_cert_key = csr_for(names)
        r = self.post(order["finalize"], {"csr": b64(der)})
        assert r.status == 200, r.body
        order = self.wait(order_url, ("valid", "invalid"))
        return order, self.post(order["certificate"], None).body.decode()


def name_of(names: list[str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])

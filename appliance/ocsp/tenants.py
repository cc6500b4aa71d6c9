"""CRL-fed tenants in the endpoint: their configuration, current CRL and issued-serials list, in memory and on disk.

Layout beneath `<store_dir>/tenants/<name>/` (each file replaced atomically):

    tenant.json    CA certificate, unissued policy, push-secret SHA-256, responder label and certificate
    crl.der        the current CRL (checked again with policy.tenants when loaded)
    serials.txt    the issued-serials list, as uploaded (absent: none)

A restarted endpoint serves its tenants from here before (and without) the Factory. Signed answers
are cached per (CertID hash, serial) until the CRL's nextUpdate and dropped when a new CRL arrives.
Not thread-safe: the trio thread owns the dicts; `read_crl`/`read_serials` are pure and may run in
a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from dataclasses import dataclass, field

from cryptography import x509

from policy.ocsp import issuer_hashes
from policy.tenants import CrlRefused, TenantCrl, check_ca_cert, check_crl, parse_issued_serials

from .store import _atomic_write, _fsync_dir

CACHE_MAX = 100_000  # signed answers kept per tenant (cleared when full: a cache, not a store)


@dataclass
class Tenant:
    name: str
    path: str
    ca_der: bytes
    ca: x509.Certificate
    hashes: dict[str, tuple[bytes, bytes]]
    unissued: str  # "unknown" | "revoked"
    secret_sha256: bytes | None
    responder_label: str | None
    responder_cert: bytes | None
    crl: TenantCrl | None = None
    crl_der: bytes | None = None
    serials: frozenset[int] | None = None
    cache: dict[tuple[str, int], tuple[bytes, str]] = field(default_factory=dict)

    @property
    def signer_key(self) -> str:
        """The LiveSigner key of this tenant's responder ('/' never occurs in a CA name)."""
        return f"tenant/{self.name}"

    def secret_ok(self, presented: bytes) -> bool:
        if self.secret_sha256 is None:
            return False
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self.secret_sha256)


def read_crl(ca: x509.Certificate, der: bytes) -> TenantCrl:
    """Pure (may run in a worker thread): a CRL the Factory accepted, checked again but without the
    clock — it is stored as the current one, and a stale CRL is never answered from."""
    return check_crl(ca, der, 0, None, clock=False)


def read_serials(ca: x509.Certificate, data: bytes) -> frozenset[int]:
    return parse_issued_serials(data, ca)


class Tenants:
    def __init__(self, store_dir: str):
        self.root = os.path.join(store_dir, "tenants")
        self.by_name: dict[str, Tenant] = {}
        self.issuers: dict[tuple[str, bytes, bytes], str] = {}
        self.partial: dict[tuple[str, str], list[bytes]] = {}
        self.version = 0  # bumped after every change of which issuers are tenants' (see Store.version)

    # ---------------------------------------------------------------- load

    def load(self, now: float, log=lambda m: None) -> None:
        """Before the drop: every tenant held on disk, with its CRL if that still checks out."""
        if not os.path.isdir(self.root):
            return
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            try:
                with open(os.path.join(path, "tenant.json"), encoding="utf-8") as f:
                    doc = json.load(f)
                t = self._make(name, path, doc)
            except (OSError, ValueError, KeyError, CrlRefused) as e:
                log(f"tenant {name}: not loaded ({type(e).__name__})")
                continue
            crl_path = os.path.join(path, "crl.der")
            if os.path.exists(crl_path):
                with open(crl_path, "rb") as f:
                    der = f.read()
                try:
                    # A stale CRL is kept (it may be replaced) but never answered from: check without the clock.
                    t.crl, t.crl_der = check_crl(t.ca, der, now, clock=False), der
                except CrlRefused as e:
                    log(f"tenant {name}: stored CRL not used: {e}")
            spath = os.path.join(path, "serials.txt")
            if os.path.exists(spath):
                with open(spath, "rb") as f:
                    try:
                        t.serials = parse_issued_serials(f.read(), t.ca)
                    except CrlRefused as e:
                        log(f"tenant {name}: stored issued-serials list not used: {e}")
            self._index(t)

    def _make(self, name: str, path: str, doc: dict) -> Tenant:
        ca_der = bytes.fromhex(doc["ca_cert"])
        ca = check_ca_cert(ca_der)
        return Tenant(name=name, path=path, ca_der=ca_der, ca=ca, hashes=issuer_hashes(ca_der), unissued=doc["unissued"],
                      secret_sha256=bytes.fromhex(doc["push_secret_sha256"]) if doc.get("push_secret_sha256") else None,
                      responder_label=doc.get("responder_label"),
                      responder_cert=bytes.fromhex(doc["responder_cert"]) if doc.get("responder_cert") else None)

    def _index(self, t: Tenant) -> None:
        self._unindex(t.name)
        self.by_name[t.name] = t
        for alg, (nh, kh) in t.hashes.items():
            self.issuers[(alg, nh, kh)] = t.name
        self.version += 1

    def _unindex(self, name: str) -> None:
        for k in [k for k, v in self.issuers.items() if v == name]:
            del self.issuers[k]
        self.by_name.pop(name, None)
        self.version += 1

    # ---------------------------------------------------------------- queries

    def for_issuer(self, alg: str, name_hash: bytes, key_hash: bytes) -> Tenant | None:
        name = self.issuers.get((alg, name_hash, key_hash))
        return self.by_name.get(name) if name is not None else None

    # ---------------------------------------------------------------- changes from the feed (blocking: fsync)

    def configure(self, msg) -> Tenant:
        """A TenantConfig: write tenant.json, then make it visible (keeping the CRL, list and cache
        unless the CA certificate changed)."""
        path = os.path.join(self.root, msg.tenant)
        doc = {"ca_cert": msg.ca_cert.hex(), "unissued": msg.unissued,
               "push_secret_sha256": msg.push_secret_sha256.hex() if msg.push_secret_sha256 else None,
               "responder_label": msg.responder_label,
               "responder_cert": msg.responder_cert.hex() if msg.responder_cert else None}
        t = self._make(msg.tenant, path, doc)  # validates before anything is written
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        new_dir = not os.path.isdir(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        if new_dir:
            _fsync_dir(self.root)
        _atomic_write(os.path.join(path, "tenant.json"), json.dumps(doc).encode())
        old = self.by_name.get(msg.tenant)
        if old is not None and old.ca_der == t.ca_der:
            t.crl, t.crl_der, t.serials = old.crl, old.crl_der, old.serials
            if old.unissued == t.unissued and old.responder_cert == t.responder_cert:
                t.cache = old.cache
        elif old is not None:  # another CA under the same name: what was held no longer applies
            for fn in ("crl.der", "serials.txt"):
                try:
                    os.unlink(os.path.join(path, fn))
                except FileNotFoundError:
                    pass
        self._index(t)
        return t

    def remove(self, name: str) -> None:
        self._unindex(name)
        path = os.path.join(self.root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            _fsync_dir(self.root)

    def keep_only(self, names: set[str]) -> list[str]:
        gone = [n for n in self.by_name if n not in names]
        if os.path.isdir(self.root):
            gone += [n for n in os.listdir(self.root) if n not in names and n not in gone]
        for n in gone:
            self.remove(n)
        return gone

    def chunk(self, kind: str, name: str, data: bytes, last: bool, max_bytes: int = 256 << 20) -> bytes | None:
        """Collect a streamed CRL or list; the whole of it on `last`."""
        parts = self.partial.setdefault((kind, name), [])
        parts.append(bytes(data))
        if sum(len(p) for p in parts) > max_bytes:
            del self.partial[(kind, name)]
            raise CrlRefused(f"{kind} stream too large")
        if not last:
            return None
        return b"".join(self.partial.pop((kind, name)))

    def set_crl(self, name: str, der: bytes, crl: TenantCrl) -> None:
        t = self.by_name[name]
        _atomic_write(os.path.join(t.path, "crl.der"), der)
        t.crl, t.crl_der = crl, der
        t.cache.clear()

    def set_serials(self, name: str, data: bytes | None, serials: frozenset[int] | None) -> None:
        t = self.by_name[name]
        p = os.path.join(t.path, "serials.txt")
        if data is None:
            try:
                os.unlink(p)
                _fsync_dir(t.path)
            except FileNotFoundError:
                pass
        else:
            _atomic_write(p, data)
        t.serials = serials
        t.cache.clear()

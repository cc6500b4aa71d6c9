"""Fetch a CRL-fed tenant's CRL over HTTP or LDAP (RFC 4516 URLs), bounded in size and time
(blocking code, run in a worker thread by the agent). The Factory verifies what comes back."""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import unquote, urlsplit

from .publish import PublishError, _oneline

MAX_CRL = 64 << 20  # policy.tenants.MAX_CRL: nothing larger is ever accepted
TIMEOUT = 30


def fetch(urls: list[str]) -> tuple[str, bytes]:
    """The first URL that gives something: (url, bytes). Raises PublishError with every URL's error."""
    errors = []
    for url in urls:
        try:
            if url.startswith(("http://", "https://")):
                return url, _http(url)
            if url.startswith("ldap://") or url.startswith("ldaps://"):
                return url, _ldap(url)
            errors.append(f"{url}: unsupported scheme")
        except PublishError as e:
            errors.append(f"{url}: {e}")
    raise PublishError("; ".join(errors)[:3000])


def _http(url: str) -> bytes:
    u = urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    kw = {"context": ssl.create_default_context()} if u.scheme == "https" else {}
    conn = cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=TIMEOUT, **kw)
    try:
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                     headers={"User-Agent": "donjon-distribution", "Accept": "application/pkix-crl"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise PublishError(f"HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > MAX_CRL:
            raise PublishError(f"{length} bytes is more than a CRL may be here")
        data = resp.read(MAX_CRL + 1)
    except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as e:
        raise PublishError(_oneline(e)) from None
    finally:
        conn.close()
    if len(data) > MAX_CRL:
        raise PublishError("the answer is larger than a CRL may be here")
    if not data:
        raise PublishError("empty answer")
    return data


def _ldap(url: str) -> bytes:
    """ldap://host[:port]/<dn>?<attribute> (base object, anonymous bind), e.g.
    ldap://ldap.example.org/cn=CA,dc=example,dc=org?certificateRevocationList;binary"""
    import ldap3

    u = urlsplit(url)
    dn = unquote(u.path.lstrip("/"))
    attr = unquote(u.query.split("?", 1)[0]) or "certificateRevocationList;binary"
    if not dn:
        raise PublishError("an LDAP CRL URL names the entry: ldap://host/<dn>?<attribute>")
    if not attr.endswith(";binary"):
        attr += ";binary"
    server = ldap3.Server(u.hostname, port=u.port or (636 if u.scheme == "ldaps" else 389), use_ssl=u.scheme == "ldaps",
                          get_info=ldap3.NONE, connect_timeout=TIMEOUT)
    conn = ldap3.Connection(server, auto_bind=ldap3.AUTO_BIND_NONE, receive_timeout=TIMEOUT, raise_exceptions=False,
                            check_names=False, read_only=True)
    try:
        conn.open(read_server_info=False)
        if conn.closed or not conn.bind(read_server_info=False):
            raise PublishError("cannot reach or bind anonymously")
        if not conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[attr], size_limit=1):
            raise PublishError(f"search {dn}: {(conn.result or {}).get('description', 'no entry')}")
        for e in conn.response or []:
            for name, vals in (e.get("raw_attributes") or {}).items():
                if name.lower() == attr.lower() and vals:
                    if len(vals[0]) > MAX_CRL:
                        raise PublishError("the attribute is larger than a CRL may be here")
                    return bytes(vals[0])
        raise PublishError(f"{dn} has no {attr}")
    except PublishError:
        raise
    except Exception as e:  # noqa: BLE001 - ldap3 raises IndexError, socket errors, its own types on garbage
        raise PublishError(f"LDAP: {_oneline(e)}") from None
    finally:
        try:
            conn.unbind()
        except Exception:  # noqa: BLE001
            pass

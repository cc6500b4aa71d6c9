"""ACME challenge validation (http-01, dns-01, tls-alpn-01 of RFC 8737; IP identifiers of RFC 8738), only to allowed networks."""

from __future__ import annotations

import hashlib
import ipaddress
import ssl

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.rdatatype
import dns.reversename
import h11
import trio
from cryptography import x509

from ..netpolicy import Denied, NetPolicy
from .jose import b64e

TIMEOUT = 10.0
MAX_BODY = 8 * 1024  # a key authorization is ~90 bytes
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class Failed(Exception):
    """`kind` is the ACME error type (incorrectResponse, connection, dns, tls, unauthorized)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class Validator:
    def __init__(self, net: NetPolicy, resolver: str | None, http_port: int = 80, alpn_port: int = 443):
        self.net = net
        self.http_port = http_port
        self.alpn_port = alpn_port
        if resolver:
            host, _, port = resolver.rpartition(":")
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [host.strip("[]")]
            r.port = int(port)
        else:
            r = dns.asyncresolver.Resolver()
        r.lifetime = TIMEOUT
        r.timeout = 3.0
        self.resolver = r

    async def addresses(self, kind: str, value: str) -> list[str]:
        """Where to connect for an identifier: its literal, or its A/AAAA records; each must be allowed."""
        if kind == "ip":
            return [self.net.check(value)]
        out: list[str] = []
        for rtype in ("A", "AAAA"):
            try:
                ans = await self.resolver.resolve(value, rtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            except (dns.exception.DNSException, OSError) as e:
                raise Failed("dns", f"resolving {value} ({rtype}): {type(e).__name__}") from None
            out += [r.address for r in ans]
        if not out:
            raise Failed("dns", f"no A or AAAA record for {value}")
        allowed = []
        for a in out:
            try:
                allowed.append(self.net.check(a))
            except Denied:
                continue
        if not allowed:
            raise Failed("rejectedIdentifier", f"{value} resolves only to addresses validation may not reach ({', '.join(out[:3])})")
        return allowed[:2]

    async def http01(self, kind: str, value: str, token: str, key_auth: str) -> None:
        last: Failed | None = None
        for addr in await self.addresses(kind, value):
            try:
                body = await self._get(addr, self.http_port, value if kind == "dns" else addr, f"/.well-known/acme-challenge/{token}")
            except Failed as e:
                last = e
                continue
            if body.strip() != key_auth.encode():
                raise Failed("incorrectResponse", f"the key authorization served at {value} is not the expected one")
            return
        raise last or Failed("connection", f"could not reach {value}")

    async def _get(self, addr: str, port: int, host: str, path: str) -> bytes:
        conn = h11.Connection(h11.CLIENT)
        hosthdr = f"[{host}]" if ":" in host else host
        try:
            with trio.fail_after(TIMEOUT):
                stream = await trio.open_tcp_stream(addr, port)
                async with stream:
                    await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=[
                        ("Host", hosthdr), ("User-Agent", "donjon-acme-validation"), ("Accept", "*/*"), ("Connection", "close")])))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    body = bytearray()
                    status = 0
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(16384))
                            continue
                        if isinstance(ev, h11.Response):
                            status = ev.status_code
                        elif isinstance(ev, h11.Data):
                            body += ev.data
                            if len(body) > MAX_BODY:
                                raise Failed("unauthorized", "the challenge response is too large")
                        elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                            break
        except trio.TooSlowError:
            raise Failed("connection", f"timeout reaching {addr}:{port}") from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as e:
            raise Failed("connection", f"{addr}:{port}: {type(e).__name__}") from None
        if status != 200:
            raise Failed("unauthorized", f"http-01: {host} answered HTTP {status}")
        return bytes(body)

    async def dns01(self, value: str, key_auth: str) -> None:
        want = b64e(hashlib.sha256(key_auth.encode()).digest())
        name = "_acme-challenge." + value.removeprefix("*.")
        try:
            ans = await self.resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise Failed("unauthorized", f"no TXT record at {name}") from None
        except (dns.exception.DNSException, OSError) as e:
            raise Failed("dns", f"TXT {name}: {type(e).__name__}") from None
        for r in ans:
            if b"".join(r.strings).decode("ascii", "replace") == want:
                return
        raise Failed("unauthorized", f"no TXT record at {name} holds the expected value")

    async def tlsalpn01(self, kind: str, value: str, key_auth: str) -> None:
        digest = hashlib.sha256(key_auth.encode()).digest()
        sni = value if kind == "dns" else dns.reversename.from_address(value).to_text(omit_final_dot=True)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["acme-tls/1"])
        last: Failed | None = None
        for addr in await self.addresses(kind, value):
            try:
                with trio.fail_after(TIMEOUT):
                    tcp = await trio.open_tcp_stream(addr, self.alpn_port)
                    tls = trio.SSLStream(tcp, ctx, server_hostname=sni)
                    try:
                        await tls.do_handshake()
                        proto = tls.selected_alpn_protocol()
                        der = tls.getpeercert(binary_form=True)
                    finally:
                        await trio.aclose_forcefully(tls)
            except trio.TooSlowError:
                last = Failed("connection", f"timeout reaching {addr}:{self.alpn_port}")
                continue
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
                last = Failed("tls", f"{addr}:{self.alpn_port}: {type(e).__name__}")
                continue
            if proto != "acme-tls/1" or not der:
                raise Failed("unauthorized", "tls-alpn-01: the server did not negotiate acme-tls/1")
            check_alpn_cert(der, kind, value, digest)
            return
        raise last or Failed("connection", f"could not reach {value}")


def check_alpn_cert(der: bytes, kind: str, value: str, digest: bytes) -> None:
    """RFC 8737 §3: one SAN, the identifier; the critical acmeIdentifier extension with the digest."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    except (ValueError, x509.ExtensionNotFound) as e:
        raise Failed("unauthorized", f"tls-alpn-01: certificate without {'the acmeIdentifier extension' if 'Extension' in type(e).__name__ else 'SAN'}") from None
    names = list(san)
    if kind == "dns":
        ok = len(names) == 1 and isinstance(names[0], x509.DNSName) and names[0].value.lower() == value.lower()
    else:
        ok = len(names) == 1 and isinstance(names[0], x509.IPAddress) and names[0].value == ipaddress.ip_address(value)
    if not ok:
        raise Failed("unauthorized", "tls-alpn-01: the certificate's SAN is not exactly the identifier")
    raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    if not ext.critical or raw != b"\x04\x20" + digest:
        raise Failed("incorrectResponse", "tls-alpn-01: the acmeIdentifier extension does not hold the expected digest")

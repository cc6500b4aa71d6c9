"""Where validation traffic may go: public addresses, and the networks the configuration adds."""

from __future__ import annotations

import ipaddress

IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network


class Denied(Exception):
    """The address is not one the gateway may reach."""


class NetPolicy:
    """Loopback, private, link-local, multicast, reserved and unspecified addresses are refused
    unless a configured network holds them (a public-facing deployment must not be made to probe
    its own LAN); everything else is global and allowed."""

    def __init__(self, allowed: tuple[str, ...] | list[str]):
        self.allowed: list[IpNet] = [ipaddress.ip_network(n, strict=False) for n in allowed]

    def check(self, addr: str) -> str:
        """The address, normalised, or Denied."""
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            raise Denied(f"{addr!r} is not an IP address") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.allowed):
            return str(ip)
        if ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified):
            return str(ip)
        raise Denied(f"{ip} is not in the networks validation may reach (gateway.validation-networks)")

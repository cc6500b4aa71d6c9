"""Which names and profiles a gateway credential may get: pure checks shared by the gateway and the Factory."""

from __future__ import annotations

import ipaddress


def normal_name(kind: str, value: str) -> str:
    """One spelling per identifier: DNS names lower-case without a trailing dot, IPs canonical."""
    if kind == "ip":
        return str(ipaddress.ip_address(value))
    return value.lower().rstrip(".")


def name_allowed(kind: str, value: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """A DNS name matches "*" (anything), "example.org" (itself and, as a wildcard request, nothing
    else) or "*.example.org" (names below it, at any depth, and the wildcard "*.example.org"
    itself). An IP address matches "*" or its own literal."""
    v = normal_name(kind, value)
    for p in patterns:
        p = p.lower().rstrip(".")
        if p == "*":
            return True
        if kind == "ip":
            try:
                if normal_name("ip", p) == v:
                    return True
            except ValueError:
                continue
            continue
        if p.startswith("*."):
            base = p[2:]
            if v == p or v.endswith("." + base):
                return True
        elif v == p:
            return True
    return False


def names_refused(names: list[tuple[str, str]] | tuple[tuple[str, str], ...], patterns) -> list[str]:
    """The names that no pattern allows (empty: all allowed)."""
    return [v for k, v in names if not name_allowed(k, v, patterns)]

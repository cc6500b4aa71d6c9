"""Named queries of the OCSP tenants (foreign CAs the endpoint answers for from their CRLs)."""

from __future__ import annotations

from typing import Any

from ._base import Queries

_COLS = ("name, ca_cert, crl_urls, refresh_seconds, unissued, push_secret_sha256, key_label, key_spki, responder_label, "
         "responder_cert, "
         "crl_number, crl_this_update, crl_next_update, crl_source, crl_at, serials IS NOT NULL, last_refusal")
# The columns `tenant update` may set: a column name goes into the SQL text
_SETTABLE = frozenset({"crl_urls", "refresh_seconds", "unissued", "push_secret_sha256", "responder_cert", "responder_label"})


class TenantQueries(Queries):
    def tenant_rows(self) -> list[tuple[Any, ...]]:
        """Every tenant's row (the columns Info is made of), by name."""
        return [tuple(r) for r in self._c.execute(f"SELECT {_COLS} FROM ocsp_tenants ORDER BY name")]

    def tenant_row(self, name: str) -> tuple[Any, ...] | None:
        row = self._c.execute(f"SELECT {_COLS} FROM ocsp_tenants WHERE name=?", (name,)).fetchone()
        return tuple(row) if row else None

    def tenant_crl_and_serials(self, name: str) -> tuple[bytes | None, bytes | None]:
        """(CRL DER, serials list) of a tenant; (None, None) when there is no such tenant."""
        row = self._c.execute("SELECT crl_der, serials FROM ocsp_tenants WHERE name=?", (name,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def tenant_crl_is(self, name: str, der: bytes) -> bool:
        """The tenant's current CRL is exactly `der`."""
        row = self._c.execute("SELECT crl_der = ? FROM ocsp_tenants WHERE name=?", (der, name)).fetchone()
        return bool(row and row[0])

    def tenant_set_crl(self, name: str, number: int, this_update: int, next_update: int, der: bytes, source: str, at: int) -> None:
        """A CRL accepted (inside tx()): it replaces the previous one and clears the last refusal."""
        self._c.execute("UPDATE ocsp_tenants SET crl_number=?, crl_this_update=?, crl_next_update=?, crl_der=?, "
                        "crl_source=?, crl_at=?, last_refusal=NULL WHERE name=?",
                        (number, this_update, next_update, der, source, at, name))

    def tenant_set_refusal(self, name: str, text: str) -> None:
        self._c.execute("UPDATE ocsp_tenants SET last_refusal=? WHERE name=?", (text, name))

    def ca_certs(self) -> list[tuple[str, bytes]]:
        """(name, certificate DER) of every CA of this appliance."""
        return [(r[0], r[1]) for r in self._c.execute("SELECT name, cert FROM cas")]

    def tenant_add(self, name: str, ca_cert: bytes, crl_urls: str, refresh_seconds: int, unissued: str,
                   push_secret_sha256: bytes | None, created: int) -> None:
        self._c.execute("INSERT INTO ocsp_tenants(name, ca_cert, crl_urls, refresh_seconds, unissued, push_secret_sha256, "
                        "created) VALUES (?,?,?,?,?,?,?)",
                        (name, ca_cert, crl_urls, refresh_seconds, unissued, push_secret_sha256, created))

    def tenant_update(self, name: str, sets: dict[str, Any]) -> None:
        """Set some of a tenant's settable columns (inside tx())."""
        if not sets or not set(sets) <= _SETTABLE:
            raise ValueError(f"not settable columns of a tenant: {sorted(set(sets) - _SETTABLE)}")
        self._c.execute(f"UPDATE ocsp_tenants SET {', '.join(k + '=?' for k in sets)} WHERE name=?", (*sets.values(), name))

    def tenant_remove(self, name: str) -> None:
        self._c.execute("DELETE FROM ocsp_tenants WHERE name=?", (name,))

    def tenant_set_key(self, name: str, label: str, spki: bytes) -> None:
        self._c.execute("UPDATE ocsp_tenants SET key_label=?, key_spki=? WHERE name=?", (label, spki, name))

    def tenant_set_serials(self, name: str, data: bytes | None) -> None:
        self._c.execute("UPDATE ocsp_tenants SET serials=? WHERE name=?", (data, name))

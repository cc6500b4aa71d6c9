"""Named queries of the enrolment secrets (EST/SCEP/CMP one-time or counted passwords, stored as digests)."""

from __future__ import annotations

from typing import Any

from ._base import Queries


class EnrolSecretQueries(Queries):
    def enrol_secret_exists(self, ref: str) -> bool:
        return self._c.execute("SELECT 1 FROM enrol_secrets WHERE ref=?", (ref,)).fetchone() is not None

    def enrol_secret_add(self, ref: str, protocol: str, digest: bytes, ca: str, profile: str, subject: str | None,
                         uses: int, expires: int, created: int, created_by: str, approval: bool) -> None:
        self._c.execute("INSERT INTO enrol_secrets (ref, protocol, digest, ca, profile, subject, uses_left, expires,"
                        " created, created_by, approval) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (ref, protocol, digest, ca, profile, subject, uses, expires, created, created_by, int(approval)))

    def enrol_secret_revoke(self, ref: str) -> bool:
        """Revoke a usable secret (inside tx()); False when there is none under `ref`."""
        c = self._c
        c.execute("UPDATE enrol_secrets SET revoked=1 WHERE ref=? AND revoked=0", (ref,))
        return c.changes() != 0

    def enrol_secret_rows(self) -> list[tuple[Any, ...]]:
        """(ref, protocol, ca, profile, subject, uses_left, expires, created_by, revoked), oldest first."""
        return [tuple(r) for r in self._c.execute(
            "SELECT ref, protocol, ca, profile, subject, uses_left, expires, created_by, revoked FROM enrol_secrets"
            " ORDER BY created, ref")]

    def enrol_secret_ref(self, digest: bytes, protocol: str) -> str | None:
        row = self._c.execute("SELECT ref FROM enrol_secrets WHERE digest=? AND protocol=?", (digest, protocol)).fetchone()
        return row[0] if row else None

    def enrol_secret_by_digest(self, digest: bytes) -> tuple[Any, ...] | None:
        """(ref, protocol, ca, profile, subject, uses_left, expires, revoked, approval, created_by) or None."""
        row = self._c.execute("SELECT ref, protocol, ca, profile, subject, uses_left, expires, revoked, approval, created_by"
                              " FROM enrol_secrets WHERE digest=?", (digest,)).fetchone()
        return tuple(row) if row else None

    def enrol_secret_use(self, ref: str, delta: int) -> bool:
        """Spend (-1) or give back (+1) one use (inside tx()); False when there is no such secret."""
        c = self._c
        c.execute("UPDATE enrol_secrets SET uses_left = uses_left + ? WHERE ref=?", (delta, ref))
        return c.changes() != 0

"""Named queries of CMP (RFC 9810): credentials (shared secrets, RA certificates), requests waiting for an officer, what each credential obtained."""

from __future__ import annotations

from typing import Any

from ._base import Queries


class CmpQueries(Queries):
    # ------------------------------------------------------------ credentials

    def cmp_credential_exists(self, ref: str) -> bool:
        return self._c.execute("SELECT 1 FROM cmp_credentials WHERE ref=?", (ref,)).fetchone() is not None

    def cmp_credential_add(self, ref: str, kind: str, secret: bytes | None, ra_cert: bytes | None, ca: str, profile: str,
                           subject: str | None, approval: bool, uses_left: int, created: int, created_by: str, expires: int) -> None:
        self._c.execute("INSERT INTO cmp_credentials(ref, kind, secret, ra_cert, ca, profile, subject, approval, uses_left, created, "
                        "created_by, expires) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (ref, kind, secret, ra_cert, ca, profile, subject, int(approval), uses_left, created, created_by, expires))

    def cmp_credential_rows(self) -> list[tuple[Any, ...]]:
        """(ref, kind, ca, profile, subject, approval, uses_left, created, created_by, expires, failures, revoked), oldest first."""
        return [tuple(r) for r in self._c.execute(
            "SELECT ref, kind, ca, profile, subject, approval, uses_left, created, created_by, expires, failures, revoked "
            "FROM cmp_credentials ORDER BY created, ref")]

    def cmp_credential_revoke(self, ref: str, at: int) -> bool:
        """Revoke an active credential (inside tx()); False when there is none under `ref`."""
        c = self._c
        c.execute("UPDATE cmp_credentials SET revoked=? WHERE ref=? AND revoked IS NULL", (at, ref))
        return c.changes() == 1

    def cmp_secret(self, ref: str) -> tuple[Any, ...] | None:
        """(secret, ca, profile, subject, approval, uses_left, expires, failures, revoked, created_by) of a shared secret."""
        row = self._c.execute(
            "SELECT secret, ca, profile, subject, approval, uses_left, expires, failures, revoked, created_by FROM cmp_credentials "
            "WHERE ref=? AND kind='secret'", (ref,)).fetchone()
        return tuple(row) if row else None

    def cmp_ra(self, ref: str) -> tuple[Any, ...] | None:
        """(ca, profile, subject, approval, expires, revoked, created_by, ra_cert) of a registered RA certificate."""
        row = self._c.execute(
            "SELECT ca, profile, subject, approval, expires, revoked, created_by, ra_cert FROM cmp_credentials WHERE ref=? AND kind='ra'",
            (ref,)).fetchone()
        return tuple(row) if row else None

    def cmp_failure(self, ref: str) -> None:
        """One more wrong MAC against a shared secret (inside tx())."""
        self._c.execute("UPDATE cmp_credentials SET failures=failures+1 WHERE ref=?", (ref,))

    def cmp_reset_failures(self, ref: str) -> None:
        self._c.execute("UPDATE cmp_credentials SET failures=0 WHERE ref=?", (ref,))

    def cmp_take_use(self, ref: str) -> bool:
        """Take one use of a counted credential (inside tx()); False when none is left (two racing requests cannot share one)."""
        c = self._c
        c.execute("UPDATE cmp_credentials SET uses_left=uses_left-1 WHERE ref=? AND uses_left > 0", (ref,))
        return c.changes() == 1

    def cmp_give_back_use(self, ref: str) -> None:
        """Give back a use taken by cmp_take_use (uncounted credentials, uses_left < 0, stay so)."""
        self._c.execute("UPDATE cmp_credentials SET uses_left=uses_left+1 WHERE ref=? AND uses_left >= 0", (ref,))

    # ------------------------------------------------------------ requests waiting for an officer

    def cmp_request_add(self, ref: str, ca: str, profile: str, spki: bytes, subject: str, sans: str, created: int) -> int:
        """File a waiting request (inside tx()); returns its id."""
        c = self._c
        c.execute("INSERT INTO cmp_requests(ref, ca, profile, spki, subject, sans, created, state) VALUES (?,?,?,?,?,?,?, 'waiting')",
                  (ref, ca, profile, spki, subject, sans, created))
        return c.last_insert_rowid()

    def cmp_request_rows(self, open_only: bool) -> list[tuple[Any, ...]]:
        """(id, ref, ca, profile, subject, sans, created, state, decided_by, reason, serial), newest first (at most 200)."""
        return [tuple(r) for r in self._c.execute(
            "SELECT id, ref, ca, profile, subject, sans, created, state, decided_by, reason, serial FROM cmp_requests "
            + ("WHERE state='waiting' " if open_only else "") + "ORDER BY id DESC LIMIT 200")]

    def cmp_request_to_decide(self, request_id: int) -> tuple[Any, ...] | None:
        """(ref, ca, profile, spki, subject, sans, state, maker of the credential) of a request, or None."""
        row = self._c.execute(
            "SELECT r.ref, r.ca, r.profile, r.spki, r.subject, r.sans, r.state, c.created_by FROM cmp_requests r "
            "JOIN cmp_credentials c ON c.ref=r.ref WHERE r.id=?", (request_id,)).fetchone()
        return tuple(row) if row else None

    def cmp_request_close(self, request_id: int, state: str, decided_by: str, reason: str, serial: bytes | None) -> None:
        """Decide a waiting request (inside tx()): issued, rejected or failed."""
        self._c.execute("UPDATE cmp_requests SET state=?, decided_by=?, reason=?, serial=? WHERE id=? AND state='waiting'",
                        (state, decided_by, reason, serial, request_id))

    def cmp_request_outcome(self, request_id: int) -> tuple[Any, ...] | None:
        """(ref, ca, state, reason, certificate DER or None) of a request, or None."""
        row = self._c.execute(
            "SELECT r.ref, r.ca, r.state, r.reason, c.der FROM cmp_requests r LEFT JOIN certs c ON c.serial=r.serial WHERE r.id=?",
            (request_id,)).fetchone()
        return tuple(row) if row else None

    # ------------------------------------------------------------ what each credential obtained

    def cmp_issued_add(self, ca: str, serial: bytes, ref: str) -> None:
        self._c.execute("INSERT OR REPLACE INTO cmp_issued VALUES (?,?,?)", (ca, serial, ref))

    def cmp_issued_by_serial(self, serial: bytes) -> tuple[str, str] | None:
        """(ca, credential ref) of a serial CMP issued, or None."""
        row = self._c.execute("SELECT ca, ref FROM cmp_issued WHERE serial=?", (serial,)).fetchone()
        return (row[0], row[1]) if row else None

    def cmp_issued_ref(self, ca: str, serial: bytes) -> str | None:
        row = self._c.execute("SELECT ref FROM cmp_issued WHERE ca=? AND serial=?", (ca, serial)).fetchone()
        return row[0] if row else None

    def issued_by_serial(self, serial: bytes) -> tuple[str, str, bytes, bytes | None] | None:
        """(ca, profile, DER, the serial again if revoked else None) of a certificate found by serial alone."""
        row = self._c.execute(
            "SELECT c.ca, c.profile, c.der, r.serial FROM certs c LEFT JOIN revocations r ON r.ca=c.ca AND r.serial=c.serial "
            "WHERE c.serial=?", (serial,)).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

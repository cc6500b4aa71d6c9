"""Named queries of the protocol gateway: EAB keys, what it issued to whom, its key-value state, enrolments waiting for an officer."""

from __future__ import annotations

from typing import Any

from ._base import Queries

_EAB_COLS = "kid, created_by, created_at, profiles, name_patterns, account, revoked_at"
_WAITING_COLS = "id, protocol, credential, ca, profile, summary, created, state, decided_by, cert"


class GatewayQueries(Queries):
    # ------------------------------------------------------------ ACME external account binding keys

    def eab_key(self, kid: str) -> tuple[Any, ...] | None:
        """(hmac_key, profiles, name_patterns, account, revoked_at) of an EAB key, or None."""
        row = self._c.execute("SELECT hmac_key, profiles, name_patterns, account, revoked_at FROM gateway_eab WHERE kid=?",
                              (kid,)).fetchone()
        return tuple(row) if row else None

    def eab_bind(self, kid: str, account: str, at: int) -> None:
        self._c.execute("UPDATE gateway_eab SET account=?, bound_at=? WHERE kid=?", (account, at, kid))

    def eab_rows(self) -> list[tuple[Any, ...]]:
        """(kid, created_by, created_at, profiles, name_patterns, account, revoked_at) of every EAB key, oldest first."""
        return [tuple(r) for r in self._c.execute(f"SELECT {_EAB_COLS} FROM gateway_eab ORDER BY created_at")]

    def eab_row(self, kid: str) -> tuple[Any, ...] | None:
        """The eab_rows() row of one key, or None."""
        row = self._c.execute(f"SELECT {_EAB_COLS} FROM gateway_eab WHERE kid=?", (kid,)).fetchone()
        return tuple(row) if row else None

    def eab_add(self, kid: str, hmac_key: bytes, created_by: str, created_at: int, profiles: str, name_patterns: str) -> None:
        self._c.execute("INSERT INTO gateway_eab (kid, hmac_key, created_by, created_at, profiles, name_patterns) VALUES (?,?,?,?,?,?)",
                        (kid, hmac_key, created_by, created_at, profiles, name_patterns))

    def eab_revoke(self, kid: str, at: int) -> None:
        self._c.execute("UPDATE gateway_eab SET revoked_at=? WHERE kid=?", (at, kid))

    # ------------------------------------------------------------ what the gateway issued, its state

    def gateway_issued_add(self, ca: str, serial: bytes, protocol: str, credential: str, replaces: str | None) -> None:
        self._c.execute("INSERT OR REPLACE INTO gateway_issued VALUES (?,?,?,?,?)", (ca, serial, protocol, credential, replaces))

    def gateway_issued_to(self, ca: str, serial: bytes) -> str | None:
        """The credential (account, secret reference) a certificate was issued to through the gateway."""
        row = self._c.execute("SELECT credential FROM gateway_issued WHERE ca=? AND serial=?", (ca, serial)).fetchone()
        return row[0] if row else None

    def gateway_state_get(self, ns: str, key: str) -> bytes | None:
        row = self._c.execute("SELECT value FROM gateway_state WHERE ns=? AND key=?", (ns, key)).fetchone()
        return bytes(row[0]) if row else None

    def gateway_state_put(self, ns: str, key: str, value: bytes | None) -> None:
        """Set (or with None, delete) one value (inside tx())."""
        if value is None:
            self._c.execute("DELETE FROM gateway_state WHERE ns=? AND key=?", (ns, key))
        else:
            self._c.execute("INSERT OR REPLACE INTO gateway_state VALUES (?,?,?)", (ns, key, value))

    # ------------------------------------------------------------ EST/SCEP enrolments waiting for an officer

    def waiting_add(self, rid: str, protocol: str, credential: str, csr_sha256: bytes, request: bytes, ca: str | None,
                    profile: str, summary: str, created: int) -> None:
        self._c.execute("INSERT INTO enrol_waiting (id, protocol, credential, csr_sha256, request, ca, profile, summary,"
                        " created, state) VALUES (?,?,?,?,?,?,?,?,?, 'waiting')",
                        (rid, protocol, credential, csr_sha256, request, ca, profile, summary, created))

    def waiting_for(self, credential: str, csr_sha256: bytes) -> str | None:
        """The id of the newest enrolment of this CSR under this credential, if any."""
        row = self._c.execute("SELECT id FROM enrol_waiting WHERE credential=? AND csr_sha256=? ORDER BY created DESC LIMIT 1",
                              (credential, csr_sha256)).fetchone()
        return row[0] if row else None

    def waiting_outcome(self, rid: str) -> tuple[Any, ...] | None:
        """(state, cert, reason, ca) of an enrolment, or None."""
        row = self._c.execute("SELECT state, cert, reason, ca FROM enrol_waiting WHERE id=?", (rid,)).fetchone()
        return tuple(row) if row else None

    def waiting_rows(self, only_open: bool = False, rid: str | None = None) -> list[tuple[Any, ...]]:
        """(id, protocol, credential, ca, profile, summary, created, state, decided_by, cert), newest first (at most
        1000): every enrolment, only those still waiting, or the one `rid`."""
        if rid is not None:
            return [tuple(r) for r in self._c.execute(f"SELECT {_WAITING_COLS} FROM enrol_waiting WHERE id=?", (rid,))]
        return [tuple(r) for r in self._c.execute(
            f"SELECT {_WAITING_COLS} FROM enrol_waiting" + (" WHERE state='waiting'" if only_open else "")
            + " ORDER BY created DESC LIMIT 1000")]

    def waiting_to_decide(self, rid: str) -> tuple[Any, ...] | None:
        """(state, request, credential, ca, maker of the enrolment secret or None) of an enrolment, or None."""
        row = self._c.execute(
            "SELECT w.state, w.request, w.credential, w.ca, s.created_by FROM enrol_waiting w LEFT JOIN enrol_secrets s"
            " ON w.credential = w.protocol || '-secret:' || s.ref WHERE w.id=?", (rid,)).fetchone()
        return tuple(row) if row else None

    def waiting_reject(self, rid: str, decided_by: str, reason: str) -> bool:
        """An officer's rejection of a waiting enrolment (inside tx()); False when it is no longer waiting."""
        c = self._c
        c.execute("UPDATE enrol_waiting SET state='rejected', decided_by=?, reason=?, request=x'' WHERE id=? AND state='waiting'",
                  (decided_by, reason, rid))
        return c.changes() != 0

    def waiting_claim(self, rid: str, decided_by: str) -> bool:
        """Take the decision on a waiting enrolment: one officer only, even with two approving at once."""
        c = self._c
        c.execute("UPDATE enrol_waiting SET decided_by=? WHERE id=? AND state='waiting' AND decided_by IS NULL", (decided_by, rid))
        return c.changes() == 1

    def waiting_issued(self, rid: str, cert: bytes) -> None:
        self._c.execute("UPDATE enrol_waiting SET state='issued', cert=?, request=x'' WHERE id=?", (cert, rid))

    def waiting_refused(self, rid: str, reason: str) -> None:
        """Approved, but the issuance was refused: the enrolment ends rejected, its request dropped."""
        self._c.execute("UPDATE enrol_waiting SET state='rejected', reason=?, request=x'' WHERE id=?", (reason, rid))

"""Named queries of the officers (password hashes, second factors, failures) and of dual control (pending requests, approvals)."""

from __future__ import annotations

from typing import Any

from ._base import Queries, one


class OfficerQueries(Queries):
    # ------------------------------------------------------------ officers

    def officer_login_row(self, name: str) -> tuple[str, str, bytes | None, int, int, int] | None:
        """(roles, pwhash, totp secret, last TOTP step, failures, locked) of an officer, or None."""
        row = self._c.execute("SELECT roles, pwhash, totp, totp_last, failures, locked FROM officers WHERE name=?", (name,)).fetchone()
        return (row[0], row[1], row[2], row[3], row[4], row[5]) if row else None

    def officer_failed(self, name: str) -> int:
        """One more consecutive failed login (inside tx()); returns the count."""
        c = self._c
        c.execute("UPDATE officers SET failures = failures + 1 WHERE name=?", (name,))
        return one(c, "SELECT failures FROM officers WHERE name=?", (name,))[0]

    def officer_logged_in(self, name: str, step: int) -> None:
        """A good login: failures reset, the TOTP step used remembered (a code is never accepted twice)."""
        self._c.execute("UPDATE officers SET failures = 0, totp_last = max(totp_last, ?) WHERE name=?", (step, name))

    def officers_exist(self) -> bool:
        return self._c.execute("SELECT 1 FROM officers LIMIT 1").fetchone() is not None

    def officer_exists(self, name: str) -> bool:
        return self._c.execute("SELECT 1 FROM officers WHERE name=?", (name,)).fetchone() is not None

    def officer_add(self, name: str, roles: str, pwhash: str, now: int) -> None:
        self._c.execute("INSERT INTO officers(name, roles, pwhash, created, changed) VALUES (?,?,?,?,?)", (name, roles, pwhash, now, now))

    def other_administrators(self, name: str) -> int:
        """How many administrators there are besides `name`."""
        return one(self._c, "SELECT count(*) FROM officers WHERE name<>? AND ','||roles||',' LIKE '%,administrator,%'", (name,))[0]

    # The changes below return whether the officer exists (one row changed); inside tx().
    def officer_remove(self, name: str) -> bool:
        return self._changed("DELETE FROM officers WHERE name=?", (name,))

    def officer_set_password(self, name: str, pwhash: str, changed: int) -> bool:
        return self._changed("UPDATE officers SET pwhash=?, changed=? WHERE name=?", (pwhash, changed, name))

    def officer_unlock(self, name: str, pwhash: str | None = None, changed: int = 0) -> bool:
        """Unlock, failures reset; with `pwhash`, a new password too (break-glass)."""
        if pwhash:
            return self._changed("UPDATE officers SET locked=0, failures=0, pwhash=?, changed=? WHERE name=?", (pwhash, changed, name))
        return self._changed("UPDATE officers SET locked=0, failures=0 WHERE name=?", (name,))

    def officer_set_totp(self, name: str, secret: bytes | None) -> bool:
        return self._changed("UPDATE officers SET totp=?, totp_last=0 WHERE name=?", (secret, name))

    def officer_rows(self) -> list[tuple[str, str, int, int, int, int]]:
        """(name, roles, has TOTP, failures, locked, created) of every officer, by name."""
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in self._c.execute(
            "SELECT name, roles, totp IS NOT NULL, failures, locked, created FROM officers ORDER BY name")]

    def _changed(self, q: str, args: tuple[Any, ...]) -> bool:
        c = self._c
        c.execute(q, args)
        return c.changes() == 1

    # ------------------------------------------------------------ dual control

    def pending_add(self, operation: str, summary: str, request: bytes, requester: str, created: int, expires: int) -> int:
        """A request waiting for approvals, with its requester's own approval (inside tx()); returns its id."""
        c = self._c
        c.execute("INSERT INTO pending(operation, summary, request, requester, created, expires, state) VALUES (?,?,?,?,?,?, 'open')",
                  (operation, summary, request, requester, created, expires))
        pid = c.last_insert_rowid()
        c.execute("INSERT INTO approvals VALUES (?,?,?)", (pid, requester, created))
        return pid

    def pending_rows(self, open_only: bool) -> list[tuple[Any, ...]]:
        """(id, operation, summary, requester, created, expires, state, result JSON), newest first (at most 200)."""
        return [tuple(r) for r in self._c.execute(
            "SELECT id, operation, summary, requester, created, expires, state, result FROM pending "
            + ("WHERE state='open' " if open_only else "") + "ORDER BY id DESC LIMIT 200")]

    def approvers(self, pending: int) -> list[str]:
        """The officers who approved a request, in the order they did."""
        return [r[0] for r in self._c.execute("SELECT officer FROM approvals WHERE pending=? ORDER BY ts, rowid", (pending,))]

    def pending_expired(self, now: int) -> list[tuple[int, str]]:
        """(id, operation) of the open requests whose approvals expired by `now`."""
        return [(r[0], r[1]) for r in self._c.execute("SELECT id, operation FROM pending WHERE state='open' AND expires <= ?", (now,))]

    def pending_expire(self, pending: int) -> None:
        self._c.execute("UPDATE pending SET state='expired', request=x'' WHERE id=?", (pending,))

    def pending_row(self, pending: int) -> tuple[str, bytes, str, str] | None:
        """(operation, request, requester, state) of a request, or None."""
        row = self._c.execute("SELECT operation, request, requester, state FROM pending WHERE id=?", (pending,)).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

    def approved_by(self, pending: int, officer: str) -> bool:
        return self._c.execute("SELECT 1 FROM approvals WHERE pending=? AND officer=?", (pending, officer)).fetchone() is not None

    def approval_add(self, pending: int, officer: str, ts: int) -> None:
        self._c.execute("INSERT INTO approvals VALUES (?,?,?)", (pending, officer, ts))

    def pending_start(self, pending: int) -> bool:
        """Open -> running (inside tx()); False when it was no longer open (someone else started it)."""
        return self._changed("UPDATE pending SET state='running' WHERE id=? AND state='open'", (pending,))

    def pending_close(self, pending: int, state: str, result: str) -> None:
        """Done or failed, with its result; the request itself (it may hold a password) is dropped."""
        self._c.execute("UPDATE pending SET state=?, result=?, request=x'' WHERE id=?", (state, result, pending))

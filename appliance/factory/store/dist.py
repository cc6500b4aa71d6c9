"""Named queries of the distribution job queue (dist_jobs) and of what a job publishes."""

from __future__ import annotations

from typing import Any

from ._base import Queries, one

# The tables of signed lists a job may publish: a table name goes into the SQL text
_LIST_TABLES = {"crl": "crls", "issued-serials": "serials_lists"}


class DistQueries(Queries):
    # ------------------------------------------------------------ enqueueing (inside the transaction of the event)

    def dist_job_add(self, rule: str, action: str, ca: str, ref: bytes | None, number: int, created: int) -> None:
        self._c.execute("INSERT INTO dist_jobs(rule, action, ca, ref, number, created, state) VALUES (?,?,?,?,?,?, 'pending')",
                        (rule, action, ca, ref, number, created))

    def dist_park_unconfigured(self, rules: list[str]) -> None:
        """Park the pending jobs of every rule not in `rules` (no longer configured)."""
        q = "UPDATE dist_jobs SET state='parked', last_error='rule no longer configured' WHERE state='pending'"
        if rules:
            q += f" AND rule NOT IN ({','.join('?' * len(rules))})"
        self._c.execute(q, rules)

    def ca_names(self) -> list[str]:
        return [r[0] for r in self._c.execute("SELECT name FROM cas")]

    def dist_ever(self, rule: str, action: str, ca: str, ref: bytes | None = None) -> bool:
        """A job of this kind was ever queued for this rule and CA (with `ref`: for that CRL part only)."""
        q = "SELECT 1 FROM dist_jobs WHERE rule=? AND action=? AND ca=?" + (" AND ref=?" if ref is not None else "") + " LIMIT 1"
        args: tuple[Any, ...] = (rule, action, ca) if ref is None else (rule, action, ca, ref)
        return self._c.execute(q, args).fetchone() is not None

    def latest_serials_list_number(self, ca: str) -> int | None:
        return one(self._c, "SELECT max(number) FROM serials_lists WHERE ca=?", (ca,))[0]

    def unrevoked_certs(self, ca: str) -> list[tuple[bytes, str]]:
        """(serial, profile) of every unrevoked certificate of `ca`, in issuance order."""
        return [(r[0], r[1]) for r in self._c.execute(
            "SELECT c.serial, c.profile FROM certs c WHERE c.ca=? AND NOT EXISTS "
            "(SELECT 1 FROM revocations v WHERE v.ca=c.ca AND v.serial=c.serial) ORDER BY c.issued_at", (ca,))]

    def dist_prune(self, before: int) -> None:
        """Forget acknowledged (or superseded) jobs done before `before`."""
        self._c.execute("DELETE FROM dist_jobs WHERE state IN ('done', 'superseded') AND done_at < ?", (before,))

    # ------------------------------------------------------------ acknowledgements and the dispatcher

    def dist_done(self, job: int, now: int) -> None:
        self._c.execute("UPDATE dist_jobs SET state='done', attempts=attempts+1, last_at=?, done_at=? WHERE id=? AND state='pending'",
                        (now, now, job))

    def dist_job(self, job: int) -> tuple[int, str, str, str] | None:
        """(attempts, rule, action, ca) of a job, or None."""
        row = self._c.execute("SELECT attempts, rule, action, ca FROM dist_jobs WHERE id=?", (job,)).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

    def dist_failed(self, job: int, now: int, error: str, park: bool) -> None:
        """One more failed attempt of a pending job; parked when `park`."""
        self._c.execute("UPDATE dist_jobs SET attempts=attempts+1, last_at=?, last_error=?, state=? WHERE id=? AND state='pending'",
                        (now, error, "parked" if park else "pending", job))

    def dist_pending(self, rule: str, after: int, limit: int) -> list[tuple[int, str, str, bytes | None, int]]:
        """(id, action, ca, ref, number) of a rule's pending jobs after `after`, in id order."""
        return [(r[0], r[1], r[2], r[3], r[4]) for r in self._c.execute(
            "SELECT id, action, ca, ref, number FROM dist_jobs WHERE rule=? AND state='pending' AND id > ? ORDER BY id LIMIT ?",
            (rule, after, limit))]

    def dist_newer_pending(self, rule: str, action: str, ca: str, ref: bytes | None, number: int) -> bool:
        """A newer list of the same kind and part (complete CRL, shard k, delta) is queued for this rule."""
        return self._c.execute("SELECT 1 FROM dist_jobs WHERE rule=? AND action=? AND ca=? AND ref IS ? AND state='pending' "
                               "AND number > ? LIMIT 1", (rule, action, ca, ref, number)).fetchone() is not None

    def dist_supersede(self, jobs: list[int], now: int) -> None:
        self._c.executemany("UPDATE dist_jobs SET state='superseded', done_at=? WHERE id=?", [(now, j) for j in jobs])

    # ------------------------------------------------------------ what a job publishes

    def latest_checkpoint(self) -> tuple[bytes, bytes] | None:
        """(tbs, signature) of the newest signed audit checkpoint, or None."""
        row = self._c.execute("SELECT tbs, signature FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else None

    def ca_cert_and_parent(self, name: str) -> tuple[bytes, str | None] | None:
        row = self._c.execute("SELECT cert, parent FROM cas WHERE name=?", (name,)).fetchone()
        return (row[0], row[1]) if row else None

    def calendar_root_cert(self, ca: str) -> bytes | None:
        """The certificate of an offline root whose pre-signed CRLs this box publishes (CRL calendar, tier.py)."""
        row = self._c.execute("SELECT cert FROM calendar_roots WHERE ca=?", (ca,)).fetchone()
        return row[0] if row else None

    def cert_der(self, ca: str, serial: bytes | None) -> bytes | None:
        row = self._c.execute("SELECT der FROM certs WHERE ca=? AND serial=?", (ca, serial)).fetchone()
        return row[0] if row else None

    def signed_list_der(self, kind: str, name: str, number: int) -> bytes | None:
        """A stored CRL (kind "crl", `name` a CA, "<ca>-<k>" or "<ca>-delta") or issued-serials list, whole."""
        row = self._c.execute(f"SELECT der FROM {_LIST_TABLES[kind]} WHERE ca=? AND number=?", (name, number)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------ admin

    def dist_counts(self) -> list[tuple[str, str, int, int | None]]:
        """(rule, state, jobs, oldest creation) of the pending and parked jobs."""
        return [(r[0], r[1], r[2], r[3]) for r in self._c.execute(
            "SELECT rule, state, count(*), min(created) FROM dist_jobs WHERE state IN ('pending', 'parked') GROUP BY rule, state")]

    def dist_last_done(self, rule: str) -> int | None:
        return one(self._c, "SELECT max(done_at) FROM dist_jobs WHERE rule=? AND state='done'", (rule,))[0]

    def dist_last_error(self, rule: str) -> tuple[str, int] | None:
        """(error, when) of the rule's latest failed attempt, or None."""
        row = self._c.execute("SELECT last_error, last_at, id FROM dist_jobs WHERE rule=? AND last_error IS NOT NULL "
                              "ORDER BY last_at DESC, id DESC LIMIT 1", (rule,)).fetchone()
        return (row[0], row[1]) if row else None

    def dist_backlog(self) -> dict[str, int]:
        """Pending jobs per rule."""
        return {r[0]: r[1] for r in self._c.execute("SELECT rule, count(*) FROM dist_jobs WHERE state='pending' GROUP BY rule")}

    def dist_jobs(self, state: str, rule: str | None, limit: int) -> list[tuple[Any, ...]]:
        """(id, rule, action, ca, ref, number, created, attempts, last_at, last_error, done_at), newest first."""
        q = "SELECT id, rule, action, ca, ref, number, created, attempts, last_at, last_error, done_at FROM dist_jobs WHERE state=?"
        args: list[Any] = [state]
        if rule:
            q += " AND rule=?"
            args.append(rule)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [tuple(r) for r in self._c.execute(q, args)]

    def dist_unpark(self, rule: str | None, job: int | None) -> int:
        """Parked jobs (of a rule, or one job) back in the queue with their attempts reset (inside tx()); how many."""
        q = "UPDATE dist_jobs SET state='pending', attempts=0 WHERE state='parked'"
        args: list[Any] = []
        if rule:
            q += " AND rule=?"
            args.append(rule)
        if job:
            q += " AND id=?"
            args.append(job)
        c = self._c
        c.execute(q, args)
        return c.changes()

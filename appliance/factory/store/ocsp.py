"""Named queries of the pre-produced OCSP responses (queue, stored responses, the endpoint's resync)."""

from __future__ import annotations

from typing import Any

from ._base import Queries, one


class OcspQueries(Queries):
    def ocsp_due_keys(self, now: int, batch: int) -> list[tuple[str, bytes]]:
        """Up to `batch` (ca, serial) whose response is queued, then those whose refresh time has come."""
        c = self._c
        keys = [(r[0], r[1]) for r in c.execute("SELECT ca, serial FROM ocsp_queue LIMIT ?", (batch,))]
        if len(keys) < batch:
            keys += [(r[0], r[1]) for r in c.execute("SELECT ca, serial FROM ocsp WHERE refresh_at <= ? LIMIT ?",
                                                     (now, batch - len(keys)))]
        return keys

    def ocsp_cert_state(self, ca: str, serial: bytes) -> tuple[Any, ...] | None:
        """(notAfter, revoked_at, reason, thisUpdate of the stored response) of a certificate, or None if unknown."""
        row = self._c.execute("SELECT c.not_after, r.revoked_at, r.reason, o.this_update FROM certs c LEFT JOIN revocations r "
                              "ON r.ca = c.ca AND r.serial = c.serial LEFT JOIN ocsp o ON o.ca = c.ca AND o.serial = c.serial "
                              "WHERE c.ca=? AND c.serial=?", (ca, serial)).fetchone()
        return tuple(row) if row else None

    def ocsp_last_seq(self) -> int:
        return one(self._c, "SELECT coalesce(max(seq), 0) FROM ocsp")[0]

    def ocsp_put(self, ca: str, serial: bytes, status: int, this_update: int, next_update: int, refresh: int, seq: int,
                 sha1: bytes | None, sha256: bytes | None) -> None:
        """Keep a new response (replacing the certificate's previous one) and dequeue it (inside tx())."""
        c = self._c
        c.execute("INSERT OR REPLACE INTO ocsp VALUES (?,?,?,?,?,?,?,?,?)",
                  (ca, serial, status, this_update, next_update, refresh, seq, sha1, sha256))
        c.execute("DELETE FROM ocsp_queue WHERE ca=? AND serial=?", (ca, serial))

    def ocsp_retire(self, ca: str, serial: bytes) -> None:
        """No more responses for this certificate (inside tx())."""
        c = self._c
        c.execute("DELETE FROM ocsp_queue WHERE ca=? AND serial=?", (ca, serial))
        c.execute("DELETE FROM ocsp WHERE ca=? AND serial=?", (ca, serial))

    def latest_responders(self) -> list[tuple[str, int]]:
        """(CA, notAfter of its latest delegated responder certificate), for CAs that have one."""
        return [(r[0], r[1]) for r in self._c.execute(
            "SELECT ca, max(not_after) FROM certs WHERE profile='ocsp-responder' GROUP BY ca ORDER BY ca")]

    def published_cas(self) -> list[tuple[str, bytes]]:
        """(name, certificate) of this appliance's CAs and of the offline roots whose CRL calendar it publishes."""
        return [(r[0], r[1]) for r in self._c.execute("SELECT name, cert FROM cas UNION ALL SELECT ca, cert FROM calendar_roots")]

    def latest_crl_number(self, name: str) -> int | None:
        """The number of the newest stored CRL under `name` (a CA, `<ca>-<shard>` or `<ca>-delta`)."""
        return one(self._c, "SELECT max(number) FROM crls WHERE ca=?", (name,))[0]

    def latest_shard_crls(self, ca: str) -> list[tuple[int, int]]:
        """(shard, number of its newest CRL) of each CRL shard of `ca` that has one."""
        return [(r[0], r[1]) for r in self._c.execute(
            "SELECT s.shard, max(c.number) FROM crl_shard_numbers s JOIN crls c ON c.ca = s.ca || '-' || s.shard "
            "WHERE s.ca=? GROUP BY s.shard", (ca,))]

    def latest_shard_delta_crls(self, ca: str) -> list[tuple[int, int]]:
        """(shard, number of its newest delta CRL) of each CRL shard of `ca` that has one."""
        return [(r[0], r[1]) for r in self._c.execute(
            "SELECT s.shard, max(c.number) FROM crl_shard_numbers s JOIN crls c ON c.ca = s.ca || '-' || s.shard || '-delta' "
            "WHERE s.ca=? GROUP BY s.shard", (ca,))]

    def ocsp_after(self, seq: int, limit: int) -> list[tuple[Any, ...]]:
        """(ca, serial, this_update, next_update, sha1 DER, sha256 DER, seq) of the responses after `seq`, in order."""
        return [tuple(r) for r in self._c.execute(
            "SELECT ca, serial, this_update, next_update, sha1, sha256, seq FROM ocsp WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit))]

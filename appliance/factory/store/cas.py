"""Named queries of CA life beyond the cas table's own rows: pending requests, successors, CRL bases."""

from __future__ import annotations

from ._base import Queries


class CaQueries(Queries):
    def ca_requested(self, name: str) -> bool:
        """A new CA `name` whose key is made and whose certificate is still to come from its parent (ca install)."""
        return self._c.execute("SELECT 1 FROM ca_requests WHERE name=? AND kind='new'", (name,)).fetchone() is not None

    def ca_successor(self, ca: str) -> str | None:
        """The CA that took over issuance from `ca` when it was re-keyed, if any."""
        row = self._c.execute("SELECT successor FROM ca_successors WHERE ca=?", (ca,)).fetchone()
        return row[0] if row else None

    def latest_base_crl(self, ca: str, shard: int = 0) -> int | None:
        """The number of the newest full CRL a delta CRL of `ca` (of its shard `shard`) can be based on (its log
        mark), if any."""
        row = self._c.execute("SELECT max(number) FROM crl_log_marks WHERE ca=? AND shard=?", (ca, shard)).fetchone()
        return row[0] if row else None

"""What every query module of the storage layer shares: the active CMDB and the one-row helper."""

from __future__ import annotations

from typing import Any

import apsw

from ..cmdb import Cmdb


def one(c: apsw.Connection, q: str, args: tuple[Any, ...] = ()) -> Any:
    """The row of a query that always yields one (an aggregate, a pragma)."""
    row = c.execute(q, args).fetchone()
    assert row is not None
    return row


class Queries:
    """Base of the query mixins Store is made of: each asks Store for the active CMDB's connection."""

    def require_active(self) -> Cmdb:  # Store's own (it raises while the CA is inactive)
        raise NotImplementedError

    @property
    def _c(self) -> apsw.Connection:
        """The writer's connection (DB thread; writes belong inside Store.tx())."""
        return self.require_active().db

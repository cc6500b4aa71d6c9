"""`donjon config set`: the Factory asks the supervisor, which alone writes HOME/donjon.toml; audited either way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from appliance.ipc import schema as S
from appliance.ipc.channel import ProtocolViolation

from .errors import FactoryError
from .store import Store


class Settings:
    def __init__(self, store: Store):
        self.store = store
        self.sup_send: Callable[[Any], Awaitable[None]] | None = None  # the supervisor link's send (set by main)
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._ids = 0

    def sup_reply(self, m: S.ConfigSetDone) -> None:
        waiting = self._waiting.pop(m.id, None)
        if waiting is None:
            raise ProtocolViolation(f"the supervisor answered request {m.id}, which is not waiting")
        waiting[1].append(m)
        waiting[0].set()

    async def config_set(self, key: str, value: str, actor: str) -> dict[str, Any]:
        """Ask the supervisor (which alone may write HOME/donjon.toml) to set one key; audited either way."""
        self.store.require_active()
        from appliance import config as C
        try:
            C.setting_literal(key, value)
        except C.ConfigError as e:
            await self.store.audit(actor, "config-set", key[:64], "refused", str(e))
            raise FactoryError("bad-request", str(e)) from None
        if self.sup_send is None:
            raise FactoryError("internal", "no supervisor link")
        self._ids += 1
        mid = self._ids
        done: tuple[trio.Event, list] = (trio.Event(), [])
        self._waiting[mid] = done
        await self.sup_send(S.ConfigSet(id=mid, key=key, value=value))
        with trio.move_on_after(30):
            await done[0].wait()
        if not done[1]:
            self._waiting.pop(mid, None)
            await self.store.audit(actor, "config-set", key, "refused", "the supervisor did not answer")
            raise FactoryError("internal", "the supervisor did not answer: nothing is known to be written")
        r: S.ConfigSetDone = done[1][0]
        await self.store.audit(actor, "config-set", key, "ok" if r.ok else "refused", r.message)
        if not r.ok:
            raise FactoryError("bad-request", r.message)
        return {"key": key, "message": r.message}

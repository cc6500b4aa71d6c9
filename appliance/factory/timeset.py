"""What the supervisor (root) does for the Factory: set the clock, write the officers' SSH keys; checked, audited, waited for."""

from __future__ import annotations

import time
from typing import Any

import trio

from appliance.ipc import schema as S

from .errors import FactoryError
from .store import Store

ANSWER_SECONDS = 90  # the image's clock helper is the bundle, started per request (seconds on an emulated guest)


class ClockSetter:
    """Asks the supervisor (the only root process) to set the time; the Factory checks, audits and waits.
    Uses the Factory's supervisor link (`send`) and its table of requests waiting for an answer (`waiting`)."""

    def __init__(self, store: Store, send, waiting: dict[int, tuple[trio.Event, list]]):
        self.store = store
        self.send = send
        self.waiting = waiting
        self._ids = 1 << 40  # apart from the Factory's own config-set ids

    async def set(self, req: S.AClockSet, actor: str) -> dict[str, Any]:
        from appliance.clock import CLOCK_KEY, check_epoch
        self.store.require_active()
        before = int(time.time())
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(req.time))
        try:
            check_epoch(str(req.time))
        except ValueError as e:
            await self.store.audit(actor, "clock-set", "clock", "refused", str(e))
            raise FactoryError("bad-request", str(e)) from None
        if self.send is None:
            raise FactoryError("internal", "no supervisor link")
        self._ids += 1
        mid = self._ids
        done: tuple[trio.Event, list] = (trio.Event(), [])
        self.waiting[mid] = done
        await self.send(S.ConfigSet(id=mid, key=CLOCK_KEY, value=str(req.time)))
        with trio.move_on_after(ANSWER_SECONDS):
            await done[0].wait()
        if not done[1]:
            self.waiting.pop(mid, None)
            await self.store.audit(actor, "clock-set", "clock", "refused", f"to {at}: the supervisor did not answer")
            raise FactoryError("internal", "the supervisor did not answer: the clock may not be set")
        r: S.ConfigSetDone = done[1][0]
        await self.store.audit(actor, "clock-set", "clock", "ok" if r.ok else "refused",
                               f"from {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(before))} to {at}: {r.message}")
        if not r.ok:
            raise FactoryError("bad-request", r.message)
        return {"time": req.time, "message": r.message}

    async def ssh_key(self, req: S.AOfficerSshKey, actor: str) -> dict[str, Any]:
        """Enrol (or, key None, remove) an officer's SSH public key in the SSH account's authorized_keys."""
        from policy.errors import PolicyError
        from policy.sshkey import check_key
        db = self.store.require_active()
        what = "ssh-key-remove" if req.key is None else "ssh-key-add"
        if not await self.store.run(lambda: db.db.execute("SELECT 1 FROM officers WHERE name=?", (req.name,)).fetchone()):
            await self.store.audit(actor, what, req.name, "refused", "no such officer")
            raise FactoryError("not-found", f"no officer named {req.name!r}")
        fp = ""
        if req.key is not None:
            try:
                _, _, fp = check_key(req.key)
            except PolicyError as e:
                await self.store.audit(actor, what, req.name, "refused", str(e))
                raise FactoryError("bad-request", str(e)) from None
        r = await self._ask(f"ssh-key:{req.name}", req.key.strip() if req.key is not None else "")
        await self.store.audit(actor, what, req.name, "ok" if r.ok else "refused", f"{fp} {r.message}".strip())
        if not r.ok:
            raise FactoryError("bad-request", r.message)
        return {"officer": req.name, "fingerprint": fp or None, "message": r.message}

    async def _ask(self, key: str, value: str) -> S.ConfigSetDone:
        if self.send is None:
            raise FactoryError("internal", "no supervisor link")
        self._ids += 1
        mid = self._ids
        done: tuple[trio.Event, list] = (trio.Event(), [])
        self.waiting[mid] = done
        await self.send(S.ConfigSet(id=mid, key=key, value=value))
        with trio.move_on_after(ANSWER_SECONDS):
            await done[0].wait()
        if not done[1]:
            self.waiting.pop(mid, None)
            raise FactoryError("internal", "the supervisor did not answer")
        return done[1][0]

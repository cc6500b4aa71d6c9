"""`donjon keys backup`: the Factory asks the CIS to wrap every key under a custodian-split KEK, audits
it, and hands the blob and shares out once, from memory (never stored in the CMDB)."""

from __future__ import annotations

import hashlib
import itertools
import json
import time

from appliance.ipc import schema as S

from .cis_link import CisLink, CisRefused
from .errors import FactoryError
from .store import Store

KEEP_SECONDS = 15 * 60  # a backup made under dual control waits this long for its requester to take it
_ready: dict[int, tuple[float, S.KeysBackupReply]] = {}
_ids = itertools.count(1)


async def backup(store: Store, cis: CisLink, req: S.AKeysBackup, actor: str, approvals: int,
                 guarded: bool) -> S.KeysBackupReply:
    """Wrap the keys (CIS), audit, keep the result for one AKeysBackupFetch; reply without the secrets.
    Only under dual control: the output can rebuild every key of the appliance."""
    store.require_active()
    if approvals < 2 or not guarded:
        await store.audit(actor, "keys-backup", "token", "refused", "dual control is off for keys-backup")
        raise FactoryError("policy", "a key backup needs dual control: set [dual-control] approvals = 2 (or more) "
                                     "with keys-backup among its operations")
    labels = [r[0] for r in await store.run(store.ca_rows)]
    if not labels:
        raise FactoryError("not-found", "no CA to back up")
    try:
        reply = await cis.request(S.BackupKeys(id=cis.new_id(), so_pin=req.so_pin, labels=labels,
                                               threshold=req.threshold, shares=req.shares))
    except CisRefused as e:
        await store.audit(actor, "keys-backup", "token", "refused", e.reason)
        raise FactoryError("hsm", e.reason) from None  # (a wrong SO PIN too: "auth" means an officer was refused)
    doc = json.loads(reply.blob)
    digest = hashlib.sha256(reply.blob).hexdigest()
    keys = [e["label"] for e in doc["keys"]]
    await store.audit(actor, "keys-backup", "token", "ok",
                      f"sha256={digest} keys={','.join(keys)} shares={req.threshold}-of-{req.shares} set={doc['share_set']}")
    now = time.monotonic()
    for k in [k for k, (t, _) in _ready.items() if t < now]:
        del _ready[k]
    bid = next(_ids)
    full = S.KeysBackupReply(id=0, backup=bid, manifest_sha256=digest, keys=keys, threshold=req.threshold,
                             blob=reply.blob, shares=list(reply.shares))
    _ready[bid] = (now + KEEP_SECONDS, full)
    return S.KeysBackupReply(id=0, backup=bid, manifest_sha256=digest, keys=keys, threshold=req.threshold)


async def fetch(store: Store, req: S.AKeysBackupFetch, actor: str) -> S.KeysBackupReply:
    """The blob and shares of a backup made in this Factory's life, once; then forgotten."""
    got = _ready.pop(req.backup, None)
    if got is None or got[0] < time.monotonic():
        raise FactoryError("not-found", f"no key backup #{req.backup} to take (taken already, expired after "
                                        f"{KEEP_SECONDS // 60} minutes, or the appliance restarted): run keys backup again")
    await store.audit(actor, "keys-backup-fetch", "token", "ok", f"backup #{req.backup} sha256={got[1].manifest_sha256}")
    return got[1]

"""A ceremony transcript's digest in the audit chain, with a checkpoint of exactly that record signed by the audit key."""

from __future__ import annotations

import time
from typing import Any

from appliance.ipc import schema as S
from policy import audit as A

from .cis_link import CisRefused
from .service import Factory, FactoryError


async def ceremony_record(f: Factory, actor: str, ceremony: str, digest: bytes) -> dict[str, Any]:
    """The CIS never signs bytes it is handed: the transcript is bound to the audit key through the chain.
    Its digest becomes an audit record, and the CIS signs a checkpoint whose head is that record's hash,
    so that an offline verifier needs only the transcript, the record and the audit certificate."""
    db = f._require_active()
    cps = f.checkpoints
    async with cps._lock:  # one checkpoint signing at a time, as Checkpoints.sign does

        def write():
            with db.tx():
                seq = db.audit(actor, "ceremony", ceremony, "ok", f"transcript sha256={digest.hex()}")
            return db.db.execute("SELECT seq, ts, actor, action, object, outcome, detail, prev, hash FROM audit WHERE seq=?",
                                 (seq,)).fetchone()
        seq, ts, who, action, obj, outcome, detail, prev, head = await f.run_db(write)
        now = int(time.time())
        try:
            r = await f.cis.request(S.SignCheckpoint(id=f.cis.new_id(), seq=seq, head=head, time=now))
        except CisRefused as e:
            await f.audit(actor, "audit-checkpoint", f"seq={seq}", "refused", e.reason)
            raise FactoryError("hsm", e.reason) from None
        try:
            if A.parse_checkpoint_tbs(r.tbs) != (seq, head, now):
                raise ValueError("different fields")
        except ValueError:
            raise FactoryError("internal", "the CIS signed a checkpoint other than the one asked") from None

        def store():
            with db.tx():
                db.db.execute("INSERT INTO checkpoints(seq, ts, head, tbs, signature) VALUES (?,?,?,?,?)",
                              (seq, now, head, r.tbs, r.signature))
                db.audit(actor, "audit-checkpoint", f"seq={seq}", "ok", f"head {head.hex()} (ceremony {ceremony})")
        await f.run_db(store)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    cert = x509.load_der_x509_certificate(await cps.cert()).public_bytes(Encoding.PEM).decode()
    record = {"seq": seq, "ts": ts, "actor": who, "action": action, "object": obj, "outcome": outcome, "detail": detail,
              "prev": prev.hex(), "hash": head.hex()}
    return {"record": record, "checkpoint": A.checkpoint_doc(r.tbs, r.signature), "audit_cert": cert}

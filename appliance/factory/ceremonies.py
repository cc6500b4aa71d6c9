"""A ceremony transcript's digest in the audit chain, with a checkpoint of exactly that record signed by the audit key."""

from __future__ import annotations

from typing import Any

from policy import audit as A

from .service import Factory


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
        r = await cps.sign_head(seq, head, actor, f" (ceremony {ceremony})")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    cert = x509.load_der_x509_certificate(await cps.cert()).public_bytes(Encoding.PEM).decode()
    record = {"seq": seq, "ts": ts, "actor": who, "action": action, "object": obj, "outcome": outcome, "detail": detail,
              "prev": prev.hex(), "hash": head.hex()}
    return {"record": record, "checkpoint": A.checkpoint_doc(r.tbs, r.signature), "audit_cert": cert}

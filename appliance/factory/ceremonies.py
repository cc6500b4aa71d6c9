"""Ceremonies in the audit chain: opening, witnesses, and a transcript bound to what the appliance did."""

from __future__ import annotations

import time
from typing import Any

from appliance.ipc import schema as S
from policy import audit as A

from .service import Factory, FactoryError

MAX_RECORDS = 4096  # audit records one ceremony may reference
# A ceremony's window starts at the login of the officer who opens it: that login must be recent, so
# that "witnesses logged in during the ceremony" means during it, not since some old session.
FRESH_LOGIN_SECONDS = 3600


def _officer(actor: str) -> str | None:
    """The officer who asked (the requester, for a dual-control request), from an audit actor."""
    first = actor.split(" ", 1)[0]
    return first[len("officer:"):] if first.startswith("officer:") else None


def _session(conn):
    if conn.session is None:
        raise FactoryError("login-required", "log in first (donjon login --officer NAME)")
    return conn.session


async def _begin_row(f: Factory, seq: int) -> tuple[str, int]:
    """(ceremony name, window start: the login seq of the session that opened it) of an open ceremony."""
    st = f.store
    st.require_active()
    row = await st.run(st.ceremony_opening, seq)
    if row is None:
        raise FactoryError("not-found", f"no ceremony opened at audit seq {seq}")
    if await st.run(st.ceremony_recorded, seq):
        raise FactoryError("exists", f"the ceremony opened at audit seq {seq} already has its transcript")
    return row[0], int(row[1].rsplit("login seq=", 1)[1])


async def ceremony_begin(f: Factory, conn, ceremony: str) -> dict[str, Any]:
    s = _session(conn)
    db = f._require_active()
    if time.monotonic() - s.created > FRESH_LOGIN_SECONDS:  # the window starts at this login: keep it near
        raise FactoryError("policy", f"officer {s.officer} logged in more than {FRESH_LOGIN_SECONDS // 60} minutes ago: "
                                     "log in again to open a ceremony")

    def w():
        with db.tx():
            r = db.audit(conn.actor, "ceremony-begin", ceremony, "ok", f"window from login seq={s.login_seq}")
        return r, f.store.audit_hash(r)
    seq, h = await f.run_db(w)
    return {"ceremony_seq": seq, "hash": h.hex(), "window_start": s.login_seq}


async def ceremony_witness(f: Factory, conn, seq: int) -> dict[str, Any]:
    s = _session(conn)
    db = f._require_active()
    name, start = await _begin_row(f, seq)
    if s.login_seq < start:
        await f.audit(conn.actor, "ceremony-witness", f"ceremony#{seq}", "refused", "logged in before the ceremony began")
        raise FactoryError("policy", f"officer {s.officer} logged in before ceremony {name} began: log in again to witness it")

    def w():
        with db.tx():
            r = db.audit(conn.actor, "ceremony-witness", f"ceremony#{seq}", "ok", f"{name}; login seq={s.login_seq}")
        return r, f.store.audit_hash(r)
    wseq, h = await f.run_db(w)
    return {"seq": wseq, "hash": h.hex(), "officer": s.officer, "login_seq": s.login_seq}


async def _ceremony_rows(f: Factory, seq: int) -> tuple[dict[str, tuple[int, str]], list[tuple[int, bytes, str, str, str, str]]]:
    """The witnesses (name -> their witness record) and every record since the opening."""
    st = f.store
    st.require_active()

    def q():
        return st.ceremony_witnesses(seq), st.audit_rows_after(seq, 20 * MAX_RECORDS)
    ws, rows = await st.run(q)
    witnesses: dict[str, tuple[int, str]] = {}
    for wseq, h, actor in ws:
        o = _officer(actor)
        if o is not None and o not in witnesses:
            witnesses[o] = (wseq, h.hex())
    return witnesses, rows


async def ceremony_records(f: Factory, conn, seq: int) -> dict[str, Any]:
    """The operations of the ceremony so far: records since it opened, asked by one of its witnesses."""
    s = _session(conn)
    await _begin_row(f, seq)
    witnesses, rows = await _ceremony_rows(f, seq)
    if s.officer not in witnesses:
        raise FactoryError("denied", f"officer {s.officer} is not a witness of the ceremony opened at audit seq {seq}")
    out = [{"seq": r, "hash": h.hex(), "action": act, "object": obj, "outcome": oc, "officer": _officer(actor)}
           for r, h, actor, act, obj, oc in rows if _officer(actor) in witnesses and act != "ceremony-witness"]
    return {"records": out[:MAX_RECORDS]}


async def ceremony_record(f: Factory, conn, req: S.ACeremonyRecord) -> dict[str, Any]:
    """The CIS never signs bytes it is handed: the transcript is bound to the audit key through the chain.
    Its digest becomes an audit record, with the bindings the Factory checked itself: the ceremony's
    opening record, each witness's own record (made by that officer's session, logged in during the
    ceremony), and each operation's record (made since the opening by a witness). The CIS then signs a
    checkpoint whose head is that record's hash: an offline verifier needs the transcript, the record
    and the audit certificate, and checks the bindings against the exported audit log."""
    s = _session(conn)
    db = f._require_active()
    seq = req.ceremony_seq
    actor = conn.actor
    try:
        name, _ = await _begin_row(f, seq)
        if name != req.ceremony:
            raise FactoryError("bad-request", f"the ceremony opened at audit seq {seq} is {name!r}, not {req.ceremony!r}")
        witnesses, rows = await _ceremony_rows(f, seq)
        if len(set(req.witnesses)) != len(req.witnesses):
            raise FactoryError("bad-request", "a witness is named twice")
        if s.officer not in req.witnesses:
            raise FactoryError("denied", f"officer {s.officer} records a ceremony only as one of its witnesses")
        absent = [w for w in req.witnesses if w not in witnesses]
        if absent:
            raise FactoryError("policy", f"not witnesses of this ceremony (no witness record of their own): {', '.join(absent)}")
        by_seq = {r: (h, _officer(actor)) for r, h, actor, *_ in rows}
        ops: list[tuple[int, str]] = []
        for op in req.operations:
            got = by_seq.get(op.seq)
            if got is None or got[0] != op.hash:
                raise FactoryError("policy", f"audit seq {op.seq}: no such record of this ceremony with that hash")
            if got[1] not in req.witnesses:
                raise FactoryError("policy", f"audit seq {op.seq} was not made by a witness of this ceremony")
            ops.append((op.seq, op.hash.hex()))
        if len({o[0] for o in ops}) != len(ops):
            raise FactoryError("bad-request", "an operation is named twice")
    except FactoryError as e:
        await f.audit(actor, "ceremony", req.ceremony, "refused", e.reason)
        raise
    begin_hash = await f.store.run(f.store.audit_hash, seq)
    wlist = [(w, *witnesses[w]) for w in req.witnesses]
    bound = A.ceremony_binding_digest((seq, begin_hash.hex()), wlist, ops)
    detail = f"transcript sha256={req.transcript_sha256.hex()} begin={seq} bindings sha256={bound}"
    cps = f.checkpoints
    async with cps._lock:  # one checkpoint signing at a time, as Checkpoints.sign does

        def write():
            with db.tx():
                r = db.audit(actor, "ceremony", req.ceremony, "ok", detail)
            return f.store.audit_record(r)
        rseq, ts, who, action, obj, outcome, detail, prev, head = await f.run_db(write)
        r = await cps.sign_head(rseq, head, actor, f" (ceremony {req.ceremony})")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    cert = x509.load_der_x509_certificate(await cps.cert()).public_bytes(Encoding.PEM).decode()
    record = {"seq": rseq, "ts": ts, "actor": who, "action": action, "object": obj, "outcome": outcome, "detail": detail,
              "prev": prev.hex(), "hash": head.hex()}
    return {"record": record, "checkpoint": A.checkpoint_doc(r.tbs, r.signature), "audit_cert": cert}

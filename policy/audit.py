"""The audit chain and its signed checkpoints: hashing, the checkpoint format, and the offline verifier (pure).

A record's hash is SHA-256(prev || canonical JSON of the record without prev/hash). A checkpoint
is a short text the CIS builds itself (`donjon-audit-checkpoint/1`, the head's seq, hash and time)
and signs with the audit key (ECDSA P-256, SHA-256): it verifies with
`openssl dgst -sha256 -verify audit-pub.pem -signature sig.der checkpoint.txt`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

GENESIS = b"\x00" * 32
CHECKPOINT_MAGIC = "donjon-audit-checkpoint/1"
RECORD_FIELDS = ("seq", "ts", "actor", "action", "object", "outcome", "detail")


def audit_hash(prev: bytes, rec: dict[str, Any]) -> bytes:
    """Chain hash of one record: SHA-256(prev || canonical JSON of the record without prev/hash)."""
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(prev + body).digest()


def checkpoint_tbs(seq: int, head: bytes, ts: int) -> bytes:
    """The exact bytes the audit key signs for a checkpoint of the chain head."""
    if len(head) != 32 or seq < 0 or ts < 0:
        raise ValueError("bad checkpoint fields")
    return f"{CHECKPOINT_MAGIC}\nseq: {seq}\nhead: {head.hex()}\ntime: {ts}\n".encode()


def parse_checkpoint_tbs(tbs: bytes) -> tuple[int, bytes, int]:
    lines = tbs.decode("ascii").split("\n")
    if len(lines) != 5 or lines[0] != CHECKPOINT_MAGIC or lines[4] != "" or not lines[1].startswith("seq: ") \
            or not lines[2].startswith("head: ") or not lines[3].startswith("time: "):
        raise ValueError("not a Donjon audit checkpoint")
    seq, head, ts = int(lines[1][5:]), bytes.fromhex(lines[2][6:]), int(lines[3][6:])
    if checkpoint_tbs(seq, head, ts) != tbs:
        raise ValueError("not a canonical Donjon audit checkpoint")
    return seq, head, ts


def checkpoint_doc(tbs: bytes, signature: bytes) -> dict[str, Any]:
    """The JSON form of a signed checkpoint (an export line, `audit checkpoint --out`, a published anchor)."""
    seq, head, ts = parse_checkpoint_tbs(tbs)
    return {"type": "checkpoint", "seq": seq, "head": head.hex(), "time": ts,
            "tbs": base64.b64encode(tbs).decode(), "signature": base64.b64encode(signature).decode(),
            "alg": "ecdsa-with-SHA256"}


def verify_checkpoint(doc: dict[str, Any], cert: x509.Certificate | None) -> tuple[int, bytes, int]:
    """(seq, head, time) of a signed checkpoint; raises ValueError if it is malformed or its signature is bad."""
    try:
        tbs = base64.b64decode(doc["tbs"], validate=True)
        sig = base64.b64decode(doc["signature"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ValueError("malformed checkpoint") from None
    seq, head, ts = parse_checkpoint_tbs(tbs)
    if (doc.get("seq"), doc.get("head"), doc.get("time")) != (seq, head.hex(), ts):
        raise ValueError(f"checkpoint seq={seq}: its fields differ from its signed text")
    if cert is not None:
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise ValueError("the audit certificate does not hold an EC key")
        try:
            pub.verify(sig, tbs, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise ValueError(f"checkpoint seq={seq}: bad signature (not made by this audit key, or altered)") from None
    return seq, head, ts


def verify_chain(records: Iterable[dict[str, Any]]) -> tuple[int, str | None, dict[int, bytes]]:
    """Walk the records in file order. Returns (records checked, the first problem or None, seq -> hash).

    The problem names the record: an edited one (its content no longer matches its hash), a
    deleted one (a gap in the sequence), a reordered or duplicated one (a sequence out of place),
    or one re-hashed after an edit (the next record no longer chains to it)."""
    recs = list(records)
    all_seqs = {r.get("seq") for r in recs}
    prev = GENESIS
    expect = 1
    hashes_by_seq: dict[int, bytes] = {}
    for n, r in enumerate(recs, 1):
        seq = r.get("seq")
        if not isinstance(seq, int):
            return n, f"record {n}: no sequence number (malformed)", hashes_by_seq
        if seq != expect:
            if seq < expect:
                return n, f"record seq={seq} (entry {n}) comes after seq={expect - 1}: reordered or duplicated", hashes_by_seq
            if expect in all_seqs:
                return n, f"record seq={seq} (entry {n}) comes where seq={expect} was expected: reordered", hashes_by_seq
            missing = f"seq={expect}" if seq == expect + 1 else f"seq={expect}..{seq - 1}"
            return n, f"record {missing} is missing before seq={seq}: deleted", hashes_by_seq
        try:
            stored_prev, stored = bytes.fromhex(r["prev"]), bytes.fromhex(r["hash"])
            rec = {k: r[k] for k in RECORD_FIELDS}
        except (KeyError, TypeError, ValueError):
            return n, f"record seq={seq}: malformed", hashes_by_seq
        if audit_hash(stored_prev, rec) != stored:
            return n, f"record seq={seq}: content does not match its hash (edited)", hashes_by_seq
        if stored_prev != prev:
            return n, (f"record seq={seq} does not chain to record seq={seq - 1} "
                       f"(seq={seq - 1} was edited and re-hashed, or seq={seq} was)"), hashes_by_seq
        hashes_by_seq[seq] = stored
        prev = stored
        expect += 1
    return len(recs), None, hashes_by_seq


def verify_export(entries: list[dict[str, Any]], cert: x509.Certificate | None,
                  anchor: dict[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
    """Check an exported log (records and checkpoints), optionally against a published anchor.

    Returns (summary, first problem or None)."""
    records = [e for e in entries if e.get("type", "record") == "record"]
    checkpoints = [e for e in entries if e.get("type") == "checkpoint"]
    summary: dict[str, Any] = {"records": len(records), "checkpoints": len(checkpoints), "signatures_checked": cert is not None}
    n, problem, by_seq = verify_chain(records)
    if problem:
        return summary, problem
    last = max(by_seq) if by_seq else 0
    summary["head_seq"] = last
    for cp in checkpoints:
        try:
            seq, head, _ = verify_checkpoint(cp, cert)
        except ValueError as e:
            return summary, str(e)
        if seq > last:
            return summary, f"the log ends at seq={last} but a signed checkpoint covers seq={seq}: records deleted from the end"
        if by_seq.get(seq) != head:
            return summary, f"record seq={seq} differs from the head its signed checkpoint names (rewritten)"
        summary["last_checkpoint"] = max(summary.get("last_checkpoint", 0), seq)
    if anchor is not None:
        try:
            seq, head, ts = verify_checkpoint(anchor, cert)
        except ValueError as e:
            return summary, f"anchor: {e}"
        if last < seq:
            return summary, (f"rolled back: the log ends at seq={last}, below the published anchor's seq={seq} "
                             f"(signed at {ts}): the database was restored from an older copy")
        if by_seq.get(seq) != head:
            return summary, f"record seq={seq} differs from the published anchor: the database was replaced by another copy"
        summary["anchor_seq"] = seq
    return summary, None


def load_cert(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def ceremony_binding_digest(begin: tuple[int, str], witnesses: list[tuple[str, int, str]],
                            operations: list[tuple[int, str]]) -> str:
    """SHA-256 (hex) of a ceremony's bindings as canonical JSON: its opening record (seq, hash), its
    witnesses' records (name, seq, hash) and its operations' records (seq, hash). The Factory writes it
    in the ceremony's audit record; `donjon ceremony verify` recomputes it from the transcript."""
    doc = {"begin": list(begin), "witnesses": [list(w) for w in witnesses], "operations": [list(o) for o in operations]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

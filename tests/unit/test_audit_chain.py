"""The offline audit verifier (policy/audit.py): chain problems named, checkpoints and anchors checked."""

from __future__ import annotations

import time

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from policy import audit as A


def chain(n: int) -> list[dict]:
    prev, out = A.GENESIS, []
    for seq in range(1, n + 1):
        rec = {"seq": seq, "ts": 1_800_000_000 + seq, "actor": "t", "action": "x", "object": str(seq), "outcome": "ok", "detail": ""}
        h = A.audit_hash(prev, rec)
        out.append({**rec, "prev": prev.hex(), "hash": h.hex()})
        prev = h
    return out


def signer():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test audit")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return key, cert


def checkpoint(key, recs, seq):
    head = bytes.fromhex(recs[seq - 1]["hash"])
    tbs = A.checkpoint_tbs(seq, head, int(time.time()))
    return A.checkpoint_doc(tbs, key.sign(tbs, ec.ECDSA(hashes.SHA256())))


def test_intact_chain_and_each_kind_of_break():
    recs = chain(10)
    assert A.verify_chain(recs)[:2] == (10, None)
    edited = [dict(r) for r in recs]
    edited[3]["outcome"] = "refused"
    assert "seq=4: content does not match its hash (edited)" in A.verify_chain(edited)[1]
    assert "seq=4 is missing before seq=5: deleted" in A.verify_chain(recs[:3] + recs[4:])[1]
    assert "seq=4..6 is missing" in A.verify_chain(recs[:3] + recs[6:])[1]
    swapped = recs[:3] + [recs[4], recs[3]] + recs[5:]
    assert "seq=5 (entry 4) comes where seq=4 was expected: reordered" in A.verify_chain(swapped)[1]
    dup = recs[:5] + [recs[2]] + recs[5:]
    assert "seq=3 (entry 6) comes after seq=5" in A.verify_chain(dup)[1]


def test_checkpoints_and_anchor():
    key, cert = signer()
    recs = chain(8)
    cp = checkpoint(key, recs, 6)
    summary, problem = A.verify_export(recs + [cp], cert)
    assert problem is None and summary["last_checkpoint"] == 6
    # truncated after the checkpoint's seq
    assert "records deleted from the end" in A.verify_export(recs[:5] + [cp], cert)[1]
    # another key
    _, cert2 = signer()
    assert "bad signature" in A.verify_export(recs + [cp], cert2)[1]
    # anchor: a copy older than the anchor, or one that diverged at the anchor's seq
    anchor = checkpoint(key, recs, 8)
    assert A.verify_export(recs, cert, anchor)[1] is None
    assert "rolled back" in A.verify_export(recs[:7], cert, anchor)[1]
    fork = chain(7) + [dict(chain(9)[7], object="other")]
    fork_fixed = chain(7)
    prev = bytes.fromhex(fork_fixed[-1]["hash"])
    rec = {k: fork[-1][k] for k in A.RECORD_FIELDS}
    fork_fixed.append({**rec, "prev": prev.hex(), "hash": A.audit_hash(prev, rec).hex()})
    assert "differs from the published anchor" in A.verify_export(fork_fixed, cert, anchor)[1]
    # a tampered field outside the signed text
    bad = dict(cp, seq=5)
    assert "differ from its signed text" in A.verify_export(recs + [bad], cert)[1]

"""The signed audit trail on the real appliance: checkpoints signed by the HSM audit key (checked
with openssl), the offline verifier naming an edited, deleted or reordered record, rollback of the
CMDB to an older copy detected against a published anchor, and audit storage failure stopping
issuance (a really full filesystem: a small tmpfs mounted under the CMDB)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_csr, openssl


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _write(p: Path, entries: list[dict]) -> Path:
    p.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return p


def _verify(a, *args: str):
    return a.cli("audit", "verify", *args, check=False)


def test_checkpoint_signed_by_the_hsm_verifies_with_openssl_and_tampering_is_named(appliance, tmp_path):
    a = appliance
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(make_csr(tmp_path, "w")), "--out", str(tmp_path / "w.pem"))
    head = tmp_path / "head.json"
    out = a.cli("audit", "checkpoint", "--out", str(head)).stdout
    assert b"checkpoint signed: seq" in out
    cert = tmp_path / "audit.pem"
    a.cli("audit", "cert", "--out", str(cert))
    text = openssl("x509", "-in", str(cert), "-noout", "-text").stdout
    assert b"Donjon audit key" in text and b"Digital Signature" in text
    status = a.cli("status").stdout.decode()
    doc = json.loads(head.read_text())
    assert f"audit checkpoint: seq {doc['seq']} head {doc['head']}" in status

    # openssl is the judge of the signature
    (tmp_path / "cp.txt").write_bytes(base64.b64decode(doc["tbs"]))
    (tmp_path / "cp.sig").write_bytes(base64.b64decode(doc["signature"]))
    pub = tmp_path / "pub.pem"
    pub.write_bytes(openssl("x509", "-in", str(cert), "-noout", "-pubkey").stdout)
    r = openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(tmp_path / "cp.sig"), str(tmp_path / "cp.txt"))
    assert b"Verified OK" in r.stdout
    assert (tmp_path / "cp.txt").read_text().startswith("donjon-audit-checkpoint/1\nseq: ")
    (tmp_path / "cp.txt").write_bytes(base64.b64decode(doc["tbs"]).replace(b"seq: ", b"seq: 1"))
    r = openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(tmp_path / "cp.sig"), str(tmp_path / "cp.txt"), check=False)
    assert r.returncode != 0

    # the export carries the checkpoint; the offline verifier (appliance not needed) accepts it
    log = tmp_path / "audit.jsonl"
    a.cli("audit", "export", "--out", str(log))
    entries = _lines(log)
    assert any(e.get("type") == "checkpoint" for e in entries)
    a.stop()
    r = _verify(a, str(log), "--cert", str(cert))
    assert r.returncode == 0 and b"checkpoints with valid signatures" in r.stdout, r.stderr
    r = _verify(a, str(log), "--cert", str(cert), "--anchor", str(head))
    assert r.returncode == 0 and b"consistent with the anchor" in r.stdout, r.stderr

    recs = [e for e in entries if e.get("type") != "checkpoint"]
    cps = [e for e in entries if e.get("type") == "checkpoint"]
    k = 5
    assert recs[k - 1]["seq"] == k

    edited = [dict(e) for e in recs]
    edited[k - 1]["detail"] = "nothing to see here"
    r = _verify(a, str(_write(tmp_path / "edited.jsonl", edited)))
    assert r.returncode == 1 and f"record seq={k}: content does not match its hash (edited)".encode() in r.stderr

    deleted = recs[:k - 1] + recs[k:]
    r = _verify(a, str(_write(tmp_path / "deleted.jsonl", deleted)))
    assert r.returncode == 1 and f"record seq={k} is missing before seq={k + 1}: deleted".encode() in r.stderr

    swapped = list(recs)
    swapped[k - 1], swapped[k] = swapped[k], swapped[k - 1]
    r = _verify(a, str(_write(tmp_path / "reordered.jsonl", swapped)))
    assert r.returncode == 1 and f"record seq={k + 1} (entry {k}) comes where seq={k} was expected: reordered".encode() in r.stderr

    # an edit re-hashed to look consistent is caught by the next record's link
    import hashlib
    rehashed = [dict(e) for e in recs]
    rec = {x: rehashed[k - 1][x] for x in ("seq", "ts", "actor", "action", "object", "outcome", "detail")}
    rec["detail"] = "forged"
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    rehashed[k - 1].update(detail="forged", hash=hashlib.sha256(bytes.fromhex(rehashed[k - 1]["prev"]) + body).hexdigest())
    r = _verify(a, str(_write(tmp_path / "rehashed.jsonl", rehashed)))
    assert r.returncode == 1 and f"record seq={k + 1} does not chain to record seq={k}".encode() in r.stderr

    # records cut from the end: only the signed checkpoint can tell
    cut = [e for e in recs if e["seq"] < cps[-1]["seq"]] + cps
    r = _verify(a, str(_write(tmp_path / "cut.jsonl", cut)), "--cert", str(cert))
    assert r.returncode == 1 and b"records deleted from the end" in r.stderr

    # a checkpoint not made by the audit key
    forged = [dict(e) for e in entries]
    for e in forged:
        if e.get("type") == "checkpoint":
            sig = bytearray(base64.b64decode(e["signature"]))
            sig[-1] ^= 1
            e["signature"] = base64.b64encode(bytes(sig)).decode()
    r = _verify(a, str(_write(tmp_path / "forged.jsonl", forged)), "--cert", str(cert))
    assert r.returncode == 1 and b"bad signature" in r.stderr


def _copy_cmdb(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def test_rolled_back_database_detected_against_the_published_anchor(appliance, tmp_path):
    a = appliance
    a.cli("audit", "cert", "--out", str(tmp_path / "audit.pem"))
    a.stop()
    cmdb = a.home / "cmdb"
    _copy_cmdb(cmdb, tmp_path / "old-cmdb")  # an older copy of the database (and its wrapped key)
    a.start()
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(make_csr(tmp_path, "late")), "--out", str(tmp_path / "l.pem"))
    anchor = tmp_path / "anchor.json"
    a.cli("audit", "checkpoint", "--out", str(anchor))  # published with the issued-serials list
    r = a.cli("audit", "verify", "--cert", str(tmp_path / "audit.pem"), "--anchor", str(anchor))
    assert b"consistent with the anchor" in r.stdout
    a.stop()
    shutil.rmtree(cmdb)
    _copy_cmdb(tmp_path / "old-cmdb", cmdb)  # the rollback
    a.start()
    r = a.cli("audit", "verify", "--cert", str(tmp_path / "audit.pem"), "--anchor", str(anchor), check=False)
    assert r.returncode == 1 and b"rolled back" in r.stderr and b"below the published anchor" in r.stderr, r.stderr
    # a copy that went on differently past the anchor's seq is caught too
    for _ in range(60):
        if json.loads(a.cli("status", "--json").stdout)["audit_records"] > json.loads(anchor.read_text())["seq"]:
            break
        a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "c.crl"))
    r = a.cli("audit", "verify", "--cert", str(tmp_path / "audit.pem"), "--anchor", str(anchor), check=False)
    assert r.returncode == 1 and b"differs from the published anchor" in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_audit_storage_failure_stops_issuance(appliance, tmp_path):
    """A full filesystem under the CMDB (a real tmpfs, really full): issuance is refused, nothing is
    returned and nothing is stored without its audit record; once there is room again it resumes."""
    a = appliance
    a.stop()
    cmdb = a.home / "cmdb"
    keep = tmp_path / "keep"
    _copy_cmdb(cmdb, keep)
    used = sum(f.stat().st_size for f in keep.iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 8 * 1024 * 1024},mode=0700", "tmpfs", str(cmdb)], check=True)
    try:
        for f in keep.iterdir():
            subprocess.run(["cp", "-a", str(f), str(cmdb / f.name)], check=True)
        st = keep.stat()
        os.chown(cmdb, st.st_uid, st.st_gid)
        os.chmod(cmdb, st.st_mode & 0o7777)
        a.start()
        before = json.loads(a.cli("status", "--json").stdout)["certificates"]
        csr = make_csr(tmp_path, "full")
        filler = cmdb / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until ENOSPC
        r = a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), check=False)
        assert r.returncode == 1 and b"BEGIN CERTIFICATE" not in r.stdout, r.stdout
        assert b"audit storage failure" in r.stderr and b"nothing was issued" in r.stderr, r.stderr
        filler.unlink()
        if a.cli("status", "--json", check=False).returncode != 0:  # the Factory may stop outright: start again
            a.stop()
            a.start()
        after = json.loads(a.cli("status", "--json").stdout)["certificates"]
        assert after == before
        r = a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr))
        assert b"BEGIN CERTIFICATE" in r.stdout
        assert b"audit chain intact" in a.cli("audit", "verify").stdout
    finally:
        a.stop()
        subprocess.run(["umount", "-l", str(cmdb)], check=False)

"""Ceremony transcripts bound to what the appliance did: the audit records of the ceremony's operations
and the witnesses who logged in during it. An auditor can no longer have the audit key sign a made-up
ceremony with invented witnesses, and `ceremony verify` finds every forgery."""

from __future__ import annotations

import hashlib
import json

import pytest

from appliance.client import AdminClient, ClientError
from appliance.console.ceremony import FORMAT, canonical
from appliance.ipc import schema as S
from tests.conftest import PASSWORD

CEREMONY = """
[ceremony]
name = "sub-2027"
officers = ["oper", "admin"]
quorum = 2
output = "out"

[[step]]
action = "create-ca"
name = "sub-2027"
parent = "root"
key-type = "p256"
subject = { C = "FR", O = "Donjon Test", CN = "Donjon Test Sub 2027" }
validity-days = 400
path-length = 0
out = "sub-2027.pem"

[[step]]
action = "crl"
ca = "root"
out = "root.crl"
"""


def _stdin(present: list[str], steps: int) -> bytes:
    lines = [x for n in present for x in (n, PASSWORD, "")] + ["yes"] * (steps * len(present))  # all listed: no empty name
    return ("\n".join(lines) + "\n").encode()


def _login(a, officer: str) -> AdminClient:
    c = AdminClient(str(a.home), timeout=60)
    c.login(officer, PASSWORD)
    return c


def _refused(c: AdminClient, cls, **kw) -> str:
    with pytest.raises(ClientError) as e:
        c.call(cls, **kw)
    return str(e.value)


def _sign(c: AdminClient, tr: dict, seq: int, witnesses: list[str], operations=()) -> dict:
    """What a forger can do: digest a transcript of their own making and have it recorded."""
    body = {k: v for k, v in tr.items() if k not in ("transcript_sha256", "signature")}
    digest = hashlib.sha256(canonical(body)).digest()
    tr["transcript_sha256"] = digest.hex()
    tr["signature"] = c.call(S.ACeremonyRecord, ceremony=tr["ceremony"], transcript_sha256=digest, ceremony_seq=seq,
                             witnesses=witnesses, operations=list(operations))
    return tr


def test_transcripts_are_bound_and_forgeries_fail(appliance, tmp_path):
    a = appliance
    (tmp_path / "c.toml").write_text(CEREMONY)
    r = a.cli("ceremony", "run", str(tmp_path / "c.toml"), input=_stdin(["oper", "admin"], 2), check=False, timeout=300)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    folder = tmp_path / "out"
    tr = json.loads((folder / "transcript.json").read_text())
    assert tr["format"] == FORMAT == "donjon-ceremony-transcript/2"
    b = tr["audit_binding"]
    assert [w["name"] for w in b["witnesses"]] == ["oper", "admin"]
    assert all(w["login_seq"] > 0 and w["seq"] > b["begin"]["seq"] for w in b["witnesses"])
    made = [x for x in tr["steps"][0]["audit"] if x["action"] == "ca-create"]
    assert [(x["object"], x["outcome"], x["officer"]) for x in made] == [("sub-2027", "ok", "oper")]
    assert [x["action"] for x in tr["steps"][1]["audit"]] == ["crl"]
    assert b["operations"] == [[x["seq"], x["hash"]] for s in tr["steps"] for x in s["audit"]]
    assert f"begin={b['begin']['seq']} bindings sha256=" in tr["signature"]["record"]["detail"]

    audit_pem, log = tmp_path / "audit.pem", tmp_path / "audit.jsonl"
    a.cli("audit", "cert", "--out", str(audit_pem))

    def verify(path, with_log=True):
        a.cli("audit", "export", "--out", str(log)) if with_log and not log.exists() else None
        return a.cli("ceremony", "verify", str(path), "--cert", str(audit_pem), *(["--audit-log", str(log)] if with_log else []),
                     check=False)

    r = verify(folder / "transcript.json")
    assert r.returncode == 0 and b"all present in the audit log" in r.stdout, r.stderr

    # The reported attack, done by the auditor alone, step by step: every shortcut is refused (audited).
    aud = _login(a, "aud")
    forged = {k: v for k, v in tr.items() if k not in ("transcript_sha256", "signature")}
    opened = aud.call(S.ACeremonyBegin, ceremony="sub-2027")
    seq = opened["ceremony_seq"]
    assert "not a witness" in _refused(aud, S.ACeremonyRecords, ceremony_seq=seq)
    digest = b"\x01" * 32
    assert "only as one of its witnesses" in _refused(aud, S.ACeremonyRecord, ceremony="sub-2027", transcript_sha256=digest,
                                                      ceremony_seq=seq, witnesses=["oper", "admin"])
    mine = aud.call(S.ACeremonyWitness, ceremony_seq=seq)
    # invented witnesses: oper and admin never witnessed this ceremony with sessions of their own
    assert "not witnesses of this ceremony" in _refused(aud, S.ACeremonyRecord, ceremony="sub-2027", transcript_sha256=digest,
                                                        ceremony_seq=seq, witnesses=["aud", "oper", "admin"])
    # a witness whose session predates the opening (a token kept from earlier) cannot join it
    with AdminClient(str(a.home), timeout=60, session=a.session("oper")) as old:
        assert "logged in before ceremony sub-2027 began" in _refused(old, S.ACeremonyWitness, ceremony_seq=seq)
    # operations: the real ceremony's records (before the opening), another officer's later CRL, a made-up hash
    a.cli("crl", "generate", "--ca", "root", "--out", str(tmp_path / "later.crl"))
    later = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"action": "crl"' in x or b'"action":"crl"' in x][-1]
    for op, why in ((made[0], "no such record of this ceremony"), (later, "not made by a witness"),
                    ({"seq": later["seq"], "hash": "00" * 32}, "no such record of this ceremony")):
        ops = [S.CeremonyOperation(seq=op["seq"], hash=bytes.fromhex(op["hash"]))]
        assert why in _refused(aud, S.ACeremonyRecord, ceremony="sub-2027", transcript_sha256=digest, ceremony_seq=seq,
                               witnesses=["aud"], operations=ops)
    recs = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]
    assert [r["outcome"] for r in recs if r["action"] == "ceremony" and "uid=" in r["actor"] and r["actor"].startswith("officer:aud")] \
        == ["refused"] * 5

    # What the auditor can still get signed is a transcript of what he did: alone, no operation.
    # Claiming the real ceremony's steps and officers on top of it fails verification, each lie by name.
    forged["audit_binding"] = {"begin": {"seq": seq, "hash": opened["hash"]},
                               "witnesses": [{"name": "aud", "seq": mine["seq"], "hash": mine["hash"], "login_seq": mine["login_seq"]}],
                               "operations": []}
    for s in forged["steps"]:
        s["audit"] = []
    _sign(aud, forged, seq, ["aud"])
    (folder / "forged.json").write_text(json.dumps(forged))
    log.unlink()
    r = verify(folder / "forged.json")
    err = r.stderr.decode()
    assert r.returncode == 1 and "officers present are not the witnesses" in err
    assert "step 1 (create-ca): no audit record of its operation" in err and "step 2 (crl): no audit record" in err
    assert "transcript intact" not in r.stdout.decode()
    # Copying the real binding instead breaks the signed record (the Factory signed the auditor's binding).
    forged2 = dict(forged, audit_binding=tr["audit_binding"], steps=tr["steps"])
    forged2["transcript_sha256"] = hashlib.sha256(canonical(
        {k: v for k, v in forged2.items() if k not in ("transcript_sha256", "signature")})).hexdigest()
    (folder / "forged2.json").write_text(json.dumps(forged2))
    r = verify(folder / "forged2.json", with_log=False)
    assert r.returncode == 1 and b"not this transcript's (digest or audit bindings differ)" in r.stderr
    aud.close()

    # A log with the witness record removed, or the records' hashes changed, no longer carries the transcript.
    lines = log.read_text().splitlines()
    w0 = tr["audit_binding"]["witnesses"][0]["seq"]
    (tmp_path / "cut.jsonl").write_text("\n".join(ln for ln in lines if json.loads(ln).get("seq") != w0 or "checkpoint" in ln) + "\n")
    r = a.cli("ceremony", "verify", str(folder / "transcript.json"), "--audit-log", str(tmp_path / "cut.jsonl"), check=False)
    assert r.returncode == 1 and b"audit log:" in r.stderr and b"deleted" in r.stderr
    # A transcript of the old format (no bindings) proves nothing and is refused.
    old = dict(tr, format="donjon-ceremony-transcript/1")
    (folder / "old.json").write_text(json.dumps(old))
    r = a.cli("ceremony", "verify", str(folder / "old.json"), check=False)
    assert r.returncode == 1 and b"made before transcripts were bound" in r.stderr

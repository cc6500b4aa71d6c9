"""`donjon ceremony run`: witnessed steps, quorum, a transcript whose hashes verify, no overwrite."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from cryptography import x509

from tests.conftest import PASSWORD, make_csr, openssl

OFFICERS = ("alice", "bob", "carol")  # operators added for the ceremony (password: PASSWORD)


@pytest.fixture
def ceremony_appliance(appliance_factory):
    """Dual control on for CA creation and subordinate signing: two distinct officers per such request."""
    a = appliance_factory(start=False)
    with open(a.home / "donjon.toml", "a") as f:
        f.write('\n[dual-control]\napprovals = 2\noperations = ["ca-create", "ca-sign-csr"]\n')
    a.start()
    for name in OFFICERS:
        a.cli("officer", "add", name, "--role", "operator")
    return a


def ceremony_file(folder, output="out") -> "Path":  # noqa: F821
    p = folder / "rollover.toml"
    p.write_text(f"""
[ceremony]
name = "rollover-2027"
description = "New issuing CA and a second root; an external subordinate; a root CRL."
officers = ["alice", "bob", "carol"]
quorum = 2
output = "{output}"

[[step]]
action = "create-ca"
name = "issuing-2027"
parent = "root"
key-type = "p256"
subject = {{ C = "FR", O = "Donjon Test", CN = "Donjon Test Issuing CA 2027" }}
validity-days = 1000
path-length = 0
out = "issuing-2027.pem"
note = "replaces issuing at the end of 2027"

[[step]]
action = "sign-csr"
parent = "root"
csr = "external.csr"
validity-days = 730
path-length = 0
out = "external.pem"

[[step]]
action = "create-root"
name = "root-2"
key-type = "p384"
subject = {{ C = "FR", O = "Donjon Test", CN = "Donjon Test Root CA 2" }}
validity-days = 3650
path-length = 1
out = "root-2.pem"

[[step]]
action = "crl"
ca = "root"
out = "root.crl"

[[step]]
action = "export-ca"
ca = "issuing-2027"
chain = true
out = "issuing-2027-chain.pem"
""")
    return p


def answers(present: list[str], approvals: list[list[str]]) -> bytes:
    """stdin for the ceremony: each officer's name and password, an empty line, then yes/no per step and officer."""
    lines = []
    for name in present:
        lines += [name, PASSWORD, ""]  # name, password, no second-factor code
    lines.append("")
    for step in approvals:
        lines += step
    return ("\n".join(lines) + "\n").encode()


def run(a, path, stdin: bytes) -> subprocess.CompletedProcess:
    return a.cli("ceremony", "run", str(path), input=stdin, check=False, timeout=300)


def test_ceremony_transcript_hashes_verify_and_no_overwrite(ceremony_appliance, tmp_path):
    a = ceremony_appliance
    make_csr(tmp_path, "external", san=None, subj="/C=FR/O=Donjon Test/CN=External Issuing CA")
    path = ceremony_file(tmp_path)
    r = run(a, path, answers(["alice", "carol"], [["yes", "yes"]] * 5))
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "step 1: create-ca" in out and "outcome: complete" in out
    folder = tmp_path / "out"
    tr = json.loads((folder / "transcript.json").read_text())
    assert tr["outcome"] == "complete" and [o["name"] for o in tr["officers_present"]] == ["alice", "carol"]
    assert tr["hsm"]["token"].startswith("donjon serial=")
    assert tr["software"]["sha256"] and tr["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [s["witnesses"] for s in tr["steps"]] == [["alice", "carol"]] * 5
    assert tr["steps"][0]["params"]["path_length"] == 0 and "chain" not in tr["steps"][0]["params"]
    for o in tr["outputs"]:
        assert hashlib.sha256((folder / o["file"]).read_bytes()).hexdigest() == o["sha256"]
    assert len(tr["outputs"]) == 5
    assert b"transcript intact" in a.cli("ceremony", "verify", str(folder / "transcript.json")).stdout
    # Dual control: each CA creation and the subordinate signing ran on the two witnesses' approvals.
    for i in (0, 1, 2):
        assert tr["steps"][i]["dual_control"]["approved_by"] == ["alice", "carol"]
    assert "dual_control" not in tr["steps"][3]
    # Signed by the HSM's audit key: an audit record of the digest and a checkpoint of exactly it,
    # verified offline against the audit certificate exported on its own.
    audit_pem = tmp_path / "audit.pem"
    a.cli("audit", "cert", "--out", str(audit_pem))
    sig = tr["signature"]
    assert sig["record"]["action"] == "ceremony" and sig["record"]["detail"].startswith(f"transcript sha256={tr['transcript_sha256']} begin=")
    assert sig["checkpoint"]["seq"] == sig["record"]["seq"]
    r = a.cli("ceremony", "verify", str(folder / "transcript.json"), "--cert", str(audit_pem))
    assert b"audit-key signature verify" in r.stdout
    other = a.export("root", tmp_path / "not-the-audit-cert.pem")
    r = a.cli("ceremony", "verify", str(folder / "transcript.json"), "--cert", str(other), check=False)
    assert r.returncode == 1 and b"bad signature" in r.stderr, r.stderr
    # The record is in the appliance's own chain, and the chain with its checkpoints verifies.
    exported = tmp_path / "audit.jsonl"
    a.cli("audit", "export", "--out", str(exported))
    assert json.dumps(sig["record"], sort_keys=True) in {json.dumps(json.loads(ln), sort_keys=True) for ln in exported.read_text().splitlines()}
    assert b"with valid signatures" in a.cli("audit", "verify", str(exported), "--cert", str(audit_pem)).stdout

    # What the ceremony made is real: the chain verifies, the second root is self-signed, the CRL parses.
    root = a.export("root", tmp_path / "root.pem")
    openssl("verify", "-x509_strict", "-CAfile", str(root), str(folder / "issuing-2027.pem"))
    openssl("verify", "-x509_strict", "-CAfile", str(root), str(folder / "external.pem"))
    openssl("verify", "-x509_strict", "-CAfile", str(folder / "root-2.pem"), str(folder / "root-2.pem"))
    crl = x509.load_der_x509_crl((folder / "root.crl").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == tr["steps"][3]["result"]["crl_number"]

    # The printable transcript is a real PDF carrying the same hashes.
    text = subprocess.run(["pdftotext", "-layout", str(folder / "transcript.pdf"), "-"], capture_output=True, check=True).stdout.decode()
    assert "rollover-2027" in text and tr["transcript_sha256"] in text
    for o in tr["outputs"]:
        assert o["sha256"] in text

    # A changed output, or a changed transcript, is found.
    before = (folder / "external.pem").read_bytes()
    (folder / "external.pem").write_bytes(before.replace(b"A", b"B", 1))
    r = a.cli("ceremony", "verify", str(folder / "transcript.json"), check=False)
    assert r.returncode == 1 and b"external.pem: SHA-256 differs" in r.stderr
    (folder / "external.pem").write_bytes(before)
    doc = json.loads((folder / "transcript.json").read_text())
    doc["officers_present"][1]["name"] = "mallory"
    (folder / "forged.json").write_text(json.dumps(doc))
    r = a.cli("ceremony", "verify", str(folder / "forged.json"), "--cert", str(audit_pem), check=False)
    assert r.returncode == 1 and b"digest mismatch" in r.stderr
    doc["transcript_sha256"] = hashlib.sha256(json.dumps(  # a forger who recomputes the digest still lacks the signature
        {k: v for k, v in doc.items() if k not in ("transcript_sha256", "signature")},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    (folder / "forged.json").write_text(json.dumps(doc))
    r = a.cli("ceremony", "verify", str(folder / "forged.json"), "--cert", str(audit_pem), check=False)
    assert r.returncode == 1 and b"not this transcript's" in r.stderr

    # A rerun refuses before doing anything: no output is overwritten, no CA is made.
    cas = a.cli("ca", "list").stdout
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    r = run(a, path, answers(["alice", "carol"], [["yes", "yes"]] * 5))
    assert r.returncode == 1 and b"already exist" in r.stderr and b"never overwrites" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert a.cli("ca", "list").stdout == cas


def test_ceremony_aborts_without_quorum(ceremony_appliance, tmp_path):
    a = ceremony_appliance
    make_csr(tmp_path, "external", san=None, subj="/C=FR/O=Donjon Test/CN=External Issuing CA")
    path = ceremony_file(tmp_path, output="noquorum")
    cas = a.cli("ca", "list").stdout
    # One officer present (and a stranger refused): no quorum, nothing done, nothing written.
    stdin = b"mallory\nalice\n" + PASSWORD.encode() + b"\n\n\n"
    r = run(a, path, stdin)
    assert r.returncode == 1 and b"no quorum: 1 of the required 2" in r.stdout
    assert b"'mallory' is not an officer of this ceremony" in r.stdout
    assert not (tmp_path / "noquorum").exists()
    assert a.cli("ca", "list").stdout == cas

    # Quorum present, but the second step is approved by one officer only: aborted there, recorded.
    path = ceremony_file(tmp_path, output="refused")
    r = run(a, path, answers(["alice", "bob", "carol"], [["yes", "yes", "no"], ["yes", "no", "no"]]))
    assert r.returncode == 1 and b"not approved by a quorum" in r.stdout
    tr = json.loads((tmp_path / "refused" / "transcript.json").read_text())
    assert tr["outcome"].startswith("aborted at step 2")
    assert [s["outcome"] for s in tr["steps"]] == ["done", "not approved"]
    assert not (tmp_path / "refused" / "external.pem").exists()
    assert b"transcript intact" in a.cli("ceremony", "verify", str(tmp_path / "refused" / "transcript.json")).stdout

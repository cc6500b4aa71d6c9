"""The recovery drill of issue 15: keys backup 3-of-5 under dual control, the token and the home
destroyed, `keys recover` onto a new home with 3 custodians, the same CAs, new leaves under the old chain."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from policy import shamir
from tests.conftest import PASSWORD, Appliance, make_csr, openssl
from tests.integration.test_ceremony import answers

DUAL = '[dual-control]\napprovals = 2\noperations = ["keys-backup"]\n'


def _issue(a, tmp_path, name: str) -> str:
    csr = make_csr(tmp_path, name, san=f"DNS:{name}.example.org")
    return json.loads(a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--json").stdout)[0]["serial"]


def _nothing_written(home: Path) -> bool:
    return sorted(p.name for p in home.iterdir()) == ["donjon.toml"]


def _drill(appliance_factory, homes, tmp_path, src_path, forged: bool) -> None:
    a = appliance_factory(start=False)  # the default variant's template: no init of its own
    with open(a.home / "donjon.toml", "a") as f:
        f.write(DUAL)  # key backup under dual control (read at start)
    a.start()
    a.cli("officer", "add", "admin2", "--role", "administrator", env={"DONJON_PASSWORD": PASSWORD})
    a.officers["admin2"] = "administrator"
    kept = _issue(a, tmp_path, "kept")
    revoked = _issue(a, tmp_path, "revoked")
    a.cli("revoke", "--ca", "issuing", revoked, "--reason", "keyCompromise")
    old = {n: a.export(n, tmp_path / f"old-{n}.pem").read_bytes() for n in ("root", "issuing")}
    a.cli("backup", "--out", str(tmp_path / "cmdb.tar"), officer="admin")

    # keys backup: an operator may not; an administrator's request waits for a second one (dual control).
    media = tmp_path / "media"
    so = str(a.home / "softhsm" / "so-pin")
    r = a.cli("keys", "backup", "--out-dir", str(media), "--so-pin-file", so, check=False)
    assert r.returncode == 1 and b"may not keys-backup" in r.stderr, r.stderr
    r = a.cli("keys", "backup", "--out-dir", str(media), "--so-pin-file", so, officer="admin")
    assert b"pending" in r.stdout and not media.exists(), r.stdout
    docs = json.loads(a.cli("pending", "list", "--json", officer="admin2").stdout)
    docs = docs["pending"] if isinstance(docs, dict) else docs
    rid = [p["id"] for p in docs if p["operation"] == "keys-backup"][0]
    done = json.loads(a.cli("approve", str(rid), "--json", officer="admin2").stdout)
    assert done["executed"] and "DJS1" not in json.dumps(done)  # the shares never go into the CMDB's pending table
    number = done["result"]["backup"]
    made = json.loads(a.cli("keys", "backup", "--out-dir", str(media), "--fetch", str(number), "--json", officer="admin").stdout)
    assert sorted(made["keys"]) == ["donjon-audit", "donjon-cmdb-wrap", "issuing", "root"] and made["threshold"] == 3
    assert len(made["shares"]) == 5 and len({Path(p).parent for p in made["shares"]}) == 5  # one folder (medium) each
    sheet = subprocess.run(["pdftotext", str(Path(made["shares"][0]).with_suffix(".pdf")), "-"], capture_output=True,
                           check=True).stdout.decode()  # the printable sheet carries the same share
    share_line = [ln for ln in Path(made["shares"][0]).read_text().splitlines() if ln.startswith("share: ")][0]
    assert share_line.split(": ", 1)[1][:40] in sheet.replace("\n", "") and "Custodian:" in sheet
    r = a.cli("keys", "backup", "--out-dir", str(tmp_path / "again"), "--fetch", str(number), check=False, officer="admin")
    assert r.returncode == 1 and b"taken already" in r.stderr  # handed out once
    blob = made["blob"]
    doc = json.loads(Path(blob).read_bytes())
    assert all(e["spki_sha256"] is None or len(e["spki_sha256"]) == 64 for e in doc["keys"]) and doc["mac"]
    audit = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x]
    assert [x["outcome"] for x in audit if x.get("action") == "keys-backup"] == ["denied", "ok"]  # the operator, then the backup
    if forged:  # the long version also makes the backup as a ceremony step and from the console (just drills)
        _ceremony_step(a, tmp_path)
        _console_key_backup(a, tmp_path)
    assert a.stop() == 0

    shutil.rmtree(a.home)  # the disaster: the token and the home are gone

    b = Appliance(homes / "recovered", src_path)
    b.officers = dict(a.officers)
    b.home.mkdir(mode=0o711)
    (b.home / "donjon.toml").write_text('[ocsp]\nlisten = "127.0.0.1:0"\n' + DUAL)  # the new appliance's settings
    shares = [str(p) for p in made["shares"]]
    text = Path(shares[1]).read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("share: ")][0]
    altered = tmp_path / "altered.txt"
    altered.write_text(text.replace(line, line[:-12] + ("0" if line[-12] != "0" else "1") + line[-11:]))

    def recover(*args: str):
        return b.cli("keys", "recover", "--home", str(b.home), "--blob", blob, "--backup", str(tmp_path / "cmdb.tar"),
                     *args, check=False)

    for args, why in [
        (("--share-file", shares[0], "--share-file", shares[1]), b"3 shares are needed, 2 given"),
        (("--share-file", shares[0], "--share-file", str(altered), "--share-file", shares[2]), b"SHA-256 does not match"),
    ]:
        r = recover(*args)
        assert r.returncode == 1 and why in r.stderr, r.stderr
        assert _nothing_written(b.home)
    if forged:
        # A share re-typed with other data and consistent checksums: only the CIS can tell; nothing is kept.
        sid, m, x, y = shamir.parse_share(line.split(": ", 1)[1])
        body = f"DJS1-{sid}-{m}-{x}-{bytes([y[0] ^ 1]).hex()}{y[1:].hex()}"
        ftext = f"{body}-{shamir._check(body)}"
        (tmp_path / "forged.txt").write_text(f"share: {ftext}\nshare-sha256: {hashlib.sha256(ftext.encode()).hexdigest()}\n")
        r = recover("--share-file", shares[0], "--share-file", str(tmp_path / "forged.txt"), "--share-file", shares[2])
        assert r.returncode == 1 and b"do not combine to a valid secret" in r.stderr and b"nothing was kept" in r.stderr, r.stderr
        assert _nothing_written(b.home)

    r = recover("--share-file", shares[4], "--share-file", shares[0], "--share-file", shares[3])
    assert r.returncode == 0, r.stderr
    try:
        b.start()
        cas = json.loads(b.cli("ca", "list", "--json").stdout)
        assert {c["name"] for c in cas} == {"root", "issuing"}
        for n in ("root", "issuing"):
            assert b.export(n, tmp_path / f"new-{n}.pem").read_bytes() == old[n]
        listed = json.loads(b.cli("cert", "list", "--json").stdout)
        status = {c["serial"]: c["revoked"] for c in (listed["certs"] if isinstance(listed, dict) else listed)}
        assert status[kept] is False and status[revoked] is True
        # A leaf issued after recovery verifies under the chain exported before the disaster.
        csr = make_csr(tmp_path, "after", san="DNS:after.example.org")
        b.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(tmp_path / "after.pem"))
        v = openssl("verify", "-CAfile", str(tmp_path / "old-root.pem"), "-untrusted", str(tmp_path / "old-issuing.pem"),
                    str(tmp_path / "after.pem"))
        assert b": OK" in v.stdout
        assert b"audit chain intact" in b.cli("audit", "verify").stdout
    finally:
        b.stop()


def _console_key_backup(a: Appliance, tmp_path: Path) -> None:
    """The console's "Key backup to media" item on a real tmux pane: an administrator asks, a second one
    approves (dual control), the first takes the backup by its number onto the media; a bad answer is refused."""
    from tests.integration.console_driver import Tmux
    from tests.integration.test_console import console_argv, log_in
    media = a.home / "media"
    media.mkdir(mode=0o700, exist_ok=True)
    so_pin = (a.home / "softhsm" / "so-pin").read_text().strip()
    (tmp_path / "console").mkdir()
    t = Tmux(tmp_path / "console", console_argv(a), env=a.env("admin"))
    try:
        log_in(t, "admin")
        t.expect(r"logged in as admin[\s\S]*choice>$")
        t.send("19")
        t.expect(r"Key backup \(1-2, Enter: back\)>$")
        t.send("1")
        t.expect(r"custodian shares \(Enter: default\):$")
        t.send("99")  # out of range: refused, nothing asked of the token
        t.expect(r"error: '99' is not a number from 2 to 16[\s\S]*choice>$")
        t.send("19")
        t.expect(r"Key backup \(1-2, Enter: back\)>$")
        t.send("1")
        t.expect(r"custodian shares \(Enter: default\):$")
        t.send("3")
        t.expect(r"shares needed to recover \(Enter: default\):$")
        t.send("2")
        t.expect(r"token SO PIN:$")
        t.send(so_pin)
        m = t.expect(r"request #(\d+) \(keys-backup\) is pending[\s\S]*choice>$")
        rid = m.group(1)
        assert not list(media.glob("keys-*"))  # nothing before the second administrator approves
        number = json.loads(a.cli("approve", rid, "--json", officer="admin2").stdout)["result"]["backup"]
        t.send("19")
        t.expect(r"Key backup \(1-2, Enter: back\)>$")
        t.send("2")
        t.expect(r"key backup number \(Enter: default\):$")
        t.send(str(number))
        t.expect(r"key backup sha256 [0-9a-f]{32}\.\.\.[\s\S]*keys: [\s\S]*\(any 2 recover\): one to each custodian[\s\S]*choice>$")
        t.key("C-d")
        assert t.wait_dead() == 0
    finally:
        t.close()
    folders = list(media.glob("keys-*"))
    assert len(folders) == 1
    blob = list(folders[0].glob("keys-backup-*.json"))
    shares = sorted(folders[0].glob("custodian-*/key-share-*.txt"))
    assert len(blob) == 1 and len(shares) == 3 and {p.parent.name for p in shares} == {"custodian-1", "custodian-2", "custodian-3"}
    doc = json.loads(blob[0].read_bytes())
    assert {e["label"] for e in doc["keys"]} >= {"issuing", "root"} and doc["mac"]


def _ceremony_step(a: Appliance, tmp_path: Path) -> None:
    """The same backup as a ceremony step: both administrators witness it and approve its dual control."""
    d = tmp_path / "ceremony"
    d.mkdir()
    (d / "so-pin").write_bytes((a.home / "softhsm" / "so-pin").read_bytes())
    (d / "keys.toml").write_text("""
[ceremony]
name = "key-backup-2027"
officers = ["admin", "admin2", "oper"]
quorum = 2
output = "out"

[[step]]
action = "keys-backup"
shares = 3
threshold = 2
so-pin-file = "so-pin"
out = "keys-backup.json"
""")
    r = a.cli("ceremony", "run", str(d / "keys.toml"), input=answers(["admin", "admin2"], [["yes", "yes"]]),
              check=False, timeout=300, officer="admin")
    assert r.returncode == 0 and b"outcome: complete" in r.stdout, r.stdout.decode() + r.stderr.decode()
    tr = json.loads((d / "out" / "transcript.json").read_text())
    step = tr["steps"][0]
    assert step["dual_control"]["approved_by"] == ["admin", "admin2"]
    assert step["result"]["custodian_files"] == [f"custodian-{i}/key-share-{i}.txt" for i in (1, 2, 3)]
    assert json.loads((d / "out" / "keys-backup.json").read_bytes())["threshold"] == 2
    assert b"transcript intact" in a.cli("ceremony", "verify", str(d / "out" / "transcript.json")).stdout


def test_recovery_drill(appliance_factory, homes, tmp_path, src_path):
    _drill(appliance_factory, homes, tmp_path, src_path, forged=False)


@pytest.mark.slow
def test_recovery_drill_with_a_forged_share(appliance_factory, homes, tmp_path, src_path):
    """The same drill, plus the backup made again as a witnessed ceremony step, and a share whose data
    was changed and whose checksums were recomputed: the CIS refuses it after the new home and token
    were made, and the CLI removes them again."""
    _drill(appliance_factory, homes, tmp_path, src_path, forged=True)

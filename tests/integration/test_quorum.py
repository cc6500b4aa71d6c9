"""Quorum activation on the real appliance: the token PIN split into 5 shares at init, any 3 activate,
2 do not, a typo is caught by the share's checksum, and wrong PINs are counted by our own lockout."""

from __future__ import annotations

import json


def _shares(d) -> list[str]:
    return [(d / f"share-{i}.txt").read_text().strip() for i in range(1, 6)]


def test_quorum_activation_m_shares_work_m_minus_1_fail(appliance_factory, tmp_path):
    d = tmp_path / "shares"
    a = appliance_factory(start=False, init_args=("--shares", "5", "--threshold", "3", "--shares-dir", str(d)))
    assert not (a.home / "pin").exists(), "with a quorum nobody may hold the PIN in a file"
    shares = _shares(d)
    assert all(s.startswith("DJS1-") for s in shares) and len(set(shares)) == 5
    a.start_inactive()

    r = a.cli("activate", "--share", shares[0], "--share", shares[3], check=False)
    assert r.returncode == 1 and b"3 shares are needed, 2 given" in r.stderr
    typo = shares[1][:12] + ("0" if shares[1][12] != "0" else "1") + shares[1][13:]
    r = a.cli("activate", "--share", shares[0], "--share", typo, "--share", shares[4], check=False)
    assert r.returncode == 1 and b"checksum" in r.stderr
    r = a.cli("activate", "--share", shares[0], "--share", shares[0], "--share", shares[4], check=False)
    assert r.returncode == 1 and b"twice" in r.stderr
    assert b'"activated": false' in a.cli("status", "--json").stdout
    # a wrong PIN is counted (SoftHSM never locks: we do), and recorded once the CMDB opens
    bad = tmp_path / "bad-pin"
    bad.write_text("not-the-pin\n")
    r = a.cli("activate", "--pin-file", str(bad), check=False)
    assert r.returncode == 1 and b"PIN" in r.stderr

    r = a.cli("activate", "--share", shares[4], "--share", shares[1], "--share", shares[2])
    assert b"activated" in r.stdout
    assert b'"activated": true' in a.cli("status", "--json").stdout
    recs = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x]
    acts = [(r["action"], r["outcome"]) for r in recs if r["action"] == "activate"]
    assert acts[-2:] == [("activate", "refused"), ("activate", "ok")]
    assert "quorum" in [r for r in recs if r["action"] == "activate"][-1]["actor"]
    # the CA works after a quorum activation
    assert b"root" in a.cli("ca", "list").stdout


def test_wrong_pins_lock_activation(appliance_factory, tmp_path):
    d = tmp_path / "shares"
    a = appliance_factory(start=False, config="[activation]\nmax-failures = 2\nlockout-minutes = 5\n",
                          init_args=("--shares", "3", "--threshold", "2", "--shares-dir", str(d)))
    shares = [(d / f"share-{i}.txt").read_text().strip() for i in range(1, 4)]
    a.start_inactive()
    bad = tmp_path / "bad-pin"
    bad.write_text("not-the-pin\n")
    for _ in range(2):
        r = a.cli("activate", "--pin-file", str(bad), check=False)
        assert r.returncode == 1 and b"wrong PIN" in r.stderr
    # locked: even the right quorum is refused now, before the token is tried
    r = a.cli("activate", "--share", shares[0], "--share", shares[2], check=False)
    assert r.returncode == 1 and b"activation locked after 2 failed attempts" in r.stderr
    assert b'"activated": false' in a.cli("status", "--json").stdout

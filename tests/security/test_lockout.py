"""Failed logins: one answer whatever was wrong, the peer slowed down instead of the account locked,
break-glass unlock by a quorum of activation shares, and Argon2id runs bounded (the Factory's memory)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from appliance.client import AdminClient, ClientError
from appliance.factory.officers import ARGON, KDF_CONCURRENCY, REFUSED
from appliance.ipc import schema as S
from policy import shamir
from tests.conftest import PASSWORD, Appliance, make_ceremony

from .peers import UNLOCKS, logins, outcomes, run

SLOWED = "login refused: too many failed logins from this user"


@pytest.fixture(scope="module")
def quorum(src_path):
    """One appliance for the module, activated by 2 of 3 PIN shares (no PIN file)."""
    base = Path(tempfile.mkdtemp(prefix="donjon-test-"))
    os.chmod(base, 0o711)
    a = Appliance(base / "home0", src_path)
    try:
        a.init(make_ceremony(base / "ceremony.toml"), extra=("--shares", "3", "--threshold", "2", "--shares-dir", str(base / "shares")))
        shares = [(base / "shares" / f"share-{i}.txt").read_text().strip() for i in (1, 2, 3)]
        a.start_inactive()
        a.cli("activate", "--share", shares[0], "--share", shares[2])
        yield a, shares
    finally:
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


def audit(a) -> list[dict]:
    return [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"seq"' in x and b'"checkpoint"' not in x]


def test_same_answer_and_a_stranger_slows_down_only_himself(quorum):
    a, _ = quorum
    admin_session = a.session("admin")
    # A member of donjon-admin with no officer account: an unknown name, then the administrator's name.
    plan = [("ghost", "wrong password 0")] + [("admin", f"wrong password {i}") for i in range(1, 5)]
    plan += [("admin", PASSWORD), ("ghost", "wrong password 6")]  # the right password, while slowed down
    got = outcomes(logins(a, plan, stranger=True))
    assert got[:5] == [REFUSED] * 5  # unknown name and wrong password: the same answer, word for word
    assert all(g.startswith(SLOWED) and "try again in 1 s" in g for g in got[5:])  # the same for any name
    assert not any("locked" in g or "admin" in g for g in got)
    # The administrator, from another peer (root), is not locked out: the stranger only slowed himself.
    with AdminClient(str(a.home), timeout=30) as c:
        c.login("admin", PASSWORD)
        listed = c.call(S.AOfficerList)["officers"]
    assert [o["locked"] for o in listed if o["name"] == "admin"] == [False]
    time.sleep(1.2)  # the wait after 5 failures is 1 s; the next failure doubles it
    got = outcomes(logins(a, [("admin", "wrong password 7"), ("admin", PASSWORD)], stranger=True))
    assert got[0] == REFUSED and got[1].startswith(SLOWED) and "try again in 2 s" in got[1]
    recs = [r for r in audit(a) if r["action"] == "login" and "uid=65534" in r["actor"]]
    assert [r["outcome"] for r in recs] == ["refused"] * 8  # 6 failures, 2 slow-down windows (4 attempts)
    assert "no such officer" in recs[0]["detail"]
    slowed = [r for r in recs if "slowed down" in r["detail"]]
    assert len(slowed) == 2  # one record per wait window, not one per attempt
    assert not [r for r in audit(a) if r["action"] == "lockout"]
    AdminClient(str(a.home), timeout=30, session=admin_session).close()  # sessions are untouched


def test_break_glass_unlock_by_a_quorum_of_shares(quorum):
    a, shares = quorum
    # Forged shares (a valid split of another PIN), then a single share: refused, one line, audited.
    forged = shamir.split_pin("not-the-pin-at-all", 2, 3, secrets.token_bytes)
    r = a.cli("officer", "unlock", "admin", "--share", forged[0], "--share", forged[1], check=False)
    assert r.returncode == 1 and b"do not give this appliance's activation PIN" in r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    r = a.cli("officer", "unlock", "admin", "--share", shares[1], check=False)
    assert r.returncode == 1 and b"2 shares are needed" in r.stderr and b"Traceback" not in r.stderr
    # A stranger trying forged sets is stopped after 5 (activation.max-failures) and blocks only himself.
    got = outcomes(run(a, UNLOCKS, [("admin", forged[:2])] * 6, stranger=True))
    assert all("do not give this appliance's activation PIN" in g for g in got[:5])
    assert got[5].startswith("refused after 5 bad share sets from this user: try again in")
    # Every administrator forgot the password: the custodians' quorum unlocks and sets a new one.
    new = "break glass password 2026"
    r = a.cli("officer", "unlock", "admin", "--share", shares[1], "--share", shares[0], "--new-password",
              env={"DONJON_NEW_PASSWORD": new})
    assert b"unlocked by a quorum of shares; new password set" in r.stdout
    with AdminClient(str(a.home), timeout=30) as c, pytest.raises(ClientError) as e:
        c.login("admin", PASSWORD)
    assert str(e.value) == REFUSED
    with AdminClient(str(a.home), timeout=30) as c:
        c.login("admin", new)
        c.call(S.AOfficerPasswd, name="admin", password=PASSWORD)  # back to the module's password
    recs = [r for r in audit(a) if r["action"] == "officer-unlock"]
    assert [(r["outcome"], r["actor"].split()[0]) for r in recs] == [("refused", "break-glass:quorum-of-shares")] * 8 + [
        ("ok", "break-glass:quorum-of-shares")]
    assert sum("uid=65534" in r["actor"] for r in recs) == 6
    assert "new password set" in recs[-1]["detail"] and "activation PIN" in recs[0]["detail"]


def _rss(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) * 1024 for k, v in (x.split(":", 1) for x in lines) if k in ("VmRSS", "VmHWM")}


def test_60_concurrent_failed_logins_keep_the_factory_small(quorum):
    a, _ = quorum
    factory = a.role_pids()["factory"]
    before = _rss(factory)
    # 60 at once, two peers: 6 root processes x 8 and 2 stranger processes x 6 (within the admin
    # socket's caps of 16 per process and 16 per non-root user, so that all 60 reach a login).
    procs = [logins(a, [(f"n{i}-{j}", f"wrong password {j}") for j in range(8 if i < 6 else 6)], stranger=i >= 6, parallel=True)
             for i in range(8)]
    got = [o for p in procs for o in outcomes(p)]
    after = _rss(factory)
    assert len(got) == 60
    assert all(g == REFUSED or g.startswith(SLOWED) for g in got), set(got)
    kdf = ARGON["m"] * 1024
    # The bound: the resident size before, plus KDF_CONCURRENCY Argon2id buffers (46 MiB each), plus 64 MiB.
    bound = before["VmRSS"] + KDF_CONCURRENCY * kdf + (64 << 20)
    print(f"factory RSS before {before['VmRSS'] >> 20} MiB (peak so far {before['VmHWM'] >> 20} MiB); "
          f"peak after 60 concurrent failed logins {after['VmHWM'] >> 20} MiB; bound {bound >> 20} MiB")
    assert after["VmHWM"] <= bound
    # And the Factory is alive: status is public, asked with no officer login (this user's logins are
    # slowed down by the 48 failures it just made).
    assert b"activated: yes" in a.cli("status", officer="nobody").stdout

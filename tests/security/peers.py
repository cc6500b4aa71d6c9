"""Run admin-socket clients as another member of the admin group (nobody + donjon-admin): a second peer."""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
from pathlib import Path

PY = str(Path(sys.prefix).resolve() / "bin" / "python")  # the venv itself, not the worktree's symlink to it

# Logins in threads, all at once; prints one outcome per attempt ("ok" or the one-line refusal).
LOGINS = r'''
import json, sys, threading
from appliance.client import AdminClient, ClientError
home, plan = sys.argv[1], json.loads(sys.argv[2])
out = [None] * len(plan)
def one(i, name, pw):
    try:
        with AdminClient(home, timeout=120) as c:
            c.login(name, pw)
            out[i] = "ok"
    except ClientError as e:
        out[i] = str(e)
ts = [threading.Thread(target=one, args=(i, n, p)) for i, (n, p) in enumerate(plan)]
if sys.argv[3] == "parallel":
    [t.start() for t in ts]; [t.join() for t in ts]
else:
    for t in ts:
        t.start(); t.join()
print(json.dumps(out))
'''


# Break-glass unlocks, one after the other; prints one outcome per attempt.
UNLOCKS = r'''
import json, sys
from appliance.client import AdminClient, ClientError
from appliance.ipc import schema as S
home, plan = sys.argv[1], json.loads(sys.argv[2])
out = []
for name, shares in plan:
    try:
        with AdminClient(home, timeout=120) as c:
            c.call(S.AOfficerUnlockShares, name=name, shares=shares)
            out.append("ok")
    except ClientError as e:
        out.append(str(e))
print(json.dumps(out))
'''


# Open up to N admin connections that complete the handshake and then idle; report how many the
# appliance kept, hold them until stdin closes.
HOLD = r'''
import json, sys
from appliance.client import AdminClient, ClientError
home, n = sys.argv[1], json.loads(sys.argv[2])
held, refused = [], 0
for _ in range(n):
    try:
        held.append(AdminClient(home, timeout=30))
    except ClientError:
        refused += 1
print(json.dumps([len(held), refused]), flush=True)
sys.stdin.read()
'''


def run(a, code: str, plan: list, stranger: bool, *extra: str) -> subprocess.Popen:
    """Start `code` (LOGINS, UNLOCKS) on `plan` in one process: as root, or as the stranger (nobody in donjon-admin)."""
    env = {"PYTHONPATH": a.src, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    kw = {}
    if stranger:
        kw = {"user": 65534, "group": 65534, "extra_groups": [grp.getgrnam("donjon-admin").gr_gid]}
    return subprocess.Popen([PY, "-c", code, str(a.home), json.dumps(plan), *extra],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", **kw)


def logins(a, plan: list[tuple[str, str]], stranger: bool, parallel: bool = False) -> subprocess.Popen:
    """Start the login attempts in `plan` from one process, one after the other or all at once."""
    return run(a, LOGINS, plan, stranger, "parallel" if parallel else "serial")


def outcomes(p: subprocess.Popen) -> list[str]:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err.decode()
    return json.loads(out)

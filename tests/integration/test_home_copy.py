"""The suite's shortcut is sound: a state folder `donjon init` made once, copied per test, is a whole
appliance of its own (token, CMDB, keys) that shares nothing with the folder it was copied from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.conftest import PATH_FILES, Appliance, copy_home, make_csr


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with its owner, mode and content hash."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = f"{st.st_uid}:{st.st_gid}:{st.st_mode:o}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def test_copied_home_is_a_whole_independent_appliance(appliance_factory, homes, tmp_path):
    a = appliance_factory(start=False)  # copied from the session's template of the default variant
    template = a.template
    assert template is not None and template != a.home
    before = _tree(template)
    # What init writes, and how the copy holds it: the same files, owners and modes; only the SoftHSM2
    # configurations differ, each naming the copy's own token folder.
    assert {"cmdb/cmdb.sqlite", "cmdb/cmdb.key", "softhsm/so-pin", "pin", "donjon.toml", *PATH_FILES} <= before.keys()
    assert any(k.startswith("softhsm/tokens/") and k.endswith(".object") for k in before)
    copy = _tree(a.home)
    assert {k: v for k, v in copy.items() if k not in PATH_FILES} == {k: v for k, v in before.items() if k not in PATH_FILES}
    for rel in PATH_FILES:
        tokendir = (a.home / rel).read_text().split("directories.tokendir = ", 1)[1].split("\n", 1)[0]
        assert tokendir == str((a.home / rel).parent / "tokens")
        assert copy[rel].split(":")[:3] == before[rel].split(":")[:3]  # owner and mode kept

    # It runs: activation (token login, CMDB key unwrapped), issuance, a new CA key in the token.
    a.start()
    csr = make_csr(tmp_path, "copy", san="DNS:copy.example.org")
    a.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(tmp_path / "copy.pem"))
    assert [c["profile"] for c in json.loads(a.cli("cert", "list", "--json").stdout)].count("tls-server") == 1
    a.cli("ca", "create", "extra", "--parent", "root", "--subject", "CN=Extra CA,O=Donjon Test,C=FR", "--key-type", "p256", "--path-length", "0")
    assert b"audit chain intact" in a.cli("audit", "verify").stdout
    a.stop()
    assert _tree(template) == before  # the template's token and CMDB were not touched

    # A second copy of the same template knows nothing of what the first one did.
    b = Appliance(homes / "second", a.src)
    copy_home(template, b.home)
    try:
        b.start()
        assert {c["name"] for c in json.loads(b.cli("ca", "list", "--json").stdout)} == {"root", "issuing"}
        assert [c for c in json.loads(b.cli("cert", "list", "--json").stdout) if c["profile"] == "tls-server"] == []
        assert b"audit chain intact" in b.cli("audit", "verify").stdout
    finally:
        b.stop()

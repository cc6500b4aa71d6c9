"""The import rules of ARCHITECTURE.md §4, checked on the source (every import, at any depth of a module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("appliance", "hsm", "policy")
# Each role's own code; roles share only appliance/ipc/ and policy/ (appliance/roles.py dispatches to them).
ROLES = {
    "cis": ("hsm.cis",),
    "factory": ("appliance.factory",),
    "ocsp": ("appliance.ocsp",),
    "distribution": ("appliance.distribution",),
    "snmp": ("appliance.snmp",),
    "gateway": ("appliance.gateway",),
    "kgs": ("appliance.kgs",),
}
# The faces: admin clients of the Factory's socket, never the Factory or the CIS themselves.
FACES = ("appliance.cli", "appliance.adminops", "appliance.client", "appliance.console")
# Who may load a PKCS#11 module: hsm/ (the CIS and the token code), and the endpoint through
# hsm.token for its own token of delegated responder keys.
# The KGS drives card tokens (C_InitToken, PIN and PUK changes, key injection) and its own token of
# archival keys: work hsm.token (one CA-key login session) does not model. It never sees the CA token's PIN.
PKCS11_OK = ("hsm", "appliance.kgs")
# The gateway too, for its own token (its TLS key; ARCHITECTURE.md §1: "its TLS/RA/CMP-protection keys in a
# token of its own"), never the CA token.
HSM_TOKEN_OK = ("hsm", "appliance.ocsp", "appliance.gateway")
APSW_OK = ("appliance.factory",)


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module `path` imports: import statements anywhere in it (relative ones resolved) and
    importlib.import_module / __import__ calls with a literal name."""
    mod = _module_name(root, path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")  # `from pkg import module`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ("__import__", "import_module"):
                out.add(node.args[0].value)
    return out


def violations(root: Path) -> list[str]:
    """One line per import that breaks a rule, for the packages under `root`."""
    found: list[str] = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mod = _module_name(root, path)
            role = next((r for r, ps in ROLES.items() if _under(mod, ps)), None)
            for imp in sorted(imports_of(root, path)):
                where = f"{path.relative_to(root)}: imports {imp}"
                if _under(mod, ("policy",)) and _under(imp, ("appliance", "hsm")):
                    found.append(f"{where} (policy/ is pure: nothing from appliance/ or hsm/)")
                other = next((r for r, ps in ROLES.items() if r != role and _under(imp, ps)), None)
                if role and other:
                    found.append(f"{where} (role {role} imports role {other}: roles share only ipc/ and policy/)")
                if _under(mod, FACES) and _under(imp, ROLES["factory"] + ROLES["cis"]):
                    found.append(f"{where} (the CLI and console are clients of the admin socket)")
                if _under(imp, ("pkcs11",)) and not _under(mod, PKCS11_OK):
                    found.append(f"{where} (only hsm/ loads PKCS#11)")
                if _under(imp, ("hsm.token",)) and not _under(mod, HSM_TOKEN_OK):
                    found.append(f"{where} (only hsm/ and the endpoint's own token use hsm.token)")
                if _under(imp, ("apsw",)) and not _under(mod, APSW_OK):
                    found.append(f"{where} (only appliance/factory/ opens the CMDB)")
    return found


def test_the_tree_keeps_the_import_rules():
    assert violations(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.parent.name not in PACKAGES:
            (p.parent / "__init__.py").touch()
        p.write_text(text)
    return tmp_path


@pytest.mark.parametrize("rel,text,rule", [
    ("policy/x.py", "from appliance.ipc import schema\n", "policy/ is pure"),
    ("policy/x.py", "def f():\n    import hsm.token\n", "policy/ is pure"),  # lazily, inside a function
    ("appliance/ocsp/x.py", "from appliance.factory.cmdb import Cmdb\n", "role ocsp imports role factory"),
    ("appliance/factory/x.py", "from hsm import cis\n", "role factory imports role cis"),
    ("appliance/distribution/sub/x.py", "from ...ocsp import store\n", "role distribution imports role ocsp"),  # relative
    ("appliance/console/x.py", "import importlib\nimportlib.import_module('appliance.factory.service')\n", "clients of the admin socket"),
    ("appliance/factory/x.py", "import pkcs11\n", "only hsm/ loads PKCS#11"),
    ("appliance/snmp/x.py", "from hsm.token import Token\n", "only hsm/ and the endpoint's own token"),
    ("appliance/ocsp/x.py", "apsw = __import__('apsw')\n", "only appliance/factory/ opens the CMDB"),
    ("appliance/supervisor.py", "from apsw import Connection\n", "only appliance/factory/ opens the CMDB"),
])
def test_the_checker_catches_a_forbidden_import(tmp_path, rel, text, rule):
    found = violations(_tree(tmp_path, {rel: text}))
    assert found and all(f.startswith(f"{rel}: ") for f in found) and any(rule in f for f in found), found


def test_the_checker_lets_allowed_imports_through(tmp_path):
    root = _tree(tmp_path, {
        "policy/x.py": "from policy import y\nimport cryptography\n",
        "appliance/factory/x.py": "import apsw\nfrom appliance.ipc import schema\nfrom .cmdb import Cmdb\nfrom policy import certs\n",
        "appliance/ocsp/x.py": "from hsm.token import Token\nfrom . import store\n",
        "appliance/roles.py": "def f():\n    from appliance.factory.main import main\n    from hsm.cis import main as m\n",
        "hsm/token.py": "import pkcs11\n",
        "hsm/cis.py": "from hsm.token import Token\nfrom policy import lint\n",
    })
    assert violations(root) == []

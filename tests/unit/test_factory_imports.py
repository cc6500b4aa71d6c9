"""No import circles in appliance/factory/: every import counts, TYPE_CHECKING and deferred ones too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import appliance.factory

PKG = Path(appliance.factory.__file__).parent


def _is_module(name: str) -> bool:
    """A module of appliance/factory/, or one of its subpackages (store/)."""
    return (PKG / (name + ".py")).exists() or (PKG / name / "__init__.py").exists()


def factory_imports(src: str, module: str, package: str = "appliance.factory") -> set[str]:
    """The appliance.factory modules (a subpackage counts as one) that `module` imports anywhere in `src`
    (relative or absolute); `package` is the one `src` sits in, for its relative imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("appliance.factory.") and _is_module(n.split(".")[2]):
                out.add(n.split(".")[2])
    out.discard(module)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def factory_graph() -> dict[str, set[str]]:
    g = {p.stem: factory_imports(p.read_text(), p.stem) for p in PKG.glob("*.py") if p.stem != "__init__"}
    for d in PKG.iterdir():  # a subpackage is one node: the union of its files' imports
        if (d / "__init__.py").exists():
            g[d.name] = set().union(*(factory_imports(f.read_text(), d.name, f"appliance.factory.{d.name}") for f in d.rglob("*.py")))
    return g


def test_the_checker_sees_every_kind_of_import():
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .service import Factory\n"
           "def f():\n    from appliance.factory import store\n    import appliance.factory.cmdb\n")
    assert factory_imports(src, "x") == {"service", "store", "cmdb"}
    # inside the store package, `..` is appliance.factory and `.` the package itself
    assert factory_imports("from ..cmdb import Cmdb\nfrom ._base import one\n", "store", "appliance.factory.store") == {"cmdb"}
    # A circle planted the way the old helpers had it (ocsp -> service under TYPE_CHECKING) is found.
    g = factory_graph()
    assert find_cycle(g) is None
    g["store"] = g["store"] | factory_imports("if TYPE_CHECKING:\n    from .service import Factory\n", "store")
    cycle = find_cycle(g)
    assert cycle is not None and cycle[0] == cycle[-1] and {"store", "service"} <= set(cycle)


def test_no_import_cycle_in_factory():
    cycle = find_cycle(factory_graph())
    assert cycle is None, "import cycle in appliance/factory: " + " -> ".join(cycle or [])


def test_each_factory_module_imports_alone():
    # Each in a fresh interpreter, so that no module only works because another was imported first.
    # A subpackage once: importing any of its modules runs its __init__, which imports them all.
    mods = sorted(m for m in factory_graph())
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import appliance.factory.{m}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in mods}
    for m, p in procs.items():
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"appliance.factory.{m} does not import alone: {err.strip().splitlines()[-1:]}"

"""No import circles in appliance/factory/: every import counts, TYPE_CHECKING and deferred ones too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import appliance.factory

PKG = Path(appliance.factory.__file__).parent


def factory_imports(src: str, module: str) -> set[str]:
    """The appliance.factory modules that `module` imports anywhere in `src` (relative or absolute)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = "appliance.factory" if node.level == 1 else "appliance"
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("appliance.factory.") and (PKG / (n.split(".")[2] + ".py")).exists():
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
    return {p.stem: factory_imports(p.read_text(), p.stem) for p in PKG.glob("*.py") if p.stem != "__init__"}


def test_the_checker_sees_every_kind_of_import():
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .service import Factory\n"
           "def f():\n    from appliance.factory import store\n    import appliance.factory.cmdb\n")
    assert factory_imports(src, "x") == {"service", "store", "cmdb"}
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
    mods = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import appliance.factory.{m}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in mods}
    for m, p in procs.items():
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"appliance.factory.{m} does not import alone: {err.strip().splitlines()[-1:]}"

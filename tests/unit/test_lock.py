"""requirements.lock installs anywhere: exact pins of registry packages only, never a path or an editable line."""

from __future__ import annotations

import re
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"
PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+")  # the same pattern as .ci/install-elsewhere


def bad_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not PIN.fullmatch(line)]


def test_lock_holds_only_exact_pins():
    assert bad_lines(LOCK.read_text()) == []
    # the line that broke installs from any other checkout path is refused, as are paths and URLs
    assert bad_lines("trio==0.35.0\n-e /home/dev/donjon\n./donjon\ndonjon @ file:///x\npytest>=9\n") == [
        "-e /home/dev/donjon", "./donjon", "donjon @ file:///x", "pytest>=9"]
    # the tools CI runs are pinned like the rest
    assert {"ruff", "mypy", "pytest", "rust-just"} <= {line.split("==")[0] for line in LOCK.read_text().splitlines()}

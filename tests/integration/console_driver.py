"""A real tmux (80x24) driving a real terminal program: send keys, wait for text, read the screen history."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path


class Tmux:
    def __init__(self, folder: Path, argv: list[str], env: dict[str, str] | None = None):
        self.sock = str(folder / "tmux.sock")
        self.name = "donjon"
        cmd = shlex.join(["env", *(f"{k}={v}" for k, v in (env or {}).items()), *argv])
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-s", self.name, cmd)
        self.tmux("set-option", "-t", self.name, "remain-on-exit", "on")
        self.tmux("set-option", "-t", self.name, "history-limit", "20000")
        self.mark = 0

    def tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {r.stderr.decode()}")
        return r.stdout.decode()

    def history(self) -> str:
        """Everything the program wrote, with tmux's own wrapping undone (-J): the program's real lines."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def send(self, text: str, enter: bool = True) -> None:
        h = self.history().rstrip("\n")
        self.mark = h.rfind("\n") + 1  # the current (prompt) line onwards is new
        if text:
            self.tmux("send-keys", "-t", self.name, "-l", "--", text)
        if enter:
            self.tmux("send-keys", "-t", self.name, "Enter")

    def key(self, name: str) -> None:
        h = self.history().rstrip("\n")
        self.mark = h.rfind("\n") + 1
        self.tmux("send-keys", "-t", self.name, name)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait until `pattern` appears in what came after the last send."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.history()[self.mark:].rstrip())  # tmux drops trailing blanks
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {pattern!r}; screen:\n{self.screen()}\nhistory:\n{self.history()[-3000:]}")

    def dead(self) -> tuple[bool, int | None]:
        out = self.tmux("display-message", "-p", "-t", self.name, "#{pane_dead} #{pane_dead_status}").split()
        return out[0] == "1", int(out[1]) if len(out) > 1 and out[1] else None

    def wait_dead(self, timeout: float = 30) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead, status = self.dead()
            if dead:
                return status
            time.sleep(0.1)
        raise AssertionError(f"the program did not exit; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=30)

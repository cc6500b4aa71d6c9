"""Line-mode terminal I/O for an 80x24 dumb terminal: plain text, wrapped lines, paged output, no escapes."""

from __future__ import annotations

import os
import sys
import textwrap

WIDTH = 79  # one less than the screen: a dumb terminal may wrap on the 80th column
HEIGHT = 24
MAX_INPUT = 512


def clean(s: str) -> str:
    """Replace control characters (escape sequences in a certificate subject must not reach the terminal)."""
    return "".join(ch if (ch == "\t" or " " <= ch < "\x7f" or ch > "\x9f") else "?" for ch in s).replace("\t", " ")


class Term:
    def __init__(self, inp=None, out=None):
        self.inp = inp or sys.stdin
        self.out = out or sys.stdout
        self.tty = self.inp.isatty()

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def wrap(self, line: str) -> list[str]:
        line = clean(line)
        if len(line) <= WIDTH:
            return [line]
        return textwrap.wrap(line, WIDTH, subsequent_indent="  ", break_long_words=True, break_on_hyphens=False) or [""]

    def say(self, *lines: str) -> None:
        for text in lines:
            for ln in str(text).split("\n"):
                for w in self.wrap(ln):
                    self._write(w + "\n")

    def page(self, lines: list[str]) -> None:
        """Show long output a screen at a time (Enter: next screen, q: stop)."""
        rows = [w for ln in lines for part in str(ln).split("\n") for w in self.wrap(part)]
        per = HEIGHT - 2
        for i in range(0, len(rows), per):
            for r in rows[i:i + per]:
                self._write(r + "\n")
            if i + per < len(rows):
                if self.ask("-- more: Enter for the next page, q to stop -- ").strip().lower() == "q":
                    return
        if len(rows) > HEIGHT - 10:  # the menu that follows would scroll the end of it away
            self.ask("-- end: Enter for the menu -- ")

    def ask(self, prompt: str) -> str:
        """One line of input; EOFError at end of input (Ctrl-D). Over-long lines are refused, not cut."""
        self._write(clean(prompt))
        line = self.inp.readline()
        if line == "":
            self._write("\n")
            raise EOFError
        line = line.rstrip("\r\n")
        if len(line) > MAX_INPUT:
            self.say(f"input longer than {MAX_INPUT} characters: ignored")
            return ""
        return line

    def secret(self, prompt: str) -> str:
        """Like ask(), without echo when the input is a terminal."""
        if not self.tty:
            return self.ask(prompt)
        import termios
        fd = self.inp.fileno()
        old = termios.tcgetattr(fd)
        new = termios.tcgetattr(fd)
        new[3] &= ~termios.ECHO
        try:
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
            return self.ask(prompt)
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            self._write("\n")

    def confirm(self, prompt: str) -> bool:
        return self.ask(prompt + " [yes/no] ").strip().lower() in ("y", "yes")

    def choose(self, prompt: str, options: list[str]) -> int | None:
        """A numbered pick; None for an empty answer (back). Anything else than a listed number is refused."""
        for i, o in enumerate(options, 1):
            self.say(f"{i:>3}  {o}")
        a = self.ask(f"{prompt} (1-{len(options)}, Enter: back)> ").strip()
        if not a:
            return None
        if a.isdigit() and 1 <= int(a) <= len(options):
            return int(a) - 1
        self.say("unknown command")
        return None


def term_name() -> str:
    return os.environ.get("TERM", "dumb")

"""`donjon ssh-shell`, sshd's ForceCommand: the console, or one allow-listed CLI command from SSH_ORIGINAL_COMMAND."""

from __future__ import annotations

import os
import re
import shlex
import sys

from appliance.adminops import HEX_RE, NAME_RE

_INT = re.compile(r"^[0-9]{1,9}$")


def _name(v: str) -> bool:
    return bool(NAME_RE.match(v)) and ".." not in v


def _serial(v: str) -> bool:
    return bool(HEX_RE.match(v))


def _int(v: str) -> bool:
    return bool(_INT.match(v))


# words -> (positional validators, {option: validator}, {flags}). Read-only commands whose output goes
# to the SSH channel: nothing here writes a file (no --out) or names another state folder (no --home).
ALLOWED: dict[tuple[str, ...], tuple[list, dict, set]] = {
    ("status",): ([], {}, {"--json"}),
    ("version",): ([], {}, set()),
    ("ca", "list"): ([], {}, {"--json"}),
    ("ca", "show"): ([_name], {}, set()),
    ("ca", "export"): ([_name], {}, {"--chain"}),
    ("cert", "list"): ([], {"--ca": _name, "--limit": _int}, {"--json"}),
    ("cert", "show"): ([_serial], {"--ca": _name}, set()),
    ("cert", "export"): ([_serial], {"--ca": _name}, set()),
    ("crl", "export"): ([], {"--ca": _name, "--number": _int}, set()),
    ("ocsp", "status"): ([], {}, {"--json"}),
    ("ocsp", "tenant", "list"): ([], {}, {"--json"}),
    ("dist", "status"): ([], {}, {"--json"}),
    ("dist", "list"): ([], {"--state": lambda v: v in ("pending", "parked", "done"), "--rule": _name, "--limit": _int}, {"--json"}),
    ("audit", "verify"): ([], {}, set()),
    ("audit", "export"): ([], {}, set()),
}


def parse(command: str) -> list[str] | None:
    """The CLI arguments for an allowed one-shot command, or None. No shell: shlex words, then the allow-list."""
    if len(command) > 1024:
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for n in (3, 2, 1):
        key = tuple(words[:n])
        if key not in ALLOWED:
            continue
        positional, options, flags = ALLOWED[key]
        rest, pos, seen = words[n:], [], set()
        i = 0
        while i < len(rest):
            w = rest[i]
            if w in flags and w not in seen:
                seen.add(w)
            elif w in options and w not in seen and i + 1 < len(rest) and options[w](rest[i + 1]):
                seen.add(w)
                i += 1
            elif not w.startswith("-") and len(pos) < len(positional) and positional[len(pos)](w):
                pos.append(w)
            else:
                return None
            i += 1
        if len(pos) != len(positional):
            return None
        for opt in options:  # options the CLI requires
            if opt == "--ca" and key in (("cert", "show"), ("cert", "export"), ("crl", "export")) and opt not in seen:
                return None
        return list(words)
    return None


PUBLIC = {("status",), ("version",)}  # answered without an officer session, as on the admin socket


def one_shot(home: str, command: str) -> int:
    argv = parse(command)
    if argv is None:
        print("unknown command", file=sys.stderr)
        print("allowed: " + ", ".join(" ".join(k) for k in ALLOWED) + " (or no command: the menu)", file=sys.stderr)
        return 2
    from appliance.adminops import OpError
    from appliance.cli import app
    from appliance.console.session import Session, ask_login, refusal
    from appliance.console.term import Term
    session = None
    if tuple(argv[:2]) not in PUBLIC and tuple(argv[:1]) not in PUBLIC:
        # The officer logs in on the channel itself (prompts on stderr, so that stdout carries only
        # the command's output): `printf 'NAME\nPASSWORD\n\n' | ssh admin@host 'ca list'`.
        t = Term(sys.stdin, sys.stderr)
        try:
            officer = t.ask("officer: ").strip()
            client, token = ask_login(t, home, officer)
        except EOFError:
            print("login refused: no officer given", file=sys.stderr)
            return 1
        except OpError as e:
            print(refusal(e), file=sys.stderr)
            return 1
        session = Session(home, officer, client, token)
        if token:
            os.environ["DONJON_SESSION"] = token  # the CLI command resumes this session (appliance.client.connect)
    try:
        app(args=argv if argv[0] == "version" else [*argv, "--home", home], prog_name="donjon", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        if session is not None:
            session.close()
    return 0


def main(home: str) -> int:
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    if command is not None and command.strip():
        return one_shot(home, command)
    from appliance.console.menu import run
    return run(home, ssh=True)

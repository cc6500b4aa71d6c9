"""The CLI's surface: every command that prints data offers --json; URLs printed for the endpoint."""

from __future__ import annotations

import typer.main

from appliance import adminops as ops
from appliance.cli import app

# Commands that print no data document: they write a file or PEM/DER/JSON Lines as their output, print a
# verdict, run interactively, or only act.
NO_DATA = {
    "audit cert", "audit export", "audit verify", "ca export", "cert export", "crl export", "crl generate",
    "ocsp tenant csr", "ceremony run", "ceremony verify", "config set", "console", "ssh-shell", "init", "run",
    "logout", "shutdown", "officer passwd", "officer remove", "officer unlock", "ocsp tenant remove", "version",
    "enrol-secret revoke", "clock set", "officer ssh-key", "kgs letter", "kgs letters", "kgs personalise", "kgs recover", "kgs recover-take", "kgs reprint",
    "keys recover",
    "clock apply",  # the image's clock helper: one line on the socket systemd hands it
}


def _commands(cmd, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def test_every_command_that_prints_data_has_json():
    cmds = dict(_commands(typer.main.get_command(app)))
    assert NO_DATA <= set(cmds), NO_DATA - set(cmds)
    missing = sorted(p for p, c in cmds.items() if p not in NO_DATA and not any("--json" in x.opts for x in c.params))
    assert missing == []


def test_endpoint_url_from_the_listen_setting():
    assert ops.endpoint_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert ops.endpoint_url("0.0.0.0:80") == "http://127.0.0.1:80"
    assert ops.endpoint_url("[::]:8081") == "http://[::1]:8081"
    assert ops.endpoint_url("ocsp.example.org:8080") == "http://ocsp.example.org:8080"

"""The console's validators without an appliance: SSH allow-list, settings edits, media names, terminal, PDF, ceremony files."""

from __future__ import annotations

import io
import subprocess

import pytest

from appliance import adminops as ops
from appliance import config as C
from appliance.console import ceremony as CER
from appliance.console import media as M
from appliance.console.pdf import text_pdf
from appliance.console.sshshell import parse
from appliance.console.term import Term


@pytest.mark.parametrize("cmd", ["status", "status --json", "ca list", "ca show root", "ca export issuing --chain",
                                 "cert list --ca issuing --limit 5", "cert show --ca issuing 0a1b", "crl export --ca root",
                                 "ocsp status", "audit verify", "version", "  status  ", "dist status", "dist status --json",
                                 "dist list --state pending --rule directory", "ocsp tenant list --json"])
def test_ssh_allowed(cmd):
    assert parse(cmd) is not None


@pytest.mark.parametrize("cmd", ["", "rm -rf /", "status; rm -rf /", "status && id", "status | sh", "status $(id)",
                                 "status `id`", "sh", "/bin/sh", "bash -c id", "status --home /etc", "status --json --json",
                                 "ca export root --out /tmp/x", "ca show ../../etc", "ca show -x", "cert show --ca issuing zz",
                                 "cert show 0a", "crl export", "cert list --ca", "cert list --ca '$(id)'", "'unbalanced",
                                 "revoke --ca issuing 0a", "issue --ca issuing --profile p --csr /etc/passwd",
                                 "login --officer x", "status\nid", "x" * 2000, "dist retry", "dist list --state all",
                                 "ocsp tenant add x --ca-cert /etc/passwd", "ocsp tenant crl x /etc/passwd", "dist list --rule ../x"])
def test_ssh_refused(cmd):
    assert parse(cmd) is None


def test_settings_edit_keeps_comments_and_validates(tmp_path):
    cfg = tmp_path / "donjon.toml"
    cfg.write_text('# mine\n[ocsp]\nlisten = "127.0.0.1:0"   # where\nworkers = 1\n')
    assert "takes effect" in C.write_setting(str(tmp_path), "ocsp.listen", "0.0.0.0:8080")
    assert cfg.read_text() == '# mine\n[ocsp]\nlisten = "0.0.0.0:8080"  # where\nworkers = 1\n'
    C.write_setting(str(tmp_path), "endpoint.base-url", "http://ca.example.org/pki")
    C.write_setting(str(tmp_path), "crl.validity-hours", "48")
    shown = dict(ops.settings_show(str(tmp_path)))
    assert shown["endpoint.base-url"] == "http://ca.example.org/pki" and shown["crl.validity-hours"] == "48"
    before = cfg.read_text()
    for key, value in [("ocsp.listen", '1.2.3.4:80"\n[hsm]\nmodule = "/tmp/evil.so'), ("ocsp.listen", "host:99999"),
                       ("ocsp.listen", "$(id):80"), ("endpoint.base-url", "javascript:alert(1)"),
                       ("endpoint.base-url", 'http://x/"a'), ("crl.validity-hours", "0"), ("crl.validity-hours", "1e9"),
                       ("hsm.module", "/tmp/evil.so"), ("console.media", "../../etc")]:
        with pytest.raises(C.ConfigError):
            C.write_setting(str(tmp_path), key, value)
    assert cfg.read_text() == before


def test_media_names(tmp_path):
    media = str(tmp_path)
    for bad in ("../../etc/passwd", "/etc/passwd", "a/b", ".hidden", "a..b", "$(id)", "; sh", "", "x" * 200, "a\nb"):
        with pytest.raises(ops.OpError):
            M.path_in(media, bad)
    assert M.path_in(media, "www.csr") == str(tmp_path / "www.csr")
    M.write_to_media(media, "out.pem", b"x")
    with pytest.raises(ops.OpError, match="refusing to overwrite"):
        M.write_to_media(media, "out.pem", b"y")
    (tmp_path / "link.csr").symlink_to("/etc/passwd")
    assert M.list_files(media, (".csr",)) == []
    with pytest.raises(ops.OpError):
        M.read(media, "link.csr")


def test_term_wraps_and_cleans():
    out = io.StringIO()
    t = Term(io.StringIO("a\n" + "b" * 600 + "\n"), out)
    t.say("x" * 200, "subject \x1b[2J\x1b]0;pwned\x07 CN=evil\x9b")
    lines = out.getvalue().splitlines()
    assert all(len(ln) <= 80 for ln in lines) and len(lines) >= 4
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue() and "\x9b" not in out.getvalue()
    assert t.ask("> ") == "a"
    assert t.ask("> ") == ""  # over-long: refused, not cut
    with pytest.raises(EOFError):
        t.ask("> ")


def test_pdf_is_read_by_pdftotext(tmp_path):
    lines = ["Title (with parentheses) and \\ backslash", "é latin-1", "日本 not latin-1"] + [f"line {i}" for i in range(150)]
    p = tmp_path / "t.pdf"
    p.write_bytes(text_pdf(lines, "t"))
    r = subprocess.run(["pdftotext", "-layout", str(p), "-"], capture_output=True, check=True)
    text = r.stdout.decode()
    assert r.stderr == b""
    assert "Title (with parentheses) and \\ backslash" in text and "é latin-1" in text and "line 149" in text
    assert subprocess.run(["pdfinfo", str(p)], capture_output=True, check=True).stdout.decode().count("Pages:           3")


@pytest.mark.parametrize("body,error", [
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=2\noutput="o"\n[[step]]\naction="crl"\nca="root"\nout="x"\n', "quorum 2 is more"),
    ('[ceremony]\nname="c"\nofficers=["a","a"]\nquorum=1\noutput="o"\n[[step]]\naction="crl"\nca="root"\nout="x"\n', "listed twice"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="o"\n[[step]]\naction="crl"\nca="root"\nout="x"\n'
     '[[step]]\naction="crl"\nca="issuing"\nout="x"\n', "named twice"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="o"\n[[step]]\naction="create-ca"\nname="n"\nout="x"\n', "needs parent"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="o"\n[[step]]\naction="crl-presign"\nca="root"\nout="x"\n', "needs periods, every"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="o"\n[[step]]\naction="crl-presign"\nca="root"\nperiods=2\nevery="30x"\n'
     'out="x"\n', "step 1: period '30x'"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="../o"\n[[step]]\naction="crl"\nca="root"\nout="x"\n', "output"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="o"\n[[step]]\naction="crl"\nca="root"\nout="/etc/x"\n', "out"),
    ('[ceremony]\nname="c"\nofficers=["a"]\nquorum=1\noutput="o"\n[[step]]\naction="shell"\nout="x"\n', "action"),
])
def test_ceremony_file_errors(tmp_path, body, error):
    p = tmp_path / "c.toml"
    p.write_text(body)
    with pytest.raises(ops.OpError, match=error):
        CER.load(str(p))

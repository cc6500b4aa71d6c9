"""Root never follows a link a role planted in its own folder, and the CA token's PIN reaches the CIS
only (issue 12 items 1 and 14): the attack replayed in appliance mode, as the role users."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance import privdrop, safefs
from tests.conftest import Appliance, make_ceremony

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def app(src_path, tmp_path_factory):
    """An appliance whose role users planted links in their folders between `donjon init` (which
    handed the folders over) and the first `donjon run`."""
    base = Path(tempfile.mkdtemp(prefix="donjon-links-"))
    os.chmod(base, 0o711)
    a = Appliance(base / "home", src_path)
    a.init(make_ceremony(tmp_path_factory.mktemp("links") / "ceremony.toml"))
    home, tok = a.home, a.home / "ocsp-token"
    # Root's files outside every role folder: one the roles cannot write, one they may hard-link
    # (fs.protected_hardlinks lets a user link a file it can read and write).
    victim = base / "victim.conf"
    victim.write_text("root's own file\n")
    os.chmod(victim, 0o644)
    shared = base / "shared.txt"
    shared.write_text("root's shared file\n")
    os.chmod(shared, 0o666)
    a.watched = {p: fingerprint(p) for p in (victim, shared, home / "pin", home / "donjon.toml")}
    a.old_token_pin = (tok / "pin").read_bytes()
    # `pin` removed (the token is made again), softhsm2.conf linked to a root file, hard links and
    # links in every role folder, and one file root made there that the fix-up must still re-own.
    as_user("donjon-ocsp", "rm", "-f", str(tok / "pin"))
    as_user("donjon-ocsp", "ln", "-sfn", str(victim), str(tok / "softhsm2.conf"))
    as_user("donjon-ocsp", "ln", str(shared), str(tok / "hard"))
    token_dir = next(p for p in (tok / "tokens").iterdir() if p.is_dir())
    token_file = next(token_dir.iterdir())
    as_user("donjon-ocsp", "ln", "-sfn", str(victim), str(token_file))  # a token file swapped for a link
    as_user("donjon-ocsp", "ln", str(shared), str(token_dir / "hard.object"))
    as_user("donjon-ocsp", "ln", "-s", str(victim), str(home / "ocsp" / "evil"))
    as_user("donjon-factory", "ln", "-s", "/etc", str(home / "cmdb" / "etc"))
    as_user("donjon-factory", "ln", str(shared), str(home / "cmdb" / "hard"))
    as_user("donjon-cis", "ln", "-s", str(victim), str(home / "softhsm" / "evil"))
    (home / "cmdb" / "fresh").write_text("made by root: the fix-up at start still re-owns it\n")
    a.start()
    yield a
    a.stop()
    shutil.rmtree(base, ignore_errors=True)


def as_user(user: str, *argv: str) -> None:
    subprocess.run(["runuser", "-u", user, "--", *argv], check=True, capture_output=True)


def fingerprint(p: Path) -> tuple:
    st = os.lstat(p)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), p.read_bytes())


def test_links_planted_before_a_start_are_never_followed(app):
    home, tok = app.home, app.home / "ocsp-token"
    ocsp = pwd.getpwnam("donjon-ocsp")
    log = app.log.read_text()
    for p, fp in app.watched.items():
        assert fingerprint(p) == fp, p
    assert os.lstat("/etc").st_uid == 0
    assert os.lstat(home / "cmdb" / "fresh").st_uid == pwd.getpwnam("donjon-factory").pw_uid
    assert not os.path.islink(tok / "softhsm2.conf") and os.lstat(tok / "softhsm2.conf").st_uid == ocsp.pw_uid
    new_pin = (tok / "pin").read_bytes()
    assert os.lstat(tok / "pin").st_uid == ocsp.pw_uid and new_pin not in ((home / "pin").read_bytes(), app.old_token_pin)
    assert "not re-owned in cmdb/: hard: 3 links" in log
    assert "no live signing" not in log and "wrong PIN" not in log  # the endpoint logged into its new token


def test_no_capability_left_in_any_role_and_the_token_folder_is_private(app):
    pids = app.role_pids()
    assert set(pids) >= {"cis", "cis.1", "factory", "ocsp", "distribution"}
    for role, pid in pids.items():
        c = privdrop.current_confinement(pid)
        assert c["cap_bnd"] == 0 and c["cap_eff"] == 0, (role, c)
    assert stat.S_IMODE(os.stat(app.home / "softhsm").st_mode) == 0o700
    assert os.stat(app.home / "softhsm").st_uid == pwd.getpwnam("donjon-cis").pw_uid


def test_the_ca_pin_never_reaches_the_endpoint(app, capfd):
    """What the endpoint is handed is Supervisor.ocsp_pin: checked with the supervisor's own start
    preparation, run here on the stopped appliance's folder."""
    from appliance import config as C
    from appliance.supervisor import Supervisor
    assert app.stop() == 0
    home, tok = app.home, app.home / "ocsp-token"
    ca_pin = (home / "pin").read_text().strip()
    ocsp = pwd.getpwnam("donjon-ocsp")
    before = (tok / "pin").read_text().strip()

    def prepared() -> Supervisor:
        sup = Supervisor(str(home), C.load(str(home)))
        sup.prepare()
        sup.keep_ca_pin_from_endpoint(ca_pin)
        return sup

    # `pin` linked to the CA token's PIN file: refused, never read; a new token with its own PIN.
    as_user("donjon-ocsp", "ln", "-sfn", str(home / "pin"), str(tok / "pin"))
    sup = prepared()
    assert f"refused {tok / 'pin'}: {tok / 'pin'} is or goes through a symbolic link" in capfd.readouterr().err
    assert sup.ocsp_pin not in (None, ca_pin, before)
    assert not os.path.islink(tok / "pin") and (tok / "pin").read_text().strip() == sup.ocsp_pin
    assert fingerprint(home / "pin") == app.watched[home / "pin"]

    # A plain file of the role's holding the CA PIN (it could only have stolen or guessed it): not handed over.
    (tok / "pin").unlink()
    (tok / "pin").write_text(ca_pin + "\n")
    os.chown(tok / "pin", ocsp.pw_uid, ocsp.pw_gid)
    sup = prepared()
    assert sup.ocsp_pin is None
    assert "the endpoint's token PIN is the CA token's PIN: not handed to the endpoint" in capfd.readouterr().err


def test_safefs_refuses_links_and_escapes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    os.symlink(tmp_path / "d", tmp_path / "link")
    os.symlink("f", tmp_path / "d" / "fl")
    fd = safefs.open_root(str(tmp_path))
    try:
        assert safefs.read_file(fd, "d/f", 10) == b"x"
        assert safefs.read_file(fd, "missing", 10) is None
        for bad in ("link/f", "d/fl"):
            with pytest.raises(safefs.UnsafePath, match="symbolic link"):
                safefs.read_file(fd, bad, 10)
        for bad in ("../x", "/etc/passwd", "d/../../x"):
            with pytest.raises(OSError):
                safefs.open_beneath(fd, bad, os.O_RDONLY)
        with pytest.raises(safefs.UnsafePath, match="larger"):
            safefs.read_file(fd, "d/f", 0)
        os.link(tmp_path / "d" / "f", tmp_path / "d" / "hard")  # a file with two names is not the folder's alone
        with pytest.raises(safefs.UnsafePath, match="has 2 links"):
            safefs.read_file(fd, "d/hard", 10)
        os.unlink(tmp_path / "d" / "hard")
        with pytest.raises(safefs.UnsafePath, match="owned by uid"):
            safefs.read_file(fd, "d/f", 10, owners=(12345,))
        dfd = safefs.open_dir(fd, "d")
        try:
            safefs.write_file(dfd, "fl", b"new")  # replaces the link itself, never writes through it
        finally:
            os.close(dfd)
        assert (tmp_path / "d" / "f").read_text() == "x" and (tmp_path / "d" / "fl").read_bytes() == b"new"
        assert not (tmp_path / "d" / "fl").is_symlink()
    finally:
        os.close(fd)

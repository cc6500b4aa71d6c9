"""Creating a state folder (DONJON_HOME): configuration, PIN files and the embedded SoftHSM2 token."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

from appliance import config as C
from appliance.supervisor import Layout, child_env


class HomeError(Exception):
    pass


def _write_secret(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def read_pin(path: str) -> str:
    try:
        return C.read_secret(path, "the PIN file")
    except C.ConfigError as e:
        raise HomeError(str(e)) from None


def create(home: str, pin: str | None = None, write_pin: bool = True) -> tuple[C.Config, str]:
    """Make the folder, the default donjon.toml and (embedded mode) a fresh SoftHSM2 token.

    Refuses a folder that already holds a CMDB: a CA is never overwritten.
    Returns the configuration and the user PIN (from the argument, or new and written to `pin`).
    """
    home = os.path.abspath(home)
    L = Layout(home)
    if os.path.exists(os.path.join(L.cmdb, "cmdb.sqlite")) or os.path.exists(os.path.join(L.cmdb, "cmdb.key")):
        raise HomeError(f"{home} already holds a CA: refusing to overwrite it")
    os.makedirs(home, mode=0o711, exist_ok=True)
    cfg_path = os.path.join(home, "donjon.toml")
    if not os.path.exists(cfg_path):
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)  # secrets are files of their own
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(C.DEFAULT_TOML)
    cfg = C.load(home)
    if not cfg.hsm.embedded:
        if pin is None:
            raise HomeError("a vendor HSM needs the token PIN: pass --pin-file")
        return cfg, pin
    if os.path.exists(L.softhsm):
        raise HomeError(f"{L.softhsm} exists: remove it to create a new embedded token")
    if shutil.which("softhsm2-util") is None:
        raise HomeError("softhsm2-util is not installed (apt-get install softhsm2)")
    os.mkdir(L.softhsm, mode=0o700)  # makedirs would give the parent 0777 & ~umask (0755): the token folder is the CIS's alone
    os.chmod(L.softhsm, 0o700)  # whatever the umask
    os.mkdir(os.path.join(L.softhsm, "tokens"), mode=0o700)
    with open(L.softhsm_conf, "w", encoding="utf-8") as f:
        f.write(f"directories.tokendir = {L.softhsm}/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")
    user_pin = pin or secrets.token_urlsafe(18)
    so_pin = secrets.token_urlsafe(18)
    if cfg.hsm.pin_file and write_pin:  # not with a quorum: nobody alone may hold the PIN
        pin_path = os.path.join(home, cfg.hsm.pin_file)
        if not os.path.exists(pin_path):
            _write_secret(pin_path, user_pin)
    _write_secret(os.path.join(L.softhsm, "so-pin"), so_pin)
    r = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", cfg.hsm.token, "--so-pin", so_pin, "--pin", user_pin],
                       env=child_env({"SOFTHSM2_CONF": L.softhsm_conf}), capture_output=True, text=True)
    if r.returncode != 0:
        raise HomeError(f"softhsm2-util failed: {r.stderr.strip() or r.stdout.strip()}")
    return cfg, user_pin

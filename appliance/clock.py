"""The supervisor's root-only chores for the Factory: the clock (shown, set) and the officers' SSH keys (authorized_keys)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

CLOCK_KEY = "clock"  # the ConfigSet key the Factory sends once dual control approved a time (never a donjon.toml key)
FAKE_ENV = "DONJON_TEST_CLOCK_SETTER_FAKE"  # TEST MODE ONLY: a file where a FAKE setter records the call instead
MIN_EPOCH = 1_700_000_000  # 2023-11: a time before it is a typo, never a correction
MAX_EPOCH = 4_102_444_800  # 2100


def hardware_clock() -> str:
    """The RTC's date and time (the kernel shows them in UTC), or why there is none."""
    try:
        with open("/sys/class/rtc/rtc0/date", encoding="ascii") as d, open("/sys/class/rtc/rtc0/time", encoding="ascii") as t:
            return f"{d.read(16).strip()} {t.read(16).strip()} UTC"
    except OSError:
        return "no hardware clock (rtc0) on this machine"


def show() -> list[str]:
    return [f"system clock:   {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC",
            f"hardware clock: {hardware_clock()}"]


def check_epoch(value: str) -> int:
    if not value.isdigit() or len(value) > 12:
        raise ValueError(f"{value[:20]!r} is not a time in seconds since 1970")
    t = int(value)
    if not MIN_EPOCH <= t <= MAX_EPOCH:
        raise ValueError("the time must be between 2023-11-14 and 2100-01-01 UTC")
    return t


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def set_clock(epoch: int) -> str:
    """Set the system clock (clock_settime) and then the hardware clock (hwclock --systohc). In test mode
    the FAKE setter named by DONJON_TEST_CLOCK_SETTER_FAKE records the call instead: tests never change
    the machine's clock."""
    fake = os.environ.get(FAKE_ENV)
    if fake:
        with open(fake, "a", encoding="ascii") as f:
            f.write(f"{epoch}\n")
        return f"FAKE clock setter (test mode): recorded {epoch}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.clock_settime(0, ctypes.byref(_Timespec(epoch, 0))) != 0:  # CLOCK_REALTIME
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    r = subprocess.run(["hwclock", "--systohc", "--utc"], capture_output=True, timeout=30, check=False)
    return "system clock set" + ("; hardware clock set" if r.returncode == 0 else "; hardware clock NOT set (hwclock failed)")


SSH_KEYS_ENV = "DONJON_SSH_KEYS_DIR"  # the image: /var/lib/donjon-ssh/authorized_keys (sshd's AuthorizedKeysFile); default HOME/ssh/authorized_keys
SSH_ACCOUNT = "admin"  # the one SSH account (group donjon-admin); the officer then logs in to the console


def write_ssh_key(home: str, officer: str, key: str | None) -> str:
    """Replace the officer's line in the SSH account's authorized_keys (root-owned, 0644, written atomically)."""
    import re

    from policy.errors import PolicyError
    from policy.sshkey import OFFICER_TAG, authorized_line
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", officer):
        raise ValueError("invalid officer name")
    try:
        line = authorized_line(officer, key) if key is not None else None
    except PolicyError as e:
        raise ValueError(str(e)) from None
    folder = os.environ.get(SSH_KEYS_ENV) or os.path.join(home, "ssh", "authorized_keys")
    os.makedirs(folder, mode=0o755, exist_ok=True)
    path = os.path.join(folder, SSH_ACCOUNT)
    try:
        with open(path, encoding="ascii") as f:
            lines = [x for x in f.read().splitlines() if x.strip()]
    except FileNotFoundError:
        lines = []
    kept = [x for x in lines if not x.endswith(" " + OFFICER_TAG + officer)]
    if line is None and len(kept) == len(lines):
        raise ValueError(f"officer {officer!r} has no SSH key enrolled")
    if line is not None:
        kept.append(line)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("".join(x + "\n" for x in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return f"{'enrolled' if line else 'removed'} the SSH key of {officer} ({len(kept)} key(s) for {SSH_ACCOUNT})"

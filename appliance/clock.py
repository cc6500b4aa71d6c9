"""The supervisor's root-only chores for the Factory: the clock (shown, set) and the officers' SSH keys (authorized_keys)."""

from __future__ import annotations

import ctypes
import os
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


HELPER_SOCKET_ENV = "DONJON_CLOCK_SOCKET"  # the image: /run/donjon-clock.sock (donjon-clock.socket)
REPLY_MAX = 512


def set_clock(epoch: int) -> str:
    """Set the system clock and then the hardware clock. In the image the supervisor holds no
    CAP_SYS_TIME (ProtectClock): it asks the one process that does, `donjon clock-apply`, started per
    request by donjon-clock.socket (root-only socket). Elsewhere (developer machine, as root) it sets
    them itself. In test mode the FAKE setter named by DONJON_TEST_CLOCK_SETTER_FAKE records the call
    instead: tests never change the machine's clock."""
    fake = os.environ.get(FAKE_ENV)
    if fake:
        with open(fake, "a", encoding="ascii") as f:
            f.write(f"{epoch}\n")
        return f"FAKE clock setter (test mode): recorded {epoch}"
    helper = os.environ.get(HELPER_SOCKET_ENV)
    if helper:
        return _ask_helper(helper, epoch)
    return apply(epoch)


def _ask_helper(path: str, epoch: int) -> str:
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)  # the helper is the frozen bundle, started on demand (slow on an emulated guest)
        s.connect(path)
        s.sendall(f"{epoch}\n".encode())
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) <= REPLY_MAX:
            chunk = s.recv(REPLY_MAX)
            if not chunk:
                break
            reply += chunk
    text = reply[:REPLY_MAX].decode("ascii", "replace").strip()
    if not text.startswith("ok: "):
        raise OSError(0, text.removeprefix("error: ") or "the clock helper gave no answer")
    return text.removeprefix("ok: ")


# <linux/rtc.h>: struct rtc_time is nine ints; RTC_SET_TIME = _IOW('p', 0x0a, struct rtc_time).
_RTC_SET_TIME = 0x4024700A


def apply(epoch: int) -> str:
    """clock_settime(CLOCK_REALTIME), then the RTC (kept in UTC) through RTC_SET_TIME: both need CAP_SYS_TIME."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.clock_settime(0, ctypes.byref(_Timespec(epoch, 0))) != 0:  # CLOCK_REALTIME
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    import fcntl
    import struct
    t = time.gmtime(epoch)
    try:
        fd = os.open("/dev/rtc0", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"system clock set; hardware clock NOT set (/dev/rtc0: {e.strerror})"
    try:
        fcntl.ioctl(fd, _RTC_SET_TIME, struct.pack("9i", t.tm_sec, t.tm_min, t.tm_hour, t.tm_mday, t.tm_mon - 1,
                                                   t.tm_year - 1900, 0, 0, 0))
    except OSError as e:
        return f"system clock set; hardware clock NOT set (RTC_SET_TIME: {e.strerror})"
    finally:
        os.close(fd)
    return "system clock set; hardware clock set"


def helper_main(stdin, stdout) -> int:
    """`donjon clock-apply`: one request on the socket systemd accepted (stdin/stdout), one line back.
    Runs with CAP_SYS_TIME and nothing else (donjon-clock@.service); the root-only socket means only
    the supervisor reaches it, which asks only once the Factory checked dual control and audited."""
    line = stdin.buffer.readline(32).decode("ascii", "replace").strip()
    try:
        msg = apply(check_epoch(line))
    except (ValueError, OSError) as e:
        stdout.write(f"error: {e}\n"[:REPLY_MAX])
        stdout.flush()
        return 1
    stdout.write(f"ok: {msg}\n")
    stdout.flush()
    return 0


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

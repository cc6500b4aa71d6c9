"""Removable media: a USB mass-storage device (vfat or ext4) mounted on demand at the media folder, unmounted after each use."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.adminops import OpError

FILESYSTEMS = ("vfat", "ext4")
# nodev, nosuid, noexec whatever the stick says; vfat files owned by root and private to it.
OPTIONS = {"vfat": "nodev,nosuid,noexec,uid=0,gid=0,umask=077,flush", "ext4": "nodev,nosuid,noexec"}
TEST_DEVICE_ENV = "DONJON_TEST_MEDIA_DEVICE"  # TEST MODE ONLY: a loop device standing in for the USB stick
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


@dataclass(frozen=True)
class Device:
    path: str
    fstype: str
    size: str
    label: str


def devices() -> list[Device]:
    """USB mass-storage filesystems (vfat or ext4) present now; in test mode, the loop device named by the test."""
    r = subprocess.run(["lsblk", "-J", "-p", "-o", "PATH,TRAN,RM,TYPE,FSTYPE,SIZE,LABEL,MOUNTPOINT"], capture_output=True,
                       env=ENV, timeout=30, check=False)
    out: list[Device] = []
    test = os.environ.get(TEST_DEVICE_ENV)
    try:
        tree = json.loads(r.stdout or b"{}").get("blockdevices", [])
    except ValueError:
        tree = []

    def walk(nodes, usb: bool) -> None:
        for n in nodes:
            on_usb = usb or n.get("tran") == "usb"
            path = n.get("path") or ""
            if (on_usb or path == test) and not n.get("mountpoint"):
                fstype = n.get("fstype") or _probe(path)  # lsblk knows it from udev; without udev, read the superblock
                if fstype in FILESYSTEMS:
                    out.append(Device(path, fstype, n.get("size") or "?", n.get("label") or ""))
            walk(n.get("children") or [], on_usb)
    walk(tree, False)
    return out


def _probe(path: str) -> str:
    r = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", path], capture_output=True, env=ENV, timeout=30, check=False)
    return r.stdout.decode(errors="replace").strip()


@contextlib.contextmanager
def mounted(dev: Device, where: str) -> Iterator[str]:
    """Mount `dev` at `where` (the one fixed media folder) for one use, and unmount it after, whatever happens."""
    if dev.fstype not in FILESYSTEMS:
        raise OpError(f"{dev.path}: {dev.fstype or 'no'} filesystem: only vfat or ext4 media are accepted")
    if os.geteuid() != 0:
        raise OpError("removable media are mounted at the local console only (tty1 or the serial line)")
    os.makedirs(where, mode=0o700, exist_ok=True)
    if os.path.ismount(where):
        raise OpError(f"something is already mounted at {where}: refusing to stack media")
    r = subprocess.run(["mount", "-t", dev.fstype, "-o", OPTIONS[dev.fstype], dev.path, where], capture_output=True,
                       env=ENV, timeout=60, check=False)
    if r.returncode != 0:
        raise OpError(f"{dev.path}: cannot mount it ({r.stderr.decode(errors='replace').strip().splitlines()[-1:] or ['?']})"[:200])
    try:
        yield where
    finally:
        subprocess.run(["sync"], env=ENV, timeout=60, check=False)
        u = subprocess.run(["umount", where], capture_output=True, env=ENV, timeout=60, check=False)
        if u.returncode != 0 or os.path.ismount(where):
            raise OpError(f"{where}: the media could not be unmounted: do not remove it; try again")


def mount_options(where: str) -> str:
    """The options the kernel applied to what is mounted at `where` (shown to the officers: nodev, nosuid, noexec)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            rows = [ln.split() for ln in f]
    except OSError:
        return "?"
    opts = [r[3] for r in rows if len(r) >= 4 and r[1] == where]
    return opts[-1] if opts else "?"

"""policy/sshkey.py: one strict OpenSSH public key line, never an authorized_keys option; a bounded fuzz."""

from __future__ import annotations

import base64
import random
import struct
import subprocess

import pytest

from policy.errors import PolicyError
from policy.sshkey import authorized_line, check_key


def _blob(*parts: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(p)) + p for p in parts)).decode()


def test_keys_accepted_and_refused(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "a b c", "-f", str(tmp_path / "k")], check=True)
    pub = (tmp_path / "k.pub").read_text()
    kt, b64, fp = check_key(pub)
    assert kt == "ssh-ed25519" and fp in subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True,
                                                          text=True).stdout
    assert authorized_line("alice", pub) == f"restrict,pty ssh-ed25519 {b64} donjon-officer:alice"
    bad = {
        'command="/bin/sh" ' + pub: "format",
        "no-pty " + pub: "format",
        pub.strip() + "\nssh-ed25519 AAAA": "format",
        "ssh-dss " + _blob(b"ssh-dss", b"x", b"y", b"z", b"w"): "type",
        "ssh-ed25519 " + _blob(b"ssh-rsa", b"\x01" * 32): "format",  # type inside differs
        "ssh-ed25519 " + _blob(b"ssh-ed25519", b"\x01" * 31): "format",
        "ssh-rsa " + _blob(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xff" * 256): "size",  # 2048 bits
        "ssh-ed25519 !!!!": "format",
        "": "format",
    }
    for line, rule in bad.items():
        with pytest.raises(PolicyError) as e:
            check_key(line)
        assert e.value.rule == rule, (line[:40], str(e.value))
    rng = random.Random(5)
    data = pub.encode()
    for _ in range(500):  # bounded mutation fuzz: accepted whole or a PolicyError, nothing else
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            check_key(b.decode("latin-1"))
        except PolicyError:
            pass

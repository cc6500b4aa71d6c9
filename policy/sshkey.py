"""An officer's SSH public key as one authorized_keys line: parsed strictly, never an option smuggled in."""

from __future__ import annotations

import base64
import hashlib
import re
import struct

from policy.errors import PolicyError

MAX_LINE = 4096
TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
MIN_RSA_BITS = 3072
_LINE = re.compile(r"^(?P<type>[a-z0-9-]{1,40}) (?P<b64>[A-Za-z0-9+/]{1,3000}={0,2})(?: [\x21-\x7e ]{0,200})?$")
OFFICER_TAG = "donjon-officer:"


def _strings(blob: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise ValueError
        (n,) = struct.unpack(">I", blob[i:i + 4])
        if n > len(blob) - i - 4:
            raise ValueError
        out.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return out


def check_key(text: str) -> tuple[str, str, str]:
    """(type, base64 blob, SHA256 fingerprint) of one OpenSSH public key line ("TYPE BASE64 [comment]")."""
    line = text.strip()
    if len(line) > MAX_LINE or "\n" in line or "\r" in line:
        raise PolicyError("ssh key", "format", "one OpenSSH public key line (TYPE BASE64 [comment]), nothing else")
    m = _LINE.match(line)
    if not m:
        raise PolicyError("ssh key", "format", "not an OpenSSH public key line (TYPE BASE64 [comment]); options are not accepted")
    kt, b64 = m.group("type"), m.group("b64")
    if kt not in TYPES:
        raise PolicyError("ssh key", "type", f"key type {kt!r} refused (one of: {', '.join(TYPES)})")
    try:
        blob = base64.b64decode(b64, validate=True)
        parts = _strings(blob)
    except ValueError:
        raise PolicyError("ssh key", "format", "the key's base64 data is malformed") from None
    if not parts or parts[0] != kt.encode():
        raise PolicyError("ssh key", "format", "the key's data does not match its type")
    if kt == "ssh-ed25519" and (len(parts) != 2 or len(parts[1]) != 32):
        raise PolicyError("ssh key", "format", "not an Ed25519 public key")
    if kt == "ssh-rsa":
        if len(parts) != 3:
            raise PolicyError("ssh key", "format", "not an RSA public key")
        bits = int.from_bytes(parts[2], "big").bit_length()
        if bits < MIN_RSA_BITS:
            raise PolicyError("ssh key", "size", f"RSA key of {bits} bits: at least {MIN_RSA_BITS}")
    if kt.startswith("ecdsa") and (len(parts) != 3 or parts[1] != kt.rsplit("-", 1)[1].encode()):
        raise PolicyError("ssh key", "format", "not an ECDSA public key of its curve")
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return kt, b64, fp


def authorized_line(officer: str, text: str) -> str:
    """The authorized_keys line for an officer's key: `restrict` (no forwarding, pty allowed by sshd_config's
    ForceCommand only), the key, and the officer's tag as its comment (how a removal finds it)."""
    kt, b64, _ = check_key(text)
    return f"restrict,pty {kt} {b64} {OFFICER_TAG}{officer}"

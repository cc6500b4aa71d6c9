"""The Factory's domain error and log line: a leaf module every factory module may import."""

from __future__ import annotations

import os
import sys


class FactoryError(Exception):
    """One domain error for the Factory; `code` maps to Refused.code at the admin edge."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _log(msg: str) -> None:
    print(f"donjon[factory {os.getpid()}]: {msg}", file=sys.stderr, flush=True)

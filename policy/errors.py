"""The one error type every policy refusal is reported with."""

from __future__ import annotations


class PolicyError(Exception):
    """One domain error for every policy refusal.

    ``field`` names what was refused (``"csr"``, ``"public_key"``, ``"subject.CN"``, ``"san"``,
    ``"validity"``, ``"profile tls-server: kind"`` ...), ``rule`` is a short stable identifier of the
    rule that refused it (tests and the edge mapping key on it), ``message`` is for humans. None of
    it ever contains exception text from a parser: it may cross a trust boundary.
    """

    def __init__(self, field: str, rule: str, message: str):
        super().__init__(field, rule, message)
        self.field = field
        self.rule = rule
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message} [{self.rule}]"

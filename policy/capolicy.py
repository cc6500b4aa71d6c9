"""Which profiles a CA may issue: the policy kept beside the CA key in the token, and its check."""

from __future__ import annotations

import json
from dataclasses import dataclass

from policy.errors import PolicyError
from policy.profiles import KINDS, Profile

# Defaults by the CA's place in the hierarchy: a root certifies CAs (through the guarded CA
# operations) and its own delegated responder; an issuing CA certifies everything but CAs.
ROOT_KINDS = ("sub-ca", "ocsp-responder")
ISSUING_KINDS = ("end-entity", "ocsp-responder")
_MAX = 64


@dataclass(frozen=True)
class CaPolicy:
    kinds: tuple[str, ...]  # every profile of these kinds
    profiles: tuple[str, ...]  # and these profiles by name

    def allows(self, profile: Profile) -> bool:
        return profile.kind in self.kinds or profile.name in self.profiles

    def describe(self) -> str:
        parts = [f"kind {k}" for k in self.kinds] + list(self.profiles)
        return ", ".join(parts) or "nothing"

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "kinds": list(self.kinds), "profiles": list(self.profiles)},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> CaPolicy:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != 1 or set(doc) != {"v", "kinds", "profiles"}:
                raise ValueError
            kinds, profiles = doc["kinds"], doc["profiles"]
            if not all(isinstance(x, list) and len(x) <= _MAX and all(isinstance(s, str) for s in x) for x in (kinds, profiles)):
                raise ValueError
        except (ValueError, TypeError):
            raise PolicyError("CA policy", "format", "the CA's issuance policy is malformed: refusing to guess") from None
        if any(k not in KINDS for k in kinds):
            raise PolicyError("CA policy", "format", "the CA's issuance policy names an unknown profile kind")
        return cls(tuple(kinds), tuple(profiles))


def default_policy(root: bool) -> CaPolicy:
    return CaPolicy(ROOT_KINDS if root else ISSUING_KINDS, ())


def named_policy(names: tuple[str, ...] | list[str], known: dict[str, Profile]) -> CaPolicy:
    """An explicit list of profile names (each must exist; root-ca is never issued under a CA)."""
    if not names:
        raise PolicyError("allowed profiles", "empty", "name at least one profile the CA may issue")
    if len(names) > _MAX:
        raise PolicyError("allowed profiles", "size", f"at most {_MAX} profiles")
    for n in names:
        p = known.get(n)
        if p is None:
            raise PolicyError("allowed profiles", "known", f"unknown profile {n!r}")
        if p.kind == "root-ca":
            raise PolicyError("allowed profiles", "root", f"{n!r} is a self-signed root profile: no CA issues it")
    return CaPolicy((), tuple(sorted(set(names))))

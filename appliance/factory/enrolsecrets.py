"""EST and SCEP enrolment secrets: officers make them, the gateway presents them, the Factory spends them."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policy.profiles import CA_KINDS

from .errors import FactoryError
from .store import Store

PROTOCOLS = ("est", "scep")
MAX_TTL = 90 * 86400
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _digest(secret: str) -> bytes:
    # The secrets are 120 random bits made here, never chosen by people: one SHA-256 is enough, and
    # it lets a SCEP challenge (which comes without a name) be found by its digest alone.
    return hashlib.sha256(b"donjon-enrol-secret\0" + secret.encode()).digest()


@dataclass(frozen=True)
class Grant:
    """What a spent secret admits: the CA and profile the officer chose, and its reference for the audit."""

    ref: str
    protocol: str
    ca: str
    profile: str
    approval: bool = False  # enrolments under it wait for an officer's decision
    created_by: str = ""

    @property
    def credential(self) -> str:
        return f"{self.protocol}-secret:{self.ref}"


class EnrolSecrets:
    def __init__(self, store: Store, profiles: Mapping[str, Any]):
        self.store = store
        self.profiles = profiles  # name -> policy.profiles.Profile (the Factory's loaded profiles)

    async def create(self, protocol: str, ca: str, profile: str, ttl: int, uses: int, ref: str | None,
                     subject: str | None, actor: str, approval: bool = False) -> dict[str, Any]:
        if protocol not in PROTOCOLS:
            raise FactoryError("bad-request", f"protocol must be one of {', '.join(PROTOCOLS)}")
        if not 60 <= ttl <= MAX_TTL:
            raise FactoryError("bad-request", f"lifetime must be between 60 s and {MAX_TTL // 86400} days")
        if not 1 <= uses <= 100000:
            raise FactoryError("bad-request", "uses must be between 1 and 100000")
        if protocol == "scep" and uses != 1:
            raise FactoryError("bad-request", "SCEP challenge passwords are one-time")
        if ref is not None and not _REF.fullmatch(ref):
            raise FactoryError("bad-request", "reference: 1-64 letters, digits, '.', '_' or '-'")
        p = self.profiles.get(profile)
        if p is None or p.kind in CA_KINDS:
            # a CA certificate only ever comes from the guarded CA operations, never from a device
            raise FactoryError("bad-request", f"profile {profile!r} is unknown or makes CA certificates")
        if await self.store.run(self.store.ca_row, ca) is None:
            raise FactoryError("not-found", f"no CA {ca!r}")
        ref = ref or f"{protocol}-{secrets.token_hex(6)}"
        secret = base64.b32encode(secrets.token_bytes(15)).decode()  # PrintableString-safe, 120 bits
        now = int(time.time())
        st = self.store

        def w() -> None:
            with st.tx():
                if st.enrol_secret_exists(ref):
                    raise FactoryError("exists", f"an enrolment secret {ref} already exists")
                st.enrol_secret_add(ref, protocol, _digest(secret), ca, profile, subject, uses, now + ttl, now, actor, approval)
                st.audit_in_tx(actor, "enrol-secret-create", ref, "ok",
                               f"{protocol} ca={ca} profile={profile} uses={uses} expires={now + ttl}"
                               + (f" subject={subject}" if subject else "") + (" approval" if approval else ""))
        await st.run(w)
        return {"ref": ref, "protocol": protocol, "secret": secret, "ca": ca, "profile": profile,
                "expires": now + ttl, "uses": uses, "approval": approval}

    async def revoke(self, ref: str, actor: str) -> dict[str, Any]:
        st = self.store

        def w() -> None:
            with st.tx():
                if not st.enrol_secret_revoke(ref):
                    raise FactoryError("not-found", f"no usable enrolment secret {ref}")
                st.audit_in_tx(actor, "enrol-secret-revoke", ref, "ok")
        await st.run(w)
        return {"ref": ref, "revoked": True}

    async def list(self) -> list[dict[str, Any]]:
        st = self.store
        rows = await st.run(st.enrol_secret_rows)
        now = int(time.time())
        return [{"ref": r[0], "protocol": r[1], "ca": r[2], "profile": r[3], "subject": r[4] or "", "uses_left": r[5],
                 "expires": r[6], "created_by": r[7],
                 "state": "revoked" if r[8] else "expired" if r[6] <= now else "used" if r[5] == 0 else "usable"}
                for r in rows]

    async def ref_of(self, protocol: str, secret: str, ref: str | None) -> str | None:
        """The reference of a secret, spent or not (a request repeated while it waits for approval
        proves it holds the secret again, without spending it a second time)."""
        st = self.store
        digest = _digest(secret) if 0 < len(secret) <= 256 else b""
        found = await st.run(st.enrol_secret_ref, digest, protocol)
        if found is None or (ref is not None and found != ref):
            return None
        return found

    async def spend(self, protocol: str, secret: str, ref: str | None, subject_cn: str | None, actor: str) -> Grant:
        """Check and use once, atomically (two requests racing for a one-time secret: one wins). Every
        refusal is audited with the reference when one is known; the secret itself never is."""
        st = self.store
        digest = _digest(secret) if 0 < len(secret) <= 256 else b""
        now = int(time.time())

        def w() -> Grant | str:
            with st.tx():
                row = st.enrol_secret_by_digest(digest)
                why = None
                if row is None or (ref is not None and row[0] != ref) or row[1] != protocol:
                    why = "wrong secret"
                elif row[7]:
                    why = "secret revoked"
                elif row[6] <= now:
                    why = "secret expired"
                elif row[5] <= 0:
                    why = "secret already used"
                elif row[4] and not (subject_cn and fnmatch.fnmatchcase(subject_cn, row[4])):
                    why = f"subject {subject_cn!r} not admitted by this secret"
                if why is not None:
                    who = row[0] if row is not None and why != "wrong secret" else (ref or "?")
                    st.audit_in_tx(actor, f"{protocol}-enrol", who, "refused", why)
                    return why
                st.enrol_secret_use(row[0], -1)
                st.audit_in_tx(actor, "enrol-secret-use", row[0], "ok", f"{protocol} uses_left={row[5] - 1}")
                return Grant(row[0], protocol, row[2], row[3], bool(row[8]), row[9])
        out = await st.run(w)
        if isinstance(out, str):
            raise FactoryError("unauthorized", out)
        return out

    async def give_back(self, ref: str, actor: str) -> None:
        """Undo one spend whose issuance was refused, so that a device that sent a bad CSR can send a
        good one with the same secret (one certificate per use still; the refusal stays audited)."""
        st = self.store

        def w() -> None:
            with st.tx():
                if st.enrol_secret_use(ref, +1):
                    st.audit_in_tx(actor, "enrol-secret-use", ref, "returned", "the enrolment was refused: the use is given back")
        await st.run(w)

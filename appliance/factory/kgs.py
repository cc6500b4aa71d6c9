"""The Factory's end of the KGS link: card records, slot certificates and archives in the CMDB, and the KGS admin requests."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from appliance.ipc import schema as S
from appliance.ipc.calls import Calls
from appliance.ipc.channel import Channel, LinkClosed, ProtocolViolation
from appliance.ipc.links import FACTORY_KGS

from policy.cards import CardProfile

from .cmdb import serial_bytes
from .errors import FactoryError
from .store import Store

REPRINTS = "reprint"  # the spool folder of reprinted letters (appliance/kgs/main.py)
RECOVERY_SECONDS = 3600  # an approved recovery must be taken within the hour
KGS_DEADLINE = 120.0  # seconds the Factory waits for the KGS's answer to one request (a batch answers at once)

Issue = Callable[[S.AIssue, str], Awaitable[S.IssueReply]]


def _cn(subject: str) -> str:
    """The CN of a stored subject (written by the KGS: read defensively)."""
    try:
        doc = json.loads(subject)
    except ValueError:
        return ""
    cn = doc.get("CN") if isinstance(doc, dict) else None
    return cn[:4096] if isinstance(cn, str) else ""


def _log(msg: str) -> None:
    print(f"donjon[factory]: {msg}", file=sys.stderr, flush=True)


def _kgs_missing() -> FactoryError:
    return FactoryError("inactive", "the key generation system is not running (set [kgs] enabled = true in donjon.toml)")


class KgsLink:
    """Serves the KGS's requests (records, issuance through the normal pipeline) and sends it the officers'."""

    def __init__(self, store: Store, issue: Issue, card_profiles: dict[str, CardProfile]):
        # The card profiles bound what the KGS may have certified: a compromised KGS gets at worst
        # certificates its card profiles (and through them the certificate profiles) allow.
        self.store, self.issue, self.card_profiles = store, issue, card_profiles
        self.chan: Channel | None = None
        self.calls: Calls | None = None
        self.batches: dict[str, str] = {}  # batch -> the officer who started its run (audit records name them)
        self.running: set[str] = set()  # batches the KGS works on (till its KgsBatchEnd or the link goes)

    # ------------------------------------------------------------ the link

    async def serve(self, chan: Channel) -> None:
        """Handshake, then the KGS's messages until the link closes (LinkClosed/ProtocolViolation to the caller)."""
        await chan.handshake()
        self.chan, self.calls = chan, Calls(chan)
        try:
            async with trio.open_nursery() as n:
                while True:
                    m = await chan.recv()
                    if isinstance(m, (S.KgsAccepted, S.KgsRecovered, S.KgsServerKey, S.KgsLetters, S.Ok, S.Refused)):
                        if not self.calls.resolve(m):
                            raise ProtocolViolation(f"{FACTORY_KGS.name}: a reply to no request ({type(m).__name__} {m.id})")
                    elif isinstance(m, (S.KgsCardPut, S.KgsCardUpdate, S.KgsIssue, S.KgsBatchEnd)):
                        n.start_soon(self._answer, chan, m)
                    else:
                        raise ProtocolViolation(f"{FACTORY_KGS.name}: unexpected {type(m).__name__}")
        except BaseExceptionGroup as eg:
            # Only the receive loop raises (_answer never does): hand its one error to the caller as
            # itself, so that the KGS going away ends this link, never the Factory.
            if len(eg.exceptions) == 1 and isinstance(eg.exceptions[0], Exception):
                raise eg.exceptions[0] from None
            raise
        finally:
            self.calls.close()
            self.running.clear()
            if self.chan is chan:
                self.chan = None

    async def _answer(self, chan: Channel, m: Any) -> None:
        try:
            if isinstance(m, S.KgsCardPut):
                reply: Any = await self.card_put(m)
            elif isinstance(m, S.KgsCardUpdate):
                reply = await self.card_update(m)
            elif isinstance(m, S.KgsIssue):
                reply = await self.kgs_issue(m)
            else:
                reply = await self.batch_end(m)
        except FactoryError as e:
            reply = S.Refused(id=m.id, code=e.code, reason=e.reason)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - one request's failure (the CMDB, a bug): refused, logged, the link serves on
            _log("KGS request failed:\n" + traceback.format_exc(limit=8))
            reply = S.Refused(id=m.id, code="internal", reason="internal error in the Factory (see its log)")
        try:
            await chan.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LinkClosed):
            pass  # the KGS went: its rerun reads the record

    async def call(self, make: Callable[[int], Any]) -> Any:
        if self.calls is None or self.calls.closed:
            raise _kgs_missing()
        try:
            r = await self.calls.call(make, timeout=KGS_DEADLINE)
        except LinkClosed:
            raise FactoryError("internal", "the key generation system went away during the request") from None
        except trio.TooSlowError:
            raise FactoryError("hsm", f"the key generation system did not answer in {KGS_DEADLINE:g} s") from None
        if isinstance(r, S.Refused):
            raise FactoryError(r.code, r.reason)
        return r

    # ------------------------------------------------------------ the KGS's requests

    def _actor(self, batch: str) -> str:
        return f"kgs (batch {batch}, started by {self.batches.get(batch, 'an earlier run')})"

    def _row(self, rid: int, card: int) -> S.KgsCardRow:
        """On the DB thread: the card's record as the KGS resumes from it."""
        c = self.store.require_active().db
        r = c.execute("SELECT state, label, transport, token_serial, pending, error FROM kgs_cards WHERE card=?", (card,)).fetchone()
        certs = [S.KgsSlotCert(slot=s, cert=d) for s, d in c.execute("SELECT slot, cert FROM kgs_slots WHERE card=? ORDER BY slot", (card,))]
        return S.KgsCardRow(id=rid, card=card, state=r[0], label=r[1], transport=r[2] or b"", token_serial=r[3], pending=r[4],
                            certs=certs, error=r[5])

    async def card_put(self, m: S.KgsCardPut) -> S.KgsCardRow:
        now = int(time.time())
        if m.profile not in self.card_profiles:
            why = f"unknown card profile {m.profile!r}"
            await self.store.audit(self._actor(m.batch), "kgs-card", m.subject_id, "refused", why)
            raise FactoryError("policy", why)

        def w() -> S.KgsCardRow:
            with self.store.tx() as c:
                r = c.execute("SELECT card, profile FROM kgs_cards WHERE batch=? AND subject_id=?", (m.batch, m.subject_id)).fetchone()
                if r is None:
                    # Written before the card is touched: a crash from here on leaves a record that says so.
                    c.execute("INSERT INTO kgs_cards(batch, subject_id, subject, profile, label, state, transport, created, updated) "
                              "VALUES (?,?,?,?,?, 'started', ?,?,?)", (m.batch, m.subject_id, m.subject, m.profile, m.label, m.transport, now, now))
                    card = c.last_insert_rowid()
                    self.store.audit_in_tx(self._actor(m.batch), "kgs-card", f"card#{card}", "started",
                                           f"batch {m.batch}, subject {m.subject_id}, profile {m.profile}, label {m.label}")
                else:
                    card = r[0]
                    if r[1] != m.profile:
                        raise FactoryError("policy", f"subject {m.subject_id} of batch {m.batch} was begun with card profile {r[1]}")
                return self._row(m.id, card)
        return await self.store.run(w)

    async def card_update(self, m: S.KgsCardUpdate) -> S.Ok:
        now = int(time.time())

        def w() -> None:
            with self.store.tx() as c:
                r = c.execute("SELECT batch, state FROM kgs_cards WHERE card=?", (m.card,)).fetchone()
                if r is None:
                    raise FactoryError("not-found", f"no card #{m.card}")
                batch, old = r
                if old == "done":
                    raise FactoryError("policy", f"card #{m.card} is done: never personalised twice")
                sets = ["state=?", "updated=?"]
                args: list[Any] = [m.state, now]
                for col, v in (("token_serial", m.token_serial), ("error", m.error), ("letter", m.letter), ("puk", m.puk)):
                    if v is not None:
                        sets.append(f"{col}=?")
                        args.append(v)
                if m.state == "pins":
                    sets.append("pending=?")
                    args.append(m.pending)
                if m.state == "done":  # the letter exists: the PIN is stored nowhere from now on
                    sets += ["pending=NULL", "transport=NULL", "error=NULL"]
                if m.restart:
                    sets += ["attempts=attempts+1", "error=NULL"]
                c.execute(f"UPDATE kgs_cards SET {', '.join(sets)} WHERE card=?", (*args, m.card))
                if m.state in ("done", "failed") or m.restart:
                    self.store.audit_in_tx(self._actor(batch), "kgs-card", f"card#{m.card}", m.state if not m.restart else "restarted",
                                           m.error or (f"token {m.token_serial}" if m.token_serial else ""))
        await self.store.run(w)
        return S.Ok(id=m.id)

    async def kgs_issue(self, m: S.KgsIssue) -> S.KgsIssued:
        row = await self.store.run(lambda: self.store.require_active().db.execute(
            "SELECT batch, profile, state FROM kgs_cards WHERE card=?", (m.card,)).fetchone())
        if row is None:
            raise FactoryError("not-found", f"no card #{m.card}")
        actor = self._actor(row[0])
        prof = self.card_profiles.get(row[1])
        why = f"unknown card profile {row[1]!r}" if prof is None else prof.refuses(m.slot, m.ca, m.profile)
        if why is None and row[2] != "keys":
            why = f"card #{m.card} is {row[2]}: certificates are made only in its keys step"
        if why is None and (m.archive is not None) != prof.slot(m.slot).archived:  # type: ignore[union-attr]
            why = f"slot {m.slot}: an archive blob {'missing' if m.archive is None else 'for a key made on the card'}"
        if why is not None:
            await self.store.audit(actor, "kgs-issue", f"card#{m.card}", "refused", why)
            raise FactoryError("policy", why)
        reply = await self.issue(S.AIssue(id=0, ca=m.ca, profile=m.profile, csrs=[m.csr], validity_days=m.validity_days), actor)
        out = reply.results[0]
        if out.cert is None or reply.serials[0] is None:
            raise FactoryError("policy", f"slot {m.slot}: {out.error}")
        serial = serial_bytes(int(reply.serials[0], 16))

        def w() -> None:
            with self.store.tx() as c:
                c.execute("INSERT OR REPLACE INTO kgs_slots(card, slot, ca, serial, cert, archive) VALUES (?,?,?,?,?,?)",
                          (m.card, m.slot, m.ca, serial, out.cert, m.archive))
                if m.archive is not None:
                    self.store.audit_in_tx(actor, "kgs-archive", f"card#{m.card}", "ok",
                                           f"slot {m.slot}: key archived under the KGS archival key, certificate {m.ca}/{reply.serials[0]}")
        await self.store.run(w)
        return S.KgsIssued(id=m.id, cert=out.cert)

    async def batch_end(self, m: S.KgsBatchEnd) -> S.Ok:
        self.running.discard(m.batch)
        await self.store.audit(self._actor(m.batch), "kgs-batch", m.batch, "ok" if not m.failed else "failed",
                               f"{m.done} done, {m.failed} failed" + (f"; first error: {m.error}" if m.error else ""))
        return S.Ok(id=m.id)

    # ------------------------------------------------------------ admin requests

    async def personalise(self, req: S.AKgsPersonalise, actor: str) -> S.KgsPersonaliseReply:
        self.store.require_active()
        if req.batch == REPRINTS:
            raise FactoryError("bad-request", f"batch name {REPRINTS!r} is the spool of reprinted letters: choose another")
        try:
            r = await self.call(lambda i: S.KgsPersonalise(id=i, profile=req.profile, batch=req.batch, data=req.data, actor=actor))
        except FactoryError as e:
            await self.store.audit(actor, "kgs-personalise", req.batch, "refused", e.reason)
            raise
        self.batches[req.batch] = actor
        self.running.add(req.batch)
        await self.store.audit(actor, "kgs-personalise", req.batch, "ok", f"card profile {req.profile}, {r.subjects} subjects")
        return S.KgsPersonaliseReply(id=0, batch=r.batch, subjects=r.subjects)

    async def cards(self, req: S.AKgsCards) -> S.KgsCardsReply:
        def q() -> list[S.KgsCardInfo]:
            c = self.store.require_active().db
            rows = c.execute("SELECT card, batch, subject_id, subject, label, token_serial, state, letter, error, attempts FROM kgs_cards "
                             + ("WHERE batch=? " if req.batch else "") + "ORDER BY card LIMIT ?",
                             ((req.batch,) if req.batch else ()) + (req.limit,)).fetchall()
            out = []
            for card, batch, sid, subject, label, tser, state, letter, error, attempts in rows:
                certs = [f"{s}:{ser.hex()}" for s, ser in c.execute("SELECT slot, serial FROM kgs_slots WHERE card=? ORDER BY slot", (card,))]
                out.append(S.KgsCardInfo(card=card, batch=batch, subject_id=sid, cn=_cn(subject), label=label,
                                         token_serial=tser, state=state, letter=letter, certs=certs, error=error, attempts=attempts))
            return out
        return S.KgsCardsReply(id=0, cards=await self.store.run(q), running=sorted(self.running))

    async def take_letters(self, req: S.AKgsLetters, actor: str) -> S.KgsLettersReply:
        self.store.require_active()
        r = await self.call(lambda i: S.KgsTakeLetters(id=i, batch=req.batch))
        if not r.letters:
            return S.KgsLettersReply(id=0, letters=[])

        def w() -> None:
            with self.store.tx() as c:
                for letter in r.letters:
                    c.execute("UPDATE kgs_cards SET letter='printed', updated=? WHERE card=?", (int(time.time()), letter.card))
                self.store.audit_in_tx(actor, "kgs-letters", req.batch, "ok",
                                       f"{len(r.letters)} PIN letters taken from the spool: " + " ".join(f"card#{x.card}" for x in r.letters)[:3000])
        await self.store.run(w)
        return S.KgsLettersReply(id=0, letters=r.letters)

    async def letter_status(self, req: S.AKgsLetterStatus, actor: str) -> S.KgsCardReply:
        order = ["none", "produced", "printed", "sent", "acknowledged"]

        def w() -> str | None:
            with self.store.tx() as c:
                r = c.execute("SELECT letter FROM kgs_cards WHERE card=?", (req.card,)).fetchone()
                if r is None:
                    raise FactoryError("not-found", f"no card #{req.card}")
                if order.index(req.status) <= order.index(r[0]) or r[0] in ("none", "produced"):
                    why = f"card #{req.card}: its letter is {r[0]}, cannot become {req.status}"
                    self.store.audit_in_tx(actor, "kgs-letter", f"card#{req.card}", "refused", why)
                    return why  # the refusal's audit record commits
                c.execute("UPDATE kgs_cards SET letter=?, updated=? WHERE card=?", (req.status, int(time.time()), req.card))
                self.store.audit_in_tx(actor, "kgs-letter", f"card#{req.card}", "ok", req.status)
                return None
        why = await self.store.run(w)
        if why is not None:
            raise FactoryError("policy", why)
        return S.KgsCardReply(id=0, card=req.card, letter=req.status)

    async def reprint(self, req: S.AKgsReprint, actor: str) -> S.KgsCardReply:
        r = await self.store.run(lambda: self.store.require_active().db.execute(
            "SELECT state, label, profile, subject, puk FROM kgs_cards WHERE card=?", (req.card,)).fetchone())
        if r is None:
            raise FactoryError("not-found", f"no card #{req.card}")
        if r[0] != "done" or r[4] is None:
            raise FactoryError("policy", f"card #{req.card} is {r[0]}: only a finished card gets a new PIN")
        try:
            await self.call(lambda i: S.KgsResetPin(id=i, card=req.card, label=r[1], profile=r[2], subject=r[3], puk=r[4]))
        except FactoryError as e:
            await self.store.audit(actor, "kgs-reprint", f"card#{req.card}", "failed", e.reason)
            raise

        def w() -> None:
            with self.store.tx() as c:
                c.execute("UPDATE kgs_cards SET letter='produced', updated=? WHERE card=?", (int(time.time()), req.card))
                self.store.audit_in_tx(actor, "kgs-reprint", f"card#{req.card}", "ok", "new PIN set with the PUK; the new letter is in the spool (batch reprint)")
        await self.store.run(w)
        return S.KgsCardReply(id=0, card=req.card, letter="produced")

    async def recover(self, req: S.AKgsRecover, actor: str, approvers: list[str] | None) -> S.KgsRecoverReply:
        """Runs only as the last approval of a dual-control request (`approvers` then names them all)."""
        if approvers is None or len(set(approvers)) < 2:
            why = "key recovery needs two officers: dual control ([dual-control] approvals >= 2, operations with key-recovery)"
            await self.store.audit(actor, "kgs-recover", f"card#{req.card}", "refused", why)
            raise FactoryError("policy", why)
        now = int(time.time())

        def w() -> int:
            with self.store.tx() as c:
                r = c.execute("SELECT 1 FROM kgs_slots WHERE card=? AND slot='enc' AND archive IS NOT NULL", (req.card,)).fetchone()
                if r is None:
                    raise FactoryError("not-found", f"card #{req.card} has no archived key")
                c.execute("INSERT INTO kgs_recoveries(card, slot, approvers, reason, created, expires) VALUES (?, 'enc', ?,?,?,?)",
                          (req.card, ",".join(approvers), req.reason, now, now + RECOVERY_SECONDS))
                rec = c.last_insert_rowid()
                self.store.audit_in_tx(actor, "kgs-recover", f"card#{req.card}", "approved",
                                       f"recovery #{rec} of the archived encryption key approved by {', '.join(approvers)}: {req.reason}")
                return rec
        rec = await self.store.run(w)
        return S.KgsRecoverReply(id=0, recovery=rec, card=req.card, approvers=approvers)

    async def recover_take(self, req: S.AKgsRecoverTake, officer: str, actor: str) -> S.KgsP12Reply:
        now = int(time.time())

        def claim() -> tuple[int, str, bytes, bytes, str] | str:
            with self.store.tx() as c:
                r = c.execute("SELECT card, approvers, expires, taken FROM kgs_recoveries WHERE recovery=?", (req.recovery,)).fetchone()
                why = None
                if r is None:
                    raise FactoryError("not-found", f"no recovery #{req.recovery}")
                if r[3] is not None:
                    why = f"recovery #{req.recovery} was taken already (a one-time password is shown once)"
                elif r[2] < now:
                    why = f"recovery #{req.recovery} expired"
                elif officer not in r[1].split(","):
                    why = f"only an officer who approved recovery #{req.recovery} may take it ({r[1]})"
                if why is not None:
                    self.store.audit_in_tx(actor, "kgs-recover-take", f"recovery#{req.recovery}", "refused", why)
                    return why  # the refusal's audit record commits
                c.execute("UPDATE kgs_recoveries SET taken=?, taken_by=? WHERE recovery=?", (now, officer, req.recovery))
                s = c.execute("SELECT archive, cert, ca, serial FROM kgs_slots WHERE card=? AND slot='enc'", (r[0],)).fetchone()
                label = c.execute("SELECT label FROM kgs_cards WHERE card=?", (r[0],)).fetchone()[0]
                self.store.audit_in_tx(actor, "kgs-recover-take", f"recovery#{req.recovery}", "ok",
                                       f"card#{r[0]} encryption key ({s[2]}/{s[3].hex()}) exported as PKCS#12 to {officer}; approved by {r[1]}")
                return r[0], label, s[0], s[1], r[1]
        got = await self.store.run(claim)
        if isinstance(got, str):
            raise FactoryError("policy", got)
        card, label, blob, cert, _ = got
        name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in label)[:64] or "recovered"
        r = await self.call(lambda i: S.KgsRecover(id=i, blob=blob, cert=cert, friendly_name=name))
        return S.KgsP12Reply(id=0, recovery=req.recovery, p12=r.p12, password=r.password)

    async def server_keygen(self, key_type: str, subject: tuple, emails: tuple = (), dns: tuple = (), archive: bool = False) -> S.KgsServerKey:
        """For the gateway (EST /serverkeygen, CMP central key generation): see appliance/kgs/__init__.py."""
        self.store.require_active()
        return await self.call(lambda i: S.KgsServerKeygen(id=i, key_type=key_type, subject=subject, emails=emails, dns=dns,  # type: ignore[arg-type]
                                                           archive=archive))

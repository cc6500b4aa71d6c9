"""The KGS role: its link with the Factory (requests both ways), the batch runner, recovery and server-side keys."""

from __future__ import annotations

import json
import os
import secrets
import sys
import traceback

import trio

from appliance import roles
from appliance.ipc import schema as S
from appliance.ipc.calls import Calls
from appliance.ipc.channel import Channel, LinkClosed, ProtocolViolation
from appliance.ipc.links import FACTORY_KGS
from policy import cards as C
from policy.errors import PolicyError

from .letter import pin_letter
from .tokens import GONE, CardError, Tokens, make_csr, public_key_of

SENDER = "Donjon card office - personal and confidential"
LETTERS_PER_REPLY_BYTES = 2 << 20


def _log(msg: str) -> None:
    print(f"donjon[kgs {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class Refusal(Exception):
    """A Factory refusal of one of the KGS's requests (its reason is one line for the operator)."""


class Kgs:
    def __init__(self, cfg: S.KgsConfig, tokens: Tokens, card_profiles: dict[str, C.CardProfile], chan: Channel):
        self.cfg, self.tokens, self.card_profiles, self.chan = cfg, tokens, card_profiles, chan
        self.calls = Calls(chan)
        self.limiter = trio.CapacityLimiter(1)  # one PKCS#11 caller per process (SoftHSM has no locking here)
        self.running: set[str] = set()

    async def hsm(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def ask(self, make) -> object:
        r = await self.calls.call(make)
        if isinstance(r, S.Refused):
            raise Refusal(r.reason)
        return r

    # ------------------------------------------------------------ the link

    async def receive(self, n: trio.Nursery) -> None:
        try:
            while True:
                m = await self.chan.recv()
                if isinstance(m, (S.KgsCardRow, S.KgsIssued, S.Ok, S.Refused)):
                    if not self.calls.resolve(m):
                        raise ProtocolViolation(f"{FACTORY_KGS.name}: a reply to no request ({type(m).__name__} {m.id})")
                elif isinstance(m, S.KgsPersonalise):
                    await self.personalise(m, n)
                elif isinstance(m, S.KgsRecover):
                    n.start_soon(self.answer, m.id, self.recover, m)
                elif isinstance(m, S.KgsServerKeygen):
                    n.start_soon(self.answer, m.id, self.server_keygen, m)
                elif isinstance(m, S.KgsTakeLetters):
                    n.start_soon(self.answer, m.id, self.take_letters, m)
                elif isinstance(m, S.KgsResetPin):
                    n.start_soon(self.answer, m.id, self.reset_pin, m)
                else:
                    raise ProtocolViolation(f"{FACTORY_KGS.name}: unexpected {type(m).__name__}")
        finally:
            self.calls.close()

    async def answer(self, rid: int, fn, m) -> None:
        try:
            reply = await fn(m)
        except (CardError, PolicyError) as e:
            reply = S.Refused(id=rid, code="hsm" if isinstance(e, CardError) else "policy", reason=str(e)[:4000])
        except GONE as e:
            await self._reconnect()
            reply = S.Refused(id=rid, code="hsm", reason=f"token error: {type(e).__name__}")
        await self.chan.send(reply)

    async def _reconnect(self) -> None:
        try:
            await self.hsm(self.tokens.reconnect)
        except Exception as e:  # noqa: BLE001 - the next request retries; the log says why
            _log(f"reconnect failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------ batches

    async def personalise(self, m: S.KgsPersonalise, n: trio.Nursery) -> None:
        """Check the profile and the batch at once (the refusal goes to the officer), then run it."""
        prof = self.card_profiles.get(m.profile)
        if prof is None:
            known = ", ".join(sorted(self.card_profiles)) or "none"
            await self.chan.send(S.Refused(id=m.id, code="not-found", reason=f"unknown card profile {m.profile!r} (known: {known})"))
            return
        try:
            subjects = C.parse_batch(m.data)
        except PolicyError as e:
            await self.chan.send(S.Refused(id=m.id, code="bad-request", reason=str(e)))
            return
        if m.batch in self.running:
            await self.chan.send(S.Refused(id=m.id, code="busy", reason=f"batch {m.batch} is running"))
            return
        self.running.add(m.batch)
        await self.chan.send(S.KgsAccepted(id=m.id, batch=m.batch, subjects=len(subjects)))
        n.start_soon(self.run_batch, m.batch, prof, subjects)

    async def run_batch(self, batch: str, prof: C.CardProfile, subjects: list[C.Subject]) -> None:
        done = failed = 0
        first = ""
        try:
            for i, subj in enumerate(subjects, start=1):
                err = await self.one_card(batch, prof, subj, i)
                if err is None:
                    done += 1
                else:
                    failed += 1
                    first = first or err
        except LinkClosed:
            return  # the Factory went: the rerun finishes the batch
        finally:
            self.running.discard(batch)
        try:
            await self.ask(lambda i: S.KgsBatchEnd(id=i, batch=batch, done=done, failed=failed, error=first[:4000]))
        except (LinkClosed, Refusal):
            pass

    async def one_card(self, batch: str, prof: C.CardProfile, subj: C.Subject, n: int) -> str | None:
        """One subject's card, from wherever its record says it stopped; None when done, else the error."""
        ctx = f"{batch}|{subj.id}".encode()
        fresh = {"so": secrets.token_urlsafe(12), "user": secrets.token_urlsafe(12)}
        sealed = await self.hsm(self.tokens.seal, json.dumps(fresh).encode(), b"transport|" + ctx)
        row = await self.ask(lambda i: S.KgsCardPut(id=i, batch=batch, subject_id=subj.id, subject=json.dumps(subj.as_dict()),
                                                     profile=prof.name, label=prof.card_label(subj, n), transport=sealed))
        assert isinstance(row, S.KgsCardRow)
        card, label, state = row.card, row.label, row.state
        if state == "done":
            return None
        try:
            tr = json.loads(await self.hsm(self.tokens.unseal, row.transport, b"transport|" + ctx))
            if state == "failed":  # again from the start: the same card if it is still ours, else a blank one
                await self.update(card, "started", restart=True)
                state = "started"
            if state == "started":
                serial = await self.hsm(self.tokens.init_card, label, tr["so"], tr["user"])
                await self.update(card, "keys", token_serial=serial)
                state = "keys"
            pending = row.pending
            certs = {c.slot: c.cert for c in row.certs}
            if state == "keys":
                for slot in prof.slots:
                    have = certs.get(slot.name)
                    if have is not None and await self.hsm(self._slot_has_key, label, tr["user"], slot.name, have):
                        continue  # certified by an earlier run: the key on the card is the certified one
                    csr, blob = await self.hsm(self._make_key, label, tr["user"], slot, subj)
                    r = await self.ask(lambda i: S.KgsIssue(id=i, card=card, slot=slot.name, ca=prof.ca, profile=slot.profile,  # noqa: B023
                                                            csr=csr, validity_days=prof.validity_days, archive=blob))  # noqa: B023
                    assert isinstance(r, S.KgsIssued)
                    certs[slot.name] = r.cert
                await self.update(card, "certs")
                state = "certs"
            if state == "certs":
                if set(certs) != {s.name for s in prof.slots}:
                    raise CardError("the record lacks a slot's certificate: run the batch again")
                await self.hsm(self._write_certs, label, tr["user"], certs)
                pin, puk = C.new_secret(prof.pin, secrets.randbelow), C.new_secret(prof.puk, secrets.randbelow)
                # Sealed in the record only until the letter exists: a crash between setting the PINs and
                # printing must not leave a card whose PIN nobody knows.
                pending = await self.hsm(self.tokens.seal, json.dumps({"pin": pin, "puk": puk}).encode(), b"pins|" + ctx)
                await self.update(card, "pins", pending=pending)
                state = "pins"
            if state == "pins":
                if pending is None:
                    raise CardError("the record lost the pending PINs")
                pp = json.loads(await self.hsm(self.tokens.unseal, pending, b"pins|" + ctx))
                await self.hsm(self.tokens.set_pins, label, tr["so"], tr["user"], pp["pin"], pp["puk"])
                serial = row.token_serial or (await self.hsm(self.tokens.card, label)).serial
                self._spool(batch, card, pin_letter(sender=SENDER, name=subj.cn, address=subj.address, card_label=label,
                                                    token_serial=str(serial), pin=pp["pin"]))
                puk_sealed = await self.hsm(self.tokens.seal, pp["puk"].encode(), b"puk|%d" % card)
                await self.update(card, "done", letter="produced", puk=puk_sealed)
            return None
        except (CardError, PolicyError, Refusal) as e:
            why = str(e)
        except GONE as e:
            why = f"card {label!r} went away ({type(e).__name__})"
            await self._reconnect()
        except LinkClosed:
            raise
        except Exception as e:  # noqa: BLE001 - one card's failure is its record's, never the batch's or the role's
            _log(f"batch {batch}: card {card}: internal error:\n" + traceback.format_exc(limit=8))
            why = f"card {label!r}: internal error ({type(e).__name__}); see the KGS log"
        why = why[:4000]
        _log(f"batch {batch}: card {card} ({subj.id}): {why}")
        await self.update(card, "failed", error=why)
        return why

    async def update(self, card: int, state: str, **kw) -> None:
        await self.ask(lambda i: S.KgsCardUpdate(id=i, card=card, state=state, **kw))  # type: ignore[arg-type]

    def _slot_has_key(self, label: str, user: str, slot: str, cert_der: bytes) -> bool:
        from cryptography import x509
        with self.tokens.card(label).open(user_pin=user) as s:
            keys = self.tokens.card_keys(s, slot)
            return keys is not None and public_key_of(keys[1]) == x509.load_der_x509_certificate(cert_der).public_key()

    def _make_key(self, label: str, user: str, slot: C.Slot, subj: C.Subject) -> tuple[bytes, bytes | None]:
        emails = (subj.email,) if subj.email else ()
        with self.tokens.card(label).open(rw=True, user_pin=user) as s:
            self.tokens.clear_slot(s, slot.name)
            if slot.archived:
                blob, csr = self.tokens.generate_archived(s, slot.name, slot.key_type, subj.attrs(), emails)
                return csr, blob
            priv, pub = self.tokens.generate_on_card(s, slot.name, slot.key_type)
            return make_csr(priv, public_key_of(pub), subj.attrs(), emails), None

    def _write_certs(self, label: str, user: str, certs: dict[str, bytes]) -> None:
        with self.tokens.card(label).open(rw=True, user_pin=user) as s:
            for slot, der in certs.items():
                self.tokens.write_cert(s, slot, der)

    def _spool(self, batch: str, card: int, pdf: bytes) -> None:
        """The letter waits in the spool (0600, this role's folder) until an officer takes it, once."""
        d = os.path.join(self.cfg.spool, batch)
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(d, f"{card}.pdf")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pdf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------ letters, PIN reset, recovery, server-side keys

    async def take_letters(self, m: S.KgsTakeLetters) -> S.KgsLetters:
        d = os.path.join(self.cfg.spool, m.batch)
        out = []
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        size = 0
        for fn in names:
            if size > LETTERS_PER_REPLY_BYTES:
                break  # the rest in the next request: a reply stays far below the link's frame limit
            if fn.endswith(".pdf") and fn[:-4].isdigit():
                p = os.path.join(d, fn)
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    pdf = f.read(256 * 1024 + 1)
                if len(pdf) <= 256 * 1024:
                    out.append(S.KgsLetter(card=int(fn[:-4]), pdf=pdf))
                    size += len(pdf)
        reply = S.KgsLetters(id=m.id, letters=out)
        for letter in out:  # handed over once: the PIN leaves the appliance with the letter
            os.unlink(os.path.join(d, f"{letter.card}.pdf"))
        return reply

    async def reset_pin(self, m: S.KgsResetPin) -> S.Ok:
        prof = self.card_profiles.get(m.profile)
        if prof is None:
            raise CardError(f"unknown card profile {m.profile!r}")
        subj = C.subject_from_dict(json.loads(m.subject))
        puk = (await self.hsm(self.tokens.unseal, m.puk, b"puk|%d" % m.card)).decode()
        pin = C.new_secret(prof.pin, secrets.randbelow)
        await self.hsm(self.tokens.reset_pin, m.label, puk, pin)
        tok = await self.hsm(self.tokens.card, m.label)
        batch = "reprint"
        self._spool(batch, m.card, pin_letter(sender=SENDER, name=subj.cn, address=subj.address, card_label=m.label,
                                              token_serial=str(tok.serial), pin=pin, reprint=True))
        return S.Ok(id=m.id)

    async def recover(self, m: S.KgsRecover) -> S.KgsRecovered:
        password = secrets.token_urlsafe(15)  # one-time: shown once to the officer who takes the recovery
        p12 = await self.hsm(self.tokens.recover_pkcs12, m.blob, m.cert, m.friendly_name, password)
        return S.KgsRecovered(id=m.id, p12=p12, password=password)

    async def server_keygen(self, m: S.KgsServerKeygen) -> S.KgsServerKey:
        csr, pkcs8, blob = await self.hsm(self.tokens.server_keygen, m.key_type, list(m.subject), m.emails, m.dns, m.archive)
        return S.KgsServerKey(id=m.id, csr=csr, pkcs8=pkcs8, archive=blob)


async def main(fds: dict[str, int], drop) -> None:
    await roles.serve("kgs", fds, drop, lambda sup, cfg: _setup(fds, sup, cfg))


async def _setup(fds: dict[str, int], sup: Channel, cfg: S.KgsConfig) -> roles.Body:
    from policy.profiles import load_profiles
    cert_profiles = load_profiles(dict(cfg.profiles))
    card_profiles = {n: C.load_card_profile_text(n, t, cert_profiles) for n, t in cfg.card_profiles.items()}
    tokens = Tokens(cfg.card_module, cfg.hsm_module, cfg.hsm_label)
    tokens.open(cfg.hsm_pin)  # modules mapped and the KGS token logged in before the drop
    chan = Channel.from_fd(fds[FACTORY_KGS.name], FACTORY_KGS.name, FACTORY_KGS.down)
    kgs = Kgs(cfg, tokens, card_profiles, chan)

    async def connect() -> None:
        await kgs.hsm(tokens.ensure_keys)
        await chan.handshake()

    async def serve(n: trio.Nursery) -> None:
        await kgs.receive(n)

    return roles.Body(serve=serve, connect=connect)

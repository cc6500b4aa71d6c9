"""Two tiers in the Factory: CA requests and installs, the offline root's pre-signed CRLs, the online CRL calendar."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.ipc import schema as S
from policy import tier as T
from policy.capolicy import CaPolicy, default_policy, named_policy
from policy.errors import PolicyError

from .cis_link import CisRefused
from .errors import FactoryError, _log

if TYPE_CHECKING:
    from policy.profiles import Profile

    from .cis_link import CisLink
    from .store import Store

BACKDATE = 60
CHECK_SECONDS = 30  # the calendar timer's period (and at once when woken: a load, a test clock change)
CLOCK_ENV = "DONJON_TEST_CLOCK_FILE"  # TEST MODE ONLY: a file holding the epoch the Factory takes for "now"
MAX_ROOT_REVOCATIONS = 20_000  # a pre-signed root CRL is built in one message: a root revokes few CAs


def test_clock(home: str) -> Callable[[], float]:
    """The Factory's clock: time.time, or - test mode, DONJON_TEST_CLOCK_FILE set by the test harness and
    the file inside the Factory's own folder - the epoch that file holds (a simulated clock, never a sleep)."""
    path = os.environ.get(CLOCK_ENV, "")
    if not path:
        return time.time
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(home):
        _log(f"{CLOCK_ENV} ignored: the test clock file must be in {home}")
        return time.time
    _log(f"TEST CLOCK in use ({real}): calendar publication follows that file, not the system clock")

    def now() -> float:
        try:
            with open(real, encoding="ascii") as f:
                return float(f.read(32).strip())
        except (OSError, ValueError):
            return time.time()
    return now


class Tier:
    """CA requests and installs, pre-signed CRLs (root side) and the CRL calendar (online side).

    Collaborators: the store, the CIS link, the profiles and [ca-profiles], and three callbacks of the
    Factory (publish to the endpoint, queue a distribution job, send an event)."""

    def __init__(self, store: Store, cis: CisLink, profiles: dict[str, Profile], ca_profiles: dict[str, tuple[str, ...]],
                 publish: Callable[[Any], Awaitable[None]], enqueue: Callable[[Any, str, str, int], None],
                 send_event: Callable[[S.Event], Awaitable[None]], poke_dist: Callable[[], None], home: str,
                 warn_remaining: int = 3, warn_hours: int = 72):
        self.store = store
        self.cis = cis
        self.profiles = profiles
        self.ca_profiles = ca_profiles
        self.publish = publish
        self.enqueue = enqueue
        self.send_event = send_event
        self.poke_dist = poke_dist
        self.clock = test_clock(home)
        self.warn_remaining = warn_remaining
        self.warn_hours = warn_hours
        self.wake = trio.Event()
        self._warned: dict[str, str] = {}

    async def audit(self, actor: str, action: str, obj: str, outcome: str, detail: str) -> None:
        await self.store.audit(actor, action, obj, outcome, detail)

    async def refuse(self, actor: str, action: str, obj: str, code: str, reason: str) -> FactoryError:
        await self.audit(actor, action, obj, "refused", reason)
        return FactoryError(code, reason)

    # ---------------------------------------------------------------- ca request

    async def request(self, req: S.ACaRequest, actor: str) -> dict[str, Any]:
        """Make the CA's key in the token (not for --renew) and its PKCS#10 request, signed there."""
        st = self.store
        db = st.require_active()
        name = req.name
        profile = self.profiles.get(req.profile)
        if profile is None or profile.kind != "sub-ca":
            raise await self.refuse(actor, "ca-request", name, "policy", f"profile {req.profile!r} is not a subordinate-CA profile")
        try:
            names = tuple(req.allowed_profiles or self.ca_profiles.get(name, ()))
            policy = named_policy(names, self.profiles) if names else default_policy(False)
        except PolicyError as e:
            raise await self.refuse(actor, "ca-request", name, "bad-request", str(e)) from None

        rekey_of = None
        if req.mode == "rekey":  # a new key: the successor CA NAME.kN, which issues in NAME's place once installed
            def successor():
                if not db.db.execute("SELECT 1 FROM cas WHERE name=?", (name,)).fetchone():
                    return None
                if db.db.execute("SELECT 1 FROM ca_successors WHERE ca=?", (name,)).fetchone():
                    return ""
                for k in range(2, 100):
                    cand = f"{name}.k{k}"[:64]
                    if not db.db.execute("SELECT 1 FROM cas WHERE name=? UNION ALL SELECT 1 FROM ca_requests WHERE name=? "
                                         "AND rekey_of IS NULL", (cand, cand)).fetchone():
                        return cand
                return ""
            succ = await st.run(successor)
            if succ is None:
                raise await self.refuse(actor, "ca-request", name, "not-found", f"no CA named {name!r} to re-key")
            if not succ:
                raise await self.refuse(actor, "ca-request", name, "exists", f"CA {name!r} was already re-keyed: re-key its successor")
            rekey_of, name = name, succ

        def q():
            ca = db.db.execute("SELECT key_type FROM cas WHERE name=? OR key_label=?", (name, name)).fetchone()
            pending = db.db.execute("SELECT kind, key_type FROM ca_requests WHERE name=?", (name,)).fetchone()
            return ca, pending
        ca, pending = await st.run(q)
        mode = "new" if req.mode == "rekey" else req.mode
        if mode == "new" and ca is not None:
            raise await self.refuse(actor, "ca-request", name, "exists", f"CA {name!r} already exists: use --renew for a new certificate")
        if mode == "renew" and ca is None:
            raise await self.refuse(actor, "ca-request", name, "not-found", f"no CA named {name!r} to renew")
        if mode == "renew" and ca[0] != req.key_type:
            raise await self.refuse(actor, "ca-request", name, "bad-request", f"CA {name!r} has a {ca[0]} key: --renew keeps it")
        if pending is not None and (pending[0] != mode or pending[1] != req.key_type):
            raise await self.refuse(actor, "ca-request", name, "exists", f"CA {name!r} already awaits a {pending[0]} certificate "
                                    f"({pending[1]}): install it, or ask again with the same options")
        # A new CA's key is made once; asking again (a lost CSR) signs a new request with the same key.
        new_key = mode == "new" and pending is None
        try:
            made = await self.cis.request(S.MakeCaRequest(id=self.cis.new_id(), label=name, key_type=req.key_type, profile=req.profile,
                                                          subject=tuple(req.subject), path_length=req.path_length, new_key=new_key))
        except CisRefused as e:
            raise await self.refuse(actor, "ca-request", name, e.code, e.reason) from None
        csr = x509.load_der_x509_csr(made.csr)
        digest = hashlib.sha256(made.csr).hexdigest()

        def keep():
            with db.tx():
                db.db.execute("INSERT OR REPLACE INTO ca_requests(name, kind, rekey_of, key_type, profile, profiles, csr, created) "
                              "VALUES (?,?,?,?,?,?,?,?)", (name, mode, rekey_of, req.key_type, req.profile, policy.encode().decode(),
                                                          made.csr, int(time.time())))
                db.audit(actor, "ca-request", name, "ok", f"{req.mode}{f' of {rekey_of}' if rekey_of else ''} {req.key_type} {csr.subject.rfc4514_string()[:200]} "
                                                        f"csr sha256={digest} issues: {policy.describe()}")
        await st.run(keep)
        return {"name": name, "state": "awaiting certificate", "mode": req.mode, "key_type": req.key_type,
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "sha256": digest}

    # ---------------------------------------------------------------- ca install

    async def install(self, req: S.ACaInstall, actor: str) -> dict[str, Any]:
        """Check the certificate the parent returned (in the CIS, against the token) and make the CA active."""
        st = self.store
        db = st.require_active()
        name = req.name
        row = await st.run(lambda: db.db.execute("SELECT kind, key_type, profile, profiles, rekey_of FROM ca_requests WHERE name=?",
                                                 (name,)).fetchone())
        if row is None:
            raise await self.refuse(actor, "ca-install", name, "not-found", f"CA {name!r} awaits no certificate (make a request with ca request first)")
        kind, key_type, profile, profiles, rekey_of = row
        policy = CaPolicy.decode(profiles.encode())
        anchor_in = req.anchor
        if anchor_in is None and rekey_of is not None:  # a re-keyed CA chains to its predecessor's anchor unless told otherwise
            kept = await st.run(lambda: db.db.execute("SELECT cert FROM trust_anchors WHERE ca=?", (rekey_of,)).fetchone())
            anchor_in = kept[0] if kept else None
        try:
            done = await self.cis.request(S.InstallCaCert(id=self.cis.new_id(), label=name, cert=req.cert, chain=list(req.chain),
                                                          anchor=anchor_in, allowed_kinds=policy.kinds,  # type: ignore[arg-type]
                                                          allowed_profiles=policy.profiles))
        except CisRefused as e:
            raise await self.refuse(actor, "ca-install", name, e.code, f"the certificate was not installed: {e.reason}") from None
        cert = x509.load_der_x509_certificate(req.cert)
        anchor = x509.load_der_x509_certificate(done.anchor)
        digest = hashlib.sha256(req.cert).hexdigest()

        def keep():
            with db.tx():
                if kind == "new":
                    st.add_ca(name, key_type, None, profile, req.cert, policy.encode().decode())
                else:
                    db.db.execute("UPDATE cas SET cert=? WHERE name=?", (req.cert, name))
                db.db.execute("INSERT OR IGNORE INTO trust_anchors(ca, cert) VALUES (?,?)", (name, done.anchor))
                db.db.execute("DELETE FROM ca_requests WHERE name=?", (name,))
                if rekey_of is not None:  # from now on the successor issues; the old key signs CRLs and OCSP for its own
                    db.db.execute("INSERT INTO ca_successors(ca, successor, since) VALUES (?,?,?)", (rekey_of, name, int(time.time())))
                self.enqueue(db.db, "ca-cert", name, 0)
                db.audit(actor, "ca-install", name, "ok", f"{kind}{f' (re-key of {rekey_of})' if rekey_of else ''} serial={cert.serial_number:x} sha256={digest} "
                                                         f"anchor={anchor.subject.rfc4514_string()[:120]} issues: {policy.describe()}")
        await st.run(keep)
        await self.publish(S.PublishCa(ca=name, cert=req.cert))
        return {"name": name, "key_type": key_type, "parent": None, "profile": profile,
                "subject": cert.subject.rfc4514_string()[:256], "serial": f"{cert.serial_number:x}",
                "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
                "sha256": digest}

    # ---------------------------------------------------------------- clock gone backwards (the offline root)

    def signed_high(self) -> int:
        """DB thread: the newest time this appliance ever signed at (its CAs' certificates' issuance, CRLs'
        thisUpdate, pre-signed calendars' signing time): a clock before it has gone backwards. Per CA, on indexes."""
        c = self.store.require_active().db
        high = 0
        for (ca,) in c.execute("SELECT name FROM cas").fetchall():
            for q in ("SELECT max(issued_at) FROM certs WHERE ca=?",
                      "SELECT this_update FROM crls WHERE ca=? ORDER BY number DESC LIMIT 1",
                      "SELECT max(signed_at) FROM presigned_crls WHERE ca=?"):
                row = c.execute(q, (ca,)).fetchone()
                high = max(high, (row[0] if row else 0) or 0)
        return high

    async def check_clock(self, actor: str, what: str) -> None:
        """Refuse (audited) to sign while the clock is before the newest time this appliance signed at."""
        now = int(self.clock())
        high = await self.store.run(self.signed_high)
        if now < high:
            def at(t: int) -> str:
                return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
            raise await self.refuse(actor, what, "clock", "policy", f"the clock ({at(now)} UTC) is before {at(high)} UTC, when "
                                    "this appliance last signed: it has gone backwards; nothing is signed until it is set right "
                                    "(console: clock)")

    # ---------------------------------------------------------------- crl presign (the offline root)

    async def presign(self, req: S.ACrlPresign, actor: str) -> dict[str, Any]:
        st = self.store
        db = st.require_active()
        ca = req.ca
        await self.check_clock(actor, "crl-presign")
        row = await st.run(lambda: db.db.execute("SELECT cert, parent FROM cas WHERE name=?", (ca,)).fetchone())
        if row is None:
            raise await self.refuse(actor, "crl-presign", ca, "not-found", f"no CA named {ca!r}")
        root_der = row[0]
        start = int(time.time()) if req.start is None else req.start
        try:
            windows = T.calendar_windows(start, req.periods, req.every_seconds, req.overlap_seconds)
        except PolicyError as e:
            raise await self.refuse(actor, "crl-presign", ca, "bad-request", str(e)) from None
        rows = await st.run(lambda: db.db.execute(
            "SELECT serial, revoked_at, reason, invalidity, entry_len FROM revocations WHERE ca=? ORDER BY serial LIMIT ?",
            (ca, MAX_ROOT_REVOCATIONS + 1)).fetchall())
        if len(rows) > MAX_ROOT_REVOCATIONS:
            raise await self.refuse(actor, "crl-presign", ca, "policy", f"more than {MAX_ROOT_REVOCATIONS} revocations: "
                                    "pre-signed calendars are for roots")
        entries = [tuple(r[:4]) for r in rows]
        length = sum(r[4] for r in rows)
        signed: list[tuple[int, int, int, bytes]] = []
        for tu, nu in windows:
            number = await st.run(st.next_list_number, ca, "crl")
            try:
                der = await self._sign_crl(ca, number, tu, nu, entries, length)
            except CisRefused as e:
                raise await self.refuse(actor, "crl-presign", f"{ca}#{number}", e.code,
                                        f"the CIS refused CRL #{number}: {e.reason} ({len(signed)} of {len(windows)} signed, "
                                        f"number {number} skipped)") from None
            signed.append((number, tu, nu, der))
            now = int(time.time())

            def keep(n=number, t=tu, u=nu, d=der, now=now):
                with db.tx():
                    db.db.execute("INSERT INTO presigned_crls(ca, number, this_update, next_update, entries, sha256, der, signed_at) "
                                  "VALUES (?,?,?,?,?,?,?,?)", (ca, n, t, u, len(entries), hashlib.sha256(d).digest(), d, now))
                    db.audit(actor, "crl-presign", f"{ca}#{n}", "ok", f"thisUpdate={t} nextUpdate={u} entries={len(entries)} "
                                                                     f"sha256={hashlib.sha256(d).hexdigest()}")
            await st.run(keep)
        bundle = T.encode_bundle(ca, root_der, req.every_seconds, req.overlap_seconds, int(time.time()), signed)
        return {"ca": ca, "first": signed[0][0], "last": signed[-1][0], "bundle": bundle.decode()}

    async def _sign_crl(self, ca: str, number: int, tu: int, nu: int, entries: list, length: int) -> bytes:
        cis = self.cis
        mid = cis.new_id()
        replies = cis.open(mid)
        parts: list[bytes] = []
        try:
            await cis.send(S.CrlBegin(id=mid, ca=ca, crl_number=number, this_update=tu, next_update=nu,
                                      entry_count=len(entries), entries_length=length))
            for i in range(0, len(entries), 10_000):
                await cis.send(S.CrlEntries(id=mid, entries=[tuple(e) for e in entries[i:i + 10_000]]))
            await cis.send(S.CrlEnd(id=mid))
            while True:
                m = await cis.receive(replies)
                if isinstance(m, S.CrlChunk):
                    parts.append(m.data)
                elif isinstance(m, S.CrlSigned):
                    tbs = b"".join(parts)
                    if hashlib.sha256(tbs).digest() != m.tbs_sha256:
                        raise CisRefused("internal", "the bytes received differ from what the CIS signed")
                    return m.prefix + tbs + m.suffix
                else:
                    raise CisRefused(m.code, m.reason)
        finally:
            cis.close(mid)

    # ---------------------------------------------------------------- the CRL calendar (the online box)

    async def load(self, req: S.ACrlCalendarLoad, actor: str) -> dict[str, Any]:
        """Verify every CRL of a bundle against the root certificate, and keep them for publication at their thisUpdate."""
        st = self.store
        db = st.require_active()
        try:
            name, root_der, crls = await trio.to_thread.run_sync(T.parse_bundle, req.bundle)
        except PolicyError as e:
            raise await self.refuse(actor, "crl-calendar-load", "calendar", "bad-request", str(e)) from None

        def check():
            if db.db.execute("SELECT 1 FROM cas WHERE name=?", (name,)).fetchone():
                return f"{name!r} is a CA of this appliance: a calendar is for an offline root elsewhere"
            known = db.db.execute("SELECT cert FROM calendar_roots WHERE ca=?", (name,)).fetchone()
            anchors = [r[0] for r in db.db.execute("SELECT cert FROM trust_anchors")]
            if known is not None and known[0] != root_der:
                return f"the bundle's root certificate is not the one of {name!r} already loaded"
            if known is None and root_der not in anchors:
                return "the bundle's root certificate is not the trust anchor of any CA installed here (ca install --trust-anchor)"
            top = db.db.execute("SELECT max(number) FROM crl_calendar WHERE ca=? AND state='published'", (name,)).fetchone()[0] or 0
            if crls[-1][0] <= top:
                return f"every CRL of the bundle is older than CRL number {top}, already published"
            return None
        bad = await st.run(check)
        if bad is not None:
            raise await self.refuse(actor, "crl-calendar-load", name, "policy", bad)
        now = int(time.time())

        def keep():
            with db.tx():
                db.db.execute("INSERT OR IGNORE INTO calendar_roots(ca, cert, loaded) VALUES (?,?,?)", (name, root_der, now))
                top = db.db.execute("SELECT max(number) FROM crl_calendar WHERE ca=? AND state='published'", (name,)).fetchone()[0] or 0
                new = 0
                for number, tu, nu, der in crls:
                    if number <= top:
                        continue  # never published after a newer one
                    db.db.execute("INSERT OR IGNORE INTO crl_calendar(ca, number, this_update, next_update, sha256, der, loaded, state) "
                                  "VALUES (?,?,?,?,?,?,?, 'waiting')", (name, number, tu, nu, hashlib.sha256(der).digest(), der, now))
                    new += db.db.changes()
                # A newer calendar supersedes the waiting CRLs of an older one that it covers.
                db.db.execute("UPDATE crl_calendar SET state='superseded' WHERE ca=? AND state='waiting' AND number < ? "
                              "AND this_update >= ?", (name, crls[0][0], crls[0][1]))
                db.audit(actor, "crl-calendar-load", name, "ok", f"CRLs #{crls[0][0]}-#{crls[-1][0]} ({new} new), "
                                                                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(crls[0][1]))} to "
                                                                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(crls[-1][2]))}")
                return new
        new = await st.run(keep)
        await self.publish(S.PublishCa(ca=name, cert=root_der))
        self.wake.set()
        await self.publish_due()
        return {"ca": name, "first": crls[0][0], "last": crls[-1][0], "new": new, **(await self.status_of(name))}

    async def publish_due(self) -> list[tuple[str, int]]:
        """Publish, per root, the newest calendar CRL whose thisUpdate has come, if newer than the one published."""
        st = self.store
        if not st.active:
            return []
        db = st.require_active()
        now = int(self.clock())

        def step():
            out = []
            with db.tx():
                for (ca,) in db.db.execute("SELECT ca FROM calendar_roots").fetchall():
                    top = db.db.execute("SELECT max(number) FROM crl_calendar WHERE ca=? AND state='published'", (ca,)).fetchone()[0] or 0
                    due = db.db.execute("SELECT number, this_update, next_update, der FROM crl_calendar WHERE ca=? AND state='waiting' "
                                        "AND this_update <= ? AND number > ? ORDER BY number DESC LIMIT 1", (ca, now, top)).fetchone()
                    if due is None:
                        continue
                    number, tu, nu, der = due
                    # The older waiting ones were never published in time; after this one they never are.
                    db.db.execute("UPDATE crl_calendar SET state='superseded' WHERE ca=? AND state='waiting' AND number < ?", (ca, number))
                    db.db.execute("UPDATE crl_calendar SET state='published', published_at=? WHERE ca=? AND number=?", (now, ca, number))
                    st.store_signed_list("crl", ca, number, tu, nu, 0, iter([der]), len(der))
                    self.enqueue(db.db, "crl", ca, number)
                    db.audit("factory:crl-calendar", "crl-calendar-publish", f"{ca}#{number}", "ok",
                             f"thisUpdate={tu} published at {now} nextUpdate={nu}")
                    out.append((ca, number, der))
            return out
        done = await st.run(step)
        for ca, number, der in done:
            await self.publish(S.PublishCrl(ca=ca, number=number, data=der, last=True))
        if done:
            self.poke_dist()
        await self.warnings(now)
        return [(c, n) for c, n, _ in done]

    async def status_of(self, ca: str) -> dict[str, Any]:
        now = int(self.clock())
        db = self.store.require_active()

        def q():
            cur = db.db.execute("SELECT number, this_update, next_update FROM crl_calendar WHERE ca=? AND state='published' "
                                "ORDER BY number DESC LIMIT 1", (ca,)).fetchone()
            waiting = db.db.execute("SELECT count(*), max(next_update) FROM crl_calendar WHERE ca=? AND state='waiting'", (ca,)).fetchone()
            return cur, waiting
        cur, waiting = await self.store.run(q)
        doc: dict[str, Any] = {"ca": ca, "remaining": waiting[0], "covered_until": waiting[1] or (cur[2] if cur else None),
                               "current": cur[0] if cur else None, "current_next_update": cur[2] if cur else None}
        doc["warning"] = self._warning(doc, now)
        return doc

    def _warning(self, doc: dict[str, Any], now: int) -> str | None:
        """The most urgent of: the current CRL lapsed; it lapses within warn_hours with none to follow;
        fewer than warn_remaining pre-signed CRLs left ([crl] calendar-warn-remaining / -hours)."""
        nu = doc["current_next_update"]
        if nu is not None and nu <= now:
            return f"CRL calendar of {doc['ca']}: the current CRL #{doc['current']} has lapsed"
        if nu is not None and nu - now < self.warn_hours * 3600 and doc["remaining"] == 0:
            return (f"CRL calendar of {doc['ca']}: the current CRL #{doc['current']} lapses at "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(nu))} UTC (within {self.warn_hours} h), none to follow")
        if doc["remaining"] < self.warn_remaining:
            return (f"CRL calendar of {doc['ca']}: {doc['remaining']} pre-signed CRL(s) left (fewer than {self.warn_remaining}): "
                    "bring the next calendar from the offline root")
        return None

    async def status(self) -> list[dict[str, Any]]:
        if not self.store.active:
            return []
        db = self.store.require_active()
        names = await self.store.run(lambda: [r[0] for r in db.db.execute("SELECT ca FROM calendar_roots ORDER BY ca")])
        return [await self.status_of(n) for n in names]

    async def warnings(self, now: int) -> None:
        """A status warning and an SNMP notification (event `crl-calendar-low`) once per new condition."""
        for doc in await self.status():
            w = doc["warning"]
            if w and self._warned.get(doc["ca"]) != w:
                self._warned[doc["ca"]] = w
                _log(w)
                await self.send_event(S.Event(kind="crl-calendar-low", detail=f"{doc['ca']}: {w}"[:1024]))
            elif not w:
                self._warned.pop(doc["ca"], None)

    async def run(self) -> None:
        """The calendar timer: every CHECK_SECONDS, and at once when woken."""
        while True:
            try:
                await self.publish_due()
            except FactoryError:
                pass  # not activated yet
            except Exception as e:  # noqa: BLE001 - logged; the timer keeps running (the next tick retries)
                _log(f"CRL calendar: {type(e).__name__}: {e}")
            with trio.move_on_after(CHECK_SECONDS):
                await self.wake.wait()
            self.wake = trio.Event()


def status_json(docs: list[dict[str, Any]]) -> str:
    return json.dumps(docs, sort_keys=True)


def calendar_ca_states(db) -> list[S.CaState]:
    """DB thread: each offline root whose calendar this box publishes, as a CA row of the status report (SNMP's CA
    table): its certificate's end, the published calendar CRL's number and nextUpdate (the agent warns before it lapses)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    out = []
    for ca, der in db.execute("SELECT ca, cert FROM calendar_roots ORDER BY ca").fetchall():
        cert = x509.load_der_x509_certificate(der)
        pub = cert.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            kt = {"secp256r1": "p256", "secp384r1": "p384"}.get(pub.curve.name)
        elif isinstance(pub, rsa.RSAPublicKey):
            kt = f"rsa{pub.key_size}"
        else:
            kt = "ed25519" if isinstance(pub, ed25519.Ed25519PublicKey) else None
        if kt not in ("rsa2048", "rsa3072", "rsa4096", "p256", "p384", "ed25519"):
            continue  # a key type the report cannot name: shown in status only
        cur = db.execute("SELECT number, next_update FROM crl_calendar WHERE ca=? AND state='published' ORDER BY number DESC LIMIT 1",
                         (ca,)).fetchone()
        out.append(S.CaState(name=ca, key_type=kt, not_after=int(cert.not_valid_after_utc.timestamp()),  # type: ignore[arg-type]
                             crl_number=cur[0] if cur else 0, crl_next_update=cur[1] if cur else None, issued=0, revoked=0))
    return out

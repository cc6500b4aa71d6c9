"""The one admin-request table: request type -> permission, dual-control guard, handler, reply type."""

from __future__ import annotations

import re
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.ipc import schema as S

from .permissions import PUBLIC, ROLES
from .service import Factory, FactoryError


class Conn(typing.Protocol):
    """An admin connection (officers.Conn), named here: officers.py imports this table, so this module
    must not import officers.py (no import circle, tests/unit/test_factory_imports.py)."""

    who: str
    uid: int

    @property
    def actor(self) -> str: ...


ADMIN = frozenset({"administrator"})
OPER = frozenset({"operator"})
AUD = frozenset({"auditor"})
ANY = frozenset(ROLES)
STREAM = S.BlobChunk  # reply type of a streamed result: BlobChunks, the last one empty with last=True


@dataclass(frozen=True)
class Ctx:
    """What a handler may use: the Factory, the connection (its session), the actor audit records name."""

    f: Factory
    conn: Conn | None  # None when dual control's last approval runs a filed request
    actor: str


Handler = Callable[[Ctx, Any], Awaitable[Any]] | Callable[[Ctx, Any], AsyncIterator[bytes]]


@dataclass(frozen=True)
class AdminOp:
    allowed: frozenset[str] | None  # roles that may send it; PUBLIC: no officer session needed
    guard: str | None  # dual-control operation name (donjon.toml [dual-control] operations), or None
    handler: Handler
    reply: type  # S.Reply (a documented dict), a typed reply Struct, or STREAM
    self_service: bool = False  # an officer may also send it about their own account (req.name)
    session_bound: bool = False  # acts on this connection's session: never filed for dual control, needs conn


# ---------------------------------------------------------------- handlers (each: context and request in, reply out)


def _conn(ctx: Ctx) -> Conn:
    if ctx.conn is None:
        raise FactoryError("bad-request", "this request is bound to a connection")
    return ctx.conn


async def _crl_generate(ctx: Ctx, req: S.ACrlGenerate) -> AsyncIterator[bytes]:
    f = ctx.f
    name = req.ca
    if req.delta:
        if req.kind != "crl":
            raise FactoryError("bad-request", "--delta is for CRLs")
        number, _, _ = await f.generate_delta(req.ca, ctx.actor)
        name = f.lists.delta_name(req.ca)  # a sharded CA: every shard's delta signed, shard 0's answered
    elif req.kind == "crl":
        number, _, _ = await f.generate_crl(req.ca, ctx.actor)
    else:
        number, _, _ = await f.generate_serials_list(req.ca, ctx.actor)
    async for chunk in f.crl_chunks(name, number, "crls" if req.kind == "crl" else "serials_lists"):
        yield chunk


async def _crl_export(ctx: Ctx, req: S.ACrlExport) -> AsyncIterator[bytes]:
    async for chunk in ctx.f.crl_chunks(req.ca, req.number, "crls" if req.kind == "crl" else "serials_lists"):
        yield chunk


async def _audit_export(ctx: Ctx, req: S.AAuditExport) -> AsyncIterator[bytes]:
    data = await ctx.f.audit_export()
    await ctx.f.audit(ctx.actor, "audit-export", "audit", "ok", f"{len(data)} bytes")
    for i in range(0, len(data), 1 << 20):
        yield data[i:i + (1 << 20)]


async def _backup(ctx: Ctx, req: S.ABackup) -> AsyncIterator[bytes]:
    from .backup import backup_tar
    async for chunk in backup_tar(ctx.f.store, ctx.f.home, ctx.actor):
        yield chunk


async def _keys_backup(ctx: Ctx, req: S.AKeysBackup) -> S.KeysBackupReply:
    from . import keys
    cfg = ctx.f.cfg
    return await keys.backup(ctx.f.store, ctx.f.cis, req, ctx.actor, cfg.dual_approvals, "keys-backup" in cfg.dual_operations)


async def _keys_backup_fetch(ctx: Ctx, req: S.AKeysBackupFetch) -> S.KeysBackupReply:
    from . import keys
    return await keys.fetch(ctx.f.store, req, ctx.actor)


async def _ca_export(ctx: Ctx, req: S.ACaExport) -> S.CaExportReply:
    return S.CaExportReply(id=0, chain=[c.hex() for c in await ctx.f.ca_chain(req.name)])


async def _dist_status(ctx: Ctx, req: S.ADistStatus) -> dict[str, Any]:
    ctx.f._require_active()
    return await ctx.f.dist.status()


async def _dist_list(ctx: Ctx, req: S.ADistList) -> dict[str, Any]:
    ctx.f._require_active()
    return {"jobs": await ctx.f.run_db(ctx.f.dist.list_jobs, req.state, req.rule, req.limit)}


async def _dist_retry(ctx: Ctx, req: S.ADistRetry) -> dict[str, Any]:
    ctx.f._require_active()
    return {"requeued": await ctx.f.dist.retry(req.rule, req.job, ctx.actor)}


async def _reconcile(ctx: Ctx, req: S.AReconcile) -> dict[str, Any]:
    st = ctx.f.store
    st.require_active()
    rows = await st.run(st.reconciled)
    return {"voided": [{"seq": r[0], "ts": r[1], "object": r[2], "detail": r[3]} for r in rows]}


async def _audit_cert(ctx: Ctx, req: S.AAuditCert) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    der = await ctx.f.checkpoints.cert()
    return {"cert": x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()}


async def _shutdown(ctx: Ctx, req: S.AShutdown) -> dict[str, Any]:
    await ctx.f.audit(ctx.actor, "shutdown", "appliance", "ok", "requested through the admin API")
    await ctx.f.send_event(S.Event(kind="shutdown-requested", detail=ctx.actor))
    return {"stopping": True}


async def _ceremony(ctx: Ctx, req) -> dict[str, Any]:
    from . import ceremonies as C
    conn = _conn(ctx)
    if isinstance(req, S.ACeremonyBegin):
        return await C.ceremony_begin(ctx.f, conn, req.ceremony)
    if isinstance(req, S.ACeremonyWitness):
        return await C.ceremony_witness(ctx.f, conn, req.ceremony_seq)
    if isinstance(req, S.ACeremonyRecords):
        return await C.ceremony_records(ctx.f, conn, req.ceremony_seq)
    return await C.ceremony_record(ctx.f, conn, req)


async def _approve(ctx: Ctx, req: S.AApprove) -> dict[str, Any]:
    async def execute(filed, actor: str) -> dict[str, Any]:
        result = await run(ctx.f, filed, Ctx(ctx.f, None, actor))
        # Stored with the pending request (JSON) and embedded in this reply: plain data, never a Struct.
        return result if isinstance(result, dict) else _plain(result)
    return await ctx.f.officers.approve(req.request, _conn(ctx), execute)


def _tenant(ctx: Ctx, req) -> Awaitable[dict[str, Any]]:
    return ctx.f.tenants.admin(req, ctx.actor)


async def _cmp_decide(ctx: Ctx, req: S.ACmpDecide) -> S.CmpRequestListReply:
    conn = _conn(ctx)
    officer = conn.session.officer if getattr(conn, "session", None) is not None else ""  # type: ignore[attr-defined]
    return await ctx.f.cmp.decide(req.request, req.approve, req.reason, officer, ctx.actor)


async def _kgs_recover(ctx: Ctx, req: S.AKgsRecover) -> S.KgsRecoverReply:
    approvers = None
    if ctx.conn is None:  # the last approval of a filed request: officers.approve names them in the actor it passes
        m = re.match(r"officer:(\S+) approved-by:(\S*)", ctx.actor)
        if m:
            approvers = [m.group(1)] + [a for a in m.group(2).split(",") if a]
    return await ctx.f.kgs.recover(req, ctx.actor, approvers)


async def _kgs_recover_take(ctx: Ctx, req: S.AKgsRecoverTake) -> S.KgsP12Reply:
    conn = _conn(ctx)
    officer = conn.session.officer if getattr(conn, "session", None) else ""  # type: ignore[attr-defined]
    return await ctx.f.kgs.recover_take(req, officer, ctx.actor)
def _tier(ctx: Ctx):
    if ctx.f.tier is None:
        raise FactoryError("internal", "the two-tier service is not set up")
    return ctx.f.tier


async def _status(ctx: Ctx, req: S.AStatus) -> dict[str, Any]:
    doc = await ctx.f.status()
    if ctx.f.tier is not None and doc.get("activated"):
        cals = await ctx.f.tier.status()
        if cals:  # an offline root's CRL calendar, on the online box: what is left, and the warning
            doc["crl_calendars"] = cals
    return doc


async def _calendar_status(ctx: Ctx, req: S.ACrlCalendarStatus) -> dict[str, Any]:
    ctx.f._require_active()
    await _tier(ctx).publish_due()  # what is due is published before it is shown (the timer may be between ticks)
    return {"calendars": await _tier(ctx).status()}


def _clock_checked(handler: Handler, what: str) -> Handler:
    """A CA signing operation, refused (audited) while the clock is before the newest time the appliance signed at."""
    import inspect
    if inspect.isasyncgenfunction(handler):
        async def gen(ctx: Ctx, req: Any) -> AsyncIterator[bytes]:
            await _tier(ctx).check_clock(ctx.actor, what)
            async for chunk in handler(ctx, req):  # type: ignore[union-attr]
                yield chunk
        return gen

    async def run_checked(ctx: Ctx, req: Any) -> Any:
        await _tier(ctx).check_clock(ctx.actor, what)
        return await handler(ctx, req)  # type: ignore[misc]
    return run_checked


async def _clock_set(ctx: Ctx, req: S.AClockSet) -> dict[str, Any]:
    from .timeset import ClockSetter
    return await ClockSetter(ctx.f.store, ctx.f.sup_send, ctx.f.settings._waiting).set(req, ctx.actor)


async def _ssh_key(ctx: Ctx, req: S.AOfficerSshKey) -> dict[str, Any]:
    from .timeset import ClockSetter
    return await ClockSetter(ctx.f.store, ctx.f.sup_send, ctx.f.settings._waiting).ssh_key(req, ctx.actor)


async def _enrol_secret(ctx: Ctx, req) -> Any:
    from .enrolsecrets import EnrolSecrets
    es = EnrolSecrets(ctx.f.store, ctx.f.profiles)
    if isinstance(req, S.AEnrolSecretCreate):
        return await es.create(req.protocol, req.ca, req.profile, req.ttl_seconds, req.uses, req.ref, req.subject, ctx.actor,
                               req.approval)
    if isinstance(req, S.AEnrolSecretRevoke):
        return await es.revoke(req.ref, ctx.actor)
    return {"secrets": await es.list()}


async def _enrol_wait(ctx: Ctx, req) -> Any:
    gate = ctx.f.estscep
    if gate is None:
        raise FactoryError("not-found", "EST/SCEP enrolments wait only when the gateway is enabled")
    if isinstance(req, S.AEnrolDecide):
        officer = ctx.conn.session.officer if ctx.conn is not None and ctx.conn.session is not None else ""  # type: ignore[attr-defined]
        return await gate.decide(req.request, req.approve, req.reason, officer, ctx.actor)
    return await gate.waiting()


R = S.Reply
# The table. A request type missing here is refused to everyone (fail closed), and a test fails.
async def _eab(ctx: Ctx, req) -> Any:
    from .gateway import eab_admin  # the gateway's EAB keys live with the rest of its Factory side
    return await eab_admin(ctx.f.store, ctx.f.audit, ctx.actor, req)


TABLE: dict[type, AdminOp] = {
    S.AStatus: AdminOp(PUBLIC, None, _status, S.StatusReply),
    S.AActivate: AdminOp(PUBLIC, None, lambda c, r: c.f.activate(r.pin, c.actor), S.ActivateReply),
    S.AActivateShares: AdminOp(PUBLIC, None, lambda c, r: c.f.activate_shares(r.shares, c.actor), S.ActivateReply),
    S.ALogin: AdminOp(PUBLIC, None, lambda c, r: c.f.officers.login(_conn(c), r), S.LoginReply, session_bound=True),
    S.AResume: AdminOp(PUBLIC, None, lambda c, r: c.f.officers.resume(_conn(c), r.token), S.LoginReply, session_bound=True),
    S.ALogout: AdminOp(PUBLIC, None, lambda c, r: c.f.officers.logout(_conn(c)), S.LogoutReply, session_bound=True),
    # break-glass: authorised by a quorum of activation shares, not by an officer
    S.AOfficerUnlockShares: AdminOp(PUBLIC, None, lambda c, r: c.f.officers.unlock_shares(_conn(c), r), S.OfficerReply,
                                    session_bound=True),
    # CA names and certificate summaries: public data (the endpoint serves the certificates)
    S.ACaList: AdminOp(PUBLIC, None, lambda c, r: _doc("cas", c.f.ca_list()), S.CaListReply),
    S.ACaShow: AdminOp(ANY, None, lambda c, r: c.f.ca_show(r.name), S.CaReply),
    S.ACaExport: AdminOp(ANY, None, _ca_export, S.CaExportReply),
    # a CA's signature while the clock has gone backwards is refused (_clock_checked)
    S.ACaCreate: AdminOp(OPER, "ca-create", _clock_checked(lambda c, r: c.f.create_ca(r, parent=r.parent, actor=c.actor),
                                                           "ca-create"), S.CaReply),
    S.ACaCreateRoot: AdminOp(OPER, "ca-create", _clock_checked(lambda c, r: c.f.create_ca(r, parent=None, actor=c.actor),
                                                               "ca-create"), S.CaReply),
    S.ACaSignCsr: AdminOp(OPER, "ca-sign-csr", _clock_checked(lambda c, r: c.f.sign_csr_ca(r, c.actor), "ca-sign-csr"),
                          S.CaSignCsrReply),
    # two tiers: a CA key's request to a parent elsewhere, and the certificate it returned (guarded as ca-create)
    S.ACaRequest: AdminOp(OPER, "ca-create", _clock_checked(lambda c, r: _tier(c).request(r, c.actor), "ca-request"),
                          S.CaRequestReply),
    S.ACaInstall: AdminOp(OPER, "ca-create", lambda c, r: _tier(c).install(r, c.actor), S.CaReply),
    S.AIssue: AdminOp(OPER, None, lambda c, r: c.f.issue(r, c.actor), S.IssueReply),
    S.ACertShow: AdminOp(ANY, None, lambda c, r: c.f.cert_get(r.ca, int.from_bytes(r.serial, "big")), S.CertReply),
    S.ACertList: AdminOp(ANY, None, lambda c, r: _doc("certs", c.f.cert_list(r)), S.CertListReply),
    # "revoke-ca" applies only when the certificate is a CA's (Officers.guard checks)
    S.ARevoke: AdminOp(OPER, "revoke-ca", lambda c, r: c.f.revoke(r, c.actor), S.RevokeReply),
    S.AUnrevoke: AdminOp(OPER, "revoke-ca", lambda c, r: c.f.unrevoke(r, c.actor), S.UnrevokeReply),
    S.ACrlGenerate: AdminOp(OPER, None, _clock_checked(_crl_generate, "crl"), STREAM),
    S.ACrlExport: AdminOp(ANY, None, _crl_export, STREAM),
    # an offline root's CRLs signed ahead; the online box's calendar of them
    S.ACrlPresign: AdminOp(OPER, None, lambda c, r: _tier(c).presign(r, c.actor), S.CrlPresignReply),
    S.ACrlCalendarLoad: AdminOp(OPER, None, lambda c, r: _tier(c).load(r, c.actor), S.CalendarLoadReply),
    S.ACrlCalendarStatus: AdminOp(ANY, None, _calendar_status, S.CalendarStatusReply),
    S.AOcspStatus: AdminOp(ANY, None, lambda c, r: c.f.ocsp_status(), S.OcspStatusReply),
    S.AOcspResponderCert: AdminOp(OPER, None, lambda c, r: c.f.ocsp_responder_cert(r.ca, r.validity_days, c.actor),
                                  S.ResponderCertReply),
    S.AAuditExport: AdminOp(AUD, None, _audit_export, STREAM),
    S.AAuditCheckpoint: AdminOp(ANY, None, lambda c, r: c.f.checkpoints.sign(c.actor), S.CheckpointReply),
    S.AAuditCert: AdminOp(ANY, None, _audit_cert, S.AuditCertReply),
    S.AReconcile: AdminOp(OPER | AUD, None, _reconcile, S.ReconcileReply),
    S.AOfficerAdd: AdminOp(ADMIN, "officer", lambda c, r: c.f.officers.add(r, c.actor), S.OfficerReply),
    S.AOfficerRemove: AdminOp(ADMIN, "officer", lambda c, r: c.f.officers.remove(r.name, c.actor), S.OfficerReply),
    S.AOfficerUnlock: AdminOp(ADMIN, "officer", lambda c, r: c.f.officers.unlock(r.name, c.actor), S.OfficerReply),
    S.AOfficerPasswd: AdminOp(ADMIN, "officer", lambda c, r: c.f.officers.passwd(r.name, r.password, c.actor), S.OfficerReply,
                              self_service=True),
    S.AOfficerTotp: AdminOp(ADMIN, "officer", lambda c, r: c.f.officers.totp(r.name, r.enable, c.actor), S.OfficerReply,
                            self_service=True),
    S.AOfficerList: AdminOp(ADMIN | AUD, None, lambda c, r: c.f.officers.list(), S.OfficerListReply),
    S.APendingList: AdminOp(ANY, None, lambda c, r: c.f.officers.pending_list(r.open_only), S.PendingListReply),
    S.AApprove: AdminOp(ANY, None, _approve, S.ApproveReply, session_bound=True),
    S.ADistStatus: AdminOp(ANY, None, _dist_status, S.DistStatusReply),
    S.ADistList: AdminOp(ANY, None, _dist_list, S.DistListReply),
    S.ADistRetry: AdminOp(OPER, None, _dist_retry, S.DistRetryReply),
    # CRL-fed tenants: which other CAs the endpoint answers for is configuration; their CRLs are operations.
    S.AOcspTenantList: AdminOp(ANY, None, _tenant, S.TenantListReply),
    S.AOcspTenantAdd: AdminOp(ADMIN, None, _tenant, S.TenantReply),
    S.AOcspTenantUpdate: AdminOp(ADMIN, None, _tenant, S.TenantReply),
    S.AOcspTenantRemove: AdminOp(ADMIN, None, _tenant, S.TenantReply),
    S.AOcspTenantCsr: AdminOp(ADMIN, None, _tenant, S.TenantReply),
    S.AOcspTenantCrl: AdminOp(OPER, None, _tenant, S.TenantReply),
    S.AOcspTenantSerials: AdminOp(OPER, None, _tenant, S.TenantReply),
    # console, ceremonies (bound to this connection's session and officer), backup
    S.ACeremonyBegin: AdminOp(ANY, None, _ceremony, S.CeremonyReply, session_bound=True),
    S.ACeremonyWitness: AdminOp(ANY, None, _ceremony, S.CeremonyReply, session_bound=True),
    S.ACeremonyRecords: AdminOp(ANY, None, _ceremony, S.CeremonyReply, session_bound=True),
    S.ACeremonyRecord: AdminOp(ANY, None, _ceremony, S.CeremonyReply, session_bound=True),
    S.ABackup: AdminOp(ADMIN, None, _backup, STREAM),
    # key backup under custodian shares (keys.py): made under dual control, taken once by an administrator
    S.AKeysBackup: AdminOp(ADMIN, "keys-backup", _keys_backup, S.KeysBackupReply),
    S.AKeysBackupFetch: AdminOp(ADMIN, None, _keys_backup_fetch, S.KeysBackupReply),
    S.AShutdown: AdminOp(ADMIN, None, _shutdown, S.ShutdownReply),
    # HOME/donjon.toml, written by the supervisor on the Factory's audited request
    S.AConfigSet: AdminOp(ADMIN, None, lambda c, r: c.f.config_set(r.key, r.value, c.actor), S.ConfigSetReply),
    # CMP (issue 17): credentials officers give devices and RAs; enrolments that wait for a second officer
    S.ACmpCredentialAdd: AdminOp(OPER, None, lambda c, r: c.f.cmp.credential_add(r, c.actor), S.CmpCredentialReply),
    S.ACmpCredentialList: AdminOp(ANY, None, lambda c, r: c.f.cmp.credential_list(), S.CmpCredentialListReply),
    S.ACmpCredentialRevoke: AdminOp(OPER, None, lambda c, r: c.f.cmp.credential_revoke(r.ref, c.actor), S.CmpCredentialListReply),
    S.ACmpRequestList: AdminOp(ANY, None, lambda c, r: c.f.cmp.request_list(r.open_only), S.CmpRequestListReply),
    S.ACmpDecide: AdminOp(OPER, None, _cmp_decide, S.CmpRequestListReply, session_bound=True),
    # the clock, set by the supervisor (root) once dual control approved (console: clock)
    S.AClockSet: AdminOp(ADMIN, "clock-set", _clock_set, S.ClockSetReply),
    # an officer's SSH key for the console account: an officer change (dual control "officer"), written by the supervisor
    S.AOfficerSshKey: AdminOp(ADMIN, "officer", _ssh_key, S.OfficerSshKeyReply),
    # EST/SCEP enrolment secrets: operators hand them to devices; the Factory spends them (enrolsecrets.py)
    S.AEnrolSecretCreate: AdminOp(OPER, None, _enrol_secret, S.EnrolSecretReply),
    S.AEnrolSecretRevoke: AdminOp(OPER, None, _enrol_secret, S.EnrolSecretReply),
    S.AEnrolSecretList: AdminOp(OPER | AUD, None, _enrol_secret, S.EnrolSecretListReply),
    S.AEnrolWaiting: AdminOp(OPER | AUD, None, _enrol_wait, S.EnrolWaitReply),
    S.AEnrolDecide: AdminOp(OPER, None, _enrol_wait, S.EnrolWaitReply, session_bound=True),
    S.AAcmeEabAdd: AdminOp(ADMIN, None, _eab, S.EabReply),
    S.AAcmeEabList: AdminOp(ANY, None, _eab, S.EabListReply),
    S.AAcmeEabRevoke: AdminOp(ADMIN, None, _eab, S.EabReply),
    # the KGS (appliance/factory/kgs.py forwards to the KGS role): cards, PIN letters, key recovery
    S.AKgsPersonalise: AdminOp(OPER, None, lambda c, r: c.f.kgs.personalise(r, c.actor), S.KgsPersonaliseReply),
    S.AKgsCards: AdminOp(ANY, None, lambda c, r: c.f.kgs.cards(r), S.KgsCardsReply),
    S.AKgsLetters: AdminOp(OPER, None, lambda c, r: c.f.kgs.take_letters(r, c.actor), S.KgsLettersReply),
    S.AKgsLetterStatus: AdminOp(OPER, None, lambda c, r: c.f.kgs.letter_status(r, c.actor), S.KgsCardReply),
    S.AKgsReprint: AdminOp(OPER, None, lambda c, r: c.f.kgs.reprint(r, c.actor), S.KgsCardReply),
    # runs only at the last approval of dual control, with two officers at least (kgs.recover checks)
    S.AKgsRecover: AdminOp(OPER, "key-recovery", _kgs_recover, S.KgsRecoverReply),
    S.AKgsRecoverTake: AdminOp(OPER, None, _kgs_recover_take, S.KgsP12Reply, session_bound=True),
}


async def _doc(key: str, aw: Awaitable[Any]) -> dict[str, Any]:
    return {key: await aw}


def missing_rows(union=S.AdminRequest, table: dict[type, AdminOp] = TABLE) -> set[type]:
    """Admin request types without a row (the test of the table, and of itself, reads this)."""
    return {t for t in typing.get_args(union) if t is not S.Hello} - set(table)


async def run(f: Factory, req, ctx: Ctx) -> Any:
    """Run a request's handler to its one reply, of the row's type (at once, or at dual control's last approval)."""
    row = TABLE.get(type(req))
    if row is None or row.reply is STREAM:
        raise FactoryError("bad-request", f"unsupported request {type(req).__name__}")
    return as_reply(row.reply, await row.handler(ctx, req))  # type: ignore[misc]


def as_reply(cls: type, result: Any) -> Any:
    """A handler's result as the row's reply type. A document (dict) is converted and checked here, so
    a wrong shape is the Factory's internal error, never a reply a face misreads; the id is set at send."""
    if cls is S.Reply:
        if not isinstance(result, dict):
            raise TypeError(f"a {type(result).__name__} where the table says a document")
        return result
    if isinstance(result, dict):
        return msgspec.convert({**result, "id": 0}, cls)
    if not isinstance(result, cls):
        raise TypeError(f"a {type(result).__name__} where the table says {cls.__name__}")
    return result


async def serve(chan, req, f: Factory, conn: Conn) -> None:
    """Answer one authorised admin request: streamed, filed for dual control, or run at once."""
    rid = req.id
    row = TABLE[type(req)]
    ctx = Ctx(f, conn, conn.actor)
    if row.reply is STREAM:
        async for chunk in row.handler(ctx, req):  # type: ignore[union-attr]
            await chan.send(S.BlobChunk(id=rid, data=chunk, last=False))
        await chan.send(S.BlobChunk(id=rid, data=b"", last=True))
        return
    if not row.session_bound:
        guarded = await f.officers.guard(req, conn, row)
        if guarded is not None:
            await chan.send(reply_message(rid, as_reply(S.FiledReply, await f.officers.propose(req, guarded, conn))))
            return
    await chan.send(reply_message(rid, await run(f, req, ctx)))


def _plain(reply) -> dict[str, Any]:
    d = msgspec.to_builtins(reply)
    d.pop("t", None)
    d.pop("id", None)
    return d


def reply_message(rid: int, result: Any):
    """The wire message for a reply: a document goes in Reply, a typed reply carries the request's id."""
    if isinstance(result, dict):
        return S.Reply(id=rid, data=result)
    return msgspec.structs.replace(result, id=rid)

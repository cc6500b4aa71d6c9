"""Admin clients -> Factory: requests, officers, dual control, ceremonies, and their typed replies."""

from __future__ import annotations

from .gateway import *  # each link module sees the messages of those before it
from .common import _Msg
from msgspec import UNSET, UnsetType
from .kgs import *  # noqa: F403 - the KGS's link and its admin requests (a module of its own, issue 18)


# ---------------------------------------------------------------- admin clients -> Factory


class AStatus(_Msg, tag="status"):
    id: ReqId


class AActivate(_Msg, tag="activate"):
    id: ReqId
    pin: Pin


class ACaList(_Msg, tag="ca-list"):
    id: ReqId


class ACaShow(_Msg, tag="ca-show"):
    id: ReqId
    name: Name


class ACaCreate(_Msg, tag="ca-create"):
    id: ReqId
    name: Name
    parent: Name
    profile: Name
    key_type: KeyType
    subject: tuple[Attr, ...]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()  # empty: donjon.toml, else the default


class ACaSignCsr(_Msg, tag="ca-sign-csr"):
    id: ReqId
    parent: Name
    profile: Name
    csr: Der
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None


class ACaExport(_Msg, tag="ca-export"):
    id: ReqId
    name: Name


class AIssue(_Msg, tag="issue"):
    id: ReqId
    ca: Name
    profile: Name
    csrs: Annotated[list[Der], msgspec.Meta(min_length=1, max_length=1024)]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)] | None = None


class ACertShow(_Msg, tag="cert-show"):
    id: ReqId
    ca: Name
    serial: Serial


class ACertList(_Msg, tag="cert-list"):
    id: ReqId
    ca: Name | None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 1000  # a reply holds at most 10,000 (CertListReply)
    # Filters (all given must match): substrings of the subject or of a SAN (case-insensitive), the
    # status now, valid certificates expiring within N days, the profile.
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    san: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    status: Literal["valid", "revoked", "expired"] | None = None
    expires_within_days: Annotated[int, msgspec.Meta(ge=0, le=40 * 366)] | None = None
    profile: Name | None = None


class ARevoke(_Msg, tag="revoke"):
    id: ReqId
    ca: Name
    serial: Serial
    reason: Reason
    invalidity: Epoch | None = None


class AUnrevoke(_Msg, tag="unrevoke"):
    """Release a certificate from certificateHold: off the next full CRL, OCSP `good` again."""

    id: ReqId
    ca: Name
    serial: Serial


class ACrlGenerate(_Msg, tag="crl-generate"):
    id: ReqId
    ca: Name
    kind: Literal["crl", "issued-serials"] = "crl"
    delta: bool = False  # a delta CRL on the latest full CRL (a CA with crl.delta)


class ACrlExport(_Msg, tag="crl-export"):
    """The latest stored CRL of a CA (or CRL number `number`), streamed as BlobChunks."""

    id: ReqId
    ca: Name
    number: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None = None
    kind: Literal["crl", "issued-serials"] = "crl"


class AAuditExport(_Msg, tag="audit-export"):
    id: ReqId


class AReconcile(_Msg, tag="reconcile"):
    id: ReqId


class AOcspStatus(_Msg, tag="ocsp-status"):
    id: ReqId


class AOcspResponderCert(_Msg, tag="ocsp-responder-cert"):
    """Have the endpoint generate a delegated responder key and the CA certify it."""

    id: ReqId
    ca: Name
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=366)] = 30


class ADistStatus(_Msg, tag="dist-status"):
    """Per destination: backlog, oldest pending age, parked jobs, last success and last error."""

    id: ReqId


class ADistRetry(_Msg, tag="dist-retry"):
    """Put parked jobs back in the queue (all, one destination's, or one job) and retry at once."""

    id: ReqId
    rule: Name | None = None
    job: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None = None


class ADistList(_Msg, tag="dist-list"):
    """Jobs of one state (pending, parked, done), newest first."""

    id: ReqId
    state: Literal["pending", "parked", "done"] = "parked"
    rule: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100


Url = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]


class AOcspTenantAdd(_Msg, tag="ocsp-tenant-add"):
    id: ReqId
    name: Name
    ca_cert: Der
    crl_urls: Annotated[list[Url], msgspec.Meta(max_length=16)] = []
    refresh_seconds: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] = 3600
    unissued: Unissued = "unknown"
    push_secret: Annotated[bytes, msgspec.Meta(max_length=1024)] | None = None


class AOcspTenantUpdate(_Msg, tag="ocsp-tenant-update"):
    """Change what is given (None: unchanged); `responder_cert` installs the delegated responder."""

    id: ReqId
    name: Name
    crl_urls: Annotated[list[Url], msgspec.Meta(max_length=16)] | None = None
    refresh_seconds: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] | None = None
    unissued: Unissued | None = None
    push_secret: Annotated[bytes, msgspec.Meta(max_length=1024)] | None = None
    responder_cert: Der | None = None


class AOcspTenantRemove(_Msg, tag="ocsp-tenant-remove"):
    id: ReqId
    name: Name


class AOcspTenantList(_Msg, tag="ocsp-tenant-list"):
    id: ReqId


class AOcspTenantCsr(_Msg, tag="ocsp-tenant-csr"):
    id: ReqId
    name: Name


class AOcspTenantCrl(_Msg, tag="ocsp-tenant-crl"):
    """A CRL uploaded by an officer (e.g. from removable media at an offline site)."""

    id: ReqId
    name: Name
    crl: Annotated[bytes, msgspec.Meta(max_length=7 * 1024 * 1024)]


class AOcspTenantSerials(_Msg, tag="ocsp-tenant-serials"):
    """The tenant's issued-serials list (None clears it)."""

    id: ReqId
    name: Name
    data: Annotated[bytes, msgspec.Meta(max_length=7 * 1024 * 1024)] | None




# ---------------------------------------------------------------- officers, sessions, dual control, audit (issue #6)

SessionToken = Annotated[str, msgspec.Meta(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
OtpCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6,8}$")]
ShareText = Annotated[str, msgspec.Meta(min_length=1, max_length=1200)]


class ALogin(_Msg, tag="login"):
    """Authenticate an officer; the session is bound to this connection. Reply: token, officer, roles, idle_seconds."""

    id: ReqId
    officer: Name
    password: Password
    otp: OtpCode | None = None


class AResume(_Msg, tag="resume"):
    """Attach an existing session (from ALogin's token) to this connection. Reply: officer, roles."""

    id: ReqId
    token: SessionToken


class ALogout(_Msg, tag="logout"):
    """End this connection's session (everywhere it is attached)."""

    id: ReqId


class AOfficerAdd(_Msg, tag="officer-add"):
    id: ReqId
    name: Name
    roles: Annotated[tuple[OfficerRole, ...], msgspec.Meta(min_length=1, max_length=3)]
    password: Password


class AOfficerList(_Msg, tag="officer-list"):
    id: ReqId


class AOfficerRemove(_Msg, tag="officer-remove"):
    id: ReqId
    name: Name


class AOfficerPasswd(_Msg, tag="officer-passwd"):
    """Set an officer's password (an administrator, or the officer themself)."""

    id: ReqId
    name: Name
    password: Password


class AOfficerUnlock(_Msg, tag="officer-unlock"):
    id: ReqId
    name: Name


class AOfficerUnlockShares(_Msg, tag="officer-unlock-shares"):
    """Break-glass: unlock an officer (and optionally set a new password) on the authority of a quorum of
    activation shares, when no administrator can log in to do it."""

    id: ReqId
    name: Name
    shares: Annotated[list[ShareText], msgspec.Meta(min_length=1, max_length=16)]
    password: Password | None = None


class AOfficerTotp(_Msg, tag="officer-totp"):
    """Turn the TOTP second factor on (reply: secret, otpauth URI) or off."""

    id: ReqId
    name: Name
    enable: bool


class APendingList(_Msg, tag="pending-list"):
    """Dual-control requests (open ones, and the recently closed unless `open_only`)."""

    id: ReqId
    open_only: bool = True


class AApprove(_Msg, tag="approve"):
    """Approve a pending dual-control request; the M-th distinct approval runs it (reply: its result)."""

    id: ReqId
    request: ReqId


class AAuditCheckpoint(_Msg, tag="audit-checkpoint"):
    """Have the CIS sign the chain head now. Reply: the signed checkpoint (policy.audit.checkpoint_doc)."""

    id: ReqId


class AAuditCert(_Msg, tag="audit-cert"):
    """The audit key's self-issued certificate (PEM in the reply)."""

    id: ReqId


class AActivateShares(_Msg, tag="activate-shares"):
    """Activate with a quorum of PIN shares (policy.shamir); the Factory combines them."""

    id: ReqId
    shares: Annotated[list[ShareText], msgspec.Meta(min_length=1, max_length=16)]


# ---------------------------------------------------------------- console, ceremonies, backup (issue #6)


class ACaCreateRoot(_Msg, tag="ca-create-root"):
    """A new self-signed root in the HSM (a ceremony's root creation or root rollover)."""

    id: ReqId
    name: Name
    profile: Name
    key_type: KeyType
    subject: tuple[Attr, ...]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()


class AConfigSet(_Msg, tag="config-set"):
    """`donjon config set KEY VALUE`: one setting of HOME/donjon.toml (takes effect at the next start)."""

    id: ReqId
    key: Annotated[str, msgspec.Meta(max_length=64)]
    value: Annotated[str, msgspec.Meta(max_length=1024)]


class AShutdown(_Msg, tag="shutdown-request"):
    """Stop the appliance cleanly (the supervisor stops every role, as on SIGTERM)."""

    id: ReqId


class ABackup(_Msg, tag="backup"):
    """A consistent online copy of the encrypted CMDB and its wrapped key, streamed as a tar (BlobChunks)."""

    id: ReqId


class AKeysBackup(_Msg, tag="keys-backup"):
    """Back the token's keys up under a KEK split among custodians (dual control "keys-backup"). The
    result stays in the Factory's memory only (never in the CMDB, where a filed request's result is
    kept): the reply names it, and AKeysBackupFetch takes it once."""

    id: ReqId
    so_pin: Pin
    threshold: Annotated[int, msgspec.Meta(ge=2, le=16)]
    shares: Annotated[int, msgspec.Meta(ge=2, le=16)]


class AKeysBackupFetch(_Msg, tag="keys-backup-fetch"):
    id: ReqId
    backup: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]


class ACeremonyBegin(_Msg, tag="ceremony-begin"):
    """Open a ceremony: an audit record whose seq identifies it; its window starts at this session's login."""

    id: ReqId
    ceremony: Name


class ACeremonyWitness(_Msg, tag="ceremony-witness"):
    """This session's officer, logged in during the ceremony, witnesses it (an audit record of their own)."""

    id: ReqId
    ceremony_seq: Annotated[int, msgspec.Meta(ge=1)]


class ACeremonyRecords(_Msg, tag="ceremony-records"):
    """The audit records (seq, hash, action, object, outcome) the ceremony's witnesses made since it began."""

    id: ReqId
    ceremony_seq: Annotated[int, msgspec.Meta(ge=1)]


class CeremonyOperation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    seq: Annotated[int, msgspec.Meta(ge=1)]
    hash: Digest


class ACeremonyRecord(_Msg, tag="ceremony-record"):
    """Write a ceremony transcript's digest into the audit chain, bound to the ceremony's opening record,
    its witnesses' records and the audit records of its operations (all checked by the Factory), and
    have the audit key sign a checkpoint of exactly that record. Reply: the record, the signed
    checkpoint, the audit certificate (PEM), the bindings."""

    id: ReqId
    ceremony: Name
    transcript_sha256: Digest
    ceremony_seq: Annotated[int, msgspec.Meta(ge=1)]
    witnesses: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=32)]
    operations: Annotated[list[CeremonyOperation], msgspec.Meta(max_length=4096)] = []


class ACmpCredentialAdd(_Msg, tag="cmp-credential-add"):
    """A CMP credential for a device (a shared secret, returned once, by reference number) or an RA (its
    certificate): the CA and profile its enrolments get, optionally one subject, and whether each enrolment
    waits for the approval of an officer other than the one issuing it."""

    id: ReqId
    ca: Name
    profile: Name
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = None
    subject: Annotated[str, msgspec.Meta(max_length=512)] | None = None  # RFC 4514
    uses: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 7
    approval: bool = False
    ra_cert: Der | None = None


class ACmpCredentialList(_Msg, tag="cmp-credential-list"):
    id: ReqId


class ACmpCredentialRevoke(_Msg, tag="cmp-credential-revoke"):
    id: ReqId
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ACmpRequestList(_Msg, tag="cmp-request-list"):
    id: ReqId
    open_only: bool = True


class ACmpDecide(_Msg, tag="cmp-decide"):
    """Approve (issue) or reject a CMP enrolment that waits for an officer."""

    id: ReqId
    request: Annotated[int, msgspec.Meta(ge=1)]
    approve: bool
    reason: Annotated[str, msgspec.Meta(max_length=400)] = ""
class ACaRequest(_Msg, tag="ca-request"):
    """A CA's key made in the token (not for renew) and its PKCS#10 request, signed there: the CA then awaits its certificate."""

    id: ReqId
    name: Name
    profile: Name
    key_type: KeyType
    subject: tuple[Attr, ...]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()
    # renew: the same key, a new certificate; rekey: a new key, installed as the successor CA `NAME.kN`
    mode: Literal["new", "renew", "rekey"] = "new"


class ACaInstall(_Msg, tag="ca-install"):
    """The certificate a parent elsewhere returned for a CA request, its chain, and (once) the trust anchor."""

    id: ReqId
    name: Name
    cert: Der
    chain: Annotated[list[Der], msgspec.Meta(max_length=8)] = []
    anchor: Der | None = None


class ACrlPresign(_Msg, tag="crl-presign"):
    """Sign a CA's next `periods` CRLs ahead (an offline root's calendar), returned as one bundle."""

    id: ReqId
    ca: Name
    periods: Annotated[int, msgspec.Meta(ge=1, le=120)]
    every_seconds: Annotated[int, msgspec.Meta(ge=3600, le=366 * 86400)]
    overlap_seconds: Annotated[int, msgspec.Meta(ge=0, le=366 * 86400)] = 0
    start: Epoch | None = None


class ACrlCalendarLoad(_Msg, tag="crl-calendar-load"):
    id: ReqId
    bundle: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]


class ACrlCalendarStatus(_Msg, tag="crl-calendar-status"):
    id: ReqId


class AClockSet(_Msg, tag="clock-set"):
    """Set the appliance's system and hardware clocks (seconds since 1970, UTC): dual-controlled, audited."""

    id: ReqId
    time: Epoch


class AOfficerSshKey(_Msg, tag="officer-ssh-key"):
    """Enrol an officer's SSH public key (one OpenSSH line) for the SSH console account, or remove it (key None)."""

    id: ReqId
    name: Name
    key: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


# ---------------------------------------------------------------- EST/SCEP enrolment secrets (officers make them)


class AEnrolSecretCreate(_Msg, tag="enrol-secret-create"):
    """A secret a device presents once (SCEP challenge password) or a few times (EST Basic password)."""

    id: ReqId
    protocol: Literal["est", "scep"]
    ca: Name
    profile: Name
    ttl_seconds: Annotated[int, msgspec.Meta(ge=60, le=90 * 86400)] = 86400
    uses: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1
    ref: Name | None = None  # the EST user name / the reference the officer hands over; made up when absent
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None  # CN pattern it admits
    approval: bool = False  # enrolments under it wait for another officer's decision (enrol-decide)


class AEnrolSecretList(_Msg, tag="enrol-secret-list"):
    id: ReqId


class AEnrolSecretRevoke(_Msg, tag="enrol-secret-revoke"):
    id: ReqId
    ref: Name


class AEnrolWaiting(_Msg, tag="enrol-waiting"):
    """Gateway enrolments (EST/SCEP) waiting for an officer's decision."""

    id: ReqId


class AEnrolDecide(_Msg, tag="enrol-decide"):
    id: ReqId
    request: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    approve: bool
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""
class AAcmeEabAdd(_Msg, tag="acme-eab-add"):
    """An ACME external account binding key: the HMAC key is shown once, in the reply."""

    id: ReqId
    profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=32)] = ()  # ACME profile names it allows (empty: all)
    name_patterns: Annotated[tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=253,
                                                                pattern=r"^(\*|(\*\.)?[A-Za-z0-9._-]+)$")], ...],
                             msgspec.Meta(max_length=64)] = ()  # names its account may get (empty: the gateway's)


class AAcmeEabList(_Msg, tag="acme-eab-list"):
    id: ReqId


class AAcmeEabRevoke(_Msg, tag="acme-eab-revoke"):
    """Revoke an EAB key: its account gets nothing more (the Factory refuses its enrolments)."""

    id: ReqId
    kid: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


AdminRequest = Union[
    Hello, AStatus, AActivate, ACaList, ACaShow, ACaCreate, ACaSignCsr, ACaExport, AIssue,
    ACertShow, ACertList, ARevoke, AUnrevoke, ACrlGenerate, ACrlExport, AAuditExport, AReconcile, AOcspStatus, AOcspResponderCert,
    ADistStatus, ADistRetry, ADistList,
    AOcspTenantAdd, AOcspTenantUpdate, AOcspTenantRemove, AOcspTenantList, AOcspTenantCsr, AOcspTenantCrl,
    AOcspTenantSerials,
    ALogin, AResume, ALogout, AOfficerAdd, AOfficerList, AOfficerRemove, AOfficerPasswd, AOfficerUnlock, AOfficerTotp,
    AOfficerUnlockShares, APendingList, AApprove, AAuditCheckpoint, AAuditCert, AActivateShares,
    ACaCreateRoot, AShutdown, ABackup, ACeremonyRecord, ACeremonyBegin, ACeremonyWitness, ACeremonyRecords, AConfigSet,
    AKeysBackup, AKeysBackupFetch,
    ACmpCredentialAdd, ACmpCredentialList, ACmpCredentialRevoke, ACmpRequestList, ACmpDecide,
    ACaRequest, ACaInstall, ACrlPresign, ACrlCalendarLoad, ACrlCalendarStatus, AClockSet, AOfficerSshKey,
    AEnrolSecretCreate, AEnrolSecretList, AEnrolSecretRevoke, AEnrolWaiting, AEnrolDecide,
    AAcmeEabAdd, AAcmeEabList, AAcmeEabRevoke,
    AKgsPersonalise, AKgsCards, AKgsLetters, AKgsLetterStatus, AKgsReprint, AKgsRecover, AKgsRecoverTake,
]


class Reply(_Msg, tag="reply"):
    """Generic answer: `data` is a JSON-able document whose shape each command documents."""

    id: ReqId
    data: dict[str, object]


class IssueReply(_Msg, tag="issue-reply"):
    id: ReqId
    results: list[IssueOutcome]
    serials: list[Annotated[str, msgspec.Meta(max_length=40)] | None]  # hex


class BlobChunk(_Msg, tag="blob"):
    """A streamed result (CRL DER, audit export); `last` closes the stream."""

    id: ReqId
    data: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)]
    last: bool


# ---------------------------------------------------------------- typed replies, one per request family
# Strict like the requests (the client decodes them with AdminReply); omit_defaults keeps an absent
# optional field absent, so every face reads the same document as when replies were dicts.

HexSerial = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[0-9a-f]+$")]
Pem = Annotated[str, msgspec.Meta(max_length=128 * 1024)]
IsoTime = Annotated[str, msgspec.Meta(max_length=40)]
LongText = Annotated[str, msgspec.Meta(max_length=64 * 1024)]  # a subject or SAN list as stored


class _Reply(_Msg, omit_defaults=True):
    pass


class RevokeReply(_Reply, tag="revoke-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    revoked_at: Epoch
    reason: Reason
    was_on_hold: bool
    known_by_serial_only: bool = False  # recovered by a restore: no directory entry updated


class UnrevokeReply(_Reply, tag="unrevoke-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    released: bool
    held_since: Epoch


class CertReply(_Reply, tag="cert-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    profile: Name
    subject: LongText
    not_before: Epoch
    not_after: Epoch
    issued_at: Epoch
    revoked_at: Epoch | None
    reason: Reason | None
    pem: Pem


class CertSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ca: Name
    serial: HexSerial
    profile: Name
    subject: LongText
    not_after: Epoch
    revoked: bool
    expired: bool
    sans: LongText


class CertListReply(_Reply, tag="cert-list-reply"):
    id: ReqId
    certs: Annotated[list[CertSummary], msgspec.Meta(max_length=10000)]


class CaInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    key_type: KeyType
    parent: Name | None
    profile: Name
    subject: Text
    serial: HexSerial
    not_before: IsoTime
    not_after: IsoTime
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    state: Text
    state_reason: Text
    issues: Text  # what the CA may issue (policy.capolicy.CaPolicy.describe)


class CaReply(_Reply, tag="ca-reply"):
    """ca-show, ca-create, ca-create-root: the CA's summary (CaInfo's fields; state and issues in ca-show)."""

    id: ReqId
    name: Name
    key_type: KeyType
    parent: Name | None
    profile: Name
    subject: Text
    serial: HexSerial
    not_before: IsoTime
    not_after: IsoTime
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    state: Text | None = None
    state_reason: Text | None = None
    issues: Text | None = None


class CaListReply(_Reply, tag="ca-list-reply"):
    id: ReqId
    cas: Annotated[list[CaInfo], msgspec.Meta(max_length=4096)]


class CaExportReply(_Reply, tag="ca-export-reply"):
    id: ReqId
    chain: Annotated[list[Annotated[str, msgspec.Meta(max_length=128 * 1024)]], msgspec.Meta(max_length=64)]  # DER, hex


class CaSignCsrReply(_Reply, tag="ca-sign-csr-reply"):
    id: ReqId
    serial: HexSerial
    cert: Pem


class LoginReply(_Reply, tag="login-reply"):
    """login (token, idle_seconds) and resume (without them): the session's officer and roles."""

    id: ReqId
    officer: Name
    roles: Annotated[list[OfficerRole], msgspec.Meta(max_length=3)]
    token: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    idle_seconds: Annotated[int, msgspec.Meta(ge=0)] | None = None


class LogoutReply(_Reply, tag="logout-reply"):
    id: ReqId
    logged_out: bool


class OfficerReply(_Reply, tag="officer-reply"):
    """officer-add (name, roles), -remove (removed), -passwd (name, password), -unlock and -unlock-shares
    (name, locked, password), -totp (name, totp, and when turned on: secret, uri)."""

    id: ReqId
    name: Name | None = None
    roles: Annotated[list[OfficerRole], msgspec.Meta(max_length=3)] | None = None
    removed: Name | None = None
    password: Literal["changed", "unchanged"] | None = None
    locked: bool | None = None
    totp: bool | None = None
    secret: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    uri: Annotated[str, msgspec.Meta(max_length=512)] | None = None


class OfficerInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    roles: Annotated[list[OfficerRole], msgspec.Meta(max_length=3)]
    totp: bool
    failures: Annotated[int, msgspec.Meta(ge=0)]
    locked: bool
    created: Epoch


class OfficerListReply(_Reply, tag="officer-list-reply"):
    id: ReqId
    officers: Annotated[list[OfficerInfo], msgspec.Meta(max_length=10000)]


class KeysBackupReply(_Reply, tag="keys-backup-reply"):
    """A key backup made (AKeysBackup) or taken (AKeysBackupFetch: blob and shares, once)."""

    id: ReqId
    backup: int
    manifest_sha256: Annotated[str, msgspec.Meta(max_length=64)]
    keys: Annotated[list[Name], msgspec.Meta(max_length=256)]
    threshold: int
    blob: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)] | None = None
    shares: Annotated[list[Annotated[str, msgspec.Meta(max_length=1200)]], msgspec.Meta(max_length=16)] | None = None


# A field that is UNSET is left out of the document (a key the dict reply did not have); one that is
# None is sent as null (a key the dict reply had, with no value): the faces read the same documents.
Count = Annotated[int, msgspec.Meta(ge=0)]
Hex64 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class _Info(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class CheckpointRef(_Info):
    seq: Count
    head: Hex64
    time: Epoch


class DestinationBrief(_Info):
    backlog: Count
    failing: bool


class StatusReply(_Reply, tag="status-reply"):
    """status: what anyone may know (activated, token, counters, CIS liveness); the CMDB's part once activated."""

    id: ReqId
    activated: bool
    token: Text
    stats: dict[Name, Count]
    pending: Count
    cis: dict[Name, Literal["responsive", "unresponsive"]]
    cas: Annotated[list[Name], msgspec.Meta(max_length=4096)] | UnsetType = UNSET
    certificates: Count | UnsetType = UNSET
    revoked: Count | UnsetType = UNSET
    audit_records: Count | UnsetType = UNSET
    audit_head: Hex64 | None | UnsetType = UNSET
    distribution: dict[Name, DestinationBrief] | UnsetType = UNSET
    audit_checkpoint: CheckpointRef | None | UnsetType = UNSET
    crl_calendars: Annotated[list[CalendarInfo], msgspec.Meta(max_length=64)] | UnsetType = UNSET  # on an online box


class ActivateReply(_Reply, tag="activate-reply"):
    """activate, activate-shares."""

    id: ReqId
    activated: bool
    token: Text
    voided_intents: Count


class ShutdownReply(_Reply, tag="shutdown-reply"):
    id: ReqId
    stopping: bool


class ConfigSetReply(_Reply, tag="config-set-reply"):
    id: ReqId
    key: Annotated[str, msgspec.Meta(max_length=64)]
    message: Text


class CheckpointReply(_Reply, tag="checkpoint-reply"):
    """audit-checkpoint: the signed head as published (policy.audit.checkpoint_doc)."""

    id: ReqId
    type: Literal["checkpoint"]
    seq: Count
    head: Hex64
    time: Epoch
    tbs: Annotated[str, msgspec.Meta(max_length=4096)]  # base64
    signature: Annotated[str, msgspec.Meta(max_length=4096)]  # base64
    alg: Annotated[str, msgspec.Meta(max_length=64)]


class AuditCertReply(_Reply, tag="audit-cert-reply"):
    id: ReqId
    cert: Pem


class VoidedIntent(_Info):
    seq: Count
    ts: Epoch
    object: Text
    detail: Text


class ReconcileReply(_Reply, tag="reconcile-reply"):
    id: ReqId
    voided: Annotated[list[VoidedIntent], msgspec.Meta(max_length=100000)]


class DestinationInfo(_Info):
    rule: Name
    url: Url | None
    configured: bool
    pending: Count
    parked: Count
    oldest_pending_age: int | None
    in_flight: Count
    failing: bool
    consecutive_failures: Count
    last_success: Epoch | None
    last_error: Text | None
    last_error_at: Epoch | None
    retry_in: float


class TenantFetchInfo(_Info):
    tenant: Name
    failures: Count
    retry_in: float
    last_fetch: Epoch | None
    last_result: Text | None
    last_error: Text | None
    last_error_at: Epoch | None
    in_flight: bool


class DistStatusReply(_Reply, tag="dist-status-reply"):
    id: ReqId
    destinations: Annotated[list[DestinationInfo], msgspec.Meta(max_length=4096)]
    agent: bool
    tenant_fetches: Annotated[list[TenantFetchInfo], msgspec.Meta(max_length=4096)]


class DistJobInfo(_Info):
    id: Count
    rule: Name
    action: Annotated[str, msgspec.Meta(max_length=64)]
    ca: Name | None
    serial: Annotated[str, msgspec.Meta(max_length=256)] | None  # the job's reference, hex
    number: Count | None
    created: Epoch
    attempts: Count
    last_at: Epoch | None
    last_error: Text | None
    done_at: Epoch | None


class DistListReply(_Reply, tag="dist-list-reply"):
    id: ReqId
    jobs: Annotated[list[DistJobInfo], msgspec.Meta(max_length=10000)]


class DistRetryReply(_Reply, tag="dist-retry-reply"):
    id: ReqId
    requeued: Count


class OcspCaInfo(_Info):
    ca: Name
    responses: Count
    revoked: Count
    oldest_this_update: Epoch | None
    earliest_next_update: Epoch | None
    next_refresh: Epoch | None
    queued: Count
    lapsed: bool


class EndpointCounters(_Info):
    """The endpoint's counters (OcspStats' fields, as the supervisor sums them)."""

    requests: Count
    good: Count
    revoked: Count
    unauthorized: Count
    malformed: Count
    errors: Count
    responses_held: Count
    oldest_this_update: Epoch | None


class TenantCrlCounters(_Info):
    tenants: Count
    accepted: Count
    refused: Count


class OcspStatusReply(_Reply, tag="ocsp-status-reply"):
    id: ReqId
    endpoint_connected: bool
    endpoints: Annotated[list[Name], msgspec.Meta(max_length=64)]
    cas: Annotated[list[OcspCaInfo], msgspec.Meta(max_length=4096)]
    endpoint: EndpointCounters | None
    tenant_crls: TenantCrlCounters


class ResponderCertReply(_Reply, tag="responder-cert-reply"):
    id: ReqId
    ca: Name
    serial: HexSerial
    label: Annotated[str, msgspec.Meta(max_length=128)]
    not_after: IsoTime
    cert: Pem


Document = dict[str, object]  # an earlier reply embedded as JSON data (a dual-control request's result)
Summary = Annotated[str, msgspec.Meta(max_length=1024)]


class FiledReply(_Reply, tag="filed-reply"):
    """A guarded request filed for dual control (any guarded request's answer until the M-th approval)."""

    id: ReqId
    pending: Count
    operation: Name
    summary: Summary
    approvals: Count
    required: Count
    expires: Epoch


class PendingInfo(_Info):
    id: Count
    operation: Name
    summary: Summary
    requester: Name
    created: Epoch
    expires: Epoch
    state: Annotated[str, msgspec.Meta(max_length=16)]
    approvals: Annotated[list[Name], msgspec.Meta(max_length=64)]
    required: Count
    result: Document | None


class PendingListReply(_Reply, tag="pending-list-reply"):
    id: ReqId
    pending: Annotated[list[PendingInfo], msgspec.Meta(max_length=1000)]


class ApproveReply(_Reply, tag="approve-reply"):
    """approve: the approvals so far; at the M-th, `executed` and the request's own reply as `result`."""

    id: ReqId
    request: Count
    approvals: Count
    required: Count
    executed: bool
    result: Document | UnsetType = UNSET


class ResponderBrief(_Info):
    serial: HexSerial
    not_after: IsoTime


class TenantInfo(_Info):
    name: Name
    ca: Text
    crl_urls: Annotated[list[Url], msgspec.Meta(max_length=16)]
    refresh_seconds: Count
    unissued: Unissued
    push: bool
    key_label: Annotated[str, msgspec.Meta(max_length=128)] | None
    responder: ResponderBrief | None
    crl_number: Count | None
    crl_this_update: Epoch | None
    crl_next_update: Epoch | None
    crl_source: Text | None
    stale: bool
    issued_serials: bool
    last_refusal: Text | None


class TenantListReply(_Reply, tag="tenant-list-reply"):
    id: ReqId
    tenants: Annotated[list[TenantInfo], msgspec.Meta(max_length=4096)]


class TenantReply(_Reply, tag="tenant-reply"):
    """ocsp-tenant add and update (the tenant, TenantInfo's fields; update: responder_nocheck when a
    responder certificate came), remove (removed), csr (tenant, label, csr), crl (tenant, crl_number,
    next_update), serials (tenant, serials)."""

    id: ReqId
    name: Name | UnsetType = UNSET
    ca: Text | UnsetType = UNSET
    crl_urls: Annotated[list[Url], msgspec.Meta(max_length=16)] | UnsetType = UNSET
    refresh_seconds: Count | UnsetType = UNSET
    unissued: Unissued | UnsetType = UNSET
    push: bool | UnsetType = UNSET
    key_label: Annotated[str, msgspec.Meta(max_length=128)] | None | UnsetType = UNSET
    responder: ResponderBrief | None | UnsetType = UNSET
    crl_number: Count | None | UnsetType = UNSET
    crl_this_update: Epoch | None | UnsetType = UNSET
    crl_next_update: Epoch | None | UnsetType = UNSET
    crl_source: Text | None | UnsetType = UNSET
    stale: bool | UnsetType = UNSET
    issued_serials: bool | UnsetType = UNSET
    last_refusal: Text | None | UnsetType = UNSET
    responder_nocheck: bool | None | UnsetType = UNSET
    removed: Name | UnsetType = UNSET
    tenant: Name | UnsetType = UNSET
    label: Annotated[str, msgspec.Meta(max_length=128)] | UnsetType = UNSET
    csr: Pem | UnsetType = UNSET
    next_update: Epoch | None | UnsetType = UNSET
    serials: Count | None | UnsetType = UNSET


class CeremonyOp(_Info):
    seq: Count
    hash: Hex64
    action: Annotated[str, msgspec.Meta(max_length=64)]
    object: Text
    outcome: Annotated[str, msgspec.Meta(max_length=32)]
    officer: Name | None


class AuditRecordInfo(_Info):
    seq: Count
    ts: Epoch
    actor: Text
    action: Annotated[str, msgspec.Meta(max_length=64)]
    object: Text
    outcome: Annotated[str, msgspec.Meta(max_length=32)]
    detail: Text
    prev: Hex64
    hash: Hex64


class CheckpointDoc(_Info):
    type: Literal["checkpoint"]
    seq: Count
    head: Hex64
    time: Epoch
    tbs: Annotated[str, msgspec.Meta(max_length=4096)]
    signature: Annotated[str, msgspec.Meta(max_length=4096)]
    alg: Annotated[str, msgspec.Meta(max_length=64)]


class CeremonyReply(_Reply, tag="ceremony-reply"):
    """ceremony-begin (ceremony_seq, hash, window_start), -witness (seq, hash, officer, login_seq),
    -records (records), -record (record, checkpoint, audit_cert)."""

    id: ReqId
    ceremony_seq: Count | UnsetType = UNSET
    hash: Hex64 | UnsetType = UNSET
    window_start: Count | UnsetType = UNSET
    seq: Count | UnsetType = UNSET
    officer: Name | UnsetType = UNSET
    login_seq: Count | UnsetType = UNSET
    records: Annotated[list[CeremonyOp], msgspec.Meta(max_length=4096)] | UnsetType = UNSET
    record: AuditRecordInfo | UnsetType = UNSET
    checkpoint: CheckpointDoc | UnsetType = UNSET
    audit_cert: Pem | UnsetType = UNSET


class CmpCredentialReply(_Reply, tag="cmp-credential-reply"):
    id: ReqId
    ref: str
    kind: str
    ca: str
    profile: str
    expires: int
    secret: str | None = None  # shown once, at creation; never stored anywhere but the CMDB


class CmpCredentialInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    ref: str
    kind: str
    ca: str
    profile: str
    approval: bool
    uses_left: int
    created: int
    created_by: str
    expires: int
    failures: int
    subject: str | None = None
    revoked: int | None = None


class CmpCredentialListReply(_Reply, tag="cmp-credential-list-reply"):
    id: ReqId
    credentials: list[CmpCredentialInfo]


class CmpRequestInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: int
    ref: str
    ca: str
    profile: str
    subject: str
    sans: str
    created: int
    state: str
    decided_by: str | None = None
    reason: str | None = None
    serial: str | None = None


class CmpRequestListReply(_Reply, tag="cmp-request-list-reply"):
    id: ReqId
    requests: list[CmpRequestInfo]
class CaRequestReply(_Reply, tag="ca-request-reply"):
    id: ReqId
    name: Name  # for a rekey, the successor's name (ca install takes it)
    state: Text
    mode: Literal["new", "renew", "rekey"]
    key_type: KeyType
    csr: Pem
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class CalendarInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ca: Name
    remaining: Annotated[int, msgspec.Meta(ge=0)]
    covered_until: Epoch | None
    current: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None
    current_next_update: Epoch | None
    warning: Text | None


class ClockSetReply(_Reply, tag="clock-set-reply"):
    id: ReqId
    time: Epoch
    message: Text


class OfficerSshKeyReply(_Reply, tag="officer-ssh-key-reply"):
    id: ReqId
    officer: Name
    fingerprint: Text | None
    message: Text


class CrlPresignReply(_Reply, tag="crl-presign-reply"):
    id: ReqId
    ca: Name
    first: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    last: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    bundle: Annotated[str, msgspec.Meta(max_length=4 * 1024 * 1024)]


class CalendarLoadReply(_Reply, tag="crl-calendar-load-reply"):
    id: ReqId
    ca: Name
    first: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    last: Annotated[int, msgspec.Meta(ge=1, lt=2**62)]
    new: Annotated[int, msgspec.Meta(ge=0)]
    remaining: Annotated[int, msgspec.Meta(ge=0)]
    covered_until: Epoch | None
    current: Annotated[int, msgspec.Meta(ge=1, lt=2**62)] | None
    current_next_update: Epoch | None
    warning: Text | None


class CalendarStatusReply(_Reply, tag="crl-calendar-status-reply"):
    id: ReqId
    calendars: Annotated[list[CalendarInfo], msgspec.Meta(max_length=64)]


class EnrolSecretReply(_Reply, tag="enrol-secret-reply"):
    """enrol-secret-create (everything; `secret` shown this once) and -revoke (ref, revoked)."""

    id: ReqId
    ref: Name
    protocol: Literal["est", "scep"] | None = None
    secret: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    ca: Name | None = None
    profile: Name | None = None
    expires: int | None = None
    uses: int | None = None
    revoked: bool | None = None
    approval: bool | None = None


class EnrolSecretInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ref: Name
    protocol: Literal["est", "scep"]
    ca: Name
    profile: Name
    subject: Annotated[str, msgspec.Meta(max_length=128)]
    uses_left: int
    expires: int
    created_by: Annotated[str, msgspec.Meta(max_length=128)]
    state: Literal["usable", "used", "expired", "revoked"]


class EnrolSecretListReply(_Reply, tag="enrol-secret-list-reply"):
    id: ReqId
    secrets: Annotated[list[EnrolSecretInfo], msgspec.Meta(max_length=100000)]


class EnrolWaitInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request: Annotated[str, msgspec.Meta(max_length=64)]
    protocol: Annotated[str, msgspec.Meta(max_length=16)]
    credential: Annotated[str, msgspec.Meta(max_length=400)]
    ca: Name
    profile: Name
    summary: Annotated[str, msgspec.Meta(max_length=1000)]
    created: int
    state: Literal["waiting", "issued", "rejected"]
    decided_by: Annotated[str, msgspec.Meta(max_length=400)] = ""
    serial: Annotated[str, msgspec.Meta(max_length=40)] = ""


class EnrolWaitReply(_Reply, tag="enrol-wait-reply"):
    """enrol-waiting (requests) and enrol-decide (the one decided)."""

    id: ReqId
    requests: Annotated[list[EnrolWaitInfo], msgspec.Meta(max_length=10000)]


class EabInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    kid: Annotated[str, msgspec.Meta(max_length=128)]
    created_by: Text
    created_at: Epoch
    profiles: tuple[Name, ...] = ()
    name_patterns: tuple[Annotated[str, msgspec.Meta(max_length=253)], ...] = ()
    account: Text | None = None  # the ACME account it is bound to
    revoked_at: Epoch | None = None


class EabReply(_Reply, tag="eab-reply"):
    id: ReqId
    eab: EabInfo
    hmac_key: Annotated[str, msgspec.Meta(max_length=128)] | None = None  # base64url, only when made


class EabListReply(_Reply, tag="eab-list-reply"):
    id: ReqId
    keys: Annotated[list[EabInfo], msgspec.Meta(max_length=100000)]


TypedReply = Union[RevokeReply, UnrevokeReply, CertReply, CertListReply, CaReply, CaListReply, CaExportReply,
                   CaSignCsrReply, LoginReply, LogoutReply, OfficerReply, OfficerListReply, EabReply, EabListReply,
                   CmpCredentialReply, CmpCredentialListReply, CmpRequestListReply,
                   EnrolSecretReply, EnrolSecretListReply, EnrolWaitReply, KeysBackupReply,
                   KgsCardsReply, KgsPersonaliseReply, KgsLettersReply, KgsCardReply, KgsRecoverReply, KgsP12Reply,
                   StatusReply, ActivateReply,
                   ShutdownReply, ConfigSetReply, CheckpointReply, AuditCertReply, ReconcileReply, DistStatusReply,
                   DistListReply, DistRetryReply, OcspStatusReply, ResponderCertReply, FiledReply, PendingListReply,
                   ApproveReply, TenantListReply, TenantReply, CeremonyReply,
                   CaRequestReply, CrlPresignReply, CalendarLoadReply, CalendarStatusReply, ClockSetReply,
                   OfficerSshKeyReply]


AdminReply = Union[Hello, Reply, IssueReply, BlobChunk, Refused, TypedReply]

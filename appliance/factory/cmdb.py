"""The encrypted CM database: the only module in Donjon that opens it.

SQLite3 Multiple Ciphers through apsw, an authenticated cipher, WAL, synchronous=FULL (checked),
a versioned schema with migrations, and the hash-chained audit log written in the same transaction
as the action it records. Not thread-safe: the Factory serialises every call (one DB thread).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import apsw

from policy.audit import GENESIS, audit_hash, verify_chain

SCHEMA_VERSION = 20

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE cas(
        name TEXT PRIMARY KEY,
        key_label TEXT UNIQUE NOT NULL,
        key_type TEXT NOT NULL,
        parent TEXT REFERENCES cas(name),
        profile TEXT NOT NULL,
        cert BLOB NOT NULL,
        created INTEGER NOT NULL,
        crl_number INTEGER NOT NULL DEFAULT 0
    );
    -- Every serial ever reserved, whatever became of it: a serial is never used twice.
    CREATE TABLE serials(
        serial BLOB PRIMARY KEY,
        ca TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('intent', 'issued', 'void')),
        reserved INTEGER NOT NULL,
        request BLOB
    ) WITHOUT ROWID;
    CREATE TABLE certs(
        serial BLOB PRIMARY KEY REFERENCES serials(serial),
        ca TEXT NOT NULL REFERENCES cas(name),
        profile TEXT NOT NULL,
        subject TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        der BLOB NOT NULL,
        request BLOB
    ) WITHOUT ROWID;
    CREATE INDEX certs_ca ON certs(ca, issued_at);
    CREATE TABLE revocations(
        ca TEXT NOT NULL,
        serial BLOB NOT NULL REFERENCES certs(serial),
        revoked_at INTEGER NOT NULL,
        reason INTEGER,
        invalidity INTEGER,
        entry_len INTEGER NOT NULL,
        PRIMARY KEY (ca, serial)
    ) WITHOUT ROWID;
    CREATE TABLE crls(
        ca TEXT NOT NULL,
        number INTEGER NOT NULL,
        this_update INTEGER NOT NULL,
        next_update INTEGER NOT NULL,
        entries INTEGER NOT NULL,
        sha256 BLOB NOT NULL,
        der BLOB NOT NULL,
        PRIMARY KEY (ca, number)
    );
    CREATE TABLE audit(
        seq INTEGER PRIMARY KEY,
        ts INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        object TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    """,
    2: """
    -- Pre-produced OCSP responses (RFC 6960 §2.5), one row per certificate, re-signed at refresh_at.
    -- seq orders publication to the OCSP endpoint, which resumes from the highest seq it holds.
    CREATE TABLE ocsp(
        ca TEXT NOT NULL,
        serial BLOB NOT NULL,
        status INTEGER NOT NULL,
        this_update INTEGER NOT NULL,
        next_update INTEGER NOT NULL,
        refresh_at INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        sha1 BLOB,
        sha256 BLOB,
        PRIMARY KEY (ca, serial)
    ) WITHOUT ROWID;
    CREATE INDEX ocsp_refresh ON ocsp(refresh_at);
    CREATE UNIQUE INDEX ocsp_seq ON ocsp(seq);
    -- Certificates whose response must be (re)signed now: written in the issuance or revocation transaction.
    CREATE TABLE ocsp_queue(ca TEXT NOT NULL, serial BLOB NOT NULL, PRIMARY KEY (ca, serial)) WITHOUT ROWID;
    INSERT OR IGNORE INTO ocsp_queue SELECT ca, serial FROM certs;
    """,
    3: """
    -- The Distribution queue: one row per publication, written in the transaction of the event that
    -- caused it; done only when the agent acknowledged it. `ref` is the serial (cert, uncert) and
    -- `number` the CRL or list number. Per destination, jobs go out in id order.
    CREATE TABLE dist_jobs(
        id INTEGER PRIMARY KEY,
        rule TEXT NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('ca-cert', 'cert', 'uncert', 'crl', 'issued-serials')),
        ca TEXT NOT NULL,
        ref BLOB,
        number INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'parked', 'superseded')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_at INTEGER,
        last_error TEXT,
        done_at INTEGER
    );
    CREATE INDEX dist_open ON dist_jobs(rule, state, id);
    -- Signed issued-serials lists (policy/serials.py), numbered per CA like CRLs.
    ALTER TABLE cas ADD COLUMN list_number INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE serials_lists(
        ca TEXT NOT NULL,
        number INTEGER NOT NULL,
        this_update INTEGER NOT NULL,
        next_update INTEGER NOT NULL,
        entries INTEGER NOT NULL,
        sha256 BLOB NOT NULL,
        der BLOB NOT NULL,
        PRIMARY KEY (ca, number)
    );
    """,
    4: """
    -- CRL-fed OCSP tenants (another CA): answered live from their CRL by a delegated responder key
    -- held in the endpoint's own token. The push secret is kept as its SHA-256 only.
    CREATE TABLE ocsp_tenants(
        name TEXT PRIMARY KEY,
        ca_cert BLOB NOT NULL,
        crl_urls TEXT NOT NULL,                  -- JSON list of http:// and ldap:// URLs
        refresh_seconds INTEGER NOT NULL,
        unissued TEXT NOT NULL CHECK (unissued IN ('unknown', 'revoked')),
        push_secret_sha256 BLOB,
        key_label TEXT,                          -- the responder key made in the endpoint's token (tenant csr)
        key_spki BLOB,
        responder_cert BLOB,                     -- issued by the tenant CA for that key
        crl_number INTEGER,
        crl_this_update INTEGER,
        crl_next_update INTEGER,
        crl_der BLOB,
        crl_source TEXT,
        crl_at INTEGER,
        serials BLOB,                            -- the issued-serials list as uploaded (NULL: none)
        last_refusal TEXT,
        created INTEGER NOT NULL
    );
    """,
}


def _officers_migration() -> str:
    """Officers, dual-control requests and their approvals, signed audit checkpoints (issue #6)."""
    return """
    CREATE TABLE officers(
        name TEXT PRIMARY KEY,
        roles TEXT NOT NULL,                -- comma-separated: administrator, operator, auditor
        pwhash TEXT NOT NULL,               -- argon2id$m=..,t=..,p=..$salt$hash
        totp BLOB,                          -- TOTP secret, NULL when the second factor is off
        totp_last INTEGER NOT NULL DEFAULT 0,  -- last accepted TOTP time step: no replay
        failures INTEGER NOT NULL DEFAULT 0,   -- consecutive failed logins
        locked INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL,
        changed INTEGER NOT NULL
    );
    -- Dual control: a guarded request waits here until enough distinct officers approve it.
    CREATE TABLE pending(
        id INTEGER PRIMARY KEY,
        operation TEXT NOT NULL,
        summary TEXT NOT NULL,
        request BLOB NOT NULL,              -- the admin request (msgpack), executed as it was asked
        requester TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'running', 'done', 'failed', 'expired')),
        result TEXT
    );
    CREATE TABLE approvals(
        pending INTEGER NOT NULL REFERENCES pending(id),
        officer TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (pending, officer)
    );
    -- Chain heads signed by the audit key in the HSM.
    CREATE TABLE checkpoints(
        id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        head BLOB NOT NULL,
        tbs BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    """


_MIGRATIONS[5] = _officers_migration()

# The key of a tenant's installed responder certificate, apart from the latest key `tenant csr` made:
# a renewal's new key leaves the installed responder serving until its certificate comes (issue #3).
_MIGRATIONS[6] = """
    ALTER TABLE ocsp_tenants ADD COLUMN responder_label TEXT;
    UPDATE ocsp_tenants SET responder_label = key_label WHERE responder_cert IS NOT NULL;
    """

# Issue 11: what each CA may issue (its policy, also kept beside its key in the token; NULL: the
# default for its place), and per certificate the SPKI hash and SANs that uniqueness checks and
# `cert list` filters read (filled for older rows by _backfill_v7).
_MIGRATIONS[7] = """
    ALTER TABLE cas ADD COLUMN profiles TEXT;
    ALTER TABLE certs ADD COLUMN spki_sha256 BLOB;
    ALTER TABLE certs ADD COLUMN sans TEXT;
    CREATE INDEX certs_spki ON certs(spki_sha256);
    CREATE INDEX certs_subject ON certs(ca, subject);
    """


def cert_facts(der: bytes) -> tuple[bytes, str]:
    """The SHA-256 of a certificate's SPKI and its SANs as one text ("dns:a uri:b ...")."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    names: list[x509.GeneralName] = []
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        pass
    kinds: dict[type, str] = {x509.DNSName: "dns", x509.IPAddress: "ip", x509.RFC822Name: "email",
                              x509.UniformResourceIdentifier: "uri"}
    sans = " ".join(f"{kinds.get(type(g), 'other')}:{g.value}" for g in names)
    return hashlib.sha256(spki).digest(), sans


def _backfill_v7(db: apsw.Connection) -> None:
    rows = db.execute("SELECT serial, der FROM certs WHERE spki_sha256 IS NULL").fetchall()
    for serial, der in rows:
        assert isinstance(der, bytes)
        h, sans = cert_facts(der)
        db.execute("UPDATE certs SET spki_sha256=?, sans=? WHERE serial=?", (h, sans, serial))


_AFTER = {7: _backfill_v7}


# removeFromCRL (8) is for delta CRLs only (RFC 5280 §5.3.1), yet older versions accepted it from `revoke`
# and wrote it into full CRLs, where clients disagree on it (revoked for some, not for others). Keep
# what the officer asked for (revoked), reason unspecified: the reasonCode extension goes from the
# entry (14 octets, 12 beside an invalidity date), and the OCSP response is re-signed.
_MIGRATIONS[8] = """
    INSERT OR IGNORE INTO ocsp_queue SELECT ca, serial FROM revocations WHERE reason = 8;
    UPDATE revocations SET reason = NULL, entry_len = entry_len - (CASE WHEN invalidity IS NULL THEN 14 ELSE 12 END)
        WHERE reason = 8;
    """


# Migrations 9-16 are reserved, one per feature of this wave, so that features built in parallel never
# collide on a number: 9 two-tier PKI, 10 key backup and restore, 11 the ACME gateway, 12 CMP/EST/SCEP,
# 13 the Key Generation System, 14 CRL shards and delta CRLs, 15 the storage layer, 16 EST/SCEP. One left as "SELECT 1"
# creates nothing.
_MIGRATIONS[9] = """
-- Two tiers (issue 14). A CA whose key is in the token and whose certificate is to come from a parent
-- elsewhere (ca request; a renewal of an existing CA too), until ca install.
CREATE TABLE ca_requests(
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('new', 'renew')),
    rekey_of TEXT REFERENCES cas(name),  -- a new key for that CA: installed, it issues in its place
    key_type TEXT NOT NULL,
    profile TEXT NOT NULL,
    profiles TEXT NOT NULL,
    csr BLOB NOT NULL,
    created INTEGER NOT NULL
);
-- A re-keyed CA: the old key keeps signing CRLs and OCSP for what it issued; new issuance goes to the successor.
CREATE TABLE ca_successors(ca TEXT PRIMARY KEY REFERENCES cas(name), successor TEXT NOT NULL REFERENCES cas(name), since INTEGER NOT NULL);
-- The root each installed CA chains to (also kept in the token beside the CA key).
CREATE TABLE trust_anchors(ca TEXT PRIMARY KEY, cert BLOB NOT NULL);
-- The offline root's side: CRLs signed ahead for future periods (numbers from cas.crl_number: never reused).
CREATE TABLE presigned_crls(
    ca TEXT NOT NULL,
    number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    der BLOB NOT NULL,
    signed_at INTEGER NOT NULL,
    PRIMARY KEY (ca, number)
);
-- The online side: an offline root's calendars, each CRL published (copied to crls) once its thisUpdate has come.
CREATE TABLE calendar_roots(ca TEXT PRIMARY KEY, cert BLOB NOT NULL, loaded INTEGER NOT NULL);
CREATE TABLE crl_calendar(
    ca TEXT NOT NULL REFERENCES calendar_roots(ca),
    number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    der BLOB NOT NULL,
    loaded INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('waiting', 'published', 'superseded')),
    published_at INTEGER,
    PRIMARY KEY (ca, number)
);
CREATE INDEX crl_calendar_due ON crl_calendar(state, this_update);
"""
_MIGRATIONS[10] = """
    -- Restore (issue 15): revocations found in what the appliance had published (signed CRLs, OCSP
    -- responses) for certificates the restored CMDB never saw. Only their serial is known: they are
    -- carried by every later CRL (store.py _LIST_*), and their serial is reserved as issued.
    CREATE TABLE recovered_revocations(
        ca TEXT NOT NULL,
        serial BLOB NOT NULL,
        revoked_at INTEGER NOT NULL,
        reason INTEGER,
        invalidity INTEGER,
        entry_len INTEGER NOT NULL,
        recovered_at INTEGER NOT NULL,
        PRIMARY KEY (ca, serial)
    ) WITHOUT ROWID;
    """
# 11, the protocol gateway: EAB keys made by officers (the HMAC key never leaves the CMDB: the Factory
# checks bindings itself), which certificate each gateway credential obtained (revocation by account),
# and a small key-value store the gateway may keep here.
_MIGRATIONS[11] = """
    CREATE TABLE IF NOT EXISTS gateway_eab (kid TEXT PRIMARY KEY, hmac_key BLOB NOT NULL, created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL, profiles TEXT NOT NULL DEFAULT '', name_patterns TEXT NOT NULL DEFAULT '',
        account TEXT, bound_at INTEGER, revoked_at INTEGER);
    CREATE TABLE IF NOT EXISTS gateway_issued (ca TEXT NOT NULL, serial BLOB NOT NULL, protocol TEXT NOT NULL,
        credential TEXT NOT NULL, replaces TEXT, PRIMARY KEY (ca, serial));
    CREATE INDEX IF NOT EXISTS gateway_issued_by ON gateway_issued (credential);
    CREATE TABLE IF NOT EXISTS gateway_state (ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (ns, key));
    """
# Migration 12, CMP (issue 17): the credentials officers issue to devices and RAs (a shared secret by
# reference number, kept in the encrypted CMDB because a PasswordBasedMac/PBMAC1 check needs it in clear
# with the client's salt: no hash would do; or an RA certificate), enrolments that wait for a second
# officer, and which credential obtained which certificate (an rr under a MAC may revoke only those).
_MIGRATIONS[12] = """
    CREATE TABLE IF NOT EXISTS cmp_credentials(
        ref TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('secret', 'ra')),
        secret BLOB,
        ra_cert BLOB,
        ca TEXT NOT NULL,
        profile TEXT NOT NULL,
        subject TEXT,
        approval INTEGER NOT NULL DEFAULT 0,
        uses_left INTEGER NOT NULL,
        created INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER
    );
    CREATE TABLE IF NOT EXISTS cmp_requests(
        id INTEGER PRIMARY KEY,
        ref TEXT NOT NULL,
        ca TEXT NOT NULL,
        profile TEXT NOT NULL,
        spki BLOB NOT NULL,
        subject TEXT NOT NULL,
        sans TEXT NOT NULL,
        created INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('waiting', 'issued', 'rejected', 'failed')),
        decided_by TEXT,
        reason TEXT,
        serial BLOB
    );
    CREATE TABLE IF NOT EXISTS cmp_issued(
        ca TEXT NOT NULL,
        serial BLOB NOT NULL,
        ref TEXT NOT NULL,
        PRIMARY KEY (ca, serial)
    ) WITHOUT ROWID;
    """
# 13: the KGS (issue 18). A card's record is written before each step it names (started -> keys -> certs
# -> pins -> done, or failed): no card is half-made without a record saying so. Sealed columns are
# encrypted under the KGS's HSM key (the Factory never sees those secrets); `pending` holds the new PIN
# and PUK only until the letter exists. kgs_slots: each slot's certificate and, for keys made in the
# HSM, the archive blob (wrapped under the KGS's archival key). kgs_recoveries: dual-control approved
# recoveries, each taken once.
_MIGRATIONS[13] = """
CREATE TABLE kgs_cards (
    card INTEGER PRIMARY KEY,
    batch TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    profile TEXT NOT NULL,
    label TEXT NOT NULL,
    token_serial TEXT,
    state TEXT NOT NULL CHECK (state IN ('started', 'keys', 'certs', 'pins', 'done', 'failed')),
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    transport BLOB,
    pending BLOB,
    puk BLOB,
    letter TEXT NOT NULL DEFAULT 'none' CHECK (letter IN ('none', 'produced', 'printed', 'sent', 'acknowledged')),
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    UNIQUE (batch, subject_id)
);
CREATE TABLE kgs_slots (
    card INTEGER NOT NULL REFERENCES kgs_cards(card),
    slot TEXT NOT NULL,
    ca TEXT NOT NULL,
    serial BLOB NOT NULL,
    cert BLOB NOT NULL,
    archive BLOB,
    PRIMARY KEY (card, slot)
);
CREATE TABLE kgs_recoveries (
    recovery INTEGER PRIMARY KEY,
    card INTEGER NOT NULL REFERENCES kgs_cards(card),
    slot TEXT NOT NULL,
    approvers TEXT NOT NULL,
    reason TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    taken_by TEXT,
    taken INTEGER
);
"""
# 14: CRL shards and delta CRLs (appliance/factory/crlshards.py). A CA's shard count is pinned once
# (its certificates' CRL DPs name their shard for life); each certificate's shard is kept with it; each
# shard has its own CRL number sequence; every change to revocations is logged in commit order, so a
# delta CRL carries exactly what changed since its base (added, changed or removed entries). Re-runnable.
_MIGRATIONS[14] = """
    CREATE TABLE IF NOT EXISTS crl_partition(
        ca TEXT PRIMARY KEY REFERENCES cas(name),
        shards INTEGER NOT NULL CHECK (shards BETWEEN 1 AND 256)
    );
    CREATE TABLE IF NOT EXISTS cert_shards(
        serial BLOB PRIMARY KEY REFERENCES certs(serial),
        ca TEXT NOT NULL,
        shard INTEGER NOT NULL CHECK (shard >= 0)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS cert_shards_ca ON cert_shards(ca, shard, serial);
    CREATE TABLE IF NOT EXISTS crl_shard_numbers(
        ca TEXT NOT NULL,
        shard INTEGER NOT NULL,
        number INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (ca, shard)
    );
    CREATE TABLE IF NOT EXISTS revocation_log(
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ca TEXT NOT NULL,
        serial BLOB NOT NULL
    );
    CREATE INDEX IF NOT EXISTS revocation_log_ca ON revocation_log(ca, seq);
    -- Only CAs that publish delta CRLs pay for the log (a row per change, pruned once every base has it).
    CREATE TABLE IF NOT EXISTS crl_delta_cas(ca TEXT PRIMARY KEY REFERENCES cas(name));
    CREATE TRIGGER IF NOT EXISTS revocation_log_ins AFTER INSERT ON revocations
        WHEN EXISTS (SELECT 1 FROM crl_delta_cas WHERE ca = new.ca)
        BEGIN INSERT INTO revocation_log(ca, serial) VALUES (new.ca, new.serial); END;
    CREATE TRIGGER IF NOT EXISTS revocation_log_upd AFTER UPDATE ON revocations
        WHEN EXISTS (SELECT 1 FROM crl_delta_cas WHERE ca = new.ca)
        BEGIN INSERT INTO revocation_log(ca, serial) VALUES (new.ca, new.serial); END;
    CREATE TRIGGER IF NOT EXISTS revocation_log_del AFTER DELETE ON revocations
        WHEN EXISTS (SELECT 1 FROM crl_delta_cas WHERE ca = old.ca)
        BEGIN INSERT INTO revocation_log(ca, serial) VALUES (old.ca, old.serial); END;
    -- Where each full CRL's snapshot stood in the log: a delta on base N lists what came after it.
    CREATE TABLE IF NOT EXISTS crl_log_marks(
        ca TEXT NOT NULL,
        shard INTEGER NOT NULL,
        number INTEGER NOT NULL,
        log_seq INTEGER NOT NULL,
        PRIMARY KEY (ca, shard, number)
    );
    """
_MIGRATIONS[15] = "SELECT 1"
# 16: EST and SCEP enrolment secrets made by officers (EST Basic passwords, SCEP challenge passwords):
# only a digest of each secret is kept; a use is one atomic decrement, audited. Enrolments admitted by a
# secret marked `approval` wait in enrol_waiting until an officer (not the secret's maker) decides.
_MIGRATIONS[16] = """
    CREATE TABLE enrol_secrets (
        ref TEXT PRIMARY KEY,
        protocol TEXT NOT NULL CHECK (protocol IN ('est', 'scep')),
        digest BLOB NOT NULL UNIQUE,
        ca TEXT NOT NULL,
        profile TEXT NOT NULL,
        subject TEXT,
        uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
        expires INTEGER NOT NULL,
        created INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0,
        approval INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE enrol_waiting (
        id TEXT PRIMARY KEY,
        protocol TEXT NOT NULL,
        credential TEXT NOT NULL,
        csr_sha256 BLOB NOT NULL,
        request BLOB NOT NULL,
        ca TEXT NOT NULL,
        profile TEXT NOT NULL,
        summary TEXT NOT NULL,
        created INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('waiting', 'issued', 'rejected')),
        decided_by TEXT,
        reason TEXT,
        cert BLOB
    );
    CREATE INDEX enrol_waiting_by_request ON enrol_waiting(credential, csr_sha256);
    """

# Migrations 17-20 are reserved for the third group of this wave, one per feature (as 9-16 above):
# 17 backup and restore II, 18 two-tier II, 19 CRL at scale, 20 the storage layer II.
# 17, backup and restore II: certificates a restore knows only from what was published (the endpoint's
# responses, CRLs, issued-serials lists) and not from the restored CMDB. Their body is not in that
# evidence; their serial and status are, so the endpoint keeps getting fresh responses for them
# (good or revoked, never unknown) until the CA itself expires (their own notAfter is not known).
_MIGRATIONS[17] = """
    CREATE TABLE recovered_certs(
        ca TEXT NOT NULL,
        serial BLOB NOT NULL,
        not_after INTEGER NOT NULL,          -- the CA's: the certificate's own is not in the evidence
        recovered_at INTEGER NOT NULL,
        PRIMARY KEY (ca, serial)
    ) WITHOUT ROWID;
"""
_MIGRATIONS[18] = "SELECT 1"
# Issue 19, CRLs at scale: each revocation's CRL entry kept encoded from its revocation on (a CRL is then
# read as pre-encoded pages, checked strictly by the CIS); a changed or deleted revocation drops its entry
# (the Factory encodes again what has none). Per-CA counts of certificates and revocations kept by
# triggers, so that the status reporter reads two numbers instead of counting a million rows.
_MIGRATIONS[19] = """
    CREATE TABLE crl_der(
        ca TEXT NOT NULL,
        serial BLOB NOT NULL,
        der BLOB NOT NULL,
        shard INTEGER,  -- the certificate's CRL shard (cert_shards), NULL for a CA with one CRL
        PRIMARY KEY (ca, serial)
    ) WITHOUT ROWID;
    -- covering (der included): a shard's pages are read in order, not one random lookup per entry into
    -- encrypted pages the 2 MB cache mostly misses
    CREATE INDEX crl_der_shard ON crl_der(ca, shard, serial, der) WHERE shard IS NOT NULL;
    CREATE TRIGGER crl_der_upd AFTER UPDATE ON revocations
        BEGIN DELETE FROM crl_der WHERE ca = old.ca AND serial = old.serial; END;
    CREATE TRIGGER crl_der_del AFTER DELETE ON revocations
        BEGIN DELETE FROM crl_der WHERE ca = old.ca AND serial = old.serial; END;
    CREATE TABLE ca_counts(
        ca TEXT PRIMARY KEY,
        issued INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO ca_counts(ca, issued) SELECT ca, count(*) FROM certs WHERE true GROUP BY ca;
    INSERT INTO ca_counts(ca, revoked) SELECT ca, count(*) FROM revocations WHERE true GROUP BY ca
        ON CONFLICT(ca) DO UPDATE SET revoked = excluded.revoked;
    CREATE TRIGGER ca_counts_cert_ins AFTER INSERT ON certs
        BEGIN INSERT INTO ca_counts(ca, issued) VALUES (new.ca, 1) ON CONFLICT(ca) DO UPDATE SET issued = issued + 1; END;
    CREATE TRIGGER ca_counts_cert_del AFTER DELETE ON certs
        BEGIN UPDATE ca_counts SET issued = issued - 1 WHERE ca = old.ca; END;
    CREATE TRIGGER ca_counts_rev_ins AFTER INSERT ON revocations
        BEGIN INSERT INTO ca_counts(ca, revoked) VALUES (new.ca, 1) ON CONFLICT(ca) DO UPDATE SET revoked = revoked + 1; END;
    CREATE TRIGGER ca_counts_rev_del AFTER DELETE ON revocations
        BEGIN UPDATE ca_counts SET revoked = revoked - 1 WHERE ca = old.ca; END;
    """


def _backfill_v19(db: apsw.Connection) -> None:
    """Encode the CRL entry of every revocation made before migration 19 (once, at the upgrade)."""
    from policy import crl as pcrl
    rows = db.execute("SELECT r.ca, r.serial, r.revoked_at, r.reason, r.invalidity, r.entry_len, s.shard FROM revocations r "
                      "LEFT JOIN cert_shards s ON s.serial = r.serial AND s.ca = r.ca").fetchall()
    for ca, serial, at, reason, inv, entry_len, shard in rows:
        try:
            der = pcrl.encode_entries([(serial_int(bytes(serial)), int(at),  # type: ignore[arg-type]
                                        None if reason is None else int(reason), None if inv is None else int(inv))])
        except ValueError:
            continue  # left to the slow path, which refuses it in one line as before
        if len(der) == entry_len:
            db.execute("INSERT INTO crl_der VALUES (?,?,?,?)", (ca, serial, der, shard))


_AFTER[19] = _backfill_v19
_MIGRATIONS[20] = "SELECT 1"


class CmdbError(Exception):
    """Domain error of the database layer (safe to show an operator)."""


def serial_bytes(serial: int) -> bytes:
    return serial.to_bytes((serial.bit_length() + 7) // 8, "big")


def serial_int(b: bytes) -> int:
    return int.from_bytes(b, "big")


class Cmdb:
    def __init__(self, path: str, key: bytes, cipher: str = "chacha20", create: bool = False):
        if not create and not os.path.exists(path):
            raise CmdbError(f"no CMDB at {path}")
        if create and os.path.exists(path):
            raise CmdbError(f"a CMDB already exists at {path}: refusing to overwrite it")
        flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
        old = os.umask(0o077)
        try:
            self.db = apsw.Connection(path, flags=flags)
        finally:
            os.umask(old)
        c = self.db
        c.execute(f"PRAGMA cipher = '{cipher}'")
        if cipher == "chacha20":
            c.execute("PRAGMA kdf_iter = 1")  # the key is 256 random bits, not a passphrase
        c.execute(f"PRAGMA hexkey = '{key.hex()}'")
        try:
            c.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except apsw.NotADBError:
            raise CmdbError("the CMDB does not decrypt with this key (wrong token, or a damaged file)") from None
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("PRAGMA foreign_keys = ON")
        c.execute("PRAGMA secure_delete = ON")
        if c.pragma("synchronous") != 2:
            raise CmdbError("could not set synchronous=FULL: refusing to run with weaker durability")
        c.setbusytimeout(5000)
        self._migrate()

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.pragma("user_version")
        if version > SCHEMA_VERSION:
            raise CmdbError(f"CMDB schema v{version} is newer than this software (v{SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with self.tx():
                self.db.execute(_MIGRATIONS[v])
                if v in _AFTER:
                    _AFTER[v](self.db)
                self.db.execute(f"PRAGMA user_version = {v}")

    shipper: Any = None  # standby.Standby: each commit is shipped to the standby before tx() returns

    @contextmanager
    def tx(self) -> Iterator[apsw.Connection]:
        """One durable transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any exception)."""
        shipper = self.shipper
        s = shipper.begin() if shipper is not None else None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            if s is not None:
                shipper.abort(s)
            raise
        self.db.execute("COMMIT")
        if s is not None:
            shipper.ship(s)

    # ------------------------------------------------------------ audit

    def audit(self, actor: str, action: str, obj: str, outcome: str, detail: str = "", ts: int | None = None) -> int:
        """Append one chained record; must be called inside tx() so it commits with its action."""
        row = self.db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        rec = {"seq": seq, "ts": ts if ts is not None else int(time.time()), "actor": actor, "action": action,
               "object": obj, "outcome": outcome, "detail": detail}
        h = audit_hash(prev, rec)
        self.db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?)",
                        (seq, rec["ts"], actor, action, obj, outcome, detail, prev, h))
        return seq

    def audit_records(self) -> Iterator[dict[str, Any]]:
        for seq, ts, actor, action, obj, outcome, detail, prev, h in self.db.execute("SELECT * FROM audit ORDER BY seq"):
            yield {"seq": seq, "ts": ts, "actor": actor, "action": action, "object": obj, "outcome": outcome,
                   "detail": detail, "prev": prev.hex(), "hash": h.hex()}


def verify_audit(records: Iterator[dict[str, Any]]) -> tuple[int, str | None]:
    """Check an exported chain. Returns (records checked, None) or (n, what breaks it and where)."""
    n, problem, _ = verify_chain(records)
    return n, problem

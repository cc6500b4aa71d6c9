"""Card profiles and personalisation batches: the typed, validated description of a smart card and its subjects (pure)."""

from __future__ import annotations

import csv
import io
import json
import re
import string
import tomllib
from dataclasses import dataclass
from typing import Any

from policy.errors import PolicyError

SLOT_NAMES = ("auth", "sign", "enc")
# Keys a card can hold and the HSM can generate; ed25519 cannot encrypt and few cards know it.
CARD_KEY_TYPES = ("rsa2048", "rsa3072", "p256", "p384")
WHERE = ("card", "hsm")  # hsm: generated in the KGS's HSM and archived there before it goes onto the card
ALPHABETS = {
    "digits": string.digits,
    # No 0/O, 1/l/I: a PIN read off paper must not be ambiguous.
    "alnum": "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ",
}
LABEL_FIELDS = ("id", "cn", "n")
MAX_LABEL = 32  # CK_TOKEN_INFO.label is 32 bytes
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Batch files: unauthenticated-ish input from the operator's media: small and strict.
MAX_BATCH_BYTES = 1 << 20
MAX_SUBJECTS = 10_000
MAX_VALUE = 256
SUBJECT_FIELDS = ("id", "CN", "email", "O", "OU", "C", "serialNumber", "address")
REQUIRED_FIELDS = ("id", "CN")


@dataclass(frozen=True)
class PinPolicy:
    length: int
    alphabet: str  # a key of ALPHABETS
    tries: int  # wrong entries before the card blocks it: the card enforces it (PKCS#11 cannot set it; SoftHSM2 never blocks)


@dataclass(frozen=True)
class Slot:
    name: str  # auth | sign | enc
    key_type: str
    generated: str  # card | hsm
    profile: str  # certificate profile the Factory issues under

    @property
    def archived(self) -> bool:
        return self.generated == "hsm"


@dataclass(frozen=True)
class CardProfile:
    name: str
    ca: str
    label: str  # format, e.g. "EMP-{id}"
    slots: tuple[Slot, ...]
    pin: PinPolicy
    puk: PinPolicy
    validity_days: int | None = None

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def refuses(self, slot: str, ca: str, profile: str) -> str | None:
        """Why a certificate for this slot, CA and certificate profile is not one this card profile makes (or None)."""
        try:
            s = self.slot(slot)
        except KeyError:
            return f"card profile {self.name} has no slot {slot}"
        if ca != self.ca:
            return f"card profile {self.name} is certified by CA {self.ca}, not {ca}"
        if profile != s.profile:
            return f"slot {slot} of card profile {self.name} takes certificate profile {s.profile}, not {profile}"
        return None

    def card_label(self, subject: Subject, n: int) -> str:
        """The token label of a subject's card: the format with its fields, cut to what a token holds."""
        out = self.label.format(id=subject.id, cn=subject.cn, n=n)
        return out.encode("utf-8")[:MAX_LABEL].decode("utf-8", "ignore")


@dataclass(frozen=True)
class Subject:
    id: str  # unique in the batch: the key that makes a rerun finish, never redo, a card
    cn: str
    email: str | None = None
    o: str | None = None
    ou: str | None = None
    c: str | None = None
    serial_number: str | None = None
    address: tuple[str, ...] = ()  # lines in the letter's window

    def attrs(self) -> list[tuple[str, str]]:
        out = [(k, v) for k, v in (("C", self.c), ("O", self.o), ("OU", self.ou)) if v]
        out.append(("CN", self.cn))
        if self.serial_number:
            out.append(("serialNumber", self.serial_number))
        return out

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "CN": self.cn}
        for k, v in (("email", self.email), ("O", self.o), ("OU", self.ou), ("C", self.c), ("serialNumber", self.serial_number)):
            if v:
                d[k] = v
        if self.address:
            d["address"] = "\n".join(self.address)
        return d


def _err(name: str, key: str, rule: str, message: str) -> PolicyError:
    return PolicyError(f"card profile {name}: {key}", rule, message)


def _int(name: str, key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _err(name, key, "value", f"must be an integer {lo}..{hi}")
    return v


def _keys(name: str, where: str, d: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise _err(name, where, "type", "must be a table")
    for k in d:
        if k not in allowed:
            raise _err(name, f"{where}.{k}" if where else k, "unknown-key", f"unknown key {k!r}")
    for k in required:
        if k not in d:
            raise _err(name, f"{where}.{k}" if where else k, "required", f"missing required key {k!r}")
    return d


def _pin(name: str, key: str, d: Any, lo: int) -> PinPolicy:
    d = _keys(name, key, d, ("length", "alphabet", "tries"), ("length",))
    alphabet = d.get("alphabet", "digits")
    if alphabet not in ALPHABETS:
        raise _err(name, f"{key}.alphabet", "value", f"alphabet must be one of {', '.join(ALPHABETS)}")
    return PinPolicy(_int(name, f"{key}.length", d["length"], lo, 16), alphabet, _int(name, f"{key}.tries", d.get("tries", 3), 1, 15))


def load_card_profile_text(name: str, text: str, cert_profiles: dict[str, Any] | None = None) -> CardProfile:
    """Parse and validate one card profile from TOML text; every refusal names the key.
    `cert_profiles` (name -> Profile), when given, must hold each slot's certificate profile and allow its key type."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PolicyError(f"card profile {name!r}", "name", "card profile names are 1-63 of a-z 0-9 -")
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as e:
        raise _err(name, "toml", "syntax", f"not valid TOML ({e})") from None
    _keys(name, "", data, ("description", "ca", "label", "validity_days", "pin", "puk", "slot"), ("ca", "label", "pin", "puk", "slot"))
    ca = data["ca"]
    if not isinstance(ca, str) or not _ID_RE.match(ca):
        raise _err(name, "ca", "value", "must be a CA name (letters, digits, '.', '_', '-')")
    label = data["label"]
    if not isinstance(label, str) or not label or len(label) > MAX_LABEL:
        raise _err(name, "label", "value", f"must be a format of 1..{MAX_LABEL} characters")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(label) if f is not None]
    except ValueError:
        raise _err(name, "label", "syntax", "unbalanced braces") from None
    for f in fields:
        if f not in LABEL_FIELDS:
            raise _err(name, "label", "field", f"unknown field {{{f}}} (use {', '.join('{' + x + '}' for x in LABEL_FIELDS)})")
    if "id" not in fields and "n" not in fields:
        raise _err(name, "label", "unique", "needs {id} or {n}: every card of a batch gets its own label")
    days = data.get("validity_days")
    if days is not None:
        days = _int(name, "validity_days", days, 1, 3660)
    pin = _pin(name, "pin", data["pin"], 4)
    puk = _pin(name, "puk", data["puk"], 6)
    slots_raw = data["slot"]
    if not isinstance(slots_raw, list) or not 1 <= len(slots_raw) <= len(SLOT_NAMES):
        raise _err(name, "slot", "type", f"must be 1..{len(SLOT_NAMES)} [[slot]] tables")
    slots: list[Slot] = []
    for i, s in enumerate(slots_raw):
        where = f"slot[{i}]"
        s = _keys(name, where, s, ("name", "key_type", "generated", "profile"), ("name", "key_type", "profile"))
        sname, kt, gen, prof = s["name"], s["key_type"], s.get("generated", "card"), s["profile"]
        if sname not in SLOT_NAMES:
            raise _err(name, f"{where}.name", "value", f"must be one of {', '.join(SLOT_NAMES)}")
        if any(x.name == sname for x in slots):
            raise _err(name, f"{where}.name", "duplicate", f"slot {sname} listed twice")
        if kt not in CARD_KEY_TYPES:
            raise _err(name, f"{where}.key_type", "value", f"must be one of {', '.join(CARD_KEY_TYPES)}")
        if gen not in WHERE:
            raise _err(name, f"{where}.generated", "value", "must be \"card\" or \"hsm\"")
        if gen == "hsm" and sname != "enc":
            # A copy of a signature or authentication key would let the archive impersonate the holder.
            raise _err(name, f"{where}.generated", "archival", "only the encryption key may be generated in the HSM and archived")
        if gen == "hsm" and not kt.startswith("rsa"):
            raise _err(name, f"{where}.key_type", "archival", "archived keys are RSA (key transport to the recovered key)")
        if not isinstance(prof, str) or not _NAME_RE.match(prof):
            raise _err(name, f"{where}.profile", "value", "must be a certificate profile name")
        if cert_profiles is not None:
            p = cert_profiles.get(prof)
            if p is None:
                raise _err(name, f"{where}.profile", "unknown", f"no certificate profile {prof!r}")
            if p.kind != "end-entity":
                raise _err(name, f"{where}.profile", "kind", f"{prof!r} is not an end-entity profile")
            if kt not in p.key_types:
                raise _err(name, f"{where}.key_type", "profile", f"profile {prof!r} does not allow {kt}")
        slots.append(Slot(sname, kt, gen, prof))
    return CardProfile(name, ca, label, tuple(slots), pin, puk, days)


# ---------------------------------------------------------------- batches


def _berr(where: str, rule: str, message: str) -> PolicyError:
    return PolicyError(f"batch {where}", rule, message)


def _subject(where: str, row: Any) -> Subject:
    if not isinstance(row, dict):
        raise _berr(where, "type", "must be an object of subject fields")
    for k in row:
        if k not in SUBJECT_FIELDS:
            raise _berr(f"{where}: {str(k)[:40]}", "unknown-field", f"unknown field (allowed: {', '.join(SUBJECT_FIELDS)})")
    for k in REQUIRED_FIELDS:
        if not row.get(k):
            raise _berr(f"{where}: {k}", "required", "missing or empty")
    vals: dict[str, str] = {}
    for k, v in row.items():
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise _berr(f"{where}: {k}", "type", "must be text")
        limit = 4 * MAX_VALUE if k == "address" else MAX_VALUE
        if len(v) > limit or any((ord(c) < 32 and c != "\n") or ord(c) == 127 for c in v):
            raise _berr(f"{where}: {k}", "value", f"at most {limit} printable characters")
        vals[k] = v
    if not _ID_RE.match(vals["id"]):
        raise _berr(f"{where}: id", "value", "1-64 of letters, digits, '.', '_', '-'")
    if "\n" in "".join(v for k, v in vals.items() if k != "address"):
        raise _berr(where, "value", "only the address may span lines")
    c = vals.get("C")
    if c is not None and not re.fullmatch(r"[A-Z]{2}", c):
        raise _berr(f"{where}: C", "value", "a two-letter country code")
    email = vals.get("email")
    if email is not None and not re.fullmatch(r"[^@\s]{1,64}@[A-Za-z0-9.-]{1,190}", email):
        raise _berr(f"{where}: email", "value", "not a mail address")
    address = tuple(x.strip() for x in vals.get("address", "").replace("|", "\n").split("\n") if x.strip())
    if len(address) > 6:
        raise _berr(f"{where}: address", "value", "at most 6 lines")
    return Subject(vals["id"], vals["CN"], email, vals.get("O"), vals.get("OU"), c, vals.get("serialNumber"), address)


def parse_batch(data: bytes, fmt: str | None = None) -> list[Subject]:
    """The subjects of a batch file (CSV with a header line, or a JSON array of objects); every refusal
    names the row and the field. `fmt` "csv" or "json", else guessed from the first character."""
    if len(data) > MAX_BATCH_BYTES:
        raise _berr("file", "size", f"larger than {MAX_BATCH_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _berr("file", "encoding", "not UTF-8 text") from None
    if fmt is None:
        fmt = "json" if text.lstrip()[:1] in ("[", "{") else "csv"
    rows: list[Any]
    if fmt == "json":
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise _berr("file", "syntax", "not valid JSON") from None
        if isinstance(doc, dict) and set(doc) == {"subjects"}:
            doc = doc["subjects"]
        if not isinstance(doc, list):
            raise _berr("file", "type", "a JSON array of subjects (or {\"subjects\": [...]})")
        rows = doc
        names = [f"subject {i + 1}" for i in range(len(rows))]
    elif fmt == "csv":
        try:
            reader = csv.reader(io.StringIO(text, newline=""), strict=True)
            table = [r for r in reader if r and any(x.strip() for x in r)]
        except csv.Error as e:
            raise _berr("file", "syntax", f"not valid CSV ({str(e)[:100]})") from None
        if not table:
            raise _berr("file", "empty", "no header line")
        header = [h.strip() for h in table[0]]
        for h in header:
            if h not in SUBJECT_FIELDS:
                raise _berr(f"header: {h[:40]}", "unknown-field", f"unknown column (allowed: {', '.join(SUBJECT_FIELDS)})")
        if len(set(header)) != len(header):
            raise _berr("header", "duplicate", "a column named twice")
        rows, names = [], []
        for i, r in enumerate(table[1:], start=2):
            if len(r) != len(header):
                raise _berr(f"line {i}", "columns", f"{len(r)} fields where the header has {len(header)}")
            rows.append({h: v.strip() for h, v in zip(header, r)})
            names.append(f"line {i}")
    else:
        raise _berr("file", "format", "csv or json")
    if not rows:
        raise _berr("file", "empty", "no subjects")
    if len(rows) > MAX_SUBJECTS:
        raise _berr("file", "size", f"more than {MAX_SUBJECTS} subjects")
    out: list[Subject] = []
    seen: set[str] = set()
    for where, row in zip(names, rows):
        s = _subject(where, row)
        if s.id in seen:
            raise _berr(f"{where}: id", "duplicate", f"id {s.id!r} appears twice")
        seen.add(s.id)
        out.append(s)
    return out


def subject_from_dict(d: dict[str, Any]) -> Subject:
    """A subject as stored (Subject.as_dict), checked again: the record came through another process."""
    return _subject("record", d)


def new_secret(policy: PinPolicy, randbelow) -> str:
    """A PIN or PUK of the policy; `randbelow` is secrets.randbelow (injected: policy/ does no I/O)."""
    alphabet = ALPHABETS[policy.alphabet]
    return "".join(alphabet[randbelow(len(alphabet))] for _ in range(policy.length))

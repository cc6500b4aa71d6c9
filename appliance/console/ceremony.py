"""`donjon ceremony run FILE`: a scripted, witnessed key ceremony with a hashed (and signed) transcript."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import msgspec

from appliance import adminops as ops
from appliance.adminops import OpError
from appliance.console import media as M
from appliance.console.pdf import text_pdf
from appliance.console.session import Session, ask_login, refusal
from appliance.console.term import Term
from appliance.ipc import schema as S

FORMAT = "donjon-ceremony-transcript/2"  # /1 had no audit bindings: refused by verify
# The audit record each step's operation must have left (action, and how its object names the step's CA).
STEP_RECORDS = {"create-root": ("ca-create", lambda st, o: o == st.name), "create-ca": ("ca-create", lambda st, o: o == st.name),
                "sign-csr": ("ca-sign-csr", lambda st, o: o.startswith(f"{st.parent}/")),
                "crl": ("crl", lambda st, o: o.startswith(f"{st.ca}#")),
                "crl-presign": ("crl-presign", lambda st, o: o.startswith(f"{st.ca}#")),
                "keys-backup": ("keys-backup", lambda st, o: o == "token")}
FileName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Days = Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
ACTIONS = ("create-root", "create-ca", "sign-csr", "crl", "export-ca", "crl-presign", "keys-backup")


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    name: S.Name
    officers: Annotated[list[S.Name], msgspec.Meta(min_length=1, max_length=32)]
    quorum: Annotated[int, msgspec.Meta(ge=1, le=32)]
    output: FileName  # folder beside the ceremony file (or under --out-dir) for every output and the transcript
    description: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class Step(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    action: Literal["create-root", "create-ca", "sign-csr", "crl", "export-ca", "crl-presign", "keys-backup"]
    name: S.Name | None = None  # create-root, create-ca: the new CA (and its token key label)
    parent: S.Name | None = None  # create-ca, sign-csr: the signing CA
    ca: S.Name | None = None  # crl, export-ca
    key_type: S.KeyType | None = None
    subject: dict[Annotated[str, msgspec.Meta(max_length=32)], Annotated[str, msgspec.Meta(max_length=256)]] | None = None
    validity_days: Days | None = None
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    profile: S.Name | None = None
    csr: FileName | None = None  # sign-csr: a file beside the ceremony file
    out: FileName | None = None  # the output file in the output folder
    chain: bool = False  # export-ca: with the parents up to the root
    periods: Annotated[int, msgspec.Meta(ge=1, le=120)] | None = None  # crl-presign: CRLs signed ahead
    every: Annotated[str, msgspec.Meta(max_length=12)] | None = None  # crl-presign: the period, e.g. 30d
    overlap: Annotated[str, msgspec.Meta(max_length=12)] | None = None  # crl-presign: each CRL valid this long past the next one's start
    # keys-backup: the KEK split into `shares` custodian shares (custodian-N/ beside the outputs), any
    # `threshold` of which recover; the token's SO PIN from a file beside the ceremony file.
    shares: Annotated[int, msgspec.Meta(ge=2, le=16)] | None = None
    threshold: Annotated[int, msgspec.Meta(ge=2, le=16)] | None = None
    so_pin_file: FileName | None = None
    note: Annotated[str, msgspec.Meta(max_length=500)] = ""


class CeremonyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    ceremony: Header
    step: Annotated[list[Step], msgspec.Meta(min_length=1, max_length=100)]


_REQUIRED = {
    "create-root": ("name", "key_type", "subject", "validity_days", "out"),
    "create-ca": ("name", "parent", "key_type", "subject", "validity_days", "out"),
    "sign-csr": ("parent", "csr", "validity_days", "out"),
    "crl": ("ca", "out"),
    "export-ca": ("ca", "out"),
    "crl-presign": ("ca", "periods", "every", "out"),
    "keys-backup": ("shares", "threshold", "so_pin_file", "out"),
}


def load(path: str) -> CeremonyFile:
    from appliance import config as C
    try:
        spec = C.load_toml(path, CeremonyFile)
    except C.ConfigError as e:
        raise OpError(str(e)) from None
    h = spec.ceremony
    if len(set(h.officers)) != len(h.officers):
        raise OpError(f"{path}: an officer is listed twice")
    if h.quorum > len(h.officers):
        raise OpError(f"{path}: quorum {h.quorum} is more than the {len(h.officers)} officers listed")
    outs: set[str] = set()
    for i, st in enumerate(spec.step, 1):
        missing = [f.replace("_", "-") for f in _REQUIRED[st.action] if getattr(st, f) in (None, {})]
        if missing:
            raise OpError(f"{path}: step {i} ({st.action}) needs {', '.join(missing)}")
        if st.action == "crl-presign":
            every = ops.parse_period(st.every or "", f"{path}: step {i}: period")
            if ops.parse_period(st.overlap or "0", "overlap") > every:
                raise OpError(f"{path}: step {i}: the overlap is longer than the period")
        if st.out in outs or st.out in ("transcript.json", "transcript.pdf"):
            raise OpError(f"{path}: step {i}: output {st.out} is named twice")
        outs.add(st.out)
    return spec


def _shown(v: Any) -> bool:
    """A step parameter worth showing (0, e.g. path-length 0, is one; unset and false are not)."""
    return v is not None and v is not False and v != {} and v != ""


def step_lines(i: int, st: Step) -> list[str]:
    fields = {k: v for k, v in msgspec.structs.asdict(st).items() if _shown(v) and k not in ("action", "note")}
    lines = [f"step {i}: {st.action}"]
    for k, v in fields.items():
        if k == "subject":
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        lines.append(f"  {k.replace('_', '-')}: {v}")
    if st.note:
        lines.append(f"  note: {st.note}")
    return lines


def code_identity() -> dict[str, Any]:
    """Version and hash of what runs: the frozen binary itself, or every source file of the packages."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("donjon")
    except PackageNotFoundError:
        v = "source"
    if getattr(sys, "frozen", False):
        return {"version": v, "kind": "binary", "path": sys.executable, "sha256": sha256_file(sys.executable)}
    import appliance
    root = os.path.dirname(os.path.dirname(os.path.abspath(appliance.__file__)))
    h, n = hashlib.sha256(), 0
    for pkg in ("appliance", "hsm", "policy"):
        for d, dirs, files in sorted(os.walk(os.path.join(root, pkg))):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            for fn in sorted(files):
                if fn.endswith((".py", ".toml", ".txt")):
                    p = os.path.join(d, fn)
                    h.update(os.path.relpath(p, root).encode() + b"\0")
                    h.update(sha256_file(p).encode() + b"\n")
                    n += 1
    return {"version": v, "kind": "source", "path": root, "files": n, "sha256": h.hexdigest(),
            "python": sys.version.split()[0]}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_transcript(session: Session, name: str, digest: bytes, binding: dict[str, Any]) -> dict[str, Any]:
    """The audit key signs the transcript through the audit chain (the CIS never signs bytes it is handed):
    the digest becomes an audit record bound to the ceremony's audit records (checked by the Factory),
    and a checkpoint of exactly that record is signed in the HSM."""
    return ops.ceremony_record(session.client, name, digest, binding["begin"]["seq"],
                               [w["name"] for w in binding["witnesses"]], [tuple(o) for o in binding["operations"]])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Ceremony:
    def __init__(self, home: str, path: str, term: Term, out_dir: str | None = None):
        self.home = home
        self.path = os.path.abspath(path)
        self.t = term
        self.spec = load(path)
        base = os.path.abspath(out_dir) if out_dir else os.path.dirname(self.path)
        self.out = os.path.join(base, self.spec.ceremony.output)
        self.present: list[tuple[str, Session]] = []

    def outputs(self) -> list[str]:
        return [st.out for st in self.spec.step] + ["transcript.json", "transcript.pdf"]

    def preflight(self) -> None:
        """Refuse before anything is done: an output already there, or an input missing."""
        existing = [n for n in self.outputs() if os.path.lexists(os.path.join(self.out, n))]
        if existing:
            raise OpError(f"{self.out}: {', '.join(existing)} already exist: a ceremony never overwrites its outputs")
        for st in self.spec.step:
            if st.csr:
                M.read(os.path.dirname(self.path), st.csr)

    def gather_officers(self) -> None:
        h = self.spec.ceremony
        self.t.say(f"Officers listed: {', '.join(h.officers)}; quorum {h.quorum}.",
                   "Each officer present logs in; an empty name when everyone present has.")
        tries = 0
        while len(self.present) < len(h.officers) and tries < len(h.officers) + 3:
            tries += 1
            name = self.t.ask("officer: ").strip()
            if not name:
                break
            if name not in h.officers:
                self.t.say(f"{name[:40]!r} is not an officer of this ceremony")
                continue
            if any(n == name for n, _ in self.present):
                self.t.say(f"{name} is already logged in")
                continue
            try:
                client, token = ask_login(self.t, self.home, name)
            except OpError as e:
                self.t.say(refusal(e))
                continue
            self.present.append((name, Session(self.home, name, client, token)))
            self.t.say(f"{name} present")

    def witness(self, i: int) -> list[str]:
        yes = []
        for name, _ in self.present:
            if self.t.confirm(f"{name}: I witnessed step {i} as shown and approve it"):
                yes.append(name)
        return yes

    def guarded(self, fn, witnesses: list[str], rec: dict[str, Any]) -> dict[str, Any]:
        """Run one request as the first officer; where dual control files it instead, the other
        witnesses of the step approve it with their own sessions until it runs."""
        try:
            return fn(self.present[0][1].client)
        except ops.PendingApproval as p:
            rid = p.doc["pending"]
            rec["dual_control"] = {"request": rid, "required": p.doc["required"], "approved_by": [self.present[0][0]]}
            self.t.say(f"dual control: request #{rid} needs {p.doc['required']} approvals; the witnesses approve it")
            for name, sess in self.present[1:]:
                if name not in witnesses:
                    continue
                doc = ops.approve(sess.client, rid)
                rec["dual_control"]["approved_by"].append(name)
                if doc.get("executed"):
                    return doc["result"]
            raise OpError(f"request #{rid} still lacks approvals: more witnesses who may approve it are needed") from None

    def execute(self, st: Step, witnesses: list[str], rec: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        c = self.present[0][1].client
        if st.action in ("create-root", "create-ca"):
            subject = tuple(st.subject.items())
            parent = st.parent if st.action == "create-ca" else None
            doc = self.guarded(lambda cl: ops.ca_create(cl, st.name, parent, subject, st.profile, st.key_type,
                                                        st.validity_days, st.path_length), witnesses, rec)
            return doc, ops.ca_chain_pem(c, st.name, False)
        if st.action == "sign-csr":
            der = ops.der_of(M.read(os.path.dirname(self.path), st.csr), "CSR")
            doc = self.guarded(lambda cl: ops.ca_sign_csr(cl, st.parent, st.profile or "sub-ca", der, st.validity_days,
                                                          st.path_length), witnesses, rec)
            return {k: v for k, v in doc.items() if k != "cert"}, doc["cert"].encode()
        if st.action == "crl":
            der = ops.crl_generate(c, st.ca)
            return {"ca": st.ca, "crl_number": ops.crl_number(der), "bytes": len(der)}, der
        if st.action == "export-ca":
            return {"ca": st.ca, "chain": st.chain}, ops.ca_chain_pem(c, st.ca, st.chain)
        if st.action == "crl-presign":
            doc = ops.crl_presign(c, st.ca, st.periods, ops.parse_period(st.every or "", "period"),
                                  ops.parse_period(st.overlap or "0", "overlap"))
            return {"ca": st.ca, "first": doc["first"], "last": doc["last"]}, doc["bundle"].encode()
        if st.action == "keys-backup":  # the blob is the step's output; each share goes to a folder of its own
            assert st.so_pin_file and st.threshold and st.shares
            so_pin = M.read(os.path.dirname(self.path), st.so_pin_file).decode("utf-8", "replace").strip()
            made = self.guarded(lambda cl: ops.keys_backup_request(cl, so_pin, st.threshold, st.shares), witnesses, rec)
            doc = ops.keys_backup_fetch(c, made["backup"])
            _, paths = ops.write_key_backup(doc, self.out, with_blob=False)
            return ({"keys": doc["keys"], "threshold": doc["threshold"], "sha256": doc["manifest_sha256"],
                     "custodian_files": [os.path.relpath(p, self.out) for p in paths]}, ops.key_backup_blob(doc))
        raise OpError(f"unsupported action {st.action}")

    def run(self) -> int:
        h = self.spec.ceremony
        self.preflight()
        self.t.say(f"Ceremony {h.name}: {len(self.spec.step)} steps, outputs to {self.out}")
        if h.description:
            self.t.say(h.description)
        self.gather_officers()
        if len(self.present) < h.quorum:
            self.t.say(f"no quorum: {len(self.present)} of the required {h.quorum} officers logged in; "
                       "ceremony aborted, nothing done")
            self.close()
            return 1
        first = self.present[0][1]
        status = ops.status(first.client)
        # Open the ceremony in the audit chain; every officer present witnesses it with their own session.
        opened = ops.ceremony_begin(first.client, h.name)
        cseq = opened["ceremony_seq"]
        binding: dict[str, Any] = {"begin": {"seq": cseq, "hash": opened["hash"]}, "witnesses": [], "operations": []}
        for n, sess in self.present:
            w = ops.ceremony_witness(sess.client, cseq)
            binding["witnesses"].append({"name": n, "seq": w["seq"], "hash": w["hash"], "login_seq": w["login_seq"]})
        seen = cseq
        tr: dict[str, Any] = {
            "format": FORMAT, "ceremony": h.name, "description": h.description,
            "file": os.path.basename(self.path), "file_sha256": sha256_file(self.path),
            "host": socket.gethostname(), "software": code_identity(),
            "hsm": {"token": status.get("token")},
            "officers_listed": list(h.officers), "quorum": h.quorum,
            "officers_present": [{"name": w["name"], "authenticated": True,
                                  "method": f"officer login during the ceremony (audit seq {w['login_seq']}), witness record seq {w['seq']}"}
                                 for w in binding["witnesses"]],
            "audit_binding": binding,
            "audit_head_before": status.get("audit_head"), "started": now(), "steps": [], "outcome": "running",
        }
        os.makedirs(self.out, mode=0o755, exist_ok=True)
        rc = 0
        for i, st in enumerate(self.spec.step, 1):
            self.t.say("", *step_lines(i, st))
            rec: dict[str, Any] = {"n": i, "action": st.action,
                                   "params": {k: v for k, v in msgspec.structs.asdict(st).items() if _shown(v) and k != "action"}}
            witnesses = self.witness(i)
            rec["witnesses"] = witnesses
            if len(witnesses) < h.quorum:
                rec["outcome"] = "not approved"
                rec["audit"] = []
                tr["steps"].append(rec)
                tr["outcome"] = f"aborted at step {i}: {len(witnesses)} approvals, quorum {h.quorum}"
                self.t.say(f"step {i} not approved by a quorum: ceremony aborted")
                rc = 1
                break
            rec["started"] = now()
            try:
                result, data = self.execute(st, witnesses, rec)
            except OpError as e:
                rec["outcome"] = f"failed: {e}"
                seen = self.bind_records(rec, binding, seen)
                tr["steps"].append(rec)
                tr["outcome"] = f"aborted at step {i}: {e}"
                self.t.say(f"step {i} failed: {e}")
                rc = 1
                break
            M.write_new(os.path.join(self.out, st.out), data)
            rec.update(outcome="done", finished=now(), result=result,
                       outputs=[{"file": st.out, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}])
            seen = self.bind_records(rec, binding, seen)
            tr["steps"].append(rec)
            self.t.say(f"step {i} done: {st.out} sha256 {rec['outputs'][0]['sha256']}")
        else:
            tr["outcome"] = "complete"
        after = ops.status(first.client)
        tr["audit_head_after"] = after.get("audit_head")
        tr["finished"] = now()
        tr["outputs"] = [o for s in tr["steps"] for o in s.get("outputs", [])]
        digest = hashlib.sha256(canonical(tr)).digest()
        tr["transcript_sha256"] = digest.hex()
        try:
            tr["signature"] = sign_transcript(first, h.name, digest, binding)
        except OpError as e:  # the outputs exist: keep the transcript, say plainly that it is unsigned
            tr["signature"] = {"status": f"unsigned: {e}"}
            rc = 1
        body = json.dumps(tr, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        M.write_new(os.path.join(self.out, "transcript.json"), body)
        M.write_new(os.path.join(self.out, "transcript.pdf"), text_pdf(pdf_lines(tr), f"Donjon ceremony {h.name}"))
        self.t.say(f"transcript: {os.path.join(self.out, 'transcript.json')} (sha256 {digest.hex()})",
                   f"printable:  {os.path.join(self.out, 'transcript.pdf')}", f"outcome: {tr['outcome']}")
        self.close()
        return rc

    def bind_records(self, rec: dict[str, Any], binding: dict[str, Any], seen: int) -> int:
        """The audit records the witnesses' sessions made since the last step: this step's operations."""
        new = [r for r in ops.ceremony_records(self.present[0][1].client, binding["begin"]["seq"]) if r["seq"] > seen]
        rec["audit"] = [{k: r[k] for k in ("seq", "hash", "action", "object", "outcome", "officer")} for r in new]
        binding["operations"] += [[r["seq"], r["hash"]] for r in new]
        return max([seen] + [r["seq"] for r in new])

    def close(self) -> None:
        for _, s in self.present:
            s.close()


def pdf_lines(tr: dict[str, Any]) -> list[str]:
    sw = tr["software"]
    lines = [f"DONJON KEY CEREMONY TRANSCRIPT: {tr['ceremony']}", "",
             f"Outcome:       {tr['outcome']}",
             f"Started:       {tr['started']}    Finished: {tr['finished']}",
             f"Host:          {tr['host']}",
             f"Software:      donjon {sw['version']} ({sw['kind']}) sha256 {sw['sha256']}",
             f"HSM token:     {tr['hsm']['token']}",
             f"Ceremony file: {tr['file']} sha256 {tr['file_sha256']}",
             f"Officers:      {', '.join(o['name'] for o in tr['officers_present'])} present of "
             f"{', '.join(tr['officers_listed'])}; quorum {tr['quorum']}",
             f"Audit head:    before {tr['audit_head_before']}", f"               after  {tr['audit_head_after']}", ""]
    if tr.get("description"):
        lines += [tr["description"], ""]
    for s in tr["steps"]:
        lines.append(f"Step {s['n']}: {s['action']}  [{s['outcome']}]")
        for k, v in s["params"].items():
            lines.append(f"    {k}: {v}")
        lines.append(f"    witnessed and approved by: {', '.join(s['witnesses']) or '-'}")
        for r in s.get("audit", []):
            lines.append(f"    audit seq {r['seq']} {r['action']} {r['object']} {r['outcome']} by {r['officer']}")
        for k, v in (s.get("result") or {}).items():
            lines.append(f"    result {k}: {v}")
        for o in s.get("outputs", []):
            lines.append(f"    output {o['file']} ({o['bytes']} bytes)")
            lines.append(f"      sha256 {o['sha256']}")
        lines.append("")
    lines += ["Transcript SHA-256 (canonical JSON, without this digest and the signature):",
              f"    {tr['transcript_sha256']}",
              *signature_lines(tr["signature"]), "",
              "Witness signatures:", ""]
    for o in tr["officers_present"]:
        lines += [f"    {o['name']:<24} ______________________________   date ____________", ""]
    return lines


def signature_lines(sig: dict[str, Any]) -> list[str]:
    if "checkpoint" not in sig:
        return [f"Signature: {sig.get('status', 'none')}"]
    r, cp = sig["record"], sig["checkpoint"]
    return ["Signed by the HSM audit key through the audit chain:",
            f"    audit record seq {r['seq']} ({r['action']} {r['object']}, by {r['actor']})",
            f"    record hash {r['hash']}",
            f"    checkpoint seq {cp['seq']} signed {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(cp['time']))} ({cp['alg']})",
            f"    audit certificate SHA-256 {hashlib.sha256(sig['audit_cert'].encode()).hexdigest()}"]


def verify_signature(tr: dict[str, Any], cert_pem: bytes | None) -> list[str]:
    """The transcript's audit record carries its digest, chains to its own hash, and the checkpoint of
    exactly that record verifies under the audit certificate (the one given, else the one embedded)."""
    from policy import audit as A
    sig = tr.get("signature") or {}
    if "checkpoint" not in sig:
        return [f"not signed ({sig.get('status', 'no signature')})"]
    r = sig["record"]
    problems = []
    if r.get("action") != "ceremony" or r.get("detail") != expected_detail(tr):
        problems.append("the audit record is not this transcript's (digest or audit bindings differ)")
    try:
        rec = {k: r[k] for k in ("seq", "ts", "actor", "action", "object", "outcome", "detail")}
        if A.audit_hash(bytes.fromhex(r["prev"]), rec).hex() != r["hash"]:
            problems.append("the audit record does not match its hash")
        cert = A.load_cert(cert_pem or sig["audit_cert"].encode())
        seq, head, _ = A.verify_checkpoint(sig["checkpoint"], cert)
        if (seq, head.hex()) != (r["seq"], r["hash"]):
            problems.append("the signed checkpoint is not of the transcript's audit record")
    except (KeyError, ValueError, TypeError) as e:
        problems.append(f"bad signature: {e}")
    return problems


def expected_detail(tr: dict[str, Any]) -> str | None:
    """The detail the Factory wrote in the ceremony's audit record, recomputed from the transcript."""
    from policy import audit as A
    try:
        b = tr["audit_binding"]
        digest = A.ceremony_binding_digest((b["begin"]["seq"], b["begin"]["hash"]),
                                           [(w["name"], w["seq"], w["hash"]) for w in b["witnesses"]],
                                           [(o[0], o[1]) for o in b["operations"]])
        return f"transcript sha256={tr.get('transcript_sha256')} begin={b['begin']['seq']} bindings sha256={digest}"
    except (KeyError, TypeError, IndexError):
        return None


def verify_binding(tr: dict[str, Any]) -> list[str]:
    """The transcript agrees with its own bindings: the witnesses are the officers present and approve
    each step, the operations are the steps' audit records, and each step done left its record."""
    b = tr.get("audit_binding")
    if not isinstance(b, dict):
        return ["the transcript is not bound to audit records and witnesses"]
    problems = []
    try:
        names = [w["name"] for w in b["witnesses"]]
        if sorted(names) != sorted(o["name"] for o in tr["officers_present"]):
            problems.append("the officers present are not the witnesses who authenticated during the ceremony")
        if len(names) < tr["quorum"]:
            problems.append(f"{len(names)} authenticated witnesses, quorum {tr['quorum']}")
        steps = tr["steps"]
        if [list(o) for o in b["operations"]] != [[r["seq"], r["hash"]] for s in steps for r in s.get("audit", [])]:
            problems.append("the bound operations are not the steps' audit records")
        for s in steps:
            if not set(s["witnesses"]) <= set(names):
                problems.append(f"step {s['n']}: approved by officers who did not witness the ceremony")
            want = STEP_RECORDS.get(s["action"])
            if s["outcome"] == "done" and want is not None:
                p = s["params"]
                st = SimpleNamespace(name=p.get("name"), parent=p.get("parent"), ca=p.get("ca"))
                if not any(r["action"] == want[0] and r["outcome"] == "ok" and want[1](st, r["object"]) for r in s.get("audit", [])):
                    problems.append(f"step {s['n']} ({s['action']}): no audit record of its operation")
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"malformed audit bindings: {e}")
    return problems


def verify_log(tr: dict[str, Any], log: bytes, cert_pem: bytes | None) -> list[str]:
    """The records the transcript names are in the exported audit log, unchanged, in the ceremony's
    window, made by whom and for what the transcript says; and the log itself verifies."""
    from policy import audit as A
    try:
        entries = [json.loads(x) for x in log.splitlines() if x.strip()]
        _, problem = A.verify_export(entries, A.load_cert(cert_pem) if cert_pem else None)
    except (ValueError, TypeError) as e:
        return [f"audit log: {e}"]
    if problem:
        return [f"audit log: {problem}"]
    recs = {e["seq"]: e for e in entries if e.get("type", "record") == "record"}
    b, sig = tr["audit_binding"], tr.get("signature") or {}
    begin = b["begin"]["seq"]
    end = (sig.get("record") or {}).get("seq")
    problems = []

    def check(seq, h, what, **want):
        r = recs.get(seq)
        if r is None or r["hash"] != h:
            problems.append(f"audit log: {what} (seq {seq}) is not in the log with that hash")
            return
        for k, v in want.items():
            if (not r[k].startswith(v[:-1])) if v.endswith("*") else r[k] != v:
                problems.append(f"audit log: {what} (seq {seq}) has {k} {r[k]!r}")
        if what not in ("the ceremony opening", "the transcript's own record") and not (begin < seq and (end is None or seq < end)):
            problems.append(f"audit log: {what} (seq {seq}) is outside the ceremony")

    check(begin, b["begin"]["hash"], "the ceremony opening", action="ceremony-begin", object=tr["ceremony"])
    for w in b["witnesses"]:
        check(w["seq"], w["hash"], f"witness {w['name']}", action="ceremony-witness", object=f"ceremony#{begin}",
              actor=f"officer:{w['name']} *")
    for s in tr["steps"]:
        for r in s.get("audit", []):
            check(r["seq"], r["hash"], f"step {s['n']} record", action=r["action"], object=r["object"],
                  actor=f"officer:{r['officer']} *")
    if end is not None:
        check(end, sig["record"]["hash"], "the transcript's own record", action="ceremony")
    return problems


def verify(path: str, cert_pem: bytes | None = None, audit_log: bytes | None = None) -> list[str]:
    """Problems with a transcript (empty: the digest, every output's SHA-256, the signature and the audit
    bindings check out; with `audit_log`, every bound record is in that exported log too)."""
    try:
        with open(path, "rb") as f:
            tr = json.loads(f.read())
    except (OSError, ValueError) as e:
        return [f"{path}: cannot read a transcript: {e}"]
    problems = []
    if tr.get("format") != FORMAT:
        problems.append(f"unknown format {tr.get('format')!r}" + (": made before transcripts were bound to audit records and "
                        "authenticated witnesses, it proves nothing about them" if tr.get("format") == "donjon-ceremony-transcript/1" else ""))
        return problems
    body = {k: v for k, v in tr.items() if k not in ("transcript_sha256", "signature")}
    digest = hashlib.sha256(canonical(body)).hexdigest()
    if digest != tr.get("transcript_sha256"):
        problems.append("the transcript was changed after it was written (digest mismatch)")
    folder = os.path.dirname(os.path.abspath(path))
    for o in tr.get("outputs", []):
        try:
            p = os.path.join(folder, M.check_file_name(o["file"]))
        except OpError as e:
            problems.append(str(e))
            continue
        if not os.path.exists(p):
            problems.append(f"{o['file']}: missing")
        elif sha256_file(p) != o["sha256"]:
            problems.append(f"{o['file']}: SHA-256 differs from the transcript")
    problems += verify_signature(tr, cert_pem)
    problems += verify_binding(tr)
    if audit_log is not None and not problems:
        problems += verify_log(tr, audit_log, cert_pem)
    return problems


def run_file(home: str, path: str, term: Term, out_base: str | None = None) -> int:
    c = Ceremony(home, path, term, out_base)
    try:
        return c.run()
    finally:
        c.close()

"""`donjon ceremony run FILE`: a scripted, witnessed key ceremony with a hashed (and signed) transcript."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from typing import Annotated, Any, Literal

import msgspec

from appliance import adminops as ops
from appliance.adminops import OpError
from appliance.console import media as M
from appliance.console.pdf import text_pdf
from appliance.console.session import Session, login
from appliance.console.term import Term
from appliance.ipc import schema as S

FORMAT = "donjon-ceremony-transcript/1"
FileName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Days = Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
ACTIONS = ("create-root", "create-ca", "sign-csr", "crl", "export-ca")


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    name: S.Name
    officers: Annotated[list[S.Name], msgspec.Meta(min_length=1, max_length=32)]
    quorum: Annotated[int, msgspec.Meta(ge=1, le=32)]
    output: FileName  # folder beside the ceremony file (or under --out-dir) for every output and the transcript
    description: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class Step(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    action: Literal["create-root", "create-ca", "sign-csr", "crl", "export-ca", "crl-presign"]
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
        if st.action == "crl-presign":
            raise OpError(f"{path}: step {i}: crl-presign (CRLs for future periods) is not supported by this appliance yet")
        missing = [f.replace("_", "-") for f in _REQUIRED[st.action] if getattr(st, f) in (None, {})]
        if missing:
            raise OpError(f"{path}: step {i} ({st.action}) needs {', '.join(missing)}")
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


def sign_transcript(session: Session, digest: bytes) -> dict[str, Any] | None:
    """HOOK (issue #6, officers branch): sign the transcript digest with the HSM audit key and return
    {"alg", "signature", "audit_cert"}. Until the audit-key signing API exists, None: unsigned."""
    return None


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
            password = self.t.secret("password: ")
            try:
                client, token = login(self.home, name, password)
            except OpError as e:
                self.t.say(f"login refused: {e}")
                continue
            self.present.append((name, Session(self.home, name, client, token)))
            self.t.say(f"{name} present")

    def witness(self, i: int) -> list[str]:
        yes = []
        for name, _ in self.present:
            if self.t.confirm(f"{name}: I witnessed step {i} as shown and approve it"):
                yes.append(name)
        return yes

    def execute(self, st: Step) -> tuple[dict[str, Any], bytes]:
        c = self.present[0][1].client
        if st.action in ("create-root", "create-ca"):
            subject = tuple(st.subject.items())
            doc = ops.ca_create(c, st.name, st.parent if st.action == "create-ca" else None, subject, st.profile,
                                st.key_type, st.validity_days, st.path_length)
            return doc, ops.ca_chain_pem(c, st.name, False)
        if st.action == "sign-csr":
            der = ops.der_of(M.read(os.path.dirname(self.path), st.csr), "CSR")
            doc = ops.ca_sign_csr(c, st.parent, st.profile or "sub-ca", der, st.validity_days, st.path_length)
            return {k: v for k, v in doc.items() if k != "cert"}, doc["cert"].encode()
        if st.action == "crl":
            der = ops.crl_generate(c, st.ca)
            return {"ca": st.ca, "crl_number": ops.crl_number(der), "bytes": len(der)}, der
        if st.action == "export-ca":
            return {"ca": st.ca, "chain": st.chain}, ops.ca_chain_pem(c, st.ca, st.chain)
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
        tr: dict[str, Any] = {
            "format": FORMAT, "ceremony": h.name, "description": h.description,
            "file": os.path.basename(self.path), "file_sha256": sha256_file(self.path),
            "host": socket.gethostname(), "software": code_identity(),
            "hsm": {"token": status.get("token")},
            "officers_listed": list(h.officers), "quorum": h.quorum,
            "officers_present": [{"name": n, "authenticated": s.token is not None,
                                  "method": "officer login" if s.token is not None else "admin socket credentials (no officer login in this build)"}
                                 for n, s in self.present],
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
                tr["steps"].append(rec)
                tr["outcome"] = f"aborted at step {i}: {len(witnesses)} approvals, quorum {h.quorum}"
                self.t.say(f"step {i} not approved by a quorum: ceremony aborted")
                rc = 1
                break
            rec["started"] = now()
            try:
                result, data = self.execute(st)
            except OpError as e:
                rec["outcome"] = f"failed: {e}"
                tr["steps"].append(rec)
                tr["outcome"] = f"aborted at step {i}: {e}"
                self.t.say(f"step {i} failed: {e}")
                rc = 1
                break
            M.write_new(os.path.join(self.out, st.out), data)
            rec.update(outcome="done", finished=now(), result=result,
                       outputs=[{"file": st.out, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}])
            tr["steps"].append(rec)
            self.t.say(f"step {i} done: {st.out} sha256 {rec['outputs'][0]['sha256']}")
        else:
            tr["outcome"] = "complete"
        after = ops.status(first.client)
        tr["audit_head_after"] = after.get("audit_head")
        tr["finished"] = now()
        tr["outputs"] = [o for s in tr["steps"] for o in s.get("outputs", [])]
        digest = hashlib.sha256(canonical(tr)).digest()
        sig = sign_transcript(first, digest)
        tr["transcript_sha256"] = digest.hex()
        tr["signature"] = sig if sig is not None else {"status": "unsigned: the audit-key signing API is not available in this build"}
        body = json.dumps(tr, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        M.write_new(os.path.join(self.out, "transcript.json"), body)
        M.write_new(os.path.join(self.out, "transcript.pdf"), text_pdf(pdf_lines(tr), f"Donjon ceremony {h.name}"))
        self.t.say(f"transcript: {os.path.join(self.out, 'transcript.json')} (sha256 {digest.hex()})",
                   f"printable:  {os.path.join(self.out, 'transcript.pdf')}", f"outcome: {tr['outcome']}")
        self.close()
        return rc

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
        for k, v in (s.get("result") or {}).items():
            lines.append(f"    result {k}: {v}")
        for o in s.get("outputs", []):
            lines.append(f"    output {o['file']} ({o['bytes']} bytes)")
            lines.append(f"      sha256 {o['sha256']}")
        lines.append("")
    lines += ["Transcript SHA-256 (canonical JSON, without this digest and the signature):",
              f"    {tr['transcript_sha256']}",
              f"Signature: {json.dumps(tr['signature'], sort_keys=True)}", "",
              "Witness signatures:", ""]
    for o in tr["officers_present"]:
        lines += [f"    {o['name']:<24} ______________________________   date ____________", ""]
    return lines


def verify(path: str) -> list[str]:
    """Problems with a transcript (empty: the digest and every output's SHA-256 match)."""
    try:
        with open(path, "rb") as f:
            tr = json.loads(f.read())
    except (OSError, ValueError) as e:
        return [f"{path}: cannot read a transcript: {e}"]
    problems = []
    if tr.get("format") != FORMAT:
        problems.append(f"unknown format {tr.get('format')!r}")
    body = {k: v for k, v in tr.items() if k not in ("transcript_sha256", "signature")}
    digest = hashlib.sha256(canonical(body)).hexdigest()
    if digest != tr.get("transcript_sha256"):
        problems.append("the transcript was changed after it was written (digest mismatch)")
    folder = os.path.dirname(os.path.abspath(path))
    for o in tr.get("outputs", []):
        p = os.path.join(folder, M.check_file_name(o["file"]))
        if not os.path.exists(p):
            problems.append(f"{o['file']}: missing")
        elif sha256_file(p) != o["sha256"]:
            problems.append(f"{o['file']}: SHA-256 differs from the transcript")
    return problems


def run_file(home: str, path: str, term: Term, out_base: str | None = None) -> int:
    c = Ceremony(home, path, term, out_base)
    try:
        return c.run()
    finally:
        c.close()

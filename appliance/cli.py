"""The `donjon` command: thin typer commands, each calling one function; errors are one line + exit 1."""

import json
import os
import sys
from typing import Annotated, Optional

import typer

from appliance import adminops as ops
from appliance.client import AdminClient, ClientError, connect, load_session, save_session
from appliance.ipc import schema as S

app = typer.Typer(help="Donjon: a hardened certificate authority appliance.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
ca_app = typer.Typer(help="Certificate authorities: list, show, create, sign an external CSR, export.", no_args_is_help=True)
cert_app = typer.Typer(help="Issued certificates: show, list, export.", no_args_is_help=True)
crl_app = typer.Typer(help="Certificate revocation lists.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
ocsp_app = typer.Typer(help="The OCSP/CRL endpoint and its pre-produced responses.", no_args_is_help=True)
officer_app = typer.Typer(help="Officer accounts: add, list, remove, passwd, unlock, totp.", no_args_is_help=True)
pending_app = typer.Typer(help="Dual-control requests waiting for approvals.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
app.add_typer(cert_app, name="cert")
app.add_typer(crl_app, name="crl")
app.add_typer(audit_app, name="audit")
app.add_typer(ocsp_app, name="ocsp")
dist_app = typer.Typer(help="Distribution: publication to LDAP and HTTP destinations (queue, status, retry).", no_args_is_help=True)
app.add_typer(dist_app, name="dist")
app.add_typer(officer_app, name="officer")
app.add_typer(pending_app, name="pending")
acme_app = typer.Typer(help="The ACME server of the protocol gateway: external account binding (EAB) keys.", no_args_is_help=True)
app.add_typer(acme_app, name="acme")
kgs_app = typer.Typer(help="Key generation: card personalisation, PIN letters, key recovery.", no_args_is_help=True)
app.add_typer(kgs_app, name="kgs")

Home = Annotated[str, typer.Option("--home", envvar="DONJON_HOME", help="State folder (DONJON_HOME).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
IssuedSerials = Annotated[bool, typer.Option("--issued-serials", help="The CA's signed issued-serials list instead of its CRL.")]

REASONS = ops.REASONS


def fail(msg: str, code: int = 1) -> None:
    typer.echo(f"donjon: {msg}", err=True)
    raise typer.Exit(code)


def client(home: str) -> AdminClient:
    """A connection carrying this user's officer session (see appliance.client.connect)."""
    try:
        return connect(home)
    except ClientError as e:
        fail(str(e))


def call(home: str, cls, **kw):
    try:
        with client(home) as c:
            doc = c.call(cls, **kw)
    except ClientError as e:
        fail(str(e))
    if "pending" in doc and "required" in doc:  # dual control: filed, not run
        typer.echo(f"request #{doc['pending']} ({doc['operation']}) is pending: {doc['approvals']} of {doc['required']} "
                   f"approvals; other officers run `donjon approve {doc['pending']}`")
        raise typer.Exit(0)
    return doc


def emit_json(doc, as_json: bool) -> bool:
    """With --json, print the command's data document and say so (the caller then prints nothing else)."""
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    return as_json


def lines_or(lines: list[str], empty: str) -> None:
    """Print the lines of a list, or say that it is empty (an empty output reads like a failure)."""
    for line in lines or [empty]:
        typer.echo(line)


def no_der_to_terminal(out: Optional[str], what: str) -> None:
    if out is None and sys.stdout.isatty():
        fail(f"{what} is DER (binary): give --out FILE or redirect the output")


def out_bytes(data: bytes, out: Optional[str]) -> None:
    if out:
        with open(out, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)


def op(fn, *a, **kw):
    """Run one shared admin operation (appliance/adminops.py: the CLI, console and SSH bodies)."""
    try:
        return fn(*a, **kw)
    except ops.OpError as e:
        fail(str(e))
    except ops.PendingApproval as e:  # dual control: filed, not run
        typer.echo(str(e))
        raise typer.Exit(0) from None


def parse_serial(s: str) -> bytes:
    return op(ops.parse_serial, s)


def parse_subject(s: str) -> tuple[tuple[str, str], ...]:
    return op(ops.parse_subject, s)


def read_file(path: str, what: str, limit: int | None = None) -> bytes:
    """The file's bytes; with `limit`, at most limit + 1 of them (the caller says what is too large)."""
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror}")


def read_csr(path: str) -> bytes:
    return op(ops.csr_der, read_file(path, "CSR", ops.MAX_CSR_FILE), path)


def der_of(data: bytes, label: str) -> bytes:
    """Accept DER or PEM."""
    return op(ops.der_of, data, label)


# ---------------------------------------------------------------- lifecycle


ROLE_NAMES = ("administrator", "operator", "auditor")


def password_from(prompt: str, confirm: bool = True) -> str:
    """DONJON_PASSWORD (scripts, tests), else a hidden prompt."""
    pw = os.environ.get("DONJON_PASSWORD")
    if pw:
        return pw
    return typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


def parse_officer(spec: str) -> tuple[str, tuple[str, ...]]:
    """'alice' (an administrator) or 'bob:operator' or 'carol:administrator+operator'."""
    name, _, roles = spec.partition(":")
    rs = tuple(r.strip() for r in roles.split("+")) if roles else ("administrator",)
    bad = [r for r in rs if r not in ROLE_NAMES]
    if bad or not name:
        fail(f"officer {spec!r}: NAME or NAME:ROLE[+ROLE] with roles among {', '.join(ROLE_NAMES)}")
    return name, rs


@app.command()
def init(home: Home = "./var",
         ceremony: Annotated[str, typer.Option(help="Root-CA ceremony TOML (key type, subject, validity, path length).")] = ...,
         pin_file: Annotated[Optional[str], typer.Option(help="Token user PIN (default: a new random PIN written to HOME/pin).")] = None,
         officer: Annotated[list[str], typer.Option(help="Create this officer: NAME (an administrator) or NAME:ROLE[+ROLE]; "
                                                         "repeatable; password prompted, or DONJON_PASSWORD.")] = [],  # noqa: B006
         shares: Annotated[Optional[int], typer.Option(help="Split the token PIN into this many shares (quorum activation).")] = None,
         threshold: Annotated[Optional[int], typer.Option(help="Shares needed to activate (with --shares).")] = None,
         shares_dir: Annotated[Optional[str], typer.Option(help="Write share-N.txt files here (0600) instead of printing them.")] = None) -> None:
    """Create the state folder, the embedded token and the CMDB, and run the root-CA ceremony.

    With --shares N --threshold M the token PIN is split (Shamir, GF(256)) into N checksummed shares,
    any M of which activate (`donjon activate --share ...`); no PIN file is kept.

    Example: donjon init --home ./var --ceremony image/demo-ceremony.toml --officer alice
    """
    import secrets

    import trio

    from appliance import config as C
    from appliance import home as H
    from appliance.supervisor import Supervisor, SupervisorError
    from policy import shamir
    from policy.errors import PolicyError

    if (shares is None) != (threshold is None):
        fail("--shares and --threshold go together")
    officers = []
    for spec_ in officer:
        name, roles = parse_officer(spec_)
        if "auditor" in roles and len(roles) > 1:
            fail(f"officer {name}: the auditor role is exclusive of the others")
        pw = password_from(f"Password for officer {name}")
        if len(pw) < 12:
            fail(f"officer {name}: a password has at least 12 characters")
        officers.append(S.InitOfficer(name=name, roles=roles, password=pw))
    if officers and not any("administrator" in o.roles for o in officers):
        fail("at least one of the --officer accounts must be an administrator")
    share_texts: list[str] = []
    try:
        spec = C.load_ceremony(ceremony)
        pin = H.read_pin(pin_file) if pin_file else None
        if shares is not None:
            if shares_dir and os.path.exists(shares_dir) and os.listdir(shares_dir):
                fail(f"{shares_dir} is not empty: refusing to overwrite shares")
            pin = pin or secrets.token_urlsafe(18)
            share_texts = shamir.split_pin(pin, threshold, shares, secrets.token_bytes)
        cfg, pin = H.create(home, pin, write_pin=shares is None)
        sup = Supervisor(home, cfg)
        sup.init_officers = officers
        rc = trio.run(sup.run, spec, pin)
    except (C.ConfigError, H.HomeError, SupervisorError) as e:
        fail(str(e))
    except PolicyError as e:
        fail(e.message)
    if rc != 0:
        fail("the ceremony failed (see the log above); nothing was kept in the CMDB but its audit records")
    if share_texts:
        if shares_dir:
            os.makedirs(shares_dir, mode=0o700, exist_ok=True)
            for i, t in enumerate(share_texts, 1):
                fd = os.open(os.path.join(shares_dir, f"share-{i}.txt"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(t + "\n")
            typer.echo(f"{len(share_texts)} PIN shares (any {threshold} activate) -> {shares_dir}/share-N.txt: hand one to each officer")
        else:
            typer.echo(f"PIN shares (any {threshold} of {len(share_texts)} activate); hand one to each officer, keep none here:")
            for i, t in enumerate(share_texts, 1):
                typer.echo(f"  share {i}: {t}")
    names = [spec.root.name] + [c.name for c in spec.issuing]
    typer.echo(f"Initialised {os.path.abspath(home)}: CAs {', '.join(names)}. Start it with: donjon run --home {home}")
    if not officers:
        typer.echo("No officer yet: create the first administrator with `donjon officer add NAME --role administrator`.")


@app.command()
def run(home: Home = "./var",
        activate: Annotated[bool, typer.Option(help="Activate from the PIN file at start (developer mode).")] = True) -> None:
    """Start the appliance (supervisor and roles) in the foreground; stop it with Ctrl-C or SIGTERM.

    Example: donjon run --home ./var
    """
    import trio

    from appliance import config as C
    from appliance import home as H
    from appliance.supervisor import Supervisor, SupervisorError

    try:
        cfg = C.load(home)
        pin = None
        if activate and cfg.hsm.pin_file:
            p = os.path.join(home, cfg.hsm.pin_file)
            if os.path.exists(p):
                pin = H.read_pin(p)
        rc = trio.run(Supervisor(home, cfg).run, None, pin)
    except (C.ConfigError, H.HomeError, SupervisorError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C outside the supervisor's signal handling (starting, or a second one while stopping)
        typer.echo("donjon: interrupted", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(rc)


@app.command()
def status(home: Home = "./var", as_json: JsonOut = False) -> None:
    """Show whether the appliance runs, is activated, and what it holds.

    Example: donjon status --json
    """
    with client(home) as c:
        doc = op(ops.status, c)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for line in ops.status_lines(doc):
        typer.echo(line)


@app.command("activate")
def activate_cmd(home: Home = "./var",
                 pin_file: Annotated[Optional[str], typer.Option(help="Read the token PIN from this file instead of prompting.")] = None,
                 share: Annotated[list[str], typer.Option(help="A PIN share (repeat for each officer present); '-' prompts.")] = [],  # noqa: B006
                 quorum: Annotated[Optional[int], typer.Option(help="Prompt for this many shares, one officer at a time.")] = None,
                 as_json: JsonOut = False) -> None:
    """Log the CIS into the token and open the CMDB, with the PIN or with a quorum of PIN shares.

    Example: donjon activate --pin-file ./var/pin
    Example: donjon activate --share DJS1-... --share DJS1-...   (or --quorum 3 to be prompted)
    """
    from appliance import home as H
    if share or quorum:
        from policy import shamir
        from policy.errors import PolicyError
        texts = [t for t in share if t != "-"]
        want = max(quorum or 0, len(share))
        while len(texts) < want:
            t = typer.prompt(f"Share {len(texts) + 1} of {want}", hide_input=True)
            try:
                shamir.parse_share(t)  # a typo is caught here, before anything reaches the appliance
            except PolicyError as e:
                typer.echo(f"donjon: {e.message}: type it again", err=True)
                continue
            texts.append(t)
        with client(home) as c:
            doc = op(ops.activate_shares, c, texts)
        if not emit_json(doc, as_json):
            typer.echo(f"activated: {doc['token']}")
        return
    try:
        pin = H.read_pin(pin_file) if pin_file else typer.prompt("Token PIN", hide_input=True)
    except H.HomeError as e:
        fail(str(e))
    with client(home) as c:
        doc = op(ops.activate, c, pin)
    if not emit_json(doc, as_json):
        typer.echo(f"activated: {doc['token']}")


# ---------------------------------------------------------------- officers and sessions


@app.command()
def login(officer: Annotated[str, typer.Option(help="Officer name.")] = ...,
          otp: Annotated[Optional[str], typer.Option(help="TOTP code, when the officer has the second factor on.")] = None,
          home: Home = "./var", as_json: JsonOut = False) -> None:
    """Log in as an officer; later commands use the session until `donjon logout` or 15 idle minutes.

    The password is prompted (or DONJON_PASSWORD). The token is kept 0600 in ~/.cache/donjon/ (or
    DONJON_SESSION_FILE); DONJON_SESSION passes one explicitly.

    Example: donjon login --officer alice
    """
    pw = password_from(f"Password for {officer}", confirm=False)
    try:
        with AdminClient(home) as c:
            token = c.login(officer, pw, otp)
            roles = c.roles
    except ClientError as e:
        fail(str(e))
    save_session(home, token)
    if not emit_json({"officer": officer, "roles": roles}, as_json):
        typer.echo(f"logged in as {officer} ({', '.join(roles)})")


@app.command()
def logout(home: Home = "./var") -> None:
    """End the stored session. Example: donjon logout"""
    token = load_session(home)
    if token:
        try:
            with AdminClient(home, session=token) as c:
                c.logout()
        except ClientError as e:
            if e.code not in ("auth", "not-running"):
                fail(str(e))
    save_session(home, None)
    typer.echo("logged out")


@officer_app.command("add")
def officer_add(name: str,
                role: Annotated[list[str], typer.Option(help="administrator | operator | auditor (repeatable; auditor alone).")] = ...,
                home: Home = "./var", as_json: JsonOut = False) -> None:
    """Create an officer (password prompted, or DONJON_PASSWORD). With no officer yet, only an administrator.

    Example: donjon officer add alice --role administrator
    """
    for r in role:
        if r not in ROLE_NAMES:
            fail(f"unknown role {r!r} (one of: {', '.join(ROLE_NAMES)})")
    pw = password_from(f"Password for officer {name}")
    with client(home) as c:
        doc = op(ops.officer_add, c, name, tuple(role), pw)
    if not emit_json(doc, as_json):
        typer.echo(f"officer {doc['name']} added ({', '.join(doc['roles'])})")


@officer_app.command("list")
def officer_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """List officers, their roles, second factor and lockout state. Example: donjon officer list"""
    with client(home) as c:
        docs = op(ops.officer_list, c)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
        return
    lines_or(ops.officer_list_lines(docs), "no officers")


@officer_app.command("remove")
def officer_remove(name: str, home: Home = "./var") -> None:
    """Remove an officer (never the last administrator). Example: donjon officer remove bob"""
    with client(home) as c:
        op(ops.officer_remove, c, name)
    typer.echo(f"officer {name} removed")


@officer_app.command("passwd")
def officer_passwd(name: str, home: Home = "./var") -> None:
    """Set an officer's password (prompted, or DONJON_NEW_PASSWORD). Example: donjon officer passwd alice"""
    pw = os.environ.get("DONJON_NEW_PASSWORD") or typer.prompt(f"New password for {name}", hide_input=True, confirmation_prompt=True)
    with client(home) as c:
        op(ops.officer_passwd, c, name, pw)
    typer.echo(f"password of {name} changed")


@officer_app.command("unlock")
def officer_unlock(name: str, home: Home = "./var",
                   share: Annotated[list[str], typer.Option(help="Break-glass: an activation PIN share (repeat for the quorum; "
                                                                   "'-' prompts); no officer login needed.")] = [],  # noqa: B006
                   new_password: Annotated[bool, typer.Option(help="Break-glass: also set a new password (prompted, "
                                                                   "or DONJON_NEW_PASSWORD).")] = False) -> None:
    """Unlock an officer. An administrator does it; when none can log in, a quorum of activation shares
    does (break-glass, audited), and may set a new password.

    Example: donjon officer unlock bob
    Example: donjon officer unlock alice --share DJS1-... --share DJS1-... --new-password
    """
    if share:
        texts = [t if t != "-" else typer.prompt("Share", hide_input=True) for t in share]
        pw = None
        if new_password:
            pw = os.environ.get("DONJON_NEW_PASSWORD") or typer.prompt(f"New password for {name}", hide_input=True,
                                                                       confirmation_prompt=True)
        try:
            c = AdminClient(home)  # no officer session: the shares are the authority
        except ClientError as e:
            fail(str(e))
        with c:
            doc = op(ops.officer_unlock_shares, c, name, texts, pw)
        typer.echo(f"officer {name} unlocked by a quorum of shares" + ("; new password set" if doc.get("password") == "changed" else ""))
        return
    if new_password:
        fail("--new-password goes with --share (break-glass); an administrator uses `donjon officer passwd`")
    with client(home) as c:
        op(ops.officer_unlock, c, name)
    typer.echo(f"officer {name} unlocked")


@officer_app.command("ssh-key")
def officer_ssh_key(name: str,
                    key_file: Annotated[Optional[str], typer.Option(help="The officer's OpenSSH public key file (one line).")] = None,
                    remove: Annotated[bool, typer.Option("--remove", help="Remove the officer's enrolled key.")] = False,
                    home: Home = "./var") -> None:
    """Enrol an officer's SSH public key for the SSH console account, or remove it (administrator; audited).

    Example: donjon officer ssh-key alice --key-file alice.pub
    """
    if remove == (key_file is not None):
        fail("give --key-file FILE or --remove")
    key = read_file(key_file, "SSH public key", 4096).decode("ascii", "replace") if key_file else None
    with client(home) as c:
        typer.echo(op(ops.officer_ssh_key, c, name, key)["message"])


@officer_app.command("totp")
def officer_totp(name: str, enable: Annotated[bool, typer.Option("--enable/--disable", help="Turn the TOTP second factor on or off.")] = True,
                 home: Home = "./var", as_json: JsonOut = False) -> None:
    """Turn an officer's TOTP second factor on (prints the secret and otpauth URI once) or off.

    Example: donjon officer totp alice --enable
    """
    doc = call(home, S.AOfficerTotp, name=name, enable=enable)
    if emit_json(doc, as_json):
        return
    if doc.get("totp"):
        typer.echo(f"TOTP on for {name}: secret {doc['secret']}\n{doc['uri']}")
    else:
        typer.echo(f"TOTP off for {name}")


@pending_app.command("list")
def pending_list(all_: Annotated[bool, typer.Option("--all", help="Also closed requests.")] = False,
                 home: Home = "./var", as_json: JsonOut = False) -> None:
    """Dual-control requests waiting for approvals. Example: donjon pending list"""
    with client(home) as c:
        docs = op(ops.pending_list, c, not all_)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
        return
    lines_or(ops.pending_lines(docs), "no pending requests")


@app.command()
def approve(request: int, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Approve a pending dual-control request; the last approval needed runs it.

    Example: donjon approve 7
    """
    with client(home) as c:
        doc = op(ops.approve, c, request)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    elif doc["executed"]:
        typer.echo(f"request #{request} approved ({doc['approvals']} of {doc['required']}) and executed")
        typer.echo(json.dumps(doc["result"], indent=2))
    else:
        typer.echo(f"request #{request} approved: {doc['approvals']} of {doc['required']}")


# ---------------------------------------------------------------- CAs


@ca_app.command("list")
def ca_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """List the CAs. Example: donjon ca list"""
    with client(home) as c:
        cas = op(ops.ca_list, c)
    if as_json:
        typer.echo(json.dumps(cas, indent=2))
        return
    lines_or(ops.ca_list_lines(cas), "no CAs")


@ca_app.command("show")
def ca_show(name: str, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Show one CA (a JSON document, with or without --json). Example: donjon ca show issuing"""
    typer.echo(json.dumps(call(home, S.ACaShow, name=op(ops.check_name, name, "CA name")), indent=2))


@ca_app.command("create")
def ca_create(name: str,
              parent: Annotated[Optional[str], typer.Option(help="The issuing (parent) CA; without it, a new self-signed root.")] = None,
              subject: Annotated[str, typer.Option(help="Subject, e.g. 'CN=Issuing CA 2,O=Example,C=FR'.")] = ...,
              profile: Annotated[Optional[str], typer.Option(help="CA profile (default sub-ca, or root-ca without --parent).")] = None,
              key_type: Annotated[str, typer.Option(help="rsa2048|rsa3072|rsa4096|p256|p384|ed25519")] = "p256",
              days: Annotated[int, typer.Option(help="Validity in days (clamped to the parent's).")] = 3650,
              path_length: Annotated[Optional[int], typer.Option(help="pathLenConstraint.")] = None,
              allow_profile: Annotated[list[str], typer.Option(help="A profile the new CA may issue (repeatable; default: "
                                                                    "donjon.toml [ca-profiles], else CA profiles for a root and "
                                                                    "the others for an issuing CA). Kept in the token, never changed.")] = [],  # noqa: B006
              home: Home = "./var", as_json: JsonOut = False) -> None:
    """Create a CA whose key is generated in the HSM: a subordinate of --parent, or a new root.

    Example: donjon ca create issuing2 --parent root --subject 'CN=Issuing CA 2,O=Example'
    """
    with client(home) as c:
        doc = op(ops.ca_create, c, name, parent, parse_subject(subject), profile, key_type, days, path_length,
                 tuple(allow_profile))
    if not emit_json(doc, as_json):
        typer.echo(f"created CA {doc['name']}: {doc['subject']} serial {doc['serial']}")


@ca_app.command("sign-csr")
def ca_sign_csr(csr: str,
                parent: Annotated[str, typer.Option(help="The signing CA.")] = ...,
                profile: Annotated[str, typer.Option(help="A sub-ca profile.")] = "sub-ca",
                days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
                path_length: Annotated[Optional[int], typer.Option(help="pathLenConstraint.")] = None,
                out: Annotated[Optional[str], typer.Option(help="Write the certificate (PEM) here.")] = None,
                home: Home = "./var", as_json: JsonOut = False) -> None:
    """Certify an external subordinate CA from its CSR (the offline root's main job).

    Example: donjon ca sign-csr sub.csr --parent root --out sub.pem
    """
    der = read_csr(csr)
    with client(home) as c:
        doc = op(ops.ca_sign_csr, c, parent, profile, der, days, path_length)
    if as_json:
        if out:
            out_bytes(doc["cert"].encode(), out)
        emit_json(doc, as_json)
        return
    out_bytes(doc["cert"].encode(), out)
    if out:
        typer.echo(f"signed serial {doc['serial']} -> {out}")


@ca_app.command("request")
def ca_request(name: str,
               subject: Annotated[str, typer.Option(help="Subject, e.g. 'CN=Issuing CA,O=Example,C=FR'.")] = ...,
               key_type: Annotated[str, typer.Option(help="rsa2048|rsa3072|rsa4096|p256|p384|ed25519")] = "p256",
               profile: Annotated[str, typer.Option(help="The sub-ca profile the request follows.")] = "sub-ca",
               path_length: Annotated[Optional[int], typer.Option(help="pathLenConstraint asked for.")] = None,
               allow_profile: Annotated[list[str], typer.Option(help="A profile the CA may issue (repeatable; default: "
                                                                    "the issuing CA's). Kept in the token at install.")] = [],  # noqa: B006
               renew: Annotated[bool, typer.Option("--renew", help="A new certificate for the CA's existing key.")] = False,
               rekey: Annotated[bool, typer.Option("--rekey", help="A new key: the successor CA NAME.kN, which issues in "
                                                              "NAME's place once installed (NAME's key keeps signing its CRLs and OCSP).")] = False,
               out: Annotated[Optional[str], typer.Option(help="Write the request (PEM) here.")] = None,
               home: Home = "./var", as_json: JsonOut = False) -> None:
    """Make a CA's key in the HSM and its PKCS#10 request, signed there, for a parent elsewhere; the CA
    awaits its certificate (ca install) and issues nothing until then.

    Example: donjon ca request issuing --subject 'CN=Example Issuing CA,O=Example' --key-type p256 --out issuing.csr
    """
    if renew and rekey:
        fail("--renew (same key) or --rekey (new key), not both")
    with client(home) as c:
        doc = op(ops.ca_request, c, name, parse_subject(subject), key_type, profile, path_length, tuple(allow_profile),
                 "renew" if renew else "rekey" if rekey else "new")
    if out:
        out_bytes(doc["csr"].encode(), out)
    if emit_json(doc, as_json):
        return
    if out:
        typer.echo(f"CA {doc['name']}: {doc['state']}; request (sha256 {doc['sha256']}) -> {out}")
    else:
        typer.echo(doc["csr"], nl=False)


@ca_app.command("install")
def ca_install(name: str, cert: str,
               chain: Annotated[Optional[str], typer.Option(help="The intermediate certificates up to the root (PEM).")] = None,
               trust_anchor: Annotated[Optional[str], typer.Option(help="The root certificate (PEM), given once: "
                                                                         "kept in the HSM beside the CA key.")] = None,
               home: Home = "./var", as_json: JsonOut = False) -> None:
    """Install the certificate a parent elsewhere returned for `ca request`, after every check (the token
    key, a CA certificate valid now, the chain up to the trust anchor, the constraints); the CA becomes active.

    Example: donjon ca install issuing issuing.pem --trust-anchor root.pem
    """
    der = op(ops.certs_of, read_file(cert, "certificate", ops.MAX_CERT_FILE), cert, 1)[0]
    ch = op(ops.certs_of, read_file(chain, "chain", ops.MAX_CERT_FILE), chain, 8) if chain else []
    anchor = op(ops.certs_of, read_file(trust_anchor, "trust anchor", ops.MAX_CERT_FILE), trust_anchor, 1)[0] if trust_anchor else None
    with client(home) as c:
        doc = op(ops.ca_install, c, name, der, ch, anchor)
    if not emit_json(doc, as_json):
        typer.echo(f"installed CA {doc['name']}: {doc['subject']} serial {doc['serial']} until {doc['not_after'][:10]}")


@ca_app.command("export")
def ca_export(name: str, chain: Annotated[bool, typer.Option(help="Include the parents up to the root.")] = False,
              out: Annotated[Optional[str], typer.Option(help="Output file (PEM).")] = None, home: Home = "./var") -> None:
    """Export a CA certificate (and its chain) as PEM. Example: donjon ca export issuing --chain --out chain.pem"""
    with client(home) as c:
        out_bytes(op(ops.ca_chain_pem, c, name, chain), out)


# ---------------------------------------------------------------- certificates


@app.command()
def issue(ca: Annotated[str, typer.Option(help="Issuing CA.")] = ...,
          profile: Annotated[str, typer.Option(help="Certificate profile, e.g. tls-server.")] = ...,
          csr: Annotated[list[str], typer.Option(help="CSR file (PEM or DER); repeat for a batch.")] = ...,
          out: Annotated[Optional[str], typer.Option(help="Write the certificate(s) (PEM) here.")] = None,
          days: Annotated[Optional[int], typer.Option(help="Validity in days (default and maximum: the profile's).")] = None,
          as_json: JsonOut = False, home: Home = "./var") -> None:
    """Issue certificates from CSRs.

    Example: donjon issue --ca issuing --profile tls-server --csr www.csr --out www.pem
    """
    ders = [read_csr(p) for p in csr]
    with client(home) as c:
        pem, docs, failed = op(ops.issue, c, ca, profile, ders, days, list(csr))
    for d in docs:
        if "error" in d:
            typer.echo(f"donjon: {d['csr']}: refused: {d['error']}", err=True)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
    elif pem:
        out_bytes(pem, out)
        if out:
            typer.echo(f"issued {len(csr) - failed} certificate(s) -> {out}")
        for d in docs:  # the serial is what `revoke`, `cert show` and `cert export` take
            if "serial" in d:
                typer.echo(f"serial {d['serial']}  {d['csr']}", err=out is None)
    if failed:
        raise typer.Exit(1)


@cert_app.command("show")
def cert_show(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ..., home: Home = "./var",
              as_json: JsonOut = False) -> None:
    """Show a certificate's record (a JSON document, with or without --json; times in ISO 8601 as `ca show`).

    Example: donjon cert show --ca issuing 5f3a...
    """
    with client(home) as c:
        doc = op(ops.cert_show, c, ca, parse_serial(serial))
    typer.echo(json.dumps(ops.cert_doc(doc), indent=2))


@cert_app.command("export")
def cert_export(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ...,
                out: Annotated[Optional[str], typer.Option(help="Output file (PEM).")] = None, home: Home = "./var") -> None:
    """Export a certificate as PEM. Example: donjon cert export --ca issuing 5f3a... --out c.pem"""
    with client(home) as c:
        out_bytes(op(ops.cert_show, c, ca, parse_serial(serial))["pem"].encode(), out)


@cert_app.command("list")
def cert_list(ca: Annotated[Optional[str], typer.Option(help="Only this CA.")] = None,
              limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
              subject: Annotated[Optional[str], typer.Option(help="Subject contains this (case-insensitive).")] = None,
              san: Annotated[Optional[str], typer.Option(help="A SAN contains this, e.g. 'dns:www.' or 'spiffe://'.")] = None,
              status: Annotated[Optional[str], typer.Option(help="valid, revoked or expired.")] = None,
              expires_within: Annotated[Optional[int], typer.Option(help="Valid certificates expiring within this many days.")] = None,
              profile: Annotated[Optional[str], typer.Option(help="Only this profile.")] = None,
              as_json: JsonOut = False, home: Home = "./var") -> None:
    """List issued certificates, newest first, filtered. Example: donjon cert list --ca issuing --expires-within 30"""
    with client(home) as c:
        certs = op(ops.cert_list, c, ca, limit, subject, san, status, expires_within, profile)
    if as_json:
        typer.echo(json.dumps(certs, indent=2))
        return
    lines_or(ops.cert_list_lines(certs), "no certificates" + (f" issued by {ca}" if ca else ""))


@app.command()
def revoke(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ...,
           reason: Annotated[str, typer.Option(help="RFC 5280 reason: " + ", ".join(REASONS))] = "unspecified",
           invalidity: Annotated[Optional[str], typer.Option(help="Invalidity date (ISO 8601, UTC).")] = None,
           release: Annotated[bool, typer.Option("--release", help="Release from certificateHold (as `donjon unrevoke`).")] = False,
           home: Home = "./var", as_json: JsonOut = False) -> None:
    """Revoke a certificate; revoking one on certificateHold with another reason makes it permanent.

    Example: donjon revoke --ca issuing 5f3a... --reason keyCompromise
    """
    sb = parse_serial(serial)
    if release:
        if reason != "unspecified" or invalidity:
            fail("--release takes no --reason or --invalidity")
        _unrevoke(home, ca, sb, as_json)
        return
    op(ops.check_name, ca, "CA name")
    op(ops.parse_reason, reason)
    op(ops.parse_invalidity, invalidity)
    with client(home) as c:
        doc = op(ops.revoke, c, ca, sb, reason, invalidity)
    was = " (was certificateHold)" if doc.get("was_on_hold") else ""
    if doc.get("known_by_serial_only"):
        was += "; known only by its serial (recovered by a restore): no directory entry updated"
    if not emit_json(doc, as_json):
        typer.echo(f"revoked {doc['ca']}/{doc['serial']} ({reason}){was}")


@app.command()
def unrevoke(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ..., home: Home = "./var",
             as_json: JsonOut = False) -> None:
    """Release a certificate from certificateHold: off the next CRL, OCSP `good` again.

    Example: donjon unrevoke --ca issuing 5f3a...
    """
    _unrevoke(home, ca, parse_serial(serial), as_json)


def _unrevoke(home: str, ca: str, sb: bytes, as_json: bool = False) -> None:
    op(ops.check_name, ca, "CA name")
    with client(home) as c:
        doc = op(ops.unrevoke, c, ca, sb)
    if not emit_json(doc, as_json):
        typer.echo(f"released {doc['ca']}/{doc['serial']} from certificateHold")


@crl_app.command("generate")
def crl_generate(ca: Annotated[str, typer.Option(help="The CA.")] = ...,
                 out: Annotated[Optional[str], typer.Option(help="Write the CRL (DER) here.")] = None,
                 issued_serials: IssuedSerials = False,
                 delta: Annotated[bool, typer.Option("--delta", help="A delta CRL on the latest full CRL (crl.delta).")] = False,
                 home: Home = "./var") -> None:
    """Sign a new full CRL now (with --delta, a delta CRL; with --issued-serials, a new issued-serials list).

    Example: donjon crl generate --ca issuing --out issuing.crl
    """
    no_der_to_terminal(out, "a CRL" if not issued_serials else "an issued-serials list")  # before a new one is signed
    if delta and issued_serials:
        fail("--delta and --issued-serials exclude each other")
    with client(home) as c:
        data = op(ops.crl_generate, c, ca, "issued-serials" if issued_serials else "crl", delta)
    if out:
        out_bytes(data, out)
        what = "issued-serials list" if issued_serials else "delta CRL" if delta else "CRL"
        typer.echo(f"{what} for {ca}: {len(data)} bytes -> {out}")
    else:
        out_bytes(data, None)


clock_app = typer.Typer(help="The appliance clock: show (UTC and hardware clock), set (dual control).", no_args_is_help=True)
app.add_typer(clock_app, name="clock")


@clock_app.command("show")
def clock_show(as_json: JsonOut = False) -> None:
    """The system clock (UTC) and the hardware clock of this machine. Example: donjon clock show"""
    from appliance import clock
    lines = clock.show()
    if not emit_json({"system": lines[0].split(":", 1)[1].strip(), "hardware": lines[1].split(":", 1)[1].strip()}, as_json):
        for line in lines:
            typer.echo(line)


@clock_app.command("apply", hidden=True)
def clock_apply() -> None:
    """donjon-clock@.service only (the image): set the clocks to the epoch read on stdin, one line back."""
    import sys

    from appliance import clock
    raise typer.Exit(clock.helper_main(sys.stdin, sys.stdout))


@clock_app.command("set")
def clock_set(when: Annotated[str, typer.Argument(help="The time, UTC: 'YYYY-MM-DD HH:MM:SS'.")],
              home: Home = "./var") -> None:
    """Set the system and hardware clocks (administrator; dual control `clock-set`; audited).

    Example: donjon clock set '2026-12-07 14:30:00'
    """
    epoch = op(ops.parse_utc, when)
    with client(home) as c:
        typer.echo(op(ops.clock_set, c, epoch))


@crl_app.command("presign")
def crl_presign(ca: Annotated[str, typer.Option(help="The (offline root) CA.")] = ...,
                periods: Annotated[int, typer.Option(help="How many CRLs to sign ahead.")] = 12,
                every: Annotated[str, typer.Option(help="The period: 30d, 7d, 12h.")] = "30d",
                overlap: Annotated[str, typer.Option(help="How long each CRL stays valid past the next one's start.")] = "0d",
                out: Annotated[str, typer.Option(help="Write the bundle (CRLs + manifest) here.")] = ...,
                home: Home = "./var", as_json: JsonOut = False) -> None:
    """Sign a CA's next CRLs ahead, one per period, into one bundle for the online appliance.

    Example: donjon crl presign --ca root --periods 12 --every 30d --overlap 2d --out root-calendar.json
    """
    e = op(ops.parse_period, every, "period")
    o = op(ops.parse_period, overlap, "overlap")
    if os.path.exists(out):
        fail(f"{out} exists: a bundle is never overwritten")
    with client(home) as c:
        doc = op(ops.crl_presign, c, ca, periods, e, o)
    out_bytes(doc["bundle"].encode(), out)
    if not emit_json({k: v for k, v in doc.items() if k != "bundle"}, as_json):
        typer.echo(f"CRLs #{doc['first']}-#{doc['last']} of {doc['ca']} signed ahead -> {out}")


calendar_app = typer.Typer(help="An offline root's CRL calendar on the online appliance.", no_args_is_help=True)
crl_app.add_typer(calendar_app, name="calendar")


@calendar_app.command("load")
def crl_calendar_load(bundle: str, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Verify every CRL of a calendar bundle against the root certificate and publish each at its thisUpdate.

    Example: donjon crl calendar load /media/donjon/root-calendar.json
    """
    data = read_file(bundle, "calendar bundle", ops.MAX_BUNDLE)
    with client(home) as c:
        doc = op(ops.crl_calendar_load, c, data)
    if not emit_json(doc, as_json):
        typer.echo(f"calendar of {doc['ca']}: CRLs #{doc['first']}-#{doc['last']} ({doc['new']} new) loaded")
        for line in ops.calendar_lines([doc]):
            typer.echo(line)


@calendar_app.command("status")
def crl_calendar_status(home: Home = "./var", as_json: JsonOut = False) -> None:
    """The loaded CRL calendars: the current CRL, how many wait, until when they cover. Example: donjon crl calendar status"""
    with client(home) as c:
        cals = op(ops.crl_calendar_status, c)
    if not emit_json(cals, as_json):
        lines_or(ops.calendar_lines(cals), "no CRL calendar")


@crl_app.command("export")
def crl_export(ca: Annotated[str, typer.Option(help="The CA.")] = ...,
               number: Annotated[Optional[int], typer.Option(help="A given CRL number (default: the latest).")] = None,
               out: Annotated[Optional[str], typer.Option(help="Write the CRL (DER) here.")] = None,
               issued_serials: IssuedSerials = False,
               home: Home = "./var") -> None:
    """Export the latest stored CRL (or a given number) without signing a new one.

    Example: donjon crl export --ca issuing --out issuing.crl
    """
    no_der_to_terminal(out, "a CRL" if not issued_serials else "an issued-serials list")
    with client(home) as c:
        data = op(ops.crl_export, c, ca, number, "issued-serials" if issued_serials else "crl")
    out_bytes(data, out)


@ocsp_app.command("status")
def ocsp_status(home: Home = "./var", as_json: JsonOut = False) -> None:
    """Pre-produced responses per CA (held, queued, oldest, next refresh, lapsed) and the endpoint's counters.

    Example: donjon ocsp status
    """
    with client(home) as c:
        doc = op(ops.ocsp_status, c)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for line in ops.ocsp_status_lines(doc):
        typer.echo(line)


@ocsp_app.command("responder-cert")
def ocsp_responder_cert(ca: Annotated[str, typer.Option(help="The CA the responder answers for.")] = ...,
                        days: Annotated[int, typer.Option(help="Validity in days (short-lived: ocsp-nocheck).")] = 30,
                        out: Annotated[Optional[str], typer.Option(help="Write the responder certificate (PEM) here.")] = None,
                        home: Home = "./var", as_json: JsonOut = False) -> None:
    """Give the endpoint a delegated responder for a CA: a key in the endpoint's own token, certified by the CA.
    With it the endpoint also answers requests with several certificates and echoes nonces.

    Example: donjon ocsp responder-cert --ca issuing
    """
    op(ops.check_name, ca, "CA name")
    op(ops.check_range, days, 1, 366, "validity in days")
    doc = call(home, S.AOcspResponderCert, ca=ca, validity_days=days)
    if out:
        out_bytes(doc["cert"].encode(), out)
    if emit_json(doc, as_json):
        return
    typer.echo(f"responder for {doc['ca']}: serial {doc['serial']}, key {doc['label']}, until {doc['not_after'][:10]}")


# ---------------------------------------------------------------- distribution


@dist_app.command("status")
def dist_status(home: Home = "./var", as_json: JsonOut = False) -> None:
    """Per destination: backlog, oldest pending job, parked jobs, last success and last error.

    Example: donjon dist status
    """
    with client(home) as c:
        doc = op(ops.dist_status, c)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for line in ops.dist_status_lines(doc):
        typer.echo(line)


@dist_app.command("list")
def dist_list(state: Annotated[str, typer.Option(help="pending, parked or done.")] = "parked",
              rule: Annotated[Optional[str], typer.Option(help="Only this destination.")] = None,
              limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
              home: Home = "./var", as_json: JsonOut = False) -> None:
    """List publication jobs (parked ones by default) with their last error.

    Example: donjon dist list --state parked
    """
    with client(home) as c:
        jobs = op(ops.dist_list, c, state, rule, limit)
    if as_json:
        typer.echo(json.dumps({"jobs": jobs}, indent=2))
        return
    lines_or(ops.dist_list_lines(jobs), f"no {state} jobs")


@dist_app.command("retry")
def dist_retry(rule: Annotated[Optional[str], typer.Option(help="Only this destination's parked jobs.")] = None,
               job: Annotated[Optional[int], typer.Option(help="Only this job.")] = None,
               home: Home = "./var", as_json: JsonOut = False) -> None:
    """Put parked jobs back in the queue and retry their destinations at once.

    Example: donjon dist retry --rule directory
    """
    with client(home) as c:
        n = op(ops.dist_retry, c, rule, job)
    if not emit_json({"requeued": n}, as_json):
        typer.echo(f"{n} job(s) back in the queue")


# ---------------------------------------------------------------- OCSP: CRL-fed tenants

tenant_app = typer.Typer(help="CRL-fed tenants: other CAs the endpoint answers for from their CRLs.", no_args_is_help=True)
ocsp_app.add_typer(tenant_app, name="tenant")
Unissued = Annotated[Optional[str], typer.Option("--unissued", help="A serial outside the issued-serials list: "
                                                 "`unknown`, or `revoked` (RFC 6960 extended revoked).")]


def _unissued(v: Optional[str]) -> Optional[str]:
    if v is not None and v not in ("unknown", "revoked"):
        fail("--unissued is `unknown` or `revoked`")
    return v


def _secret(path: Optional[str]) -> Optional[bytes]:
    return read_file(path, "push secret file").strip() if path else None


@tenant_app.command("add")
def tenant_add(name: str,
               ca_cert: Annotated[str, typer.Option("--ca-cert", help="The tenant CA's certificate (PEM or DER).")] = ...,
               crl_url: Annotated[Optional[list[str]], typer.Option("--crl-url", help="Where its CRL is published (http://, ldap://); repeatable.")] = None,
               refresh: Annotated[int, typer.Option(help="Seconds between scheduled CRL fetches (also fetched at nextUpdate).")] = 3600,
               unissued: Unissued = "unknown",
               push_secret_file: Annotated[Optional[str], typer.Option("--push-secret-file", help="A file holding the bearer secret that allows `PUT /tenant/NAME/crl`.")] = None,
               home: Home = "./var", as_json: JsonOut = False) -> None:
    """Answer OCSP for another CA from its CRL. Then: `tenant csr`, have that CA certify the CSR, `tenant update --responder-cert`.

    Example: donjon ocsp tenant add partner --ca-cert partner-ca.pem --crl-url http://pki.partner.example/ca.crl
    """
    ca = der_of(read_file(ca_cert, "CA certificate"), "CA certificate")
    doc = call(home, S.AOcspTenantAdd, name=name, ca_cert=ca, crl_urls=list(crl_url or []), refresh_seconds=refresh,
               unissued=_unissued(unissued), push_secret=_secret(push_secret_file))
    if emit_json(doc, as_json):
        return
    typer.echo(f"tenant {doc['name']} added: {doc['ca']}; next: donjon ocsp tenant csr {doc['name']} --out {doc['name']}-responder.csr")


@tenant_app.command("update")
def tenant_update(name: str,
                  responder_cert: Annotated[Optional[str], typer.Option("--responder-cert", help="The OCSP-signing certificate the tenant CA issued for `tenant csr` (PEM or DER).")] = None,
                  crl_url: Annotated[Optional[list[str]], typer.Option("--crl-url", help="Replace the CRL URLs; repeatable.")] = None,
                  refresh: Annotated[Optional[int], typer.Option(help="Seconds between scheduled CRL fetches.")] = None,
                  unissued: Unissued = None,
                  push_secret_file: Annotated[Optional[str], typer.Option("--push-secret-file", help="Replace the push bearer secret.")] = None,
                  home: Home = "./var", as_json: JsonOut = False) -> None:
    """Change a tenant; `--responder-cert` installs its delegated responder (checked: that key, that CA, id-kp-OCSPSigning).

    Example: donjon ocsp tenant update partner --responder-cert partner-responder.pem
    """
    cert = der_of(read_file(responder_cert, "responder certificate"), "responder certificate") if responder_cert else None
    doc = call(home, S.AOcspTenantUpdate, name=name, crl_urls=list(crl_url) if crl_url else None, refresh_seconds=refresh,
               unissued=_unissued(unissued), push_secret=_secret(push_secret_file), responder_cert=cert)
    if emit_json(doc, as_json):
        return
    msg = f"tenant {doc['name']} updated"
    if doc.get("responder"):
        msg += f"; responder certificate {doc['responder']['serial']} until {doc['responder']['not_after'][:10]}"
    if doc.get("responder_nocheck") is False:
        msg += " (warning: no id-pkix-ocsp-nocheck extension)"
    typer.echo(msg)


@tenant_app.command("list")
def tenant_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """Tenants, their current CRL, responder and last refusal. Example: donjon ocsp tenant list"""
    doc = call(home, S.AOcspTenantList)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    if not doc["tenants"]:
        typer.echo("no tenants")
    for t in doc["tenants"]:
        nu = ops.when(t["crl_next_update"])
        typer.echo(f"{t['name']:<16} CRL #{t['crl_number'] if t['crl_number'] is not None else '-'} nextUpdate {nu}"
                   f"{'  STALE' if t['stale'] else ''}  responder {'yes' if t['responder'] else 'no'}  unissued {t['unissued']}"
                   f"  serials-list {'yes' if t['issued_serials'] else 'no'}  push {'yes' if t['push'] else 'no'}"
                   f"  urls {' '.join(t['crl_urls']) or '-'}")
        if t["last_refusal"]:
            typer.echo(f"{'':<16} last refused CRL: {t['last_refusal']}")


@tenant_app.command("remove")
def tenant_remove(name: str, home: Home = "./var") -> None:
    """Stop answering for a tenant. Example: donjon ocsp tenant remove partner"""
    call(home, S.AOcspTenantRemove, name=name)
    typer.echo(f"tenant {name} removed")


@tenant_app.command("csr")
def tenant_csr(name: str, out: Annotated[str, typer.Option(help="Write the CSR (PEM) here.")] = ...,
               home: Home = "./var") -> None:
    """Generate the tenant's responder key in the endpoint's own token and a CSR for the tenant CA to certify
    (it should give id-kp-OCSPSigning and id-pkix-ocsp-nocheck).

    Example: donjon ocsp tenant csr partner --out partner-responder.csr
    """
    doc = call(home, S.AOcspTenantCsr, name=name)
    out_bytes(doc["csr"].encode(), out)
    typer.echo(f"CSR for tenant {name} (key {doc['label']} in the endpoint's token) written to {out}")


@tenant_app.command("crl")
def tenant_crl(name: str, file: str, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Upload a tenant CRL by hand (e.g. from removable media at an offline site); it is verified before use.

    Example: donjon ocsp tenant crl partner partner.crl
    """
    der = der_of(read_file(file, "CRL"), "CRL")
    if len(der) > 7 * 1024 * 1024:
        fail("the CRL is larger than 7 MiB: have the Distribution agent fetch it, or push it over HTTP")
    doc = call(home, S.AOcspTenantCrl, name=name, crl=der)
    if emit_json(doc, as_json):
        return
    nu = ops.when(doc["next_update"])
    typer.echo(f"tenant {name}: CRL #{doc['crl_number']} in use until {nu}")


@tenant_app.command("serials")
def tenant_serials(name: str, file: Annotated[Optional[str], typer.Argument(help="Hex serials, one a line.")] = None,
                   clear: Annotated[bool, typer.Option(help="Drop the list.")] = False, home: Home = "./var",
                   as_json: JsonOut = False) -> None:
    """The tenant's issued-serials list: a serial outside it is never `good`.

    Example: donjon ocsp tenant serials partner issued.txt
    """
    if (file is None) == (not clear):
        fail("give a FILE or --clear")
    data = None if clear else read_file(file, "serials list")
    if data is not None and len(data) > 7 * 1024 * 1024:
        fail("the serials list is larger than 7 MiB")
    doc = call(home, S.AOcspTenantSerials, name=name, data=data)
    if not emit_json(doc, as_json):
        typer.echo(f"tenant {name}: issued-serials list cleared" if clear
               else f"tenant {name}: issued-serials list of {doc['serials']} serials in use")


# ---------------------------------------------------------------- audit


@audit_app.command("export")
def audit_export(out: Annotated[Optional[str], typer.Option(help="Output file (JSON Lines).")] = None, home: Home = "./var") -> None:
    """Export the audit log as JSON Lines. Example: donjon audit export --out audit.jsonl"""
    with client(home) as c:
        data = op(ops.audit_export, c)
    out_bytes(data, out)


@audit_app.command("verify")
def audit_verify(file: Annotated[Optional[str], typer.Argument(help="An exported log; default: export from the running appliance.")] = None,
                 cert: Annotated[Optional[str], typer.Option(help="The audit certificate (donjon audit cert): check checkpoint signatures.")] = None,
                 anchor: Annotated[Optional[str], typer.Option(help="A published signed head (donjon audit checkpoint --out): detect a rollback.")] = None,
                 home: Home = "./var") -> None:
    """Verify the audit hash chain offline, name the first record that breaks it, check the signed
    checkpoints against the audit certificate and, with --anchor, that the log was not rolled back.

    Example: donjon audit verify audit.jsonl --cert audit.pem --anchor head.json
    """
    if file:
        data = read_file(file, "audit log")
    else:
        with client(home) as c:
            data = op(ops.audit_export, c)
    crt = read_file(cert, "audit certificate") if cert else None
    anc = read_file(anchor, "anchor") if anchor else None
    typer.echo(op(ops.audit_verify, data, crt, anc))


@audit_app.command("checkpoint")
def audit_checkpoint(out: Annotated[Optional[str], typer.Option(help="Write the signed head (JSON) here: a rollback anchor to publish.")] = None,
                     home: Home = "./var", as_json: JsonOut = False) -> None:
    """Have the HSM's audit key sign the chain head now. Example: donjon audit checkpoint --out head.json"""
    with client(home) as c:
        doc = op(ops.audit_checkpoint, c)
    if out:
        out_bytes(json.dumps(doc).encode() + b"\n", out)
    if not emit_json(doc, as_json):
        typer.echo(f"checkpoint signed: seq {doc['seq']} head {doc['head']}" + (f" -> {out}" if out else ""))


@audit_app.command("cert")
def audit_cert(out: Annotated[Optional[str], typer.Option(help="Output file (PEM).")] = None, home: Home = "./var") -> None:
    """Export the audit key's self-issued certificate (to verify checkpoints offline). Example: donjon audit cert --out audit.pem"""
    with client(home) as c:
        out_bytes(op(ops.audit_cert, c).encode(), out)


@audit_app.command("reconcile")
def audit_reconcile(home: Home = "./var", as_json: JsonOut = False) -> None:
    """List serials whose intent had no certificate after a crash (voided, treated as possibly issued)."""
    doc = call(home, S.AReconcile)
    if not emit_json(doc, as_json):
        lines_or([f"#{v['seq']} {ops.when(v['ts'])} {v['object']}: {v['detail']}" for v in doc["voided"]],
                 "no voided intents: every reserved serial has its certificate")


# ---------------------------------------------------------------- console, SSH, ceremonies, settings (issue #6)

ceremony_app = typer.Typer(help="Scripted, witnessed key ceremonies with a hashed transcript.", no_args_is_help=True)
config_app = typer.Typer(help="Network and endpoint settings in HOME/donjon.toml (validated).", no_args_is_help=True)
app.add_typer(ceremony_app, name="ceremony")
app.add_typer(config_app, name="config")


@app.command()
def console(home: Home = "./var",
            ssh: Annotated[bool, typer.Option("--ssh", help="Started by sshd (the SSH admin face).")] = False) -> None:
    """The numbered appliance menu for a serial console or SSH (80x24, plain text, no shell).

    Example: donjon console
    """
    from appliance.console.menu import run
    raise typer.Exit(run(home, ssh=ssh))


@app.command("ssh-shell")
def ssh_shell(home: Home = "/var/lib/donjon") -> None:
    """sshd's ForceCommand: the menu, or one allow-listed read-only command from SSH_ORIGINAL_COMMAND.

    Example (sshd_config): ForceCommand /usr/bin/donjon ssh-shell
    """
    from appliance.console.sshshell import main as ssh_main
    raise typer.Exit(ssh_main(home))


@app.command()
def shutdown(home: Home = "./var",
             yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False) -> None:
    """Stop the appliance cleanly (audited; the supervisor stops every role as on SIGTERM).

    Example: donjon shutdown --yes
    """
    if not yes and not typer.confirm("Stop the appliance?"):
        raise typer.Exit(1)
    with client(home) as c:
        op(ops.shutdown, c)
    typer.echo("the appliance is stopping")


backup_app = typer.Typer(help="Backups of the CMDB: make one (--out), or check one (verify).", invoke_without_command=True)
app.add_typer(backup_app, name="backup")


@backup_app.callback()
def backup(ctx: typer.Context,
           out: Annotated[Optional[str], typer.Option(help="New file for the backup (tar); never overwritten.")] = None,
           home: Home = "./var", as_json: JsonOut = False) -> None:
    """A consistent online copy of the encrypted CMDB and its HSM-wrapped key (audited).

    Example: donjon backup --out /media/donjon/backup.tar
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        fail("donjon backup --out FILE makes a backup; donjon backup verify FILE checks one")
    with client(home) as c:
        n, digest = op(ops.backup_to, c, out)
    if not emit_json({"out": out, "bytes": n, "sha256": digest}, as_json):
        typer.echo(f"backup: {n} bytes -> {out} sha256 {digest}")


@ceremony_app.command("run")
def ceremony_run(file: Annotated[str, typer.Argument(help="The ceremony TOML file.")],
                 out_dir: Annotated[Optional[str], typer.Option(help="Folder holding the output folder (default: the file's).")] = None,
                 home: Home = "./var") -> None:
    """Run a ceremony: officers log in (quorum), witness and approve each step; outputs and a
    transcript (JSON + PDF) with their SHA-256 are written; nothing is ever overwritten.

    Example: donjon ceremony run rollover.toml
    """
    from appliance.console.ceremony import run_file
    from appliance.console.term import Term
    rc = op(run_file, home, file, Term(), out_dir)
    raise typer.Exit(rc)


@ceremony_app.command("verify")
def ceremony_verify(transcript: Annotated[str, typer.Argument(help="transcript.json of a ceremony.")],
                    cert: Annotated[Optional[str], typer.Option(help="The audit certificate (donjon audit cert) to check the signature with; "
                                                                     "default: the one in the transcript.")] = None,
                    audit_log: Annotated[Optional[str], typer.Option(help="An exported audit log (donjon audit export): check that "
                                                                          "every record the transcript is bound to is in it.")] = None) -> None:
    """Check a ceremony transcript offline: its digest, the SHA-256 of every output beside it, its
    signature (an audit record of the digest and a checkpoint of it signed by the HSM's audit key), and
    its bindings: the audit records of its operations and of the witnesses who logged in during it.

    Example: donjon ceremony verify out/transcript.json --cert audit.pem --audit-log audit.jsonl
    """
    from appliance.console.ceremony import verify
    problems = op(verify, transcript, read_file(cert, "audit certificate") if cert else None,
                  read_file(audit_log, "audit log") if audit_log else None)
    for p in problems:
        typer.echo(f"donjon: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo("transcript intact: digest, every output hash and the audit-key signature verify; bound to its audit records "
               "and authenticated witnesses" + (", all present in the audit log" if audit_log else " (give --audit-log to check them in the log)"))


@config_app.command("show")
def config_show(home: Home = "./var", as_json: JsonOut = False) -> None:
    """Show the network and endpoint settings. Example: donjon config show"""
    items = op(ops.settings_show, home)
    if not emit_json(dict(items), as_json):
        for k, v in items:
            typer.echo(f"{k:<20} {v}")


@config_app.command("set")
def config_set(key: Annotated[str, typer.Argument(help="One of: " + ", ".join(ops.SETTINGS))],
               value: str, home: Home = "./var") -> None:
    """Change one setting through the running appliance (an administrator; validated, audited; takes
    effect at the next start). Example: donjon config set ocsp.listen 0.0.0.0:80"""
    with client(home) as c:
        typer.echo(op(ops.settings_set, c, key, value))


# ---------------------------------------------------------------- internals


@app.command()
def version() -> None:
    """Print the version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v
    try:
        typer.echo(f"donjon {v('donjon')}")
    except PackageNotFoundError:
        typer.echo("donjon (source)")


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


enrol_app = typer.Typer(help="EST and SCEP enrolment secrets for devices: create, list, revoke.", no_args_is_help=True)
app.add_typer(enrol_app, name="enrol-secret")


@enrol_app.command("create")
def enrol_secret_create(
        protocol: Annotated[str, typer.Argument(help="est (an HTTP Basic password) or scep (a one-time challenge password).")],
        ca: Annotated[str, typer.Option(help="The CA that issues under it.")],
        profile: Annotated[str, typer.Option(help="The profile it admits (no CA profiles).")],
        ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 86400,
        uses: Annotated[int, typer.Option(help="How many enrolments it admits (SCEP: 1).")] = 1,
        ref: Annotated[Optional[str], typer.Option(help="Reference (the EST user name); made up when absent.")] = None,
        subject: Annotated[Optional[str], typer.Option(help="Pattern the requested CN must match, e.g. 'router-*'.")] = None,
        approval: Annotated[bool, typer.Option("--approval", help="Enrolments wait for another officer's decision.")] = False,
        home: Home = "./var", as_json: JsonOut = False) -> None:
    """Make a secret for a device; it is shown this once.

    Example: donjon enrol-secret create scep --ca issuing --profile tls-client --ttl 3600
    """
    with client(home) as c:
        doc = op(ops.enrol_secret_create, c, protocol, ca, profile, ttl, uses, ref, subject, approval)
    if not emit_json(doc, as_json):
        typer.echo(f"{doc['protocol']} secret {doc['ref']}: {doc['secret']} (CA {doc['ca']}, profile {doc['profile']}, "
                   f"{doc['uses']} use(s), expires {doc['expires']})")


@enrol_app.command("list")
def enrol_secret_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """List enrolment secrets and their state (never the secrets). Example: donjon enrol-secret list"""
    with client(home) as c:
        docs = op(ops.enrol_secret_list, c)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
        return
    lines_or([f"{d['ref']:<24} {d['protocol']:<5} {d['ca']}/{d['profile']:<20} uses_left={d['uses_left']} {d['state']}"
              for d in docs], "no enrolment secrets")


@enrol_app.command("waiting")
def enrol_waiting(home: Home = "./var", as_json: JsonOut = False) -> None:
    """EST/SCEP enrolments waiting for a decision (and recent ones). Example: donjon enrol-secret waiting"""
    with client(home) as c:
        docs = op(ops.enrol_waiting, c)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
        return
    lines_or([f"{d['request']}  {d['state']:<8} {d['protocol']:<5} {d['ca']}/{d['profile']}  {d['summary']}" for d in docs],
             "no enrolments waiting")


@enrol_app.command("decide")
def enrol_decide(request: str,
                 approve: Annotated[bool, typer.Option("--approve/--reject", help="Issue it, or refuse it.")] = ...,
                 reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
                 home: Home = "./var", as_json: JsonOut = False) -> None:
    """Approve or reject a waiting enrolment (not one admitted by a secret you made).

    Example: donjon enrol-secret decide 3f2a... --approve
    """
    with client(home) as c:
        doc = op(ops.enrol_decide, c, request, approve, reason)
    if not emit_json(doc, as_json):
        typer.echo(f"enrolment {doc['request']}: {doc['state']}" + (f", serial {doc['serial']}" if doc["serial"] else ""))


@enrol_app.command("revoke")
def enrol_secret_revoke(ref: str, home: Home = "./var") -> None:
    """Make a secret unusable. Example: donjon enrol-secret revoke router-7"""
    with client(home) as c:
        op(ops.enrol_secret_revoke, c, ref)
    typer.echo(f"enrolment secret {ref} revoked")


@app.callback()
def _options(show_version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                        help="Print the version and exit.")] = False) -> None:
    """Donjon: a hardened certificate authority appliance."""

@backup_app.command("verify")
def backup_verify(file: Annotated[str, typer.Argument(help="A backup made by donjon backup.")], as_json: JsonOut = False) -> None:
    """Check a backup without restoring it: every member there once, of the size and SHA-256 its manifest names.

    Example: donjon backup verify /media/donjon/backup.tar
    """
    from datetime import datetime, timezone

    from appliance import backupfile
    try:
        m = backupfile.verify(file)
    except backupfile.BackupFileError as e:
        fail(str(e))
    doc = {"file": file, "ok": True, "created": m.get("created"), "audit_seq": m["cmdb.sqlite"].get("audit_seq"),
           "bytes": m["cmdb.sqlite"].get("bytes")}
    if not emit_json(doc, as_json):
        typer.echo(f"{file}: backup intact (CMDB {doc['bytes']} bytes, audit seq {doc['audit_seq']}, "
                   f"made {datetime.fromtimestamp(doc['created'] or 0, timezone.utc):%Y-%m-%d %H:%M} UTC)")


@app.command()
def restore(file: Annotated[str, typer.Argument(help="A backup made by donjon backup.")],
            anchor: Annotated[Optional[str], typer.Option(help="A published signed audit head (audit checkpoint --out).")] = None,
            max_age_days: Annotated[Optional[int], typer.Option(help="A backup older than this needs a quorum's confirmation "
                                                                        "(default: cmdb.restore-max-age-days).", min=1)] = None,
            confirm_share: Annotated[list[str], typer.Option(help="An activation PIN share confirming an older backup (repeat).")] = [],  # noqa: B006
            officer: Annotated[list[str], typer.Option(help="An administrator of the backup authorising the restore "
                                                              "(twice: dual control; NAME or NAME:TOTP-CODE).")] = [],  # noqa: B006
            password_file: Annotated[list[str], typer.Option(help="The password of each --officer, in order (else prompted).")] = [],  # noqa: B006
            pin_file: Annotated[Optional[str], typer.Option(help="The token PIN (default: the PIN file, or the confirming shares).")] = None,
            home: Home = "./var", as_json: JsonOut = False) -> None:
    """Restore the CMDB from a backup, the appliance stopped, authorised by two administrators of the backup;
    at the next activation it reconciles with everything already published (CRLs, OCSP responses,
    destinations): nothing revoked comes back, no number is reused.

    Example: donjon shutdown --yes; donjon restore /media/donjon/backup.tar --anchor head.json --officer alice --officer bob; donjon run
    """
    from appliance import config as C
    from appliance import home as H
    from appliance import restore as R
    if len(officer) < 2 or len(set(o.partition(":")[0] for o in officer)) < 2:
        fail("restore refused (dual control): two distinct administrators of the backup authorise it "
             "(--officer NAME twice, each with their password)")
    if password_file and len(password_file) != len(officer):
        fail("give one --password-file per --officer, in the same order (or none: the passwords are prompted)")
    creds: list[tuple[str, str, str]] = []
    try:
        cfg = C.load(home)
        for i, o in enumerate(officer):
            name, _, code = o.partition(":")
            pw = C.read_secret(password_file[i], f"{name}'s password file") if password_file \
                else typer.prompt(f"Password of officer {name}", hide_input=True)
            creds.append((name, pw, code))
        pin = H.read_pin(pin_file) if pin_file else None
        if pin is None and not confirm_share and cfg.hsm.pin_file and os.path.exists(os.path.join(home, cfg.hsm.pin_file)):
            pin = H.read_pin(os.path.join(home, cfg.hsm.pin_file))
        if pin is None and not confirm_share:
            pin = typer.prompt("Token PIN", hide_input=True)
        days = max_age_days or cfg.cmdb.restore_max_age_days
        doc = R.restore(home, file, anchor, days, list(confirm_share), creds, pin)
    except (R.RestoreError, C.ConfigError, H.HomeError) as e:
        fail(str(e))
    if not emit_json(doc, as_json):
        typer.echo(f"restored {file} (sha256 {doc['sha256']}); the old CMDB is kept as {doc['kept']}. "
                   f"Start the appliance: its first activation reconciles with what was published.")


standby_app = typer.Typer(help="The standby CMDB ([cmdb] standby = true): every acknowledged commit on a second disk.",
                          no_args_is_help=True)
app.add_typer(standby_app, name="standby")


@standby_app.command("promote")
def standby_promote(home: Home = "./var", as_json: JsonOut = False) -> None:
    """Put the standby CMDB in place of a lost or damaged primary (the appliance stopped).

    Example: donjon standby promote --home /var/lib/donjon; donjon run --home /var/lib/donjon
    """
    from appliance import restore as R
    try:
        doc = R.promote_standby(home)
    except R.RestoreError as e:
        fail(str(e))
    if not emit_json(doc, as_json):
        typer.echo(f"the standby is now the CMDB; the old primary's files are in {doc['kept']}. Start the appliance.")


# ---------------------------------------------------------------- CA key backup and disaster recovery (issue 15)

keys_app = typer.Typer(help="CA key backup under custodian shares, and recovery onto a fresh appliance.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("backup")
def keys_backup(out_dir: Annotated[str, typer.Option(help="The media folder: the blob here, share i in custodian-i/.")] = ...,
                so_pin_file: Annotated[Optional[str], typer.Option(help="The token's SO PIN (it alone can mark the KEK trusted); prompted without it.")] = None,
                shares: Annotated[int, typer.Option(help="Custodian shares of the KEK.")] = 5,
                threshold: Annotated[int, typer.Option(help="Shares needed to recover.")] = 3,
                fetch: Annotated[Optional[int], typer.Option(help="Take backup #N, made when its dual-control request was approved.")] = None,
                home: Home = "./var", as_json: JsonOut = False) -> None:
    """Wrap every CA key, the audit key and the CMDB-wrapping key (RFC 5649) under a fresh KEK made in
    the token, and split the KEK into custodian shares (administrator; dual control "keys-backup").

    Example: donjon keys backup --out-dir /media/donjon/keys --shares 5 --threshold 3 --so-pin-file so-pin
    """
    from appliance import home as H
    if not 2 <= threshold <= shares <= 16:
        fail(f"need 2 <= --threshold <= --shares <= 16 (got {threshold} of {shares})")
    with client(home) as c:
        if fetch is not None:
            doc = op(ops.keys_backup_fetch, c, fetch)
        else:
            try:
                so_pin = H.read_pin(so_pin_file) if so_pin_file else typer.prompt("Token SO PIN", hide_input=True)
            except H.HomeError as e:
                fail(str(e))
            doc = op(ops.keys_backup, c, so_pin, threshold, shares)
    blob_path, share_paths = op(ops.write_key_backup, doc, out_dir)
    if not emit_json({"blob": blob_path, "shares": share_paths, "sha256": doc["manifest_sha256"], "keys": doc["keys"],
                      "threshold": doc["threshold"]}, as_json):
        typer.echo(f"key backup sha256 {doc['manifest_sha256']}: {', '.join(doc['keys'])} -> {blob_path}")
        typer.echo(f"{len(share_paths)} custodian shares (any {doc['threshold']} recover): hand each custodian-N/ folder "
                   "to its custodian and keep none here")


@keys_app.command("recover")
def keys_recover(blob: Annotated[str, typer.Option(help="The key backup (keys-backup-*.json).")] = ...,
                 backup: Annotated[str, typer.Option(help="The CMDB backup (donjon backup) to restore with the keys.")] = ...,
                 share: Annotated[list[str], typer.Option(help="A custodian's share text; '-' prompts.")] = [],  # noqa: B006
                 share_file: Annotated[list[str], typer.Option(help="A custodian's key-share-N.txt.")] = [],  # noqa: B006
                 pin_file: Annotated[Optional[str], typer.Option(help="The new token's user PIN (default: a new one in HOME/pin).")] = None,
                 home: Home = "./var") -> None:
    """Disaster recovery onto a fresh appliance: a new home and token, the KEK from the custodians'
    shares, every key unwrapped into the token (sensitive, non-extractable), the CMDB backup put back.

    Example: donjon keys recover --home /var/lib/donjon --blob keys-backup-….json --backup b.tar --share-file s1 ...
    """
    import shutil

    import trio

    from appliance import backupfile
    from appliance import config as C
    from appliance import home as H
    from appliance.supervisor import Supervisor, SupervisorError
    from policy import shamir
    from policy.errors import PolicyError

    texts = [t for t in share if t != "-"] + [op(ops.read_share_file, p) for p in share_file]
    for _ in range(share.count("-")):
        texts.append(typer.prompt(f"Share {len(texts) + 1}", hide_input=True))
    # Everything that can be checked without the token is checked before anything is created.
    try:
        parsed = [shamir.parse_share(t) for t in texts]
    except PolicyError as e:
        fail(f"key recovery refused: {e.message}")
    if not parsed:
        fail("key recovery refused: no share given")
    if len({p[0] for p in parsed}) != 1:
        fail("key recovery refused: the shares come from different sets")
    if len(parsed) < parsed[0][1]:
        fail(f"key recovery refused: {parsed[0][1]} shares are needed, {len(parsed)} given")
    try:
        blob_data = read_file(blob, "the key backup", 192 * 1024)
        if len(blob_data) > 192 * 1024:
            fail(f"{blob}: too large for a key backup")
        backupfile.verify(backup)
    except backupfile.BackupFileError as e:
        fail(str(e))
    # A new home, holding at most the operator's donjon.toml for the new appliance.
    if os.path.exists(home) and set(os.listdir(home)) - {"donjon.toml"}:
        fail(f"{home} is not empty: keys are recovered into a new appliance home")
    created = not os.path.exists(home)
    kept = set(os.listdir(home)) if not created else set()
    ok = False
    try:
        pin = H.read_pin(pin_file) if pin_file else None
        cfg, pin = H.create(home, pin)
        sup = Supervisor(home, cfg)
        rc = trio.run(lambda: sup.run(recover=S.RecoverKeys(pin=pin, shares=texts, blob=blob_data)))
        if rc != 0:
            fail(f"{sup.failed or 'key recovery failed (see the log above)'}: nothing was kept")
        backupfile.install_cmdb(backup, os.path.join(home, "cmdb"))
        ok = True
    except (C.ConfigError, H.HomeError, SupervisorError, backupfile.BackupFileError) as e:
        fail(str(e))
    finally:
        if not ok:  # nothing left behind: the new home (token included) goes
            if created:
                shutil.rmtree(home, ignore_errors=True)
            else:
                for entry in set(os.listdir(home)) - kept:
                    p = os.path.join(home, entry)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    typer.echo(f"keys recovered into {os.path.abspath(home)} and the CMDB restored from {backup}. "
               f"Start it with: donjon run --home {home}")


# ---------------------------------------------------------------- CMP (the gateway's /.well-known/cmp)

cmp_app = typer.Typer(help="CMP: credentials for devices and RAs, enrolments waiting for an officer.", no_args_is_help=True)
app.add_typer(cmp_app, name="cmp")


@cmp_app.command("add")
def cmp_add(ca: Annotated[str, typer.Option("--ca", help="The CA enrolments under this credential get certificates from.")],
            profile: Annotated[str, typer.Option("--profile", help="The profile they are issued under.")],
            ref: Annotated[Optional[str], typer.Option("--ref", help="The reference number (default: 10 random digits).")] = None,
            subject: Annotated[Optional[str], typer.Option("--subject", help="The one subject allowed (RFC 4514, e.g. CN=router-7).")] = None,
            uses: Annotated[int, typer.Option("--uses", help="Enrolments the secret allows.")] = 1,
            days: Annotated[int, typer.Option("--days", help="Days the credential is valid.")] = 7,
            approval: Annotated[bool, typer.Option("--approval", help="Each enrolment waits for another officer's approval.")] = False,
            ra_cert: Annotated[Optional[str], typer.Option("--ra-cert", help="Register this RA certificate (PEM/DER) instead of making a secret.")] = None,
            home: Home = "./var", as_json: JsonOut = False) -> None:
    """Issue a CMP shared secret (shown once) or register an RA certificate.

    Example: donjon cmp add --ca issuing --profile tls-client --subject CN=router-7
    """
    der = None
    if ra_cert:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding
            data = open(ra_cert, "rb").read()
            cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
            der = cert.public_bytes(Encoding.DER)
        except (OSError, ValueError) as e:
            fail(f"--ra-cert {ra_cert}: {e}")
    doc = call(home, S.ACmpCredentialAdd, ca=ca, profile=profile, ref=ref, subject=subject, uses=uses, days=days, approval=approval, ra_cert=der)
    if emit_json(doc, as_json):
        return
    if doc.get("secret"):
        typer.echo(f"reference {doc['ref']}  secret {doc['secret']}  (for {doc['ca']}/{doc['profile']}; shown once)")
    else:
        typer.echo(f"RA {doc['ref']} registered for {doc['ca']}/{doc['profile']}")


@cmp_app.command("list")
def cmp_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """CMP credentials (never their secrets). Example: donjon cmp list"""
    doc = call(home, S.ACmpCredentialList)
    if emit_json(doc, as_json):
        return
    lines_or([f"{c['ref']:<16} {c['kind']:<6} {c['ca']}/{c['profile']} uses-left={c['uses_left']} failures={c['failures']}"
              f"{' approval' if c['approval'] else ''}{' REVOKED' if c.get('revoked') else ''}" for c in doc["credentials"]], "no CMP credentials")


@cmp_app.command("revoke")
def cmp_revoke(ref: str, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Withdraw a CMP credential. Example: donjon cmp revoke 0123456789"""
    doc = call(home, S.ACmpCredentialRevoke, ref=ref)
    if not emit_json(doc, as_json):
        typer.echo(f"CMP credential {ref} revoked")


@cmp_app.command("requests")
def cmp_requests(all_: Annotated[bool, typer.Option("--all", help="Also decided requests.")] = False,
                 home: Home = "./var", as_json: JsonOut = False) -> None:
    """CMP enrolments waiting for an officer. Example: donjon cmp requests"""
    doc = call(home, S.ACmpRequestList, open_only=not all_)
    if emit_json(doc, as_json):
        return
    lines_or([f"#{r['id']:<5} {r['state']:<8} {r['ca']}/{r['profile']} {r['subject'].replace(chr(10), ',')} by {r['ref']}"
              f"{' serial ' + r['serial'] if r.get('serial') else ''}" for r in doc["requests"]], "no CMP requests")


@cmp_app.command("approve")
def cmp_approve(request: int, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Approve a waiting CMP enrolment (not by the officer who issued its credential). Example: donjon cmp approve 3"""
    doc = call(home, S.ACmpDecide, request=request, approve=True)
    if not emit_json(doc, as_json):
        typer.echo(f"CMP request #{request} approved: the device gets its certificate at its next poll")


@cmp_app.command("reject")
def cmp_reject(request: int, reason: Annotated[str, typer.Option("--reason", help="Told to the device.")] = "refused by an officer",
               home: Home = "./var", as_json: JsonOut = False) -> None:
    """Reject a waiting CMP enrolment. Example: donjon cmp reject 3 --reason 'unknown device'"""
    doc = call(home, S.ACmpDecide, request=request, approve=False, reason=reason)
    if not emit_json(doc, as_json):
        typer.echo(f"CMP request #{request} rejected")

# ---------------------------------------------------------------- the KGS


KGS_WAIT_SECONDS = 24 * 3600  # a batch of 10,000 cards at a few seconds each


def _progress(done: int, failed: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * (done + failed) // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done + failed}/{total} ({failed} failed)")
    sys.stderr.flush()


@kgs_app.command("personalise")
def kgs_personalise(card_profile: Annotated[str, typer.Option("--card-profile", help="Card profile (HOME/card-profiles/NAME.toml).")] = ...,
                    batch: Annotated[str, typer.Option(help="Batch file: CSV with a header line, or JSON (id, CN, email, O, OU, C, serialNumber, address).")] = ...,
                    name: Annotated[Optional[str], typer.Option(help="Batch name (default: the file's name); a rerun of a name finishes it.")] = None,
                    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the batch with a progress bar until it ends.")] = True,
                    home: Home = "./var") -> None:
    """Personalise a card per subject of the batch (resumable: run it again to finish an interrupted batch).

    Example: donjon kgs personalise --card-profile employee --batch staff.csv
    """
    import time as _time
    data = read_file(batch, "batch file", 1 << 20)
    bname = name or os.path.splitext(os.path.basename(batch))[0]
    with client(home) as c:
        doc = op(ops.kgs_personalise, c, card_profile, bname, data)
        total = doc["subjects"]
        typer.echo(f"batch {doc['batch']}: {total} subject(s) sent to the KGS")
        if not wait:
            return
        deadline = _time.monotonic() + KGS_WAIT_SECONDS
        while True:
            st = op(ops.kgs_cards, c, bname)
            cards = st["cards"]
            done = sum(1 for x in cards if x["state"] == "done")
            failed = [x for x in cards if x["state"] == "failed"]
            _progress(done, len(failed), total)
            if bname not in st.get("running", []) or _time.monotonic() > deadline:
                break
            _time.sleep(0.3)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    typer.echo(f"batch {bname}: {done} of {total} card(s) done, {len(failed)} failed")
    for x in failed:
        typer.echo(f"card #{x['card']} ({x['subject_id']}, {x['label']}): {x['error']}", err=True)
    if failed or done < total:
        raise typer.Exit(1)


@kgs_app.command("cards")
def kgs_cards(batch: Annotated[Optional[str], typer.Option(help="Only this batch.")] = None, home: Home = "./var",
              as_json: JsonOut = False) -> None:
    """Card records: state (started, keys, certs, pins, done, failed), letter status, certificates.

    Example: donjon kgs cards --batch staff
    """
    with client(home) as c:
        doc = op(ops.kgs_cards, c, batch)
    if not emit_json(doc, as_json):
        lines_or(ops.kgs_cards_lines(doc["cards"]), "no cards")


@kgs_app.command("letters")
def kgs_letters(batch: Annotated[str, typer.Option(help="Batch (reprints: batch 'reprint').")] = ...,
                out: Annotated[str, typer.Option(help="Folder for the PDFs (created, 0700).")] = ...,
                home: Home = "./var") -> None:
    """Take the batch's PIN letters out of the KGS spool, once (they become `printed`).

    Example: donjon kgs letters --batch staff --out /media/print
    """
    os.makedirs(out, mode=0o700, exist_ok=True)
    with client(home) as c:
        letters = op(ops.kgs_letters, c, batch)
    for card, pdf in letters:
        fd = os.open(os.path.join(out, f"card-{card}.pdf"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pdf)
    typer.echo(f"{len(letters)} PIN letter(s) -> {out}" if letters else "no letters waiting for this batch")


@kgs_app.command("letter")
def kgs_letter(card: int, status: Annotated[str, typer.Option(help="sent or acknowledged.")] = ..., home: Home = "./var") -> None:
    """Record a PIN letter's hand-over. Example: donjon kgs letter 12 --status sent"""
    if status not in ("sent", "acknowledged"):
        fail("--status: sent or acknowledged")
    with client(home) as c:
        doc = op(ops.kgs_letter_status, c, card, status)
    typer.echo(f"card #{doc['card']}: letter {doc['letter']}")


@kgs_app.command("reprint")
def kgs_reprint(card: int, home: Home = "./var") -> None:
    """A new PIN for a card (set with its PUK) and a new letter in the spool (batch `reprint`).

    Example: donjon kgs reprint 12
    """
    with client(home) as c:
        doc = op(ops.kgs_reprint, c, card)
    typer.echo(f"card #{doc['card']}: new PIN set, letter {doc['letter']} (take it with `donjon kgs letters --batch reprint`)")


@kgs_app.command("recover")
def kgs_recover(card: int, reason: Annotated[str, typer.Option(help="Why (audited).")] = ..., home: Home = "./var") -> None:
    """Ask for the recovery of a card's archived encryption key (dual control: another officer approves).

    Example: donjon kgs recover 12 --reason "card lost, mail archive"
    """
    doc = call(home, S.AKgsRecover, card=card, reason=reason)
    typer.echo(f"recovery #{doc['recovery']} of card #{doc['card']} approved by {', '.join(doc['approvers'])}")


@kgs_app.command("recover-take")
def kgs_recover_take(recovery: int, out: Annotated[str, typer.Option(help="PKCS#12 file to write (new, 0600).")] = ...,
                     home: Home = "./var") -> None:
    """Take an approved recovery, once: the PKCS#12 and its one-time password (shown once, here).

    Example: donjon kgs recover-take 3 --out alice-enc.p12
    """
    with client(home) as c:
        p12, password = op(ops.kgs_recover_take, c, recovery)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(p12)
    typer.echo(f"PKCS#12 -> {out}")
    typer.echo(f"one-time password (shown once): {password}")


def main() -> None:
    app()


@acme_app.command("eab-add")
def acme_eab_add(profile: Annotated[Optional[list[str]], typer.Option("--profile", help="ACME profile it allows (repeat; default: all).")] = None,
                 name: Annotated[Optional[list[str]], typer.Option("--name", help="Names its account may get: host, *.domain or * (repeat).")] = None,
                 home: Home = "./var", as_json: JsonOut = False) -> None:
    """Make an EAB key for one ACME account (shown once). Example: donjon acme eab-add --name '*.example.org'"""
    try:
        with client(home) as c:
            doc = ops.acme_eab_add(c, profile, name)
    except ClientError as e:
        fail(str(e))
    if emit_json(doc, as_json):
        return
    typer.echo(f"kid {doc['eab']['kid']}\nhmac-key {doc['hmac_key']}\n(give both to the ACME client, e.g. lego --eab --kid KID --hmac KEY)")


@acme_app.command("eab-list")
def acme_eab_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """List EAB keys and the accounts they are bound to. Example: donjon acme eab-list"""
    try:
        with client(home) as c:
            keys = ops.acme_eab_list(c)
    except ClientError as e:
        fail(str(e))
    if emit_json({"keys": keys}, as_json):
        return
    lines_or([f"{k['kid']:<18} by {k['created_by'][:30]:<30} profiles {','.join(k.get('profiles', ())) or 'all'}  "
              f"names {','.join(k.get('name_patterns', ())) or '-'}  account {k.get('account') or '-'}"
              f"{'  REVOKED' if k.get('revoked_at') else ''}" for k in keys], "no EAB keys")


@acme_app.command("eab-revoke")
def acme_eab_revoke(kid: str, home: Home = "./var", as_json: JsonOut = False) -> None:
    """Revoke an EAB key: its account gets nothing more. Example: donjon acme eab-revoke KID"""
    try:
        with client(home) as c:
            doc = ops.acme_eab_revoke(c, kid)
    except ClientError as e:
        fail(str(e))
    if emit_json(doc, as_json):
        return
    typer.echo(f"EAB key {kid} revoked" + (f" (account {doc['account']})" if doc.get("account") else ""))



if __name__ == "__main__":  # python -m appliance.cli: the same dispatch as the `donjon` program
    from appliance.entry import dispatch_role

    dispatch_role(sys.argv)
    main()


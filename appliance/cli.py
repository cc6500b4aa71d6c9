"""The `donjon` command: thin typer commands, each calling one function; errors are one line + exit 1."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from typing import Annotated, Optional

import typer

from appliance import adminops as ops
from appliance.client import AdminClient, ClientError
from appliance.ipc import schema as S

app = typer.Typer(help="Donjon: a hardened certificate authority appliance.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
ca_app = typer.Typer(help="Certificate authorities: list, show, create, sign an external CSR, export.", no_args_is_help=True)
cert_app = typer.Typer(help="Issued certificates: show, list, export.", no_args_is_help=True)
crl_app = typer.Typer(help="Certificate revocation lists.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
ocsp_app = typer.Typer(help="The OCSP/CRL endpoint and its pre-produced responses.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
app.add_typer(cert_app, name="cert")
app.add_typer(crl_app, name="crl")
app.add_typer(audit_app, name="audit")
app.add_typer(ocsp_app, name="ocsp")

Home = Annotated[str, typer.Option("--home", envvar="DONJON_HOME", help="State folder (DONJON_HOME).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

REASONS = ops.REASONS


def fail(msg: str, code: int = 1) -> None:
    typer.echo(f"donjon: {msg}", err=True)
    raise typer.Exit(code)


def client(home: str) -> AdminClient:
    try:
        return AdminClient(home)
    except ClientError as e:
        fail(str(e))


def call(home: str, cls, **kw):
    try:
        with client(home) as c:
            return c.call(cls, **kw)
    except ClientError as e:
        fail(str(e))


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


def parse_serial(s: str) -> bytes:
    return op(ops.parse_serial, s)


def parse_subject(s: str) -> tuple[tuple[str, str], ...]:
    return op(ops.parse_subject, s)


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror}")


def der_of(data: bytes, label: str) -> bytes:
    """Accept DER or PEM."""
    return op(ops.der_of, data, label)


# ---------------------------------------------------------------- lifecycle


@app.command()
def init(home: Home = "./var",
         ceremony: Annotated[str, typer.Option(help="Root-CA ceremony TOML (key type, subject, validity, path length).")] = ...,
         pin_file: Annotated[Optional[str], typer.Option(help="Token user PIN (default: a new random PIN written to HOME/pin).")] = None) -> None:
    """Create the state folder, the embedded token and the CMDB, and run the root-CA ceremony.

    Example: donjon init --home ./var --ceremony image/demo-ceremony.toml
    """
    import trio

    from appliance import config as C
    from appliance import home as H
    from appliance.supervisor import Supervisor, SupervisorError

    try:
        spec = C.load_ceremony(ceremony)
        pin = H.read_pin(pin_file) if pin_file else None
        cfg, pin = H.create(home, pin)
        rc = trio.run(Supervisor(home, cfg).run, spec, pin)
    except (C.ConfigError, H.HomeError, SupervisorError) as e:
        fail(str(e))
    if rc != 0:
        fail("the ceremony failed (see the log above); nothing was kept in the CMDB but its audit records")
    names = [spec.root.name] + [c.name for c in spec.issuing]
    typer.echo(f"Initialised {os.path.abspath(home)}: CAs {', '.join(names)}. Start it with: donjon run --home {home}")


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
                 pin_file: Annotated[Optional[str], typer.Option(help="Read the token PIN from this file instead of prompting.")] = None) -> None:
    """Log the CIS into the token and open the CMDB.

    Example: donjon activate --pin-file ./var/pin
    """
    from appliance import home as H
    try:
        pin = H.read_pin(pin_file) if pin_file else typer.prompt("Token PIN", hide_input=True)
    except H.HomeError as e:
        fail(str(e))
    with client(home) as c:
        doc = op(ops.activate, c, pin)
    typer.echo(f"activated: {doc['token']}")


# ---------------------------------------------------------------- CAs


@ca_app.command("list")
def ca_list(home: Home = "./var", as_json: JsonOut = False) -> None:
    """List the CAs. Example: donjon ca list"""
    with client(home) as c:
        cas = op(ops.ca_list, c)
    if as_json:
        typer.echo(json.dumps(cas, indent=2))
        return
    for line in ops.ca_list_lines(cas):
        typer.echo(line)


@ca_app.command("show")
def ca_show(name: str, home: Home = "./var") -> None:
    """Show one CA. Example: donjon ca show issuing"""
    typer.echo(json.dumps(call(home, S.ACaShow, name=name), indent=2))


@ca_app.command("create")
def ca_create(name: str,
              parent: Annotated[Optional[str], typer.Option(help="The issuing (parent) CA; without it, a new self-signed root.")] = None,
              subject: Annotated[str, typer.Option(help="Subject, e.g. 'CN=Issuing CA 2,O=Example,C=FR'.")] = ...,
              profile: Annotated[Optional[str], typer.Option(help="CA profile (default sub-ca, or root-ca without --parent).")] = None,
              key_type: Annotated[str, typer.Option(help="rsa2048|rsa3072|rsa4096|p256|p384|ed25519")] = "p256",
              days: Annotated[int, typer.Option(help="Validity in days (clamped to the parent's).")] = 3650,
              path_length: Annotated[Optional[int], typer.Option(help="pathLenConstraint.")] = None,
              home: Home = "./var") -> None:
    """Create a CA whose key is generated in the HSM: a subordinate of --parent, or a new root.

    Example: donjon ca create issuing2 --parent root --subject 'CN=Issuing CA 2,O=Example'
    """
    with client(home) as c:
        doc = op(ops.ca_create, c, name, parent, parse_subject(subject), profile, key_type, days, path_length)
    typer.echo(f"created CA {doc['name']}: {doc['subject']} serial {doc['serial']}")


@ca_app.command("sign-csr")
def ca_sign_csr(csr: str,
                parent: Annotated[str, typer.Option(help="The signing CA.")] = ...,
                profile: Annotated[str, typer.Option(help="A sub-ca profile.")] = "sub-ca",
                days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
                path_length: Annotated[Optional[int], typer.Option(help="pathLenConstraint.")] = None,
                out: Annotated[Optional[str], typer.Option(help="Write the certificate (PEM) here.")] = None,
                home: Home = "./var") -> None:
    """Certify an external subordinate CA from its CSR (the offline root's main job).

    Example: donjon ca sign-csr sub.csr --parent root --out sub.pem
    """
    der = der_of(read_file(csr, "CSR"), "CSR")
    with client(home) as c:
        doc = op(ops.ca_sign_csr, c, parent, profile, der, days, path_length)
    out_bytes(doc["cert"].encode(), out)
    if out:
        typer.echo(f"signed serial {doc['serial']} -> {out}")


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
    ders = [der_of(read_file(p, "CSR"), "CSR") for p in csr]
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
    if failed:
        raise typer.Exit(1)


@cert_app.command("show")
def cert_show(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ..., home: Home = "./var") -> None:
    """Show a certificate's record. Example: donjon cert show --ca issuing 5f3a..."""
    with client(home) as c:
        doc = op(ops.cert_show, c, ca, parse_serial(serial))
    typer.echo(json.dumps({k: v for k, v in doc.items() if k != "pem"}, indent=2))


@cert_app.command("export")
def cert_export(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ...,
                out: Annotated[Optional[str], typer.Option(help="Output file (PEM).")] = None, home: Home = "./var") -> None:
    """Export a certificate as PEM. Example: donjon cert export --ca issuing 5f3a... --out c.pem"""
    with client(home) as c:
        out_bytes(op(ops.cert_show, c, ca, parse_serial(serial))["pem"].encode(), out)


@cert_app.command("list")
def cert_list(ca: Annotated[Optional[str], typer.Option(help="Only this CA.")] = None,
              limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
              as_json: JsonOut = False, home: Home = "./var") -> None:
    """List issued certificates, newest first. Example: donjon cert list --ca issuing"""
    with client(home) as c:
        certs = op(ops.cert_list, c, ca, limit)
    if as_json:
        typer.echo(json.dumps(certs, indent=2))
        return
    for line in ops.cert_list_lines(certs):
        typer.echo(line)


@app.command()
def revoke(serial: str, ca: Annotated[str, typer.Option(help="Issuing CA.")] = ...,
           reason: Annotated[str, typer.Option(help="RFC 5280 reason: " + ", ".join(REASONS))] = "unspecified",
           invalidity: Annotated[Optional[str], typer.Option(help="Invalidity date (ISO 8601, UTC).")] = None,
           home: Home = "./var") -> None:
    """Revoke a certificate.

    Example: donjon revoke --ca issuing 5f3a... --reason keyCompromise
    """
    sb = parse_serial(serial)
    op(ops.parse_reason, reason)
    op(ops.parse_invalidity, invalidity)
    with client(home) as c:
        doc = op(ops.revoke, c, ca, sb, reason, invalidity)
    typer.echo(f"revoked {doc['ca']}/{doc['serial']} ({reason})")


@crl_app.command("generate")
def crl_generate(ca: Annotated[str, typer.Option(help="The CA.")] = ...,
                 out: Annotated[Optional[str], typer.Option(help="Write the CRL (DER) here.")] = None,
                 home: Home = "./var") -> None:
    """Sign a new full CRL now.

    Example: donjon crl generate --ca issuing --out issuing.crl
    """
    with client(home) as c:
        data = op(ops.crl_generate, c, ca)
    if out:
        out_bytes(data, out)
        typer.echo(f"CRL for {ca}: {len(data)} bytes -> {out}")
    else:
        out_bytes(data, None)


@crl_app.command("export")
def crl_export(ca: Annotated[str, typer.Option(help="The CA.")] = ...,
               number: Annotated[Optional[int], typer.Option(help="A given CRL number (default: the latest).")] = None,
               out: Annotated[Optional[str], typer.Option(help="Write the CRL (DER) here.")] = None,
               home: Home = "./var") -> None:
    """Export the latest stored CRL (or a given number) without signing a new one.

    Example: donjon crl export --ca issuing --out issuing.crl
    """
    with client(home) as c:
        data = op(ops.crl_export, c, ca, number)
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
                        home: Home = "./var") -> None:
    """Give the endpoint a delegated responder for a CA: a key in the endpoint's own token, certified by the CA.
    With it the endpoint also answers requests with several certificates and echoes nonces.

    Example: donjon ocsp responder-cert --ca issuing
    """
    doc = call(home, S.AOcspResponderCert, ca=ca, validity_days=days)
    if out:
        out_bytes(doc["cert"].encode(), out)
    typer.echo(f"responder for {doc['ca']}: serial {doc['serial']}, key {doc['label']}, until {doc['not_after'][:10]}")


# ---------------------------------------------------------------- audit


@audit_app.command("export")
def audit_export(out: Annotated[Optional[str], typer.Option(help="Output file (JSON Lines).")] = None, home: Home = "./var") -> None:
    """Export the audit log as JSON Lines. Example: donjon audit export --out audit.jsonl"""
    with client(home) as c:
        data = op(ops.audit_export, c)
    out_bytes(data, out)


@audit_app.command("verify")
def audit_verify(file: Annotated[Optional[str], typer.Argument(help="An exported log; default: export from the running appliance.")] = None,
                 home: Home = "./var") -> None:
    """Verify the audit hash chain and name the first record that breaks it.

    Example: donjon audit verify audit.jsonl
    """
    if file:
        data = read_file(file, "audit log")
    else:
        with client(home) as c:
            data = op(ops.audit_export, c)
    n = op(ops.audit_verify, data)
    typer.echo(f"audit chain intact: {n} records")


@audit_app.command("reconcile")
def audit_reconcile(home: Home = "./var") -> None:
    """List serials whose intent had no certificate after a crash (voided, treated as possibly issued)."""
    for v in call(home, S.AReconcile)["voided"]:
        typer.echo(f"#{v['seq']} {datetime.utcfromtimestamp(v['ts']).isoformat()}Z {v['object']}: {v['detail']}")


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


@app.command()
def backup(out: Annotated[str, typer.Option(help="New file for the backup (tar); never overwritten.")] = ...,
           home: Home = "./var") -> None:
    """A consistent online copy of the encrypted CMDB and its HSM-wrapped key (audited).

    Example: donjon backup --out /media/donjon/backup.tar
    """
    with client(home) as c:
        n, digest = op(ops.backup_to, c, out)
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
def ceremony_verify(transcript: Annotated[str, typer.Argument(help="transcript.json of a ceremony.")]) -> None:
    """Check a ceremony transcript: its digest and the SHA-256 of every output beside it.

    Example: donjon ceremony verify out/transcript.json
    """
    from appliance.console.ceremony import verify
    problems = op(verify, transcript)
    for p in problems:
        typer.echo(f"donjon: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo("transcript intact: digest and every output hash match")


@config_app.command("show")
def config_show(home: Home = "./var") -> None:
    """Show the network and endpoint settings. Example: donjon config show"""
    for k, v in op(ops.settings_show, home):
        typer.echo(f"{k:<20} {v}")


@config_app.command("set")
def config_set(key: Annotated[str, typer.Argument(help="One of: " + ", ".join(ops.SETTINGS))],
               value: str, home: Home = "./var") -> None:
    """Change one setting (validated; takes effect at the next start). Example: donjon config set ocsp.listen 0.0.0.0:80"""
    typer.echo(op(ops.settings_set, home, key, value))


# ---------------------------------------------------------------- internals


@app.command(hidden=True)
def role(name: str,
         fd: Annotated[list[str], typer.Option(help="link=fd")] = [],  # noqa: B006
         rw: Annotated[list[str], typer.Option()] = [],  # noqa: B006
         ro: Annotated[list[str], typer.Option()] = [],  # noqa: B006
         uid: Annotated[Optional[int], typer.Option()] = None,
         gid: Annotated[Optional[int], typer.Option()] = None) -> None:
    """Run one role (started by the supervisor only)."""
    from appliance.roles import run_role
    fds = {}
    for spec in fd:
        link, _, num = spec.partition("=")
        fds[link] = int(num)
    raise typer.Exit(run_role(name, fds, rw, ro, uid, gid))


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


@app.callback()
def _options(show_version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                        help="Print the version and exit.")] = False) -> None:
    """Donjon: a hardened certificate authority appliance."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Operating the appliance: ports, clean Ctrl-C, CLI validation and messages, activation race (issues 11 and 12)."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import Appliance, copy_home, make_csr, openssl


@pytest.fixture(scope="module")
def shared(module_appliance):
    """One appliance for every test of this module that only needs a running CA."""
    return module_appliance


def _log_since(a: Appliance, offset: int) -> str:
    return a.log.read_bytes()[offset:].decode(errors="replace")


def test_second_appliance_on_a_taken_port_fails_with_one_line(shared, tmp_path):
    port = int(shared.endpoint.rsplit(":", 1)[1])
    # A copy of the same initialised folder (init's own clean stop is checked by every Appliance.init)
    # whose endpoint asks for the first one's port.
    b = Appliance(shared.home.parent / "second", shared.src, user=shared.user, bin=shared.bin or "")
    assert shared.template is not None
    copy_home(shared.template, b.home)
    cfg = b.home / "donjon.toml"
    cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1))
    assert f"127.0.0.1:{port}" in cfg.read_text()
    r = b.cli("run", "--home", str(b.home), check=False, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert lines == [f"donjon: cannot listen on 127.0.0.1:{port} (ocsp.listen): the port is already in use "
                     "(another Donjon or another server?)"], lines
    assert not (b.home / "run" / "admin.sock").exists()
    # The first appliance keeps every request: its own CRL, every time.
    mine = shared.cli("crl", "export", "--ca", "issuing").stdout
    for _ in range(10):
        got = subprocess.run(["curl", "-sf", f"{shared.endpoint}/crl/issuing.crl"], capture_output=True, timeout=30).stdout
        assert got == mine


def test_ctrl_c_stops_cleanly_every_time(shared):
    """SIGINT to the foreground process group of `donjon run`, as a terminal's Ctrl-C sends it."""
    for _ in range(3):
        offset = shared.log.stat().st_size
        os.killpg(shared.proc.pid, signal.SIGINT)
        assert shared.proc.wait(timeout=60) == 0
        out = _log_since(shared, offset)
        assert "signal SIGINT: stopping" in out
        assert "Traceback" not in out and "protocol violation" not in out and "peer closed" not in out, out
        assert "factory" in out and "stopped cleanly" in out
        shared.start()
    # The roles have process groups of their own: the terminal's SIGINT reaches the supervisor alone.
    # ... and, in the terminal's background, they ignore SIGTTOU: `stty tostop` cannot stop them on a log line.
    for pid in shared.role_pids().values():
        assert os.getpgid(pid) == pid != shared.proc.pid
        sigign = int(next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigIgn:")).split()[1], 16)
        assert sigign & (1 << (signal.SIGTTOU - 1))


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("donjon: "), lines
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (("ca", "create", "x", "--parent", "issuing", "--subject", "CN=x", "--days", "0"), "validity in days 0: must be 1 to 14640"),
    (("ca", "create", "x", "--parent", "issuing", "--subject", "CN=x", "--path-length", "-1"), "path length -1: must be 0 to 16"),
    (("ca", "create", "x", "--parent", "issuing", "--subject", "CN=x", "--key-type", "rsa1024"), "key type 'rsa1024': one of rsa2048"),
    (("ca", "create", "bad name", "--parent", "issuing", "--subject", "CN=x"), "invalid CA name 'bad name'"),
    (("cert", "list", "--limit", "0"), "limit 0: must be 1 to 10000"),
    (("cert", "show", "--ca", "no/such", "01"), "invalid CA name 'no/such'"),
    (("ca", "show", "x y"), "invalid CA name 'x y'"),
    (("ocsp", "responder-cert", "--ca", "issuing", "--days", "0"), "validity in days 0: must be 1 to 366"),
])
def test_cli_names_the_invalid_value(shared, args, says):
    line = _one_line(shared.cli(*args, check=False))
    assert says in line and "lost the connection" not in line, line


def test_factory_refuses_invalid_requests_typed_and_keeps_the_link(shared):
    """What a client that skips the CLI's checks gets: a typed refusal naming the field, audited; the link stays up."""
    from appliance.client import AdminClient, ClientError
    from appliance.ipc import schema as S
    from appliance.ipc.channel import encode
    bad = [
        (S.ACaCreate, dict(name="x", parent="issuing", profile="sub-ca", key_type="p256", subject=(("CN", "x"),), validity_days=0),
         "ca-create: validity_days: must be >= 1"),
        (S.ACaCreate, dict(name="x", parent="issuing", profile="sub-ca", key_type="rsa1024", subject=(), validity_days=3),
         "ca-create: key_type: invalid value 'rsa1024'"),
        (S.ACaCreate, dict(name="x", parent="issuing", profile="sub-ca", key_type="p256", subject=(), validity_days=3, path_length=-1),
         "ca-create: path_length: must be >= 0"),
        (S.ACertList, dict(ca=None, limit=0), "cert-list: limit: must be >= 1"),
        (S.ACaShow, dict(name="no such"), "ca-show: name: must be matching regex"),
    ]
    with AdminClient(str(shared.home), timeout=30, session=shared.session()) as c:
        for cls, kw, says in bad:
            with pytest.raises(ClientError) as e:
                c.call(cls, **kw)
            assert e.value.code == "bad-request" and says in str(e.value), str(e.value)
            assert c.call(S.ACaList)["cas"]  # same connection, still served
        c.chan.sock.sendall(encode({"t": "no-such-request", "id": 77}))
        assert c.chan.recv() == S.Refused(id=77, code="bad-request", reason="unknown request 'no-such-request'")
        assert c.call(S.AStatus)["activated"]
        c.chan.sock.sendall(encode([1, 2, 3]))  # not a request at all: no client of ours, dropped
        with pytest.raises(ClientError, match="lost the connection"):
            c.call(S.AStatus)
    # A value nested a million deep (msgspec raises RecursionError): that client is dropped, the Factory lives.
    for deep in (b"\x83\xa1t\xa6status\xa2id\x05\xa2zz" + b"\x91" * 1_000_000 + b"\xc0",
                 b"\x83\xa2zz" + b"\x91" * 1_000_000 + b"\xc0\xa1t\xa6status\xa2id\x06"):
        with AdminClient(str(shared.home), timeout=30) as c:
            c.chan.sock.sendall(len(deep).to_bytes(4, "big") + deep)
            with pytest.raises(ClientError, match="lost the connection"):
                c.call(S.AStatus)
    with AdminClient(str(shared.home), timeout=30) as c:
        assert c.call(S.AStatus)["activated"]
    audit = shared.cli("audit", "export").stdout.decode()
    assert "ca-create: validity_days: must be >= 1" in audit
    assert shared.proc.poll() is None


def test_csr_size_count_and_sha1_messages(shared, tmp_path):
    huge = tmp_path / "huge.csr"
    with open(huge, "wb") as f:
        f.truncate(9 * 1024 * 1024)
    mid = tmp_path / "mid.csr"
    mid.write_bytes(b"\x30" * (100 * 1024))
    for p in (huge, mid):
        line = _one_line(shared.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(p), check=False))
        assert f"{p} is larger than" in line and "not a certificate request" in line, line
    r = shared.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr",
                   str(Path(__file__).parent.parent / "data" / "csr" / "bad-sha1-signature.der"), check=False)
    assert r.returncode == 1 and b"SHA-1 signature refused" in r.stderr, r.stderr
    # More CSRs than one request carries: sent as several requests, every CSR answered.
    nosan = make_csr(tmp_path, "nosan", san=None)
    good = make_csr(tmp_path, "good")
    args = ["issue", "--ca", "issuing", "--profile", "tls-server", "--out", str(tmp_path / "o.pem")]
    args += ["--csr", str(nosan)] * 1030 + ["--csr", str(good)]
    r = shared.cli(*args, check=False, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 1 and "lost the connection" not in err
    assert err.count("refused:") == 1030
    assert (tmp_path / "o.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 1


def test_cli_niceties(shared, tmp_path):
    csr = make_csr(tmp_path, "www")
    # issue prints each serial; revoke takes it as printed.
    r = shared.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), "--out", str(tmp_path / "w.pem"))
    serial_line = r.stdout.decode().splitlines()[-1]
    assert serial_line.startswith("serial ") and serial_line.endswith(f"  {csr}"), serial_line
    serial = serial_line.split()[1]
    r = shared.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr))
    assert r.stdout.startswith(b"-----BEGIN CERTIFICATE-----") and b"serial" not in r.stdout  # stdout stays PEM
    assert r.stderr.decode().startswith("serial ")
    assert shared.cli("revoke", "--ca", "issuing", serial).stdout.decode().startswith(f"revoked issuing/{serial}")
    # cert show: the same ISO 8601 times as ca show.
    cert = json.loads(shared.cli("cert", "show", "--ca", "issuing", serial).stdout)
    ca = json.loads(shared.cli("ca", "show", "issuing", "--json").stdout)
    for t in (cert["not_before"], cert["not_after"], cert["issued_at"], cert["revoked_at"], ca["not_after"]):
        assert datetime.fromisoformat(t).utcoffset() == timedelta(0) and t.endswith("+00:00"), t
    # --json on commands that print data (the full list is checked in tests/unit/test_cli_options.py).
    assert json.loads(shared.cli("audit", "reconcile", "--json").stdout) == {"voided": []}
    # A refusal for a missing role names the role.
    line = _one_line(shared.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(csr), officer="aud", check=False))
    assert "may not issue: it needs the operator role" in line, line
    # Empty lists say so.
    assert shared.cli("dist", "list").stdout == b"no parked jobs\n"
    assert shared.cli("pending", "list").stdout == b"no pending requests\n"
    assert shared.cli("ocsp", "tenant", "list").stdout == b"no tenants\n"
    assert shared.cli("audit", "reconcile").stdout.startswith(b"no voided intents")
    # A CSR argument that is a certificate or a key says so.
    shared.export("issuing", tmp_path / "ca.pem")
    openssl("x509", "-in", str(tmp_path / "ca.pem"), "-outform", "DER", "-out", str(tmp_path / "ca.der"))
    for path, what in ((tmp_path / "www.key", "a private key"), (tmp_path / "ca.pem", "a certificate"),
                       (tmp_path / "ca.der", "a certificate")):
        line = _one_line(shared.cli("issue", "--ca", "issuing", "--profile", "tls-server", "--csr", str(path), check=False))
        assert f"{path} is {what}, not a certificate request" in line, line


def test_crl_der_is_not_written_to_a_terminal(shared):
    before = shared.cli("crl", "export", "--ca", "issuing").stdout
    for args in (("crl", "export", "--ca", "issuing"), ("crl", "generate", "--ca", "issuing")):
        main, sub = pty.openpty()
        try:
            e = shared.env("oper")
            r = subprocess.run(shared.argv(*args), env=e, stdout=sub, stderr=subprocess.PIPE, timeout=120, cwd="/")
        finally:
            os.close(sub)
            os.close(main)
        assert r.returncode == 1
        assert r.stderr.decode().strip() == "donjon: a CRL is DER (binary): give --out FILE or redirect the output"
    assert shared.cli("crl", "export", "--ca", "issuing").stdout == before  # generate refused before signing


def test_commands_right_after_a_restart_wait_for_activation(shared):
    # Not activated, and nothing will activate it: said so, not "log in first".
    shared.stop()
    shared.start_inactive()
    line = _one_line(shared.cli("cert", "list", check=False))
    assert "not activated yet" in line, line
    shared.stop()
    # Activation from the PIN file under way: a script's first command waits for it.
    shared.session_file("oper").unlink(missing_ok=True)
    with open(shared.log, "ab") as logf:
        shared.proc = subprocess.Popen(shared.argv("run", "--home", str(shared.home)), env=shared.env(), stdout=logf,
                                       stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    deadline = time.monotonic() + 60
    while not (shared.home / "run" / "admin.sock").exists():
        assert time.monotonic() < deadline and shared.proc.poll() is None
        time.sleep(0.01)
    r = shared.cli("cert", "list", check=False)
    assert r.returncode == 0, r.stderr.decode() + shared.log.read_text(errors="replace")[-3000:]


def _files(root: Path) -> set[str]:
    out = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != ".git"]
        out.update(os.path.join(d, f) for f in files + dirs)
    return out


def test_just_demo_as_documented(tmp_path):
    """`just demo` in a state folder outside the checkout: it writes nothing into the checkout, prints steps
    with the configured endpoint, and stops cleanly on Ctrl-C."""
    repo = Path(__file__).resolve().parent.parent.parent
    base = Path(tempfile.mkdtemp(prefix="donjon-demo-"))
    os.chmod(base, 0o711)
    home = base / "state"
    home.mkdir(mode=0o711)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "donjon.toml").write_text(f'[ocsp]\nlisten = "127.0.0.1:{port}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DONJON_", "PYTHON"))}
    env.update(DONJON_HOME=str(home), DONJON_PASSWORD="correct horse battery staple")
    before = _files(repo)
    log = base / "demo.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([str(repo / ".venv" / "bin" / "just"), "-f", str(repo / "justfile"), "demo"], env=env, cwd=base,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"running; admin socket" not in log.read_bytes():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert f"export DONJON_HOME={home} " in text
        assert f"-url http://127.0.0.1:{port}/ocsp " in text and f"curl -s http://127.0.0.1:{port}/crl/issuing.crl" in text
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C at the terminal: the foreground process group
        assert p.wait(timeout=60) in (0, 130), log.read_text()  # 130: just's own "interrupted by SIGINT"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert "Traceback" not in text and "protocol violation" not in text and "peer closed" not in text, text
    assert "factory" in text and "stopped cleanly" in text
    assert _files(repo) - before == set()
    shutil.rmtree(base, ignore_errors=True)

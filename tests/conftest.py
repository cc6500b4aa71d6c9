"""Fixtures that run the real appliance: `donjon init` + `donjon run` with a SoftHSM2 token and an
encrypted CMDB in a temporary DONJON_HOME, driven through the real CLI and admin socket."""

from __future__ import annotations

import compileall
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
VENV_BIN = Path(sys.executable).parent
# DONJON_BIN=/path/to/dist/donjon/donjon runs every appliance test against the frozen bundle.
DONJON_BIN = os.environ.get("DONJON_BIN") or None


def pytest_configure(config):
    # Test workers (pytest-xdist, `just test`) share the machine: the role users are made once, here in
    # the controller before any worker starts (not by two appliances' concurrent `useradd`s), and the
    # init-once templates live in one folder for the whole run (each variant initialised by one worker).
    if hasattr(config, "workerinput"):
        return
    if os.geteuid() == 0:
        from appliance import privdrop
        from appliance.roletable import ROLES
        privdrop.ensure_role_users(ROLES)
    base = tempfile.mkdtemp(prefix="donjon-templates-")
    os.chmod(base, 0o711)
    os.environ[TEMPLATES_ENV] = config._donjon_templates = base  # type: ignore[attr-defined]


def pytest_unconfigure(config):
    base = getattr(config, "_donjon_templates", None)
    if base:
        shutil.rmtree(base, ignore_errors=True)


TEMPLATES_ENV = "DONJON_TEST_TEMPLATES"
# The longest modules (`just test --durations=60`) are collected first: with --dist loadscope a worker
# takes modules in collection order, so none is left alone with a long one at the end of the run.
LONG_MODULES = ("test_two_tier.py", "test_distribution.py", "test_kgs.py", "test_crash.py", "test_cmp.py", "test_console.py",
                "test_gateway_estscep.py", "test_gateway.py", "test_keybackup.py", "test_ocsp.py", "test_audit.py",
                "test_revocation.py", "test_restore.py", "test_officers.py", "test_lifecycle.py", "test_frozen.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


def _world_readable_source() -> str:
    """Roles drop to their own users and import lazily afterwards: they must be able to read the
    code. A checkout under a 0700 home would stop them, so tests run a world-readable copy."""
    dst = Path(tempfile.mkdtemp(prefix="donjon-src-"))
    os.chmod(dst, 0o755)
    for pkg in ("appliance", "hsm", "policy"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # Byte-compiled once here: roles run with PYTHONDONTWRITEBYTECODE (and so does this machine's shell),
    # so without it every role start and every CLI call compiled our modules from source again
    # (a third of a CLI call's CPU, more for a role).
    compileall.compile_dir(str(dst), quiet=1)
    for root, dirs, files in os.walk(dst):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return str(dst)


@pytest.fixture(scope="session")
def src_path():
    p = _world_readable_source()
    yield p
    shutil.rmtree(p, ignore_errors=True)


def make_ceremony(path: Path, root_key="p384", issuing_key="p256", extra: str = "") -> Path:
    path.write_text(f"""
[root]
name = "root"
key-type = "{root_key}"
subject = {{ C = "FR", O = "Donjon Test", CN = "Donjon Test Root CA" }}
validity-days = 3650
path-length = 1

[[issuing]]
name = "issuing"
key-type = "{issuing_key}"
subject = {{ C = "FR", O = "Donjon Test", CN = "Donjon Test Issuing CA" }}
validity-days = 1825
path-length = 0
{extra}""")
    return path


PASSWORD = "correct horse battery staple"
# Officers every test appliance is created with (donjon init --officer): the CLI logs in as the one
# whose role the command needs (see Appliance.officer_for).
OFFICERS = {"admin": "administrator", "oper": "operator", "aud": "auditor"}


class Appliance:
    """One appliance: a state folder, its `donjon run` process group, and the CLI."""

    def __init__(self, home: Path, src: str, user: str | None = None, bin: str | None = None):
        self.home = home
        self.src = src
        self.user = user  # developer mode as this non-root user
        # A frozen bundle's executable instead of the source tree; "" forces the source tree.
        self.bin = DONJON_BIN if bin is None else (bin or None)
        self.proc: subprocess.Popen | None = None
        self.log = home.parent / f"{home.name}.log"
        self.officers: dict[str, str] = dict(OFFICERS)
        self.template: Path | None = None  # the initialised folder this one was copied from
        self.run_env: dict[str, str] = {}  # more environment for `donjon run` (a test clock, say)

    def env(self, officer: str = "oper") -> dict[str, str]:
        """The CLI's environment, logged in as `officer` (a new login when its stored session is gone)."""
        e = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and not k.startswith("DONJON_")}
        if self.bin:
            e.pop("PYTHONPATH", None)
        else:
            e["PYTHONPATH"] = self.src
        e["DONJON_HOME"] = str(self.home)
        if officer in self.officers:  # none before the first one exists (bootstrap tests)
            e["DONJON_OFFICER"] = officer
            e["DONJON_PASSWORD"] = PASSWORD
        e["DONJON_SESSION_FILE"] = str(self.session_file(officer))
        return e

    def session_file(self, officer: str) -> Path:
        return self.home.parent / f"{self.home.name}.session-{officer}"

    @staticmethod
    def officer_for(args: tuple[str, ...]) -> str:
        """Audit commands as the auditor, officer management and tenant configuration as the administrator,
        the rest as the operator."""
        if args[:1] == ("audit",):
            return "aud"
        if args[:1] == ("officer",):
            return "admin"
        if args[:2] == ("ocsp", "tenant") and args[2:3] in (("add",), ("update",), ("remove",), ("csr",)):
            return "admin"  # which other CAs the endpoint answers for is configuration
        return "oper"

    def session(self, officer: str = "oper") -> str:
        """A live session token of `officer` (for AdminClient(home, session=...))."""
        from appliance.client import AdminClient, ClientError
        f = self.session_file(officer)
        if f.exists():  # usually left by start()'s status polling, which logs the operator in
            try:
                AdminClient(str(self.home), timeout=30, session=f.read_text().strip()).close()
                return f.read_text().strip()
            except ClientError:
                pass
        self.cli("status", officer=officer)  # logs in and stores a new session
        return f.read_text().strip()

    def argv(self, *args: str) -> list[str]:
        base = [self.bin, *args] if self.bin else [str(VENV_BIN / "python"), "-m", "appliance.cli", *args]
        if self.user:
            return ["runuser", "-u", self.user, "--", *base]
        return base

    def cli(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 120,
            officer: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        e = self.env(officer or self.officer_for(args))
        e.update(env or {})
        r = subprocess.run(self.argv(*args), env=e, capture_output=True, input=input, timeout=timeout, cwd="/")
        if check and r.returncode != 0:
            raise AssertionError(f"donjon {' '.join(args)} failed ({r.returncode}):\n{r.stdout.decode()}\n{r.stderr.decode()}")
        return r

    def init(self, ceremony: Path, config: str = "", officers: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> None:
        """`donjon init`, with a donjon.toml whose endpoint listens on a free port of 127.0.0.1."""
        self.home.mkdir(mode=0o711, exist_ok=True)
        if self.user:
            pw = __import__("pwd").getpwnam(self.user)
            os.chown(self.home, pw.pw_uid, pw.pw_gid)
        cfg = self.home / "donjon.toml"
        cfg.write_text('[ocsp]\nlisten = "127.0.0.1:0"\n' + config)
        os.chmod(cfg, 0o644)
        self.officers = dict(OFFICERS if officers is None else officers)
        args = [a for n, r in self.officers.items() for a in ("--officer", f"{n}:{r}")]
        r = self.cli("init", "--home", str(self.home), "--ceremony", str(ceremony), *args, *extra)
        assert b"protocol violation" not in r.stderr, r.stderr.decode()  # init's own stop is a clean one

    @property
    def endpoint(self) -> str:
        """The OCSP/CRL endpoint's base URL, as the supervisor bound it."""
        return (self.home / "run" / "endpoint").read_text().strip()

    def start(self, timeout: float = 60, activate: bool = True) -> None:
        args = ["run", "--home", str(self.home)] + ([] if activate else ["--no-activate"])
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv(*args), env={**self.env(), **self.run_env}, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        from appliance.client import AdminClient, ClientError
        from appliance.ipc import schema as S

        want = b'"activated": true' if activate else b'"activated": false'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"donjon run exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:  # poll in-process (status is public): cheaper than a CLI process every 0.1 s
                with AdminClient(str(self.home), timeout=10) as c:
                    ready = c.call(S.AStatus).get("activated") == activate
            except (ClientError, OSError):
                ready = False
            if ready:  # then once through the real CLI, which also logs the operator in
                r = self.cli("status", "--json", check=False, timeout=30)
                if r.returncode == 0 and want in r.stdout:
                    return
            time.sleep(0.1)
        raise AssertionError(f"appliance not ready in {timeout}s:\n{self.log.read_text()}")

    def start_inactive(self) -> None:
        self.start(activate=False)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if self.user:  # signal the supervisor itself, not runuser
            pids = self.role_pids()
            ppids = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in pids.values()}
            for p in ppids:
                os.kill(p, signal.SIGTERM)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the supervisor's process group and every role (each role has a process group of its own)."""
        if self.proc is None:
            return
        roles = self.role_pids().values() if self.proc.poll() is None else ()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in roles:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def _supervisors(self, procs) -> set[int]:
        home = str(self.home).encode()
        return {pid for pid, (cmd, _) in procs.items() if b"run" in cmd and home in cmd and not cmd[0].endswith(b"runuser")}

    def role_pids(self) -> dict[str, int]:
        """The role processes of this appliance: children of its supervisor (found by its command line)."""
        procs = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes().split(b"\0")
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError):
                    continue
                procs[int(p.name)] = (cmd, ppid)
        sups = self._supervisors(procs)
        out: dict[str, int] = {}
        for pid, (cmd, ppid) in sorted(procs.items()):
            if ppid in sups and b"role" in cmd:
                base = name = cmd[cmd.index(b"role") + 1].decode()
                k = 1
                while name in out:  # several CIS signing processes: cis, cis.1, ...
                    name, k = f"{base}.{k}", k + 1
                out[name] = pid
        return out

    def export(self, name: str, out: Path, chain: bool = False) -> Path:
        self.cli("ca", "export", name, "--out", str(out), *(["--chain"] if chain else []))
        return out


@pytest.fixture
def homes():
    """A base folder the role users can traverse (pytest's tmp_path sits under a 0700 folder)."""
    base = Path(tempfile.mkdtemp(prefix="donjon-test-"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


# The files `donjon init` writes that name the state folder itself (SoftHSM2 finds its tokens through them);
# everything else in a state folder (token objects, CMDB, its wrapped key, PIN files) is position-free.
PATH_FILES = ("softhsm/softhsm2.conf", "ocsp-token/softhsm2.conf")
OPTIONAL_PATH_FILES = ("gateway-token/softhsm2.conf",)  # only in homes made with the gateway enabled


def copy_home(src: Path, dst: Path) -> None:
    """Copy an initialised, stopped state folder: owners and modes kept (cp -a; role users own their
    folders in appliance mode), and the SoftHSM2 configurations pointed at the copy's own tokens
    (left alone, the copy's CIS would sign with, and write into, the original's token)."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    for rel in PATH_FILES + OPTIONAL_PATH_FILES:
        f = dst / rel
        if f.exists():
            text = f.read_text()
            assert f"{src}/" in text, f"{f} does not name its folder: copy_home needs updating"
            st = f.stat()
            f.write_text(text.replace(f"{src}/", f"{dst}/"))
            os.chown(f, st.st_uid, st.st_gid)


def _variant(ceremony: Path, config: str, officers: dict[str, str] | None, user: str | None, bin: str | None) -> tuple:
    """Everything `donjon init` is given: equal variants make equal state folders (but for the keys)."""
    return (ceremony.read_text(), config, tuple(sorted((officers if officers is not None else OFFICERS).items())), user, bin)


@pytest.fixture(scope="session")
def home_templates(src_path):
    """`donjon init` once per variant (ceremony, config, officers, mode) and per rank within a test
    (a test's second appliance of a variant gets other keys than its first): state folders that are
    never started, only copied. Init is most of an appliance's start-up. The folder is the run's (see
    pytest_configure): the first worker to want a variant makes it under a lock, the others copy it."""
    base = Path(os.environ.get(TEMPLATES_ENV) or tempfile.mkdtemp(prefix="donjon-templates-"))
    made: dict[tuple, Appliance] = {}

    def get(key: tuple, ceremony: Path, user: str | None, bin: str | None, config: str,
            officers: dict[str, str] | None) -> Appliance:
        if key not in made:
            name = "t" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            t = Appliance(base / name, src_path, user=user, bin=bin)
            with open(base / f"{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
                if (base / f"{name}.ready").exists():
                    t.officers = dict(OFFICERS if officers is None else officers)
                else:
                    shutil.rmtree(t.home, ignore_errors=True)  # a failed try of another worker
                    t.init(ceremony, config=config, officers=officers)
                    (base / f"{name}.ready").touch()
            made[key] = t
        return made[key]

    yield get
    if TEMPLATES_ENV not in os.environ:
        shutil.rmtree(base, ignore_errors=True)


class ApplianceMaker:
    """Makes appliances under one base folder (a copy of an init-once template, or a real init where a
    template cannot stand in) and stops them all at the end of its scope."""

    def __init__(self, base: Path, scratch: Path, src: str, templates):
        self.base, self.scratch, self.src, self.templates = base, scratch, src, templates
        self.made: list[Appliance] = []
        self.ranks: dict[tuple, int] = {}

    def __call__(self, ceremony: Path | None = None, start: bool = True, user: str | None = None, config: str = "",
                 officers: dict[str, str] | None = None, init_args: tuple[str, ...] = (), bin: str | None = None,
                 run_config: str = "", **kw) -> Appliance:
        """`config` is given to init (part of the template's variant); `run_config` is appended to the copy's
        donjon.toml after init, for settings only `donjon run` reads (Distribution rules naming a test's own
        slapd port: every test would otherwise init a variant of its own; the Factory's catch-up at activation
        queues the CA certificates and CRLs for rules added after init, as for an operator adding a rule)."""
        home = self.base / f"home{len(self.made)}"
        a = Appliance(home, self.src, user=user, bin=bin)
        self.made.append(a)
        ceremony = ceremony or make_ceremony(self.scratch / f"ceremony{len(self.made)}.toml", **kw)
        # A real init each time where a template cannot stand in: init options may write outside the
        # folder (--shares-dir), and a folder the test seeded before init (its own profiles) is read by it.
        if init_args or (home.exists() and any(home.iterdir())):
            a.init(ceremony, config=config, officers=officers, extra=init_args)
        else:
            variant = _variant(ceremony, config, officers, user, bin)
            self.ranks[variant] = self.ranks.get(variant, -1) + 1
            t = self.templates((*variant, self.ranks[variant]), ceremony, user, bin, config, officers)
            copy_home(t.home, home)
            a.template = t.home
            a.officers = dict(t.officers)
        if run_config:
            with open(home / "donjon.toml", "a") as f:
                f.write("\n" + run_config)
        if start:
            a.start()
        return a

    def stop_all(self) -> None:
        for a in self.made:
            a.stop()


@pytest.fixture
def appliance_factory(tmp_path, src_path, homes, home_templates):
    make = ApplianceMaker(homes, tmp_path, src_path, home_templates)
    yield make
    make.stop_all()


@pytest.fixture
def appliance(appliance_factory):
    return appliance_factory()


@pytest.fixture(scope="module")
def module_appliance_factory(tmp_path_factory, src_path, home_templates):
    """`appliance_factory` for a whole module: the appliances it makes run until the module's last test.
    For tests that only observe, or that each change only what no other test of the module looks at
    (their own certificates, their own officer): one start instead of one per test."""
    base = Path(tempfile.mkdtemp(prefix="donjon-test-"))
    os.chmod(base, 0o711)
    make = ApplianceMaker(base, tmp_path_factory.mktemp("module"), src_path, home_templates)
    try:
        yield make
    finally:
        make.stop_all()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def module_appliance(module_appliance_factory):
    """One running appliance of the default variant for every test of a module (see module_appliance_factory)."""
    return module_appliance_factory()


@pytest.fixture(scope="module")
def shared_appliance(module_appliance):
    """One running appliance of the default variant for the tests of a module that only observe it:
    none of them may change what another looks at (a test that stops, kills or reconfigures takes
    `appliance`)."""
    return module_appliance


def openssl(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(["openssl", *args], capture_output=True, input=input, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{r.stdout.decode()}\n{r.stderr.decode()}")
    return r


def make_csr(tmp: Path, name: str, san: str | None = "DNS:www.example.org", subj: str = "/",
             key: str = "ec", bits: str = "P-256") -> Path:
    keyf, csrf = tmp / f"{name}.key", tmp / f"{name}.csr"
    opts = ["-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{bits}"] if key == "ec" else ["-newkey", f"rsa:{bits}"]
    args = ["req", "-new", *opts, "-nodes", "-keyout", str(keyf), "-subj", subj, "-out", str(csrf)]
    if san:
        args += ["-addext", f"subjectAltName={san}"]
    openssl(*args)
    return csrf


def softhsm_reload(module: str = "/usr/lib/softhsm/libsofthsm2.so") -> None:
    """In-process unit tests: python-pkcs11 keeps one library per process and SoftHSM lists its tokens at
    C_Initialize, so a test module that points SOFTHSM2_CONF at its own tokens re-initialises it first
    (order-independent, serially as under xdist)."""
    import pkcs11
    lib = pkcs11.lib(module)
    if lib.initialized:
        lib.finalize()
    lib.initialize()

"""Real servers the Distribution tests and benchmarks publish to: a throwaway slapd on 127.0.0.1, and a
small HTTP receiver (Python's http.server) that stores what is PUT/POSTed; Debian's nginx running the
shipped OCSP cache configuration. Each is started on a free port and stopped by pid."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NGINX_SHIPPED = REPO / "appliance" / "ocsp" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BASE = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{BASE}"
ADMIN_PW = "slapd-test-secret"

SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {dir}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 1073741824
suffix "{base}"
rootdn "{admin}"
rootpw {pw}
directory {dir}/db
"""

SEED = f"""\
dn: {BASE}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,{BASE}
objectClass: organizationalUnit
ou: people
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def snmptrapd(d: Path, conf: str, env: dict[str, str], port: int | None = None) -> Iterator[tuple[int, Path]]:
    """A real snmptrapd on 127.0.0.1 with this configuration, logging to d/traps.log; yields (port, log)
    once it says it started (bounded), and kills it after."""
    port = port or free_udp_port()
    (d / "snmptrapd.conf").write_text(conf)
    log = d / "traps.log"
    proc = subprocess.Popen(["snmptrapd", "-f", "-C", "-c", str(d / "snmptrapd.conf"), "-Lf", str(log), "-On", "-m", "",
                             f"udp:127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if log.exists() and "NET-SNMP version" in log.read_text():
                break
            time.sleep(0.05)
        yield port, log
    finally:
        proc.kill()
        proc.wait(10)


def wait_port(port: int, timeout: float = 10, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildProcessError(f"exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def make_tls(d: Path, name: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl: (ca.pem, cert, key)."""
    d.mkdir(parents=True, exist_ok=True)
    ca, cakey, cert, key, csr = (d / n for n in ("tls-ca.pem", "tls-ca.key", "server.pem", "server.key", "server.csr"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(cakey), "-out", str(ca),
        "-subj", "/CN=Test TLS CA", "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={name}")
    ext = d / "ext.cnf"
    ext.write_text(f"subjectAltName=IP:{name}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(cakey), "-CAcreateserial", "-out", str(cert), "-days", "2",
        "-extfile", str(ext))
    os.chmod(key, 0o644)  # slapd may drop to its own user
    return ca, cert, key


class Slapd:
    def __init__(self, root: Path, tls: bool = False):
        self.dir = root
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.conf = root / "slapd.conf"
        conf = SLAPD_CONF.format(dir=root, base=BASE, admin=ADMIN_DN, pw=ADMIN_PW)
        self.tls_ca: Path | None = None
        self.tls_port: int | None = None
        if tls:
            self.tls_ca, cert, key = make_tls(root / "tls")
            conf = (f"TLSCACertificateFile {self.tls_ca}\nTLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\n") + conf
            self.tls_port = free_port()
        self.conf.write_text(conf)
        subprocess.run(["slapadd", "-f", str(self.conf), "-b", BASE], input=SEED.encode(), check=True, capture_output=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.dir / "slapd.log", "ab")
        for _ in range(50):  # a restart right after a stop may find the old process still releasing the db
            urls = f"ldap://127.0.0.1:{self.port}/" + (f" ldaps://127.0.0.1:{self.tls_port}/" if self.tls_port else "")
            self.proc = subprocess.Popen(["slapd", "-f", str(self.conf), "-h", urls, "-d", "0"], stdout=log, stderr=log)
            try:
                wait_port(self.port, 30, self.proc)
                break
            except ChildProcessError:
                time.sleep(0.2)
        log.close()
        if self.proc.poll() is not None:
            raise AssertionError(f"slapd did not start: {(self.dir / 'slapd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """The directory hangs: connections are accepted by the kernel, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def put_binary(self, dn: str, attr: str, value: bytes, classes: tuple[str, ...] = ("applicationProcess", "pkiCA")) -> None:
        """Create (or replace the attribute of) an entry with the real `ldapadd`/`ldapmodify`."""
        import base64

        b64 = base64.b64encode(value).decode()
        cn = dn.split(",", 1)[0].split("=", 1)[1]
        add = f"dn: {dn}\n" + "".join(f"objectClass: {c}\n" for c in classes) + f"cn: {cn}\n{attr}:: {b64}\n"
        r = subprocess.run(["ldapadd", "-x", "-H", self.url, "-D", ADMIN_DN, "-w", ADMIN_PW], input=add, capture_output=True, text=True)
        if r.returncode == 68:
            mod = f"dn: {dn}\nchangetype: modify\nreplace: {attr}\n{attr}:: {b64}\n"
            r = subprocess.run(["ldapmodify", "-x", "-H", self.url, "-D", ADMIN_DN, "-w", ADMIN_PW], input=mod, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    def search(self, base: str, attr: str, filt: str = "(objectClass=*)", scope: str = "base") -> list[bytes]:
        """Values of `attr` read back with the real `ldapsearch` (binary values come base64 in LDIF)."""
        import base64

        r = subprocess.run(["ldapsearch", "-LLL", "-x", "-H", self.url, "-D", ADMIN_DN, "-w", ADMIN_PW, "-o", "ldif-wrap=no",
                            "-s", scope, "-b", base, filt, attr], capture_output=True, text=True)
        if r.returncode == 32:  # no such object
            return []
        assert r.returncode == 0, r.stderr
        out = []
        for line in r.stdout.splitlines():
            name, sep, value = line.partition(":: ")
            if sep and name.lower() == attr.lower():
                out.append(base64.b64decode(value))
        return out


RECEIVER = r'''
import hashlib, http.server, os, socket, sys, threading, time
mode, root, token, tls = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _store(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        if token != "-" and self.headers.get("Authorization") != "Bearer " + token:
            self.send_response(401); self.send_header("Content-Length", "0"); self.end_headers(); return
        if mode == "fail":
            self.send_response(503); self.send_header("Content-Length", "0"); self.end_headers(); return
        name = self.path.strip("/").replace("/", "_")
        tmp = os.path.join(root, name + ".tmp")
        with open(tmp, "wb") as f: f.write(body)
        os.replace(tmp, os.path.join(root, name))
        with open(os.path.join(root, "log"), "a") as f:
            auth = (self.headers.get("Authorization") or "-").replace(" ", "_")
            f.write(f"{self.command} {self.path} {len(body)} {self.headers.get('Content-Type')} {hashlib.sha256(body).hexdigest()} {auth}\n")
        self.send_response(201); self.send_header("Content-Length", "0"); self.end_headers()
    do_PUT = do_POST = _store
    def do_GET(self):
        path = os.path.join(root, self.path.strip("/").replace("/", "_"))
        if not os.path.isfile(path):
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        body = open(path, "rb").read()
        self.send_response(200); self.send_header("Content-Type", "application/pkix-crl")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
if mode in ("ok", "fail"):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    if tls != "-":
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls.split(","))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
else:  # a broken peer (a fake: no real server misbehaves on demand): junk bytes, or silence
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64)
    print(s.getsockname()[1], flush=True)
    held = []
    while True:
        c, _ = s.accept()
        if mode == "garbage":
            try:
                c.recv(65536); c.sendall(b"\x30\x84\xff\xff\xff\xff garbage \x00\x01" * 8); c.close()
            except OSError:
                pass
        else:
            held.append(c)
'''


class Receiver:
    """mode: ok (stores PUT/POST bodies, serves them back on GET), fail (503), garbage (junk bytes on any
    TCP request), hang (accepts, never answers)."""

    def __init__(self, root: Path, mode: str = "ok", token: str | None = None, tls: bool = False):
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.tls_ca = None
        arg = "-"
        if tls:
            self.tls_ca, cert, key = make_tls(root.parent / (root.name + "-tls"))
            arg = f"{cert},{key}"
        self.proc = subprocess.Popen([sys.executable, "-c", RECEIVER, mode, str(root), token or "-", arg],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.port = int(self.proc.stdout.readline())

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.port}"

    def log(self) -> list[list[str]]:
        p = self.dir / "log"
        return [ln.split() for ln in p.read_text().splitlines()] if p.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc.stdout.close()


def render(shipped: str, upstream_port: int, port: int, cache_dir: Path) -> str:
    """The shipped file with its three marked values set (folder, endpoint address, listen address)."""
    out = shipped.replace("/var/cache/nginx/donjon-ocsp", str(cache_dir))
    out = out.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
    out = out.replace("    listen 80;", f"    listen 127.0.0.1:{port};")
    assert out.count(str(cache_dir)) == 1 and f":{upstream_port};" in out and f":{port};" in out
    return out


class Nginx:
    """Debian's nginx in the foreground on 127.0.0.1 with the shipped OCSP cache configuration in front of an
    endpoint port, a prefix folder of its own; stopped by pid."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.dir = Path(tempfile.mkdtemp(prefix="donjon-nginx-"))
        os.chmod(self.dir, 0o755)  # the workers run as nobody when we are root
        (self.dir / "cache").mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, upstream_port: int) -> None:
        site = render(NGINX_SHIPPED.read_text(), upstream_port, self.port, self.dir / "cache")
        (self.dir / "site.conf").write_text(site)
        user = ""
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for p in [self.dir / "cache", *(self.dir / t for t in ("body", "proxy"))]:
                p.mkdir(exist_ok=True)
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
            user = "user nobody nogroup;"
        d = self.dir
        (d / "nginx.conf").write_text(f"""{user}
worker_processes {self.workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
""")
        t = subprocess.run([NGINX, "-t", "-p", str(d), "-c", str(d / "nginx.conf")], capture_output=True, timeout=20)
        assert t.returncode == 0, t.stderr.decode()
        with open(d / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf")], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        for _ in range(100):  # bounded: 10 s
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            assert self.proc.poll() is None, (d / "stderr.log").read_text()
            time.sleep(0.1)
        raise AssertionError("nginx did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)

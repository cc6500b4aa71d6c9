"""OCSP serving: Donjon's endpoint against `openssl ocsp` (EC and RSA CAs) and `cfssl ocspserve`.

    .venv/bin/python -m bench.ocsp [--quick] [--certs N] [--big N] [--duration S] [--profile]

1. Throughput and latency (wrk --latency, -t <= 2, DURATION s per point) at 1, 16 and 64 connections, on the
   same N certificates (100,000; --quick 10,000):
   - Donjon: an appliance with a P-256 issuing CA. Bench-only shortcut, as in bench.crl: while it is stopped,
     a child process unwraps the CMDB key with the token and bulk-inserts N `serials` + `certs` (dummy DER) +
     `ocsp_queue` rows; then the appliance is started and we wait until `donjon ocsp status --json` shows N
     responses held, none queued, and the endpoint's /health says it holds N (the Factory has the CIS sign
     them, exactly as after issuance). POST /ocsp and GET /ocsp/<url-encoded base64>.
   - `openssl ocsp` as a responder (signs every answer live, one process) with a P-256 CA and with an
     RSA-2048 CA, on an index.txt with the same N serials ('V' lines). It binds the wildcard address: it
     and its wrk run inside a private network namespace with only loopback up (`unshare -n`), the responder in
     a session of its own (SESSION). A fresh
     responder per point (it wedges after a connection that closes without a request); readiness is probed
     with a real request. POST.
   - `cfssl ocspserve -responses FILE` with the very responses Donjon serves (exported from the endpoint's
     store after the appliance stopped). POST only (its GET answers 400).
   - Alternated (ROUNDS, --rounds): the endpoint and `openssl ocsp` P-256, POST at 64 connections, one after the
     other in each round (the first alternating): the median of the per-round ratios, its spread, the load.
   Requests: DISTINCT (1,000) valid single-CertID requests (SHA-1 CertID, no nonce) for random serials among
   the N, rotated per request by the wrk Lua script; its `response` hook counts non-200 answers and OCSP
   responseStatus != successful. A sample of each server's answers is checked (signature with the issuer's
   key, serial, `good`) with cryptography, and one per server with `openssl ocsp -respin -VAfile <issuer>`.
2. Start-up with BIG pre-signed responses (1,000,000; --quick 200,000): an endpoint store filled through
   appliance.ocsp.store's API with responses signed by a software P-256 CA (cryptography, 2 processes);
   the endpoint role started as the supervisor starts it (socketpairs sup-ocsp / factory-ocsp, a 127.0.0.1
   listening socket as fd "listen", `donjon role ocsp --rw STORE`); time from spawn until it answers a
   request for one of the BIG serials with the stored response, then VmHWM / VmRSS. The same for
   `cfssl ocspserve` on a responses file holding the same BIG responses.
Every server is bound to 127.0.0.1 or lives in its own namespace; every wait is bounded; everything started
is stopped by its pid.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from bench import common
from tests.harness import EndpointRole

CA = "issuing-p256"
KEY_TYPE = "p256"
INSERT_CHUNK = 50_000
DISTINCT = 1000
CONNS = (1, 16, 64)
WRK = "/usr/bin/wrk"
# Every server measured runs in a session of its own, wrk in the benchmark's: the appliance is started that
# way (a daemon), and with the kernel's autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) a
# session is a CPU group. A peer sharing wrk's group hands the CPU back and forth with it inside one group,
# while the appliance waits for the scheduler at every turn across groups: on a loaded machine that alone
# moved the ratio by 2-3x. Same placement for every side.
SESSION = True
CFSSL = "/usr/bin/cfssl"
SAMPLE = 50


def bench_serial(i: int) -> int:
    """Deterministic, random-looking positive serials (127 bits, like Donjon's)."""
    return (int.from_bytes(hashlib.sha256(b"donjon-ocsp-bench:%d" % i).digest()[:16], "big") >> 1) | (1 << 125)


# ---------------------------------------------------------------- bulk load into the CMDB (child process)


def _load_child(home: Path, n: int) -> dict:
    from appliance.factory.cmdb import serial_bytes

    t0 = time.perf_counter()
    db = common.open_stopped_cmdb(home)
    c = db.db
    now = int(time.time())
    nb, na = now - 86400, now + 300 * 86400
    inserted = 0
    with db.tx():
        for start in range(0, n, INSERT_CHUNK):  # bounded by n
            sb = sorted(serial_bytes(bench_serial(i)) for i in range(start, min(n, start + INSERT_CHUNK)))
            c.executemany("INSERT INTO serials VALUES (?,?,'issued',?,NULL)", [(s, CA, now) for s in sb])
            c.executemany("INSERT INTO certs(serial, ca, profile, subject, not_before, not_after, issued_at, der, request) "
                          "VALUES (?,?,'tls-server','CN=bench',?,?,?,?,NULL)",
                          [(s, CA, nb, na, now, b"\x30\x03\x02\x01\x00") for s in sb])
            c.executemany("INSERT INTO ocsp_queue VALUES (?,?)", [(CA, s) for s in sb])
            inserted += len(sb)
        total = c.execute("SELECT count(*) FROM certs WHERE ca=?", (CA,)).fetchone()[0]
        queued = c.execute("SELECT count(*) FROM ocsp_queue WHERE ca=?", (CA,)).fetchone()[0]
    db.close()
    return {"inserted": inserted, "total": total, "queued": queued, "seconds": time.perf_counter() - t0}


def bulk_load(home: Path, n: int) -> dict:
    return common.run_bulk_load(home, "bench.ocsp", str(n))


# ---------------------------------------------------------------- requests, answers


def ocsp_request(ca_der: bytes, serial: int) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from policy.ocsp import issuer_hashes
    nh, kh = issuer_hashes(ca_der)["sha1"]
    return (ocsp.OCSPRequestBuilder().add_certificate_by_hash(nh, kh, serial, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER))


def check_answer(der: bytes, ca_der: bytes, serial: int) -> str | None:
    """None if `der` is a successful, correctly signed, `good` response for serial by this CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.x509 import ocsp
    try:
        r = ocsp.load_der_ocsp_response(der)
        if r.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return f"responseStatus {r.response_status.name}"
        if r.serial_number != serial:
            return "serial differs"
        if r.certificate_status != ocsp.OCSPCertStatus.GOOD:
            return f"status {r.certificate_status.name}"
        pub = x509.load_der_x509_certificate(ca_der).public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(r.signature, r.tbs_response_bytes, ec.ECDSA(r.signature_hash_algorithm))
        else:
            pub.verify(r.signature, r.tbs_response_bytes, padding.PKCS1v15(), r.signature_hash_algorithm)
        if r.next_update_utc is not None and r.next_update_utc < dt.datetime.now(dt.timezone.utc):
            return "stale"
        return None
    except Exception as e:  # noqa: BLE001 - any failure is a wrong answer
        return f"{type(e).__name__}: {e}"[:200]


def openssl_respin(resp: Path, ca_pem: Path) -> str:
    # -VAfile: the issuer is the responder (no certs in pre-produced responses, responderID by key hash)
    r = subprocess.run([common.OPENSSL, "ocsp", "-respin", str(resp), "-VAfile", str(ca_pem), "-resp_text"],
                       capture_output=True, text=True, timeout=30)
    ok = "Response verify OK" in r.stderr and "Cert Status: good" in r.stdout
    return "Response verify OK, Cert Status: good" if ok else f"FAILED: {r.stderr.strip()[-300:]}"


def http_post(port: int, body: bytes, timeout: float = 10, path: str = "/ocsp") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "application/ocsp-request"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def get_path(req: bytes) -> str:
    return "/ocsp/" + urllib.parse.quote(base64.b64encode(req).decode(), safe="")


def sample_check(fetch, ca_der: bytes, pairs: list[tuple[int, bytes]], work: Path, ca_pem: Path, tag: str) -> dict:
    """Ask `fetch(req) -> (status, body)` for the first SAMPLE (serial, request) pairs; check every answer."""
    bad = []
    last = None
    for serial, req in pairs[:SAMPLE]:
        st, body = fetch(req)
        why = f"HTTP {st}" if st != 200 else check_answer(body, ca_der, serial)
        if why:
            bad.append(f"{serial:x}: {why}")
        last = body
    resp = work / f"sample-{tag}.der"
    resp.write_bytes(last or b"")
    return {"checked": min(SAMPLE, len(pairs)), "bad": len(bad), "first_bad": bad[:3],
            "openssl_respin": openssl_respin(resp, ca_pem)}


# ---------------------------------------------------------------- wrk


def _lua_str(b: bytes) -> str:
    return '"' + "".join(chr(c) if 32 <= c < 127 and c not in (34, 92) else f"\\{c:03d}" for c in b) + '"'


def wrk_script(path: Path, method: str, targets: list[str], bodies: list[bytes] | None) -> Path:
    """Rotate through the pre-built requests; count non-200 and non-successful OCSP answers; print JSON."""
    lines = ["local TARGETS = {", *[f"  {_lua_str(t.encode())}," for t in targets], "}"]
    if bodies is not None:
        lines += ["local BODIES = {", *[f"  {_lua_str(b)}," for b in bodies], "}"]
    else:
        lines += ["local BODIES = nil"]
    lines.append(f'local METHOD = "{method}"')
    lines.append(r'''
-- wrk's default resolve() opens and closes a test connection without a request, which wedges
-- `openssl ocsp`: resolve without it (every server gets the same script shape).
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(host, service)
end
local threads = {}
local nthreads = 0
function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
  table.insert(threads, thread)
end
function init(args)
  good, badhttp, badocsp = 0, 0, 0
  reqs = {}
  local hdr = {}
  if BODIES then hdr["Content-Type"] = "application/ocsp-request" end
  for k = 1, #TARGETS do
    reqs[k] = wrk.format(METHOD, TARGETS[k], hdr, BODIES and BODIES[k] or nil)
  end
  idx = ((tid or 1) * 397) % #reqs
end
function request()
  idx = idx % #reqs + 1
  return reqs[idx]
end
function response(status, headers, body)
  if status ~= 200 then badhttp = badhttp + 1; return end
  local b1 = string.byte(body, 2)
  if b1 == nil then badocsp = badocsp + 1; return end
  local off = 3
  if b1 >= 128 then off = 3 + (b1 - 128) end
  if string.byte(body, off) == 10 and string.byte(body, off + 2) == 0 and #body > 16 then
    good = good + 1
  else
    badocsp = badocsp + 1
  end
end
function done(summary, latency, requests)
  local g, bh, bo = 0, 0, 0
  for _, t in ipairs(threads) do
    g = g + (t:get("good") or 0); bh = bh + (t:get("badhttp") or 0); bo = bo + (t:get("badocsp") or 0)
  end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"good":%d,"bad_http":%d,"bad_ocsp":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, g, bh, bo, e.connect, e.read, e.write, e.status, e.timeout))
end
''')
    path.write_text("\n".join(lines))
    return path


def wrk_argv(url: str, script: Path, conns: int, duration: float) -> list[str]:
    return [WRK, "-t", str(min(2, conns)), "-c", str(conns), "-d", f"{duration:g}s", "--latency", "--timeout", "5s",
            "-s", str(script), url]


def parse_wrk(out: str) -> dict:
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if not m:
        raise common.BenchError(f"no result from wrk: {out[-1500:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["errors"] = r["bad_http"] + r["bad_ocsp"] + r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return r


def run_wrk(url: str, script: Path, conns: int, duration: float) -> dict:
    r = subprocess.run(wrk_argv(url, script, conns, duration), capture_output=True, text=True,
                       timeout=duration + 60)
    return parse_wrk(r.stdout + r.stderr)


# ---------------------------------------------------------------- py-spy (optional)


def profile(pid: int, seconds: float, out: Path) -> dict:
    """py-spy record --format raw for `seconds` while the load runs; self and inclusive shares per function."""
    pyspy = common.VENV_BIN / "py-spy"
    r = subprocess.run([str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                        "--format", "raw", "--output", str(out), "--nonblocking"],
                       capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0 or not out.exists():
        return {"error": (r.stderr or r.stdout)[-500:]}
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for ln in out.read_text().splitlines():
        stack, _, cnt = ln.rpartition(" ")
        if not cnt.isdigit():
            continue
        k = int(cnt)
        total += k
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + k
        for f in set(re.sub(r":\d+\)$", ")", f) for f in frames):
            incl[f] = incl.get(f, 0) + k
    top_self = sorted(selfc.items(), key=lambda kv: -kv[1])[:15]
    top_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:40]
    return {"samples": total, "raw": str(out),
            "self": [(f, round(100 * c / total, 1)) for f, c in top_self],
            "inclusive": [(f, round(100 * c / total, 1)) for f, c in top_incl]}


# ---------------------------------------------------------------- Donjon (appliance)


WORKERS = 1  # endpoint processes (ocsp.workers); bench.run --ocsp-workers sets it


def _set_listen_any_port(home: Path) -> None:
    cfg = home / "donjon.toml"
    text = cfg.read_text()
    new = re.sub(r'(?m)^listen = "127\.0\.0\.1:8080"', 'listen = "127.0.0.1:0"', text, count=1)
    new = re.sub(r'(?m)^workers = 1\b', f"workers = {WORKERS}", new, count=1)
    # nginx's revocation bound (bench.ocsp.nginx_run): the endpoint caps Cache-Control max-age at this.
    new = re.sub(r'(?m)^max-age = 3600\b', f"max-age = {MAX_AGE}", new, count=1)
    # wrk's connections all come from one address: the per-source limit would cap the 64-connection point.
    new = re.sub(r'(?m)^max-connections-per-source = 64\b', "max-connections-per-source = 1024", new, count=1)
    if new == text:
        if "[ocsp]" in text:
            raise common.BenchError("cannot set ocsp.listen in donjon.toml")
        new = text + '\n[ocsp]\nlisten = "127.0.0.1:0"\n'
    cfg.write_text(new)


def _ocsp_status(home: Path) -> dict:
    r = subprocess.run(common.donjon_argv("ocsp", "status", "--json", "--home", str(home)), capture_output=True,
                       text=True, timeout=60, cwd=common.REPO)
    if r.returncode != 0:
        raise common.BenchError(f"donjon ocsp status failed: {r.stderr[-500:]}")
    return json.loads(r.stdout)


def _endpoint_port(home: Path) -> int:
    text = (home / "run" / "endpoint").read_text().strip()
    return int(text.rsplit(":", 1)[1].split("/")[0])


def _health_count(port: int) -> int:
    try:
        st, body = http_get(port, "/health", timeout=5)
    except OSError:
        return -1
    m = re.match(rb"ok: (\d+) ", body)
    return int(m.group(1)) if st == 200 and m else -1


def donjon_setup(work: Path, n: int) -> tuple[common.Appliance, dict]:
    home = work / "home-ocsp"
    common.log(f"ocsp: donjon init (root p256, {CA})")
    common.init_home(home, [(CA, KEY_TYPE)], nolint_profile=False)
    _set_listen_any_port(home)
    common.log(f"ocsp: bulk-loading {n:,} certificates + ocsp_queue rows into the stopped appliance's CMDB")
    load = bulk_load(home, n)
    if load["total"] != n or load["queued"] != n:
        raise common.BenchError(f"bulk load: {load}")
    app = common.Appliance(home)
    t0 = time.perf_counter()
    app.start(timeout=180)
    port = _endpoint_port(home)
    common.log(f"ocsp: appliance up (endpoint 127.0.0.1:{port}); waiting for {n:,} pre-produced responses")
    deadline = time.monotonic() + max(600, n / 100)
    st: dict = {}
    last_log = 0.0
    while True:
        st = _ocsp_status(home)
        cas = {c["ca"]: c for c in st["cas"]}
        c = cas.get(CA, {})
        held = _health_count(port)
        if c.get("responses") == n and c.get("queued") == 0 and held >= n:
            break
        if time.monotonic() > deadline:
            app.stop()
            raise common.BenchError(f"responses not all produced in time: {c}, endpoint holds {held}")
        if time.monotonic() - last_log > 15:
            common.log(f"ocsp: CMDB {c.get('responses', 0):,} responses, {c.get('queued', n):,} queued; endpoint {held:,}")
            last_log = time.monotonic()
        time.sleep(1.0)
    produced = time.perf_counter() - t0
    common.log(f"ocsp: all {n:,} responses signed and held by the endpoint {produced:.1f} s after start")
    return app, {"home": str(home), "port": port, "load": load, "produce_seconds": produced, "status": st}


def export_store_responses(home: Path, out: Path) -> int:
    """The sha1-CertID responses the endpoint holds (its own store, read while the appliance is stopped)."""
    from appliance.ocsp.store import Store
    st = Store.open(str(home / "ocsp"))
    k = 0
    try:
        ca = st.cas[CA]
        with open(out, "w") as f:
            for serial in list(ca.index["sha1"]):
                held = st.get(ca, "sha1", serial)
                f.write(base64.b64encode(held.der).decode() + "\n")
                k += 1
    finally:
        st.close()
    return k


# ---------------------------------------------------------------- openssl ocsp (in a private netns)


def openssl_setup(work: Path, key_type: str, n: int) -> Path:
    from bench.issuance import _software_ca
    d = work / f"openssl-ocsp-{key_type}"
    d.mkdir()
    _software_ca(d, key_type)
    exp = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=300)
    exps = exp.strftime("%y%m%d%H%M%SZ")
    with open(d / "index.txt", "w") as f:
        for i in range(n):
            s = bench_serial(i)
            f.write(f"V\t{exps}\t\t{s:X}\tunknown\t/CN=bench{i}\n")
    (d / "index.txt.attr").write_text("unique_subject = no\n")
    return d


def openssl_run(d: Path, ca_der: bytes, pairs: list[tuple[int, bytes]], script: Path, duration: float,
                conns_list=CONNS, sample: bool = True) -> dict:
    """One namespace, one fresh responder per connection count; probes + sample requests in the namespace
    (their answers checked) unless `sample` is False (the alternated rounds: the main run checks them)."""
    port = 8888
    probe_dir = d / "probe"
    probe_dir.mkdir(exist_ok=True)
    for k, (_, req) in enumerate(pairs[:SAMPLE]):
        (probe_dir / f"req{k}.der").write_bytes(req)
    url = f"http://127.0.0.1:{port}/"
    srv = (f"{common.OPENSSL} ocsp -index {d}/index.txt -CA {d}/ca.pem -rsigner {d}/ca.pem -rkey {d}/ca.key "
           f"-port {port} -ndays 1")
    client = f"{common.OPENSSL} ocsp -url {url} -noverify -timeout 5"
    sh = ["set -u", "ip link set lo up"]
    for i, c in enumerate(conns_list):
        # In a session of its own, as the appliance's roles are (see SESSION); a background job is no process
        # group leader, so setsid execs in place and $! is the responder's pid.
        sh += [f"{'setsid ' if SESSION else ''}{srv} >{d}/server-{c}.log 2>&1 &", "SRV=$!",
               # readiness: a real request (a bare connect would wedge it)
               "ok=0; for t in $(seq 100); do "
               f"if {client} -reqin {probe_dir}/req0.der -respout {probe_dir}/ready.der >/dev/null 2>&1; "
               "then ok=1; break; fi; sleep 0.1; done",
               'if [ $ok != 1 ]; then echo "NOT READY"; kill $SRV; wait $SRV; exit 3; fi']
        if i == 0 and sample:
            sh.append(f"for k in $(seq 0 {min(SAMPLE, len(pairs)) - 1}); do "
                      f"{client} -reqin {probe_dir}/req$k.der -respout {probe_dir}/resp$k.der >/dev/null 2>&1; done")
        sh += [f"echo '=== conns {c}'", " ".join(wrk_argv(url, script, c, duration)),
               "kill $SRV 2>/dev/null; wait $SRV 2>/dev/null"]
    total = len(conns_list) * (duration + 30) + 120
    r = subprocess.run(["timeout", "-s", "KILL", str(int(total)), "unshare", "-n", "sh", "-c", "\n".join(sh)],
                       capture_output=True, text=True, timeout=total + 30)
    out = r.stdout + r.stderr
    res: dict = {"conns": {}}
    parts = re.split(r"^=== conns (\d+)$", out, flags=re.M)
    for j in range(1, len(parts) - 1, 2):
        res["conns"][parts[j]] = parse_wrk(parts[j + 1])
    if len(res["conns"]) != len(conns_list):
        raise common.BenchError(f"openssl ocsp run incomplete (rc {r.returncode}): {out[-2000:]}")
    if not sample:
        return res
    bad = []
    for k, (serial, _) in enumerate(pairs[:SAMPLE]):
        p = probe_dir / f"resp{k}.der"
        why = check_answer(p.read_bytes(), ca_der, serial) if p.exists() else "no answer"
        if why:
            bad.append(f"{serial:x}: {why}")
    res["sample"] = {"checked": min(SAMPLE, len(pairs)), "bad": len(bad), "first_bad": bad[:3],
                     "openssl_respin": openssl_respin(probe_dir / "resp0.der", d / "ca.pem")}
    return res


# ---------------------------------------------------------------- Donjon and openssl ocsp, alternated


ROUNDS = 5  # alternated rounds (bench.run --ocsp-rounds)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _point(fn) -> tuple[dict, dict]:
    """Run one measurement; the machine's state over it: 1-minute load average at its end and the share of
    all CPUs busy during it (anything, the measured pair included)."""
    b0, t0 = _cpu_ticks()
    r = fn()
    b1, t1 = _cpu_ticks()
    return r, {"load1": round(os.getloadavg()[0], 2), "busy": round((b1 - b0) / max(1, t1 - t0), 3)}


def alternate(url: str, script: Path, od: Path, oca: bytes, opairs: list[tuple[int, bytes]], oscript: Path,
              duration: float, rounds: int, conns: int = 64) -> dict:
    """The endpoint alone and `openssl ocsp` (P-256), POST at `conns` connections, one after the other `rounds`
    times, the first of each round alternating, with the same wrk, duration and script shape: on a shared
    2-core machine a single pair of points measures the neighbours as much as the servers. Reported: the
    median of the per-round ratios with their spread, each side's median, and the load over every point."""
    pts = []
    for i in range(rounds):
        common.log(f"ocsp: alternated round {i + 1}/{rounds} (Donjon and openssl ocsp P-256, {conns} connections)")

        def donjon():
            return run_wrk(url, script, conns, duration)

        def openssl():
            return openssl_run(od, oca, opairs, oscript, duration, conns_list=(conns,), sample=False)["conns"][str(conns)]
        order = [("donjon", donjon), ("openssl", openssl)]
        if i % 2:
            order.reverse()
        got = {}
        for name, fn in order:
            r, m = _point(fn)
            if r["errors"]:
                raise common.BenchError(f"alternated round {i + 1}: {name} answered {r['errors']} requests wrongly")
            got[name] = {"rps": r["rps"], "p99_us": r["p99_us"], **m}
        got["ratio"] = got["donjon"]["rps"] / got["openssl"]["rps"]
        got["first"] = order[0][0]
        pts.append(got)
    ratios = [p["ratio"] for p in pts]
    loads = [p[k]["load1"] for p in pts for k in ("donjon", "openssl")]
    busy = [p[k]["busy"] for p in pts for k in ("donjon", "openssl")]
    return {"rounds": pts, "conns": conns, "duration_s": duration,
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
            "median_donjon": statistics.median(p["donjon"]["rps"] for p in pts),
            "median_openssl": statistics.median(p["openssl"]["rps"] for p in pts),
            "load1_min": min(loads), "load1_max": max(loads), "busy_min": min(busy), "busy_max": max(busy),
            "cpus": os.cpu_count()}


# ---------------------------------------------------------------- cfssl ocspserve


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Cfssl:
    def __init__(self, responses: Path, log: Path):
        self.port = free_port()
        self.log = open(log, "ab")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([CFSSL, "ocspserve", "-address", "127.0.0.1", "-port", str(self.port),
                                      "-responses", str(responses)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=SESSION)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()


def wait_answer(port: int, req: bytes, want: bytes, proc: subprocess.Popen, timeout: float, path="/ocsp") -> float:
    """Poll until POST req answers exactly `want`; return perf_counter() at that answer."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise common.BenchError(f"server exited with {proc.returncode} before answering")
        try:
            st, body = http_post(port, req, timeout=max(1.0, deadline - time.monotonic()), path=path)
            if st == 200 and body == want:
                return time.perf_counter()
            last = f"HTTP {st}, {len(body)} bytes"
        except OSError as e:
            last = str(e)
        time.sleep(0.02)
    raise common.BenchError(f"no correct answer within {timeout:.0f} s (last: {last})")


def rss(pid: int) -> dict:
    return {"hwm": common.proc_status_kb(pid, "VmHWM") * 1024, "rss": common.proc_status_kb(pid, "VmRSS") * 1024}


# ---------------------------------------------------------------- start-up with BIG responses


_SIGNER: dict = {}


def _sign_init(key_pem: bytes, cert_der: bytes, tu: int, nu: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from policy.ocsp import issuer_hashes
    _SIGNER.update(key=serialization.load_pem_private_key(key_pem, None), cert=x509.load_der_x509_certificate(cert_der),
                   hashes=issuer_hashes(cert_der)["sha1"], tu=dt.datetime.fromtimestamp(tu, dt.timezone.utc),
                   nu=dt.datetime.fromtimestamp(nu, dt.timezone.utc))


def _sign_range(rng: tuple[int, int]) -> list[tuple[int, bytes]]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    s = _SIGNER
    nh, kh = s["hashes"]
    out = []
    for i in range(*rng):
        serial = bench_serial(i)
        der = (ocsp.OCSPResponseBuilder()
               .add_response_by_hash(issuer_name_hash=nh, issuer_key_hash=kh, serial_number=serial,
                                     algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
                                     this_update=s["tu"], next_update=s["nu"], revocation_time=None,
                                     revocation_reason=None)
               .responder_id(ocsp.OCSPResponderEncoding.HASH, s["cert"])
               .sign(s["key"], hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        out.append((serial, der))
    return out


def fill_store(d: Path, n: int) -> dict:
    """A store with n responses (published through the Store API) and the same responses as a cfssl file."""
    import multiprocessing as mp

    from cryptography.hazmat.primitives import serialization

    from appliance.ocsp.store import GOOD, Prepared, Store
    from bench.issuance import _software_ca
    cad = d / "ca"
    cad.mkdir()
    _software_ca(cad, "p256")
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((cad / "ca.pem").read_bytes())
    ca_der = cert.public_bytes(serialization.Encoding.DER)
    now = int(time.time())
    tu, nu = now - 60, now + 7 * 86400
    store_dir = d / "store"
    store_dir.mkdir(mode=0o700)
    t0 = time.perf_counter()
    st = Store.open(str(store_dir))
    st.publish_ca("bench", ca_der)
    chunk = 5000
    ranges = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    done = 0
    probe = None
    with open(d / "responses.b64", "w") as f, \
            mp.get_context("fork").Pool(2, _sign_init, ((cad / "ca.key").read_bytes(), ca_der, tu, nu)) as pool:
        for seq, got in enumerate(pool.imap(_sign_range, ranges), 1):
            prepared = [Prepared("sha1", s, GOOD, tu, nu, der) for s, der in got]
            plan = st.plan("bench", prepared, seq)
            plan.write()
            st.commit(plan, seq)
            f.write("".join(base64.b64encode(der).decode() + "\n" for _, der in got))
            done += len(got)
            if probe is None:
                probe = got[len(got) // 2]
            if done % 200_000 < chunk:
                common.log(f"ocsp: start-up store: {done:,}/{n:,} responses signed and stored")
    held = st.responses_held()
    st.close()
    # the probe: a serial from the last chunk (the end of the store), and its exact stored response
    last = got[-1]
    return {"ca_der": ca_der, "ca_pem": cad / "ca.pem", "store": store_dir, "responses_file": d / "responses.b64",
            "held": held, "fill_seconds": time.perf_counter() - t0, "probes": [probe, last],
            "store_bytes": sum(p.stat().st_size for p in (store_dir / "bench").iterdir()),
            "file_bytes": (d / "responses.b64").stat().st_size}


class Role(EndpointRole):
    """The endpoint role alone (tests/harness.py), run by the bench's donjon, sized for load."""

    def __init__(self, store: Path, listen: socket.socket, log: Path):
        super().__init__(store, listen, log, common.donjon_argv(), timeout=60, max_connections=1024, read_timeout=10.0, max_age=3600,
                         max_per_source=1024)  # wrk: every connection from one address

    def stop(self, timeout: float = 30) -> int | None:
        return super().stop(timeout)


def startup(work: Path, n: int) -> dict:
    d = work / "startup"
    d.mkdir()
    common.log(f"ocsp: start-up: signing {n:,} responses (software P-256, 2 processes) into an endpoint store")
    fill = fill_store(d, n)
    if fill["held"] != n:
        raise common.BenchError(f"store holds {fill['held']}, expected {n}")
    common.log(f"ocsp: start-up store filled in {fill['fill_seconds']:.0f} s")
    res: dict = {"n": n, "fill_seconds": fill["fill_seconds"], "store_bytes": fill["store_bytes"],
                 "responses_file_bytes": fill["file_bytes"]}
    reqs = [(s, ocsp_request(fill["ca_der"], s), der) for s, der in fill["probes"]]
    subprocess.run(["sync"], timeout=300)

    # Donjon's endpoint role
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1024)
    port = lst.getsockname()[1]
    role = None
    try:
        role = Role(fill["store"], lst, d / "role.log")
        t_ans = wait_answer(port, reqs[0][1], reqs[0][2], role.proc, timeout=120)
        mem = rss(role.proc.pid)
        checks = [why for s, q, want in reqs for why in [_exact(http_post(port, q), want, fill["ca_der"], s)] if why]
        res["donjon"] = {"seconds": t_ans - role.t0, "ready_seconds": role.ready_at - role.t0, **mem,
                         "pid": role.proc.pid, "answers_checked": len(reqs), "bad": checks}
        role.connect_feed()  # as the Factory would, after the measure (the endpoint serves before its feed)
    finally:
        if role:
            role.stop()
        lst.close()
    common.log(f"ocsp: start-up donjon {res['donjon']['seconds']:.2f} s, VmHWM {res['donjon']['hwm'] / 2**20:.0f} MB")

    # cfssl ocspserve on the same responses
    cf = Cfssl(fill["responses_file"], d / "cfssl.log")
    try:
        t_ans = wait_answer(cf.port, reqs[0][1], reqs[0][2], cf.proc, timeout=600, path="/")
        mem = rss(cf.proc.pid)
        checks = [why for s, q, want in reqs for why in [_exact(http_post(cf.port, q, path="/"), want, fill["ca_der"], s)] if why]
        res["cfssl"] = {"seconds": t_ans - cf.t0, **mem, "answers_checked": len(reqs), "bad": checks}
    finally:
        cf.stop()
    common.log(f"ocsp: start-up cfssl {res['cfssl']['seconds']:.2f} s, VmHWM {res['cfssl']['hwm'] / 2**20:.0f} MB")
    res["time_ratio"] = res["donjon"]["seconds"] / res["cfssl"]["seconds"]
    res["mem_ratio"] = res["donjon"]["hwm"] / res["cfssl"]["hwm"]
    shutil.rmtree(d, ignore_errors=True)
    return res


def _exact(got: tuple[int, bytes], want: bytes, ca_der: bytes, serial: int) -> str | None:
    st, body = got
    if st != 200:
        return f"HTTP {st}"
    if body != want:
        return "not the stored response"
    return check_answer(body, ca_der, serial)


# ---------------------------------------------------------------- the whole benchmark


def run(work: Path, n: int, big: int, duration: float = 5.0, do_profile: bool = False, rounds: int = ROUNDS) -> dict:
    t0 = time.perf_counter()
    res: dict = {"certs": n, "distinct_requests": min(DISTINCT, n), "duration_s": duration, "conns": list(CONNS),
                 "wrk_threads": "min(2, connections)"}
    rnd = random.Random(1234)
    idxs = rnd.sample(range(n), min(DISTINCT, n))
    serials = [bench_serial(i) for i in idxs]

    # --- Donjon
    app, info = donjon_setup(work, n)
    try:
        port = info["port"]
        ca_der = http_get(port, f"/ca/{CA}.crt")[1]
        ca_pem = work / "donjon-ca.pem"
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        ca_pem.write_bytes(x509.load_der_x509_certificate(ca_der).public_bytes(serialization.Encoding.PEM))
        pairs = [(s, ocsp_request(ca_der, s)) for s in serials]
        post = wrk_script(work / "donjon-post.lua", "POST", ["/ocsp"] * len(pairs), [q for _, q in pairs])
        get = wrk_script(work / "donjon-get.lua", "GET", [get_path(q) for _, q in pairs], None)
        url = f"http://127.0.0.1:{port}"
        d: dict = {"produce_seconds": info["produce_seconds"], "load": info["load"],
                   "sample_post": sample_check(lambda q: http_post(port, q), ca_der, pairs, work, ca_pem, "donjon-post"),
                   "sample_get": sample_check(lambda q: http_get(port, get_path(q)), ca_der, pairs, work, ca_pem, "donjon-get"),
                   "post": {}, "get": {}}
        ep_pid = app.role_pids().get("ocsp")
        cpu0 = common.cpu_seconds(ep_pid) if ep_pid else None
        for c in CONNS:
            common.log(f"ocsp: wrk donjon POST, {c} connections")
            d["post"][str(c)] = run_wrk(url, post, c, duration)
            common.log(f"ocsp: wrk donjon GET, {c} connections")
            d["get"][str(c)] = run_wrk(url, get, c, duration)
        if ep_pid:
            d["endpoint_cpu_seconds"] = common.cpu_seconds(ep_pid) - cpu0
            d["endpoint_rss"] = rss(ep_pid)
            d["endpoint_wall_seconds"] = 2 * len(CONNS) * duration
            d["endpoint_cpu_us_per_request"] = 1e6 * d["endpoint_cpu_seconds"] / sum(
                d[m][str(c)]["requests"] for m in ("post", "get") for c in CONNS)
        if rounds:
            common.log(f"ocsp: openssl ocsp responder, p256 CA, index of {n:,} 'V' lines (for the alternated rounds)")
            od = openssl_setup(work, "p256", n)
            oca = x509.load_pem_x509_certificate((od / "ca.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
            opairs = [(s, ocsp_request(oca, s)) for s in serials]
            d["alternated"] = alternate(url, post, od, oca, opairs, wrk_script(od / "post.lua", "POST", ["/"] * len(opairs),
                                                                             [q for _, q in opairs]), duration, rounds)
        common.log("ocsp: Donjon behind nginx (appliance/ocsp/nginx.conf)")
        chosen = set(idxs)  # the revocation drill takes a certificate no other measurement asks about
        spare = bench_serial(next(i for i in range(n) if i not in chosen))
        d["nginx"] = nginx_run(app, port, ca_der, pairs, post, get, work, ca_pem, duration,
                               (spare, ocsp_request(ca_der, spare)))
        if do_profile and ep_pid:
            common.log("ocsp: py-spy record on the endpoint during a POST run at 64 connections")
            wrkp = subprocess.Popen(wrk_argv(url, post, 64, duration + 4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            try:
                time.sleep(1)
                d["profile"] = profile(ep_pid, duration, common.REPO / "bench" / "out" / "ocsp-endpoint.pyspy.txt")
            finally:
                out, _ = wrkp.communicate(timeout=duration + 60)
            d["profile"]["wrk"] = parse_wrk(out)
        st = _ocsp_status(Path(info["home"]))
        d["endpoint_counters"] = st.get("endpoint")
    finally:
        app.stop()
    resp_file = work / "cfssl-responses.b64"
    exported = export_store_responses(Path(info["home"]), resp_file)  # the revoked one included: cfssl serves it too
    if exported != n:
        raise common.BenchError(f"exported {exported} responses from the endpoint store, expected {n}")
    res["donjon"] = d

    # --- openssl ocsp, EC and RSA
    res["openssl"] = {}
    for kt in ("p256", "rsa2048"):
        common.log(f"ocsp: openssl ocsp responder, {kt} CA, index of {n:,} 'V' lines")
        od = work / f"openssl-ocsp-{kt}"
        if not (od / "index.txt").exists():  # the P-256 one is made for the alternated rounds already
            od = openssl_setup(work, kt, n)
        oca = x509.load_pem_x509_certificate((od / "ca.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
        opairs = [(s, ocsp_request(oca, s)) for s in serials]
        script = wrk_script(od / "post.lua", "POST", ["/"] * len(opairs), [q for _, q in opairs])
        res["openssl"][kt] = openssl_run(od, oca, opairs, script, duration)
        (od / "index.txt").unlink()

    # --- cfssl ocspserve, same responses as Donjon
    common.log(f"ocsp: cfssl ocspserve with the {n:,} responses Donjon serves")
    cf = Cfssl(resp_file, work / "cfssl.log")
    try:
        q0 = pairs[0]  # ready when it answers one request correctly
        t_ans = _wait_cfssl_ok(cf, q0[1], ca_der, q0[0])
        c: dict = {"startup_seconds": t_ans - cf.t0,
                   "sample": sample_check(lambda q: http_post(cf.port, q, path="/"), ca_der, pairs, work, ca_pem, "cfssl"),
                   "post": {}}
        cscript = wrk_script(work / "cfssl-post.lua", "POST", ["/"] * len(pairs), [q for _, q in pairs])
        for k in CONNS:
            common.log(f"ocsp: wrk cfssl POST, {k} connections")
            c["post"][str(k)] = run_wrk(f"http://127.0.0.1:{cf.port}", cscript, k, duration)
        c["rss"] = rss(cf.proc.pid)
    finally:
        cf.stop()
    res["cfssl"] = c
    resp_file.unlink()

    # --- ratios
    def rps(x, k):
        return x[str(k)]["rps"]
    dp = d["post"]
    res["ratios"] = {
        "rps64_vs_openssl_ec": rps(dp, 64) / rps(res["openssl"]["p256"]["conns"], 64),
        "rps64_vs_openssl_rsa": rps(dp, 64) / rps(res["openssl"]["rsa2048"]["conns"], 64),
        "rps64_vs_cfssl": rps(dp, 64) / rps(c["post"], 64),
        "rps64_get_vs_cfssl": rps(d["get"], 64) / rps(c["post"], 64),
        "p99_16_ms": dp["16"]["p99_us"] / 1000, "p99_16_get_ms": d["get"]["16"]["p99_us"] / 1000,
        "nginx_rps64_vs_cfssl": rps(d["nginx"]["post"], 64) / rps(c["post"], 64),
        "nginx_get_rps64_vs_cfssl": rps(d["nginx"]["get"], 64) / rps(c["post"], 64),
        "nginx_rps64_vs_openssl_ec": rps(d["nginx"]["post"], 64) / rps(res["openssl"]["p256"]["conns"], 64),
    }

    # --- start-up with BIG responses
    res["startup"] = startup(work, big)
    res["seconds"] = time.perf_counter() - t0
    return res


MAX_AGE = 5  # ocsp.max-age of the benchmark's appliance: the revocation bound through nginx


def nginx_run(app, port: int, ca_der: bytes, pairs: list[tuple[int, bytes]], post: Path, get: Path, work: Path,
              ca_pem: Path, duration: float, revoke: tuple[int, bytes]) -> dict:
    """Donjon's endpoint behind Debian's nginx running the shipped cache configuration (2 workers): every
    distinct request asked once (the cache filled), the answers checked, wrk at each point, then a
    revocation asked through nginx until it shows, every answer on the way judged."""
    from tests.servers import Nginx

    ng = Nginx(workers=2)
    try:
        ng.start(port)
        bad = [f"{s:x}: {why}" for s, q in pairs for why in
               (check_answer(http_post(ng.port, q)[1], ca_der, s), check_answer(http_get(ng.port, get_path(q))[1], ca_der, s))
               if why]
        out: dict = {"warm_bad": len(bad), "first_bad": bad[:3],
                     "sample_post": sample_check(lambda q: http_post(ng.port, q), ca_der, pairs, work, ca_pem, "nginx-post"),
                     "sample_get": sample_check(lambda q: http_get(ng.port, get_path(q)), ca_der, pairs, work, ca_pem, "nginx-get"),
                     "post": {}, "get": {}}
        url = f"http://127.0.0.1:{ng.port}"
        for c in CONNS:
            common.log(f"ocsp: wrk nginx+donjon POST, {c} connections")
            out["post"][str(c)] = run_wrk(url, post, c, duration)
            common.log(f"ocsp: wrk nginx+donjon GET, {c} connections")
            out["get"][str(c)] = run_wrk(url, get, c, duration)
        out["revocation"] = _revocation_through(app, ng.port, ca_der, revoke)
    finally:
        ng.stop()
    return out


def _revocation_through(app, port: int, ca_der: bytes, pair: tuple[int, bytes]) -> dict:
    """Revoke one served serial, then ask nginx (POST and GET) until both say revoked: every answer on the way
    must be correctly signed, for that serial, fresh, and good or revoked; the time must be within MAX_AGE."""
    serial, req = pair
    for q in (lambda: http_post(port, req), lambda: http_get(port, get_path(req))):
        st, body = q()
        if st != 200 or check_answer(body, ca_der, serial) is not None:
            raise common.BenchError(f"nginx: the answer for {serial:x} before revocation is wrong")
    app.cli("revoke", "--ca", CA, f"{serial:x}", "--reason", "keyCompromise")
    t0 = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - t0 < MAX_AGE + 30:  # bounded; the bound itself is checked below
        got = set()
        for q in (lambda: http_post(port, req), lambda: http_get(port, get_path(req))):
            st, body = q()
            why = check_answer(body, ca_der, serial) if st == 200 else f"HTTP {st}"
            if why is not None and why != "status REVOKED":
                raise common.BenchError(f"nginx served a wrong answer for {serial:x} after its revocation: {why}")
            got.add("revoked" if why else "good")
        seen.append("/".join(sorted(got)))
        if got == {"revoked"}:
            break
        time.sleep(0.1)
    took = time.monotonic() - t0
    if seen[-1] != "revoked":
        raise common.BenchError(f"the revocation of {serial:x} never showed through nginx: {seen[-5:]}")
    # The stated bound runs from the endpoint holding the new answer; from the revoke command, the re-sign
    # and the feed come first (1 s allowed for them).
    return {"seconds": took, "bound_seconds": MAX_AGE, "within_bound": took <= MAX_AGE + 1, "polls": len(seen)}


def _wait_cfssl_ok(cf: Cfssl, req: bytes, ca_der: bytes, serial: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if cf.proc.poll() is not None:
            raise common.BenchError(f"cfssl exited with {cf.proc.returncode}")
        try:
            st, body = http_post(cf.port, req, path="/")
            if st == 200 and check_answer(body, ca_der, serial) is None:
                return time.perf_counter()
            last = f"HTTP {st} {body[:40]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise common.BenchError(f"cfssl never answered correctly: {last}")


def table(res: dict) -> str:
    mb = 2 ** 20
    d, o, c = res["donjon"], res["openssl"], res["cfssl"]
    rows = [("Donjon POST", d["post"]), ("Donjon GET", d["get"]),
            ("nginx cache + Donjon POST", d["nginx"]["post"]), ("nginx cache + Donjon GET", d["nginx"]["get"]),
            ("openssl ocsp P-256 POST", o["p256"]["conns"]),
            ("openssl ocsp RSA-2048 POST", o["rsa2048"]["conns"]), ("cfssl ocspserve POST", c["post"])]
    lines = [f"OCSP serving, {res['certs']:,} certificates, {res['distinct_requests']:,} distinct requests rotated, "
             f"wrk {res['duration_s']:g} s per point (-t min(2,c)); req/s | p50 / p99 ms; errors = non-200 + "
             "non-successful + socket errors",
             f"{'server':<27} " + " | ".join(f"{'c=' + str(k):>6} {'req/s':>7} {'p50':>6} {'p99':>7} {'err':>4}" for k in CONNS),
             "-" * 140]
    for name, r in rows:
        cells = []
        for k in CONNS:
            x = r[str(k)]
            cells.append(f"{'':>6} {x['rps']:>7,.0f} {x['p50_us'] / 1000:>6.2f} {x['p99_us'] / 1000:>7.2f} {x['errors']:>4}")
        lines.append(f"{name:<27} " + " | ".join(cells))
    ra = res["ratios"]
    lines.append(f"One pair of points: Donjon/openssl(EC) req/s at 64: {ra['rps64_vs_openssl_ec']:.2f}x (the goal is judged on the alternated rounds); "
                 f"Donjon/openssl(RSA): {ra['rps64_vs_openssl_rsa']:.2f}x; Donjon/cfssl: {ra['rps64_vs_cfssl']:.2f}x "
                 f"(GET {ra['rps64_get_vs_cfssl']:.2f}x) (target >= 0.6x); Donjon p99 at 16: {ra['p99_16_ms']:.2f} ms "
                 f"(GET {ra['p99_16_get_ms']:.2f} ms) (target <= 10 ms)")
    al = d.get("alternated")
    if al:
        per = ", ".join(f"{p['ratio']:.2f}" for p in al["rounds"])
        lines.append(f"Endpoint alone vs openssl ocsp P-256, POST at {al['conns']} connections, {len(al['rounds'])} alternated rounds "
                     f"of {al['duration_s']:g} s each: median {al['median_ratio']:.2f}x (spread {al['min_ratio']:.2f}-"
                     f"{al['max_ratio']:.2f}x; rounds {per}) (target >= 2x); Donjon median {al['median_donjon']:,.0f} req/s, "
                     f"openssl median {al['median_openssl']:,.0f} req/s; machine ({al['cpus']} CPUs) during the points: "
                     f"load average {al['load1_min']:.1f}-{al['load1_max']:.1f}, CPUs {100 * al['busy_min']:.0f}-"
                     f"{100 * al['busy_max']:.0f}% busy")
    ng = d["nginx"]
    rv = ng["revocation"]
    lines.append(f"nginx cache + Donjon at 64: {ra['nginx_rps64_vs_cfssl']:.2f}x cfssl (GET {ra['nginx_get_rps64_vs_cfssl']:.2f}x), "
                 f"{ra['nginx_rps64_vs_openssl_ec']:.2f}x openssl(EC) (target >= 1x cfssl); every distinct request "
                 f"through nginx checked: {2 * len_pairs(res) - ng['warm_bad']}/{2 * len_pairs(res)} right; "
                 f"a revocation showed through nginx in {rv['seconds']:.1f} s after the revoke command (bound: ocsp.max-age = "
                 f"{rv['bound_seconds']} s once the endpoint holds the new answer, + 1 s allowed for the re-sign and feed), "
                 f"every answer on the way signed, fresh, good or revoked")
    samp = [("Donjon POST", d["sample_post"]), ("Donjon GET", d["sample_get"]),
            ("nginx POST", ng["sample_post"]), ("nginx GET", ng["sample_get"]), ("openssl P-256", o["p256"]["sample"]),
            ("openssl RSA", o["rsa2048"]["sample"]), ("cfssl", c["sample"])]
    lines.append("Answers checked (signature, serial, good): " + "; ".join(
        f"{k} {s['checked'] - s['bad']}/{s['checked']}" for k, s in samp) + "; openssl -respin: " +
        ("all OK" if all(s["openssl_respin"].startswith("Response verify OK") for _, s in samp) else
         "; ".join(f"{k}: {s['openssl_respin']}" for k, s in samp)))
    if "endpoint_cpu_seconds" in d:
        lines.append(f"Donjon endpoint process: {d['endpoint_cpu_seconds']:.1f} CPU s over {d['endpoint_wall_seconds']:.0f} s "
                     f"of load ({d.get('endpoint_cpu_us_per_request', 0):.0f} us a request); VmRSS {d['endpoint_rss']['rss'] / mb:.0f} MB holding {res['certs']:,} responses; "
                     f"responses produced (CIS-signed, fed) {d['produce_seconds']:.1f} s after start")
    s = res["startup"]
    lines.append("")
    lines.append(f"Start-up with {s['n']:,} pre-signed responses (spawn -> first correct answer; memory then)")
    lines.append(f"{'':<27} {'seconds':>8} {'VmHWM MB':>9} {'VmRSS MB':>9}")
    lines.append(f"{'Donjon endpoint role':<27} {s['donjon']['seconds']:>8.2f} {s['donjon']['hwm'] / mb:>9.0f} "
                 f"{s['donjon']['rss'] / mb:>9.0f}")
    lines.append(f"{'cfssl ocspserve':<27} {s['cfssl']['seconds']:>8.2f} {s['cfssl']['hwm'] / mb:>9.0f} {s['cfssl']['rss'] / mb:>9.0f}")
    lines.append(f"ratios donjon/cfssl: time {s['time_ratio']:.2f}x, memory {s['mem_ratio']:.2f}x; "
                 f"targets: <= 3 s and <= 500 MB; store {s['store_bytes'] / mb:.0f} MB on disk, "
                 f"cfssl file {s['responses_file_bytes'] / mb:.0f} MB")
    if "profile" in d and "self" in d["profile"]:
        lines.append("")
        lines.append(f"py-spy on the endpoint (POST, 64 connections, {d['profile']['samples']} samples), top self time:")
        lines += [f"  {pct:5.1f}%  {f}" for f, pct in d["profile"]["self"][:10]]
    return "\n".join(lines)


def len_pairs(res: dict) -> int:
    return res["distinct_requests"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 certificates, 200,000 for start-up")
    ap.add_argument("--certs", type=int)
    ap.add_argument("--big", type=int)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true", help="py-spy the endpoint during one more 64-connection run")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="alternated Donjon/openssl rounds at 64 connections (0: none)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--load", nargs=2, metavar=("HOME", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.load:
        print(json.dumps(_load_child(Path(a.load[0]), int(a.load[1]))))
        return 0
    n = a.certs or (10_000 if a.quick else 100_000)
    big = a.big or (200_000 if a.quick else 1_000_000)
    with common.temp_dir("donjon-bench-ocsp-", keep=a.keep) as work:
        res = run(work, n, big, a.duration, a.profile, a.rounds)
    print(table(res))
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

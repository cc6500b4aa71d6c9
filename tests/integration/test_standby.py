"""The standby CMDB (issue 15): kill -9 the primary during issuance, lose its disk, promote the standby:
every certificate a client received is there."""

from __future__ import annotations

import json
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from appliance.client import AdminClient, ClientError
from tests.conftest import make_csr


def test_kill_the_primary_during_issuance_and_promote_the_standby(appliance_factory, tmp_path):
    a = appliance_factory(start=False)
    with open(a.home / "donjon.toml", "a") as f:
        f.write("[cmdb]\nstandby = true\n")
    a.start()
    standby = a.home / "cmdb" / "standby" / "cmdb.sqlite"
    assert standby.exists() and b"SQLite format 3" not in standby.read_bytes()[:16]  # encrypted like the primary
    # (this appliance runs without dual control: a key backup, whose output rebuilds every key, is refused)
    r = a.cli("keys", "backup", "--out-dir", str(tmp_path / "keys"), "--so-pin-file", str(a.home / "softhsm" / "so-pin"),
              officer="admin", check=False)
    assert r.returncode == 1 and b"a key backup needs dual control" in r.stderr and not (tmp_path / "keys").exists()
    ders = [x509.load_pem_x509_csr(make_csr(tmp_path, f"s{i}", san=f"DNS:s{i}.example.org").read_bytes()).public_bytes(Encoding.DER)
            for i in range(16)]
    received: list[str] = []
    died: list[str] = []  # why the client stopped, for the assertion's message
    stop = threading.Event()

    def client() -> None:  # a client issuing one certificate per request, as fast as it is answered
        try:
            with AdminClient(str(a.home), timeout=30, session=a.session("oper")) as c:
                for der in ders:
                    if stop.is_set():
                        return
                    r = c.issue(ca="issuing", profile="tls-server", csrs=[der], validity_days=None)
                    received.extend(s for s in r.serials if s)  # acknowledged: the client holds it now
                    died.extend(res.error for res in r.results if res.error)
        except (ClientError, OSError) as e:
            died.append(str(e))
            return  # the appliance died under it

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 60
    while len(received) < 5 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    a.kill()  # kill -9, in the middle of the client's issuance
    stop.set()
    t.join(30)
    assert len(received) >= 5, died
    got = list(received)

    for suffix in ("", "-wal", "-shm"):  # the primary disk is lost
        (a.home / "cmdb" / f"cmdb.sqlite{suffix}").unlink(missing_ok=True)
    (a.home / "cmdb" / "cmdb.key").unlink()
    r = a.cli("standby", "promote", "--home", str(a.home), "--json", officer="admin")
    assert json.loads(r.stdout)["kept"].startswith("cmdb/pre-promote-")
    a.start()
    listed = json.loads(a.cli("cert", "list", "--ca", "issuing", "--json").stdout)
    serials = {c["serial"] for c in (listed["certs"] if isinstance(listed, dict) else listed)}
    assert set(got) <= serials, set(got) - serials
    assert b"audit chain intact" in a.cli("audit", "verify").stdout

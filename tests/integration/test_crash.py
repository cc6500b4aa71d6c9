"""Nothing is lost: kill -9 the whole appliance (supervisor and every role at once) again and again
during continuous issuance. Every certificate a client received must be in the CMDB afterwards, no
serial may ever be used twice, and the audit chain must still verify."""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pytest
from cryptography import x509

from appliance.client import AdminClient, ClientError
from appliance.factory.cmdb import serial_bytes
from appliance.ipc import schema as S
from tests.conftest import make_csr

CYCLES = 10  # in `just test`; `just torture` runs the same test body 1,000 times (DONJON_KILL_CYCLES)
TORTURE_CYCLES = int(os.environ.get("DONJON_KILL_CYCLES", "1000"))
CHECK_EVERY = 100  # the torture checks the CMDB and the audit chain every 100 cycles, not only at the end


def test_kill_9_during_issuance_loses_nothing(appliance, tmp_path):
    kill_9_cycles(appliance, tmp_path, CYCLES)


@pytest.mark.slow  # deselected by default (pyproject addopts): `just torture`
@pytest.mark.timeout(600 + 15 * TORTURE_CYCLES)  # a full restart takes seconds on a loaded 2-core machine
def test_kill_9_torture(appliance, tmp_path):
    kill_9_cycles(appliance, tmp_path, TORTURE_CYCLES)


def kill_9_cycles(a, tmp_path, cycles: int) -> None:
    csrs = [make_csr(tmp_path, f"c{i}", san=f"DNS:host{i}.example.org").read_bytes() for i in range(8)]
    from cryptography.hazmat.primitives.serialization import Encoding
    ders = [x509.load_pem_x509_csr(c).public_bytes(Encoding.DER) for c in csrs]
    received: dict[str, bytes] = {}
    rng = random.Random(1234)

    def issue_until_dead(stop: threading.Event, flowing: threading.Event) -> None:
        while not stop.is_set():
            try:
                with AdminClient(str(a.home), timeout=30, session=token) as c:
                    while not stop.is_set():
                        r = c.issue(ca="issuing", profile="tls-server", csrs=rng.sample(ders, 4))
                        for res, serial in zip(r.results, r.serials):
                            assert res.cert is not None, res.error
                            assert serial not in received, f"serial {serial} returned twice"
                            received[serial] = res.cert
                        flowing.set()
            except ClientError:
                return  # the appliance died under us

    for cycle in range(cycles):
        if cycle:
            a.start()
        if cycle and cycle % CHECK_EVERY == 0:  # a long torture run proves what it has done so far
            check_nothing_lost(a, received, rng)
            print(f"kill -9: {cycle} of {cycles} cycles, {len(received)} certificates returned, none lost",
                  file=sys.stderr, flush=True)
        token = a.session()  # sessions live in the Factory's memory: one per start
        stop, flowing = threading.Event(), threading.Event()
        t = threading.Thread(target=issue_until_dead, args=(stop, flowing))
        t.start()
        # Kill at a random moment once certificates are flowing (a slow, loaded machine must not turn
        # the cycle into a kill before the first request): the kill lands mid-issuance, not before it.
        flowing.wait(60)
        time.sleep(rng.uniform(0.0, 0.5))
        a.kill()
        stop.set()
        t.join(timeout=60)
        assert not t.is_alive()

    a.start()
    assert len(received) > cycles, "the load did not issue enough to mean anything"
    check_nothing_lost(a, received, rng)


def check_nothing_lost(a, received: dict[str, bytes], rng: random.Random) -> None:
    """Every certificate a client received is in the CMDB (a sample byte for byte) and the audit chain verifies."""
    from cryptography.hazmat.primitives.serialization import Encoding
    with AdminClient(str(a.home), session=a.session()) as c:
        stored = {x["serial"] for x in c.call(S.ACertList, ca="issuing", limit=10_000)["certs"]}
        missing = []
        for serial in set(received) - stored:  # beyond one list page (a long torture): one by one
            try:
                c.call(S.ACertShow, ca="issuing", serial=serial_bytes(int(serial, 16)))
            except ClientError:
                missing.append(serial)
        assert not missing, f"{len(missing)} returned certificates are not in the CMDB"
        for serial in rng.sample(sorted(received), min(40, len(received))):
            doc = c.call(S.ACertShow, ca="issuing", serial=serial_bytes(int(serial, 16)))
            assert x509.load_pem_x509_certificate(doc["pem"].encode()).public_bytes(Encoding.DER) == received[serial]
    r = a.cli("audit", "verify")
    assert b"audit chain intact" in r.stdout

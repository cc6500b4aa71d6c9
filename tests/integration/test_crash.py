"""Nothing is lost: kill -9 the whole appliance (supervisor and every role at once) again and again
during continuous issuance. Every certificate a client received must be in the CMDB afterwards, no
serial may ever be used twice, and the audit chain must still verify."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from cryptography import x509

from appliance.client import AdminClient, ClientError
from appliance.ipc import schema as S
from tests.conftest import make_csr

CYCLES = int(os.environ.get("DONJON_KILL_CYCLES", "100"))


@pytest.mark.timeout(1800)  # 100 full restarts: minutes on a quiet 2-core machine, more on a busy one
def test_kill_9_during_issuance_loses_nothing(appliance, tmp_path):
    csrs = [make_csr(tmp_path, f"c{i}", san=f"DNS:host{i}.example.org").read_bytes() for i in range(8)]
    from cryptography.hazmat.primitives.serialization import Encoding
    ders = [x509.load_pem_x509_csr(c).public_bytes(Encoding.DER) for c in csrs]
    received: dict[str, bytes] = {}
    rng = random.Random(1234)
    a = appliance

    def issue_until_dead(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with AdminClient(str(a.home), timeout=30, session=token) as c:
                    while not stop.is_set():
                        r = c.issue(ca="issuing", profile="tls-server", csrs=rng.sample(ders, 4))
                        for res, serial in zip(r.results, r.serials):
                            assert res.cert is not None, res.error
                            assert serial not in received, f"serial {serial} returned twice"
                            received[serial] = res.cert
            except ClientError:
                return  # the appliance died under us

    for cycle in range(CYCLES):
        if cycle:
            a.start()
        token = a.session()  # sessions live in the Factory's memory: one per start
        stop = threading.Event()
        t = threading.Thread(target=issue_until_dead, args=(stop,))
        t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        a.kill()
        stop.set()
        t.join(timeout=60)
        assert not t.is_alive()

    a.start()
    assert len(received) > CYCLES, "the load did not issue enough to mean anything"
    with AdminClient(str(a.home), session=a.session()) as c:
        stored = {x["serial"] for x in c.call(S.ACertList, ca="issuing", limit=100000)["certs"]}
        missing = set(received) - stored
        assert not missing, f"{len(missing)} returned certificates are not in the CMDB"
        for serial in rng.sample(sorted(received), min(40, len(received))):
            doc = c.call(S.ACertShow, ca="issuing", serial=int(serial, 16).to_bytes((int(serial, 16).bit_length() + 7) // 8, "big"))
            assert x509.load_pem_x509_certificate(doc["pem"].encode()).public_bytes(Encoding.DER) == received[serial]
    r = a.cli("audit", "verify")
    assert b"audit chain intact" in r.stdout

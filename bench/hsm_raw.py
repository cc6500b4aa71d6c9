"""Raw SoftHSM2 signing rate in one process (python-pkcs11 through hsm.token.Token): the ceiling for issuance.

    .venv/bin/python -m bench.hsm_raw --key-type rsa2048 --n 2000

RSA-2048: SHA256_RSA_PKCS over 32 bytes of data; P-256: raw ECDSA over a 32-byte digest (SoftHSM has no
ECDSA-SHA256). A fresh token in a temporary folder (own SOFTHSM2_CONF). The parent calls measure(), which
runs this module as a child process so that its PKCS#11 library state never mixes with another token's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time

from bench import common


def _child(key_type: str, n: int, max_seconds: float) -> dict:
    from pkcs11 import Mechanism

    from hsm.token import Token

    with common.temp_dir("donjon-bench-hsm-") as d, common.softhsm_token(d) as (label, pin):
        tok = Token(common.SOFTHSM_MODULE, label)
        tok.login(pin)
        tok.generate("k", key_type)
        key = tok.key("k")
        priv = key.private
        mech = Mechanism.SHA256_RSA_PKCS if key_type.startswith("rsa") else Mechanism.ECDSA
        data = hashlib.sha256(b"donjon bench").digest()
        for _ in range(20):  # warm-up
            priv.sign(data, mechanism=mech)
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + max_seconds
        for i in range(n):
            priv.sign(data, mechanism=mech)
            done += 1
            if (i & 63) == 0 and time.perf_counter() > deadline:
                break
        wall = time.perf_counter() - t0
    return {"key_type": key_type, "signatures": done, "seconds": wall, "rate": done / wall}


def measure(key_type: str, n: int, max_seconds: float = 30.0) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.hsm_raw", "--key-type", key_type, "--n", str(n),
                        "--max-seconds", str(max_seconds)], capture_output=True, text=True,
                       timeout=max_seconds + 120, cwd=common.REPO)
    if r.returncode != 0:
        raise common.BenchError(f"raw HSM child failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key-type", required=True, choices=["rsa2048", "p256"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    a = ap.parse_args(argv)
    print(json.dumps(_child(a.key_type, a.n, a.max_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

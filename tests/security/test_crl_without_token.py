"""`crl generate` while the CA token's folder is gone (issue 12 item 8): a clear refusal, audited,
no CRL number skipped, and the next CRL signs once the token is back."""

from __future__ import annotations

import json
import shutil
import time

from cryptography import x509


def test_crl_refused_without_the_token_folder_then_signed_with_the_next_number(appliance, tmp_path):
    a = appliance
    a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "first.crl"))
    first = x509.load_der_x509_crl((tmp_path / "first.crl").read_bytes()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    tokens = a.home / "softhsm" / "tokens"
    shutil.move(tokens, a.home / "tokens.away")
    try:
        r = a.cli("crl", "generate", "--ca", "issuing", check=False)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1, err
        assert f"the CIS refused to sign CRL #{first + 1} of issuing" in err and "internal error" not in err, err
    finally:
        shutil.move(a.home / "tokens.away", tokens)
    log = a.log.read_text()
    assert "Traceback" not in log and "UnboundLocalError" not in log
    # Back: the number the refusal did not use is the next CRL's (the reader's snapshot ended too).
    deadline = time.monotonic() + 60
    while True:
        r = a.cli("crl", "generate", "--ca", "issuing", "--out", str(tmp_path / "next.crl"), check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)  # the CIS re-initialises the library when it sees the token back
    assert r.returncode == 0, r.stderr.decode()
    crl = x509.load_der_x509_crl((tmp_path / "next.crl").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == first + 1
    records = [json.loads(ln) for ln in a.cli("audit", "export").stdout.decode().splitlines() if ln.strip()]
    refused = [r for r in records if r.get("action") == "crl" and r.get("outcome") == "refused"]
    assert refused and refused[-1]["object"] == f"issuing#{first + 1}" and "not used" in refused[-1]["detail"], refused

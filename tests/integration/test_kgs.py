"""The KGS (issue 18) on a running appliance: SoftHSM2 tokens as cards, judged by OpenSC pkcs11-tool, pdftotext and openssl."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Appliance, _variant, copy_home, make_ceremony, openssl

DATA = Path(__file__).resolve().parents[1] / "data" / "kgs"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
CARDS = int(os.environ.get("DONJON_KGS_CARDS", "5"))  # `just kgs-cards` runs 20
CONFIG = "[kgs]\nenabled = true\n[dual-control]\napprovals = 2\n"
OFFICERS = {"admin": "administrator", "oper": "operator", "oper2": "operator", "aud": "auditor"}


@pytest.fixture(scope="module")
def kgs(src_path, home_templates):
    """One appliance with the KGS for the module (its tests build on each other's batches, in order)."""
    base = Path(tempfile.mkdtemp(prefix="donjon-test-"))
    os.chmod(base, 0o711)
    ceremony = make_ceremony(base / "ceremony.toml")
    t = home_templates((*_variant(ceremony, CONFIG, OFFICERS, None, None), 0), ceremony, None, None, CONFIG, OFFICERS)
    a = Appliance(base / "kgs", src_path)
    copy_home(t.home, a.home)
    a.template, a.officers = t.home, dict(t.officers)
    (a.home / "card-profiles").mkdir()
    shutil.copy(DATA / "employee.toml", a.home / "card-profiles" / "employee.toml")
    try:
        a.start()
        a.chain = a.export("issuing", base / "chain.pem", chain=True)  # type: ignore[attr-defined]
        yield a
    finally:
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


def p11(a: Appliance, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """OpenSC's pkcs11-tool on the KGS's reader (SoftHSM2 tokens standing for cards)."""
    env = dict(os.environ, SOFTHSM2_CONF=str(a.home / "kgs-token" / "softhsm2.conf"))
    r = subprocess.run(["pkcs11-tool", "--module", MODULE, *args], env=env, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"pkcs11-tool {' '.join(args)}: {r.stdout}\n{r.stderr}")
    return r


def batch_csv(path: Path, prefix: str, n: int) -> Path:
    rows = ["id,CN,email,O,C,address"]
    rows += [f"{prefix}-{i:03d},Person {prefix} {i},p{i}@example.org,Example,FR,{i} rue de la Paix|75002 Paris" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def cards(a: Appliance, batch: str) -> list[dict]:
    return json.loads(a.cli("kgs", "cards", "--batch", batch, "--json").stdout)["cards"]


def letters(a: Appliance, batch: str, out: Path) -> dict[int, str]:
    """The PIN of each card, read back from its letter with pdftotext."""
    a.cli("kgs", "letters", "--batch", batch, "--out", str(out))
    pins = {}
    for pdf in sorted(out.glob("card-*.pdf")):
        text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"PIN: (\d+)", text)
        assert m, text
        pins[int(pdf.stem.split("-")[1])] = m.group(1)
    return pins


def check_card(a: Appliance, label: str, pin: str, tmp: Path) -> None:
    """pkcs11-tool logs in with the letter's PIN and lists three keys and three certificates, each
    certificate verifies with openssl against the CA chain."""
    r = p11(a, "--token-label", label, "--login", "--pin", pin, "--list-objects")
    out = r.stdout
    assert out.count("Private Key Object") == 3 and out.count("Certificate Object") == 3, out
    for ident, slot in (("01", "auth"), ("02", "sign"), ("03", "enc")):
        der = tmp / f"{label}-{slot}.der"
        p11(a, "--token-label", label, "--read-object", "--type", "cert", "--id", ident, "--output-file", str(der))
        v = openssl("verify", "-CAfile", str(a.chain), str(der), check=False)  # type: ignore[attr-defined]
        pem = tmp / f"{label}-{slot}.pem"
        openssl("x509", "-inform", "DER", "-in", str(der), "-out", str(pem))
        v = openssl("verify", "-CAfile", str(a.chain), str(pem))  # type: ignore[attr-defined]
        assert b": OK" in v.stdout
    bad = p11(a, "--token-label", label, "--login", "--pin", "000000" if pin != "000000" else "111111", "--list-objects", check=False)
    assert bad.returncode != 0


def test_personalise_a_batch(kgs, tmp_path):
    a = kgs
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(batch_csv(tmp_path / "b1.csv", "b1", CARDS)))
    assert f"{CARDS} of {CARDS} card(s) done, 0 failed" in r.stdout.decode(), r.stdout
    recs = cards(a, "b1")
    assert len(recs) == CARDS and all(c["state"] == "done" and c["letter"] == "produced" and len(c["certs"]) == 3 for c in recs)
    pins = letters(a, "b1", tmp_path / "letters")
    assert sorted(pins) == sorted(c["card"] for c in recs)
    for c in recs:
        check_card(a, c["label"], pins[c["card"]], tmp_path)
    assert all(c["letter"] == "printed" for c in cards(a, "b1"))
    # letters leave the spool once
    assert "no letters waiting" in a.cli("kgs", "letters", "--batch", "b1", "--out", str(tmp_path / "again")).stdout.decode()
    # a rerun of a finished batch personalises nothing twice
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(tmp_path / "b1.csv"))
    assert f"{CARDS} of {CARDS} card(s) done" in r.stdout.decode()
    assert [(c["card"], c["token_serial"], c["attempts"]) for c in cards(a, "b1")] == [(c["card"], c["token_serial"], 1) for c in recs]
    labels = re.findall(r"token label\s*:\s*(\S+)", p11(a, "--list-token-slots").stdout)
    assert sorted(x for x in labels if x.startswith("EMP-b1-")) == sorted(c["label"] for c in recs)

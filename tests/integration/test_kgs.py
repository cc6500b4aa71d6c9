"""The KGS (issue 18) on a running appliance: SoftHSM2 tokens as cards, judged by OpenSC pkcs11-tool, pdftotext and openssl."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Appliance, openssl

DATA = Path(__file__).resolve().parents[1] / "data" / "kgs"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
CARDS = int(os.environ.get("DONJON_KGS_CARDS", "5"))  # `just kgs-cards` runs 20
# Dual control for key recovery only (officer changes stay single-handed, so the module adds oper2 itself).
CONFIG = '[kgs]\nenabled = true\n[dual-control]\napprovals = 2\noperations = ["key-recovery"]\n'


@pytest.fixture(scope="module")
def kgs(module_appliance_factory, tmp_path_factory):
    """One appliance with the KGS for the module (its tests build on each other's batches, in order),
    copied from the default template other modules share (no init of its own)."""
    a = module_appliance_factory(start=False)
    with open(a.home / "donjon.toml", "a") as f:
        f.write(CONFIG)
    (a.home / "card-profiles").mkdir()
    shutil.copy(DATA / "employee.toml", a.home / "card-profiles" / "employee.toml")
    a.start()
    a.cli("officer", "add", "oper2", "--role", "operator")
    a.officers["oper2"] = "operator"
    a.chain = a.export("issuing", tmp_path_factory.mktemp("kgs") / "chain.pem", chain=True)  # type: ignore[attr-defined]
    return a


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


def check_card(a: Appliance, label: str, pin: str, tmp: Path, wrong_pin: bool = False) -> None:
    """pkcs11-tool logs in with the letter's PIN and lists three keys and three certificates; each
    certificate read back from the card verifies with openssl against the CA chain."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    out = p11(a, "--token-label", label, "--login", "--pin", pin, "--list-objects").stdout
    assert out.count("Private Key Object") == 3 and out.count("Certificate Object") == 3, out
    pems = []
    for ident, slot in (("01", "auth"), ("02", "sign"), ("03", "enc")):
        der = tmp / f"{label}-{slot}.der"
        p11(a, "--token-label", label, "--read-object", "--type", "cert", "--id", ident, "--output-file", str(der))
        pems.append(tmp / f"{label}-{slot}.pem")
        pems[-1].write_bytes(x509.load_der_x509_certificate(der.read_bytes()).public_bytes(Encoding.PEM))
    v = openssl("verify", "-CAfile", str(a.chain), *map(str, pems))  # type: ignore[attr-defined]
    assert v.stdout.count(b": OK") == 3, v.stdout
    if wrong_pin:
        assert p11(a, "--token-label", label, "--login", "--pin", "999999" if pin != "999999" else "111111",
                   "--list-objects", check=False).returncode != 0


def test_personalise_a_batch(kgs, tmp_path):
    a = kgs
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(batch_csv(tmp_path / "b1.csv", "b1", CARDS)))
    assert f"{CARDS} of {CARDS} card(s) done, 0 failed" in r.stdout.decode(), r.stdout
    recs = cards(a, "b1")
    assert len(recs) == CARDS and all(c["state"] == "done" and c["letter"] == "produced" and len(c["certs"]) == 3 for c in recs)
    pins = letters(a, "b1", tmp_path / "letters")
    assert sorted(pins) == sorted(c["card"] for c in recs)
    for i, c in enumerate(recs):
        check_card(a, c["label"], pins[c["card"]], tmp_path, wrong_pin=i == 0)
    assert all(c["letter"] == "printed" for c in cards(a, "b1"))
    # letters leave the spool once
    assert "no letters waiting" in a.cli("kgs", "letters", "--batch", "b1", "--out", str(tmp_path / "again")).stdout.decode()
    # a rerun of a finished batch personalises nothing twice
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(tmp_path / "b1.csv"))
    assert f"{CARDS} of {CARDS} card(s) done" in r.stdout.decode()
    assert [(c["card"], c["token_serial"], c["attempts"]) for c in cards(a, "b1")] == [(c["card"], c["token_serial"], 1) for c in recs]
    labels = re.findall(r"token label\s*:\s*(\S+)", p11(a, "--list-token-slots").stdout)
    assert sorted(x for x in labels if x.startswith("EMP-b1-")) == sorted(c["label"] for c in recs)


def test_pin_letter_reprint_and_hand_over(kgs, tmp_path):
    """A reprint sets a new PIN with the PUK (the old one stops working) and spools a new letter;
    hand-over status only moves forward."""
    a = kgs
    c = cards(a, "b1")[0]
    old = letters(a, "b1", tmp_path / "none")  # already taken in the first test: nothing to read back
    assert old == {}
    r = a.cli("kgs", "letter", str(c["card"]), "--status", "acknowledged")
    assert b"letter acknowledged" in r.stdout
    r = a.cli("kgs", "letter", str(c["card"]), "--status", "sent", check=False)
    assert r.returncode == 1 and b"cannot become sent" in r.stderr and b"Traceback" not in r.stderr
    a.cli("kgs", "reprint", str(c["card"]))
    pins = letters(a, "reprint", tmp_path / "reprint")
    assert list(pins) == [c["card"]]
    text = subprocess.run(["pdftotext", str(tmp_path / "reprint" / f"card-{c['card']}.pdf"), "-"], capture_output=True, text=True).stdout
    assert "new PIN" in text and c["label"] in text
    check_card(a, c["label"], pins[c["card"]], tmp_path)
    assert [x["letter"] for x in cards(a, "b1") if x["card"] == c["card"]] == ["printed"]


def enc_cert_pem(a: Appliance, label: str, tmp: Path) -> Path:
    der = tmp / f"{label}-enc.der"
    p11(a, "--token-label", label, "--read-object", "--type", "cert", "--id", "03", "--output-file", str(der))
    pem = tmp / f"{label}-enc.pem"
    openssl("x509", "-inform", "DER", "-in", str(der), "-out", str(pem))
    return pem


def test_recovery_under_dual_control(kgs, tmp_path):
    """The archived encryption key comes back, under dual control, as a PKCS#12 that openssl opens with
    the one-time password; mail encrypted to the card's certificate decrypts with it. One officer alone
    gets nothing, a recovery is taken once, and the audit names both officers."""
    a = kgs
    c = cards(a, "b1")[1]
    cert = enc_cert_pem(a, c["label"], tmp_path)
    r = a.cli("kgs", "recover", str(c["card"]), "--reason", "card lost, read the mail archive", officer="oper")
    m = re.search(rb"request #(\d+) \(key-recovery\) is pending", r.stdout)
    assert m, r.stdout
    req = m.group(1).decode()
    r = a.cli("approve", req, officer="oper", check=False)  # a single officer is refused
    assert r.returncode == 1 and b"another officer must" in r.stderr
    r = a.cli("approve", req, "--json", officer="oper2")
    doc = json.loads(r.stdout)
    assert doc["executed"] and sorted(doc["result"]["approvers"]) == ["oper", "oper2"]
    rec = str(doc["result"]["recovery"])
    r = a.cli("kgs", "recover-take", rec, "--out", str(tmp_path / "x.p12"), officer="admin", check=False)
    assert r.returncode == 1 and b"Traceback" not in r.stderr  # the administrator approves no recovery
    r = a.cli("kgs", "recover-take", rec, "--out", str(tmp_path / "k.p12"), officer="oper2")
    password = re.search(rb"one-time password \(shown once\): (\S+)", r.stdout).group(1).decode()
    key = tmp_path / "k.pem"
    openssl("pkcs12", "-in", str(tmp_path / "k.p12"), "-passin", f"pass:{password}", "-nodes", "-nocerts", "-out", str(key))
    assert openssl("pkcs12", "-in", str(tmp_path / "k.p12"), "-passin", "pass:wrong", "-nodes", check=False).returncode != 0
    (tmp_path / "mail.txt").write_text("the quarterly figures\n")
    openssl("cms", "-encrypt", "-binary", "-aes256", "-in", str(tmp_path / "mail.txt"), "-out", str(tmp_path / "mail.cms"), str(cert))
    out = openssl("cms", "-decrypt", "-in", str(tmp_path / "mail.cms"), "-inkey", str(key))
    assert out.stdout == b"the quarterly figures\n"
    r = a.cli("kgs", "recover-take", rec, "--out", str(tmp_path / "again.p12"), officer="oper", check=False)
    assert r.returncode == 1 and b"taken already" in r.stderr and not (tmp_path / "again.p12").exists()
    recs = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"kgs-recover' in x]
    assert any(x["action"] == "kgs-recover" and x["outcome"] == "approved" and "oper, oper2" in x["detail"] for x in recs), recs
    assert any(x["action"] == "kgs-recover-take" and x["outcome"] == "ok" and "to oper2" in x["detail"] for x in recs), recs
    assert any(x["action"] == "kgs-recover-take" and x["outcome"] == "refused" for x in recs)


def test_bad_batches_and_profiles_are_refused_whole(kgs, tmp_path):
    a = kgs
    bad = tmp_path / "bad.csv"
    bad.write_text("id,CN,phone\nx-1,Alice,555\n")
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(bad), check=False)
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and b"phone" in r.stderr and b"Traceback" not in r.stderr
    good = batch_csv(tmp_path / "g.csv", "g", 1)
    r = a.cli("kgs", "personalise", "--card-profile", "nope", "--batch", str(good), check=False)
    assert r.returncode == 1 and b"unknown card profile 'nope' (known: employee)" in r.stderr
    # a client that skips the CLI's checks gets the KGS's typed refusal; nothing is recorded
    from appliance.client import AdminClient, ClientError
    from appliance.ipc import schema as S
    with AdminClient(str(a.home), session=a.session("oper")) as c:
        with pytest.raises(ClientError) as e:
            c.call(S.AKgsPersonalise, profile="employee", batch="bad", data=b'[{"id": "x", "CN": 5}]')
        assert "subject 1: CN" in str(e.value)
    assert cards(a, "bad") == [] and cards(a, "g") == []
    recs = [json.loads(x) for x in a.cli("audit", "export").stdout.splitlines() if b'"kgs-personalise"' in x]
    assert sum(1 for x in recs if x["outcome"] == "refused") >= 2


def _kgs_user(a: Appliance) -> list[str]:
    st = (a.home / "kgs-token").stat()
    return ["runuser", "-u", __import__("pwd").getpwuid(st.st_uid).pw_name, "--"] if os.geteuid() == 0 and st.st_uid != 0 else []


def test_kill9_mid_batch_a_foreign_card_and_a_card_pulled_out(kgs, tmp_path):
    """kill -9 of the whole appliance in the middle of a batch, a card that is someone else's, a card
    pulled from the reader half-made: each a clear error and a consistent record; reruns finish the
    batch with no card personalised twice and none forgotten."""
    from appliance.client import AdminClient
    from appliance.ipc import schema as S
    a = kgs
    n = 3
    b = batch_csv(tmp_path / "k.csv", "k", n)
    conf = str(a.home / "kgs-token" / "softhsm2.conf")
    env = dict(os.environ, SOFTHSM2_CONF=conf)
    # the card in the reader for k-001 is someone else's (initialised with an SO PIN the KGS does not know)
    subprocess.run([*_kgs_user(a), "softhsm2-util", "--init-token", "--free", "--label", "EMP-k-001", "--so-pin", "99999999",
                    "--pin", "9999"], env=env, check=True, capture_output=True, cwd="/")
    a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(b), "--no-wait")
    deadline = time.monotonic() + 120
    with AdminClient(str(a.home), session=a.session("oper")) as c:
        while time.monotonic() < deadline:  # kill once a card is done and a later one is half-made
            states = [x["state"] for x in c.call(S.AKgsCards, batch="k")["cards"]]
            if "done" in states and states[-1] in ("keys", "certs") and len(states) >= 3:
                break
            time.sleep(0.01)
    a.kill()
    a.start()
    recs = cards(a, "k")
    half = [x for x in recs if x["state"] not in ("done", "failed")]
    assert len(half) == 1 and half[0]["token_serial"], recs
    # that card is pulled out of the reader while the appliance was down (its token storage is gone)
    serial = half[0]["token_serial"].lower()
    gone = [d for d in (a.home / "kgs-token" / "tokens").iterdir() if d.name.replace("-", "").endswith(serial)]
    assert len(gone) == 1
    shutil.rmtree(gone[0])
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(b), check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert "EMP-k-001" in err and "not blank" in err and half[0]["label"] in err and "not in the readers" in err, err
    recs = cards(a, "k")
    assert [x["state"] for x in recs].count("done") == n - 2 and len(recs) == n
    failed = {x["subject_id"]: x for x in recs if x["state"] == "failed"}
    assert sorted(failed) == sorted(["k-001", half[0]["subject_id"]])
    assert failed["k-001"]["certs"] == [] and "not blank" in failed["k-001"]["error"]
    # the foreign card leaves the reader; the rerun makes both on blank cards
    subprocess.run([*_kgs_user(a), "softhsm2-util", "--delete-token", "--token", "EMP-k-001"], env=env,
                   check=True, capture_output=True, cwd="/")
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(b))
    assert f"{n} of {n} card(s) done, 0 failed" in r.stdout.decode()
    recs = cards(a, "k")
    assert len(recs) == n and all(x["state"] == "done" for x in recs)
    assert sorted(x["subject_id"] for x in recs if x["attempts"] > 1) == sorted(failed)  # only they began again
    labels = re.findall(r"token label\s*:\s*(\S+)", p11(a, "--list-token-slots").stdout)
    assert sorted(x for x in labels if x.startswith("EMP-k-")) == sorted(x["label"] for x in recs)  # none twice
    pins = letters(a, "k", tmp_path / "letters")
    assert sorted(pins) == sorted(x["card"] for x in recs)  # none forgotten
    for x in recs:
        out = p11(a, "--token-label", x["label"], "--login", "--pin", pins[x["card"]], "--list-objects").stdout
        assert out.count("Private Key Object") == 3 and out.count("Certificate Object") == 3


def test_the_kgs_dying_is_not_the_factorys(kgs, tmp_path):
    """A KGS killed (or compromised and exiting) is restarted by the supervisor; the Factory and the
    admin socket serve on, and the next batch works over the new link."""
    import signal
    a = kgs
    old = a.role_pids()["kgs"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and a.role_pids().get("kgs") in (None, old):
        time.sleep(0.1)
    assert a.role_pids().get("kgs") not in (None, old)
    assert a.proc.poll() is None and b'"activated": true' in a.cli("status", "--json").stdout
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(batch_csv(tmp_path / "z.csv", "z", 1)))
    assert "1 of 1 card(s) done" in r.stdout.decode()


def test_console_cards_item(kgs, tmp_path):
    """The console face (the real menu code on a line terminal): a batch file from the media, its
    progress, then its PIN letters written to the media."""
    import io

    from appliance.console.menu import Console
    from appliance.console.session import Session
    from appliance.console.term import Term
    a = kgs
    media = a.home / "media"
    media.mkdir(exist_ok=True)
    batch_csv(media / "con.csv", "con", 1)
    out = io.StringIO()
    con = Console(str(a.home), Term(io.StringIO("1\ncon.csv\nemployee\n3\ncon\n"), out))
    con.s = Session(str(a.home), "oper", token=a.session("oper"))
    try:
        con.cards()  # 1: personalise con.csv with the card profile employee
        con.cards()  # 3: the letters of batch con to the media
    finally:
        con.s.reset()
    text = out.getvalue()
    assert "batch con: 1 subject(s) sent to the KGS" in text and "1 done, 0 failed of 1" in text, text
    assert "1 PIN letter(s) -> media" in text and len(list(media.glob("con-card-*.pdf"))) == 1, text
    assert [c["state"] for c in cards(a, "con")] == ["done"]


@pytest.mark.slow
def test_personalise_twenty_cards(kgs, tmp_path):
    """The issue's batch of 20 three-slot cards (`just kgs-cards`; `just test` runs 5 above), each
    judged by pkcs11-tool, its letter and openssl verify."""
    a = kgs
    r = a.cli("kgs", "personalise", "--card-profile", "employee", "--batch", str(batch_csv(tmp_path / "t20.csv", "t20", 20)), timeout=1800)
    assert "20 of 20 card(s) done, 0 failed" in r.stdout.decode(), r.stdout
    recs = cards(a, "t20")
    pins = letters(a, "t20", tmp_path / "letters")
    assert len(recs) == 20 and sorted(pins) == sorted(c["card"] for c in recs)
    for i, c in enumerate(recs):
        check_card(a, c["label"], pins[c["card"]], tmp_path, wrong_pin=i == 0)

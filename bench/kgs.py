"""Card personalisation through the KGS: cards per minute for a batch, three slots per card, keys made
on the card against the encryption key made in the HSM (archived, then injected), beside the raw
PKCS#11 work of a card done with softhsm2-util and OpenSC's pkcs11-tool (no CA, no records, no letters).

    .venv/bin/python -m bench.kgs --cards 20

Rate = cards / (time from the personalise request until the batch's last card is `done`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from bench import common

SLOTS = """
[[slot]]
name = "auth"
key_type = "p256"
generated = "card"
profile = "user-auth"

[[slot]]
name = "sign"
key_type = "p256"
generated = "card"
profile = "user-sign"

[[slot]]
name = "enc"
key_type = "rsa2048"
generated = "{enc}"
profile = "user-enc"
"""
HEAD = 'ca = "issuing"\nlabel = "{prefix}-{{id}}"\n[pin]\nlength = 6\n[puk]\nlength = 8\n'


def _batch(path: Path, prefix: str, n: int) -> Path:
    path.write_text("id,CN,email\n" + "".join(f"{prefix}{i},Person {i},p{i}@example.org\n" for i in range(n)))
    return path


def _personalise(home: Path, profile: str, batch: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(common.donjon_argv("kgs", "personalise", "--card-profile", profile, "--batch", str(batch), "--home", str(home)),
                       capture_output=True, text=True, timeout=3600, cwd=common.REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise common.BenchError(f"kgs personalise failed: {r.stdout}{r.stderr}")
    return wall


def _raw_peer(work: Path, n: int) -> float:
    """The same PKCS#11 work per card with the stock tools: init a token, set the user PIN, three key pairs."""
    d = work / "raw-cards"
    (d / "tokens").mkdir(parents=True)
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    mod = common.SOFTHSM_MODULE
    t0 = time.perf_counter()
    for i in range(n):
        label = f"RAW-{i}"
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "12345678", "--pin", "123456"],
                       env=env, check=True, capture_output=True, timeout=60)
        for ident, kt in (("01", "EC:prime256v1"), ("02", "EC:prime256v1"), ("03", "rsa:2048")):
            subprocess.run(["pkcs11-tool", "--module", mod, "--token-label", label, "--login", "--pin", "123456",
                            "--keypairgen", "--key-type", kt, "--id", ident], env=env, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - t0


def run(work: Path, cards: int) -> dict:
    home = work / "kgs-home"
    home.mkdir(mode=0o755)
    common.init_home(home, [("issuing", "p256")], nolint_profile=False)
    (home / "donjon.toml").write_text('[ocsp]\nlisten = "127.0.0.1:0"\n[kgs]\nenabled = true\n')
    prof = home / "card-profiles"
    prof.mkdir()
    (prof / "on-card.toml").write_text(HEAD.format(prefix="C") + SLOTS.format(enc="card"))
    (prof / "hsm-enc.toml").write_text(HEAD.format(prefix="H") + SLOTS.format(enc="hsm"))
    app = common.Appliance(home)
    res: dict = {"cards": cards}
    try:
        app.start()
        for name, prefix in (("on-card", "c"), ("hsm-enc", "h")):
            common.log(f"kgs: {cards} cards, profile {name}")
            wall = _personalise(home, name, _batch(work / f"{name}.csv", prefix, cards))
            res[name] = {"seconds": wall, "cards_per_minute": 60 * cards / wall}
    finally:
        app.stop()
    common.log(f"kgs: raw peer, {cards} tokens with softhsm2-util + pkcs11-tool")
    raw = _raw_peer(work, cards)
    res["raw_pkcs11_tools"] = {"seconds": raw, "cards_per_minute": 60 * cards / raw}
    res["ratio_hsm_vs_card"] = res["hsm-enc"]["cards_per_minute"] / res["on-card"]["cards_per_minute"]
    res["ratio_on_card_vs_raw"] = res["on-card"]["cards_per_minute"] / res["raw_pkcs11_tools"]["cards_per_minute"]
    return res


def table(r: dict) -> str:
    rows = [f"KGS personalisation, {r['cards']} cards of three slots (auth P-256, sign P-256, enc RSA-2048)",
            f"{'':44} {'seconds':>8} {'cards/min':>10}"]
    for key, what in (("on-card", "Donjon, every key made on the card"), ("hsm-enc", "Donjon, enc key in the HSM, archived, injected"),
                      ("raw_pkcs11_tools", "peer: softhsm2-util + pkcs11-tool, keys only")):
        rows.append(f"{what:44} {r[key]['seconds']:8.1f} {r[key]['cards_per_minute']:10.1f}")
    rows.append(f"HSM-made encryption key vs all on card: {common.fmt_ratio(r['ratio_hsm_vs_card'])}; "
                f"Donjon (on card, with certificates, records and letters) vs raw keys only: {common.fmt_ratio(r['ratio_on_card_vs_raw'])}")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cards", type=int, default=20)
    a = ap.parse_args()
    with common.temp_dir("donjon-bench-") as w:
        out = run(w, a.cards)
    print(table(out))
    print(json.dumps(out, indent=2))

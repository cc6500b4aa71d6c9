"""Live-signed OCSP answers never say "as of T, revoked after T" (issue 11 item 6), with a real
SoftHSM2 token as the endpoint's, and the producer's thisUpdate grouping for pre-produced ones."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.factory.ocsp import _by_this_update
from appliance.ocsp.live import LiveSigner, Single
from hsm.token import Token
from policy.ocsp import issuer_hashes
from tests.conftest import softhsm_reload
from tests.unit.test_ocsp_pki import make_ca

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
UTC = dt.timezone.utc


def _token(tmp_path, monkeypatch) -> Token:
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    pin = secrets.token_hex(8)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "live-test", "--so-pin", secrets.token_hex(8),
                    "--pin", pin], check=True, capture_output=True, timeout=30)
    softhsm_reload(MODULE)
    t = Token(MODULE, "live-test")
    t.login(pin)
    return t


def test_live_answer_moves_this_update_up_to_a_later_revocation(tmp_path, monkeypatch):
    ca = make_ca("tenant")
    live = LiveSigner(_token(tmp_path, monkeypatch), str(tmp_path / "store"))
    label, spki = live.generate("tenant/partner")
    label2, _ = live.generate("tenant/partner")
    assert label != label2  # two keys in one second get two labels (an officer's and a renewal's)
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "responder")]))
            .issuer_name(ca.cert.subject).public_key(serialization.load_der_public_key(spki))
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    live.install_tenant("tenant/partner", label, cert.public_bytes(serialization.Encoding.DER), ca.cert)
    nh, kh = issuer_hashes(ca.der)["sha1"]
    crl_this_update = int(now.timestamp()) - 3600
    revoked_at = crl_this_update + 600  # a CRL entry dated after the CRL's own thisUpdate
    singles = [Single("sha1", nh, kh, 7, "revoked", crl_this_update, crl_this_update + 86400,
                      dt.datetime.fromtimestamp(revoked_at, UTC), "key_compromise"),
               Single("sha1", nh, kh, 8, "good", crl_this_update, crl_this_update + 86400)]
    der = live.sign("tenant/partner", singles, b"nonce-123", int(now.timestamp()))
    resp = ocsp.load_der_ocsp_response(der)
    got = {r.serial_number: r for r in resp.responses}
    assert got[7].revocation_time_utc == dt.datetime.fromtimestamp(revoked_at, UTC)
    assert got[7].this_update_utc >= got[7].revocation_time_utc
    assert int(got[8].this_update_utc.timestamp()) == crl_this_update  # a good answer keeps the CRL's time


def test_pre_produced_groups_never_date_a_response_before_its_floor():
    backdated = 1_000_000
    items = [(b"\x01", 0, None, None), (b"\x02", 1, 999_000, 1), (b"\x03", 1, 1_000_030, 6), (b"\x04", 0, None, None),
             (b"\x05", 1, 1_000_010, 1)]
    # \x03 and \x05: revoked after the backdated time; \x04: released, held response dated 1_000_020.
    floors = {b"\x01": 0, b"\x02": 999_000, b"\x03": 1_000_030, b"\x04": 1_000_021, b"\x05": 1_000_010}
    groups = _by_this_update(items, backdated, floors)
    assert len(groups) == 2 and sorted(i for _, batch in groups for i in batch) == sorted(items)
    for this_update, batch in groups:
        assert all(this_update >= floors[it[0]] for it in batch)
        assert all(this_update >= it[2] for it in batch if it[1] == 1)
    assert groups[0] == (backdated, [items[0], items[1]])

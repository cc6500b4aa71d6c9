"""The CIS's side of pre-encoded CRL entries (issue 19), on a real SoftHSM2 token with the real CIS code: it
signs a TBS it assembles itself around a buffer it checked strictly (the same TBS the encoder makes from the
same entries), and refuses what a compromised Factory might send instead: another structure, a lying count,
serials out of order across pages, an entry outside the shard, more than declared, encoded entries on an
issued-serials or a delta stream."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from appliance.ipc import schema as S
from hsm.cis import Cis
from hsm.token import Token, make_private_key
from policy import crl as C
from policy import lint
from policy.errors import PolicyError
from tests.conftest import softhsm_reload

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
BASE = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def cis(tmp_path_factory):
    # one token per module: python-pkcs11 initialises SoftHSM once per process (a second login fails)
    tmp = tmp_path_factory.mktemp("cis-token")
    mp = pytest.MonkeyPatch()
    (tmp / "tokens").mkdir()
    (tmp / "softhsm2.conf").write_text(f"directories.tokendir = {tmp}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    mp.setenv("SOFTHSM2_CONF", str(tmp / "softhsm2.conf"))
    pin = secrets.token_hex(8)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "cis-crl", "--so-pin", secrets.token_hex(8),
                    "--pin", pin], check=True, capture_output=True, timeout=30)
    softhsm_reload(MODULE)
    t = Token(MODULE, "cis-crl")
    t.login(pin)
    t.generate("issuing", "p256")
    key = t.key("issuing")
    pub = serialization.load_der_public_key(key.spki)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CIS CRL test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub).serial_number(7)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(make_private_key(t, key), hashes.SHA256()))
    t.store_certificate("issuing", cert.public_bytes(serialization.Encoding.DER), name.public_bytes())
    c = Cis(S.CisConfig(module=MODULE, token_label="cis-crl", softhsm_conf=None, profiles={}, base_url=BASE,
                        crl_shards={"issuing": 4}, crl_delta=("issuing",)))
    c.token = t
    yield c, cert
    mp.undo()


def _entries(n: int, start: int = 1 << 70) -> list[C.Entry]:
    return [(start + 4 * i, 1767225600 + i, (None, 1, 4, 6)[i % 4], None if i % 3 else 1767000000) for i in range(n)]


def _begin(cis: Cis, mid: int, ents: list[C.Entry], number: int = 5, **kw) -> bytes:
    now = 1767225600
    m = S.CrlBegin(id=mid, ca="issuing", crl_number=number, this_update=now, next_update=now + 86400,
                   entry_count=len(ents), entries_length=sum(C.entry_length(*e) for e in ents), **kw)
    return cis.crl_begin(m)


def test_signs_the_tbs_it_assembles_around_checked_entries(cis):
    c, cert = cis
    ents = _entries(300)
    buf = C.encode_entries(ents)
    header = _begin(c, 1, ents, shard=0)
    half = len(C.encode_entries(ents[:120]))
    assert c.crl_entries_der(S.CrlEntriesDer(id=1, data=buf[:half], count=120)) is None  # nothing echoed back
    c.crl_entries_der(S.CrlEntriesDer(id=1, data=buf[half:], count=180))
    trailer, signed = c.crl_end(S.CrlEnd(id=1))
    der = signed.prefix + header + buf + trailer + signed.suffix
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(cert.public_key()) and len(list(crl)) == 300 and lint.lint_crl(der) == []
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value.full_name
    assert idp == [x509.UniformResourceIdentifier(f"{BASE}/crl/issuing-0.crl")]  # the CIS names the shard itself
    # the same CRL through the entry-by-entry path: the same TBS, byte for byte
    header2 = _begin(c, 2, ents, shard=0)
    body = c.crl_entries(S.CrlEntries(id=2, entries=[(s.to_bytes((s.bit_length() + 7) // 8, "big"), t, r, i) for s, t, r, i in ents]))
    trailer2, _ = c.crl_end(S.CrlEnd(id=2))
    assert header2 + body + trailer2 == header + buf + trailer == crl.tbs_certlist_bytes


@pytest.mark.parametrize("why,send", [
    ("a certificate, not entries", lambda c, b: c.crl_entries_der(S.CrlEntriesDer(id=9, data=bytes.fromhex("3082010a") + b, count=3))),
    ("a count that lies", lambda c, b: c.crl_entries_der(S.CrlEntriesDer(id=9, data=b, count=2))),
    ("one octet changed in a length", lambda c, b: c.crl_entries_der(S.CrlEntriesDer(id=9, data=b[:1] + bytes((b[1] + 1,)) + b[2:], count=3))),
    ("serials going back across pages", lambda c, b: [c.crl_entries_der(S.CrlEntriesDer(id=9, data=b, count=3)),
                                                      c.crl_entries_der(S.CrlEntriesDer(id=9, data=b, count=3))]),
])
def test_refuses_what_a_compromised_factory_might_send(cis, why, send):
    c, _ = cis
    ents = _entries(6, start=1 << 71)  # declared for two pages of 3
    b = C.encode_entries(ents[:3])
    _begin(c, 9, ents, shard=0)
    with pytest.raises(PolicyError):
        send(c, b)
    c._crls.pop(9, None)  # the serve loop drops a refused stream


def test_refuses_entries_outside_the_shard_beyond_the_declaration_or_on_other_streams(cis):
    c, _ = cis
    ents = _entries(3, start=(1 << 71) + 1)  # serial mod 4 == 1: shard 1's
    b = C.encode_entries(ents)
    _begin(c, 10, ents, shard=0)
    with pytest.raises(PolicyError, match="outside CRL shard 0"):
        c.crl_entries_der(S.CrlEntriesDer(id=10, data=b, count=3))
    _begin(c, 11, ents[:2])
    with pytest.raises(PolicyError, match="exceed the declaration"):
        c.crl_entries_der(S.CrlEntriesDer(id=11, data=b, count=3))
    c.crl_begin(S.CrlBegin(id=12, ca="issuing", crl_number=5, this_update=1767225600, next_update=1767312000,
                           entry_count=3, entries_length=36, kind="issued-serials"))
    with pytest.raises(PolicyError, match="issued-serials"):
        c.crl_entries_der(S.CrlEntriesDer(id=12, data=b, count=3))
    _begin(c, 13, ents, number=6, shard=1, delta_base=5)  # a shard's delta: entries go one by one (removeFromCRL)
    with pytest.raises(PolicyError, match="delta"):
        c.crl_entries_der(S.CrlEntriesDer(id=13, data=b, count=3))
    with pytest.raises(PolicyError, match="no delta CRLs for its complete CRL"):  # the complete CRL is no scope of a delta
        _begin(c, 14, ents, number=6, delta_base=5)
    for mid in (10, 11, 12, 13):
        c._crls.pop(mid, None)

"""policy/tier.py: the checks of an installed CA certificate (each refusal names its check) and the calendar bundle parser."""

from __future__ import annotations

import base64
import datetime as dt
import json
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from policy import tier as T
from policy.errors import PolicyError
from policy.profiles import load_profiles

NOW = dt.datetime.now(dt.timezone.utc)
PROFILES = load_profiles({})


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, signer, ca=True, path=None, days=(-1, 100), ku=True, ski=True, eku=None):
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(NOW + dt.timedelta(days=days[0]))
         .not_valid_after(NOW + dt.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path), critical=True))
    if ku:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def keys():
    return {n: ec.generate_private_key(ec.SECP256R1()) for n in ("root", "sub", "other")}


def _spki(k) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check(cert, anchor, k, chain=(), allows=("tls-server",), cas=False):
    return T.check_install(cert, list(chain), anchor, _spki(k), NOW, [PROFILES[p] for p in allows], cas)


def test_install_checks_name_what_failed(keys):
    r, s, o = keys["root"], keys["sub"], keys["other"]
    root = _cert("Root", "Root", r, r, path=1)
    good = _cert("Sub", "Root", s, r, path=0)
    assert _check(good, root, s).subject == _name("Sub")
    cases = [
        (good, root, o, (), "key", "token-key"),  # not the token's key
        (_cert("Sub", "Root", s, r, ca=False), root, s, (), "ca", "basic-constraints"),
        (_cert("Sub", "Root", s, r, ku=False), root, s, (), "ca", "key-usage"),
        (_cert("Sub", "Root", s, r, ski=False), root, s, (), "ca", "ski"),
        (_cert("Sub", "Root", s, r, days=(-10, -1)), root, s, (), "validity", "expired"),
        (_cert("Sub", "Root", s, r, days=(1, 10)), root, s, (), "validity", "not-yet"),
        (_cert("Sub", "Root", s, o), root, s, (), "chain", "signature"),  # signed by another key
        (_cert("Sub", "Other", s, r), root, s, (), "chain", "issuer-name"),
        (_cert("Sub", "Sub", s, s), root, s, (), "chain", "self-signed"),
        (good, _cert("Root", "Root", r, r, path=0), s, (), "constraints", "path-length"),
        (good, _cert("Sub", "Root", s, r), s, (), "chain", "anchor"),  # not self-signed
        (_cert("Sub", "Root", s, r, eku=[x509.ExtendedKeyUsageOID.CLIENT_AUTH]), root, s, (), "constraints", "extended-key-usage"),
    ]
    for cert, anchor, k, chain, field, rule in cases:
        with pytest.raises(PolicyError) as e:
            _check(cert, anchor, k, chain)
        assert (e.value.field, e.value.rule) == (field, rule), (field, rule, str(e.value))
    # pathLen 0 on a CA whose policy lets it issue CA certificates
    with pytest.raises(PolicyError) as e:
        _check(good, root, s, allows=("sub-ca",), cas=True)
    assert e.value.rule == "path-length"
    with pytest.raises(PolicyError) as e:
        _check(b"junk", root, s)
    assert (e.value.field, e.value.rule) == ("certificate", "der")


def test_install_through_an_intermediate(keys):
    r, s, o = keys["root"], keys["sub"], keys["other"]
    root = _cert("Root", "Root", r, r, path=2)
    mid = _cert("Mid", "Root", o, r, path=1)
    sub = _cert("Sub", "Mid", s, o, path=0)
    assert _check(sub, root, s, chain=[mid]).issuer == _name("Mid")
    with pytest.raises(PolicyError) as e:  # the intermediate missing
        _check(sub, root, s)
    assert e.value.rule == "issuer-name"
    with pytest.raises(PolicyError) as e:  # the root's pathLen 0 forbids two levels
        _check(sub, _cert("Root", "Root", r, r, path=0), s, chain=[mid])
    assert e.value.rule == "path-length"


def _crl(key, issuer: str, number: int, tu: dt.datetime, nu: dt.datetime) -> bytes:
    return (x509.CertificateRevocationListBuilder().issuer_name(_name(issuer)).last_update(tu).next_update(nu)
            .add_extension(x509.CRLNumber(number), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_bundle_round_trip_refusals_and_fuzz(keys):
    r, o = keys["root"], keys["other"]
    root = _cert("Root", "Root", r, r, path=1)
    t0 = int(NOW.timestamp())
    wins = T.calendar_windows(t0, 3, 30 * 86400, 86400)
    crls = [(10 + i, tu, nu, _crl(r, "Root", 10 + i, dt.datetime.fromtimestamp(tu, dt.timezone.utc),
                                  dt.datetime.fromtimestamp(nu, dt.timezone.utc))) for i, (tu, nu) in enumerate(wins)]
    data = T.encode_bundle("root", root, 30 * 86400, 86400, t0, crls)
    name, got_root, got = T.parse_bundle(data, root)
    assert (name, got_root, [c[0] for c in got]) == ("root", root, [10, 11, 12])
    doc = json.loads(data)

    def refused(d, rule, known=root):
        with pytest.raises(PolicyError) as e:
            T.parse_bundle(json.dumps(d).encode(), known)
        assert e.value.rule == rule, str(e.value)

    forged = dict(doc, crls=[dict(doc["crls"][0], der=base64.b64encode(crls[0][3][:-2] + b"\0\0").decode(),
                                  sha256=__import__("hashlib").sha256(crls[0][3][:-2] + b"\0\0").hexdigest())])
    refused(forged, "signature")
    other = _crl(o, "Root", 10, dt.datetime.fromtimestamp(wins[0][0], dt.timezone.utc), dt.datetime.fromtimestamp(wins[0][1], dt.timezone.utc))
    refused(dict(doc, crls=[dict(doc["crls"][0], der=base64.b64encode(other).decode(),
                                 sha256=__import__("hashlib").sha256(other).hexdigest())]), "signature")
    refused(dict(doc, crls=[doc["crls"][1], doc["crls"][0]]), "order")
    refused(dict(doc, crls=[dict(doc["crls"][0], number=99)]), "manifest")
    refused(dict(doc, crls=[dict(doc["crls"][0], sha256="0" * 64)]), "manifest")
    refused(dict(doc, extra=1), "format")
    refused(dict(doc, format="x"), "format")
    refused(doc, "root", known=_cert("Root", "Root", o, o))
    with pytest.raises(PolicyError):
        T.parse_bundle(b"x" * (T.MAX_BUNDLE + 1))
    # Bounded mutation fuzz: every mutant is accepted whole or refused with a PolicyError, nothing else.
    rng = random.Random(14)
    for _ in range(400):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            T.parse_bundle(bytes(b), root)
        except PolicyError:
            pass


def test_ca_request_builder():
    b = T.ca_request_builder((("CN", "Issuing"), ("O", "Example")), PROFILES["sub-ca"], 0)
    k = ec.generate_private_key(ec.SECP256R1())
    csr = b.sign(k, hashes.SHA256())
    assert csr.is_signature_valid
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    with pytest.raises(PolicyError):
        T.ca_request_builder((("CN", "x"),), PROFILES["tls-server"], None)
    with pytest.raises(PolicyError):
        T.ca_request_builder((("O", "no CN"),), PROFILES["sub-ca"], None)

"""The gateway's ACME parts without an appliance: JWS/JWK parsing (and a bounded fuzz of it), nonces,
the validation network policy, name patterns, the ARI window, the tls-alpn-01 certificate check."""

from __future__ import annotations

import hashlib
import json
import random
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from appliance.gateway.acme.jose import JoseError, jwk_of_key, parse_jwk, parse_jws
from appliance.gateway.acme.service import Problem, check_identifier, renewal_window
from appliance.gateway.acme.store import Nonces
from appliance.gateway.acme.validate import Failed, check_alpn_cert
from appliance.gateway.netpolicy import Denied, NetPolicy
from policy.gwpolicy import name_allowed
from tests.acmeclient import b64, jwk, sign

URL = "https://acme.example/acme/new-order"


def _jws(key, alg: str, prot_extra: dict, payload: bytes) -> bytes:
    pub = jwk_of_key(key.public_key()).to_dict()
    prot = {"alg": alg, "nonce": "n", "url": URL, "jwk": pub, **prot_extra}
    p = b64(json.dumps(prot).encode())
    data = f"{p}.{b64(payload)}".encode()
    if alg == "RS256":
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "EdDSA":
        sig = key.sign(data)
    else:
        size = 32 if alg == "ES256" else 48
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256() if size == 32 else hashes.SHA384())))
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return json.dumps({"protected": p, "payload": b64(payload), "signature": b64(sig)}).encode()


@pytest.mark.parametrize("alg,make", [("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
                                      ("ES384", lambda: ec.generate_private_key(ec.SECP384R1())),
                                      ("RS256", lambda: rsa.generate_private_key(65537, 2048)),
                                      ("EdDSA", ed25519.Ed25519PrivateKey.generate)])
def test_each_algorithm_verifies_and_a_changed_payload_does_not(alg, make):
    key = make()
    j = parse_jws(_jws(key, alg, {}, b'{"a":1}'))
    j.verify(j.jwk)
    assert j.url == URL and j.payload_json() == {"a": 1}
    doc = json.loads(_jws(key, alg, {}, b'{"a":1}'))
    doc["payload"] = b64(b'{"a":2}')
    j = parse_jws(json.dumps(doc).encode())
    with pytest.raises(JoseError) as e:
        j.verify(j.jwk)
    assert e.value.kind == "malformed"


def test_jws_shapes_refused_with_their_acme_type():
    key = ec.generate_private_key(ec.SECP256R1())
    good = json.loads(sign(key, {"alg": "ES256", "nonce": "n", "url": URL, "jwk": jwk(key)}, b"{}"))
    cases = {
        "badSignatureAlgorithm": [{"alg": "none"}, {"alg": "HS256"}, {"alg": "RS512"}],
        "malformed": [{"kid": "https://x/acct/1"}, {"b64": False}, {"crit": ["b64"]}, {"url": None}],
        "badNonce": [{"nonce": None}],
        "badPublicKey": [{"jwk": {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}}, {"jwk": {"kty": "oct", "k": "AA"}},
                         {"jwk": {"kty": "RSA", "n": b64(b"\x01" * 64), "e": "AQAB"}}],
    }
    base = json.loads(__import__("base64").urlsafe_b64decode(good["protected"] + "=="))
    for kind, changes in cases.items():
        for ch in changes:
            prot = {**base, **ch}
            prot = {k: v for k, v in prot.items() if v is not None}
            body = json.dumps({**good, "protected": b64(json.dumps(prot).encode())}).encode()
            with pytest.raises(JoseError) as e:
                parse_jws(body)
            assert e.value.kind == kind, (ch, e.value.kind)
    for body in (b"[]", b"{", b'{"protected":1}', json.dumps({**good, "signatures": []}).encode(),
                 json.dumps({**good, "header": {}}).encode(), b"x" * 70000, json.dumps({**good, "payload": "a=="}).encode()):
        with pytest.raises(JoseError):
            parse_jws(body)


def test_jwk_thumbprint_is_rfc7638():
    # RFC 7638 §3.1's example key and thumbprint.
    k = parse_jwk({"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
                   "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
                        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n"
                        "91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"})
    assert k.thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_a_bounded_fuzz_of_jws_never_raises_anything_but_jose_errors():
    """Mutations of valid JWSs (bytes flipped, truncated, JSON values swapped for odd types): every
    input is either parsed or refused with JoseError; nothing else escapes (seconds, fixed seed)."""
    rnd = random.Random(8555)
    key = ec.generate_private_key(ec.SECP256R1())
    seeds = [sign(key, {"alg": "ES256", "nonce": "n", "url": URL, "jwk": jwk(key)}, b'{"identifiers":[]}'),
             sign(key, {"alg": "ES256", "nonce": "n", "url": URL, "kid": "https://x/acme/acct/1"}, None)]
    odd = [None, 0, -1, 1.5, True, "", "A" * 5000, [], {}, [[[]]], {"kty": "EC"}, "==", "\u0000", 2**70]
    deadline = time.monotonic() + 3
    n = 0
    while n < 6000 and time.monotonic() < deadline:
        n += 1
        raw = bytearray(rnd.choice(seeds))
        how = rnd.randrange(4)
        if how == 0:
            for _ in range(rnd.randrange(1, 8)):
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
        elif how == 1:
            raw = raw[: rnd.randrange(len(raw))]
        else:
            doc = json.loads(raw)
            k = rnd.choice(["protected", "payload", "signature"])
            if how == 2:
                doc[k] = rnd.choice(odd)
            else:
                prot = json.loads(__import__("base64").urlsafe_b64decode(doc["protected"] + "=="))
                prot[rnd.choice(["alg", "nonce", "url", "jwk", "kid", "crit"])] = rnd.choice(odd)
                doc["protected"] = b64(json.dumps(prot).encode())
            raw = bytearray(json.dumps(doc).encode())
        try:
            j = parse_jws(bytes(raw))
            if j.jwk is not None:
                j.verify(j.jwk)
            j.payload_json()
        except JoseError:
            pass
    assert n > 500


def test_nonces_are_single_use_and_do_not_survive_a_restart():
    a = Nonces()
    n = a.new()
    assert a.use(n) and not a.use(n)
    m = a.new()
    assert not Nonces().use(m)  # a new process, a new key
    assert not a.use("A" * 32) and not a.use("") and not a.use("x")


def test_validation_may_reach_public_addresses_and_listed_networks_only():
    p = NetPolicy(())
    assert p.check("8.8.8.8") == "8.8.8.8"
    for bad in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.169.254", "::1", "fc00::1", "0.0.0.0", "224.0.0.1",
                "::ffff:127.0.0.1", "100.64.0.1", "not-an-ip"):
        with pytest.raises(Denied):
            p.check(bad)
    assert NetPolicy(("127.0.0.0/8",)).check("::ffff:127.0.0.2") == "127.0.0.2"


def test_name_patterns():
    assert name_allowed("dns", "a.b.example.org", ["*.example.org"]) and name_allowed("dns", "*.example.org", ["*.example.org"])
    assert not name_allowed("dns", "example.org", ["*.example.org"]) and not name_allowed("dns", "badexample.org", ["*.example.org"])
    assert name_allowed("dns", "Host.Example.org.", ["host.example.org"]) and name_allowed("ip", "::1", ["0::1"])
    assert not name_allowed("ip", "10.0.0.1", ["*.example.org"]) and name_allowed("ip", "10.0.0.1", ["*"])
    with pytest.raises(Problem):
        check_identifier({"type": "dns", "value": "localhost"})
    with pytest.raises(Problem):
        check_identifier({"type": "email", "value": "a@b.c"})
    assert check_identifier({"type": "ip", "value": "2001:db8::0001"}) == ("ip", "2001:db8::1")


def test_ari_windows_spread_and_move_earlier():
    nb, na = 1_000_000, 1_000_000 + 90 * 86400
    starts = {renewal_window(nb, na, f"id{i}", 0.33, False, 0)[0] for i in range(50)}
    assert len(starts) > 40 and all(na - 0.34 * 90 * 86400 < s < na for s in starts)  # spread in the last third
    s, e = renewal_window(nb, na, "x", 0.33, True, 0)
    assert e <= time.time() + 1 and s < e  # revoked: now
    s2, e2 = renewal_window(nb, na, "x", 0.33, False, na - 40 * 86400)
    assert e2 < na - 40 * 86400  # the CA retires first: before it does


def _alpn_cert(names, digest: bytes, critical: bool = True) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([])).public_key(key.public_key())
         .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
         .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"), b"\x04\x20" + digest), critical=critical))
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_tls_alpn_01_certificate_check():
    d = hashlib.sha256(b"token.thumb").digest()
    check_alpn_cert(_alpn_cert(["a.example.org"], d), "dns", "a.example.org", d)
    for der in (_alpn_cert(["a.example.org", "b.example.org"], d), _alpn_cert(["b.example.org"], d),
                _alpn_cert(["a.example.org"], bytes(32)), _alpn_cert(["a.example.org"], d, critical=False)):
        with pytest.raises(Failed):
            check_alpn_cert(der, "dns", "a.example.org", d)


def test_the_acme_store_survives_a_reopen(tmp_path):
    from appliance.gateway.acme.store import AcmeStore
    st = AcmeStore(str(tmp_path))
    acct = st.create_account(7, "tp", '{"kty":"EC"}', ["mailto:a@b.c"], None, (), ())
    st.put_many([("order", "o1", 7, 2**40, "pending", {"status": "pending"}), ("authz", "z1", 7, 2**40, "pending", {"s": 1})])
    assert acct["id"] == 7 and st.open_orders == 1
    st.close()
    st = AcmeStore(str(tmp_path))
    assert st.get("order", "o1") == {"status": "pending"} and st.owner("z1") == 7 and st.open_orders == 1
    assert st.account_by_thumbprint("tp")["contact"] == ["mailto:a@b.c"]
    assert st.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    st.close()


def test_eab_key_ids_never_start_with_a_dash():
    """An EAB key id is typed as an argument (`donjon acme eab-revoke KID`, `certbot --eab-kid KID`): one
    starting with "-" (1 in 64 of base64url's ids) is read as an option. 4,000 draws: a generator that let
    them through would give one with probability 1 - (63/64)^4000."""
    from appliance.factory.gateway import eab_new

    ids = [eab_new()[0] for _ in range(4000)]
    assert not [k for k in ids if k.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(k) == 16 for k in ids)
    assert sum(k.startswith("_") for k in ids) > 0  # the rest of the alphabet is kept

"""The fast lint path gives exactly the findings of pkilint as shipped (run in a process of its own), on
clean, broken and mangled certificates; each change it makes to pkilint is held equal to the original."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import importlib.util
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der.encoder import encode
import pytest
from pyasn1_alt_modules import rfc5280

from policy import lint, lintwalk
from tests.unit.test_policy_certs import KEYGEN, LEAVES, P, der, make_root, make_sub, spec

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
REPO = Path(__file__).resolve().parents[2]


def _shipped(cases: list[tuple[bytes, str, bytes | None, bool]]) -> list[dict]:
    """Each case's findings from pkilint as shipped, and from Donjon's path under the version guard's
    fallback, in a fresh process where policy.lintwalk changed nothing (tests/lintstock.py checks that)."""
    payload = [[base64.b64encode(c).decode(), name, base64.b64encode(i).decode() if i else None, cabf] for c, name, i, cabf in cases]
    r = subprocess.run([sys.executable, "-m", "tests.lintstock"], input=json.dumps(payload), capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert len(out) == len(cases)
    return out


def _fast(c: bytes, name: str, issuer: bytes | None, cabf: bool) -> list[str]:
    profile = dataclasses.replace(P[name], cabf=True) if cabf else P[name]
    with warnings.catch_warnings():
        # As in the reference process (and the CIS): a warning (cryptography's about a negative serial) is
        # not the error the suite's filter makes of it.
        warnings.simplefilter("default")
        return lint.lint_certificate(c, profile, issuer)


def _broken(sub, key) -> dict[str, bytes]:
    """tls-server-like leaves, each with a defect the linters must report."""
    pub = KEYGEN["p256"]().public_key()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(sub.key.public_key())

    def base(**kw):
        b = (x509.CertificateBuilder().issuer_name(sub.cert.subject).subject_name(kw.get("subject", x509.Name([])))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=kw.get("days", 90))))
        if kw.get("aki", True):
            b = b.add_extension(aki, critical=False)
        return b

    san = x509.SubjectAlternativeName([x509.DNSName("www.example.com")])
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    return {
        "no-san": der(base().add_extension(eku, False).sign(sub.key, hashes.SHA256())),
        "too-long": der(base(days=900).add_extension(san, True).add_extension(eku, False).sign(sub.key, hashes.SHA256())),
        "ca-true": der(base().add_extension(san, False).add_extension(x509.BasicConstraints(True, None), True).sign(sub.key, hashes.SHA256())),
        "wrong-signer": der(base().add_extension(san, False).add_extension(eku, False).sign(key, hashes.SHA256())),
        "no-aki": der(base(aki=False).add_extension(san, False).add_extension(eku, False).sign(sub.key, hashes.SHA256())),
        "cn-not-in-san": der(base(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other.example.com")]))
                             .add_extension(san, False).add_extension(eku, False).sign(sub.key, hashes.SHA256())),
    }


@pytest.fixture(scope="module")
def corpus() -> dict:
    """Clean leaves of every builtin profile under P-256 and RSA-2048 CAs, broken leaves, 100 byte-mangled
    ones, each with its findings from pkilint as shipped (one process for all: pkilint imports once)."""
    root = make_root()
    sub = make_sub(root, "p256")
    rsa_sub = make_sub(root, "rsa2048")
    clean: list[tuple[bytes, str, bytes | None, bool]] = []
    for ca in (sub, rsa_sub):
        for name, (subject, sans) in LEAVES.items():
            for i in range(2):  # several leaves per profile: the memo and the shape index are hit, not only filled
                leaf = der(ca.issue(spec(name, KEYGEN["p256"](), subject, sans, serial=0x4000_0000_0000_0000 + i)))
                clean += [(leaf, name, der(ca.cert), False), (leaf, name, None, False)]
    broken = _broken(sub, ec.generate_private_key(ec.SECP256R1()))
    for c in broken.values():
        clean += [(c, "tls-server", der(sub.cert), False), (c, "tls-server", der(sub.cert), True), (c, "tls-server", None, False)]
    # The BR validator set (a cabf profile) on the tls-server leaves: its own match() overrides and filters.
    tls = [c for c in clean if c[1] == "tls-server" and c[2] is not None][:4]
    clean += [(c, n, i, True) for c, n, i, _ in tls]
    clean.append((der(sub.cert), "sub-ca", der(root.cert), False))
    good = der(sub.issue(spec("tls-server", KEYGEN["p256"](), (), (("dns", "www.example.com"),))))
    rng = random.Random(19)
    mangled = []
    for _ in range(100):  # bounded: seconds, not minutes
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        mangled.append((bytes(b), "tls-server", der(sub.cert), rng.random() < 0.2))
    shipped = _shipped(clean + mangled)
    return {"root": root, "sub": sub, "broken": broken, "good": good, "clean": list(zip(clean, shipped[:len(clean)])),
            "mangled": list(zip(mangled, shipped[len(clean):]))}


def test_fast_path_equals_shipped_pkilint_on_clean_and_broken_certificates(corpus):
    root, sub, broken = corpus["root"], corpus["sub"], corpus["broken"]
    flagged = 0
    for case, ref in corpus["clean"]:
        fast = _fast(*case)
        assert fast == ref["stock"] == ref["fallback"], (case[1], fast, ref)
        flagged += bool(fast)
    # Every broken one is caught (by the set or the chain), the clean ones are clean.
    for label, c in broken.items():
        assert lint.lint_certificate(c, P["tls-server"], der(sub.cert)), label
    assert lint.lint_certificate(broken["wrong-signer"], P["tls-server"], der(sub.cert))[-1].startswith(
        "chain: ERROR pkix.signature_verification_failed")
    assert flagged >= len(broken)
    assert _fast(der(sub.cert), "sub-ca", der(root.cert), False) == []
    assert any(_fast(c, "tls-server", der(sub.cert), True) for c in broken.values())


def test_mangled_certificates_give_the_same_findings_and_never_raise(corpus):
    sub, good = corpus["sub"], corpus["good"]
    fatal = 0
    for case, ref in corpus["mangled"]:
        fast = _fast(*case)
        assert fast == ref["stock"] == ref["fallback"]
        fatal += any(f.startswith("FATAL") for f in fast)
    assert fatal > 0  # the corpus reached the decoder's refusals, not only the validators
    # A mangled issuer is reported (and not cached as a good one).
    assert lint.lint_certificate(good, P["tls-server"], b"\x30\x03\x02\x01\x01")[-1].startswith("FATAL malformed issuer certificate")
    assert lint.lint_certificate(good, P["tls-server"], der(sub.cert)) == []


def _tree(node) -> list:
    return [(n.name, n.path, id(n.pdu), list(n.children)) for n in _nodes(node)]


def _nodes(node):
    yield node
    for c in node.children.values():
        yield from _nodes(c)


def test_each_change_to_pkilint_equals_the_original():
    """Node building (isValue found once), navigation without the regex and the TBS taken as bytes give
    what pkilint's own code gives, node for node, on clean and mangled certificates."""
    from pkilint import document, loader

    assert lintwalk.install()
    root = make_root()
    sub = make_sub(root, "rsa2048")
    good = der(sub.issue(spec("user-auth", KEYGEN["p256"](), *LEAVES["user-auth"])))
    rng = random.Random(5)
    corpus = [good, der(sub.cert), der(root.cert)]
    for _ in range(30):
        b = bytearray(good)
        b[rng.randrange(len(b))] = rng.randrange(256)
        corpus.append(bytes(b))
    compared = by_parts = exact = 0
    for c in corpus:
        try:
            doc = loader.RFC5280CertificateDocumentLoader().load_der_document(c, "subject", "c", None)
        except Exception:  # noqa: BLE001 - refused by the decoder: nothing to compare
            continue
        compared += 1
        lint.lint_pkix(c)  # decoders attach the extension values, names and keys to a document of its own
        v = lint._validators()
        v["pkix_cert"].validate(doc.root)
        stock = document.PDUNode.__new__(document.PDUNode)
        lintwalk._stock_node_init(stock, doc, doc.root.name, doc.root.pdu, None)
        fast = document.PDUNode(doc, doc.root.name, doc.root.pdu, None)
        assert _tree(fast) == _tree(stock)[: len(_tree(fast))] and len(_tree(fast)) == len(_tree(stock))
        for n in list(_nodes(doc.root))[::7]:
            for path in ("^", "^.^", "children", "tbsCertificate.subject", "tbsCertificate.extensions.0.extnID",
                         "algorithm.algorithm", "x..y", ".x", "x.", "", "subject:certificate", ":certificate.tbsCertificate"):
                assert _outcome(lambda: lintwalk._navigate(n, path)) == _outcome(lambda: lintwalk._stock_navigate(n, path)), (n.path, path)
        tbs = doc.root.children["tbsCertificate"]
        assert _outcome(lambda: lintwalk._tbs_der(tbs), bytes) == _outcome(lambda: encode(tbs.pdu), bytes)
        # Decoded field by field (through the memo) or whole: the same nodes.
        whole = document.PDUNode.__new__(document.PDUNode)
        lintwalk._stock_node_init(whole, doc, "certificate", lintwalk._decode_der(c, asn1Spec=rfc5280.Certificate())[0], None)
        assert [(n.path, type(n.pdu), n.pdu.tagSet) for n in _nodes(whole)] == [(n.path, type(n.pdu), n.pdu.tagSet) for n in _nodes(stock)]
        by_parts += lintwalk._certificate_by_parts(c, rfc5280.Certificate()) is not None
        exact += id(tbs.pdu) in lintwalk._exact_tbs
    assert compared >= 5 and by_parts >= 3 and exact >= 3
    # Not a certificate's TBS: encoded, as pkilint does.
    assert lintwalk._tbs_der(doc.root) == encode(doc.root.pdu)


def _outcome(f, kind=id):
    try:
        return ("ok", kind(f()))
    except Exception as e:  # noqa: BLE001 - the same exception, the same message
        return (type(e).__name__, str(e))


def test_memo_and_issuer_cache_stay_bounded():
    lint.warm()
    spec_ = rfc5280.CertificateSerialNumber()
    for i in range(lintwalk._MEMO_ENTRIES + 50):
        value, rest = lintwalk.document.decode_der(b"\x02\x03\x01" + i.to_bytes(2, "big"), asn1Spec=spec_)
        assert int(value) == 0x10000 + i and rest == b""
    assert len(lintwalk._memo) <= lintwalk._MEMO_ENTRIES
    assert len(lintwalk._skeletons) <= lintwalk._SKELETONS
    for i in range(lintwalk._MEMO_ENTRIES + 20):
        value = rfc5280.CertificateSerialNumber(i + 1)
        assert lintwalk._memo_encode(value) == encode(value) == lintwalk._memo_encode(value)
    assert len(lintwalk._encoded) <= lintwalk._MEMO_ENTRIES
    v = lint._validators()
    root = make_root()
    sub = der(make_sub(root, "p256").cert)
    for _ in range(70):  # 70 distinct issuers: the cache is emptied, never grown past its bound
        assert lint.lint_certificate(sub, P["sub-ca"], der(make_root("p256").cert))  # not its issuer: findings
        assert len(v["issuer_cache"]) <= 64
    assert lint.lint_certificate(sub, P["sub-ca"], der(root.cert)) == []


@pytest.mark.slow
def test_big_differential_corpus_equals_shipped_pkilint():
    """The long version (just drills): 2,000 mangled leaves of several profiles under P-256 and RSA-2048
    CAs, each with the RFC 5280 or the BR set and the chain checks, against pkilint as shipped."""
    root = make_root()
    cas = [make_sub(root, "p256"), make_sub(root, "rsa2048")]
    rng = random.Random(1919)
    goods = [(ca, name, der(ca.issue(spec(name, KEYGEN["p256"](), *LEAVES[name])))) for ca in cas for name in LEAVES]
    cases: list[tuple[bytes, str, bytes | None, bool]] = [(g, name, der(ca.cert), False) for ca, name, g in goods]
    for _ in range(2000):
        ca, name, g = rng.choice(goods)
        b = bytearray(g)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append((bytes(b), name, der(ca.cert) if rng.random() < 0.8 else None, rng.random() < 0.2))
    shipped = _shipped(cases)
    decoded = 0
    for case, ref in zip(cases, shipped):
        fast = _fast(*case)
        assert fast == ref["stock"] == ref["fallback"], (case[1], fast, ref)
        decoded += not any(f.startswith("FATAL malformed") for f in fast)
    assert decoded > 200  # many reached the validators, not only the decoder's refusal


def _module_as_shipped(module):
    """The module as shipped: its file loaded again, apart from the module lintwalk patched."""
    spec_ = importlib.util.spec_from_file_location(module.__name__ + "_shipped", module.__file__)
    fresh = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(fresh)
    return fresh


def test_validators_argument_names_kept_give_the_shipped_dict():
    """The refused value's arguments (validators' ValidationError) as validators 0.22.0 builds them."""
    import validators
    from validators import utils

    assert lintwalk.install()
    assert utils._func_args_as_dict is lintwalk._func_args_as_dict
    shipped = _module_as_shipped(utils)._func_args_as_dict

    for func, args, kwargs in ((validators.domain, ("127.0.0.1",), {"rfc_1034": False, "rfc_2782": False}),
                               (validators.ipv4, ("example.org",), {"cidr": False}), (validators.url, ("x y",), {}),
                               (validators.domain.__wrapped__, ("a", True), {})):
        for _ in range(2):  # the second from the kept names
            assert lintwalk._func_args_as_dict(func, *args, **kwargs) == shipped(func, *args, **kwargs)
    # A refused URI still refused, with the arguments named.
    r = validators.domain("127.0.0.1", rfc_1034=False, rfc_2782=False)
    assert not r and repr(r) == "ValidationError(func=domain, args={'value': '127.0.0.1', 'rfc_1034': False, 'rfc_2782': False})"
    assert validators.url("http://127.0.0.1:8080/crl/issuing.crl") is True


def test_uri_domain_and_email_checks_kept_per_string_answer_as_shipped():
    """pkilint's validators_predicate, its answer kept per (function, string): the same answer as the
    shipped predicate for valid and refused values, the first time and from the memo, and bounded."""
    import validators
    from pkilint.pkix import general_name

    assert lintwalk.install()
    assert general_name.validators_predicate is lintwalk._validators_predicate
    shipped = _module_as_shipped(general_name).validators_predicate
    assert shipped is not lintwalk._validators_predicate
    values = ["http://127.0.0.1:8080/crl/issuing.crl", "http://[::1]:80/ocsp", "http://pki.example.org/ca.der", "https://x",
              "http://exa mple.org/", "ftp://a.b/c", "http://999.1.1.1/", "http://-bad-.example/", "", "é", "x" * 300,
              "pki.example.org", "127.0.0.1", "a..b", "*.example.org", "user@example.org", "user@@example.org",
              "ldap://dir.example.org/cn=x", "http://example.org:99999/"]
    lintwalk._predicates.clear()
    for _ in range(2):  # computed, then from the memo
        for func in (validators.url, validators.domain, validators.email):
            for v in values:
                assert lintwalk._validators_predicate(func, v) is shipped(func, v), (func.__name__, v)
    assert any(shipped(validators.url, v) for v in values) and not all(shipped(validators.url, v) for v in values)
    for i in range(lintwalk._PREDICATES + 10):
        lintwalk._validators_predicate(validators.domain, f"h{i}.example.org")
    assert len(lintwalk._predicates) <= lintwalk._PREDICATES
    # A long string (a hostile CSR's SAN URI) is checked, as shipped, and never kept: the memo stays small.
    lintwalk._predicates.clear()
    long_uri = "http://example.org/" + "a" * lintwalk._PREDICATE_LEN
    assert lintwalk._validators_predicate(validators.url, long_uri) is shipped(validators.url, long_uri)
    assert lintwalk._predicates == {}

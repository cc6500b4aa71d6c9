"""The fast lint path gives exactly the findings of pkilint's stock path, on clean, broken and mangled certificates."""

from __future__ import annotations

import datetime as dt
import random

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1_alt_modules import rfc5280

from policy import lint, lintwalk
from tests.unit.test_policy_certs import KEYGEN, LEAVES, P, der, make_root, make_sub, spec

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _stock(cert_der: bytes, profile, issuer_der: bytes | None) -> list[str]:
    """pkilint as its own tools run it: fresh documents, each decoded by every container, validate() walks."""
    v = lint._validators()
    ld = v["loader"].RFC5280CertificateDocumentLoader
    doc, bad = lint._load(ld, cert_der, "certificate")
    if bad:
        return [bad]
    if profile.cabf and not profile.ca:
        sa = v["serverauth"]
        doc2, _ = lint._load(ld, cert_der, "certificate")
        ct = sa.determine_certificate_type(doc2)
        c = v["certificate"].create_pkix_certificate_validator_container(sa.create_decoding_validators(), sa.create_validators(ct))
        results, _ = v["finding_filter"].filter_results(sa.create_serverauth_finding_filters(ct), c.validate(doc2.root))
        findings = lint._findings(results, "cabf-serverauth: ")
    else:
        findings = lint._findings(v["pkix_cert"].validate(doc.root), "pkix: ")
    if issuer_der is not None:
        docs: dict = {}
        issuer, bad = lint._load(ld, issuer_der, "issuer certificate", "issuer", docs)
        if bad:
            return findings + [bad]
        docs["issuer"] = issuer
        subject, bad = lint._load(ld, cert_der, "certificate", "subject", docs)
        if bad:
            return findings + [bad]
        docs["subject"] = subject
        decoders, issuer_v, subject_v = v["chain"]
        results = decoders.validate(issuer.root) + decoders.validate(subject.root)
        results += issuer_v.validate(issuer.root) + subject_v.validate(subject.root)
        findings += lint._findings(results, "chain: ")
    return findings


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
        "no-san": base().add_extension(eku, False).sign(sub.key, hashes.SHA256()),
        "too-long": base(days=900).add_extension(san, True).add_extension(eku, False).sign(sub.key, hashes.SHA256()),
        "ca-true": base().add_extension(san, False).add_extension(x509.BasicConstraints(True, None), True).sign(sub.key, hashes.SHA256()),
        "wrong-signer": base().add_extension(san, False).add_extension(eku, False).sign(key, hashes.SHA256()),
        "no-aki": base(aki=False).add_extension(san, False).add_extension(eku, False).sign(sub.key, hashes.SHA256()),
        "cn-not-in-san": base(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other.example.com")]))
        .add_extension(san, False).add_extension(eku, False).sign(sub.key, hashes.SHA256()),
    }


def test_fast_path_equals_stock_pkilint_on_clean_and_broken_certificates():
    root = make_root()
    sub = make_sub(root, "p256")
    other = ec.generate_private_key(ec.SECP256R1())
    cases = []
    for name, (subject, sans) in LEAVES.items():
        for i in range(3):  # several leaves per profile: the memo and the shape index are hit, not only filled
            cases.append((name, der(sub.issue(spec(name, KEYGEN["p256"](), subject, sans, serial=0x4000_0000_0000_0000 + i)))))
    broken = _broken(sub, other)
    cases += [("tls-server", der(c)) for c in broken.values()]
    flagged = 0
    for name, d in cases:
        for issuer in (der(sub.cert), None):
            fast = lint.lint_certificate(d, P[name], issuer)
            assert fast == _stock(d, P[name], issuer), name
            flagged += bool(fast)
    # Every broken one is caught (by the BR set or the chain), and the clean ones are clean.
    for label, c in broken.items():
        assert lint.lint_certificate(der(c), P["tls-server"], der(sub.cert)), label
    assert lint.lint_certificate(der(broken["wrong-signer"]), P["tls-server"], der(sub.cert))[-1].startswith(
        "chain: ERROR pkix.signature_verification_failed")
    assert flagged >= len(broken)
    # The sub-CA against its root (pkix set, not the BR one), through the fast path and the stock one.
    assert lint.lint_certificate(der(sub.cert), P["sub-ca"], der(root.cert)) == _stock(der(sub.cert), P["sub-ca"], der(root.cert)) == []


def test_mangled_certificates_give_the_same_findings_and_never_raise():
    root = make_root()
    sub = make_sub(root, "p256")
    good = der(sub.issue(spec("tls-server", KEYGEN["p256"](), (), (("dns", "www.example.com"),))))
    rng = random.Random(19)
    fatal = 0
    for _ in range(150):  # bounded: seconds, not minutes
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        fast = lint.lint_certificate(bytes(b), P["tls-server"], der(sub.cert))
        assert fast == _stock(bytes(b), P["tls-server"], der(sub.cert))
        fatal += any(f.startswith("FATAL") for f in fast)
    assert fatal > 0  # the corpus reached the decoder's refusals, not only the validators
    # A mangled issuer is reported (and not cached as a good one).
    assert lint.lint_certificate(good, P["tls-server"], b"\x30\x03\x02\x01\x01")[-1].startswith("FATAL malformed issuer certificate")
    assert lint.lint_certificate(good, P["tls-server"], der(sub.cert)) == []


def test_memo_and_issuer_cache_stay_bounded():
    lint.warm()
    spec_ = rfc5280.CertificateSerialNumber()
    for i in range(lintwalk._MEMO_ENTRIES + 50):
        value, rest = lintwalk.document.decode_der(b"\x02\x03\x01" + i.to_bytes(2, "big"), asn1Spec=spec_)
        assert int(value) == 0x10000 + i and rest == b""
    assert len(lintwalk._memo) <= lintwalk._MEMO_ENTRIES
    v = lint._validators()
    root = make_root()
    sub = der(make_sub(root, "p256").cert)
    for _ in range(70):  # 70 distinct issuers: the cache is emptied, never grown past its bound
        assert lint.lint_certificate(sub, P["sub-ca"], der(make_root("p256").cert))  # not its issuer: findings
        assert len(v["issuer_cache"]) <= 64
    assert lint.lint_certificate(sub, P["sub-ca"], der(root.cert)) == []

"""policy.crl shards (issuingDistributionPoint) and delta CRLs, judged by openssl and pkilint."""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from policy import crl as C
from policy import lint

UTC = dt.timezone.utc
NOW = int(dt.datetime.now(UTC).timestamp())


def _ts(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, UTC)


class _Ca:
    """A software P-256 CA (a fake for the CIS's HSM key: the encoder under test is the CIS's)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Donjon Shard Test CA")])
        self.ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_ts(NOW - 86400)).not_valid_after(_ts(NOW + 86400 * 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(self.ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def leaf(self, serial: int, crl_url: str, freshest: str | None = None) -> x509.Certificate:
        k = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"leaf {serial}")]))
            .issuer_name(self.name).public_key(k.public_key()).serial_number(serial)
            .not_valid_before(_ts(NOW - 3600)).not_valid_after(_ts(NOW + 86400 * 30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self.ski), critical=False)
            .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
        )
        if freshest:
            b = b.add_extension(x509.FreshestCRL([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(freshest)], None, None, None)]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def crl(self, number: int, entries: list, **kw) -> bytes:
        length = sum(C.entry_length(*e) for e in entries)
        tbs = C.TbsCrl(issuer_name_der=self.name.public_bytes(), key_type="p256", this_update=NOW - 60,
                       next_update=NOW + 86400, crl_number=number, aki_key_id=self.ski.digest,
                       entry_count=len(entries), entries_length=length, **kw)
        body = tbs.header() + tbs.entries(sorted(entries)) + tbs.trailer()
        prefix, suffix = C.certificate_list(len(body), "p256", self.key.sign(body, ec.ECDSA(hashes.SHA256())))
        return prefix + body + suffix


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _verify(tmp: Path, ca: _Ca, leaf: x509.Certificate, *args: str) -> subprocess.CompletedProcess:
    (tmp / "ca.pem").write_bytes(_pem(ca.cert))
    (tmp / "leaf.pem").write_bytes(_pem(leaf))
    return subprocess.run(["openssl", "verify", "-CAfile", str(tmp / "ca.pem"), "-crl_check", *args, str(tmp / "leaf.pem")],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def crl_server(tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving a directory: where openssl -crl_download fetches shards."""
    root = tmp_path_factory.mktemp("crl-www")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass
    handler = functools.partial(Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_shard_helpers():
    assert C.shard_url("http://x/crl/ca.crl", 0, 1) == "http://x/crl/ca.crl"  # one shard: unchanged
    assert C.shard_url("http://x/crl/ca.crl", 3, 4) == "http://x/crl/ca-3.crl"
    assert C.delta_url("http://x/crl/ca.crl") == "http://x/crl/ca-delta.crl"
    assert {C.shard_of(s, 4) for s in range(1000, 1100)} == {0, 1, 2, 3}
    for bad in (0, 257, True, 2.0):
        with pytest.raises(ValueError):
            C.shard_of(5, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        C.shard_url("http://x/crl/ca.crl", 4, 4)
    for url in ("http://x/a b.crl", "not a url", "http://x/\u00e9.crl", "http://x/" + "a" * 3000):
        with pytest.raises(ValueError):
            C.idp_der(url)
    ca = _Ca()
    with pytest.raises(ValueError):  # a delta's base comes before it in the same sequence
        ca.crl(5, [], delta_base=5)
    with pytest.raises(ValueError):
        ca.crl(6, [], delta_base=5, freshest_crl_url="http://x/crl/ca-delta.crl")


def test_shards_openssl_crl_download_and_pkilint(crl_server, tmp_path):
    root, base = crl_server
    ca = _Ca()
    crl_url = f"{base}/ca.crl"
    shards = 2
    s0, s1, s1_revoked = 1000, 1001, 1003  # shard 0, shard 1, shard 1
    assert [C.shard_of(s, shards) for s in (s0, s1, s1_revoked)] == [0, 1, 1]
    leaves = {s: ca.leaf(s, C.shard_url(crl_url, C.shard_of(s, shards), shards)) for s in (s0, s1, s1_revoked)}
    revoked = {1: [(s1_revoked, NOW - 120, 1, None)], 0: []}
    numbers = {0: 7, 1: 3}  # each shard its own number sequence
    for k in range(shards):
        der = ca.crl(numbers[k], revoked[k], idp_der=C.idp_der(C.shard_url(crl_url, k, shards)))
        (root / f"ca-{k}.crl").write_bytes(der)
        assert lint.lint_crl(der) == [], k
        parsed = x509.load_der_x509_crl(der)
        idp = parsed.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical and idp.value.full_name == [x509.UniformResourceIdentifier(f"{base}/ca-{k}.crl")]
        assert parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == numbers[k]
    for s in (s0, s1):
        r = _verify(tmp_path, ca, leaves[s], "-crl_download")
        assert r.returncode == 0 and ": OK" in r.stdout, (s, r.stdout, r.stderr)
    r = _verify(tmp_path, ca, leaves[s1_revoked], "-crl_download")
    assert r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr
    # A shard's CRL does not speak for another shard's certificates (the IDP scope): offering only
    # shard 0's CRL for a shard-1 leaf is refused as out of scope, never "OK".
    subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(root / "ca-0.crl"), "-out", str(tmp_path / "s0.pem")],
                   check=True, timeout=30)
    r = _verify(tmp_path, ca, leaves[s1_revoked], "-CRLfile", str(tmp_path / "s0.pem"))
    assert r.returncode != 0 and "different CRL scope" in r.stdout + r.stderr, r.stdout + r.stderr


def test_delta_crl_openssl_and_pkilint(tmp_path):
    ca = _Ca()
    crl_url = "http://127.0.0.1:9/crl/ca.crl"
    leaf = ca.leaf(2001, crl_url, freshest=C.delta_url(crl_url))
    other = (1999, NOW - 7200, 4, None)
    base = ca.crl(10, [other], freshest_crl_url=C.delta_url(crl_url))
    late = (2001, NOW - 30, 1, None)  # revoked after base #10 was signed
    delta = ca.crl(11, [late], delta_base=10)
    assert lint.lint_crl(base) == [] and lint.lint_crl(delta) == []
    (tmp_path / "base.crl").write_bytes(base)
    (tmp_path / "delta.crl").write_bytes(delta)
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "delta.crl"), "-noout", "-text"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert "Delta CRL Indicator: critical" in text and "10" in text.split("Delta CRL Indicator")[1].splitlines()[1]
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "base.crl"), "-noout", "-text"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert "Freshest CRL" in text and C.delta_url(crl_url) in text
    for f in ("base.crl", "delta.crl"):  # openssl verify reads PEM CRLs
        subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / f), "-out", str(tmp_path / (f + ".pem"))],
                       check=True, timeout=30)
    r = _verify(tmp_path, ca, leaf, "-CRLfile", str(tmp_path / "base.crl.pem"))
    assert r.returncode == 0, r.stdout + r.stderr  # the base alone predates the revocation
    r = _verify(tmp_path, ca, leaf, "-use_deltas", "-CRLfile", str(tmp_path / "base.crl.pem"),
                "-CRLfile", str(tmp_path / "delta.crl.pem"))
    assert r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr


def test_issued_certificates_name_their_shard_and_the_delta():
    """policy.certs: the CRL DP of a certificate names its shard (by serial); freshestCRL when deltas are on."""
    from tests.unit.test_policy_certs import KEYGEN, P, der, make_root, make_sub, spec

    sub = make_sub(make_root())
    leaf_key = KEYGEN["p256"]()
    for serial in (0x1000, 0x1001, 0x1002, 0x1003):
        s = spec("tls-client", leaf_key, (("CN", "client-7"),), (("dns", "client7.example.com"),), serial=serial)
        cert = sub.issue(s, crl_url="http://pki.example.com/crl/sub.crl", crl_shards=4)
        dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert dp[0].full_name == [x509.UniformResourceIdentifier(f"http://pki.example.com/crl/sub-{serial % 4}.crl")]
        with pytest.raises(x509.ExtensionNotFound):  # deltas are for one-shard CAs
            cert.extensions.get_extension_for_class(x509.FreshestCRL)
        assert lint.lint_certificate(der(cert), P["tls-client"], der(sub.cert)) == []
    one = sub.issue(s, crl_url="http://pki.example.com/crl/sub.crl")  # the default: exactly as before
    assert one.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name == [
        x509.UniformResourceIdentifier("http://pki.example.com/crl/sub.crl")]
    fresh = sub.issue(s, crl_url="http://pki.example.com/crl/sub.crl", delta_crls=True)
    f = fresh.extensions.get_extension_for_class(x509.FreshestCRL)
    assert not f.critical and f.value[0].full_name == [x509.UniformResourceIdentifier("http://pki.example.com/crl/sub-delta.crl")]
    assert lint.lint_certificate(der(fresh), P["tls-client"], der(sub.cert)) == []


_CA = _Ca()


@settings(max_examples=80, deadline=None)
@given(url=st.text(max_size=80), base=st.integers(0, 2**64), shards=st.integers(-2, 300), serial=st.integers(1, 2**159))
def test_fuzz_idp_freshest_and_shards(url, base, shards, serial):
    """Any text as a URL: either refused with ValueError, or an IDP and freshestCRL that cryptography reads back
    exactly; shard_of/shard_url stay in range or refuse."""
    full = "http://h/" + url
    try:
        idp = C.idp_der(full)
    except ValueError:
        assert not full.isascii() or any(c <= " " for c in full)
    else:
        der = _CA.crl(base + 1, [], idp_der=idp)
        got = x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        assert got.full_name == [x509.UniformResourceIdentifier(full)]
        der = _CA.crl(base + 1, [], freshest_crl_url=full)
        got2 = x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.FreshestCRL).value
        assert got2[0].full_name == [x509.UniformResourceIdentifier(full)]
        delta = x509.load_der_x509_crl(_CA.crl(base + 1, [], delta_base=base))
        assert delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == base
    try:
        k = C.shard_of(serial, shards)
    except ValueError:
        assert not 1 <= shards <= 256
    else:
        assert 0 <= k < shards
        assert C.shard_url("http://h/crl/ca.crl", k, shards).startswith("http://h/crl/ca")


def test_remove_from_crl_only_in_a_delta_and_the_delta_config(tmp_path):
    ca = _Ca()
    released = (2002, NOW - 10, 8, None)
    with pytest.raises(ValueError, match="delta CRLs only"):
        ca.crl(12, [released])  # a full CRL never carries removeFromCRL (clients read it both ways)
    with pytest.raises(ValueError, match="delta CRLs only"):
        ca.crl(12, [(2002, NOW - 10, 8, NOW - 20)])
    delta = ca.crl(13, [released, (2003, NOW - 5, 8, NOW - 100)], delta_base=12)
    got = x509.load_der_x509_crl(delta)
    assert [e.extensions.get_extension_for_class(x509.CRLReason).value.reason for e in got] == \
        [x509.ReasonFlags.remove_from_crl] * 2
    assert lint.lint_crl(delta) == []
    from appliance import config as cfgmod
    (tmp_path / "donjon.toml").write_text("[crl]\ndelta = { issuing = 60 }\n")
    assert cfgmod.load(str(tmp_path)).crl.delta == {"issuing": 60}
    # a sharded CA has deltas too (one per shard, issue 19): no longer refused
    (tmp_path / "donjon.toml").write_text("[crl]\nshards = { issuing = 4 }\ndelta = { issuing = 60 }\n")
    assert cfgmod.load(str(tmp_path)).crl.delta == {"issuing": 60}
    for bad, word in (("delta = { issuing = 0 }", ">= 1"), ("delta = { issuing = 1441 }", "<= 1440")):
        (tmp_path / "donjon.toml").write_text(f"[crl]\n{bad}\n")
        with pytest.raises(cfgmod.ConfigError, match=word) as e:
            cfgmod.load(str(tmp_path))
        assert "\n" not in str(e.value).strip() or "Traceback" not in str(e.value)


def test_the_agent_publishes_a_crl_only_under_its_own_name():
    """A compromised Factory naming a full CRL as the delta (or a shard as another shard, or as the
    complete CRL) would make relying parties read the wrong scope: the agent refuses it (parked)."""
    from appliance.distribution.publish import Job, PublishError, object_name, verify
    ca = _Ca()
    url = "http://127.0.0.1:9/crl/ca.crl"
    full = ca.crl(20, [], freshest_crl_url=C.delta_url(url))
    delta = ca.crl(21, [(2002, NOW - 10, 8, None)], delta_base=20)
    shard1 = ca.crl(3, [], idp_der=C.idp_der(C.shard_url(url, 1, 4)))
    der = ca.cert.public_bytes(serialization.Encoding.DER)

    def job(data: bytes, number: int, part: str) -> Job:
        return Job(action="crl", ca="ca", ca_root=True, issuer=der, subject={}, number=number, data=data, part=part)
    for data, number, part in ((full, 20, ""), (delta, 21, "-delta"), (shard1, 3, "-1")):
        verify(job(data, number, part))  # each under its own name
    assert [object_name(job(full, 20, p)) for p in ("", "-1", "-delta")] == ["ca.crl", "ca-1.crl", "ca-delta.crl"]
    for data, number, part, why in ((full, 20, "-delta", "full CRL sent as ca-delta.crl"),
                                    (delta, 21, "", "delta CRL sent as ca.crl"),
                                    (delta, 21, "-2", "delta CRL sent as ca-2.crl"),
                                    (shard1, 3, "-2", "IDP does not name ca-2.crl"),
                                    (full, 20, "-0", "IDP does not name ca-0.crl"),
                                    (shard1, 3, "", "a CRL shard sent as ca.crl")):
        with pytest.raises(PublishError, match=why) as e:
            verify(job(data, number, part))
        assert e.value.permanent

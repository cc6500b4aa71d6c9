"""Regenerate the crafted CSRs in this folder: python tests/data/csr/make.py

Good requests (good-*.der) pass policy.csr.check_csr under the profile their name says; every
bad-*.der is refused for exactly one reason (the table in tests/unit/test_policy_csr.py).
Keys are throwaway: nothing here is secret.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

from asn1crypto import csr as acsr
from asn1crypto import keys as akeys
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent


def cn(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def make(key, subject: x509.Name, sans: list[x509.GeneralName] | None = None, extra=()) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, critical in extra:
        b = b.add_extension(ext, critical=critical)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.DER)


def _is_probable_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(40):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_prime(n: int) -> int:
    n |= 1
    while not _is_probable_prime(n):
        n += 2
    return n


def fermat_key() -> rsa.RSAPrivateKey:
    """RSA-2048 with p and q adjacent primes: n falls to Fermat's method in one round."""
    e = 65537
    start = math.isqrt(2**2047) + secrets.randbelow(2**64)
    while True:
        p = _next_prime(start)
        q = _next_prime(p + 2)
        if math.gcd(e, (p - 1) * (q - 1)) == 1 and (p * q).bit_length() == 2048:
            break
        start = q + 2
    d = pow(e, -1, (p - 1) * (q - 1))
    pub = rsa.RSAPublicNumbers(e, p * q)
    priv = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), pub
    )
    return priv.private_key()


def duplicate_extension_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Two subjectAltName extensions in one extensionRequest: cryptography's builder refuses to make it."""
    san = ax509.Extension(
        {"extn_id": "subject_alt_name", "critical": False, "extn_value": [ax509.GeneralName("dns_name", "a.example.com")]}
    )
    san2 = ax509.Extension(
        {"extn_id": "subject_alt_name", "critical": False, "extn_value": [ax509.GeneralName("dns_name", "b.example.com")]}
    )
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = acsr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": ax509.Name.build({"common_name": "dup.example.com"}),
            "subject_pk_info": akeys.PublicKeyInfo.load(spki),
            "attributes": [{"type": "extension_request", "values": [[san, san2]]}],
        }
    )
    sig = key.sign(info.dump(), ec.ECDSA(hashes.SHA256()))
    req = acsr.CertificationRequest(
        {"certification_request_info": info, "signature_algorithm": {"algorithm": "sha256_ecdsa"}, "signature": sig}
    )
    return req.dump()


def sha1_signed_csr() -> bytes:
    """cryptography refuses to sign with SHA-1; openssl still does, as old clients do."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["openssl", "req", "-new", "-sha1", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", f"{d}/k", "-subj", "/", "-addext", "subjectAltName=DNS:www.example.com",
                        "-outform", "DER", "-out", f"{d}/r"], check=True, capture_output=True)
        return Path(f"{d}/r").read_bytes()


def main() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    rsa2048 = rsa.generate_private_key(65537, 2048)
    www = [x509.DNSName("www.example.com")]
    files: dict[str, bytes] = {}

    # Good: tls-client allows every key type and a CN; tls-server takes no subject at all.
    keys = {
        "rsa2048": rsa2048,
        "rsa3072": rsa.generate_private_key(65537, 3072),
        "rsa4096": rsa.generate_private_key(65537, 4096),
        "p256": p256,
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    for name, key in keys.items():
        files[f"good-tls-client-{name}.der"] = make(key, cn("client.example.com"), [x509.DNSName("client.example.com")])
    files["good-tls-server-p256.der"] = make(
        p256, x509.Name([]), [x509.DNSName("www.example.com"), x509.DNSName("*.api.example.com"), x509.IPAddress(__import__("ipaddress").ip_address("8.8.8.8"))]
    )
    files["good-user-auth-p256.der"] = make(
        p256,
        x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"), x509.NameAttribute(NameOID.COMMON_NAME, "Alice Martin")]),
        [x509.RFC822Name("alice@example.com")],
    )

    # Bad.
    good = make(rsa2048, x509.Name([]), www)
    flipped = bytearray(good)
    flipped[-1] ^= 0x01  # last octet of the RSA signature BIT STRING
    files["bad-signature.der"] = bytes(flipped)
    files["bad-rsa-exponent-3.der"] = make(rsa.generate_private_key(3, 2048), x509.Name([]), www)
    files["bad-rsa-1024.der"] = make(rsa.generate_private_key(65537, 1024), x509.Name([]), www)
    files["bad-rsa-fermat.der"] = make(fermat_key(), x509.Name([]), www)
    files["bad-ec-p521.der"] = make(ec.generate_private_key(ec.SECP521R1()), x509.Name([]), www)
    files["bad-unknown-extension.der"] = make(
        p256, x509.Name([]), www, [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), False)]
    )
    files["bad-critical-unknown-extension.der"] = make(
        p256, x509.Name([]), www, [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\x05\x00"), True)]
    )
    files["bad-ca-true.der"] = make(p256, x509.Name([]), www, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    files["bad-duplicate-extension.der"] = duplicate_extension_csr(p256)
    files["bad-san-email-type.der"] = make(p256, x509.Name([]), www + [x509.RFC822Name("alice@example.com")])
    files["bad-wildcard-middle.der"] = make(p256, x509.Name([]), [x509.DNSName("www.*.example.com")])
    files["bad-missing-cn.der"] = make(
        p256, x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example")]), [x509.DNSName("client.example.com")]
    )
    files["bad-repeated-cn.der"] = make(
        p256,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.COMMON_NAME, "b")]),
        [x509.DNSName("client.example.com")],
    )
    # cryptography refuses to build this; _validate=False makes what a hostile client would send.
    files["bad-cn-too-long.der"] = make(p256, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a" * 65, _validate=False)]), [x509.DNSName("client.example.com")])
    files["bad-no-san.der"] = make(p256, x509.Name([]), None)
    files["bad-truncated.der"] = good[: len(good) // 2]
    files["bad-empty.der"] = b""
    files["bad-sha1-signature.der"] = sha1_signed_csr()

    for name, data in files.items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()

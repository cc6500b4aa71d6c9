"""SCEP (RFC 8894) messages, sans-IO: GetCACaps/GetCACert answers, pkiMessage parsing and CertRep building."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Protocol

from asn1crypto import algos, cms, core, parser, x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding as sympad
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES  # only when configured for old devices
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding

# asn1crypto does the CMS structures (SignedData with authenticated attributes, EnvelopedData):
# cryptography's pkcs7 module can neither add SCEP's signed attributes nor decrypt with an HSM key.
# The cryptographic operations themselves stay in cryptography (and the token for the RA keys).

MAX_MESSAGE = 64 * 1024  # a pkiMessage carries one CSR: larger is refused before parsing

# SCEP's attribute OIDs (id-VeriSign pki attributes) and RFC 8894's failInfoText.
_SCEP_ATTRS = {
    "2.16.840.1.113733.1.9.2": "scep_message_type",
    "2.16.840.1.113733.1.9.3": "scep_pki_status",
    "2.16.840.1.113733.1.9.4": "scep_fail_info",
    "2.16.840.1.113733.1.9.5": "scep_sender_nonce",
    "2.16.840.1.113733.1.9.6": "scep_recipient_nonce",
    "2.16.840.1.113733.1.9.7": "scep_transaction_id",
    "1.3.6.1.5.5.7.24.1": "scep_fail_info_text",
}


class _SetOfPrintable(core.SetOf):
    _child_spec = core.PrintableString


class _SetOfOctets(core.SetOf):
    _child_spec = core.OctetString


class _SetOfUtf8(core.SetOf):
    _child_spec = core.UTF8String


for _oid, _name in _SCEP_ATTRS.items():
    cms.CMSAttributeType._map[_oid] = _name
    cms.CMSAttributeType._reverse_map = None  # rebuilt lazily by asn1crypto on next use
for _name in ("scep_message_type", "scep_pki_status", "scep_fail_info", "scep_transaction_id"):
    cms.CMSAttribute._oid_specs[_name] = _SetOfPrintable
for _name in ("scep_sender_nonce", "scep_recipient_nonce"):
    cms.CMSAttribute._oid_specs[_name] = _SetOfOctets
cms.CMSAttribute._oid_specs["scep_fail_info_text"] = _SetOfUtf8


class IssuerAndSubject(core.Sequence):
    _fields = [("issuer", ax509.Name), ("subject", ax509.Name)]


# messageType values
CERT_REP, RENEWAL_REQ, PKCS_REQ, CERT_POLL, GET_CERT, GET_CRL = "3", "17", "19", "20", "21", "22"
MESSAGE_NAMES = {PKCS_REQ: "PKCSReq", RENEWAL_REQ: "RenewalReq", CERT_POLL: "CertPoll", GET_CERT: "GetCert", GET_CRL: "GetCRL"}
# pkiStatus and failInfo values
SUCCESS, FAILURE, PENDING = "0", "2", "3"
BAD_ALG, BAD_MESSAGE_CHECK, BAD_REQUEST, BAD_TIME, BAD_CERT_ID = "0", "1", "2", "3", "4"

_STRONG_DIGESTS = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_WEAK_DIGESTS = {"sha1": hashes.SHA1, "md5": hashes.MD5}
_AES = {"aes128_cbc": 16, "aes192_cbc": 24, "aes256_cbc": 32}
_WEAK_CIPHERS = {"tripledes_3key": 24, "des": 8}


class ScepError(Exception):
    """A request that gets a CertRep FAILURE with this failInfo (the text is safe to send and to audit)."""

    def __init__(self, fail_info: str, text: str):
        super().__init__(text)
        self.fail_info = fail_info
        self.text = text


class Malformed(Exception):
    """Not a pkiMessage we can answer at all (no verifiable signer): HTTP 400, one line."""


class RaKeys(Protocol):
    """The RA's two keys: one to sign CertReps, one to decrypt requests (separate, both in the gateway's token)."""

    sign_cert: x509.Certificate
    decrypt_cert: x509.Certificate

    def sign(self, data: bytes, digest: str) -> bytes: ...  # RSA PKCS#1 v1.5 over data with this digest

    def decrypt(self, ciphertext: bytes) -> bytes: ...  # RSA PKCS#1 v1.5 key transport


@dataclass(frozen=True)
class Algorithms:
    """What the gateway accepts; DES/3DES and MD5/SHA-1 only when configured (old devices)."""

    allow_des: bool = False
    allow_weak_digest: bool = False

    def caps(self, renewal: bool = True) -> str:
        caps = ["AES", "SHA-256", "SHA-512", "POSTPKIOperation", "SCEPStandard"]
        if renewal:
            caps.append("Renewal")
        if self.allow_des:
            caps.append("DES3")
        if self.allow_weak_digest:
            caps.append("SHA-1")
        return "\n".join(caps) + "\n"


@dataclass
class Request:
    """A verified and decrypted pkiMessage."""

    message_type: str
    transaction_id: str
    sender_nonce: bytes
    signer_cert: x509.Certificate  # the certificate that signed the request (self-signed for PKCSReq)
    digest: str  # digest algorithm the client used: the reply uses the same
    cipher: str  # content-encryption algorithm the client used: the reply uses the same
    csr: x509.CertificateSigningRequest | None = None  # PKCSReq, RenewalReq
    csr_der: bytes = b""
    issuer_der: bytes = b""  # CertPoll, GetCert, GetCRL
    subject_der: bytes = b""  # CertPoll
    serial: int | None = None  # GetCert, GetCRL
    challenge: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return MESSAGE_NAMES.get(self.message_type, self.message_type)


# ---------------------------------------------------------------------- GetCACert


def ca_cert_response(ca_chain: list[bytes], ra_certs: list[bytes]) -> tuple[str, bytes]:
    """GetCACert: the CA certificate alone, or with RA certificates a degenerate certs-only SignedData
    (RFC 8894 §4.2.1.2; a SET OF, so DER orders it: clients choose the RA certificate by its key usage)."""
    if not ra_certs:
        return "application/x-x509-ca-cert", ca_chain[0]
    return "application/x-x509-ca-ra-cert", certs_only([*ra_certs, *ca_chain])


def certs_only(certs: list[bytes], crls: list[bytes] | None = None) -> bytes:
    sd = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [],
        "encap_content_info": {"content_type": "data"},
        "certificates": [ax509.Certificate.load(c) for c in certs],
        "signer_infos": [],
        **({"crls": [cms.RevocationInfoChoice({"crl": _load_crl(c)}) for c in crls]} if crls else {}),
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()


def _load_crl(der: bytes):
    from asn1crypto import crl as acrl
    return acrl.CertificateList.load(der)


# ---------------------------------------------------------------------- PKIOperation in


def decode_get_message(value: str) -> bytes:
    """PKIOperation by GET: message=<base64>, URL-decoded already; bounded before decoding."""
    if len(value) > MAX_MESSAGE * 4 // 3 + 8:
        raise Malformed("message too large")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except ValueError:
        raise Malformed("message is not base64") from None


def parse(der: bytes, ra: RaKeys, algs: Algorithms) -> Request:
    """Check the outer signature, then decrypt the envelope. Raises Malformed (no answer can be signed
    for it) or ScepError (answer a CertRep FAILURE: the request's transaction is known)."""
    if len(der) > MAX_MESSAGE:
        raise Malformed("message too large")
    try:
        outer = _verify_outer(der, algs)
    except (Malformed, ScepError):
        raise
    except Exception:  # noqa: BLE001 - any decoder failure on hostile input is "malformed"
        raise Malformed("not a SCEP pkiMessage") from None
    req, envelope = outer
    if req.message_type not in MESSAGE_NAMES:
        raise ScepError(BAD_REQUEST, f"unsupported messageType {req.message_type[:8]}")
    try:
        inner, req.cipher = _decrypt_envelope(envelope, ra, algs)
    except ScepError as e:
        e.request = req  # type: ignore[attr-defined]
        raise
    except Exception:  # noqa: BLE001
        err = ScepError(BAD_MESSAGE_CHECK, "the envelope does not decrypt")
        err.request = req  # type: ignore[attr-defined]
        raise err from None
    try:
        _read_payload(req, inner)
    except ScepError as e:
        e.request = req  # type: ignore[attr-defined]
        raise
    except Exception:  # noqa: BLE001
        err = ScepError(BAD_REQUEST, f"{req.name}: malformed content")
        err.request = req  # type: ignore[attr-defined]
        raise err from None
    return req


def request_of(err: ScepError) -> Request | None:
    """The request a ScepError belongs to, when its signature was good (a CertRep can answer it)."""
    return getattr(err, "request", None)


def _attr(attrs, name: str):
    found = [a for a in attrs if a["type"].native == name]
    if len(found) != 1 or len(found[0]["values"]) != 1:
        return None
    return found[0]["values"][0].native


def _verify_outer(der: bytes, algs: Algorithms) -> tuple[Request, bytes]:
    ci = cms.ContentInfo.load(der, strict=True)
    if ci["content_type"].native != "signed_data":
        raise Malformed("not a SignedData")
    sd = ci["content"]
    if sd["encap_content_info"]["content_type"].native != "data":
        raise Malformed("SignedData does not carry data")
    content = sd["encap_content_info"]["content"].native or b""
    infos = sd["signer_infos"]
    if len(infos) != 1:
        raise Malformed("a pkiMessage has exactly one signer")
    si = infos[0]
    attrs = si["signed_attrs"]
    if not attrs:
        raise Malformed("no authenticated attributes")
    mtype = _attr(attrs, "scep_message_type")
    tid = _attr(attrs, "scep_transaction_id")
    nonce = _attr(attrs, "scep_sender_nonce")
    if not isinstance(mtype, str) or not isinstance(tid, str) or not isinstance(nonce, bytes):
        raise Malformed("messageType, transactionID and senderNonce are required")
    if not (0 < len(tid) <= 128) or not (8 <= len(nonce) <= 64):
        raise Malformed("transactionID or senderNonce out of bounds")
    signer = _signer_cert(sd, si)
    digest = si["digest_algorithm"]["algorithm"].native
    hash_cls = _STRONG_DIGESTS.get(digest) or (_WEAK_DIGESTS.get(digest) if algs.allow_weak_digest else None)
    req = Request(mtype, tid, nonce, signer, digest, "")
    if hash_cls is None:
        err = ScepError(BAD_ALG, f"digest {digest} is not accepted")
        # Signature not verified yet: a refusal without a content is all such a request can get.
        err.request = req  # type: ignore[attr-defined]
        raise err
    md = _attr(attrs, "message_digest")
    h = hashes.Hash(hash_cls())
    h.update(content)
    if not isinstance(md, bytes) or not hmac.compare_digest(md, h.finalize()):
        raise Malformed("messageDigest does not match the content")
    ctype = _attr(attrs, "content_type")
    if ctype != "data":
        raise Malformed("contentType attribute is not data")
    raw = attrs.dump()
    signed = b"\x31" + raw[1:]  # the signature covers the attributes as a SET OF, not as [0] IMPLICIT
    sig_alg = si["signature_algorithm"]["algorithm"].native
    if sig_alg not in ("rsassa_pkcs1v15", f"{digest}_rsa", "rsa"):
        raise Malformed(f"signature algorithm {sig_alg} not accepted")
    pub = signer.public_key()
    if not isinstance(pub, rsa.RSAPublicKey):
        raise Malformed("SCEP requesters sign with RSA keys")
    try:
        pub.verify(si["signature"].native, signed, padding.PKCS1v15(), hash_cls())
    except Exception:  # noqa: BLE001 - InvalidSignature and friends
        raise Malformed("the pkiMessage signature does not verify") from None
    return req, content


def _signer_cert(sd, si) -> x509.Certificate:
    sid = si["sid"]
    for c in sd["certificates"] or []:
        if c.name != "certificate":
            continue
        cert = c.chosen
        if sid.name == "issuer_and_serial_number":
            ok = (cert.issuer == sid.chosen["issuer"] and cert.serial_number == sid.chosen["serial_number"].native)
        else:
            ok = cert.key_identifier == sid.chosen.native
        if ok:
            return x509.load_der_x509_certificate(cert.dump())
    raise Malformed("the signer's certificate is not in the message")


def _decrypt_envelope(der: bytes, ra: RaKeys, algs: Algorithms) -> tuple[bytes, str]:
    ci = cms.ContentInfo.load(der, strict=True)
    if ci["content_type"].native != "enveloped_data":
        raise ScepError(BAD_REQUEST, "pkcsPKIEnvelope is not EnvelopedData")
    env = ci["content"]
    eci = env["encrypted_content_info"]
    alg = eci["content_encryption_algorithm"]
    name = alg["algorithm"].native
    if name in _AES:
        key_len, block = _AES[name], algorithms.AES
    elif name in _WEAK_CIPHERS and algs.allow_des:
        key_len, block = _WEAK_CIPHERS[name], TripleDES
    else:
        raise ScepError(BAD_ALG, f"content encryption {name} is not accepted")
    iv = alg["parameters"].native
    ours = ra.decrypt_cert
    ri = None
    for r in env["recipient_infos"]:
        if r.name != "ktri":
            continue
        rid = r.chosen["rid"]
        if rid.name == "issuer_and_serial_number":
            match = (rid.chosen["serial_number"].native == ours.serial_number
                     and rid.chosen["issuer"].dump() == ours.issuer.public_bytes())
        else:
            ski = ours.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            match = rid.chosen.native == ski
        if match:
            ri = r.chosen
            break
    if ri is None:
        raise ScepError(BAD_MESSAGE_CHECK, "not encrypted to this RA")
    if ri["key_encryption_algorithm"]["algorithm"].native not in ("rsaes_pkcs1v15", "rsa"):
        raise ScepError(BAD_ALG, "key transport must be RSA PKCS#1 v1.5")
    # Implicit rejection: a key that fails to decrypt is replaced by a random one, so that a bad
    # padding and a bad content fail alike later (no Bleichenbacher oracle on the RA key).
    try:
        cek = ra.decrypt(ri["encrypted_key"].native)
    except Exception:  # noqa: BLE001
        cek = b""
    if len(cek) != key_len:
        cek = os.urandom(key_len)
    data = _encrypted_content(eci.contents)
    if not isinstance(iv, bytes) or len(iv) != block.block_size // 8 or not data or len(data) % (block.block_size // 8):
        raise ScepError(BAD_MESSAGE_CHECK, "the envelope does not decrypt")
    dec = Cipher(block(cek * 3 if len(cek) == 8 else cek), modes.CBC(iv)).decryptor()  # DES is 3DES with K1=K2=K3
    padded = dec.update(data) + dec.finalize()
    unpad = sympad.PKCS7(block.block_size).unpadder()
    try:
        return unpad.update(padded) + unpad.finalize(), name
    except ValueError:
        raise ScepError(BAD_MESSAGE_CHECK, "the envelope does not decrypt") from None


def _encrypted_content(eci_contents: bytes, depth: int = 0) -> bytes:
    """The [0] encryptedContent of an EncryptedContentInfo, primitive or constructed (BER: Go's pkcs7,
    which micromdm's client uses, sends it as a constructed OCTET STRING that asn1crypto refuses)."""
    if depth > 4:
        raise ValueError("constructed OCTET STRING nested too deep")
    out = b""
    for cls, method, tag, contents in _children(eci_contents):
        if depth == 0 and not (cls == 2 and tag == 0):
            continue  # contentType, contentEncryptionAlgorithm
        if method == 0:
            out += contents
        else:
            out += _encrypted_content(contents, depth + 1)
        if depth == 0:
            break
    return out


def _children(data: bytes):
    while data:
        n = parser.peek(data)
        cls, method, tag, _, contents, _ = parser.parse(data[:n])
        yield cls, method, tag, contents
        data = data[n:]


def _read_payload(req: Request, inner: bytes) -> None:
    t = req.message_type
    if t in (PKCS_REQ, RENEWAL_REQ):
        req.csr_der = inner
        req.csr = x509.load_der_x509_csr(inner)
        if req.csr.public_bytes(Encoding.DER) != inner:
            raise ScepError(BAD_REQUEST, "the CSR is not DER")
        if not req.csr.is_signature_valid:
            raise ScepError(BAD_MESSAGE_CHECK, "the CSR signature does not verify")
        try:
            pw = req.csr.attributes.get_attribute_for_oid(x509.oid.AttributeOID.CHALLENGE_PASSWORD).value
            req.challenge = pw.decode("utf-8") if isinstance(pw, bytes) else str(pw)
        except x509.AttributeNotFound:
            req.challenge = None
    elif t == CERT_POLL:
        ias = IssuerAndSubject.load(inner, strict=True)
        req.issuer_der = ias["issuer"].dump()
        req.subject_der = ias["subject"].dump()
    else:
        ias2 = cms.IssuerAndSerialNumber.load(inner, strict=True)
        req.issuer_der = ias2["issuer"].dump()
        req.serial = ias2["serial_number"].native


# ---------------------------------------------------------------------- CertRep out


def cert_rep(req: Request, ra: RaKeys, status: str, *, fail_info: str | None = None, text: str | None = None,
             certs: list[bytes] | None = None, crl: bytes | None = None) -> bytes:
    """A CertRep answering `req`: SUCCESS carries the certificate (or CRL) in a certs-only SignedData
    encrypted to the requester's signing certificate; FAILURE carries failInfo; PENDING nothing."""
    content = b""
    if status == SUCCESS:
        degenerate = certs_only(certs or [], [crl] if crl else None)
        content = _envelope(degenerate, req.signer_cert, req.cipher or "aes128_cbc")
    attrs = [
        _a("content_type", "data"),
        _a("message_digest", _digest(req.digest if req.digest in _STRONG_DIGESTS or req.digest in _WEAK_DIGESTS else "sha256", content)),
        _a("scep_message_type", CERT_REP),
        _a("scep_pki_status", status),
        _a("scep_transaction_id", req.transaction_id),
        _a("scep_recipient_nonce", req.sender_nonce),
        _a("scep_sender_nonce", os.urandom(16)),
    ]
    if status == FAILURE:
        attrs.append(_a("scep_fail_info", fail_info or BAD_REQUEST))
        if text:
            attrs.append(_a("scep_fail_info_text", text[:200]))
    return _signed(content, attrs, ra, req.digest)


def _a(name: str, value) -> cms.CMSAttribute:
    return cms.CMSAttribute({"type": name, "values": [value]})


def _digest(name: str, data: bytes) -> bytes:
    return hashlib.new(name, data).digest()


def _signed(content: bytes, attrs: list, ra: RaKeys, digest: str) -> bytes:
    if digest not in _STRONG_DIGESTS and digest not in _WEAK_DIGESTS:
        digest = "sha256"
    signed_attrs = cms.CMSAttributes(attrs)
    sig = ra.sign(b"\x31" + signed_attrs.dump()[1:], digest)
    cert = ax509.Certificate.load(ra.sign_cert.public_bytes(Encoding.DER))
    si = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": cert.issuer, "serial_number": cert.serial_number})}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest}),
        "signed_attrs": signed_attrs,
        "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
        "signature": sig,
    })
    # An empty eContent rather than none on FAILURE and PENDING: OpenSSL's PKCS7_verify (certmonger's
    # scep-submit) refuses a SignedData without content ("no content").
    eci: dict = {"content_type": "data", "content": content}
    sd = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest})],
        "encap_content_info": eci,
        "certificates": [cert],
        "signer_infos": [si],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()


def _envelope(data: bytes, recipient: x509.Certificate, cipher: str) -> bytes:
    pub = recipient.public_key()
    if not isinstance(pub, rsa.RSAPublicKey):
        raise ScepError(BAD_ALG, "the requester's certificate has no RSA key to encrypt to")
    key_len = _AES.get(cipher) or _WEAK_CIPHERS.get(cipher) or 16
    block = algorithms.AES if cipher in _AES or cipher not in _WEAK_CIPHERS else TripleDES
    if cipher not in _AES and cipher not in _WEAK_CIPHERS:
        cipher = "aes128_cbc"
    cek, iv = os.urandom(key_len), os.urandom(block.block_size // 8)
    pad = sympad.PKCS7(block.block_size).padder()
    enc = Cipher(block(cek * 3 if len(cek) == 8 else cek), modes.CBC(iv)).encryptor()
    ct = enc.update(pad.update(data) + pad.finalize()) + enc.finalize()
    rc = ax509.Certificate.load(recipient.public_bytes(Encoding.DER))
    ri = cms.RecipientInfo({"ktri": cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": cms.RecipientIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": rc.issuer, "serial_number": rc.serial_number})}),
        "key_encryption_algorithm": cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"}),
        "encrypted_key": pub.encrypt(cek, padding.PKCS1v15()),
    })})
    env = cms.EnvelopedData({
        "version": "v0",
        "recipient_infos": [ri],
        "encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": cipher, "parameters": iv},
            "encrypted_content": ct,
        },
    })
    return cms.ContentInfo({"content_type": "enveloped_data", "content": env}).dump()

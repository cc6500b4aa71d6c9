"""CMP PKIMessage decoding (bounded, DER only) and building (RFC 9810/4210, Lightweight CMP profile RFC 9483)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pyasn1.codec.der import decoder, encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, univ
from pyasn1_alt_modules import rfc4211, rfc5280, rfc8018, rfc9810

from policy.cmpmac import DIGESTS, HMACS, MacSpec

MAX_MESSAGE = 64 * 1024  # a PKIMessage with one request and a short chain is a few KiB
NONCE_LEN = 16

# PKIFailureInfo bit numbers (RFC 9810 §5.2.3).
BAD_ALG, BAD_MESSAGE_CHECK, BAD_REQUEST, BAD_TIME, BAD_CERT_ID, BAD_DATA_FORMAT, WRONG_AUTHORITY = 0, 1, 2, 3, 4, 5, 6
BAD_POP, CERT_REVOKED, CERT_CONFIRMED, WRONG_INTEGRITY, BAD_RECIPIENT_NONCE = 9, 10, 11, 12, 13
BAD_SENDER_NONCE, BAD_CERT_TEMPLATE, SIGNER_NOT_TRUSTED, TRANSACTION_ID_IN_USE, UNSUPPORTED_VERSION = 18, 19, 20, 21, 22
NOT_AUTHORIZED, SYSTEM_UNAVAIL, SYSTEM_FAILURE, DUPLICATE_CERT_REQ = 23, 24, 25, 26

# PKIStatus values.
ACCEPTED, GRANTED_WITH_MODS, REJECTION, WAITING = 0, 1, 2, 3

ID_PBM = "1.2.840.113533.7.66.13"
ID_PBMAC1 = str(rfc8018.id_PBMAC1)
ID_PBKDF2 = str(rfc8018.id_PBKDF2)
IT_IMPLICIT_CONFIRM = rfc9810.id_it_implicitConfirm
IT_CERT_PROFILE = rfc9810.id_it_certProfile

REQUEST_BODIES = ("ir", "cr", "p10cr", "kur", "rr", "genm", "certConf", "pollReq", "error")


class CmpError(Exception):
    """A request Donjon answers with a CMP error message: failure bit and a one-line reason (safe to send)."""

    def __init__(self, fail_bit: int, reason: str) -> None:
        super().__init__(reason)
        self.fail_bit = fail_bit
        self.reason = reason


@dataclass(frozen=True)
class CertReq:
    """One certificate request out of ir/cr/kur (CRMF) or p10cr (PKCS#10)."""

    cert_req_id: int
    spki_der: bytes
    subject_der: bytes | None  # DER of the template's Name, None when absent
    extensions_der: bytes | None  # DER of the template's Extensions
    csr_der: bytes | None = None  # p10cr: the whole CSR
    popo: str = "signature"  # signature | raVerified | none | other
    popo_alg: str = ""
    popo_sig: bytes = b""
    popo_input: bytes = b""  # the DER the POPO signature covers (the CertRequest)


@dataclass(frozen=True)
class Request:
    """A decoded, structurally checked PKIMessage from a client, with what protection checking needs."""

    body_type: str
    pvno: int
    sender_der: bytes
    recipient_der: bytes
    transaction_id: bytes
    sender_nonce: bytes
    recip_nonce: bytes | None
    sender_kid: bytes | None
    message_time: datetime | None
    implicit_confirm: bool
    cert_profile: str | None
    protection_alg_oid: str | None
    protection_alg_der: bytes | None
    protection: bytes | None
    protected_part: bytes  # DER of ProtectedPart {header, body}: what the protection covers
    extra_certs: tuple[bytes, ...]
    cert_reqs: tuple[CertReq, ...] = ()
    revocations: tuple[tuple[bytes, int, int | None], ...] = ()  # (issuer Name DER, serial, reason code)
    info_types: tuple[str, ...] = ()
    cert_confirms: tuple[tuple[int, bytes, int | None, str | None], ...] = ()  # (certReqId, certHash, status, hashAlg OID)
    poll_ids: tuple[int, ...] = ()


def _der(value: object) -> bytes:
    return bytes(encoder.encode(value))


def decode(data: bytes) -> Request:
    """Decode one PKIMessage from untrusted bytes; any defect raises CmpError (never another exception)."""
    if len(data) > MAX_MESSAGE:
        raise CmpError(BAD_DATA_FORMAT, "message too large")
    try:
        msg, rest = decoder.decode(data, asn1Spec=rfc9810.PKIMessage())
        if rest:
            raise CmpError(BAD_DATA_FORMAT, "trailing data after the PKIMessage")
        # DER only: the protection is computed over the re-encoded parts, so they must be the bytes received.
        if _der(msg) != data:
            raise CmpError(BAD_DATA_FORMAT, "message is not DER")
        return _parse(msg, data)
    except CmpError:
        raise
    except (PyAsn1Error, ValueError, TypeError, OverflowError, IndexError, KeyError, AttributeError, RecursionError) as exc:
        # pyasn1 raises more than PyAsn1Error on hostile input (FIELD-NOTES: OverflowError on a huge length).
        raise CmpError(BAD_DATA_FORMAT, "malformed PKIMessage") from exc


def _opt(seq: univ.Sequence, name: str) -> object | None:
    v = seq[name]
    return v if v.isValue else None


def _tlv_len(buf: bytes, pos: int) -> int:
    """The length of the whole TLV at buf[pos] (DER, checked by the caller's decode)."""
    n = buf[pos + 1]
    if n < 0x80:
        return 2 + n
    k = n & 0x7F
    return 2 + k + int.from_bytes(buf[pos + 2:pos + 2 + k], "big")


def _protected_part(data: bytes) -> bytes:
    """DER of ProtectedPart {header, body}: the message's first two elements as received (they are DER)."""
    inner = _inner(data)
    h = _tlv_len(inner, 0)
    b = _tlv_len(inner, h)
    return _wrap(0x30, inner[:h + b])


def _parse(msg: rfc9810.PKIMessage, data: bytes) -> Request:
    h = msg["header"]
    body = msg["body"]
    body_type = body.getName()
    if body_type not in REQUEST_BODIES:
        raise CmpError(BAD_REQUEST, f"unexpected body type {body_type}")
    pvno = int(h["pvno"])
    if pvno not in (2, 3):
        raise CmpError(UNSUPPORTED_VERSION, f"unsupported pvno {pvno}")
    tid = _opt(h, "transactionID")
    nonce = _opt(h, "senderNonce")
    if tid is None or not 16 <= len(tid) <= 64:
        raise CmpError(BAD_REQUEST, "transactionID missing or not 16..64 bytes")
    if nonce is None or not 16 <= len(nonce) <= 64:
        raise CmpError(BAD_SENDER_NONCE, "senderNonce missing or not 16..64 bytes")
    recip_nonce = _opt(h, "recipNonce")
    kid = _opt(h, "senderKID")
    mt = _opt(h, "messageTime")
    implicit, profile = False, None
    gi = _opt(h, "generalInfo")
    for itav in gi or ():
        if itav["infoType"] == IT_IMPLICIT_CONFIRM:
            implicit = True
        elif itav["infoType"] == IT_CERT_PROFILE and itav["infoValue"].isValue:
            names, _ = decoder.decode(bytes(itav["infoValue"]), asn1Spec=rfc9810.CertProfileValue())
            if len(names) != 1:
                raise CmpError(BAD_REQUEST, "certProfile must name exactly one profile")
            profile = str(names[0])[:64]
    palg = _opt(h, "protectionAlg")
    prot = _opt(msg, "protection")
    if (palg is None) != (prot is None):
        raise CmpError(BAD_MESSAGE_CHECK, "protectionAlg and protection must come together")
    extra = tuple(_der(c) for c in (_opt(msg, "extraCerts") or ()))
    if len(extra) > 8:
        raise CmpError(BAD_REQUEST, "too many extraCerts")
    fields: dict[str, object] = {}
    content = body[body_type]
    if body_type in ("ir", "cr", "kur"):
        fields["cert_reqs"] = _crmf(content)
    elif body_type == "p10cr":
        csr_der = _inner(_der(content))  # p10cr is [4] EXPLICIT CertificationRequest
        try:
            csr = x509.load_der_x509_csr(csr_der)
            spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            subject = csr.subject.public_bytes()
        except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError) as exc:
            raise CmpError(BAD_DATA_FORMAT, "unreadable PKCS#10 request") from exc
        fields["cert_reqs"] = (CertReq(cert_req_id=-1, spki_der=spki, subject_der=subject, extensions_der=None, csr_der=csr_der, popo="csr"),)
    elif body_type == "rr":
        fields["revocations"] = _revocations(content)
    elif body_type == "genm":
        if len(content) > 8:
            raise CmpError(BAD_REQUEST, "too many InfoTypeAndValue in genm")
        fields["info_types"] = tuple(str(itav["infoType"]) for itav in content)
    elif body_type == "certConf":
        if len(content) > 1:
            raise CmpError(BAD_REQUEST, "one CertStatus per certConf")
        fields["cert_confirms"] = tuple(
            (int(cs["certReqId"]), bytes(cs["certHash"]), int(cs["statusInfo"]["status"]) if cs["statusInfo"].isValue else None,
             str(cs["hashAlg"]["algorithm"]) if cs["hashAlg"].isValue else None)
            for cs in content)
    elif body_type == "pollReq":
        if len(content) != 1:
            raise CmpError(BAD_REQUEST, "one certReqId per pollReq")
        fields["poll_ids"] = tuple(int(p["certReqId"]) for p in content)
    return Request(
        body_type=body_type, pvno=pvno, sender_der=_der(h["sender"]), recipient_der=_der(h["recipient"]),
        transaction_id=bytes(tid), sender_nonce=bytes(nonce), recip_nonce=bytes(recip_nonce) if recip_nonce is not None else None,
        sender_kid=bytes(kid) if kid is not None else None,
        message_time=mt.asDateTime.astimezone(timezone.utc) if mt is not None else None,
        implicit_confirm=implicit, cert_profile=profile,
        protection_alg_oid=str(palg["algorithm"]) if palg is not None else None,
        protection_alg_der=_plain_alg(palg) if palg is not None else None,
        protection=prot.asOctets() if prot is not None else None,
        protected_part=_protected_part(data), extra_certs=extra, **fields,  # type: ignore[arg-type]
    )


def _plain_alg(alg: rfc5280.AlgorithmIdentifier) -> bytes:
    """DER of an AlgorithmIdentifier without the header's [1] tag."""
    a = rfc5280.AlgorithmIdentifier()
    a["algorithm"] = alg["algorithm"]
    if alg["parameters"].isValue:
        a["parameters"] = alg["parameters"]
    return _der(a)


def _plain_name(tagged: rfc5280.Name) -> bytes:
    """DER of a Name held under a template's EXPLICIT tag ([3] issuer, [5] subject), as a plain Name."""
    n = rfc5280.Name()
    n["rdnSequence"] = tagged["rdnSequence"]
    return _der(n)


def _crmf(content: rfc4211.CertReqMessages) -> tuple[CertReq, ...]:
    if len(content) != 1:
        raise CmpError(BAD_REQUEST, "exactly one CertReqMsg per request (RFC 9483 §4.1)")
    out = []
    for crm in content:
        cr = crm["certReq"]
        tmpl = cr["certTemplate"]
        if not tmpl["publicKey"].isValue:
            raise CmpError(BAD_CERT_TEMPLATE, "certTemplate has no publicKey (central key generation is not offered)")
        # The template's publicKey is [6] IMPLICIT SubjectPublicKeyInfo: re-encode it as a plain SPKI.
        spki = rfc5280.SubjectPublicKeyInfo()
        spki["algorithm"] = tmpl["publicKey"]["algorithm"]
        spki["subjectPublicKey"] = tmpl["publicKey"]["subjectPublicKey"]
        subject = _plain_name(tmpl["subject"]) if tmpl["subject"].isValue else None
        exts = None
        if tmpl["extensions"].isValue:
            e = rfc5280.Extensions()
            e.extend(list(tmpl["extensions"]))
            exts = _der(e)
        popo, alg, sig, pinput = "none", "", b"", b""
        if crm["popo"].isValue:
            popo = crm["popo"].getName()
            if popo == "signature":
                ps = crm["popo"]["signature"]
                if ps["poposkInput"].isValue:
                    raise CmpError(BAD_POP, "POPOSigningKeyInput is not accepted (the certTemplate must carry subject and key)")
                alg = str(ps["algorithmIdentifier"]["algorithm"])
                sig = ps["signature"].asOctets()
                pinput = _der(cr)
            elif popo != "raVerified":
                popo = "other"
        out.append(CertReq(cert_req_id=int(cr["certReqId"]), spki_der=_der(spki), subject_der=subject, extensions_der=exts,
                           popo=popo, popo_alg=alg, popo_sig=sig, popo_input=pinput))
    return tuple(out)


def _revocations(content: rfc9810.RevReqContent) -> tuple[tuple[bytes, int, int | None], ...]:
    if len(content) != 1:
        raise CmpError(BAD_REQUEST, "exactly one RevDetails per rr (RFC 9483 §4.2)")
    out = []
    for rd in content:
        t = rd["certDetails"]
        if not (t["issuer"].isValue and t["serialNumber"].isValue):
            raise CmpError(BAD_CERT_TEMPLATE, "rr certDetails must name issuer and serialNumber")
        reason = None
        for ext in rd["crlEntryDetails"] if rd["crlEntryDetails"].isValue else ():
            if ext["extnID"] == rfc5280.id_ce_cRLReasons:
                code, _ = decoder.decode(bytes(ext["extnValue"]), asn1Spec=rfc5280.CRLReason())
                reason = int(code)
        out.append((_plain_name(t["issuer"]), int(t["serialNumber"]), reason))
    return tuple(out)


def mac_spec(req: Request) -> MacSpec:
    """The MAC parameters of a MAC-protected request (PasswordBasedMac or PBMAC1), checked against Donjon's bounds."""
    assert req.protection_alg_der is not None
    try:
        alg, _ = decoder.decode(req.protection_alg_der, asn1Spec=rfc5280.AlgorithmIdentifier())
        oid = str(alg["algorithm"])
        if oid == ID_PBM:
            p, _ = decoder.decode(bytes(alg["parameters"]), asn1Spec=rfc9810.PBMParameter())
            spec = MacSpec(kind="pbm", salt=bytes(p["salt"]), iterations=int(p["iterationCount"]),
                           owf=DIGESTS.get(str(p["owf"]["algorithm"]), ""), mac=HMACS.get(str(p["mac"]["algorithm"]), ""))
        elif oid == ID_PBMAC1:
            p, _ = decoder.decode(bytes(alg["parameters"]), asn1Spec=rfc8018.PBMAC1_params())
            if str(p["keyDerivationFunc"]["algorithm"]) != ID_PBKDF2:
                raise CmpError(BAD_ALG, "PBMAC1 key derivation must be PBKDF2")
            k, _ = decoder.decode(bytes(p["keyDerivationFunc"]["parameters"]), asn1Spec=rfc8018.PBKDF2_params())
            if k["salt"].getName() != "specified" or not k["keyLength"].isValue:
                raise CmpError(BAD_ALG, "PBMAC1 needs a specified salt and a keyLength (RFC 9481 §6.1.2)")
            prf = str(k["prf"]["algorithm"]) if k["prf"].isValue else "1.2.840.113549.2.7"
            spec = MacSpec(kind="pbmac1", salt=bytes(k["salt"]["specified"]), iterations=int(k["iterationCount"]),
                           owf=HMACS.get(prf, ""), mac=HMACS.get(str(p["messageAuthScheme"]["algorithm"]), ""), key_len=int(k["keyLength"]))
        else:
            raise CmpError(BAD_ALG, f"protection algorithm {oid} is not a MAC")
    except CmpError:
        raise
    except (PyAsn1Error, ValueError, TypeError, OverflowError, IndexError, KeyError, AttributeError) as exc:
        raise CmpError(BAD_ALG, "malformed MAC parameters") from exc
    try:
        spec.check()
    except ValueError as exc:
        raise CmpError(BAD_ALG, str(exc)) from exc
    return spec


# ---- building responses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Responder:
    """Who answers: the gateway's CMP protection certificate (sender name, key id, extraCerts) and a signer."""

    cert_der: bytes
    subject_der: bytes
    ski: bytes
    sig_alg_der: bytes  # DER AlgorithmIdentifier of the protection signature
    chain_der: tuple[bytes, ...] = ()


def status_info(status: int, reason: str | None = None, fail_bit: int | None = None) -> rfc9810.PKIStatusInfo:
    si = rfc9810.PKIStatusInfo()
    si["status"] = status
    if reason:
        si["statusString"].append(char.UTF8String(reason[:200]))
    if fail_bit is not None:
        bits = [0] * (fail_bit + 1)
        bits[fail_bit] = 1
        si["failInfo"] = rfc9810.PKIFailureInfo(tuple(bits))
    return si


def _cert(der: bytes) -> rfc9810.CMPCertificate:
    c, _ = decoder.decode(der, asn1Spec=rfc9810.CMPCertificate())
    return c


def _inner(tlv: bytes) -> bytes:
    """The content of one DER TLV (an EXPLICIT tag's wrapped value)."""
    n = tlv[1]
    skip = 2 + (n & 0x7F if n & 0x80 else 0)
    return tlv[skip:]


def _wrap(tag: int, content: bytes) -> bytes:
    """DER TLV of `content` under one tag byte."""
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def cert_rep(body_type: str, cert_req_id: int, status: int, cert_der: bytes | None = None, reason: str | None = None,
             fail_bit: int | None = None) -> rfc9810.PKIBody:
    """An ip/cp/kup body: the certificate, or a waiting/rejection status."""
    body = rfc9810.PKIBody()
    resp = rfc9810.CertResponse()
    resp["certReqId"] = cert_req_id
    resp["status"] = status_info(status, reason, fail_bit)
    if cert_der is not None:
        # certificate is [0] EXPLICIT: decode the wrapped DER under the choice rather than copy pyasn1 values across tags.
        coec, _ = decoder.decode(_wrap(0xA0, _der(_cert(cert_der))), asn1Spec=rfc9810.CertOrEncCert())
        resp["certifiedKeyPair"]["certOrEncCert"] = coec
    body[body_type]["response"].append(resp)  # the choice instantiates its tagged component in place
    return body


def rp_body(status: int, reason: str | None = None, fail_bit: int | None = None) -> rfc9810.PKIBody:
    body = rfc9810.PKIBody()
    body["rp"]["status"].append(status_info(status, reason, fail_bit))
    return body


def genp_body(items: list[tuple[object, bytes | None]]) -> rfc9810.PKIBody:
    """genp with (infoType OID, DER of infoValue or None) pairs."""
    body = rfc9810.PKIBody()
    rep = body["genp"]
    for oid, value in items:
        itav = rfc9810.InfoTypeAndValue()
        itav["infoType"] = oid
        if value is not None:
            itav["infoValue"] = univ.Any(value)
        rep.append(itav)
    if not items:
        body["genp"] = rep.clone([])
    return body


def poll_rep_body(cert_req_id: int, check_after: int, reason: str | None = None) -> rfc9810.PKIBody:
    body = rfc9810.PKIBody()
    rep = body["pollRep"]
    item = rep.componentType.clone()
    item["certReqId"] = cert_req_id
    item["checkAfter"] = check_after
    if reason:
        item["reason"].append(char.UTF8String(reason[:200]))
    rep.append(item)
    return body


def pkiconf_body() -> rfc9810.PKIBody:
    body = rfc9810.PKIBody()
    body["pkiconf"] = body["pkiconf"].clone("")
    return body


def error_body(fail_bit: int, reason: str) -> rfc9810.PKIBody:
    body = rfc9810.PKIBody()
    body["error"]["pKIStatusInfo"] = status_info(REJECTION, reason, fail_bit)
    return body


def prepare(responder: Responder, req: Request | None, body: rfc9810.PKIBody, *, nonce: bytes,
            implicit_confirm: bool = False) -> tuple[rfc9810.PKIHeader, bytes]:
    """The response header answering `req` (transactionID, recipNonce, recipient) and the DER it must be signed over."""
    h = rfc9810.PKIHeader()
    h["pvno"] = req.pvno if req is not None else 2
    sender, _ = decoder.decode(responder.subject_der, asn1Spec=rfc5280.Name())
    h["sender"]["directoryName"]["rdnSequence"] = sender["rdnSequence"]
    if req is not None:
        rcpt, _ = decoder.decode(req.sender_der, asn1Spec=rfc5280.GeneralName())
        h["recipient"] = rcpt
    else:
        h["recipient"]["directoryName"]["rdnSequence"] = rfc5280.RDNSequence()
    h["messageTime"] = h["messageTime"].clone(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%SZ"))
    alg, _ = decoder.decode(responder.sig_alg_der, asn1Spec=rfc5280.AlgorithmIdentifier())
    h["protectionAlg"]["algorithm"] = alg["algorithm"]
    if alg["parameters"].isValue:
        h["protectionAlg"]["parameters"] = alg["parameters"]
    h["senderKID"] = h["senderKID"].clone(responder.ski)
    h["transactionID"] = h["transactionID"].clone(req.transaction_id if req is not None else os.urandom(16))
    if req is not None:
        h["recipNonce"] = h["recipNonce"].clone(req.sender_nonce)
    h["senderNonce"] = h["senderNonce"].clone(nonce)
    if implicit_confirm:
        itav = rfc9810.InfoTypeAndValue()
        itav["infoType"] = IT_IMPLICIT_CONFIRM
        itav["infoValue"] = univ.Any(encoder.encode(univ.Null("")))
        h["generalInfo"].append(itav)
    part = rfc9810.ProtectedPart()
    part["header"] = h
    part["body"] = body
    return h, _der(part)


def assemble(responder: Responder, part: bytes, signature: bytes, extra: tuple[bytes, ...] = ()) -> bytes:
    """The response PKIMessage from the signed ProtectedPart's bytes: header and body, the gateway's signature,
    its certificate (and chain, and `extra`) in extraCerts, put together as DER without re-encoding them."""
    seen: list[bytes] = []
    for c in (responder.cert_der, *responder.chain_der, *extra):
        if c not in seen:
            seen.append(c)
    protection = _wrap(0xA0, _wrap(0x03, b"\x00" + signature))  # [0] EXPLICIT BIT STRING, no unused bits
    return _wrap(0x30, _inner(part) + protection + _wrap(0xA1, _wrap(0x30, b"".join(seen))))


# ---- names out of a CRMF template, as the Factory's structured enrolment wants them ----------------------

_ATTR_NAMES = {"2.5.4.3": "CN", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
               "1.2.840.113549.1.9.1": "emailAddress", "2.5.4.5": "serialNumber", "0.9.2342.19200300.100.1.25": "DC"}
_STRING_SPECS = (char.UTF8String(), char.PrintableString(), char.IA5String(), char.TeletexString(), char.BMPString(), char.UniversalString())


def _string(raw: bytes) -> str:
    for spec in _STRING_SPECS:
        try:
            value, rest = decoder.decode(raw, asn1Spec=spec)
        except PyAsn1Error:
            continue
        if not rest:
            return str(value)
    raise CmpError(BAD_CERT_TEMPLATE, "a subject attribute is not a string")


def subject_attrs(name_der: bytes) -> tuple[tuple[str, str], ...]:
    """The (attribute, value) pairs of a Name, single-valued RDNs of the attributes Donjon's profiles know."""
    try:
        name, _ = decoder.decode(name_der, asn1Spec=rfc5280.Name())
        out = []
        for rdn in name["rdnSequence"]:
            if len(rdn) != 1:
                raise CmpError(BAD_CERT_TEMPLATE, "multi-valued RDNs are not accepted")
            atv = rdn[0]
            attr = _ATTR_NAMES.get(str(atv["type"]))
            if attr is None:
                raise CmpError(BAD_CERT_TEMPLATE, f"subject attribute {atv['type']} not supported")
            out.append((attr, _string(bytes(atv["value"]))))
        if len(out) > 16:
            raise CmpError(BAD_CERT_TEMPLATE, "too many subject attributes")
        return tuple(out)
    except CmpError:
        raise
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise CmpError(BAD_CERT_TEMPLATE, "malformed subject") from exc


def template_sans(extensions_der: bytes | None) -> tuple[tuple[str, str], ...]:
    """The subjectAltName entries of a template's extensions (dns, ip, email, uri); other extensions are refused."""
    if not extensions_der:
        return ()
    import ipaddress

    try:
        exts, _ = decoder.decode(extensions_der, asn1Spec=rfc5280.Extensions())
        out: list[tuple[str, str]] = []
        for ext in exts:
            oid = ext["extnID"]
            if oid in (rfc5280.id_ce_keyUsage, rfc5280.id_ce_extKeyUsage, rfc5280.id_ce_basicConstraints) and not ext["critical"]:
                continue  # the profile decides these
            if oid != rfc5280.id_ce_subjectAltName:
                raise CmpError(BAD_CERT_TEMPLATE, f"extension {oid} is not accepted in a request")
            names, _ = decoder.decode(bytes(ext["extnValue"]), asn1Spec=rfc5280.SubjectAltName())
            for gn in names:
                kind = gn.getName()
                if kind == "dNSName":
                    out.append(("dns", str(gn["dNSName"])))
                elif kind == "iPAddress":
                    out.append(("ip", str(ipaddress.ip_address(bytes(gn["iPAddress"])))))
                elif kind == "rfc822Name":
                    out.append(("email", str(gn["rfc822Name"])))
                elif kind == "uniformResourceIdentifier":
                    out.append(("uri", str(gn["uniformResourceIdentifier"])))
                else:
                    raise CmpError(BAD_CERT_TEMPLATE, f"subjectAltName type {kind} is not supported")
        if len(out) > 100:
            raise CmpError(BAD_CERT_TEMPLATE, "too many subjectAltNames")
        return tuple(out)
    except CmpError:
        raise
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise CmpError(BAD_CERT_TEMPLATE, "malformed extensions") from exc

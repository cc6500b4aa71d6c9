"""pkilint, in-process: the findings (WARNING or worse) that gate a signature."""

from __future__ import annotations

import functools
import threading
from typing import Any

from policy.profiles import Profile

# Findings at or above this severity are reported (pkilint: FATAL=0, ERROR=1, WARNING=2).
_MAX_SEVERITY = 2


@functools.cache
def _validators() -> dict[str, Any]:
    # pkilint takes ~0.5 s to import: only roles that lint pay for it, once.
    from pyasn1_alt_modules import rfc5280

    from pkilint import document, loader, pkix, validation
    from pkilint.cabf import serverauth
    from pkilint.pkix import algorithm, certificate, crl, extension, key, name, ocsp
    from pkilint.pkix.certificate import certificate_extension, certificate_key
    from policy import lintwalk

    pkix_cert = certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )
    pkix_crl = crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )
    pkix_ocsp = ocsp.create_pkix_ocsp_response_validator_container(
        [
            ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [],
    )
    chain_decoders = validation.ValidatorContainer(
        validators=[
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
            pkix.create_signature_algorithm_identifier_decoder(
                algorithm.SIGNATURE_ALGORITHM_IDENTIFIER_MAPPINGS, path="certificate.tbsCertificate.signature"
            ),
            certificate.create_spki_decoder(
                key.SUBJECT_PUBLIC_KEY_ALGORITHM_IDENTIFIER_MAPPINGS,
                key.SUBJECT_KEY_PARAMETER_ALGORITHM_IDENTIFIER_MAPPINGS,
            ),
        ],
        path="certificate",
    )
    chain_issuer = validation.ValidatorContainer(
        validators=[
            name.IssuerSubjectNameBinaryEqualValidator(
                path="certificate.tbsCertificate.subject",
                subject_document_issuer_dn_path="subject:certificate.tbsCertificate.issuer",
            ),
            extension.IssuerSubjectKeyIdentifierBinaryEqualValidator(
                subject_auth_key_id_retriever=(
                    lambda n: document.get_document_by_name(n, "subject").get_extension_by_oid(
                        rfc5280.id_ce_authorityKeyIdentifier
                    )
                )
            ),
            certificate_extension.IssuerSubjectPolicyChainValidator(),
        ]
    )
    chain_subject = validation.ValidatorContainer(
        validators=[
            certificate_key.SubjectSignatureVerificationValidator(
                tbs_node_retriever=lambda n: n.navigate("^.tbsCertificate"), path="certificate.signature"
            )
        ]
    )
    return {
        "loader": loader,
        "serverauth": serverauth,
        "certificate": certificate,
        "finding_filter": __import__("pkilint.finding_filter", fromlist=["filter_results"]),
        "pkix_cert": pkix_cert,
        "pkix_crl": pkix_crl,
        "pkix_ocsp": pkix_ocsp,
        "chain": (chain_decoders, chain_issuer, chain_subject),
        "serverauth_cache": {},
        "lintwalk": lintwalk,
        "pkix_cert_walker": lintwalk.Walker(pkix_cert),
        "chain_walkers": tuple(lintwalk.Walker(c) for c in (chain_decoders, chain_issuer, chain_subject)),
        "issuer_cache": {},
        "issuer_lock": threading.Lock(),
    }


def warm() -> None:
    """Build the validators now (pkilint's imports), e.g. before a role drops its privileges."""
    _validators()


def _findings(results, prefix: str) -> list[str]:
    out = []
    for r in results:
        for fd in r.finding_descriptions:
            if int(fd.finding.severity) <= _MAX_SEVERITY:
                if fd.finding.code == "pkix.invalid_domain_name_syntax" and (fd.message or "").startswith('Invalid domain name syntax: "*.'):
                    # RFC 5280 has no wildcards; RFC 6125 does. check_sans already allowed only a
                    # whole leftmost '*' label over a valid name, so this finding is not a defect.
                    continue
                if fd.finding.code == "pkix.invalid_uri_syntax" and _allowed_uri(r.node):
                    # pkilint checks URIs with a web-URL validator, which refuses every spiffe:// and
                    # urn: name. For those schemes only, and only in a SAN, our own grammar decides
                    # (policy.csr.strict_uri_ok: SPIFFE ID, RFC 8141 URN, urn:uuid). Any other URI
                    # finding still gates the signature.
                    continue
                msg = f": {fd.message}" if fd.message else ""
                out.append(f"{prefix}{fd.finding.severity.name} {fd.finding.code} @ {r.node.path}{msg}")
    return out


def _allowed_uri(node) -> bool:
    from policy.csr import strict_uri_ok

    if node.name != "uniformResourceIdentifier" or "subjectAltName" not in node.path:
        return False
    return strict_uri_ok(str(node.pdu))


def _load(loader_cls, der: bytes, what: str, name: str | None = None, parent=None):
    try:
        if name is None:
            return loader_cls().load_der_document(bytes(der), what), None
        return loader_cls().load_der_document(bytes(der), name, what, parent), None
    except Exception as e:  # noqa: BLE001 - a document pkilint cannot decode is a finding, not a crash
        return None, f"FATAL malformed {what}: {type(e).__name__}"


def _serverauth_walker(v: dict[str, Any], doc) -> Any:
    serverauth = v["serverauth"]
    cert_type = serverauth.determine_certificate_type(doc)
    entry = v["serverauth_cache"].get(cert_type)
    if entry is None:
        validator = v["certificate"].create_pkix_certificate_validator_container(
            serverauth.create_decoding_validators(), serverauth.create_validators(cert_type)
        )
        entry = (v["lintwalk"].Walker(validator), serverauth.create_serverauth_finding_filters(cert_type))
        v["serverauth_cache"][cert_type] = entry
    return entry


class _Issuer:
    """One issuer certificate decoded once (its decoders run once) and reused by every chain check of
    its leaves; `docs` is the pair pkilint's chain validators navigate ("issuer", "subject")."""

    def __init__(self, v: dict[str, Any], der: bytes):
        self.lock = threading.Lock()
        self.docs: dict[str, Any] = {}
        self.doc, self.bad = _load(v["loader"].RFC5280CertificateDocumentLoader, der, "issuer certificate", "issuer", self.docs)
        self.decoded: list = []
        if self.doc is not None:
            self.docs["issuer"] = self.doc
            self.decoded = v["chain_walkers"][0].validate(self.doc.root)


def _issuer(v: dict[str, Any], der: bytes) -> _Issuer:
    cache = v["issuer_cache"]
    with v["issuer_lock"]:
        it = cache.get(der)
        if it is None:
            if len(cache) >= 64:  # a handful of CAs per appliance: bounded whatever the caller sends
                cache.clear()
            it = cache[der] = _Issuer(v, bytes(der))
        return it


def lint_certificate(der: bytes, profile: Profile, issuer_der: bytes | None = None) -> list[str]:
    """Lint a certificate (RFC 5280; the CA/B Forum TLS BRs for `cabf` profiles; the issuer link if given).

    The certificate is decoded once: the same document feeds the profile's validators and the chain's."""
    v = _validators()
    issuer = _issuer(v, issuer_der) if issuer_der is not None else None
    if issuer is None:
        return _lint_cert_doc(v, der, profile, None)
    with issuer.lock:  # the chain validators find the subject through the issuer's shared `docs`
        try:
            return _lint_cert_doc(v, der, profile, issuer)
        finally:
            issuer.docs.pop("subject", None)


def _lint_cert_doc(v: dict[str, Any], der: bytes, profile: Profile, issuer: _Issuer | None) -> list[str]:
    docs = issuer.docs if issuer is not None else None
    doc, bad = _load(v["loader"].RFC5280CertificateDocumentLoader, der, "certificate",
                     "subject" if docs is not None else None, docs)
    if bad:
        return [bad]
    if profile.cabf and not profile.ca:
        # The BR validator set includes the RFC 5280 one, and filters the PKIX findings the BRs
        # supersede (e.g. a missing SKI, which RFC 5280 wants and the BRs advise against).
        walker, filters = _serverauth_walker(v, doc)
        results, _ = v["finding_filter"].filter_results(filters, walker.validate(doc.root))
        findings = _findings(results, "cabf-serverauth: ")
    else:
        findings = _findings(v["pkix_cert_walker"].validate(doc.root), "pkix: ")
    if issuer is not None:
        if issuer.bad:
            return findings + [issuer.bad]
        issuer.docs["subject"] = doc
        decoders, issuer_v, subject_v = v["chain_walkers"]
        # The issuer's decoders ran when it was cached (their results are kept and reported each time);
        # on the subject they find the values the profile's decoders already decoded and add the rest.
        results = issuer.decoded + decoders.validate(doc.root)
        results += issuer_v.validate(issuer.doc.root) + subject_v.validate(doc.root)
        findings += _findings(results, "chain: ")
    return findings


def _lint_one(loader: str, der: bytes, what: str, validator: str, prefix: str) -> list[str]:
    """Decode one document with the named pkilint loader and run one validator container over it."""
    v = _validators()
    doc, bad = _load(getattr(v["loader"], loader), der, what)
    if bad:
        return [bad]
    return _findings(v[validator].validate(doc.root), prefix)


def lint_pkix(der: bytes) -> list[str]:
    """Lint a certificate against RFC 5280 alone (one made outside the profiles: the audit key's)."""
    return _lint_one("RFC5280CertificateDocumentLoader", der, "certificate", "pkix_cert", "pkix: ")


def lint_crl(der: bytes) -> list[str]:
    """Lint a CRL against RFC 5280."""
    return _lint_one("RFC5280CertificateListDocumentLoader", der, "CRL", "pkix_crl", "pkix-crl: ")


def lint_ocsp_response(der: bytes) -> list[str]:
    """Lint an OCSP response against RFC 6960."""
    return _lint_one("RFC6960OCSPResponseDocumentLoader", der, "OCSP response", "pkix_ocsp", "pkix-ocsp: ")


__all__ = ["lint_certificate", "lint_crl", "lint_ocsp_response", "lint_pkix"]

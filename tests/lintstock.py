"""pkilint as shipped, in a process of its own: the reference Donjon's lint path is held equal to.

    python -m tests.lintstock < cases.json > findings.json

Input: a JSON list of [certificate DER (base64), profile name, issuer DER (base64) or null, cabf (the
profile with the BR validator set)]. Output: for
each case, the findings of pkilint's stock path (fresh documents; each validator container's own
validate() walks them), and those of policy.lint.lint_certificate in this process, where policy.lintwalk
is refused by its version guard (told another pkilint release is installed): Donjon's fallback.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys


_SERVERAUTH: dict = {}


def stock_findings(cert_der: bytes, profile, issuer_der: bytes | None) -> list[str]:
    """pkilint as its own tools run it: fresh documents, each decoded by every container, validate() walks."""
    from policy import lint

    v = lint._validators()
    ld = v["loader"].RFC5280CertificateDocumentLoader
    doc, bad = lint._load(ld, cert_der, "certificate")
    if bad:
        return [bad]
    if profile.cabf and not profile.ca:
        sa = v["serverauth"]
        doc2, _ = lint._load(ld, cert_der, "certificate")
        ct = sa.determine_certificate_type(doc2)
        c = _SERVERAUTH.get(ct)
        if c is None:  # built once per certificate type (≈0.2 s each): validators keep no state between documents
            c = _SERVERAUTH[ct] = v["certificate"].create_pkix_certificate_validator_container(
                sa.create_decoding_validators(), sa.create_validators(ct))
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


def main() -> int:
    import pkilint.document
    import pkilint.validation

    from policy import lint, lintwalk
    from policy.profiles import builtin_profiles

    shipped = (pkilint.document.decode_der, pkilint.document.PDUNode.__init__, pkilint.document.PDUNode.navigate,
               pkilint.document.create_and_append_node_from_pdu)
    lintwalk.PKILINT_VERSION = "0.0.0-not-installed"  # the guard must then leave pkilint as shipped
    lint.warm()
    assert not lintwalk.install() and not lintwalk._INSTALLED
    assert shipped == (pkilint.document.decode_der, pkilint.document.PDUNode.__init__, pkilint.document.PDUNode.navigate,
                       pkilint.document.create_and_append_node_from_pdu), "the version guard let a change through"
    P = builtin_profiles()
    out = []
    for cert_b64, name, issuer_b64, cabf in json.load(sys.stdin):
        cert = base64.b64decode(cert_b64)
        issuer = base64.b64decode(issuer_b64) if issuer_b64 else None
        profile = dataclasses.replace(P[name], cabf=True) if cabf else P[name]
        out.append({"stock": stock_findings(cert, profile, issuer), "fallback": lint.lint_certificate(cert, profile, issuer)})
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CMP on the gateway (RFC 9810/4210, Lightweight CMP profile RFC 9483, HTTP transfer RFC 6712).

pkimsg.py decodes and builds PKIMessages; server.py runs the transactions over a Backend (the Factory link).

ASN.1 library: pyasn1 with pyasn1-alt-modules (rfc9810, rfc4211, rfc8018, rfc9481 modules, kept in step
with the CMP RFCs by their maintainer; both already pinned because pkilint depends on them). asn1crypto,
which the OCSP code uses, has no CMP/CRMF modules: writing those by hand is the larger risk. pyasn1 is
slow and raises more than PyAsn1Error on hostile input, so pkimsg.decode bounds the size, accepts DER
only (the protection is checked over the re-encoded parts) and maps every exception to badDataFormat.
"""

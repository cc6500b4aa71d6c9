"""The agent's own AddRequest encoding (appliance.distribution.publish.add_request) is ldap3's, byte for byte:
the pipelined path writes it straight to the socket, so any difference would be a malformed request."""

from __future__ import annotations

import random
import warnings

import pytest

from appliance.distribution.publish import add_request

with warnings.catch_warnings():  # ldap3.utils.asn1 reads pyasn1 names that pyasn1 now calls deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldap3.operation.add import add_operation
    from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
    from ldap3.utils.asn1 import encode


def ldap3_pdu(mid: int, dn: str, entry: dict) -> bytes:
    m = LDAPMessage()
    m["messageID"] = MessageID(mid)
    m["protocolOp"] = ProtocolOp().setComponentByName("addRequest", add_operation(dn, entry, True, None, validator=None,
                                                                                   check_names=False))
    return encode(m)


@pytest.mark.parametrize("mid", [1, 127, 128, 255, 256, 32767, 32768, 65535, 2**31 - 1])
def test_message_ids_encode_as_ldap3_does(mid):
    entry = {"objectClass": ["applicationProcess", "pkiUser"], "cn": "x", "userCertificate;binary": [b"\x30\x03\x02\x01\x00"]}
    assert add_request(mid, "cn=x,ou=people,dc=example,dc=org", entry) == ldap3_pdu(mid, "cn=x,ou=people,dc=example,dc=org", entry)


def test_random_entries_of_every_length_class_encode_as_ldap3_does():
    rnd = random.Random(19)
    for _ in range(300):
        cn = "".join(rnd.choice("abcé, +\\=xyz") for _ in range(rnd.choice([1, 5, 60, 200])))
        dn = f"cn={cn},ou=people,dc=example,dc=org"
        der = rnd.randbytes(rnd.choice([0, 1, 127, 128, 255, 256, 1200, 70000]))
        entry = {"objectClass": rnd.sample(["applicationProcess", "pkiUser", "top", "device"], rnd.randint(1, 4)),
                 "cn": cn, "description": [cn * rnd.randint(0, 3)] * rnd.randint(1, 3), "userCertificate;binary": [der]}
        mid = rnd.randint(1, 2**31 - 1)
        assert add_request(mid, dn, entry) == ldap3_pdu(mid, dn, entry), (mid, dn)

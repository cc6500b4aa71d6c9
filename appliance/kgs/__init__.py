"""The KGS (key generation system): card personalisation, PIN letters, key archival and recovery, server-side keys.

How it is driven. Officers reach it only through the Factory's admin socket: the `kgs-*` admin requests
(appliance/factory/admin.py) are served by appliance/factory/kgs.py, which forwards them on the
factory-kgs link (appliance/ipc/schema/kgs.py). The link carries requests both ways: the Factory asks
the KGS (personalise a batch, hand over letters, reset a PIN, recover a key, make a server-side key);
the KGS asks the Factory for what only the Factory has (card records in the CMDB, certificates through
the normal issuance pipeline, archive blobs stored with the slot). The KGS holds no CA key and never
opens the CMDB; the Factory never sees a PIN, PUK or transport secret in clear (they are sealed under
the KGS's HSM key when the CMDB keeps them).

Server-side key generation, for the gateway (EST /serverkeygen, RFC 7030 §4.4; CMP central key
generation, RFC 4210 §5.3.4 / RFC 9483 §4.1.6). The gateway asks the Factory, never the KGS:

    reply = await factory.kgs.server_keygen(key_type, subject, emails=(), dns=(), archive=False)
    # -> S.KgsServerKey(csr=DER PKCS#10, pkcs8=DER PrivateKeyInfo, archive=blob | None)

`key_type` is one of rsa2048, rsa3072, rsa4096, p256, p384; `subject` a tuple of (attr, value) such as
(("CN", "device-17"),); `emails`/`dns` become the request's subjectAltName. The key is made in the
KGS's HSM token (extractable only under a one-time AES key, then destroyed); `csr` is signed with it,
so the Factory's normal pipeline (`issue`: profile, proof of possession, audit) certifies it like any
other request; `pkcs8` is the key for the protocol to return: EST `application/pkcs8` (or CMS-enveloped
to the client's key, §4.4.2), CMP EnvelopedData in the CertifiedKeyPair. With `archive=True` the key is
also wrapped under the archival key (CKM_AES_KEY_WRAP_PAD) and `archive` carries the blob to store. The
gateway must not keep `pkcs8` after it has answered. On the wire: KgsServerKeygen -> KgsServerKey (or
Refused) on factory-kgs.
"""

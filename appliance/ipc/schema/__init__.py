"""Every message that crosses a Donjon process boundary, one union per direction of each link.

A receiver decodes with the union of what its peer may send and nothing else (msgspec rejects
unknown tags, missing and extra fields, wrong types, oversize values). One module per link (common.py
first, then each link in the order the others build on); this package re-exports them all, so
`from appliance.ipc import schema as S` names every message. Changing anything here changes
schema_hash(), which a test pins per VERSION: bump VERSION in the same change.
"""

from __future__ import annotations

import msgspec

from .admin import *  # noqa: F401  (admin imports every link module before it)
from .admin import _Reply  # noqa: F401
from .common import _Msg  # noqa: F401

VERSION = 6


def schema_hash() -> str:
    """SHA-256 over the JSON schema of every union: a pinned test forces a VERSION bump on change."""
    import hashlib
    import json

    unions = [SupToCis, CisToSup, SupToFactory, FactoryToSup, FactoryToCis, CisToFactory, AdminRequest, AdminReply,
              SupToOcsp, OcspToSup, FactoryToOcsp, OcspToFactory, SupToSnmp, SnmpToSup,
              SupToDist, DistToSup, FactoryToDist, DistToFactory,
              SupToGateway, GatewayToSup, FactoryToGateway, GatewayToFactory, SupToKgs, KgsToSup, FactoryToKgs, KgsToFactory]
    schema = msgspec.json.schema_components(unions, schema_hook=lambda t: {"any": repr(t)})
    return hashlib.sha256(json.dumps(schema, sort_keys=True, default=str).encode()).hexdigest()

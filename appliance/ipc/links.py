"""Every link of the appliance: its name (as in Hello), the union each end decodes, and its frame limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import schema as S


@dataclass(frozen=True)
class LinkSpec:
    """One link between an upper end (the supervisor, or the Factory) and a lower end (a role, or an
    admin client). Each end decodes with the union of what the other may send, nothing else."""

    name: str
    down: Any  # what the upper end sends: the lower end decodes with it
    up: Any  # what the lower end sends: the upper end decodes with it
    max_frame: int  # bytes, checked before a frame is read
    carries_fds: bool = False  # new links may come down it (SCM_RIGHTS): supervisor -> Factory only


KiB, MiB = 1024, 1024 * 1024

SUP_CIS = LinkSpec("sup-cis", S.SupToCis, S.CisToSup, 256 * KiB)
SUP_FACTORY = LinkSpec("sup-factory", S.SupToFactory, S.FactoryToSup, 256 * KiB, carries_fds=True)
SUP_OCSP = LinkSpec("sup-ocsp", S.SupToOcsp, S.OcspToSup, 256 * KiB)
SUP_SNMP = LinkSpec("sup-snmp", S.SupToSnmp, S.SnmpToSup, 1 * MiB)
SUP_DIST = LinkSpec("sup-distribution", S.SupToDist, S.DistToSup, 1 * MiB)
FACTORY_CIS = LinkSpec("factory-cis", S.FactoryToCis, S.CisToFactory, 8 * MiB)
FACTORY_OCSP = LinkSpec("factory-ocsp", S.FactoryToOcsp, S.OcspToFactory, 16 * MiB)
FACTORY_DIST = LinkSpec("factory-distribution", S.FactoryToDist, S.DistToFactory, 8 * MiB)
SUP_GATEWAY = LinkSpec("sup-gateway", S.SupToGateway, S.GatewayToSup, 256 * KiB)
FACTORY_GATEWAY = LinkSpec("factory-gateway", S.FactoryToGateway, S.GatewayToFactory, 1 * MiB)
SUP_KGS = LinkSpec("sup-kgs", S.SupToKgs, S.KgsToSup, 1 * MiB)
FACTORY_KGS = LinkSpec("factory-kgs", S.FactoryToKgs, S.KgsToFactory, 4 * MiB)  # a batch file is at most 1 MiB
ADMIN = LinkSpec("admin", S.AdminReply, S.AdminRequest, 8 * MiB)  # the Factory's admin socket; clients are the lower end

LINKS: dict[str, LinkSpec] = {k.name: k for k in (SUP_CIS, SUP_FACTORY, SUP_OCSP, SUP_SNMP, SUP_DIST,
                                                  FACTORY_CIS, FACTORY_OCSP, FACTORY_DIST, SUP_GATEWAY, FACTORY_GATEWAY,
                                                  SUP_KGS, FACTORY_KGS, ADMIN)}


def max_frame(link: str) -> int:
    return LINKS[link].max_frame

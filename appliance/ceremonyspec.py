"""The root-ceremony file format (`donjon init --ceremony FILE`): TOML validated at load, not an IPC message."""

from __future__ import annotations

from typing import Annotated

import msgspec

from appliance.ipc.schema import KeyType, Name

# The supervisor carries it to the Factory as msgpack bytes inside the IPC message Ceremony(spec=...);
# the Factory decodes those bytes with CeremonySpec (strict: unknown keys and bad values refused).


class CeremonyCa(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    name: Name
    key_type: KeyType
    subject: dict[str, str]
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=40 * 366)]
    path_length: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    profile: Name | None = None
    allowed_profiles: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()  # what this CA may issue


class CeremonySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    root: CeremonyCa
    issuing: list[CeremonyCa] = []

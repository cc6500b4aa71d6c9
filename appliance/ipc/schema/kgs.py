"""Supervisor/Factory <-> KGS (key generation system): card personalisation, PIN letters, key archival and recovery, server-side keys."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from .common import Attr, Der, Event, Hello, KeyType, Name, Ok, Pin, Ready, Refused, ReqId, Shutdown, Text, _Msg

ProfileText = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Sealed = Annotated[bytes, msgspec.Meta(max_length=4096)]  # a secret encrypted under the KGS's HSM key (AES-GCM)
ArchiveBlob = Annotated[bytes, msgspec.Meta(max_length=16 * 1024)]  # a private key wrapped under the archival key
CardState = Literal["started", "keys", "certs", "pins", "done", "failed"]
LetterState = Literal["none", "produced", "printed", "sent", "acknowledged"]
SlotName = Literal["auth", "sign", "enc"]
SubjectJson = Annotated[str, msgspec.Meta(max_length=4096)]
Pdf = Annotated[bytes, msgspec.Meta(max_length=256 * 1024)]


# ---------------------------------------------------------------- supervisor <-> KGS


class KgsConfig(_Msg, tag="kgs-config"):
    """The card reader's PKCS#11 module, the KGS's own HSM token (its PIN: never the CA token's),
    the card and certificate profiles (TOML texts), and its spool folder for PIN letters."""

    card_module: Path
    hsm_module: Path
    hsm_label: Name
    hsm_pin: Pin
    softhsm_conf: Path | None  # embedded SoftHSM2: the tokendir holding the KGS token (and, in tests, the "cards")
    card_profiles: dict[Name, ProfileText]
    profiles: dict[Name, ProfileText]
    spool: Path


SupToKgs = Union[Hello, KgsConfig, Shutdown]
KgsToSup = Union[Hello, Ready, Event]


# ---------------------------------------------------------------- Factory -> KGS: requests


class KgsPersonalise(_Msg, tag="kgs-personalise"):
    """Personalise (or finish) a batch: the KGS answers KgsAccepted at once and works on, reporting
    every step as KgsCardPut/KgsCardUpdate. A rerun of the same batch finishes what is unfinished."""

    id: ReqId
    profile: Name
    batch: Name
    data: Annotated[bytes, msgspec.Meta(max_length=1 << 20)]
    actor: Text


class KgsRecover(_Msg, tag="kgs-recover"):
    """Unwrap an archived key in the HSM and hand it out as a PKCS#12 under a new one-time password."""

    id: ReqId
    blob: ArchiveBlob
    cert: Der
    friendly_name: Name


class KgsServerKeygen(_Msg, tag="kgs-server-keygen"):
    """Server-side key generation (EST /serverkeygen, CMP central key generation): a new key in the HSM,
    a PKCS#10 request signed with it (proof of possession for the Factory's normal pipeline), the key
    as PKCS#8 for the protocol to envelope, and its archive blob when `archive`."""

    id: ReqId
    key_type: KeyType
    subject: tuple[Attr, ...]
    emails: Annotated[tuple[Annotated[str, msgspec.Meta(max_length=256)], ...], msgspec.Meta(max_length=16)] = ()
    dns: Annotated[tuple[Annotated[str, msgspec.Meta(max_length=256)], ...], msgspec.Meta(max_length=16)] = ()
    archive: bool = False


class KgsTakeLetters(_Msg, tag="kgs-take-letters"):
    """Hand the spooled PIN letters of a batch over (and delete them from the spool)."""

    id: ReqId
    batch: Name


class KgsResetPin(_Msg, tag="kgs-reset-pin"):
    """A reprint: a new PIN set with the card's PUK (sealed under the KGS key), and a new letter."""

    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]
    label: Annotated[str, msgspec.Meta(max_length=64)]
    profile: Name
    subject: SubjectJson
    puk: Sealed


# ---------------------------------------------------------------- KGS -> Factory: replies


class KgsAccepted(_Msg, tag="kgs-accepted"):
    id: ReqId
    batch: Name
    subjects: Annotated[int, msgspec.Meta(ge=0)]


class KgsRecovered(_Msg, tag="kgs-recovered"):
    id: ReqId
    p12: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
    password: Annotated[str, msgspec.Meta(max_length=64)]


class KgsServerKey(_Msg, tag="kgs-server-key"):
    id: ReqId
    csr: Der
    pkcs8: Annotated[bytes, msgspec.Meta(max_length=16 * 1024)]
    archive: ArchiveBlob | None = None


class KgsLetter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    card: Annotated[int, msgspec.Meta(ge=1)]
    pdf: Pdf


class KgsLetters(_Msg, tag="kgs-letters"):
    id: ReqId
    letters: Annotated[list[KgsLetter], msgspec.Meta(max_length=10000)]


# ---------------------------------------------------------------- KGS -> Factory: its own requests (the CMDB, issuance)


class KgsCardPut(_Msg, tag="kgs-card-put"):
    """The record of a subject's card in a batch: created in state `started` (with the card's transport
    secrets, sealed) if there is none, else returned as it is. Written before the card is touched."""

    id: ReqId
    batch: Name
    subject_id: Name
    subject: SubjectJson
    profile: Name
    label: Annotated[str, msgspec.Meta(max_length=64)]
    transport: Sealed


class KgsCardUpdate(_Msg, tag="kgs-card-update"):
    """A card's next state, written before the step it names begins (`failed`: with the error)."""

    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]
    state: CardState
    token_serial: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    error: Text | None = None
    pending: Sealed | None = None  # the new PIN and PUK, sealed, only between `pins` and the letter
    puk: Sealed | None = None  # at `done`: the PUK sealed, for a PIN reset
    letter: LetterState | None = None
    restart: bool = False  # a failed card begins again (a new card for the subject)


class KgsIssue(_Msg, tag="kgs-issue"):
    """Certify a card slot's key: the PKCS#10 request goes through the Factory's normal pipeline
    (proof of possession, profile, audit); the certificate (and archive blob) is recorded with the slot."""

    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]
    slot: SlotName
    ca: Name
    profile: Name
    csr: Der
    validity_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] | None = None
    archive: ArchiveBlob | None = None


class KgsBatchEnd(_Msg, tag="kgs-batch-end"):
    """A batch run ended (audited): how many cards are done and failed, and the first error."""

    id: ReqId
    batch: Name
    done: Annotated[int, msgspec.Meta(ge=0)]
    failed: Annotated[int, msgspec.Meta(ge=0)]
    error: Text = ""


# ---------------------------------------------------------------- Factory -> KGS: replies to those


class KgsSlotCert(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    slot: SlotName
    cert: Der


class KgsCardRow(_Msg, tag="kgs-card-row"):
    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]
    state: CardState
    label: Annotated[str, msgspec.Meta(max_length=64)]
    transport: Sealed
    token_serial: Annotated[str, msgspec.Meta(max_length=64)] | None
    pending: Sealed | None
    certs: Annotated[list[KgsSlotCert], msgspec.Meta(max_length=3)]
    error: Text | None = None


class KgsIssued(_Msg, tag="kgs-issued"):
    id: ReqId
    cert: Der


FactoryToKgs = Union[Hello, KgsPersonalise, KgsRecover, KgsServerKeygen, KgsTakeLetters, KgsResetPin,
                     KgsCardRow, KgsIssued, Ok, Refused]
KgsToFactory = Union[Hello, KgsAccepted, KgsRecovered, KgsServerKey, KgsLetters, KgsCardPut, KgsCardUpdate,
                     KgsIssue, KgsBatchEnd, Ok, Refused]


# ---------------------------------------------------------------- admin clients -> Factory (rows in factory/admin.py)


class AKgsPersonalise(_Msg, tag="kgs-personalise-req"):
    id: ReqId
    profile: Name
    batch: Name
    data: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1 << 20)]


class AKgsCards(_Msg, tag="kgs-cards"):
    id: ReqId
    batch: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 10000


class AKgsLetters(_Msg, tag="kgs-letters-req"):
    """Take the batch's PIN letters out of the spool (once): they become `printed`."""

    id: ReqId
    batch: Name


class AKgsLetterStatus(_Msg, tag="kgs-letter-status"):
    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]
    status: Literal["sent", "acknowledged"]


class AKgsReprint(_Msg, tag="kgs-reprint"):
    """A new PIN for a card (PUK reset) and a new letter in the spool."""

    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]


class AKgsRecover(_Msg, tag="kgs-recover-req"):
    """Authorise the recovery of a card's archived encryption key (dual control, `key-recovery`)."""

    id: ReqId
    card: Annotated[int, msgspec.Meta(ge=1)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class AKgsRecoverTake(_Msg, tag="kgs-recover-take"):
    """Take an approved recovery, once: the PKCS#12 and its one-time password (shown once)."""

    id: ReqId
    recovery: Annotated[int, msgspec.Meta(ge=1)]


class KgsCardInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    card: int
    batch: Name
    subject_id: Name
    cn: Text
    label: Text
    token_serial: Text | None
    state: CardState
    letter: LetterState
    certs: Annotated[list[Annotated[str, msgspec.Meta(max_length=40)]], msgspec.Meta(max_length=3)]  # slot:serial hex
    error: Text | None
    attempts: int


class KgsCardsReply(_Msg, tag="kgs-cards-reply"):
    id: ReqId
    cards: Annotated[list[KgsCardInfo], msgspec.Meta(max_length=100000)]
    running: Annotated[list[Name], msgspec.Meta(max_length=1000)] = []  # batches the KGS is working on


class KgsPersonaliseReply(_Msg, tag="kgs-personalise-reply"):
    id: ReqId
    batch: Name
    subjects: int


class KgsLettersReply(_Msg, tag="kgs-letters-reply"):
    id: ReqId
    letters: Annotated[list[KgsLetter], msgspec.Meta(max_length=10000)]


class KgsCardReply(_Msg, tag="kgs-card-reply"):
    """letter-status, reprint: the card and its letter's state."""

    id: ReqId
    card: int
    letter: LetterState


class KgsRecoverReply(_Msg, tag="kgs-recover-reply"):
    id: ReqId
    recovery: int
    card: int
    approvers: Annotated[list[Name], msgspec.Meta(max_length=16)]


class KgsP12Reply(_Msg, tag="kgs-p12-reply"):
    id: ReqId
    recovery: int
    p12: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
    password: Annotated[str, msgspec.Meta(max_length=64)]


KgsAdminRequest = (AKgsPersonalise, AKgsCards, AKgsLetters, AKgsLetterStatus, AKgsReprint, AKgsRecover, AKgsRecoverTake)
KgsTypedReply = (KgsCardsReply, KgsPersonaliseReply, KgsLettersReply, KgsCardReply, KgsRecoverReply, KgsP12Reply)

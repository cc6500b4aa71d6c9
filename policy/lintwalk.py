"""pkilint run faster with the same lints: decodes memoized by exact bytes, validators indexed by node."""

from __future__ import annotations

import collections
import threading
from typing import Any

from pkilint import document, validation
from pkilint.document import NodeVisitor, PDUNode
from pkilint.validation import ValidationFindingDescription, ValidationResult, Validator, ValidatorContainer

# Sub-documents (extension values, names, keys) up to this size are kept decoded, keyed by their exact
# bytes and schema: leaves of one CA and profile repeat most of them (AKI, AIA, CRL DP, policies, KU, EKU).
_MEMO_MAX_BYTES = 1024
_MEMO_ENTRIES = 512  # bounded memory: decoded values weigh ~10-50x their DER

_memo: collections.OrderedDict[tuple[bytes, int], Any] = collections.OrderedDict()
_memo_lock = threading.Lock()
_decode_der = document.decode_der


def _memo_decode_der(substrate, asn1Spec=None, **kw):  # noqa: N803 - pyasn1_fasder's keyword
    """decode_der, memoized: the same bytes under the same schema decode to the same value (never mutated
    by pkilint: validators only read their nodes, and each document gets nodes of its own)."""
    if kw or len(substrate) > _MEMO_MAX_BYTES:
        return _decode_der(substrate, asn1Spec=asn1Spec, **kw)
    key = (bytes(substrate), id(asn1Spec))
    with _memo_lock:
        hit = _memo.get(key)
        if hit is not None and hit[0] is asn1Spec:
            _memo.move_to_end(key)
            return hit[1]
    out = _decode_der(substrate, asn1Spec=asn1Spec)
    with _memo_lock:
        _memo[key] = (asn1Spec, out)  # the schema object is kept too: its id is never reused while cached
        if len(_memo) > _MEMO_ENTRIES:
            _memo.popitem(last=False)
    return out


def install() -> None:
    """Route pkilint's decoding through the memo (idempotent)."""
    global _OVERRIDES
    _OVERRIDES = _overrides()
    document.decode_der = _memo_decode_der


def _overrides() -> frozenset:
    """pkilint match() overrides of the form `super().match(node) and <more>` (read in pkilint 0.13.3):
    where the NodeVisitor part is false for a shape, the override is false too."""
    from pkilint.cabf import cabf_name
    from pkilint.cabf.serverauth import serverauth_extension
    from pkilint.pkix import extension
    from pkilint.pkix.certificate import certificate_extension

    found = {validation.TypeMatchingValidator.match, extension.ExtensionCriticalityValidator.match}
    for mod in (cabf_name, serverauth_extension, certificate_extension):
        for obj in vars(mod).values():
            m = vars(obj).get("match") if isinstance(obj, type) and issubclass(obj, Validator) else None
            if m is not None:
                found.add(m)
    return frozenset(found)


_OVERRIDES: frozenset = frozenset()


def _kind(v: Validator) -> int:
    """0: match is decided by (path, value class) alone; 1: that part is decided so, the rest is asked;
    2: asked at every node (a predicate, a supertype test or an override not known to be of that form)."""
    if v._predicate is not None or v._pdu_supertype is not None:
        return 2
    m = type(v).match
    if m is NodeVisitor.match:
        return 0
    return 1 if m in _OVERRIDES else 2


_SHAPES_MAX = 50_000
_UNHANDLED = validation.Validator.VALIDATION_FINDING_UNHANDLED_EXCEPTION


class Walker:
    """Runs a ValidatorContainer exactly as its validate() does (same validators, same order, same
    results), but asks each validator whose match is a function of (path, value class) only once per
    shape instead of at every node of every document."""

    def __init__(self, root: ValidatorContainer):
        install()
        self.root = root
        self._index: dict[int, tuple[list[int], dict[tuple, tuple[tuple[int, bool], ...]]]] = {}
        self._prefixes: dict[int, frozenset[str] | None] = {}

    def validate(self, node: PDUNode) -> list[ValidationResult]:
        results: list[ValidationResult] = []
        self._walk(self.root, node, results)
        return results

    def _candidates(self, c: ValidatorContainer, node: PDUNode) -> tuple[tuple[int, bool], ...]:
        entry = self._index.get(id(c))
        if entry is None:
            entry = ([_kind(v) for v in c.validators], {})
            self._index[id(c)] = entry
        kinds, shapes = entry
        pdu = node.pdu
        shape = (node.path, type(pdu))
        idx = shapes.get(shape)
        if idx is None:
            # Keep what may match this shape, and whether it must still be asked at each node.
            idx = tuple((i, kinds[i] > 0) for i, v in enumerate(c.validators)
                        if kinds[i] == 2 or NodeVisitor.match(v, node))
            if len(shapes) > _SHAPES_MAX:  # bounded whatever documents come (paths carry list indices)
                shapes.clear()
            shapes[shape] = idx
        return idx

    def _walk(self, c: ValidatorContainer, node: PDUNode, results: list) -> None:
        validators = c.validators
        for i, ask in self._candidates(c, node):
            v = validators[i]
            if ask and not v.match(node):
                continue
            if _is_container(v):
                sub: list = []
                try:
                    self._walk(v, node, sub)
                except Exception as e:  # noqa: BLE001 - as Validator.validate_wrapper: a FATAL finding
                    results.append(ValidationResult(v, node, [ValidationFindingDescription(_UNHANDLED, str(e))]))
                else:
                    results += sub
                continue
            result = v.validate_wrapper(node)
            if isinstance(result, list):
                results += result
            else:
                results.append(result)
        if id(c) not in self._prefixes:
            self._prefixes[id(c)] = _path_prefixes(c)
        prefixes = self._prefixes[id(c)]
        for child in node.children.values():
            if prefixes is None or child.path in prefixes:
                self._walk(c, child, results)


def _is_container(v: Validator) -> bool:
    t = type(v)
    return (isinstance(v, ValidatorContainer) and t.validate is ValidatorContainer.validate
            and t._validate_rec is ValidatorContainer._validate_rec
            and t.validate_wrapper is Validator.validate_wrapper)


def _path_prefixes(c: ValidatorContainer) -> frozenset[str] | None:
    """Where every validator of c matches one exact path only (NodeVisitor's first test, also in the
    overrides it knows), the paths on the way to those: no node elsewhere can match, so the walk skips
    those subtrees. None where some validator may match anywhere."""
    out: set[str] = set()
    for v in c.validators:
        if v._path is None or (_kind(v) == 2 and type(v).match is not NodeVisitor.match):
            return None
        parts = v._path.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(out)

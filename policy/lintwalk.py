"""pkilint run faster with the same findings (pkilint 0.13.3 only): memoized decodes, pruned walks, linear tree building."""

from __future__ import annotations

import collections
import importlib.metadata
import threading
from inspect import getfullargspec
from itertools import chain
from typing import Any

from cryptography import exceptions
from pkilint import document, validation
from pkilint.document import NodeVisitor, PDUNode
from pkilint.pkix.key import verify_signature
from pkilint.validation import ValidationFindingDescription, ValidationResult, Validator, ValidatorContainer
from pyasn1.codec.der.encoder import encode
from pyasn1.type import base, univ
from pyasn1_alt_modules import rfc5280

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
    if not kw and type(asn1Spec) is rfc5280.Certificate:
        cert = _certificate_by_parts(bytes(substrate), asn1Spec)
        if cert is not None:
            return cert, b""
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


# A certificate's TBSCertificate as Donjon (and most CAs) make it: version v3, then every mandatory field,
# then the extensions; the tags of its elements in that order.
_TBS_TAGS = (0xA0, 0x02, 0x30, 0x30, 0x30, 0x30, 0x30, 0xA3)
_SET = {"verifyConstraints": False, "matchTags": False, "matchConstraints": False}  # as pyasn1_fasder sets components


def _elements(b: bytes, start: int, end: int) -> list[tuple[int, int, int]] | None:
    """The DER elements filling b[start:end]: (tag, start, end) each; None unless every header is a
    one-octet tag with a minimal definite length and the elements fill the span exactly."""
    out = []
    at = start
    while at < end:
        if at + 2 > end:
            return None
        tag, n = b[at], b[at + 1]
        if tag & 0x1F == 0x1F:
            return None
        if n < 0x80:
            body = at + 2
        else:
            k = n & 0x7F
            if k == 0 or k > 3 or at + 2 + k > end or b[at + 2] == 0:
                return None
            n = int.from_bytes(b[at + 2:at + 2 + k], "big")
            if n < 0x80:
                return None
            body = at + 2 + k
        if body + n > end:
            return None
        out.append((tag, at, body + n))
        at = body + n
    return out


_EXACT_ENTRIES = 256
_exact_tbs: collections.OrderedDict[int, tuple[Any, bytes]] = collections.OrderedDict()  # TBS values -> their DER
_reencoded: collections.OrderedDict[int, tuple[Any, bool]] = collections.OrderedDict()


def _reencodes(value, der: bytes) -> bool:
    """Whether pyasn1's DER encoder gives back `der` for the value decoded from it (once per value object)."""
    with _memo_lock:
        hit = _reencoded.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    try:
        ok = encode(value) == der
    except Exception:  # noqa: BLE001 - pkilint's own encode raises too: not taken as bytes then
        ok = False
    with _memo_lock:
        _reencoded[id(value)] = (value, ok)  # the value kept: its id is never reused while cached
        if len(_reencoded) > _MEMO_ENTRIES * 4:
            _reencoded.popitem(last=False)
    return ok


_stock_encode = validation.encode
_encoded: collections.OrderedDict[int, tuple[Any, bytes]] = collections.OrderedDict()


def _memo_encode(value, **kw) -> bytes:
    """pyasn1's DER encode, kept per value object (values are never changed once decoded; a refusal is
    not kept: it is raised again, the same, each time)."""
    if kw:
        return _stock_encode(value, **kw)
    with _memo_lock:
        hit = _encoded.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    out = _stock_encode(value)
    with _memo_lock:
        _encoded[id(value)] = (value, out)  # the value kept: its id is never reused while cached
        if len(_encoded) > _MEMO_ENTRIES:
            _encoded.popitem(last=False)
    return out


def _certificate_by_parts(b: bytes, spec) -> Any:
    """The certificate decoded field by field through the memo (a CA's leaves share their issuer name,
    algorithms and most extensions), assembled as pyasn1_fasder assembles a SEQUENCE; None (decode it
    whole) for any other shape than _TBS_TAGS, a v1 version or any header that is not plain DER."""
    top = _elements(b, 0, len(b))
    if top is None or len(top) != 1 or top[0][0] != 0x30:
        return None
    _, s0, _ = top[0]
    outer = _elements(b, s0 + (2 if b[s0 + 1] < 0x80 else 2 + (b[s0 + 1] & 0x7F)), len(b))
    if outer is None or [t for t, _, _ in outer] != [0x30, 0x30, 0x03]:
        return None
    _, ts, te = outer[0]
    fields = _elements(b, ts + (2 if b[ts + 1] < 0x80 else 2 + (b[ts + 1] & 0x7F)), te)
    if fields is None or tuple(t for t, _, _ in fields) != _TBS_TAGS:
        return None
    _, es, ee = fields[7]
    inner = _elements(b, es + (2 if b[es + 1] < 0x80 else 2 + (b[es + 1] & 0x7F)), ee)
    if inner is None or len(inner) != 1 or inner[0][0] != 0x30:
        return None
    _, xs, xe = inner[0]
    exts = _elements(b, xs + (2 if b[xs + 1] < 0x80 else 2 + (b[xs + 1] & 0x7F)), xe)
    if not exts or any(t != 0x30 for t, _, _ in exts):
        return None
    try:
        tbs_spec = spec.componentType[0].asn1Object
        ct = tbs_spec.componentType
        tbs = tbs_spec.clone()
        exact = True  # every field re-encodes to its own bytes: then so does the TBS (_tbs_der)
        for i, (_, fs, fe) in enumerate(fields[:7]):
            value = _memo_decode_der(b[fs:fe], asn1Spec=ct[i].asn1Object)[0]
            if i == 0 and value == 0:
                return None  # v1 is the DEFAULT: DER omits it, and the whole decode refuses it
            tbs.setComponentByPosition(i, value, **_SET)
            exact = exact and _reencodes(value, b[fs:fe])
        ext_spec = ct[9].asn1Object
        extensions = ext_spec.clone()
        for j, (_, fs, fe) in enumerate(exts):
            value = _memo_decode_der(b[fs:fe], asn1Spec=ext_spec.componentType)[0]
            extensions.setComponentByPosition(j, value, **_SET)
            exact = exact and _reencodes(value, b[fs:fe])
        tbs.setComponentByPosition(9, extensions, **_SET)
        if exact:
            with _memo_lock:
                _exact_tbs[id(tbs)] = (tbs, b[ts:te])
                if len(_exact_tbs) > _EXACT_ENTRIES:
                    _exact_tbs.popitem(last=False)
        cert = spec.clone()
        cert.setComponentByPosition(0, tbs, **_SET)
        for i in (1, 2):
            _, fs, fe = outer[i]
            cert.setComponentByPosition(i, _memo_decode_der(b[fs:fe], asn1Spec=spec.componentType[i].asn1Object)[0], **_SET)
    except Exception:  # noqa: BLE001 - a field refused: the whole decode gives pkilint's own error
        return None
    return cert


# The pkilint release whose code the changes below were read against and proved equal to (tests/unit/
# test_lint_walk.py); under any other release pkilint runs as shipped.
PKILINT_VERSION = "0.13.3"
PYASN1_VERSION = "0.6.5"  # _is_value reads its value classes' fields
VALIDATORS_VERSION = "0.22.0"  # _func_args_as_dict is that release's, with the argument names kept; its url, domain, email are pure
_INSTALLED = False


def install() -> bool:
    """Apply the changes to pkilint (idempotent): memoized decoding, node counting. False, and nothing
    changed, under another pkilint release than the one they were read against."""
    global _OVERRIDES, _INSTALLED
    if _INSTALLED:
        return True
    if importlib.metadata.version("pkilint") != PKILINT_VERSION or importlib.metadata.version("pyasn1") != PYASN1_VERSION:
        return False
    from pkilint.pkix.certificate import certificate_key

    if importlib.metadata.version("validators") == VALIDATORS_VERSION:
        import validators.utils

        validators.utils._func_args_as_dict = _func_args_as_dict
        from pkilint.pkix import general_name

        general_name.validators_predicate = _validators_predicate

    _OVERRIDES = _overrides()
    document.decode_der = _memo_decode_der
    document.create_and_append_node_from_pdu = _counting_append
    PDUNode.navigate = _navigate
    validation.encode = _memo_encode  # DEREqualityValidator's: names and algorithms a CA's leaves share
    PDUNode.__init__ = _node_init
    certificate_key.SubjectSignatureVerificationValidator.validate = _verify_subject_signature
    _INSTALLED = True
    return True


_ARG_NAMES: dict[Any, list[str]] = {}  # a validators function -> its positional argument names


def _func_args_as_dict(func, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """validators 0.22.0's utils._func_args_as_dict (the arguments of a refused value, for its
    ValidationError), with each function's argument names read once: the shipped one runs
    inspect.getfullargspec on every refusal, and pkilint's URI check meets one per URI whose host is an
    IP address (`domain` refuses it before `ipv4` accepts it): ≈ 20% of a certificate's lint."""
    names = _ARG_NAMES.get(func)
    if names is None:
        names = _ARG_NAMES[func] = getfullargspec(func)[0]
    return dict(list(zip(dict.fromkeys(chain(names, kwargs.keys())), args)) + list(kwargs.items()))


_PREDICATES = 4096  # (validators function, string) answers kept; emptied when full
_PREDICATE_LEN = 512  # longer strings (a CSR's own SAN URIs can be long) are checked every time, never kept
_predicates: dict[tuple[Any, str], bool] = {}


def _validators_predicate(func, value) -> bool:
    """pkilint.pkix.general_name.validators_predicate (`isinstance(ret, bool) and ret` of validators'
    url, domain or email on the value), its answer kept per function and exact string: those functions of
    validators 0.22.0 are pure (regular expressions and ipaddress on the string, no state), and a CA's
    leaves carry the same CRL, OCSP and CA-issuer URIs every time, whose check was ≈ 10% of a leaf's lint
    (a URI with an IP address is refused by `domain` before `ipv4` accepts it). The same check on every
    certificate; an identical input gets the answer the function gave it."""
    if type(value) is not str or len(value) > _PREDICATE_LEN:
        ret = func(value)
        return isinstance(ret, bool) and ret
    key = (func, value)
    got = _predicates.get(key)
    if got is None:
        ret = func(value)  # an exception (none known) goes to pkilint as before, and nothing is kept
        got = isinstance(ret, bool) and ret
        if len(_predicates) >= _PREDICATES:
            _predicates.clear()
        _predicates[key] = got
    return got


def _node_init(self: PDUNode, document, name: str, pdu, parent: PDUNode | None) -> None:
    """PDUNode.__init__ of pkilint 0.13.3 (the same nodes, names, paths and children, in the same order),
    with each value's isValue found once for the whole subtree: pyasn1's isValue of a SEQUENCE walks all
    its mandatory components again, so pkilint's per-node test made building a tree quadratic in depth
    (≈30% of a certificate's lint)."""
    self.document = document
    self.name = name
    self.pdu = pdu
    self.parent = parent
    self.path = name if parent is None else f"{parent.path}.{name}"
    self.children = _child_nodes(self, {})


_SKELETONS = 8192  # values whose children (names and values) are kept: a CA's leaves repeat many
_skeletons: collections.OrderedDict[int, tuple[Any, tuple[tuple[str, Any], ...]]] = collections.OrderedDict()
_skeleton_lock = threading.Lock()


def _child_nodes(node: PDUNode, memo: dict[int, bool]) -> dict[str, PDUNode]:
    """The children pkilint gives node, from the value's (name, value) list, kept per value object: a
    value is never changed once decoded (pkilint's validators only read), so its list stays what it was."""
    pdu = node.pdu
    if not isinstance(pdu, base.ConstructedAsn1Type):
        return {}  # as pkilint: no children for a simple value (nor for anything but the three kinds below)
    key = id(pdu)
    with _skeleton_lock:
        hit = _skeletons.get(key)
        if hit is not None and hit[0] is pdu:
            _skeletons.move_to_end(key)
    if hit is not None and hit[0] is pdu:  # built outside the lock: children are built the same way
        return {name: _child(node, name, value, memo) for name, value in hit[1]}
    skeleton = _skeleton(pdu, memo)
    with _skeleton_lock:
        _skeletons[key] = (pdu, skeleton)  # the value kept too: its id is never reused while cached
        if len(_skeletons) > _SKELETONS:
            _skeletons.popitem(last=False)
    return {name: _child(node, name, value, memo) for name, value in skeleton}


def _skeleton(pdu, memo: dict[int, bool]) -> tuple[tuple[str, Any], ...]:
    """PDUNode._generate_child_nodes of pkilint 0.13.3, as (name, value) pairs."""
    if isinstance(pdu, univ.Choice):
        return ((pdu.getName(), pdu.getComponent()),)
    if isinstance(pdu, univ.SequenceOfAndSetOfBase):
        return tuple((str(i), component) for i, component in enumerate(pdu))
    if isinstance(pdu, univ.SequenceAndSetBase):
        return tuple((name, value) for name, value in pdu.items() if _is_value(value, memo))
    return ()


def _child(parent: PDUNode, name: str, pdu, memo: dict[int, bool]) -> PDUNode:
    n = PDUNode.__new__(PDUNode)
    n.document = parent.document
    n.name = name
    n.pdu = pdu
    n.parent = parent
    n.path = f"{parent.path}.{name}"
    n.children = _child_nodes(n, memo)
    return n


_IS_VALUE: dict[type, int] = {}  # type -> which pyasn1 isValue property it has (0: another: asked as is)


def _is_value_kind(t: type) -> int:
    k = _IS_VALUE.get(t)
    if k is None:
        prop = next(c.__dict__["isValue"] for c in t.__mro__ if "isValue" in c.__dict__)
        k = {id(univ.SequenceAndSetBase.__dict__["isValue"]): 1, id(univ.SequenceOfAndSetOfBase.__dict__["isValue"]): 2,
             id(univ.Choice.__dict__["isValue"]): 3}.get(id(prop), 0)
        _IS_VALUE[t] = k
    return k


_REQUIRED: dict[int, tuple[Any, tuple[int, ...]]] = {}


def _required(ct) -> tuple[int, ...]:
    """The positions of the components that are neither OPTIONAL nor DEFAULT (NamedTypes.requiredComponents)."""
    hit = _REQUIRED.get(id(ct))
    if hit is None or hit[0] is not ct:
        if len(_REQUIRED) > _SHAPES_MAX:
            _REQUIRED.clear()
        hit = _REQUIRED[id(ct)] = (ct, tuple(sorted(ct.requiredComponents)))  # the schema object kept: its id stays its own
    return hit[1]


def _is_value(v, memo: dict[int, bool]) -> bool:
    """pyasn1 0.6.5's isValue for v (read in univ.py: SequenceAndSetBase, SequenceOfAndSetOfBase, Choice),
    each constructed value's found once per tree build (memo, by id: the tree holds every value meanwhile)."""
    kind = _is_value_kind(type(v))
    if kind == 0:
        return v.isValue
    r = memo.get(id(v))
    if r is not None:
        return r
    no = base.noValue
    cv = v._componentValues
    r = True
    if kind == 3:  # Choice
        r = v._currentIdx is not None and cv[v._currentIdx] is not no and _is_value(cv[v._currentIdx], memo)
    elif cv is no:
        r = False
    elif kind == 2:  # SEQUENCE OF / SET OF
        r = len(cv) == len(v) and all(c is not no and _is_value(c, memo) for c in cv.values())
    elif v.componentType:  # SEQUENCE / SET: every mandatory component a value
        for idx in _required(v.componentType):
            if not cv or cv[idx] is no or not _is_value(cv[idx], memo):
                r = False
                break
    else:
        r = all(c is not no and _is_value(c, memo) for c in cv)
    memo[id(v)] = r
    return r


_stock_navigate = PDUNode.navigate
_stock_node_init = PDUNode.__init__


def _navigate(self: PDUNode, path: str):
    """PDUNode.navigate without its regular expression for the paths validators use most: relative, no
    document name (no ':'), non-empty dot-separated parts: the same nodes, the same errors."""
    if ":" in path or not path or path[0] == "." or path[-1] == "." or ".." in path:
        return _stock_navigate(self, path)
    node = self
    for part in path.split("."):
        if part == "^":
            node = node.parent
        else:
            try:
                node = node.children[part]
            except KeyError:
                raise document.PDUNavigationFailedError(path, node.path, part) from None
    return node


def _tbs_der(tbs: PDUNode) -> bytes:
    """encode(tbs.pdu) as pkilint computes it, without encoding when it is known: a TBS assembled by
    _certificate_by_parts from fields that each re-encode to their own bytes (checked once per decoded
    field) re-encodes to the bytes it was read from (minimal DER headers around them)."""
    with _memo_lock:
        hit = _exact_tbs.get(id(tbs.pdu))
    if hit is not None and hit[0] is tbs.pdu:
        return hit[1]
    return encode(tbs.pdu)


def _verify_subject_signature(self, node):
    """SubjectSignatureVerificationValidator.validate of pkilint 0.13.3, the TBS taken as bytes (_tbs_der)
    instead of re-encoded with pyasn1's DER encoder (≈0.4 ms a certificate)."""
    issuer_cert_doc = document.get_document_by_name(node, "issuer")
    public_key = issuer_cert_doc.public_key_object
    if public_key is None:
        raise validation.ValidationFindingEncountered(self.VALIDATION_UNSUPPORTED_ALGORITHM)
    subject_crypto_doc = node.document.cryptography_object
    tbs_octets = _tbs_der(self._tbs_node_retriever(node))
    try:
        if not verify_signature(public_key, tbs_octets, node.pdu.asOctets(), subject_crypto_doc.signature_hash_algorithm):
            raise validation.ValidationFindingEncountered(self.VALIDATION_SIGNATURE_MISMATCH)
    except exceptions.UnsupportedAlgorithm:
        raise validation.ValidationFindingEncountered(self.VALIDATION_UNSUPPORTED_ALGORITHM) from None


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


def _bound(v: Validator) -> tuple[str | None, type | None]:
    """A necessary condition for v.match(node), read from v's own NodeVisitor fields: (path, None) when only
    the node at that path can match, (None, cls) when only nodes whose value is a cls can, (None, None) when
    any node may (no path or class, or a match() override not known to test NodeVisitor's part first)."""
    m = type(v).match
    if m is not NodeVisitor.match and m not in _OVERRIDES:
        return None, None
    if v._path is not None:
        return v._path, None
    return None, v._pdu_class


_append_node = document.create_and_append_node_from_pdu


def _counting_append(source_document, pdu, parent_node=None):
    """pkilint's create_and_append_node_from_pdu, forgetting the subtree summaries (_types) of the nodes
    above the new one. A node whose summary is known has all its descendants' known: stop at the first
    unknown one."""
    p = parent_node
    while p is not None and p.__dict__.get("_lw_types") is not None:
        p._lw_types = None
        p = p.parent
    return _append_node(source_document, pdu, parent_node)


def _types(node: PDUNode) -> frozenset:
    """The value classes of node and its descendants (kept on the node until a node is added under it)."""
    t = node.__dict__.get("_lw_types")
    if t is None:
        acc = {type(node.pdu)}
        for child in node.children.values():
            acc |= _types(child)
        t = node._lw_types = frozenset(acc)
    return t


class Walker:
    """Runs a ValidatorContainer exactly as its validate() does (same validators, same order, same
    results), but asks each validator whose match is a function of (path, value class) only once per
    shape, and does not descend into a subtree where no validator of the container can match: none bound
    to a path there, none bound to a value class found there (by the NodeVisitor tests its match() makes
    first), none that may match anywhere."""

    def __init__(self, root: ValidatorContainer):
        install()
        self.root = root
        self._index: dict[int, tuple[list[int], dict[tuple, tuple[tuple[int, bool], ...]]]] = {}
        self._plans: dict[int, tuple[bool, frozenset[str], tuple[type, ...]]] = {}
        self._found: dict[tuple[int, frozenset], bool] = {}

    def validate(self, node: PDUNode) -> list[ValidationResult]:
        if not _INSTALLED:
            return self.root.validate(node)
        results: list[ValidationResult] = []
        self._walk(self.root, node, results)
        return results

    def _plan(self, c: ValidatorContainer) -> tuple[bool, frozenset[str], tuple[type, ...]]:
        """(a validator may match anywhere, the paths leading to path-bound ones, the classes of class-bound ones)."""
        plan = self._plans.get(id(c))
        if plan is None:
            bounds = [_bound(v) for v in c.validators]
            prefixes: set[str] = set()
            for path, _ in bounds:
                if path is not None:
                    parts = path.split(".")
                    prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            plan = (any(p is None and cls is None for p, cls in bounds), frozenset(prefixes),
                    tuple({cls for _, cls in bounds if cls is not None}))
            self._plans[id(c)] = plan
        return plan

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
        """c over node's subtree, as c._validate_rec(node, results)."""
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
        anywhere, prefixes, classes = self._plans.get(id(c)) or self._plan(c)
        found = self._found
        for child in node.children.values():  # live, as pkilint's: a decoder above may just have added one
            if not anywhere and child.path not in prefixes:
                types = _types(child)  # current: nothing ran since the last node was added
                key = (id(c), types)
                hit = found.get(key)
                if hit is None:
                    hit = any(issubclass(t, classes) for t in types)
                    if len(found) > _SHAPES_MAX:
                        found.clear()
                    found[key] = hit
                if not hit:
                    continue
            self._walk(c, child, results)


def _is_container(v: Validator) -> bool:
    t = type(v)
    return (isinstance(v, ValidatorContainer) and t.validate is ValidatorContainer.validate
            and t._validate_rec is ValidatorContainer._validate_rec
            and t.validate_wrapper is Validator.validate_wrapper)

"""Publishers: put one verified object at one LDAP or HTTP destination, idempotently (blocking code,
run in a worker thread per destination by the agent)."""

from __future__ import annotations

import base64
import functools
import http.client
import re
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID

from appliance.ipc import schema as S
from policy import serials as serials_list
from policy.crl import _der_uint, _tlv  # DER lengths and a positive INTEGER: BER's minimal form, as ldap3 sends


class PublishError(Exception):
    """One line for `donjon dist status`. `permanent`: retrying cannot help (park the job)."""

    def __init__(self, msg: str, permanent: bool = False):
        super().__init__(msg)
        self.permanent = permanent


@dataclass(frozen=True)
class Job:
    action: str
    ca: str
    ca_root: bool
    issuer: bytes
    subject: dict[str, str]
    number: int
    data: bytes
    attachment: bytes | None = None  # the signed audit head published beside an issued-serials list
    part: str = ""  # a CRL's: "" complete, "-<k>" shard k, "-delta" the delta CRL, "-<k>-delta" shard k's delta

    @property
    def delta(self) -> bool:
        return self.part.endswith("-delta")

    @property
    def shard(self) -> str:
        """"-<k>" for a shard's CRL or its delta (its scope), "" for the CA's one CRL or its delta."""
        return self.part.removesuffix("-delta")


# ---------------------------------------------------------------- verification before sending


def _verify_sig(issuer: x509.Certificate, signature: bytes, tbs: bytes, hash_alg) -> None:
    pub = issuer.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        pub.verify(signature, tbs, padding.PKCS1v15(), hash_alg)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(signature, tbs, ec.ECDSA(hash_alg))
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(signature, tbs)
    else:
        raise PublishError("unsupported issuer key type", permanent=True)


@functools.lru_cache(maxsize=64)
def _issuer(der: bytes) -> x509.Certificate:
    """A CA certificate parsed once (every job of a CA carries the same one; a parse error is not cached)."""
    return x509.load_der_x509_certificate(der)


def verify(job: Job) -> None:
    """Never publish what does not parse and verify against its CA (a truncated CRL, a mangled
    certificate): the agent checks every object itself before it leaves the appliance."""
    try:
        issuer = _issuer(job.issuer)
        if job.action in ("cert", "uncert", "ca-cert"):
            cert = x509.load_der_x509_certificate(job.data)
            cert.verify_directly_issued_by(issuer)
        elif job.action == "crl":
            crl = x509.load_der_x509_crl(job.data)
            if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):
                raise PublishError("the CRL does not verify against its CA certificate", permanent=True)
            num = crl.extensions.get_extension_for_oid(ExtensionOID.CRL_NUMBER).value.crl_number
            if num != job.number:
                raise PublishError(f"CRL number {num} is not the job's {job.number}", permanent=True)
            # the object is what its name says: a delta CRL only as <ca>-delta.crl, a shard's IDP names <ca>-<k>.crl
            try:
                crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
                is_delta = True
            except x509.ExtensionNotFound:
                is_delta = False
            if is_delta != job.delta:
                raise PublishError(f"a {'delta' if is_delta else 'full'} CRL sent as {object_name(job)}", permanent=True)
            try:
                names = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value.full_name or []
            except x509.ExtensionNotFound:
                names = None
            if not job.shard and names is not None:
                raise PublishError(f"a CRL shard sent as {object_name(job)}", permanent=True)
            scope = f"{job.ca}{job.shard}.crl"  # a shard's delta has its base's IDP (RFC 5280 §5.2.5)
            if job.shard and not any(str(n.value).endswith("/" + scope) for n in names or []):
                raise PublishError(f"the CRL's IDP does not name {scope}", permanent=True)
        elif job.action == "issued-serials":
            lst = serials_list.decode(job.data)
            if lst.issuer_der != issuer.subject.public_bytes():
                raise PublishError("the issued-serials list names another issuer", permanent=True)
            _verify_sig(issuer, lst.signature, lst.tbs, serials_list.hash_for(lst.signature_oid))
            if job.attachment is not None:
                import json

                from policy import audit
                audit.verify_checkpoint(json.loads(job.attachment), None)  # structure; its signature is the audit key's
        else:
            raise PublishError(f"unknown action {job.action}", permanent=True)
    except PublishError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse or signature failure means: do not send it
        raise PublishError(f"{job.action} for {job.ca} does not verify: {type(e).__name__}", permanent=True) from None


def object_name(job: Job) -> str:
    return {"crl": f"{job.ca}{job.part}.crl", "ca-cert": f"{job.ca}.crt", "issued-serials": f"{job.ca}.serials"}[job.action]


CONTENT_TYPES = {"crl": "application/pkix-crl", "ca-cert": "application/pkix-cert",
                 "issued-serials": "application/vnd.donjon.issued-serials"}


def _tls_context(rule: S.DistRule) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if rule.ca_file_pem:
        ctx.load_verify_locations(cadata=rule.ca_file_pem.decode("ascii", "replace"))
    return ctx


# ---------------------------------------------------------------- HTTP


def publish_in_order(publisher, jobs: list[Job]) -> list[PublishError | None]:
    """Verify and publish each job in turn, stopping at the first failure: the outcome of each job tried."""
    out: list[PublishError | None] = []
    for job in jobs:
        try:
            verify(job)
            publisher.publish(job)
        except PublishError as e:
            out.append(e)
            break
        out.append(None)
    return out


def object_url(rule: S.DistRule, ca: str, name: str) -> str:
    """Where an HTTP rule puts a CA's object: its URL with {ca} and {name} filled, or name appended."""
    if "{" in rule.url:
        return rule.url.replace("{ca}", quote(ca)).replace("{name}", quote(name))
    return rule.url.rstrip("/") + "/" + quote(name)


def auth_headers(rule: S.DistRule) -> dict[str, str]:
    """An HTTP rule's credentials: Basic with a username, else the secret as a Bearer token; none without one."""
    if rule.secret is None:
        return {}
    if rule.username:
        return {"Authorization": "Basic " + base64.b64encode(f"{rule.username}:{rule.secret}".encode()).decode()}
    return {"Authorization": f"Bearer {rule.secret}"}


class HttpPublisher:
    """PUT or POST each object to its URL; any 2xx is success. Replacing a file is idempotent."""

    def __init__(self, rule: S.DistRule):
        self.rule = rule

    def close(self) -> None:
        pass

    def publish_run(self, jobs: list[Job]) -> list[PublishError | None]:
        return publish_in_order(self, jobs)

    def publish(self, job: Job) -> None:
        if job.action not in CONTENT_TYPES:
            raise PublishError(f"{job.action} cannot go to an HTTP destination", permanent=True)
        if job.attachment is not None:  # the audit head first: a list is never out without its anchor
            self._put(job, f"{job.ca}.audit-head.json", job.attachment, "application/json")
        self._put(job, object_name(job), job.data, CONTENT_TYPES[job.action])

    def _put(self, job: Job, name: str, data: bytes, ctype: str) -> None:
        r = self.rule
        u = urlsplit(object_url(r, job.ca, name))
        headers = {"Content-Type": ctype, "Content-Length": str(len(data)),
                   "User-Agent": "donjon-distribution", **auth_headers(r)}
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=r.timeout, context=_tls_context(r))
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=r.timeout)
        try:
            conn.request(r.method, (u.path or "/") + (f"?{u.query}" if u.query else ""), body=data, headers=headers)
            resp = conn.getresponse()
            resp.read(64 * 1024)
            status = resp.status
        except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as e:
            raise PublishError(f"{u.hostname}:{u.port}: {_oneline(e)}") from None
        finally:
            conn.close()
        if 200 <= status < 300:
            return
        # 4xx will not mend by itself (bad path, credentials): park it; 408/425/429 and 5xx: retry.
        permanent = 400 <= status < 500 and status not in (408, 425, 429)
        raise PublishError(f"{r.method} {u.path}: HTTP {status}", permanent=permanent)


# ---------------------------------------------------------------- LDAP (RFC 4523 attributes)


PIPELINE = 64  # new certificate entries sent before their answers are read (LdapPublisher.publish_run)

# Object classes for missing parent entries, by the attribute of their RDN.
PARENT_CLASSES = {"ou": ["organizationalUnit"], "o": ["organization"], "dc": ["domain"], "c": ["country"],
                  "l": ["locality"], "cn": ["applicationProcess"]}

_FIELD = re.compile(r"{([A-Za-z]+)}")


def _octets(v: bytes | str) -> bytes:
    return _tlv(0x04, v if isinstance(v, bytes) else str(v).encode("utf-8"))


def add_request(message_id: int, dn: str, entry: dict[str, Any]) -> bytes:
    """One LDAPMessage carrying an AddRequest (RFC 4511 §4.7), in the BER ldap3 sends for it (tested byte
    for byte against ldap3's pyasn1 encoding): written here because pyasn1 built and encoded each request
    at several times the cost of the rest of the agent's work on an entry."""
    attrs = b"".join(_tlv(0x30, _octets(k) + _tlv(0x31, b"".join(map(_octets, v if isinstance(v, (list, tuple)) else [v]))))
                     for k, v in entry.items())
    return _tlv(0x30, _tlv(0x02, _der_uint(message_id)) + _tlv(0x68, _octets(dn) + _tlv(0x30, attrs)))


def render(template: str, fields: dict[str, str], escape) -> str:
    def sub(m: re.Match) -> str:
        k = m.group(1)
        if k not in fields or not fields[k]:
            raise PublishError(f"the subject has no {k} for the template {template!r}", permanent=True)
        return escape(fields[k])
    return _FIELD.sub(sub, template)


class LdapPublisher:
    """One bound connection per destination, re-opened after any error. Certificates are added as
    values (an existing value is success), removed as values (a missing one is success); a CRL
    replaces the stored one only if its number is not lower."""

    def __init__(self, rule: S.DistRule):
        import ldap3  # noqa: F401 - imported before the drop by the agent

        self.rule = rule
        self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            _close_quietly(self.conn)
            self.conn = None

    def _connect(self):
        import ldap3

        r = self.rule
        u = urlsplit(r.url)
        tls = None
        if u.scheme == "ldaps" or r.starttls:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_data=r.ca_file_pem.decode() if r.ca_file_pem else None)
        server = ldap3.Server(u.hostname, port=u.port or (636 if u.scheme == "ldaps" else 389), use_ssl=u.scheme == "ldaps",
                              tls=tls, get_info=ldap3.NONE, connect_timeout=max(1, int(r.timeout)))
        conn = ldap3.Connection(server, user=r.bind_dn, password=r.secret, auto_bind=ldap3.AUTO_BIND_NONE,
                                receive_timeout=max(1, int(r.timeout)), raise_exceptions=False, check_names=False,
                                read_only=False, return_empty_attributes=False)
        try:
            conn.open(read_server_info=False)
            if conn.closed:
                raise PublishError(f"cannot reach {u.hostname}:{server.port}")
            if r.starttls and not conn.start_tls(read_server_info=False):
                raise PublishError("StartTLS refused")
            if not conn.bind(read_server_info=False):
                res = conn.result or {}
                raise PublishError(f"bind as {r.bind_dn or 'anonymous'} refused: {res.get('description', 'error')}",
                                   permanent=res.get("result") in (48, 49, 50))
        except BaseException:
            _close_quietly(conn)  # a refused connection leaves no socket behind
            raise
        self.conn = conn
        return conn

    def publish(self, job: Job) -> None:
        try:
            conn = self.conn or self._connect()
            self._do(conn, job)
        except PublishError as e:
            if not e.permanent:
                self.close()
            raise
        except Exception as e:  # noqa: BLE001 - ldap3 raises IndexError, socket errors, its own types on garbage
            self.close()
            raise PublishError(f"LDAP: {_oneline(e)}") from None

    def _dn(self, job: Job) -> str:
        from ldap3.utils.dn import escape_rdn

        template = self.rule.dn if job.action in ("cert", "uncert") else self.rule.ca_dn
        if not template:
            raise PublishError(f"no dn template for {job.action}", permanent=True)
        fields = dict(job.subject)
        fields.setdefault("ca", job.ca)
        dn = render(template, fields, escape_rdn)
        if job.action == "crl" and job.shard:  # a shard: its own entry below the CA's,
            return f"cn={escape_rdn(job.ca + job.shard)},{dn}"  # named like its file (a delta goes beside its base)
        return dn

    def _do(self, conn, job: Job) -> None:
        import ldap3

        dn = self._dn(job)
        if job.action in ("cert", "ca-cert"):
            attr = "userCertificate;binary" if job.action == "cert" else "cACertificate;binary"

            def add_value() -> None:
                if self._modify(conn, dn, {attr: [(ldap3.MODIFY_ADD, [job.data])]}, ok_codes=(20,)) == "missing":  # 20: value exists
                    raise PublishError(f"modify {dn}: the entry went away meanwhile")  # retried, in order

            # A new certificate is most often a new entry: add it first (one round trip, as ldapadd does);
            # an entry that exists gets the value added instead. The same end state either way.
            self._create(conn, dn, job, {attr: [job.data]}, exists=add_value)
        elif job.action == "uncert":
            self._modify(conn, dn, {"userCertificate;binary": [(ldap3.MODIFY_DELETE, [job.data])]}, ok_codes=(16, 32))
        elif job.action == "crl":
            attr = "deltaRevocationList;binary" if job.delta else "certificateRevocationList;binary"
            current = self._current_crl_number(conn, dn, attr)
            if current is not None and current > job.number:
                return  # a newer CRL is already there: an older one never overwrites it
            changes: dict[str, list[tuple[str, list[bytes | str]]]] = {attr: [(ldap3.MODIFY_REPLACE, [job.data])]}
            if job.ca_root and not job.part:
                changes["authorityRevocationList;binary"] = [(ldap3.MODIFY_REPLACE, [job.data])]
            if job.delta:  # deltaRevocationList needs the auxiliary class deltaCRL (RFC 4523 §4.4)
                conn.modify(dn, changes)
                if (conn.result or {}).get("result") == 65:  # objectClassViolation: the class first, same change
                    changes["objectClass"] = [(ldap3.MODIFY_ADD, ["deltaCRL"])]
                elif (conn.result or {}).get("result") == 0:
                    return
            if self._modify(conn, dn, changes) == "missing":
                self._create(conn, dn, job, {k: [job.data] for k in changes})
        else:
            raise PublishError(f"{job.action} has no LDAP attribute (RFC 4523); publish it over HTTP", permanent=True)

    def _current_crl_number(self, conn, dn: str, attr: str = "certificateRevocationList;binary") -> int | None:
        import ldap3

        if not conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[attr]):
            if (conn.result or {}).get("result") == 32:
                return None
            raise PublishError(f"read {dn}: {(conn.result or {}).get('description', 'error')}")
        for e in conn.response or []:
            vals = (e.get("raw_attributes") or {}).get(attr) or []
            for v in vals:
                try:
                    crl = x509.load_der_x509_crl(v)
                    return crl.extensions.get_extension_for_oid(ExtensionOID.CRL_NUMBER).value.crl_number
                except Exception:  # noqa: BLE001 - a broken value in the directory is simply replaced
                    return None
        return None

    def _modify(self, conn, dn: str, changes, ok_codes: tuple[int, ...] = ()) -> str:
        conn.modify(dn, changes)
        code = (conn.result or {}).get("result")
        if code == 0 or code in ok_codes:
            return "ok"
        if code == 32:
            return "missing"
        raise PublishError(_ldap_error(conn, f"modify {dn}"), permanent=code in (17, 21, 34, 50, 64, 65, 69))

    def _entry(self, dn: str, job: Job, attrs: dict[str, list[bytes]]) -> tuple[dict[str, Any], list]:
        """(the attributes of a new entry for the job, its parsed DN)."""
        from ldap3.utils.dn import parse_dn

        rdns = parse_dn(dn)
        rdn_attr, rdn_val = rdns[0][0], _unescape(rdns[0][1])
        if job.action in ("cert", "uncert"):
            classes = list(self.rule.entry_classes)
            extra = {k: render(v, dict(job.subject), lambda x: x) for k, v in self.rule.entry_attributes.items()}
        elif job.action == "crl" and job.shard:
            classes, extra = ["cRLDistributionPoint"] + (["deltaCRL"] if job.delta else []), {}  # RFC 4523 §3.2: a shard's own entry
        else:
            classes = list(self.rule.ca_entry_classes) + (["deltaCRL"] if job.delta else [])
            extra = {}
        attrs = {k: v for k, v in attrs.items() if k != "objectClass"}
        return {"objectClass": classes, rdn_attr: rdn_val, **extra, **attrs}, rdns

    def publish_run(self, jobs: list[Job]) -> list[PublishError | None]:
        """Publish jobs in order, stopping at the first failure, as verify + publish one after the other
        would; new certificate entries go pipelined: a run of consecutive certificate jobs with distinct
        DNs is sent as that many add requests at once, then their answers are read (the directory's round
        trip, fsync included, paid once for the run instead of once per entry: one add after another left
        the agent at half of ldapadd's rate). A job whose add did not simply succeed (the entry exists, a
        parent is missing, an error) is then done the one-by-one way, in order, and decides as before;
        once one fails, the adds sent after it may have been applied already, and are published again
        later: adding a certificate that is there already is success, so the end state is the same."""
        out: list[PublishError | None] = []
        i = 0
        while i < len(jobs):
            group = self._pipelinable(jobs, i)
            done = self._pipeline(group) if len(group) >= 2 else publish_in_order(self, jobs[i:i + 1])
            out += done
            if done[-1] is not None:
                return out
            i += len(done)
        return out

    def _pipelinable(self, jobs: list[Job], i: int) -> list[tuple[Job, str, dict[str, Any]]]:
        """The run of certificate jobs from i that verify, have distinct DNs and render (at most PIPELINE)."""
        group: list[tuple[Job, str, dict[str, Any]]] = []
        seen: set[str] = set()
        for job in jobs[i:i + PIPELINE]:
            if job.action != "cert":
                break
            try:
                verify(job)
                dn = self._dn(job)
                entry, _ = self._entry(dn, job, {"userCertificate;binary": [job.data]})
            except PublishError:
                break  # the one-by-one path refuses it, in order
            key = dn.lower()
            if key in seen:
                break
            seen.add(key)
            group.append((job, dn, entry))
        return group

    def _pipeline(self, group: list[tuple[Job, str, dict[str, Any]]]) -> list[PublishError | None]:
        from ldap3.utils.asn1 import decode_message_fast

        try:
            conn = self.conn or self._connect()
            sent = [conn.server.next_message_id() for _ in group]  # ldap3's own counter: no id is used twice
            conn.socket.sendall(b"".join(add_request(mid, dn, entry) for mid, (_, dn, entry) in zip(sent, group)))
            waiting = set(sent)
            codes: dict[int, dict[str, Any]] = {}
            while waiting:
                pdus = conn.strategy.receiving()  # [] when the directory closed the connection (ldap3 does not raise)
                if not pdus:
                    raise PublishError(f"LDAP: the directory closed the connection with {len(waiting)} adds unanswered")
                for pdu in pdus:
                    m = decode_message_fast(pdu)
                    if m["messageID"] not in waiting:
                        raise PublishError(f"LDAP: an answer to no request of ours (message {m['messageID']})")
                    waiting.discard(m["messageID"])
                    codes[m["messageID"]] = conn.strategy.decode_response_fast(m)
        except PublishError as e:
            self.close()
            return [e]
        except Exception as e:  # noqa: BLE001 - socket errors, ldap3's own types on garbage
            self.close()
            return [PublishError(f"LDAP: {_oneline(e)}")]
        out: list[PublishError | None] = []
        for mid, (job, dn, _) in zip(sent, group):
            r = codes[mid]
            if r.get("result") == 0:
                out.append(None)
                continue
            try:
                if r.get("result") in (32, 68):  # no parent yet, or the entry exists: the one-by-one path
                    self.publish(job)
                else:
                    code = r.get("result")
                    raise PublishError(f"add {dn}: {r.get('description', 'error')} ({code})",
                                       permanent=code in (17, 19, 21, 34, 50, 64, 65, 69))
            except PublishError as e:
                if not e.permanent:
                    self.close()
                out.append(e)
                break
            out.append(None)
        return out

    def _create(self, conn, dn: str, job: Job, attrs: dict[str, list[bytes]], exists=None) -> None:
        entry, rdns = self._entry(dn, job, attrs)
        for _ in range(2):
            conn.add(dn, attributes=entry)
            code = (conn.result or {}).get("result")
            if code in (0, 68):  # 68: it exists (an earlier attempt, another certificate): the modify path
                if code == 68:
                    (exists or (lambda: self._do(conn, job)))()
                return
            if code != 32:
                raise PublishError(_ldap_error(conn, f"add {dn}"), permanent=code in (17, 19, 21, 34, 50, 64, 65, 69))
            self._create_parents(conn, rdns[1:])
        raise PublishError(f"add {dn}: parent entries could not be created")

    def _create_parents(self, conn, rdns, depth: int = 0) -> None:
        """Create the missing ancestors, nearest first, walking up only as far as needed (the
        directory's own suffix entry must exist: we never create above it)."""
        if not rdns or depth > 16:
            raise PublishError("no existing ancestor entry to create the entry under", permanent=True)
        dn = ",".join(f"{a}={v}" for a, v, _ in rdns)
        attr = rdns[0][0].lower()
        classes = PARENT_CLASSES.get(attr)
        if classes is None:
            raise PublishError(f"cannot create parent {dn}: no object class for {attr}=", permanent=True)
        for _ in range(2):
            conn.add(dn, attributes={"objectClass": classes, attr: _unescape(rdns[0][1])})
            code = (conn.result or {}).get("result")
            if code in (0, 68):
                return
            if code != 32:
                raise PublishError(_ldap_error(conn, f"add parent {dn}"), permanent=code in (17, 21, 34, 50, 53, 64, 65, 69))
            self._create_parents(conn, rdns[1:], depth + 1)
        raise PublishError(f"add parent {dn}: its own parent could not be created")


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", r"\1", v)


def _close_quietly(conn) -> None:
    """Unbind, and close the socket whatever ldap3 managed (a half-open or broken connection)."""
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _ldap_error(conn, what: str) -> str:
    res = conn.result or {}
    return f"{what}: {res.get('description', 'error')} ({res.get('result')})"


def _oneline(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def publisher_for(rule: S.DistRule):
    return LdapPublisher(rule) if rule.url.startswith("ldap") else HttpPublisher(rule)


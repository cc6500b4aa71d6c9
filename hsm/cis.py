"""The Certificate Issuing System role: the only process that loads the PKCS#11 module and signs.

It takes structured requests from the Factory, builds every to-be-signed structure itself with
policy/, checks it against the profile and the issuer certificate kept in the token, lints CA
certificates and CRLs under a throwaway key (the linted TBS must equal the signed TBS), then signs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from datetime import datetime, timedelta, timezone

import trio
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from appliance import roles
from appliance.ipc import schema as S
from appliance.ipc.channel import Channel, LinkClosed, ProtocolViolation
from appliance.ipc.links import FACTORY_CIS
from policy import audit, certs, crl, lint, profiles, tier
from policy import serials as serials_list
from policy import ocsp as ocsp_hashes
from policy.capolicy import CaPolicy, default_policy, named_policy
from policy.errors import PolicyError

from . import keybackup
from .token import ObjectMissing, Token, TokenError, make_private_key

ANCHOR_PREFIX = "anchor/"  # token label of a CA's trust anchor ("/" is never in a CA name)
AUDIT_LABEL = "donjon-audit"  # the audit key's token label (CA names may not take it)
# CRL entries linted under the throwaway key with the CRL's header and extensions (memory stays flat for big
# CRLs). Every entry sent encoded passes policy.crl.check_encoded, which admits only the encoder's shapes; the
# sample lints those shapes in context. 100, not 1,000: pkilint costs ≈0.2 s a 1,000-entry CRL here, and a
# 16-shard CA signs 17 CRLs at a time.
LINT_SAMPLE = 100
TOKEN_CHECK_SECONDS = 5  # how often an idle CIS checks that its token is still there


def _log(msg: str) -> None:
    print(f"donjon[cis {os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class Cis:
    def __init__(self, cfg: S.CisConfig):
        self.token = Token(cfg.module, cfg.token_label)
        self.profiles = profiles.load_profiles(dict(cfg.profiles))
        self.base_url = cfg.base_url.rstrip("/") if cfg.base_url else None
        self.crl_shards = dict(cfg.crl_shards)  # from the supervisor: the CIS names shards itself
        self.crl_delta = frozenset(cfg.crl_delta)  # CAs with delta CRLs (freshestCRL in certificates and full CRLs)
        self._throwaway: dict[str, object] = {}
        self._shadows: dict[bytes, bytes] = {}
        self._crls: dict[int, _CrlState] = {}
        self._policies: dict[tuple[str, int], CaPolicy] = {}  # by label and CA certificate serial
        self.limiter = trio.CapacityLimiter(1)

    # ------------------------------------------------------------ helpers (run in the HSM thread)

    def throwaway(self, key_type: str):
        k = self._throwaway.get(key_type)
        if k is None:
            if key_type.startswith("rsa"):
                k = rsa.generate_private_key(65537, int(key_type[3:]))
            elif key_type == "ed25519":
                k = ed25519.Ed25519PrivateKey.generate()
            else:
                k = ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[key_type])
            self._throwaway[key_type] = k
        return k

    def shadow_issuer(self, issuer_der: bytes, key_type: str) -> bytes:
        """The issuer certificate re-made around the throwaway key, so that pkilint's chain checks
        (names, AKI/SKI, signature) run on the trial certificate exactly as on the real one."""
        cached = self._shadows.get(issuer_der)
        if cached is not None:
            return cached
        real = x509.load_der_x509_certificate(issuer_der)
        tk = self.throwaway(key_type)
        b = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.issuer)
             .public_key(tk.public_key()).serial_number(real.serial_number)
             .not_valid_before(real.not_valid_before_utc).not_valid_after(real.not_valid_after_utc))
        for ext in real.extensions:
            b = b.add_extension(ext.value, ext.critical)
        der = b.sign(tk, certs.signature_hash(key_type)).public_bytes(serialization.Encoding.DER)
        self._shadows[issuer_der] = der
        return der

    def issuer_cert(self, label: str) -> x509.Certificate:
        ders = self.token.certificates(label)
        if not ders:
            raise ObjectMissing(f"CA {label!r} has no certificate in the token")
        return max((x509.load_der_x509_certificate(d) for d in ders), key=lambda c: c.not_valid_after_utc)

    def issuer_info(self, label: str, cert: x509.Certificate) -> certs.IssuerInfo:
        key = self.token.key(label)
        if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != key.spki:
            raise TokenError(f"CA {label!r}: the certificate in the token does not match the key")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            path_length = bc.path_length
        except x509.ExtensionNotFound:
            path_length = None
        permitted: tuple[str, ...] = ()
        excluded: tuple[str, ...] = ()
        try:
            nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
            permitted = tuple(g.value for g in nc.permitted_subtrees or () if isinstance(g, x509.DNSName))
            excluded = tuple(g.value for g in nc.excluded_subtrees or () if isinstance(g, x509.DNSName))
        except x509.ExtensionNotFound:
            pass
        base = self.base_url
        return certs.IssuerInfo(
            name_der=cert.subject.public_bytes(), key_type=key.key_type, spki_der=key.spki,
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, path_length=path_length,
            permitted_dns=permitted, excluded_dns=excluded,
            crl_url=f"{base}/crl/{label}.crl" if base else None,
            ocsp_url=f"{base}/ocsp" if base else None,
            ca_issuers_url=f"{base}/ca/{label}.crt" if base else None,
            crl_shards=self.crl_shards.get(label, 1),
            delta_crls=label in self.crl_delta,
        )

    def ca_policy(self, label: str, cert: x509.Certificate) -> CaPolicy:
        """What the CA may issue, read from beside its key in the token (never from the Factory's
        request). A CA made before policies were kept gets the default for its place."""
        pol = self._policies.get((label, cert.serial_number))
        if pol is None:
            data = self.token.policy(label)
            pol = CaPolicy.decode(data) if data is not None else default_policy(cert.issuer == cert.subject)
            self._policies[(label, cert.serial_number)] = pol
        return pol

    def new_ca_policy(self, item: S.IssueItem, root: bool) -> CaPolicy:
        if item.allowed_profiles:
            if item.allowed_kinds:
                raise PolicyError("allowed profiles", "conflict", "name profiles or kinds, not both")
            return named_policy(item.allowed_profiles, self.profiles)
        if item.allowed_kinds:
            return CaPolicy(tuple(sorted(set(item.allowed_kinds))), ())
        return default_policy(root)

    def issue(self, req: S.Issue) -> list[S.IssueOutcome]:
        key = self.token.key(req.ca)
        policy = None
        if req.self_signed:
            if len(req.items) != 1:
                raise PolicyError("issue", "self-signed", "a self-signed request carries exactly one item")
            issuer = None
            issuer_der = None
        else:
            cert = self.issuer_cert(req.ca)
            issuer = self.issuer_info(req.ca, cert)
            issuer_der = cert.public_bytes(serialization.Encoding.DER)
            policy = self.ca_policy(req.ca, cert)
            if issuer.not_after < datetime.now(timezone.utc):
                raise PolicyError("issuer", "expired", f"the certificate of CA {req.ca!r} expired on "
                                  f"{issuer.not_after:%Y-%m-%d %H:%M} UTC: it issues nothing more")
        signer = make_private_key(self.token, key)
        halg = certs.signature_hash(key.key_type)
        out = []
        for item in req.items:
            try:
                if policy is not None:
                    prof = self.profiles.get(item.profile)
                    if prof is not None and not policy.allows(prof):
                        raise PolicyError("profile", "ca-policy", f"CA {req.ca!r} may not issue profile {item.profile!r} "
                                          f"(its policy in the token allows: {policy.describe()})")
                out.append(S.IssueOutcome(cert=self._issue_one(item, key, signer, halg, issuer, issuer_der, req), error=None))
            except PolicyError as e:
                out.append(S.IssueOutcome(cert=None, error=str(e)))
        return out

    def _issue_one(self, item: S.IssueItem, key, signer, halg, issuer, issuer_der, req: S.Issue) -> bytes:
        profile = self.profiles.get(item.profile)
        if profile is None:
            raise PolicyError("profile", "known", f"unknown profile {item.profile!r}")
        if req.self_signed:
            if profile.kind != "root-ca":
                raise PolicyError("profile", "self-signed", "only a root-ca profile can be self-signed")
            if item.spki != key.spki:
                raise PolicyError("public key", "self-signed", "a root certificate must certify the CA's own key")
        spec = certs.IssueSpec(
            profile=profile, public_key_der=item.spki, subject=tuple(item.subject), sans=tuple(item.sans),
            serial=int.from_bytes(item.serial, "big"), not_before=_utc(item.validity.not_before), not_after=_utc(item.validity.not_after),
            path_length=item.path_length, permitted_dns=tuple(item.permitted_dns),
        )
        new = None
        if item.install_as is not None:
            if profile.kind not in ("root-ca", "sub-ca"):
                raise PolicyError("install_as", "ca", "only CA certificates are kept in the token")
            if self.token.key(item.install_as).spki != item.spki:
                raise PolicyError("install_as", "key", f"the certified key is not the token key {item.install_as!r}")
            # A CA key is certified once, its policy with it: no later request (a compromised Factory's
            # included) replaces the certificate the CIS chains from, or the policy beside it.
            if self.token.certificates(item.install_as):
                raise PolicyError("install_as", "exists", f"CA {item.install_as!r} already has its certificate in the token: "
                                  "a CA key is certified once, and its issuance policy is never changed")
            new = self.new_ca_policy(item, req.self_signed)
        builder = certs.build_tbs(spec, issuer)
        linted_tbs = None
        if profile.lint:
            trial = builder.sign(self.throwaway(key.key_type), halg)
            shadow = self.shadow_issuer(issuer_der, key.key_type) if issuer_der else None
            findings = lint.lint_certificate(trial.public_bytes(serialization.Encoding.DER), profile, shadow)
            if findings:
                raise PolicyError("certificate", "lint", "; ".join(findings[:5]))
            linted_tbs = trial.tbs_certificate_bytes
        cert = builder.sign(signer, halg)
        if linted_tbs is not None and cert.tbs_certificate_bytes != linted_tbs:
            raise PolicyError("certificate", "lint", "the signed TBS differs from the linted TBS")
        der = cert.public_bytes(serialization.Encoding.DER)
        if item.install_as is not None:
            # The policy goes in first: a certificate never sits in the token without the policy it was made with.
            old = self.token.policy(item.install_as)
            if old is not None and CaPolicy.decode(old) != new:
                raise PolicyError("install_as", "ca-policy", f"CA {item.install_as!r} already has an issuance policy: it is never changed")
            if old is None and new is not None:
                self.token.store_policy(item.install_as, new.encode())
            self.token.store_certificate(item.install_as, der, cert.subject.public_bytes())
        return der

    # ------------------------------------------------------------ two tiers: a CA's request, its certificate from elsewhere

    def make_ca_request(self, m: S.MakeCaRequest) -> tuple[bytes, bytes]:
        """The CA's PKCS#10 request, built here (subject and CA extensions from the profile) and signed by its token key."""
        profile = self.profiles.get(m.profile)
        if profile is None:
            raise PolicyError("profile", "known", f"unknown profile {m.profile!r}")
        builder = tier.ca_request_builder(tuple(m.subject), profile, m.path_length)  # checked before a key is made
        if m.new_key:
            self.token.generate(m.label, m.key_type)
        key = self.token.key(m.label)
        if key.key_type != m.key_type:
            raise PolicyError("key_type", "token-key", f"the token key {m.label!r} is {key.key_type}, not {m.key_type}")
        csr = builder.sign(make_private_key(self.token, key), certs.signature_hash(key.key_type))
        return csr.public_bytes(serialization.Encoding.DER), key.spki

    def install_ca_cert(self, m: S.InstallCaCert) -> bytes:
        """Check a CA certificate signed elsewhere (policy.tier.check_install) and keep it beside the key,
        with the trust anchor (given once) and the CA's issuance policy (written once, never changed)."""
        key = self.token.key(m.label)
        kept = self.token.certificates(ANCHOR_PREFIX + m.label)
        if kept and m.anchor is not None and m.anchor not in kept:
            raise PolicyError("chain", "anchor", f"CA {m.label!r} already has a trust anchor in the token: it is never replaced")
        anchor = kept[0] if kept else m.anchor
        if anchor is None:
            raise PolicyError("chain", "anchor", "no trust anchor: give the root certificate once (--trust-anchor)")
        new = self.new_ca_policy(S.IssueItem(profile="sub-ca", spki=b"", subject=(), sans=(), serial=b"\x01",
                                             validity=S.Validity(0, 1), allowed_kinds=m.allowed_kinds,
                                             allowed_profiles=m.allowed_profiles), False)
        old = self.token.policy(m.label)
        if old is not None and CaPolicy.decode(old) != new:
            raise PolicyError("policy", "ca-policy", f"CA {m.label!r} already has an issuance policy: it is never changed")
        allows = [p for p in self.profiles.values() if new.allows(p)]
        cert = tier.check_install(m.cert, list(m.chain), anchor, key.spki, datetime.now(timezone.utc), allows,
                                  any(p.kind == "sub-ca" for p in allows))
        if m.cert in self.token.certificates(m.label):
            raise PolicyError("certificate", "installed", "this certificate is already installed")
        if not kept:
            a = x509.load_der_x509_certificate(anchor)
            self.token.store_certificate(ANCHOR_PREFIX + m.label, anchor, a.subject.public_bytes())
        if old is None:
            self.token.store_policy(m.label, new.encode())
        self.token.store_certificate(m.label, m.cert, cert.subject.public_bytes())
        self._policies.pop((m.label, cert.serial_number), None)
        return anchor

    # ------------------------------------------------------------ audit checkpoints

    def audit_key(self):
        """The audit key (P-256, label donjon-audit) and its self-issued certificate, made on first use."""
        try:
            key = self.token.key(AUDIT_LABEL)
        except ObjectMissing:
            self.token.generate(AUDIT_LABEL, "p256")
            key = self.token.key(AUDIT_LABEL)
        if self._audit_der(self.token.certificates(AUDIT_LABEL)) is None:
            # None yet, or only one made before the AKI was added: a new certificate for the same key
            # (checkpoints signed before still verify with it); the old one stays, never served again.
            now = datetime.now(timezone.utc)
            name = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Donjon"),
                              x509.NameAttribute(x509.NameOID.COMMON_NAME, f"Donjon audit key {self.token.label}"[:64])])
            pub = serialization.load_der_public_key(key.spki)
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub)
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - timedelta(seconds=60)).not_valid_after(now + timedelta(days=20 * 365))
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                                 crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                    # RFC 5280 §4.2.1.1: an AKI even when self-signed (pkilint: ERROR without it).
                    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)  # type: ignore[arg-type]
                    .sign(make_private_key(self.token, key), hashes.SHA256()))
            der = cert.public_bytes(serialization.Encoding.DER)
            findings = lint.lint_pkix(der)  # every certificate Donjon makes is linted, this one too
            if findings:
                raise PolicyError("audit certificate", "lint", "; ".join(findings[:5]))
            self.token.store_certificate(AUDIT_LABEL, der, name.public_bytes())
        return key

    @staticmethod
    def _audit_der(ders: list[bytes]) -> bytes | None:
        """The newest audit certificate that carries an AKI."""
        good = []
        for d in ders:
            c = x509.load_der_x509_certificate(d)
            try:
                c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
            except x509.ExtensionNotFound:
                continue
            good.append((c.not_valid_before_utc, d))
        return max(good)[1] if good else None

    def audit_cert(self) -> bytes:
        self.audit_key()
        der = self._audit_der(self.token.certificates(AUDIT_LABEL))
        if der is None:
            raise ObjectMissing("the audit certificate is missing from the token")
        return der

    def sign_checkpoint(self, m: S.SignCheckpoint) -> tuple[bytes, bytes]:
        """Build the checkpoint text from its fields (never bytes from the Factory) and sign it."""
        tbs = audit.checkpoint_tbs(m.seq, m.head, m.time)
        return tbs, self.token.sign(self.audit_key(), tbs, hashes.SHA256())

    # ------------------------------------------------------------ OCSP

    def sign_ocsp(self, m: S.SignOcsp) -> list[bytes]:
        """Build and sign one pre-produced response per item and CertID hash (RFC 6960, RFC 5019:
        responderID by key hash, no nonce, no certificates since the CA itself signs)."""
        cert = self.issuer_cert(m.ca)
        key = self.token.key(m.ca)
        _check_window(cert, m.this_update, m.next_update)
        signer = make_private_key(self.token, key)
        halg = certs.signature_hash(key.key_type)
        issuer = ocsp_hashes.issuer_hashes(cert.public_bytes(serialization.Encoding.DER))
        this_update, next_update = _utc(m.this_update), _utc(m.next_update)
        out = []
        for serial_b, status, revoked_at, reason in m.items:
            if status == 1 and revoked_at is None:
                raise PolicyError("ocsp", "revoked", "a revoked status needs its revocation time")
            if status == 1 and revoked_at > m.this_update:
                raise PolicyError("ocsp", "thisUpdate", "thisUpdate precedes the revocation the response reports")
            if status == 1 and reason == 8:
                raise PolicyError("ocsp", "reason", "removeFromCRL is not a revocation reason (RFC 5280 §5.3.1)")
            for h in m.hashes:
                alg = hashes.SHA1() if h == "sha1" else hashes.SHA256()
                hn, hk = issuer[h]
                b = ocsp.OCSPResponseBuilder().add_response_by_hash(
                    hn, hk, int.from_bytes(serial_b, "big"), alg,
                    ocsp.OCSPCertStatus.GOOD if status == 0 else ocsp.OCSPCertStatus.REVOKED,
                    this_update, next_update,
                    _utc(revoked_at) if status == 1 else None,
                    _REASON_FLAGS.get(reason) if status == 1 and reason else None,
                ).responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
                out.append(b.sign(signer, halg).public_bytes(serialization.Encoding.DER))
        return out

    # ------------------------------------------------------------ CRLs

    def crl_begin(self, m: S.CrlBegin) -> bytes:
        cert = self.issuer_cert(m.ca)
        key = self.token.key(m.ca)
        _check_window(cert, m.this_update, m.next_update)
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        if m.kind == "issued-serials":
            try:
                tbs = serials_list.TbsSerials(issuer_name_der=cert.subject.public_bytes(), key_type=key.key_type,
                                              aki_key_id=ski, list_number=m.crl_number, this_update=m.this_update,
                                              next_update=m.next_update, count=m.entry_count, serials_length=m.entries_length)
            except ValueError as e:
                raise PolicyError("issued-serials", "declaration", str(e)) from None
        else:
            idp = None
            url = f"{self.base_url}/crl/{m.ca}.crl"
            shards = self.crl_shards.get(m.ca, 1)
            if m.shard is not None:  # the IDP names exactly the URL the shard's certificates name in their CRL DP
                if shards == 1 or m.shard >= shards or not self.base_url:
                    raise PolicyError("crl shard", "partition", f"CA {m.ca} has no CRL shard {m.shard} ({shards} shard(s))")
                url = crl.shard_url(url, m.shard, shards)
                idp = crl.idp_der(url)
            fresh = None
            # Deltas (RFC 5280 §5.2.4/§5.2.5): one per scope, the scope of the CRL its certificates name: the
            # CA's one CRL, or each shard (the same IDP as its base). A sharded CA's complete CRL has none.
            scoped = m.ca in self.crl_delta and bool(self.base_url) and (shards == 1) == (m.shard is None)
            if m.delta_base is not None:
                if not scoped:
                    raise PolicyError("crl", "delta", f"CA {m.ca} has no delta CRLs" + (" for its complete CRL" if shards > 1 else ""))
            elif scoped:  # a base points at its delta
                fresh = crl.delta_url(url)
            try:
                tbs = crl.TbsCrl(issuer_name_der=cert.subject.public_bytes(), key_type=key.key_type, this_update=m.this_update,
                                 next_update=m.next_update, crl_number=m.crl_number, aki_key_id=ski,
                                 entry_count=m.entry_count, entries_length=m.entries_length, idp_der=idp,
                                 delta_base=m.delta_base, freshest_crl_url=fresh)
            except ValueError as e:
                raise PolicyError("crl", "declaration", str(e)) from None
        st = _CrlState(m, tbs, key.key_type, cert)
        if m.kind != "issued-serials":
            st.idp, st.fresh = idp, fresh  # the lint sample is built with the same extensions
        self._crls[m.id] = st
        head = tbs.header()
        st.feed(head)
        return head

    def crl_entries(self, m: S.CrlEntries) -> bytes:
        st = self._crls[m.id]
        if st.begin.kind != "crl":
            raise PolicyError("crl entry", "order", "CRL entries sent to an issued-serials stream")
        prev = st.last_serial
        for e in m.entries:  # the Factory sends serials in strictly increasing byte order: no duplicates
            if e[0] <= prev:
                raise PolicyError("crl entry", "order", "serials out of order or duplicated")
            prev = e[0]
        st.last_serial = prev
        entries = [(int.from_bytes(s, "big"), t, r, i) for s, t, r, i in m.entries]
        if st.begin.shard is not None:  # a shard's CRL lists only its own certificates
            n = self.crl_shards.get(st.begin.ca, 1)
            if any(e[0] % n != st.begin.shard for e in entries):
                raise PolicyError("crl entry", "partition", f"an entry outside CRL shard {st.begin.shard}")
        try:
            data = st.tbs.entries(entries)
        except ValueError as e:
            raise PolicyError("crl entry", "encoding", str(e)) from None
        if len(st.sample) < LINT_SAMPLE:
            st.sample.extend(entries[: LINT_SAMPLE - len(st.sample)])
        st.feed(data)
        return data

    def crl_entries_der(self, m: S.CrlEntriesDer) -> None:
        """Entries the Factory sent encoded: checked strictly (shapes, order, count, shard) and hashed into
        the TBS this CIS assembles around them; nothing is echoed back (the Factory holds those bytes)."""
        st = self._crls[m.id]
        if st.begin.kind != "crl":
            raise PolicyError("crl entry", "order", "CRL entries sent to an issued-serials stream")
        try:
            keys = st.tbs.encoded(m.data, st.last_serial)
        except ValueError as e:
            raise PolicyError("crl entry", "encoding", str(e)) from None
        if len(keys) != m.count:
            raise PolicyError("crl entry", "encoding", f"{len(keys)} entries where {m.count} were announced")
        st.last_serial = keys[-1]
        if st.begin.shard is not None:  # a shard's CRL lists only its own certificates
            n, k = self.crl_shards.get(st.begin.ca, 1), st.begin.shard
            if any(int.from_bytes(s, "big") % n != k for s in keys):
                raise PolicyError("crl entry", "partition", f"an entry outside CRL shard {st.begin.shard}")
        if len(st.sample) < LINT_SAMPLE:
            st.sample.extend(crl.decode_encoded(m.data, LINT_SAMPLE - len(st.sample)))
        st.feed(m.data)

    def serial_entries(self, m: S.SerialEntries) -> bytes:
        st = self._crls[m.id]
        if st.begin.kind != "issued-serials":
            raise PolicyError("issued-serials", "order", "serials sent to a CRL stream")
        try:
            data = st.tbs.entries(m.serials)
        except ValueError as e:
            raise PolicyError("issued-serials", "encoding", str(e)) from None
        st.feed(data)
        return data

    def crl_end(self, m: S.CrlEnd) -> tuple[bytes, S.CrlSigned]:
        st = self._crls.pop(m.id)
        try:
            trailer = st.tbs.trailer()
        except ValueError as e:
            raise PolicyError("crl", "declaration", str(e)) from None
        st.feed(trailer)
        if st.begin.kind == "crl":  # the issued-serials list is our own format: no linter knows it
            self._lint_crl_sample(st)
        key = self.token.key(st.begin.ca)
        if st.buffer is not None:  # Ed25519: pure EdDSA signs the whole message
            sig = self.token.sign(key, b"".join(st.buffer), None)
        else:
            sig = self.token.sign_digest(key, st.hash.digest(), st.halg)
        prefix, suffix = crl.certificate_list(st.tbs.length(), key.key_type, sig)
        return trailer, S.CrlSigned(id=m.id, prefix=prefix, suffix=suffix, tbs_sha256=st.sha256.digest())

    def _lint_crl_sample(self, st: "_CrlState") -> None:
        b = st.begin
        sample = st.sample
        ln = sum(crl.entry_length(*e) for e in sample)
        tbs = crl.TbsCrl(issuer_name_der=st.cert.subject.public_bytes(), key_type=st.key_type, this_update=b.this_update,
                         next_update=b.next_update, crl_number=b.crl_number,
                         aki_key_id=st.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest,
                         entry_count=len(sample), entries_length=ln, delta_base=b.delta_base,
                         idp_der=st.idp, freshest_crl_url=st.fresh)
        body = tbs.header() + tbs.entries(sample) + tbs.trailer()
        k = self.throwaway(st.key_type)
        if st.key_type == "ed25519":
            sig = k.sign(body)
        elif st.key_type.startswith("rsa"):
            from cryptography.hazmat.primitives.asymmetric import padding
            sig = k.sign(body, padding.PKCS1v15(), st.halg)
        else:
            sig = k.sign(body, ec.ECDSA(st.halg))
        prefix, suffix = crl.certificate_list(len(body), st.key_type, sig)
        findings = lint.lint_crl(prefix + body + suffix)
        if findings:
            raise PolicyError("crl", "lint", "; ".join(findings[:5]))


_REASON_FLAGS = {
    1: x509.ReasonFlags.key_compromise, 2: x509.ReasonFlags.ca_compromise, 3: x509.ReasonFlags.affiliation_changed,
    4: x509.ReasonFlags.superseded, 5: x509.ReasonFlags.cessation_of_operation, 6: x509.ReasonFlags.certificate_hold,
    8: x509.ReasonFlags.remove_from_crl, 9: x509.ReasonFlags.privilege_withdrawn, 10: x509.ReasonFlags.aa_compromise,
}


def _check_window(cert: x509.Certificate, this_update: int, next_update: int) -> None:
    """A CRL's or OCSP response's validity window must be ordered and within the CA certificate's."""
    if next_update <= this_update:
        raise PolicyError("nextUpdate", "order", "nextUpdate must be after thisUpdate")
    if _utc(next_update) > cert.not_valid_after_utc:
        raise PolicyError("nextUpdate", "issuer-validity", "nextUpdate is beyond the CA certificate's notAfter")


class _CrlState:
    def __init__(self, begin: S.CrlBegin, tbs, key_type: str, cert: x509.Certificate):
        self.begin = begin
        self.tbs = tbs
        self.key_type = key_type
        self.cert = cert
        self.halg = certs.signature_hash(key_type)
        self.hash = hashlib.new(self.halg.name) if self.halg else None
        self.sha256 = hashlib.sha256()
        self.buffer: list[bytes] | None = [] if key_type == "ed25519" else None
        self.sample: list = []
        self.last_serial = b""
        self.idp: bytes | None = None
        self.fresh: str | None = None

    def feed(self, data: bytes) -> None:
        if self.hash is not None:
            self.hash.update(data)
        else:
            self.buffer.append(data)
        self.sha256.update(data)


async def serve(sup: Channel, fac: Channel, cis: Cis, n: trio.Nursery) -> None:
    """Answer the Factory until it closes its link (the skeleton's nursery `n` stops on Shutdown)."""
    async def hsm(fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=cis.limiter)

    async def refuse(mid: int, code: str, reason: str) -> None:
        await fac.send(S.Refused(id=mid, code=code, reason=reason))

    async def handle(m) -> None:
        mid = getattr(m, "id", 0)
        try:
            if isinstance(m, S.Ping):
                await fac.send(S.Ok(id=mid))
            elif isinstance(m, S.Activate):
                await fac.send(await hsm(_activate, cis, m))
                _log(f"activated: {cis.token.token_info()}")
                await sup.send(S.Event(kind="activated", detail=cis.token.token_info()))
            elif not cis.token.active:
                await refuse(mid, "inactive", "the CIS is not activated")
            elif isinstance(m, S.GenerateKey):
                spki = await hsm(cis.token.call, cis.token.generate, m.label, m.key_type)
                await fac.send(S.PublicKey(id=mid, spki=spki))
            elif isinstance(m, S.DeleteKey):
                await hsm(cis.token.call, cis.token.delete, m.label)
                await fac.send(S.Ok(id=mid))
            elif isinstance(m, S.Issue):
                outcomes = await hsm(cis.token.call, cis.issue, m)
                await fac.send(S.Issued(id=mid, outcomes=outcomes))
            elif isinstance(m, S.MakeCaRequest):
                csr, spki = await hsm(cis.token.call, cis.make_ca_request, m)
                await fac.send(S.CaRequestMade(id=mid, csr=csr, spki=spki))
            elif isinstance(m, S.InstallCaCert):
                await fac.send(S.CaInstalled(id=mid, anchor=await hsm(cis.token.call, cis.install_ca_cert, m)))
            elif isinstance(m, S.SignCheckpoint):
                tbs, sig = await hsm(cis.token.call, cis.sign_checkpoint, m)
                await fac.send(S.CheckpointSigned(id=mid, tbs=tbs, signature=sig))
            elif isinstance(m, S.BackupKeys):
                await hsm(cis.token.call, cis.audit_key)  # made on first use: it is backed up with the CA keys
                # Not through token.call: the backup logs out for the SO's turn, a blind retry would not do.
                blob, texts = await hsm(keybackup.backup, cis.token, m.so_pin, list(m.labels), AUDIT_LABEL, m.threshold, m.shares)
                await fac.send(S.KeysBackedUp(id=mid, blob=blob, shares=texts))
            elif isinstance(m, S.GetAuditCert):
                await fac.send(S.AuditCert(id=mid, cert=await hsm(cis.token.call, cis.audit_cert)))
            elif isinstance(m, S.SignOcsp):
                responses = await hsm(cis.token.call, cis.sign_ocsp, m)
                await fac.send(S.OcspSigned(id=mid, responses=responses))
            elif isinstance(m, S.CrlBegin):
                if mid in cis._crls:
                    raise ProtocolViolation("duplicate CRL stream id")
                await fac.send(S.CrlChunk(id=mid, data=await hsm(cis.token.call, cis.crl_begin, m)))
            elif isinstance(m, S.CrlEntries):
                if mid not in cis._crls:
                    return  # the stream was refused earlier; the Factory already got the refusal
                await fac.send(S.CrlChunk(id=mid, data=cis.crl_entries(m)))
            elif isinstance(m, S.CrlEntriesDer):
                if mid not in cis._crls:
                    return
                cis.crl_entries_der(m)
            elif isinstance(m, S.SerialEntries):
                if mid not in cis._crls:
                    return
                await fac.send(S.CrlChunk(id=mid, data=cis.serial_entries(m)))
            elif isinstance(m, S.CrlEnd):
                if mid not in cis._crls:
                    return
                trailer, signed = await hsm(cis.token.call, cis.crl_end, m)
                await fac.send(S.CrlChunk(id=mid, data=trailer))
                await fac.send(signed)
            else:
                raise ProtocolViolation(f"unexpected {type(m).__name__} from the Factory")
        except PolicyError as e:
            cis._crls.pop(mid, None)
            await refuse(mid, "lint" if e.rule == "lint" else "policy", str(e))
        except TokenError as e:
            cis._crls.pop(mid, None)
            await refuse(mid, "hsm", str(e))
        except ProtocolViolation:
            raise
        except Exception:  # noqa: BLE001 - refused and logged: the Factory gets a typed refusal, not silence
            cis._crls.pop(mid, None)
            _log("internal error:\n" + traceback.format_exc(limit=8))
            await refuse(mid, "internal", "internal error in the CIS (see its log)")

    async def watch_token():
        """Tell the supervisor when the token becomes unavailable and when it is back."""
        ok = True
        while True:
            await trio.sleep(TOKEN_CHECK_SECONDS)
            if not cis.token.active:
                continue
            try:
                await hsm(cis.token.call, cis.token.probe)
                now_ok = True
            except Exception:  # noqa: BLE001 - any failure of the token counts as unavailable
                now_ok = False
            if now_ok != ok:
                ok = now_ok
                await sup.send(S.Event(kind="token-recovered" if ok else "token-unavailable", detail=cis.token.label))

    n.start_soon(watch_token)
    while True:
        try:
            m = await fac.recv()
        except LinkClosed:
            _log("the Factory closed its link: stopping")
            n.cancel_scope.cancel()
            return
        await handle(m)


def _activate(cis: Cis, m: S.Activate) -> S.Activated:
    if cis.token.active:  # a second login would raise UserAlreadyLoggedIn anyway
        raise TokenError("already activated")
    cis.token.login(m.pin)
    if m.wrapped_db_key is None:
        key, wrapped = cis.token.new_db_key()
    else:
        key, wrapped = cis.token.unwrap_db_key(m.wrapped_db_key), m.wrapped_db_key
    return S.Activated(id=m.id, db_key=key, wrapped_db_key=wrapped, token=cis.token.token_info())


async def main(fds: dict[str, int], drop) -> None:
    await roles.serve("cis", fds, drop, lambda sup, cfg: _setup(fds, sup, cfg))


async def _setup(fds: dict[str, int], sup: Channel, cfg: S.CisConfig) -> roles.Body:
    if cfg.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
    cis = Cis(cfg)
    cis.token.load()  # map the PKCS#11 module before the privilege drop
    lint.warm()  # import pkilint's validators before the drop (Landlock then allows no new paths)
    fac = Channel.from_fd(fds[FACTORY_CIS.name], FACTORY_CIS.name, FACTORY_CIS.down)

    async def serve_factory(n: trio.Nursery) -> None:
        await serve(sup, fac, cis, n)

    async def control(m) -> None:
        if not isinstance(m, S.RecoverKeys):
            raise ProtocolViolation(f"unexpected {type(m).__name__} from the supervisor")
        try:
            labels = await trio.to_thread.run_sync(_recover_keys, cis, m, limiter=cis.limiter)
        except TokenError as e:
            _log(f"key recovery refused: {e}")
            await sup.send(S.Event(kind="keys-recover-failed", detail=str(e)[:4000]))
            return
        _log(f"keys recovered: {', '.join(labels)}")
        await sup.send(S.Event(kind="keys-recovered", detail=", ".join(labels)[:4000]))

    return roles.Body(serve=serve_factory, connect=fac.handshake, control=control)  # Ready only once the Factory link is up


def _recover_keys(cis: Cis, m: S.RecoverKeys) -> list[str]:
    """Recovery runs on a fresh, never activated appliance: log in, unwrap everything, log out."""
    if cis.token.active:
        raise TokenError("the CIS is activated: keys are recovered onto a fresh token before the first activation")
    cis.token.login(m.pin)
    try:
        return keybackup.recover(cis.token, m.blob, list(m.shares))
    except pkcs11_error() as e:
        raise TokenError(f"key recovery failed in the token: {type(e).__name__}") from None
    finally:
        cis.token.logout()


def pkcs11_error() -> type[Exception]:
    return keybackup.pkcs11.exceptions.PKCS11Error

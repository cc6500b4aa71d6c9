"""The protocol gateway role (ACME; CMP, EST and SCEP plug in here): untrusted protocol input in, structured enrolments to the Factory out.

The contract for a protocol package (`appliance/gateway/<protocol>/`):

- **Routes.** `server.GatewayServer` serves HTTPS on the listener the supervisor opened (TLS with the
  gateway's own certificate, its key in the gateway's own token) with the endpoint's HTTP hardening
  (`appliance/httpserve.py`: connections per source, head and request deadlines, per-route body caps
  decided from the head, a cap on bodies in flight). A protocol registers a `server.Route` under a
  path prefix in `main.ROUTES` ("/acme/", "/.well-known/cmp", "/.well-known/est/", "/scep"): its
  `body_cap` (bytes; 0: no body), and `handler(req: server.Request) -> server.Reply`, an async
  function that never raises for bad input (answer the protocol's error instead; an exception becomes
  a 500 with a fixed body, counted, logged as its type only). `req.source` is the client's address,
  `req.path` the target without the query. A route is served only when its protocol is in
  `[gateway] protocols`; the placeholders answer 501 until then.
- **Enrolment.** A handler that has authenticated a request (its own way: ACME account JWS, CMP
  MAC/signature, EST basic/TLS client auth, SCEP challenge) asks the Factory through `ctx.factory`
  (`factory_link.FactoryLink.request`) with `S.GwEnroll(protocol, auth=S.GwAuth(kind, ident,
  eab_kid), ca, profile, names, csr | spki+subject, not_after, approval_wait, replaces)` and gets
  `S.GwIssued(cert, chain, serial)`, `S.GwPending(request_id)` (poll with `S.GwPoll`) or
  `S.GwRefused(code, reason)` (codes: unauthorized, policy, bad-csr, rejected-identifier,
  bad-request, not-found, already-revoked, inactive, busy, internal: map them to the protocol's
  failure codes). The Factory checks again: (profile, CA) among `[gateway]`'s pairs, names within the
  gateway's patterns and the EAB key's, the CSR's names equal to `names`, the credential still
  valid; it issues through the normal pipeline and the audit names `gateway/<protocol>:<ident>`.
- **Revocation**: `S.GwRevoke(protocol, auth, cert, reason, proof)`; **status** (ARI and the like):
  `S.GwCertStatus`; **EAB**: `S.GwEabCheck`; **small state** kept by the Factory: `S.GwStateGet` /
  `S.GwStatePut` (namespaced, 64 KiB values). Protocol state that changes per request (ACME
  accounts, orders, nonces; CMP transactions) lives in the gateway's own store (`store_dir`).
- **Credentials and keys.** Keys the gateway needs (TLS, an RA or CMP protection key) go in its own
  token (`ctx.token`), never a CA key; configuration arrives in `S.GatewayConfig`.
- **Outbound.** Validation traffic (ACME challenges) goes only through `netpolicy.Validator`, which
  refuses addresses outside `validation_networks` (loopback and private ranges are denied unless
  listed). The role may open sockets (its seccomp allows it), nothing else does the checking.
"""

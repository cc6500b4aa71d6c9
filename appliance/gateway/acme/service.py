"""ACME's routes on the gateway (RFC 8555): the directory for now."""

from __future__ import annotations

import json

from ..server import Reply, Request, Route


def routes(ctx, body_cap: int) -> list[Route]:
    base = ctx.cfg.base_url + "/acme"
    acme = ctx.cfg.acme

    async def handler(req: Request) -> Reply:
        if req.path == "/acme/directory":
            doc = {"newNonce": f"{base}/new-nonce", "newAccount": f"{base}/new-account", "newOrder": f"{base}/new-order",
                   "revokeCert": f"{base}/revoke-cert", "keyChange": f"{base}/key-change",
                   "meta": {"profiles": {p.name: p.description or p.profile for p in acme.profiles},
                            "externalAccountRequired": acme.eab_required}}
            return Reply(200, [(b"content-type", b"application/json")], json.dumps(doc).encode())
        return Reply(404, [(b"content-type", b"application/problem+json")],
                     b'{"type":"urn:ietf:params:acme:error:malformed","detail":"no such resource","status":404}')
    return [Route("/acme/", handler, body_cap=body_cap)]

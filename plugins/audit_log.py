"""Built-in audit log: every decision appended to a hash chain in the gateway's audit store.

Each entry carries the SHA-256 of the one before, so deleting, reordering or editing an entry
breaks the chain from there on; ``/medicon/v1/audit/verify`` walks it. Entries hold
pseudonyms, never patient identifiers, and never secrets. The request waits until its event is
durable: nothing is answered unaudited.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import Invalid
from gateway.hookspecs import hookimpl
from gateway.http.appkeys import SERVICE
from gateway.http.context import caller


@hookimpl
async def medicon_audit_event(event, service):
    await service.storage.audit.append(event)


async def audit_page(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.authorize(caller(request), "audit:read", {"kind": "audit"})
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise Invalid("after and limit must be integers") from None
    if not 1 <= limit <= 1000:
        raise Invalid("limit must be between 1 and 1000")
    if not 0 <= after < 2**63:
        raise Invalid("after must be a sequence number (0 or more)")
    entries = await service.storage.audit.page(after, limit)
    return web.json_response({"entries": entries, "next": str(entries[-1]["seq"]) if len(entries) == limit else None})


async def audit_verify(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.authorize(caller(request), "audit:read", {"kind": "audit"})
    return web.json_response(await service.storage.audit.verify())


@hookimpl
def medicon_register_routes():
    return [("GET", "/medicon/v1/audit", audit_page), ("GET", "/medicon/v1/audit/verify", audit_verify)]

"""Built-in audit log: every decision appended to a hash chain in the gateway's audit store.

Each entry carries the SHA-256 of the one before, so deleting, reordering or editing an entry
breaks the chain from there on. ``/medicon/v1/audit/verify`` checks it from the last signed
checkpoint (O(new entries)); ``?full=1`` re-hashes all of it. Either walks in pages off the
event loop (``gateway.core.audit``), so a verification never holds up other requests;
``/medicon/v1/audit/verify/progress`` shows the walks under way. Entries hold pseudonyms, never
patient identifiers, and never secrets. The request waits until its event is durable: nothing
is answered unaudited.
"""

from __future__ import annotations

from aiohttp import web

from gateway.core.audit import CHECKPOINT, FULL, AuditVerifier
from gateway.errors import Invalid
from gateway.hookspecs import hookimpl
from gateway.http.appkeys import SERVICE
from gateway.http.context import caller

NAME = "audit_log"
# A checkpoint walk starts in the background after this many events appended by this process,
# so the default verification stays short however fast the log grows.
CHECKPOINT_EVERY = 10_000


class AuditLog:
    def __init__(self, service) -> None:
        self.verifier = AuditVerifier(service.storage.audit, service.sealer)
        self.appended = 0


@hookimpl
def medicon_startup(service):
    service.resources[NAME] = AuditLog(service)


@hookimpl
async def medicon_shutdown(service):
    audit = service.resources.pop(NAME, None)
    if audit is not None:
        await audit.verifier.stop()


@hookimpl
async def medicon_audit_event(event, service):
    await service.storage.audit.append(event)
    audit = service.resources.get(NAME)
    if audit is not None:
        audit.appended += 1
        if audit.appended % CHECKPOINT_EVERY == 0:
            audit.verifier.start(CHECKPOINT)


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
    full = request.query.get("full", "0")
    if full not in ("0", "1"):
        raise Invalid("full must be 0 or 1")
    verifier = service.resources[NAME].verifier
    return web.json_response(await verifier.verify(FULL if full == "1" else CHECKPOINT))


async def audit_verify_progress(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.authorize(caller(request), "audit:read", {"kind": "audit"})
    return web.json_response({"running": service.resources[NAME].verifier.progress()})


@hookimpl
def medicon_register_routes():
    return [("GET", "/medicon/v1/audit", audit_page), ("GET", "/medicon/v1/audit/verify", audit_verify),
            ("GET", "/medicon/v1/audit/verify/progress", audit_verify_progress)]

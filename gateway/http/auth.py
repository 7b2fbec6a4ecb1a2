"""Authenticate every request before any handler runs: no principal, no service.

Authentication is a plugin hook (``medicon_authenticate``, given the aiohttp request); this
middleware asks it, answers 401 without a principal (everywhere but the health probes), and
audits every refusal with a reason, never the credential. What the principal may do is the
record service's business (``RecordService.authorize``).

The audit events of the reads the service allows are written while the request goes on (a
read's call to Kubo overlaps the audit log's fsync) and waited for before the first byte of any
answer: nothing is disclosed before its event is stored, and an event that cannot be stored
is the answer instead (503, 507).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from aiohttp import web

from ..core.access import deferring_audits, settle_audits
from ..errors import MediconError, Unauthenticated
from .appkeys import SERVICE
from .context import CALLER, REQUEST_ID, caller_for, surface_of

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# Routes, by name, served without a credential: the timeline UI's static files (``ui``), the
# sign-in page and its code. They hold no data; the UI reads everything through /medicon/v1 with
# the bearer token the user types in.
PUBLIC_ROUTES = frozenset({"medicon-ui", "medicon-ui-asset"})


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """No principal, no service: 401 everywhere but the health probes. A refusal is audited
    before it is answered, whichever plugin refused and why."""
    if REQUEST_ID not in request:  # the observing middleware names it first, for its access log
        request[REQUEST_ID] = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    if request.path in PUBLIC_PATHS or request.match_info.route.name in PUBLIC_ROUTES:
        return await handler(request)
    service = request.app[SERVICE]
    try:
        principal = await service.plugins.call("medicon_authenticate", request=request, service=service)
    except MediconError as err:  # a plugin refused the credentials (or could not judge them)
        reason = err.reason or ("refused" if isinstance(err, Unauthenticated) else f"failed ({type(err).__name__})")
        await _audit_refusal(request, reason)
        raise
    if principal is None:
        reason = "unrecognised" if "Authorization" in request.headers else "missing"
        await _audit_refusal(request, reason)
        raise Unauthenticated("authentication required: send Authorization: Bearer <token>")
    request[CALLER] = caller_for(request, principal)
    deferring_audits()
    try:
        response = await handler(request)
    except Exception:
        with contextlib.suppress(Exception):  # an error answer discloses nothing allowed
            await settle_audits()
        raise
    await settle_audits()  # an answer not yet prepared (a plain Response)
    return response


async def settle_before_answering(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``, the backstop: every answer the gateway streams settles its
    audit events itself before preparing (``proxy``, ``attachments``), where a failure can
    still become the answer. One that did not would be stopped here — the connection broken
    rather than a byte disclosed unaudited."""
    await settle_audits()


async def _audit_refusal(request: web.Request, reason: str) -> None:
    await request.app[SERVICE].access.audit(request[REQUEST_ID], surface_of(request), None, "authenticate",
                                            _credentials(request), False, reason=reason)


def _credentials(request: web.Request) -> dict[str, Any]:
    """The audited resource of an authentication: the credentials' scheme, if a known one (the
    rest of the header is the secret, and an unknown first word may be one too)."""
    header = request.headers.get("Authorization")
    if header is None:
        return {"kind": "credentials"}
    scheme = header.strip().partition(" ")[0].lower()
    return {"kind": "credentials", "scheme": scheme if scheme in ("bearer", "basic") else "other"}

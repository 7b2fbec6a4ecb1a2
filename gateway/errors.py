"""Errors are values with a status and a message, raised anywhere and rendered in one place.

On Kubo's surfaces (``/api/v0``, ``/ipfs``, ``/ipns``) an error is rendered in Kubo's own shape
``{"Message": ..., "Code": ..., "Type": "error"}`` so every IPFS client reports it as it would
a Kubo error. ``Code`` follows go-ipfs-cmds: 0 normal, 1 client, 2 implementation,
3 rate-limited, 4 forbidden.
"""

from __future__ import annotations

import json
import logging
from typing import Mapping

from aiohttp import web

log = logging.getLogger(__name__)

CODE_NORMAL = 0
CODE_CLIENT = 1
CODE_IMPLEMENTATION = 2
CODE_RATE_LIMITED = 3
CODE_FORBIDDEN = 4

_CODE_FOR_STATUS = {400: CODE_CLIENT, 403: CODE_FORBIDDEN, 429: CODE_RATE_LIMITED, 503: CODE_RATE_LIMITED}


class GatewayError(Exception):
    """An answer the gateway gives instead of (or before) Kubo's.

    ``reason`` is a short cause for the audit log (an authentication plugin's "revoked",
    "expired", "bad signature"): never rendered to the client, never a secret."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: int | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, object] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = _CODE_FOR_STATUS.get(status, CODE_NORMAL) if code is None else code
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        self.reason = reason


def kubo_error(status: int, message: str, *, code: int | None = None,
               headers: Mapping[str, str] | None = None) -> web.Response:
    err = GatewayError(status, message, code=code, headers=headers)
    body = json.dumps({"Message": err.message, "Code": err.code, "Type": "error"})
    return web.Response(status=status, text=body + "\n", content_type="application/json",
                        headers=err.headers)


API_PREFIX = "/medicon/"


def api_error(err: GatewayError) -> web.Response:
    """The gateway's own API: ``{"error": {"status", "message", ...details}}`` (see the OpenAPI
    document's ``Error`` schema)."""
    body = {"error": {"status": err.status, "message": err.message, **err.details}}
    return web.json_response(body, status=err.status, headers=err.headers)


def render(request: web.Request, err: GatewayError) -> web.Response:
    if request.path.startswith(API_PREFIX):
        return api_error(err)
    return kubo_error(err.status, err.message, code=err.code, headers=err.headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Render ``GatewayError`` and aiohttp's own HTTP errors in one place; hide tracebacks."""
    try:
        return await handler(request)
    except GatewayError as err:
        return render(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return render(request, GatewayError(exc.status, exc.reason, headers=headers))
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return render(request, GatewayError(500, "internal gateway error", code=CODE_IMPLEMENTATION))

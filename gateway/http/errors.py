"""Domain errors rendered in one place, in the shape of the surface they were asked on.

On Kubo's surfaces (``/api/v0``, ``/ipfs``, ``/ipns``) an error is Kubo's own shape
``{"Message": ..., "Code": ..., "Type": "error"}``, so every IPFS client reports it as it would
a Kubo error; ``Code`` follows go-ipfs-cmds (0 normal, 1 client, 2 implementation,
3 rate-limited, 4 forbidden). On the gateway's own API it is
``{"error": {"status", "message", ...details}}`` (``Error`` in the OpenAPI document); on the
FHIR facade (``/fhir/r4``) an OperationOutcome.
"""

from __future__ import annotations

import json
import logging
from typing import Mapping

from aiohttp import web

from .. import errors

log = logging.getLogger(__name__)

CODE_NORMAL = 0
CODE_CLIENT = 1
CODE_IMPLEMENTATION = 2
CODE_RATE_LIMITED = 3
CODE_FORBIDDEN = 4

# Most specific first: a subclass is looked up before its base.
STATUS: dict[type[errors.MediconError], int] = {
    errors.Invalid: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Erased: 410,
    errors.TooLarge: 413,
    errors.IdempotencyKeyReused: 422,
    errors.Internal: 500,
    errors.NotReplicated: 503,
    errors.Unavailable: 502,
    errors.Busy: 503,
    errors.TimedOut: 504,
    errors.StorageFull: 507,
}
_CODE_FOR_STATUS = {400: CODE_CLIENT, 403: CODE_FORBIDDEN, 429: CODE_RATE_LIMITED, 503: CODE_RATE_LIMITED,
                    500: CODE_IMPLEMENTATION, 507: CODE_IMPLEMENTATION}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="medicon-gateway", Basic realm="medicon-gateway"'}
API_PREFIX = "/medicon/"
PINNING_PREFIX = "/pinning/"  # the IPFS Pinning Service API: the spec's Failure shape
# Failure.error.reason by status (the spec's examples; others are the status's own name).
PINNING_REASONS = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
                   405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT", 409: "INSUFFICIENT_FUNDS",
                   413: "PAYLOAD_TOO_LARGE", 500: "INTERNAL_SERVER_ERROR", 502: "BAD_GATEWAY",
                   503: "SERVICE_UNAVAILABLE", 504: "GATEWAY_TIMEOUT", 507: "INSUFFICIENT_STORAGE"}
API_PATHS = frozenset({"/metrics"})  # the gateway's own, outside the prefix


class HTTPError(errors.MediconError):
    """An answer only HTTP has a word for (405, 408, 416, 431…), with its headers."""

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None,
                 code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.code = code


def status_of(err: errors.MediconError) -> int:
    if isinstance(err, HTTPError):
        return err.status
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def headers_of(err: errors.MediconError) -> dict[str, str]:
    headers = dict(err.headers) if isinstance(err, HTTPError) else {}
    if isinstance(err, errors.Unauthenticated):
        headers.setdefault("WWW-Authenticate", CHALLENGE["WWW-Authenticate"])
    if err.retry_after is not None:
        headers.setdefault("Retry-After", f"{err.retry_after:g}")
    return headers


def kubo_error(status: int, message: str, *, code: int | None = None,
               headers: Mapping[str, str] | None = None) -> web.Response:
    code = _CODE_FOR_STATUS.get(status, CODE_NORMAL) if code is None else code
    body = json.dumps({"Message": message, "Code": code, "Type": "error"})
    return web.Response(status=status, text=body + "\n", content_type="application/json",
                        headers=dict(headers or {}))


def api_error(err: errors.MediconError) -> web.Response:
    status = status_of(err)
    body = {"error": {"status": status, "message": err.message, **err.details}}
    return web.json_response(body, status=status, headers=headers_of(err))


def pinning_error(err: errors.MediconError) -> web.Response:
    """The Pinning Service API's ``Failure``: ``{"error": {"reason", "details"}}``."""
    status = status_of(err)
    body = {"error": {"reason": PINNING_REASONS.get(status, "ERROR"), "details": err.message}}
    return web.json_response(body, status=status, headers=headers_of(err))

# The FHIR facade answers errors as OperationOutcomes, with the issue type FHIR has for each.
FHIR_PREFIX = "/fhir/"
_FHIR_ISSUE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               408: "timeout", 409: "conflict", 410: "deleted", 413: "too-costly", 422: "business-rule",
               502: "transient", 503: "transient", 504: "timeout"}


def fhir_error(err: errors.MediconError) -> web.Response:
    """An OperationOutcome: one issue per refused entry of a transaction, per problem of an
    invalid record, or the message; ``expression`` says where, when known."""
    status = status_of(err)
    code = _FHIR_ISSUE.get(status, "exception")
    issues = [{"severity": "error", "code": code, "diagnostics": i["message"], "expression": [i["expression"]]}
              for i in err.details.get("issues", [])]
    issues += [{"severity": "error", "code": code, "diagnostics": str(p)} for p in err.details.get("problems", [])]
    if not issues:
        issues = [{"severity": "error", "code": code, "diagnostics": err.message}]
    body = json.dumps({"resourceType": "OperationOutcome", "issue": issues}, ensure_ascii=False)
    return web.Response(status=status, text=body, content_type="application/fhir+json", charset="utf-8",
                        headers=headers_of(err))


def render(request: web.Request, err: errors.MediconError) -> web.Response:
    if request.path.startswith(PINNING_PREFIX):
        return pinning_error(err)
    if request.path.startswith(API_PREFIX) or request.path in API_PATHS:
        return api_error(err)
    if request.path.startswith(FHIR_PREFIX):
        return fhir_error(err)
    code = err.code if isinstance(err, HTTPError) else None
    return kubo_error(status_of(err), err.message, code=code, headers=headers_of(err))


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Render domain errors and aiohttp's own HTTP errors in one place; hide tracebacks."""
    try:
        return await handler(request)
    except errors.MediconError as err:
        if status_of(err) >= 500:
            log.warning("%s %s answered %d: %s", request.method, request.path.split("/", 3)[1:2],
                        status_of(err), err.message)
        return render(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return render(request, HTTPError(exc.status, exc.reason, headers=headers))
    except Exception:
        resource = request.match_info.route.resource  # the route's template: a path names patients
        log.exception("internal error on %s %s", request.method,
                      resource.canonical if resource is not None else "(no route)")
        return render(request, errors.Internal("internal gateway error"))

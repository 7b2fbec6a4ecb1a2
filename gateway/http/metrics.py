"""What the HTTP app reports about each request: Prometheus metrics and one access-log line.

The outermost middleware times every request, counts it by surface, route, method and status,
keeps the in-flight gauge, and logs one line (``medicon_gateway.access``) with the request id,
the principal, the route, the status and the duration. A route is a command of the command table
on ``/api/v0`` and a route template elsewhere (``/medicon/v1/episodes/{episode}``): never the
path, which names patients, episodes and CIDs, and never the query. ``GET /metrics`` serves the
app's own registry to a principal allowed ``metrics:read`` (``admin``, ``monitor``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from .. import logs
from ..metrics import Metrics
from . import commands
from .appkeys import SERVICE
from .context import CALLER, REQUEST_ID, caller

METRICS = web.AppKey("metrics", Metrics)
METRICS_PATH = "/metrics"
SURFACES = frozenset({"api", "ipfs", "ipns", "medicon", "ui", "healthz", "readyz", "metrics"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes come every few seconds and say nothing new: their lines are DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz"})
CLIENT_CLOSED = 499  # nginx's word for a client that went away before its answer

access_log = logging.getLogger("medicon_gateway.access")


def surface_label(request: web.Request) -> str:
    first = request.path.split("/", 2)[1]
    return first if first in SURFACES else "other"


def route_label(request: web.Request) -> str:
    """The command a ``/api/v0`` path names (as the table resolves it, ``unknown`` if the table
    does not know it), or the template of the route that matched (``unmatched`` if none)."""
    if request.path.startswith("/api/v0/"):
        command = commands.resolve(request.path[len("/api/v0/"):]).command
        return command if command in commands.COMMANDS else "unknown"
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler):
    metrics = request.app[METRICS]
    started = time.perf_counter()
    request[REQUEST_ID] = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    bound = logs.REQUEST_ID.set(request[REQUEST_ID])
    metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # a redirect (the error middleware renders the rest)
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        metrics.in_flight.dec()
        seconds = time.perf_counter() - started
        surface, route = surface_label(request), route_label(request)
        method = request.method if request.method in METHODS else "other"
        metrics.requests.labels(surface, route, method, str(status)).inc()
        metrics.request_duration.labels(surface, route).observe(seconds)
        _log_access(request, method, surface, route, status, seconds)
        logs.REQUEST_ID.reset(bound)


def _log_access(request: web.Request, method: str, surface: str, route: str, status: int,
                seconds: float) -> None:
    level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    who = request.get(CALLER)
    principal = who.principal.id if who is not None else None
    duration_ms = round(seconds * 1000, 1)
    access_log.log(level, "%s %s %d %.1fms principal=%s", method, route, status, duration_ms, principal or "-",
                   extra={"principal": principal, "method": method, "surface": surface, "route": route,
                          "status": status, "duration_ms": duration_ms})


async def metrics_page(request: web.Request) -> web.Response:
    """The app's metrics in the Prometheus text format (or OpenMetrics, if the scraper asks)."""
    await request.app[SERVICE].authorize(caller(request), "metrics:read", {"kind": "metrics"})
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(request.app[METRICS].exposed), headers={"Content-Type": content_type})


def add_metrics(app: web.Application, metrics: Metrics) -> None:
    app[METRICS] = metrics
    app.router.add_get(METRICS_PATH, metrics_page)

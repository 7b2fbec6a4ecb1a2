"""The application factory: routes, middlewares, and the record service the app owns."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from ..config import Config, ConfigError
from ..core.plugins import PluginHost, PluginLoadError, make_manager
from ..core.service import RecordService
from ..errors import Busy, MediconError
from ..metrics import Metrics
from . import fhir, pinning, rest, ui
from .appkeys import CONFIG, SERVICE
from .auth import PUBLIC_PATHS, auth_middleware, settle_before_answering
from .errors import error_middleware
from .ipfs_gateway import ipfs_path, ipns_path
from .metrics import add_metrics, observe_middleware
from .rpc import rpc


class InFlight:
    """Requests being served: bounded (503 beyond the limit) and drained on SIGTERM."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()


INFLIGHT = web.AppKey("inflight", InFlight)


@web.middleware
async def inflight_middleware(request: web.Request, handler):
    inflight = request.app[INFLIGHT]
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    if inflight.count >= inflight.limit:
        raise Busy("the gateway is at its limit of concurrent requests; retry shortly", retry_after=1)
    inflight.count += 1
    inflight.idle.clear()
    try:
        return await handler(request)
    finally:
        inflight.count -= 1
        if inflight.count == 0:
            inflight.idle.set()


async def healthz(request: web.Request) -> web.Response:
    """The process is up. Says nothing about Kubo, so orchestrators do not restart the
    gateway when only Kubo is down."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Kubo answers its version: the gateway can serve requests."""
    cfg = request.app[CONFIG].kubo
    kubo = request.app[SERVICE].kubo
    timeout = aiohttp.ClientTimeout(total=min(5.0, cfg.connect_timeout + cfg.read_timeout))
    try:
        async with kubo.session.post(cfg.api_url.rstrip("/") + "/api/v0/version", timeout=timeout,
                                     headers=kubo.rpc_headers) as resp:
            if resp.status == 200:
                version = (await resp.json()).get("Version")
                return web.json_response({"status": "ready", "kubo": version})
            problem = f"Kubo answered {resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        problem = f"Kubo is not reachable ({type(exc).__name__})"
    return web.json_response({"status": "not ready", "reason": problem}, status=503)


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[observe_middleware, error_middleware, inflight_middleware,
                                       auth_middleware])
    app[CONFIG] = config
    app.on_response_prepare.append(settle_before_answering)
    metrics = Metrics()  # the app's own registry: apps in one process never share numbers
    add_metrics(app, metrics)
    app[INFLIGHT] = InFlight(config.server.max_concurrent_requests)
    try:
        pm = make_manager(config.plugins.modules, trace=config.plugins.trace_hooks)
    except PluginLoadError as exc:
        raise ConfigError(str(exc)) from None

    async def record_service(app: web.Application) -> AsyncIterator[None]:
        async with RecordService.open(config, pm, metrics) as service:
            app[SERVICE] = service
            yield

    app.cleanup_ctx.append(record_service)
    app.cleanup_ctx.append(pinning.pinning_service)  # the Pinning Service API of this gateway's node
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    ui.add_ui_routes(app)
    app.router.add_route("*", "/api/v0/{command:.*}", rpc)
    app.router.add_route("*", "/ipfs/{path:.*}", ipfs_path)
    app.router.add_route("*", "/ipns/{path:.*}", ipns_path)
    try:
        found = PluginHost(pm).call_sync("medicon_register_routes", config=config)
    except MediconError as err:
        raise ConfigError(err.message) from None
    for routes in found:
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
    app.router.add_routes(rest.routes)
    app.router.add_routes(pinning.routes)
    app.router.add_routes(fhir.routes)
    return app

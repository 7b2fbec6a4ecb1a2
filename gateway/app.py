"""The application factory: routes, middlewares and the resources the app owns."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from . import proxy
from .appkeys import CONFIG, KUBO_SESSION
from .config import Config
from .errors import error_middleware


async def kubo_session(app: web.Application) -> AsyncIterator[None]:
    """One long-lived client session to Kubo, with keep-alive and bounded timeouts."""
    cfg = app[CONFIG].kubo
    connector = aiohttp.TCPConnector(limit=cfg.max_connections, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                    sock_read=cfg.read_timeout)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,            # pass Kubo's bytes through exactly as sent
        cookie_jar=aiohttp.DummyCookieJar(),  # never share cookies between clients
        read_bufsize=proxy.CHUNK,
    )
    app[KUBO_SESSION] = session
    yield
    await session.close()


async def healthz(request: web.Request) -> web.Response:
    """The process is up. Says nothing about Kubo, so orchestrators do not restart the
    gateway when only Kubo is down."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Kubo answers its version: the gateway can serve requests."""
    cfg = request.app[CONFIG].kubo
    session = request.app[KUBO_SESSION]
    timeout = aiohttp.ClientTimeout(total=min(5.0, cfg.connect_timeout + cfg.read_timeout))
    try:
        async with session.post(cfg.api_url.rstrip("/") + "/api/v0/version",
                                timeout=timeout) as resp:
            if resp.status == 200:
                version = (await resp.json()).get("Version")
                return web.json_response({"status": "ready", "kubo": version})
            problem = f"Kubo answered {resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        problem = f"Kubo is not reachable ({type(exc).__name__})"
    return web.json_response({"status": "not ready", "reason": problem}, status=503)


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = config
    app.cleanup_ctx.append(kubo_session)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    app.router.add_route("*", "/api/v0/{command:.*}", proxy.rpc)
    app.router.add_route("*", "/ipfs/{path:.*}", proxy.http_gateway)
    app.router.add_route("*", "/ipns/{path:.*}", proxy.http_gateway)
    return app

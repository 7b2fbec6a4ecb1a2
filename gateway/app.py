"""The application factory: routes, middlewares and the resources the app owns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from . import api, auth, chain, plugins, proxy, records, ui
from .appkeys import CONFIG, INTERCEPTORS, KEYRING, KUBO, KUBO_SESSION, PLUGINS, SCHEMAS, STORE
from .commands import COMMANDS, Action
from .config import Config, ConfigError
from .errors import GatewayError, error_middleware
from .ipfs import Kubo
from .schemas import DEFAULT_SCHEMA_DIR, SchemaError, SchemaRegistry
from .store import SQLiteHeadStore


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
    if request.path in auth.PUBLIC_PATHS:
        return await handler(request)
    if inflight.count >= inflight.limit:
        raise GatewayError(503, "the gateway is at its limit of concurrent requests; retry shortly",
                           code=3, headers={"Retry-After": "1"})
    inflight.count += 1
    inflight.idle.clear()
    try:
        return await handler(request)
    finally:
        inflight.count -= 1
        if inflight.count == 0:
            inflight.idle.set()


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
    app[KUBO] = Kubo(session, cfg.api_url)
    yield
    await session.close()


async def head_store(app: web.Application) -> AsyncIterator[None]:
    store = await SQLiteHeadStore.open(Path(app[CONFIG].records.data_dir) / "heads.sqlite3")
    app[STORE] = store
    yield
    await store.close()


async def keyring(app: web.Application) -> AsyncIterator[None]:
    """The key provider: without it nothing can be sealed, signed or pseudonymised, so no start."""
    try:
        found = await plugins.call(app[PLUGINS], "medicon_key_provider", config=app[CONFIG])
    except GatewayError as err:
        raise ConfigError(f"key provider: {err.message}") from None
    if not found:
        raise ConfigError("no key provider plugin is loaded")
    app[KEYRING] = found[0][1]
    yield


async def record_kinds(app: web.Application) -> AsyncIterator[None]:
    """Schemas (built-in, configured, and from plugins) and chain policies, loaded once."""
    cfg = app[CONFIG]
    pm = app[PLUGINS]
    dirs = [DEFAULT_SCHEMA_DIR, *map(Path, cfg.records.schema_dirs)]
    for _, found in await plugins.call(pm, "medicon_schema_dirs", config=cfg):
        dirs += [Path(d) for d in found]
    try:
        app[SCHEMAS] = SchemaRegistry.load(*dirs)
    except SchemaError as exc:
        raise ConfigError(f"schemas: {exc}") from None
    policies: dict = {}
    for _, provided in await plugins.call(pm, "medicon_chain_policies"):
        policies.update(provided)
    app[chain.POLICIES] = policies
    wanted = {"records.chain_policy": cfg.records.chain_policy,
              **{f"records.chain_policy_by_schema[{k!r}]": v for k, v in cfg.records.chain_policy_by_schema.items()}}
    for key, name in wanted.items():
        if name not in policies:
            raise ConfigError(f"config key {key!r}: unknown chain policy {name!r} "
                              f"(loaded: {', '.join(sorted(policies)) or 'none'})")
    yield


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
    app = web.Application(middlewares=[error_middleware, inflight_middleware, auth.auth_middleware])
    app[INFLIGHT] = InFlight(config.server.max_concurrent_requests)
    app[CONFIG] = config
    app[PLUGINS] = plugins.make_manager(config.plugins.modules)
    app[chain.LOCKS] = chain.EpisodeLocks()
    app[INTERCEPTORS] = records.INTERCEPTED
    missing = {c for c, r in COMMANDS.items() if r.action is Action.INTERCEPT} - set(records.INTERCEPTED)
    assert not missing, f"intercepted commands without a handler: {missing}"
    app.cleanup_ctx.extend([keyring, kubo_session, head_store, record_kinds])
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    ui.add_ui_routes(app)
    app.router.add_route("*", "/api/v0/{command:.*}", proxy.rpc)
    app.router.add_route("*", "/ipfs/{path:.*}", records.ipfs_path)
    app.router.add_route("*", "/ipns/{path:.*}", proxy.http_gateway)
    for found in app[PLUGINS].hook.medicon_register_routes(config=config):
        for method, path, handler in found:
            app.router.add_route(method, path, handler)
    app.router.add_routes(api.routes)
    return app

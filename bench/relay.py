"""A bare aiohttp relay in front of Kubo: the floor a Python proxy starts from.

It does nothing the gateway does — no token, no scope, no audit event, no command table, no
metrics — and only moves requests and answers between the client and Kubo, streaming both
ways the way the gateway does (``iter_any``, one pooled client session). The ``floor``
scenario of ``make bench`` reads through it side by side with Kubo and the gateway, so a run
shows what part of the gateway's cost any aiohttp relay pays and what part is the gateway's
own work.

``python -m bench.relay --api URL --gateway URL --port N`` prints ``RELAY_URL=<url>`` once it
listens. A benchmark tool only: it forwards whatever it is sent.
"""

from __future__ import annotations

import argparse
import sys

import aiohttp
from aiohttp import web

UPSTREAMS = web.AppKey("upstreams", dict)
SESSION = web.AppKey("session", aiohttp.ClientSession)
# Headers that belong to one hop (RFC 9110 §7.6.1) or that aiohttp sets itself.
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


async def _session(app: web.Application):
    app[SESSION] = aiohttp.ClientSession(auto_decompress=False,
                                         connector=aiohttp.TCPConnector(limit=64))
    yield
    await app[SESSION].close()


async def relay(request: web.Request) -> web.StreamResponse:
    base = app_upstream(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = request.content if request.can_read_body else None
    async with request.app[SESSION].request(request.method, base + request.path_qs, headers=headers,
                                            data=body, allow_redirects=False) as upstream:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP:
                resp.headers.add(key, value)
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def app_upstream(request: web.Request) -> str:
    """Kubo's RPC for ``/api/v0/…``, its HTTP gateway for everything else."""
    upstreams = request.app[UPSTREAMS]
    return upstreams["api"] if request.path.startswith("/api/v0/") else upstreams["gateway"]


def create_app(api_url: str, gateway_url: str) -> web.Application:
    app = web.Application()
    app[UPSTREAMS] = {"api": api_url.rstrip("/"), "gateway": gateway_url.rstrip("/")}
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{path:.*}", relay)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--api", required=True, help="Kubo's RPC URL")
    p.add_argument("--gateway", required=True, help="Kubo's HTTP gateway URL")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)

    async def announce(app: web.Application) -> None:
        print(f"RELAY_URL=http://127.0.0.1:{args.port}", flush=True)
    app = create_app(args.api, args.gateway)
    app.on_startup.append(announce)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    sys.exit(main())

"""The patient timeline UI: a static bundle (``gateway/ui/``: HTML, ES modules, CSS) at ``/ui/``.

The files are the sign-in page and the code behind it; they hold no data, so they are served
without a credential (``auth.PUBLIC_ROUTES`` names the two routes registered here). Everything
the UI shows it reads from ``/medicon/v1`` with the bearer token the user typed, which it keeps
in the tab's ``sessionStorage`` and never puts in a URL.

Every answer carries a strict Content-Security-Policy (only this origin's scripts and styles, no
inline code, no framing), ``nosniff`` and ``no-referrer``. The bundle is read into memory once,
so a request can only ever name one of its files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).with_name("ui")
ROUTE_INDEX, ROUTE_ASSET = "medicon-ui", "medicon-ui-asset"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# blob: for attachments the UI fetched with the token (images in <img>, PDFs in a frame).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "frame-src blob:; object-src 'none'; connect-src 'self'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cache-Control": "no-cache",
}


class Asset:
    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def load_bundle(folder: Path = UI_DIR) -> dict[str, Asset]:
    """Every file of the bundle by its path under ``/ui/`` (``""`` is the sign-in page)."""
    assets = {path.relative_to(folder).as_posix(): Asset(path.read_bytes(), CONTENT_TYPES[path.suffix])
              for path in sorted(folder.rglob("*")) if path.is_file() and path.suffix in CONTENT_TYPES}
    assets[""] = assets["index.html"]
    return assets


def add_ui_routes(app: web.Application) -> None:
    """Register ``/ui`` (a redirect) and ``/ui/<file>``; call before any catch-all route."""
    assets = load_bundle()

    async def index(request: web.Request) -> web.Response:
        return web.Response(status=308, headers={**HEADERS, "Location": "/ui/"})

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404, text="not found\n", headers=HEADERS)
        headers = {**HEADERS, "ETag": found.etag}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})

    app.router.add_get("/ui", index, name=ROUTE_INDEX)
    app.router.add_get("/ui/{name:.*}", asset, name=ROUTE_ASSET)

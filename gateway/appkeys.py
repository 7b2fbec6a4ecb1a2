"""Typed keys for the state an application carries (``app[CONFIG]``), never module globals."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import Config

CONFIG = web.AppKey("config", Config)
KUBO_SESSION = web.AppKey("kubo_session", aiohttp.ClientSession)

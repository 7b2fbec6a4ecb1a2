"""Typed keys for the state the HTTP app carries (``app[SERVICE]``), never module globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..config import Config

if TYPE_CHECKING:
    from ..core.service import RecordService

CONFIG = web.AppKey("config", Config)
SERVICE = web.AppKey("service", "RecordService")  # opened in a cleanup_ctx, one per app

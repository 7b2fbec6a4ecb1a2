"""Typed keys for the state an application carries (``app[CONFIG]``), never module globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
import pluggy
from aiohttp import web

from .config import Config

if TYPE_CHECKING:
    from .ipfs import Kubo
    from .keyring import LocalKeyring
    from .schemas import SchemaRegistry
    from .store import HeadStore

CONFIG = web.AppKey("config", Config)
KUBO_SESSION = web.AppKey("kubo_session", aiohttp.ClientSession)
KUBO = web.AppKey("kubo", "Kubo")                  # the gateway's own calls to Kubo
STORE = web.AppKey("store", "HeadStore")           # episode heads and the record index
SCHEMAS = web.AppKey("schemas", "SchemaRegistry")  # record kinds, loaded once at start
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
KEYRING = web.AppKey("keyring", "LocalKeyring")    # data keys, pseudonym key, signing key
# Handlers of intercepted RPC commands: {command: handler(request, resolved)}.
INTERCEPTORS = web.AppKey("interceptors", dict)

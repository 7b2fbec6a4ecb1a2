"""The plugin host: one pluggy ``PluginManager`` holding built-in and third-party plugins alike.

Plugins come from the ``medicon_gateway`` entry-point group (built-ins included, see
``pyproject.toml``) and from module paths in the config. Hook results may be awaitables;
``call`` awaits them and turns a plugin's failure into a clean error naming the plugin.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Any

import pluggy

from . import hookspecs
from .errors import GatewayError
from .keyring import KeyShredded

log = logging.getLogger(__name__)
# Exceptions with a meaning of their own, answered by the caller (crypto-shredded data is 410).
PASS_THROUGH = (KeyShredded,)


def make_manager(module_paths: tuple[str, ...] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for path in module_paths:
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise GatewayError(500, f"plugin module {path!r} cannot be imported: {exc}") from None
        if not pm.is_registered(module):
            pm.register(module, name=path)
    if os.environ.get("MEDICON_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: log.info("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


async def call(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call every implementation of ``hook`` (last registered first, as pluggy does), awaiting
    async ones, and return ``[(plugin_name, result), ...]`` for non-None results."""
    results = []
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        args = {name: kwargs[name] for name in impl.argnames}
        try:
            result = impl.function(**args)
            if inspect.isawaitable(result):
                result = await result
        except GatewayError as err:
            raise GatewayError(err.status, f"{err.message} (plugin {impl.plugin_name})", code=err.code,
                               headers=err.headers, details=err.details, reason=err.reason) from None
        except PASS_THROUGH:
            raise
        except Exception as exc:
            log.exception("plugin %s failed in %s", impl.plugin_name, hook)
            raise GatewayError(500, f"plugin {impl.plugin_name!r} failed in {hook}: {type(exc).__name__}") from None
        if result is not None:
            results.append((impl.plugin_name, result))
            if getattr(pm.hook, hook).spec.opts.get("firstresult"):
                break
    return results


def describe(pm: pluggy.PluginManager) -> list[dict]:
    """Loaded plugins, their versions and the hooks each implements (for ``/medicon/v1/plugins``)."""
    versions = {plugin: dist.version for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda kv: kv[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "version": versions.get(plugin), "hooks": hooks})
    return out

"""The plugin host: one pluggy ``PluginManager`` holding built-in and third-party plugins alike.

Plugins come from the ``medicon_gateway`` entry-point group (built-ins included, see
``pyproject.toml``) and from module paths in the config. Hooks are called through pluggy
(``pm.hook.<name>(...)``), so tracing, wrappers and ``firstresult`` hold for every hook; what an
implementation returns may be awaitable, and is awaited here ("await me maybe", as datasette
does). A plugin's failure becomes a clean error naming the plugin and the hook.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Iterator

import pluggy

from .. import hookspecs
from ..errors import Erased, Internal, MediconError, StorageFull, is_out_of_space

log = logging.getLogger(__name__)


class PluginLoadError(Exception):
    """A configured plugin module cannot be imported."""


def make_manager(module_paths: tuple[str, ...] = (), *, trace: bool = False) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for path in module_paths:
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise PluginLoadError(f"plugin module {path!r} cannot be imported: {exc}") from None
        if not pm.is_registered(module):
            pm.register(module, name=path)
    if trace:
        pm.trace.root.setwriter(lambda msg: log.info("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


class PluginHost:
    """Calls hooks and awaits what they return."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    async def call(self, name: str, **kwargs: Any) -> Any:
        """Call hook ``name``: for a ``firstresult`` hook its one answer (or None), otherwise the
        list of every non-None answer, each awaited if it was awaitable."""
        hook = getattr(self.pm.hook, name)
        try:
            result = hook(**kwargs)
            if hook.spec.opts.get("firstresult"):
                return await _resolved(result)
            return [value for value in await _each_resolved(result) if value is not None]
        except Exception as exc:
            raise self._failure(name, exc) from None

    def call_sync(self, name: str, **kwargs: Any) -> Any:
        """A hook documented as synchronous (start-up hooks): its answer as ``call`` gives it;
        an awaitable answer is the plugin's mistake, refused with a message naming it."""
        hook = getattr(self.pm.hook, name)
        try:
            result = hook(**kwargs)
        except Exception as exc:
            raise self._failure(name, exc) from None
        for value in (result if isinstance(result, list) else [result]):
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()
                raise Internal(f"{name} must not be async: a plugin returned an awaitable "
                               f"({', '.join(self.implementers(name))})")
        return result

    async def call_each(self, name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """``[(plugin name, answer), ...]`` for every implementation that answered: for hooks
        whose answers must say which plugin gave them (validation problems). Each plugin is
        called through its own pluggy subset caller, so tracing and wrappers still apply."""
        found = []
        for plugin_name, caller in self._per_plugin(name):
            try:
                result = await _resolved(caller(**kwargs))
            except Exception as exc:
                raise self._failure(name, exc, plugin_name) from None
            for value in result if isinstance(result, list) else [result]:
                value = await _resolved(value)
                if value is not None:
                    found.append((plugin_name, value))
        return found

    def implementers(self, name: str) -> list[str]:
        return [impl.plugin_name for impl in getattr(self.pm.hook, name).get_hookimpls()]

    def _per_plugin(self, name: str) -> Iterator[tuple[str, Any]]:
        impls = getattr(self.pm.hook, name).get_hookimpls()
        wrappers = {id(i.plugin) for i in impls if i.wrapper or i.hookwrapper}
        for impl in reversed(impls):
            if impl.wrapper or impl.hookwrapper:
                continue
            others = [i.plugin for i in impls if i.plugin is not impl.plugin and id(i.plugin) not in wrappers]
            yield impl.plugin_name, self.pm.subset_hook_caller(name, remove_plugins=others)

    def _culprit(self, name: str, exc: BaseException) -> str | None:
        """The plugin whose code raised ``exc``: the innermost frame of an implementation."""
        codes = {impl.function.__code__: impl.plugin_name for impl in getattr(self.pm.hook, name).get_hookimpls()}
        culprit, tb = None, exc.__traceback__
        while tb is not None:
            culprit = codes.get(tb.tb_frame.f_code, culprit)
            tb = tb.tb_next
        return culprit

    def _failure(self, name: str, exc: Exception, plugin: str | None = None) -> Exception:
        plugin = plugin or self._culprit(name, exc)
        if isinstance(exc, MediconError):  # a plugin's refusal, answered with its meaning
            if plugin is None or isinstance(exc, Erased) or f"(plugin {plugin})" in exc.message:
                return exc
            return exc.with_message(f"{exc.message} (plugin {plugin})")
        who = f"plugin {plugin!r}" if plugin else "a plugin"
        if is_out_of_space(exc):
            log.error("%s could not write in %s: a disk the gateway writes to is full", who, name)
            return StorageFull(f"a disk the gateway writes to is full: {who} could not write ({name})")
        log.exception("%s failed in %s", who, name, exc_info=exc)
        return Internal(f"{who} failed in {name}: {type(exc).__name__}")

    def describe(self) -> list[dict]:
        """Loaded plugins, their versions and the hooks each implements (``/medicon/v1/plugins``)."""
        versions = {plugin: dist.version for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda kv: kv[0]):
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            out.append({"name": name, "version": versions.get(plugin), "hooks": hooks})
        return out


async def _each_resolved(results: list[Any]) -> list[Any]:
    """Every plugin's answer, awaited in turn; once one fails, the coroutines of the plugins
    after it are closed, never run (a failed call is one answer: its error)."""
    values = []
    for index, value in enumerate(results):
        try:
            values.append(await _resolved(value))
        except BaseException:
            for later in results[index + 1:]:
                if inspect.iscoroutine(later):
                    later.close()
            raise
    return values


async def _resolved(value: Any) -> Any:
    while inspect.isawaitable(value):
        value = await value
    return value

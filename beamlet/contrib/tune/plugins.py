"""beamlet.tune's own plugin points, on pluggy like beamlet's core ones.

A package adds a logger (later also searchers and schedulers) by
implementing a hook and registering its module under the ``beamlet.tune``
entry-point group::

    [project.entry-points."beamlet.tune"]
    mylogger = "mypackage.tune_plugin"

    # mypackage/tune_plugin.py
    from beamlet.contrib.tune.plugins import hookimpl

    @hookimpl
    def beamlet_tune_loggers():
        return {"mlflow": MLflowLoggerCallback}

``tune.run(loggers=["json", "csv", "mlflow"])`` then picks loggers by name;
the default is :data:`DEFAULT_LOGGERS`. ``register(plugin)`` does the same as
an entry point, at run time.
"""
from __future__ import annotations

import importlib
import threading

import pluggy

PROJECT = "beamlet_tune"
ENTRY_POINT_GROUP = "beamlet.tune"
DEFAULT_LOGGERS = ("json", "csv", "tbx")
BUILTIN_PLUGINS = ("beamlet.contrib.tune.loggers",)

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "hookspec", "register", "unregister", "logger_factories",
           "DEFAULT_LOGGERS", "ENTRY_POINT_GROUP"]


class TuneHookSpecs:
    """The hooks a beamlet.tune plugin can implement."""

    @hookspec
    def beamlet_tune_loggers(self) -> dict:
        """Return ``{name: factory}``; ``factory()`` makes a ``tune.Callback``
        (usually a ``LoggerCallback``) that gets every trial's results."""


_manager: pluggy.PluginManager | None = None
_lock = threading.Lock()


def manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        with _lock:
            if _manager is None:
                pm = pluggy.PluginManager(PROJECT)
                pm.add_hookspecs(TuneHookSpecs)
                for name in BUILTIN_PLUGINS:
                    pm.register(importlib.import_module(name), name=name)
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
                _manager = pm
    return _manager


def register(plugin, name: str | None = None) -> None:
    manager().register(plugin, name=name)


def unregister(plugin=None, name: str | None = None) -> None:
    manager().unregister(plugin, name=name)


def logger_factories() -> dict:
    merged: dict = {}
    for result in manager().hook.beamlet_tune_loggers():
        for key, factory in (result or {}).items():
            if key in merged and merged[key] is not factory:
                raise RuntimeError(f"two beamlet.tune plugins provide the logger {key!r}")
            merged[key] = factory
    return merged

"""beamlet.tune's own plugin points, on pluggy like beamlet's core ones.

A package adds loggers, searchers or schedulers by implementing a hook and
registering its module under the ``beamlet.tune`` entry-point group::

    [project.entry-points."beamlet.tune"]
    mylogger = "mypackage.tune_plugin"

    # mypackage/tune_plugin.py
    from beamlet.contrib.tune.plugins import hookimpl

    @hookimpl
    def beamlet_tune_loggers():
        return {"mlflow": MLflowLoggerCallback}

``tune.run(loggers=["json", "csv", "mlflow"])`` then picks loggers by name;
the default is :data:`DEFAULT_LOGGERS`. Likewise ``beamlet_tune_searchers``
and ``beamlet_tune_schedulers`` return ``{name: factory}`` for
``tune.create_searcher(name, **kwargs)`` and ``tune.create_scheduler(name, ...)``.
``register(plugin)`` does the same as an entry point, at run time.
"""
from __future__ import annotations

import importlib
import threading

import pluggy

PROJECT = "beamlet_tune"
ENTRY_POINT_GROUP = "beamlet.tune"
DEFAULT_LOGGERS = ("json", "csv", "tbx")
BUILTIN_PLUGINS = ("beamlet.contrib.tune.loggers", "beamlet.contrib.tune.schedulers",
                   "beamlet.contrib.tune.search")

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "hookspec", "register", "unregister", "logger_factories",
           "searcher_factories", "scheduler_factories", "create_searcher", "create_scheduler",
           "DEFAULT_LOGGERS", "ENTRY_POINT_GROUP"]


class TuneHookSpecs:
    """The hooks a beamlet.tune plugin can implement."""

    @hookspec
    def beamlet_tune_loggers(self) -> dict:
        """Return ``{name: factory}``; ``factory()`` makes a ``tune.Callback``
        (usually a ``LoggerCallback``) that gets every trial's results."""

    @hookspec
    def beamlet_tune_searchers(self) -> dict:
        """Return ``{name: factory}``; ``factory(**kwargs)`` makes a tune Searcher."""

    @hookspec
    def beamlet_tune_schedulers(self) -> dict:
        """Return ``{name: factory}``; ``factory(**kwargs)`` makes a TrialScheduler."""


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


def _factories(hook: str, what: str) -> dict:
    merged: dict = {}
    for result in getattr(manager().hook, hook)():
        for key, factory in (result or {}).items():
            if key in merged and merged[key] is not factory:
                raise RuntimeError(f"two beamlet.tune plugins provide the {what} {key!r}")
            merged[key] = factory
    return merged


def logger_factories() -> dict:
    return _factories("beamlet_tune_loggers", "logger")


def searcher_factories() -> dict:
    return _factories("beamlet_tune_searchers", "searcher")


def scheduler_factories() -> dict:
    return _factories("beamlet_tune_schedulers", "scheduler")


def _create(factories: dict, what: str, name: str, kwargs: dict):
    if name not in factories:
        raise ValueError(f"unknown {what} {name!r}; installed: {', '.join(sorted(factories))}")
    return factories[name](**kwargs)


def create_searcher(name: str, **kwargs):
    """A searcher by its plugin name (``"optuna"`` when optuna is installed)."""
    return _create(searcher_factories(), "searcher", name, kwargs)


def create_scheduler(name: str, **kwargs):
    """A scheduler by name: ``fifo``, ``asha``/``async_hyperband``, ``hyperband``,
    ``median_stopping_rule``, ``pbt``, or a plugin's."""
    return _create(scheduler_factories(), "scheduler", name, kwargs)

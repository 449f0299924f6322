"""The one PluginManager: built-in plugins first, then the ``beamlet`` entry points.

Built-in backends are registered by module name (imported on first use of the
manager, not at ``import beamlet``) through the same hooks as third-party
ones. Observer hooks are looked up once per call site via `observer`, which
returns None when no plugin implements the hook, so the hot path pays nothing.
"""
from __future__ import annotations

import importlib
import threading

import pluggy

from . import hookspecs

hookimpl = pluggy.HookimplMarker("beamlet")

ENTRY_POINT_GROUP = "beamlet"

# Modules of this package that are plugins; each implements some hooks.
BUILTIN_PLUGINS = (
    "beamlet.backends.local.plugin",
    "beamlet.backends.redis.plugin",
    "beamlet.backends.zmq.plugin",
    "beamlet.backends.dask.plugin",
    "beamlet.backends.ray.plugin",
    "beamlet.contrib.rl.plugin",
    "beamlet.contrib.tune.cli",
)

_manager: pluggy.PluginManager | None = None
_lock = threading.Lock()


def manager() -> pluggy.PluginManager:
    """The process-wide PluginManager, built on first use. Add and remove
    plugins with `register`/`unregister`, not on it directly: `notify`
    remembers which hooks have observers until one of those is called."""
    global _manager
    if _manager is None:
        with _lock:
            if _manager is None:
                pm = pluggy.PluginManager("beamlet")
                pm.add_hookspecs(hookspecs)
                for name in BUILTIN_PLUGINS:
                    pm.register(importlib.import_module(name), name=name)
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
                _apply_serializers(pm)
                _manager = pm
    return _manager


def register(plugin, name: str | None = None) -> None:
    """Register a plugin object or module at run time (as an entry point would)."""
    pm = manager()
    pm.register(plugin, name=name)
    _observed.clear()
    _apply_serializers(pm)


def unregister(plugin) -> None:
    manager().unregister(plugin)
    _observed.clear()


def _merge(results: list[dict], what: str) -> dict:
    merged: dict = {}
    for result in results:
        for key, value in (result or {}).items():
            if key in merged and merged[key] is not value:
                raise RuntimeError(f"two plugins provide the {what} {key!r}")
            merged[key] = value
    return merged


def backend_factories() -> dict:
    """``{name: factory}`` for every installed backend."""
    return _merge(manager().hook.beamlet_backends(), "backend")


def control_store_factories() -> dict:
    return _merge(manager().hook.beamlet_control_stores(), "control store scheme")


def _apply_serializers(pm: pluggy.PluginManager) -> None:
    from .serialization import register_serializer
    for pairs in pm.hook.beamlet_serializers():
        for cls, reducer in pairs or ():
            register_serializer(cls, reducer)


def observer(hook_name: str):
    """The hook caller for `hook_name` if any plugin implements it, else None."""
    caller = getattr(manager().hook, hook_name)
    return caller if caller.get_hookimpls() else None


#: hook name -> what `notify` calls for it: its listeners, then the plugins'
#: hook caller if any plugin implements it; emptied whenever a plugin or a
#: listener comes or goes.
_observed: dict = {}


#: hook name -> functions beamlet itself registered with `add_listener`.
_listeners: dict[str, list] = {}


def add_listener(hook_name: str, fn) -> None:
    """Have `notify` call ``fn(**kwargs)`` for the observer hook `hook_name`,
    before the plugins' implementations and without pluggy's dispatch (about
    6 us a call, a tenth of a task's round trip): for beamlet's own always-on
    observers, such as the driver's task record (core/task_events.py)."""
    getattr(hookspecs, hook_name)  # (AttributeError for a hook that does not exist)
    _listeners[hook_name] = _listeners.get(hook_name, []) + [fn]
    _observed.clear()


def remove_listener(hook_name: str, fn) -> None:
    """Undo `add_listener` (nothing if `fn` is not listening). Compared with
    ``==``, not ``is``: each ``obj.method`` is a new bound-method object."""
    left = [f for f in _listeners.get(hook_name, ()) if f != fn]
    if left:
        _listeners[hook_name] = left
    else:
        _listeners.pop(hook_name, None)
    _observed.clear()


def notify(hook_name: str, **kwargs) -> None:
    """Call an observer hook: its listeners (`add_listener`), then the plugins
    that implement it. An observer that raises is reported on stderr and
    otherwise ignored: it runs inside the scheduler, where an exception would
    lose the task it was told about."""
    try:
        callers = _observed[hook_name]
    except KeyError:
        callers = _callers(hook_name)
    for fn in callers:
        try:
            fn(**kwargs)
        except Exception as err:  # noqa: BLE001
            _report(hook_name, err)


def observed(hook_name: str) -> bool:
    """Whether `notify` of `hook_name` would call anything (a hot path may
    then skip making what it would pass)."""
    try:
        return bool(_observed[hook_name])
    except KeyError:
        return bool(_callers(hook_name))


def _callers(hook_name: str) -> tuple:
    listeners = _listeners.get(hook_name)  # (a list that is replaced, never changed)
    caller = observer(hook_name)
    callers = tuple(listeners or ()) + ((caller,) if caller is not None else ())
    _observed[hook_name] = callers
    if _listeners.get(hook_name) is not listeners:
        _observed.pop(hook_name, None)  # changed meanwhile: worked out again next time
    return callers


def _report(hook_name: str, err: Exception) -> None:
    import sys
    print(f"beamlet: observer hook {hook_name} raised {err!r}; ignored", file=sys.stderr)

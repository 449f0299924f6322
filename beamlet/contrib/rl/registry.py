"""Algorithms by name, from beamlet's plugin hook ``beamlet_rl_algorithms``.

The built-in ones (PPO, A2C, A3C, DQN, ES) come from
``beamlet.contrib.rl.plugin``; a third-party package adds its own by
implementing the hook in a module registered under the ``beamlet`` entry-point
group (or at run time with ``beamlet.core.plugins.register``)::

    from beamlet.core.plugins import hookimpl

    @hookimpl
    def beamlet_rl_algorithms():
        return {"MyAlgo": "mypackage.algo:MyAlgo"}   # or the class itself
"""
from __future__ import annotations

import importlib

from beamlet.core import plugins

__all__ = ["algorithm_classes", "get_algorithm_class", "get_algorithm_config"]


def _resolve(value):
    if isinstance(value, str):
        module, _, attr = value.partition(":")
        return getattr(importlib.import_module(module), attr)
    return value


def algorithm_classes() -> dict:
    """``{name: spec}`` for every installed algorithm (spec: class or "module:Class")."""
    merged: dict = {}
    for result in plugins.manager().hook.beamlet_rl_algorithms():
        for name, spec in (result or {}).items():
            if name in merged and merged[name] != spec:
                raise RuntimeError(f"two plugins provide the RL algorithm {name!r}")
            merged[name] = spec
    return merged


def get_algorithm_class(name: str) -> type:
    """The Algorithm subclass registered as `name` (e.g. ``"PPO"``)."""
    known = algorithm_classes()
    if name not in known:
        raise ValueError(f"unknown RL algorithm {name!r}; installed: {', '.join(sorted(known))}")
    return _resolve(known[name])


def get_algorithm_config(name: str):
    """A fresh config of the algorithm registered as `name`."""
    return get_algorithm_class(name).config_class()

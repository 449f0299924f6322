"""Ray's own API, with Ray imported by ``init()`` rather than by importing this module.

``core_bench.py --module ray`` loads this, so that native Ray's cold start
(``init()`` to the first result) counts importing Ray, as beamlet-on-ray's
does: beamlet imports Ray in ``init(backend="ray")``. Every other name is
Ray's own, looked up once and then kept here (no cost per call).
"""
from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("ray")


def init(*args, **kwargs):
    import ray
    return ray.init(*args, **kwargs)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    import ray
    value = getattr(ray, name)
    globals()[name] = value
    return value

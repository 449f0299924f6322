"""Registers the ``redis://`` control store through the ``beamlet_control_stores``
hook, as a third-party store would. The redis package is imported only when a
store is opened, so ``import beamlet`` works without it."""
from __future__ import annotations

from ... import exceptions as exc
from ...core.plugins import hookimpl


def _open(url: str):
    try:
        from .control_store import RedisControlStore
    except ModuleNotFoundError as err:
        if err.name != "redis":
            raise
        raise exc.BackendError("a redis:// control store needs the redis package: "
                               "pip install 'beamlet[cluster]' (or: pip install redis)") from None
    return RedisControlStore(url)


@hookimpl
def beamlet_control_stores():
    return {"redis": _open}

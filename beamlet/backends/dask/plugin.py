"""Registers the ``dask`` backend through the plugin hooks, as a third party would."""
from __future__ import annotations

from ...core.plugins import hookimpl


def _dask(config, runtime):
    try:
        import distributed  # noqa: F401 - only to give a clear message
    except ImportError:
        raise ValueError("backend 'dask' needs Dask's distributed package: "
                         "pip install 'beamlet[dask]'") from None
    from .backend import DaskBackend
    return DaskBackend(config, runtime)


_dask.backend_class = "beamlet.backends.dask.backend:DaskBackend"


@hookimpl
def beamlet_backends():
    return {"dask": _dask}

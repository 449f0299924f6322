"""Registers the ``dask`` backend through the plugin hooks, as a third party would."""
from __future__ import annotations

from ...core.plugins import hookimpl


def _dask(config, runtime):
    import importlib.util
    # (Found, not imported: a LocalCluster's worker processes start before
    # this one imports Dask, so that they all import it at once.)
    if importlib.util.find_spec("distributed") is None:
        raise ValueError("backend 'dask' needs Dask's distributed package: "
                         "pip install 'beamlet[dask]'") from None
    from .backend import DaskBackend
    return DaskBackend(config, runtime)


_dask.backend_class = "beamlet.backends.dask.backend:DaskBackend"


@hookimpl
def beamlet_backends():
    return {"dask": _dask}

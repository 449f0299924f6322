"""Registers the ``ray`` backend through the plugin hooks, as a third party would."""
from __future__ import annotations

from ...core.plugins import hookimpl


def _ray(config, runtime):
    import importlib.util
    if importlib.util.find_spec("ray") is None:  # (not imported here: only looked for)
        raise ValueError("backend 'ray' needs Ray: pip install 'beamlet[ray]'")
    from .backend import RayBackend
    return RayBackend(config, runtime)


_ray.backend_class = "beamlet.backends.ray.backend:RayBackend"
# As ray.init() does: a plain init(backend="ray") joins the Ray this names.
_ray.address_env_var = "RAY_ADDRESS"


@hookimpl
def beamlet_backends():
    return {"ray": _ray}

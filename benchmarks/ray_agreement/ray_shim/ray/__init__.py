"""``import ray`` gives beamlet: put this directory (``ray_shim``) first on
``PYTHONPATH`` and every process that inherits it (the driver and beamlet's
workers) runs Ray programs on beamlet. ``ray.X`` is ``beamlet.X``; the alias
is installed at the front of ``sys.meta_path``, so no beamlet module is ever
loaded twice under two names."""
import importlib
import importlib.abc
import importlib.util
import os
import sys


class _RayAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.startswith("ray."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("beamlet" + spec.name[len("ray"):])

    def exec_module(self, module) -> None:
        pass  # (already imported under its own name)


sys.meta_path.insert(0, _RayAlias())
import beamlet  # noqa: E402

_backend = os.environ.get("BEAMLET_AS_RAY_BACKEND")
if _backend:
    from beamlet.core import api as _api
    _plain_init = beamlet.init

    def _init(*args, **kwargs):
        kwargs.setdefault("backend", _backend)
        return _plain_init(*args, **kwargs)

    beamlet.init = _api.init = _init
sys.modules["ray"] = beamlet

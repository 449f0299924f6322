"""Registers the ``inprocess`` and ``local`` backends through the plugin hooks,
exactly as a third-party backend would. Backend modules are imported only when
their factory runs, so ``import beamlet`` stays light."""
from __future__ import annotations

from ...core.plugins import hookimpl


def _inprocess(config, runtime):
    from .inprocess import InProcessBackend
    return InProcessBackend(config, runtime)


def _local(config, runtime):
    from .driver import LocalBackend
    return LocalBackend(config, runtime)


# Where `beamlet backends` reads the capability flags without starting anything.
_inprocess.backend_class = "beamlet.backends.local.inprocess:InProcessBackend"
_local.backend_class = "beamlet.backends.local.driver:LocalBackend"


@hookimpl
def beamlet_backends():
    return {"inprocess": _inprocess, "local": _local}

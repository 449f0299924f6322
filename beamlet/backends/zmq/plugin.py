"""Adds the cluster's commands (``beamlet start``, ``stop``, ``status``) to
the ``beamlet`` command line through the ``beamlet_cli_commands`` hook, and
the ``cluster`` backend (a driver of such a cluster) through
``beamlet_backends``, as a third-party plugin would. pyzmq and redis are
imported only when a command runs or the backend starts, so ``import
beamlet`` works without them."""
from __future__ import annotations

from ...core.plugins import hookimpl


@hookimpl
def beamlet_cli_commands(subparsers):
    from .commands import add_commands
    add_commands(subparsers)


def _cluster(config, runtime):
    from .backend import ClusterBackend
    return ClusterBackend(config, runtime)


# Where `beamlet backends` reads the capability flags without starting anything.
_cluster.backend_class = "beamlet.backends.zmq.backend:ClusterBackend"


@hookimpl
def beamlet_backends():
    return {"cluster": _cluster}

"""Adds the cluster's commands (``beamlet start``, ``stop``, ``status``) to
the ``beamlet`` command line through the ``beamlet_cli_commands`` hook, as a
third-party plugin would. pyzmq and redis are imported only when a command
runs, so ``import beamlet`` works without them."""
from __future__ import annotations

from ...core.plugins import hookimpl


@hookimpl
def beamlet_cli_commands(subparsers):
    from .commands import add_commands
    add_commands(subparsers)

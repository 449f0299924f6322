"""The hooks a beamlet plugin can implement.

A plugin is any module or object with functions named like these, decorated
with ``beamlet.core.plugins.hookimpl``. The built-in backends are plugins of
exactly this kind; a third-party package registers its module under the
``beamlet`` entry-point group::

    [project.entry-points.beamlet]
    mybackend = "mypackage.plugin"

Hooks are grouped: what a plugin provides (backends, control stores,
serializers, CLI commands) and what it observes (lifecycle events). Observer
hooks run in the driver, in the thread that made the event happen; they must
return quickly and must not raise.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("beamlet")


# -- providers ------------------------------------------------------------------

@hookspec
def beamlet_backends() -> dict:
    """Return ``{name: factory}`` for the backends this plugin provides.

    ``factory(config, runtime) -> Backend`` builds the driver side of the
    backend. ``config`` is a dict with at least ``num_cpus``, ``num_gpus``,
    ``resources``, ``namespace``, ``address``, ``control_store`` (a URL or
    None: open it with ``core.control_store.open_control_store``) and the extra
    keyword arguments given to ``init`` (backend options; reject unknown ones
    with ``core.options.check_backend_options``); ``runtime`` is the
    ``beamlet.core.runtime.Runtime`` that will drive it (its ``refs`` counter
    and ``namespace``). Names are case-sensitive; two plugins may not claim one.

    A factory may carry an ``address_env_var`` attribute: the environment
    variable whose value a plain ``init(backend=name)`` (no ``address``) takes
    as its address, as ``ray.init()`` reads ``$RAY_ADDRESS``
    (``address="local"`` still starts a new instance).
    """


@hookspec
def beamlet_control_stores() -> dict:
    """Return ``{url_scheme: factory}``; ``factory(url) -> ControlStore``.

    ``init(control_store="redis://host:port")`` picks the factory by scheme."""


@hookspec
def beamlet_serializers() -> list:
    """Return ``[(cls, reducer), ...]``: instances of ``cls`` pickle through
    ``reducer(obj) -> (callable, args)`` (copyreg style) in every process."""


@hookspec
def beamlet_cli_commands(subparsers) -> None:
    """Add sub-commands to the ``beamlet`` command line.

    ``subparsers`` is argparse's ``_SubParsersAction``; a command sets
    ``func=callable(args) -> int`` with ``set_defaults``."""


@hookspec
def beamlet_rl_algorithms() -> dict:
    """Return ``{name: cls}`` for the reinforcement-learning algorithms this
    plugin provides (``cls`` a ``beamlet.rl.Algorithm`` subclass, or the string
    ``"module:Class"`` so that the plugin imports nothing until it is used).
    ``beamlet.rl``, ``beamlet rl train --algo NAME`` and ``tune.run(NAME)`` find
    them by name; two plugins may not claim one."""


@hookspec
def beamlet_tune_trainables() -> dict:
    """Return ``{name: trainable}``: trainables ``tune.run(name)`` finds without a
    ``register_trainable`` call (a function or a ``tune.Trainable`` subclass)."""


# -- observers ------------------------------------------------------------------

@hookspec
def beamlet_init(backend_name: str, config: dict) -> None:
    """A runtime was initialised in the driver with this backend."""


@hookspec
def beamlet_shutdown(backend_name: str) -> None:
    """The driver's runtime is shutting down."""


@hookspec
def beamlet_task_submitted(spec) -> None:
    """A task, actor creation or actor call (a ``TaskSpec``) reached the scheduler."""


@hookspec
def beamlet_task_finished(spec, status: str, duration: float, pid) -> None:
    """A task attempt ended: ``status`` is ``"FINISHED"``, ``"FAILED"``,
    ``"RETRYING"`` or ``"CANCELLED"``; ``duration`` is seconds from dispatch;
    ``pid`` is the process it ran in (None if it never reached one)."""


@hookspec
def beamlet_actor_state(actor_id: bytes, class_name: str, state: str, reason: str) -> None:
    """An actor changed state: ``"ALIVE"``, ``"RESTARTING"`` or ``"DEAD"`` (with the reason)."""

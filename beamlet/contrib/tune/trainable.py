"""Trainables: what a trial runs, and the registry of trainables by name.

A trainable is either a function or a :class:`Trainable` subclass:

* ``fn(config)`` reporting with ``tune.report(...)``, or the seed's
  ``fn(config, reporter)`` calling ``reporter(**metrics)``. Returning a dict
  reports it as the final result; returning anything else just ends the trial.
* a class with ``setup(config)``, ``step() -> dict`` (one result per call) and
  ``cleanup()``.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Any

from .checkpoint import Checkpoint, read_metadata, save_into
from .result import ResultBuilder

__all__ = ["Trainable", "register_trainable", "get_trainable", "is_registered",
           "validate_trainable", "trainable_name", "wants_reporter"]

_registry: dict[str, Any] = {}


class Trainable:
    """Base class of class-based trainables. Subclasses implement ``setup``,
    ``step`` and optionally ``cleanup``; ``train()`` runs one ``step`` and adds
    the framework's fields (``training_iteration``, times, ``trial_id``, ...)."""

    def __init__(self, config: dict | None = None, trial_info: dict | None = None):
        self.config = dict(config or {})
        info = trial_info or {}
        self._trial_id = info.get("trial_id", "default")
        self._trial_name = info.get("trial_name", self._trial_id)
        self._logdir = info.get("logdir")
        self._builder = ResultBuilder(self._trial_id, self.config, info.get("experiment_tag", ""))
        self._stopped = False
        self.setup(copy.deepcopy(self.config))

    # -- what subclasses implement -------------------------------------------
    def setup(self, config: dict) -> None:
        """Called once with the trial's config, before the first ``step``."""

    def step(self) -> dict:
        """One iteration of training: return a dict of metrics."""
        raise NotImplementedError(f"{type(self).__name__} must implement step()")

    def cleanup(self) -> None:
        """Called once when the trial ends."""

    def save_checkpoint(self, checkpoint_dir: str) -> dict | None:
        """Write the trainable's state into the (existing, empty) directory
        `checkpoint_dir`, or return it as a picklable dict. Needed for
        ``checkpoint_freq``/``checkpoint_at_end``, pausing and PBT."""
        raise NotImplementedError(f"{type(self).__name__} does not implement save_checkpoint()")

    def load_checkpoint(self, checkpoint: dict | str) -> None:
        """Load what :meth:`save_checkpoint` saved: its dict, or the directory path."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load_checkpoint()")

    def can_checkpoint(self) -> bool:
        """Whether the subclass implements :meth:`save_checkpoint`."""
        return type(self).save_checkpoint is not Trainable.save_checkpoint

    def save(self, trial_dir: str | None = None) -> str:
        """Save a checkpoint as ``<trial_dir>/checkpoint_<iteration>``; return its path."""
        trial_dir = trial_dir or self._logdir
        if not trial_dir:
            raise RuntimeError("this trainable has no directory to save checkpoints in")

        def fill(directory: str) -> None:
            data = self.save_checkpoint(directory)
            if isinstance(data, dict):
                Checkpoint.from_dict(data, directory)
            elif data is not None and os.path.abspath(str(data)) != os.path.abspath(directory):
                raise TypeError(f"{type(self).__name__}.save_checkpoint() must write into "
                                f"the directory it is given or return a dict, got {data!r:.80}")

        return save_into(trial_dir, self._builder.state(), fill=fill)

    def restore(self, path: str) -> None:
        """Load the checkpoint in directory `path` (made by :meth:`save`)."""
        checkpoint = Checkpoint(path)
        self.load_checkpoint(checkpoint.to_dict() if checkpoint.is_dict() else path)
        self._builder.restore(read_metadata(path))

    # -- what the framework calls ----------------------------------------------
    def train(self) -> dict:
        """Run one ``step`` and return its result with the framework's fields."""
        self._builder.restart_clock()
        metrics = self.step()
        if not isinstance(metrics, dict):
            raise TypeError(f"{type(self).__name__}.step() must return a dict of metrics, "
                            f"got {type(metrics).__name__}")
        return self._builder.build(metrics)

    def stop(self) -> None:
        """End the trainable (runs ``cleanup`` once)."""
        if not self._stopped:
            self._stopped = True
            self.cleanup()

    @property
    def iteration(self) -> int:
        return self._builder.iteration

    training_iteration = iteration

    @property
    def trial_id(self) -> str:
        return self._trial_id

    @property
    def trial_name(self) -> str:
        return self._trial_name

    @property
    def logdir(self) -> str | None:
        return self._logdir

    trial_dir = logdir


def validate_trainable(trainable: Any) -> None:
    if inspect.isclass(trainable):
        if not issubclass(trainable, Trainable):
            raise TypeError(f"a class trainable must subclass beamlet.tune.Trainable, got "
                            f"{trainable.__name__}")
        return
    if not callable(trainable):
        raise TypeError(f"a trainable must be a function or a tune.Trainable subclass, got "
                        f"{type(trainable).__name__}")


def trainable_name(trainable: Any) -> str:
    name = getattr(trainable, "__name__", None) or type(trainable).__name__
    return "lambda" if name == "<lambda>" else name


def wants_reporter(fn: Any) -> bool:
    """True for the seed's ``fn(config, reporter)``; False for ``fn(config)``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2:
        second = positional[1]
        return second.default is inspect.Parameter.empty or second.name == "reporter"
    return False


def register_trainable(name: str, trainable: Any) -> None:
    """Make `trainable` known as `name`, for ``run_experiments({... 'run': name})``
    and ``tune.run(name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a trainable's name must be a non-empty string, got {name!r}")
    validate_trainable(trainable)
    _registry[name] = trainable


def is_registered(name: str) -> bool:
    return name in _registry


def get_trainable(name: str) -> Any:
    try:
        return _registry[name]
    except KeyError:
        provided = _plugin_trainables()
        if name in provided:
            return provided[name]
        known = ", ".join(sorted({*_registry, *provided})) or "none"
        raise ValueError(f"unknown trainable {name!r}: register it first with "
                         f"register_trainable({name!r}, fn); registered: {known}") from None


def _plugin_trainables() -> dict:
    """Trainables provided by plugins (hook ``beamlet_tune_trainables``), e.g.
    beamlet.rl's algorithms by name."""
    from beamlet.core import plugins
    merged: dict = {}
    for result in plugins.manager().hook.beamlet_tune_trainables():
        merged.update(result or {})
    return merged

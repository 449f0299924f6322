"""Stoppers: when a trial, or the whole experiment, should stop.

``stop`` may be a dict (a trial stops at the first result in which any
metric is ``>=`` its value), a function ``(trial_id, result) -> bool``, or a
:class:`Stopper`. Dict criteria are also checked inside the trial itself, so
a trainable that loops forever ends at the first result that meets one.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .result import TRAINING_ITERATION

__all__ = ["Stopper", "NoopStopper", "DictStopper", "FunctionStopper",
           "MaximumIterationStopper", "TimeoutStopper", "CombinedStopper", "criteria_met",
           "make_stopper"]


def lookup(result: dict, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of metric `key` in `result`; ``a/b`` reads ``result['a']['b']``."""
    if key in result:
        return True, result[key]
    value: Any = result
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def criteria_met(criteria: dict, result: dict) -> bool:
    """True when any metric of `result` is ``>=`` its value in `criteria`.
    Metrics missing from `result` (``"a/b"`` reads ``result["a"]["b"]``) do not count."""
    for key, limit in criteria.items():
        found, value = lookup(result, key)
        if found and value is not None and value >= limit:
            return True
    return False


def missing_criteria(criteria: dict, result: dict) -> list[str]:
    return [key for key in criteria if not lookup(result, key)[0]]


class Stopper:
    """Decides, per result, whether a trial should stop; ``stop_all`` ends the experiment."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        raise NotImplementedError

    def stop_all(self) -> bool:
        return False


class NoopStopper(Stopper):
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False


class DictStopper(Stopper):
    """``{"metric": value, ...}``: stop at the first result where any metric is ``>=`` its value."""

    def __init__(self, criteria: dict):
        if not isinstance(criteria, dict):
            raise TypeError(f"stop criteria must be a dict, got {type(criteria).__name__}")
        for key, value in criteria.items():
            if not isinstance(key, str):
                raise TypeError(f"stop criteria names must be strings, got {key!r}")
            if isinstance(value, dict):
                raise TypeError(f"stop criterion {key!r} must be a value, not a dict")
        self.criteria = dict(criteria)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return criteria_met(self.criteria, result)

    def __repr__(self) -> str:
        return f"DictStopper({self.criteria!r})"


class FunctionStopper(Stopper):
    """Wraps ``fn(trial_id, result) -> bool``."""

    def __init__(self, fn: Callable[[str, dict], bool]):
        if not callable(fn):
            raise TypeError(f"a stop function must be callable, got {fn!r:.80}")
        self._fn = fn

    def __call__(self, trial_id: str, result: dict) -> bool:
        return bool(self._fn(trial_id, result))


class MaximumIterationStopper(Stopper):
    """Stop each trial after `max_iter` results."""

    def __init__(self, max_iter: int):
        self.max_iter = max_iter

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result.get(TRAINING_ITERATION, 0) >= self.max_iter


class TimeoutStopper(Stopper):
    """End the whole experiment once `timeout` seconds have passed since it was made."""

    def __init__(self, timeout: float):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self.timeout = float(timeout)
        self._deadline = time.monotonic() + self.timeout

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return time.monotonic() >= self._deadline


class CombinedStopper(Stopper):
    """Stops when any of its stoppers does."""

    def __init__(self, *stoppers: Stopper):
        self._stoppers = [s for s in stoppers if s is not None]

    def __call__(self, trial_id: str, result: dict) -> bool:
        return any(s(trial_id, result) for s in self._stoppers)

    def stop_all(self) -> bool:
        return any(s.stop_all() for s in self._stoppers)


def make_stopper(stop: Any) -> tuple[Stopper, dict]:
    """``(stopper for the driver, dict criteria the trial checks itself)`` from a
    ``stop`` argument: None, a dict, a Stopper or a function."""
    if stop is None:
        return NoopStopper(), {}
    if isinstance(stop, dict):
        stopper = DictStopper(stop)
        return stopper, stopper.criteria
    if isinstance(stop, Stopper):
        return stop, {}
    if callable(stop):
        return FunctionStopper(stop), {}
    raise TypeError(f"stop must be a dict, a function (trial_id, result) -> bool or a "
                    f"tune.Stopper, got {type(stop).__name__}")

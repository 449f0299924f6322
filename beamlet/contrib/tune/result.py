"""What a trial's result holds besides the user's metrics, and how results are
written down (flattened for CSV and TensorBoard, JSON-safe for ``result.json``).

Every result gets ``training_iteration`` (1 for the first report),
``time_this_iter_s``, ``time_total_s``, ``timestamp``, ``date``,
``trial_id``, ``pid``, ``hostname``, ``config`` and ``done``;
``timesteps_total`` when the trainable reports it (or reports
``timesteps_this_iter``, which is summed), likewise ``episodes_total``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import socket
import time
from typing import Any

TRAINING_ITERATION = "training_iteration"
TIME_THIS_ITER_S = "time_this_iter_s"
TIME_TOTAL_S = "time_total_s"
TIMESTEPS_TOTAL = "timesteps_total"
TIMESTEPS_THIS_ITER = "timesteps_this_iter"
EPISODES_TOTAL = "episodes_total"
EPISODES_THIS_ITER = "episodes_this_iter"
DONE = "done"
TRIAL_ID = "trial_id"
CONFIG = "config"

# Fields every result gets from the framework (not the user's metrics).
AUTO_FIELDS = frozenset({
    TRAINING_ITERATION, TIME_THIS_ITER_S, TIME_TOTAL_S, DONE, TRIAL_ID, CONFIG, "timestamp",
    "date", "pid", "hostname", "experiment_tag", "time_since_restore",
    "iterations_since_restore", TIMESTEPS_THIS_ITER, EPISODES_THIS_ITER,
})

__all__ = ["ResultBuilder", "flatten_dict", "to_json", "json_default", "is_number",
           "AUTO_FIELDS"]


class ResultBuilder:
    """Adds the framework's fields to each report of one trial (runs in the trial)."""

    def __init__(self, trial_id: str, config: dict, experiment_tag: str = ""):
        self.trial_id = trial_id
        self.config = config
        self.experiment_tag = experiment_tag
        self.iteration = 0
        self.time_total = 0.0
        self.timesteps_total: float | None = None
        self.episodes_total: float | None = None
        self._restored_iteration = 0
        self._restored_time = 0.0
        self._iter_start = time.time()
        self._hostname = socket.gethostname()

    def state(self) -> dict:
        """What a checkpoint keeps of the counters, for :meth:`restore`."""
        return {"iteration": self.iteration, "time_total": self.time_total,
                "timesteps_total": self.timesteps_total, "episodes_total": self.episodes_total}

    def restore(self, state: dict) -> None:
        """Go on counting from a checkpoint's counters (``training_iteration``
        continues; ``iterations_since_restore`` starts again)."""
        self.iteration = int(state.get("iteration", 0))
        self.time_total = float(state.get("time_total", 0.0))
        self.timesteps_total = state.get("timesteps_total")
        self.episodes_total = state.get("episodes_total")
        self._restored_iteration = self.iteration
        self._restored_time = self.time_total

    def restart_clock(self) -> None:
        """Start timing the next iteration now (after waiting for the driver)."""
        self._iter_start = time.time()

    def build(self, metrics: dict) -> dict:
        if not isinstance(metrics, dict):
            raise TypeError(f"a result must be a dict of metrics, got {type(metrics).__name__}")
        for key in metrics:
            if not isinstance(key, str):
                raise TypeError(f"metric names must be strings, got {key!r}")
        now = time.time()
        result = dict(metrics)
        self.iteration += 1
        result.setdefault(TIME_THIS_ITER_S, now - self._iter_start)
        self.time_total += result[TIME_THIS_ITER_S]
        if TIMESTEPS_THIS_ITER in result and TIMESTEPS_TOTAL not in result:
            self.timesteps_total = (self.timesteps_total or 0) + result[TIMESTEPS_THIS_ITER]
            result[TIMESTEPS_TOTAL] = self.timesteps_total
        elif TIMESTEPS_TOTAL in result:
            self.timesteps_total = result[TIMESTEPS_TOTAL]
        if EPISODES_THIS_ITER in result and EPISODES_TOTAL not in result:
            self.episodes_total = (self.episodes_total or 0) + result[EPISODES_THIS_ITER]
            result[EPISODES_TOTAL] = self.episodes_total
        result[DONE] = bool(result.get(DONE, False))
        result.update({
            TRAINING_ITERATION: self.iteration,
            TRIAL_ID: self.trial_id,
            "date": time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now)),
            "timestamp": int(now),
            TIME_TOTAL_S: self.time_total,
            "pid": os.getpid(),
            "hostname": self._hostname,
            CONFIG: self.config,
            "time_since_restore": self.time_total - self._restored_time,
            "iterations_since_restore": self.iteration - self._restored_iteration,
        })
        if self.experiment_tag:
            result["experiment_tag"] = self.experiment_tag
        self._iter_start = now
        return result


def flatten_dict(value: dict, delimiter: str = "/", prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    out = {}
    for key, v in value.items():
        name = f"{prefix}{delimiter}{key}" if prefix else str(key)
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, delimiter, name))
        else:
            out[name] = v
    return out


def json_default(value: Any) -> Any:
    """Make numpy values and other objects JSON-safe (strings as a last resort)."""
    try:
        import numpy as np
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def to_json(value: Any) -> str:
    return json.dumps(value, default=json_default)


def is_number(value: Any) -> bool:
    """A real number (numpy scalars too), not a bool."""
    kind = type(value)
    if kind is float or kind is int:  # (the common case, first: called per metric per result)
        return True
    # numpy registers its integer and floating scalars as numbers.Real, not its
    # bool_. (Not by peeking at sys.modules["numpy"]: the loggers' thread may be
    # importing numpy right then, and a half-imported module lacks its names.)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(float(value))

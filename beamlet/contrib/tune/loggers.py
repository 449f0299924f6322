"""Callbacks and loggers: what happens in the driver as trials start, report and end.

Every trial directory gets (with the default loggers ``json``, ``csv``,
``tbx``):

* ``params.json`` (and ``params.pkl``): the trial's config;
* ``result.json``: one JSON line per result;
* ``progress.csv``: one row per result (the first result's columns,
  nested metrics flattened as ``a/b``, without the config);
* a TensorBoard event file (``events.out.tfevents.*``), one event per result
  (written by :mod:`.tb_events`: TensorBoard reads it, nothing is needed to
  write it).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any

import cloudpickle

from .plugins import hookimpl
from .result import TRAINING_ITERATION, flatten_dict, is_number, json_default, to_json
from .tb_events import EventFileWriter

__all__ = ["Callback", "LoggerCallback", "JsonLoggerCallback", "CSVLoggerCallback",
           "TBXLoggerCallback"]


def _open_in(trial, name: str, mode: str, **kwargs):
    """``open(trial.path/name)``, making the trial's directory if it is not
    there yet (the runner has made it, so this is one system call per file)."""
    path = os.path.join(trial.path, name)
    try:
        return open(path, mode, **kwargs)
    except FileNotFoundError:
        os.makedirs(trial.path, exist_ok=True)
        return open(path, mode, **kwargs)


class Callback:
    """Hooks called in the driver. ``iteration`` counts the runner's loop steps,
    ``trials`` is the list of all trials; more keyword arguments may come."""

    def setup(self, **info) -> None:
        """Called once before the first trial starts."""

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        pass

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info) -> None:
        pass

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        pass

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        pass

    def on_experiment_end(self, trials: list, **info) -> None:
        pass


class LoggerCallback(Callback):
    """A callback that writes each trial's results somewhere: implement
    ``log_trial_start``, ``log_trial_result`` and ``log_trial_end``."""

    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass

    def on_trial_start(self, iteration, trials, trial, **info):
        self.log_trial_start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.log_trial_result(iteration, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.log_trial_end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log_trial_end(trial, failed=True)


class JsonLoggerCallback(LoggerCallback):
    """``params.json``, ``params.pkl`` and ``result.json`` (one line per result)."""

    def __init__(self):
        self._files: dict[Any, Any] = {}

    def log_trial_start(self, trial) -> None:
        with _open_in(trial, "params.json", "w") as f:
            f.write(json.dumps(trial.config, indent=2, sort_keys=True, default=json_default))
        try:
            data = cloudpickle.dumps(trial.config)
        except Exception:  # noqa: BLE001 - the JSON copy is the one that matters
            data = None
        if data is not None:
            with _open_in(trial, "params.pkl", "wb") as f:
                f.write(data)
        self._files[trial] = _open_in(trial, "result.json", "a")

    def log_trial_result(self, iteration, trial, result) -> None:
        f = self._files.get(trial)
        if f is None:
            return
        f.write(to_json(result) + "\n")
        f.flush()

    def log_trial_end(self, trial, failed=False) -> None:
        f = self._files.pop(trial, None)
        if f is not None:
            f.close()

    def on_experiment_end(self, trials, **info):
        for f in self._files.values():
            f.close()
        self._files.clear()


class CSVLoggerCallback(LoggerCallback):
    """``progress.csv``: the columns of the trial's first result."""

    def __init__(self):
        self._files: dict[Any, tuple] = {}

    def log_trial_start(self, trial) -> None:
        self._files[trial] = (_open_in(trial, "progress.csv", "a", newline=""), None)

    def log_trial_result(self, iteration, trial, result) -> None:
        entry = self._files.get(trial)
        if entry is None:
            return
        f, writer = entry
        row = flatten_dict({k: v for k, v in result.items() if k != "config"})
        if writer is None:
            writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            self._files[trial] = (f, writer)
        writer.writerow({k: (json.dumps(v, default=json_default)
                             if isinstance(v, (list, dict)) else v) for k, v in row.items()})
        f.flush()

    def log_trial_end(self, trial, failed=False) -> None:
        entry = self._files.pop(trial, None)
        if entry is not None:
            entry[0].close()

    def on_experiment_end(self, trials, **info):
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


# Fields that are not worth a TensorBoard curve.
_TB_SKIP = frozenset({"config", "pid", "timestamp", "done", TRAINING_ITERATION,
                      "time_since_restore", "iterations_since_restore"})


class TBXLoggerCallback(LoggerCallback):
    """TensorBoard event files in each trial directory, scalars under
    ``beamlet/tune/<metric>`` by ``training_iteration``, one event per result
    (see :mod:`.tb_events`)."""

    def __init__(self):
        self._writers: dict[Any, Any] = {}

    def log_trial_start(self, trial) -> None:
        self._writers[trial] = EventFileWriter(trial.path)

    def log_trial_result(self, iteration, trial, result) -> None:
        writer = self._writers.get(trial)
        if writer is None:
            return
        step = result.get(TRAINING_ITERATION, iteration)
        flat = flatten_dict({k: v for k, v in result.items() if k not in _TB_SKIP})
        writer.add_scalars(step, [(f"beamlet/tune/{name}", float(value))
                                  for name, value in flat.items() if is_number(value)])

    def log_trial_end(self, trial, failed=False) -> None:
        writer = self._writers.pop(trial, None)
        if writer is not None:
            writer.close()

    def on_experiment_end(self, trials, **info):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


@hookimpl
def beamlet_tune_loggers():
    return {"json": JsonLoggerCallback, "csv": CSVLoggerCallback, "tbx": TBXLoggerCallback}

"""Callbacks and loggers: what happens in the driver as trials start, report and end.

Every trial directory gets (with the default loggers ``json``, ``csv``,
``tbx``):

* ``params.json`` (and ``params.pkl``): the trial's config;
* ``result.json``: one JSON line per result;
* ``progress.csv``: one row per result (the first result's columns,
  nested metrics flattened as ``a/b``, without the config);
* a TensorBoard event file (``events.out.tfevents.*``), one event per result,
  when ``tensorboardX`` is installed (the optional extra ``beamlet[tune]``);
  skipped otherwise.
"""
from __future__ import annotations

import csv
import json
import os
import queue
import threading
import time
import warnings
from typing import Any

import cloudpickle

from .plugins import hookimpl
from .result import TRAINING_ITERATION, flatten_dict, is_number, json_default, to_json

__all__ = ["Callback", "LoggerCallback", "JsonLoggerCallback", "CSVLoggerCallback",
           "TBXLoggerCallback", "BackgroundLoggers"]


def _in_trial_dir(trial, make, *args, **kwargs):
    """``make(*args, **kwargs)``, which creates a file in the trial's directory,
    making that directory first if it is not there yet (the trial's actor
    usually has, so this costs no ``makedirs`` per file)."""
    try:
        return make(*args, **kwargs)
    except FileNotFoundError:
        os.makedirs(trial.path, exist_ok=True)
        return make(*args, **kwargs)


def _open_in(trial, name: str, mode: str, **kwargs):
    """``open(trial.path/name)``, making the trial's directory if need be."""
    return _in_trial_dir(trial, open, os.path.join(trial.path, name), mode, **kwargs)


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


class _FlushingLogger(LoggerCallback):
    """A logger of open files that writes each row through at once
    (``flush_each_result``), or leaves that to the caller's :meth:`flush`
    (`BackgroundLoggers` calls it a moment after a row: a burst of results
    costs one write per file, not one per row)."""

    #: Write each row through when it is logged (BackgroundLoggers clears it).
    flush_each_result = True

    def flush(self) -> None:
        """Write through what was logged to the open files."""


def _flat_row(result: dict, skip: frozenset) -> dict:
    """`result` with its nested metrics flattened (``a/b``) and the keys in
    `skip` left out; or, when none is nested, `result` itself, keys in
    `skip` included (the caller leaves them out: no copy per row)."""
    for key, value in result.items():
        if isinstance(value, dict) and value and key not in skip:
            return flatten_dict({k: v for k, v in result.items() if k not in skip})
    return result


_CSV_SKIP = frozenset({"config"})


class JsonLoggerCallback(_FlushingLogger):
    """``params.json``, ``params.pkl`` and ``result.json`` (one line per result)."""

    def __init__(self):
        self._files: dict[Any, Any] = {}

    def trial_files(self, trial) -> list[str]:
        """The files `log_trial_start` creates in the trial's directory."""
        return ["params.json", "params.pkl", "result.json"]

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
        if self.flush_each_result:
            f.flush()

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def log_trial_end(self, trial, failed=False) -> None:
        f = self._files.pop(trial, None)
        if f is not None:
            f.close()

    def on_experiment_end(self, trials, **info):
        for f in self._files.values():
            f.close()
        self._files.clear()


class CSVLoggerCallback(_FlushingLogger):
    """``progress.csv``: the columns of the trial's first result."""

    def __init__(self):
        self._files: dict[Any, tuple] = {}

    def trial_files(self, trial) -> list[str]:
        return ["progress.csv"]

    def log_trial_start(self, trial) -> None:
        self._files[trial] = (_open_in(trial, "progress.csv", "a", newline=""), None)

    def log_trial_result(self, iteration, trial, result) -> None:
        entry = self._files.get(trial)
        if entry is None:
            return
        f, columns = entry
        row = _flat_row(result, _CSV_SKIP)
        if columns is None:
            columns = (csv.writer(f), [k for k in row if k not in _CSV_SKIP])
            if f.tell() == 0:
                columns[0].writerow(columns[1])
            self._files[trial] = (f, columns)
        writer, fields = columns
        # (a csv.DictWriter's row, restval "" and extra keys ignored, without its checks)
        get = row.get
        values = [get(k, "") for k in fields]
        for i, v in enumerate(values):
            if isinstance(v, (list, dict)):
                values[i] = json.dumps(v, default=json_default)
        writer.writerow(values)
        if self.flush_each_result:
            f.flush()

    def flush(self) -> None:
        for f, _ in self._files.values():
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
    (see :mod:`.tb_events`). Does nothing when ``tensorboardX`` is not installed.
    Run by `BackgroundLoggers`, so importing tensorboardX and its writer's fsync
    at each flush and close cost the runner's loop nothing."""

    def __init__(self):
        self._writers: dict[Any, Any] = {}
        self._names: dict[Any, str] = {}  # trial -> its event file's name, chosen ahead
        self._unavailable = False

    def trial_files(self, trial) -> list[str]:
        from .tb_events import available, event_file_name
        if self._unavailable or not available():
            return []
        name = self._names[trial] = event_file_name()
        return [name]

    def log_trial_start(self, trial) -> None:
        if self._unavailable:
            return
        from .tb_events import EventFileWriter
        name = self._names.pop(trial, None)
        try:
            self._writers[trial] = _in_trial_dir(trial, EventFileWriter, trial.path, name)
        except ImportError:  # optional: without tensorboardX there are no event files
            self._unavailable = True

    def log_trial_result(self, iteration, trial, result) -> None:
        writer = self._writers.get(trial)
        if writer is None:
            return
        step = result.get(TRAINING_ITERATION, iteration)
        writer.add_scalars(step, [(f"beamlet/tune/{name}", float(value))
                                  for name, value in _flat_row(result, _TB_SKIP).items()
                                  if name not in _TB_SKIP and is_number(value)])

    def log_trial_end(self, trial, failed=False) -> None:
        writer = self._writers.pop(trial, None)
        if writer is not None:
            writer.close()

    def on_experiment_end(self, trials, **info):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


_CLOSE_TIMEOUT_S = 120.0
#: How long a row of result.json / progress.csv may wait in its file's buffer
#: (BackgroundLoggers): rows that come in a burst go out in one write.
_FLUSH_DELAY_S = 0.1


class BackgroundLoggers:
    """Runs the hooks of the built-in loggers (JSON, CSV, TensorBoard) among
    `callbacks` on a thread of their own, in the order they were called.

    Creating a trial's files waits on the disk (about half a millisecond per
    file here, more when it is busy, five files per trial): the runner's loop
    goes on meanwhile, and the thread mostly runs while the loop waits for
    results. Files lag the loop by what is queued (milliseconds), and the
    rows of result.json and progress.csv by at most ``_FLUSH_DELAY_S`` more
    (a trial's rows are written through when it ends, else those that came
    within that delay in one write per file); everything is written by
    :meth:`close`. A driver killed before that may lose the
    last rows; ``resume`` does not read them (it reads the experiment's state
    log, which the runner writes itself). An error in a logger is raised in
    the runner's thread, at its next call or at :meth:`close`."""

    BUILTIN = (JsonLoggerCallback, CSVLoggerCallback, TBXLoggerCallback)

    def __init__(self, callbacks: list):
        #: The callbacks this runs (the others are the caller's to call).
        self.callbacks = [cb for cb in callbacks if type(cb) in self.BUILTIN]
        self._flushing = [cb for cb in self.callbacks if isinstance(cb, _FlushingLogger)]
        for cb in self._flushing:
            cb.flush_each_result = False  # (the thread flushes them: see _run)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def trial_files(self, trial) -> list[str]:
        """The files the loggers will create in `trial`'s directory when it
        starts. The trial's actor creates them (empty) with the directory:
        creating a file costs this VM's kernel about 0.2 ms, which the
        loggers' thread (every trial's logs go through it) then need not pay."""
        return [name for cb in self.callbacks for name in cb.trial_files(trial)]

    def call(self, hook: str, kwargs: dict) -> None:
        """Queue ``hook(**kwargs)`` of every callback (a result is copied: the
        caller may change the dict afterwards)."""
        self._raise_error()
        if not self.callbacks:
            return
        if "result" in kwargs:
            kwargs["result"] = dict(kwargs["result"])
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="beamlet-tune-loggers",
                                            daemon=True)
            self._thread.start()
        self._queue.put((hook, kwargs))

    def _run(self) -> None:
        get = self._queue.get
        due = None  # when rows written since the last flush are to be written through
        while True:
            if due is None:
                item = get()
            else:
                try:
                    item = get(timeout=max(0.0, due - time.monotonic()))
                except queue.Empty:
                    item = False
                if item is False or time.monotonic() >= due:
                    due = None
                    self._flush()
                    if item is False:
                        continue
            if item is None:
                return
            hook, kwargs = item
            if due is None and hook == "on_trial_result" and self._flushing:
                due = time.monotonic() + _FLUSH_DELAY_S
            if self._error is not None and hook != "on_experiment_end":
                continue  # (the runner raises it; the rest is dropped, but files are closed)
            for cb in self.callbacks:
                try:
                    getattr(cb, hook)(**kwargs)
                except BaseException as err:  # noqa: BLE001 - raised in the runner's thread
                    if self._error is None:
                        self._error = err

    def _flush(self) -> None:
        for cb in self._flushing:
            try:
                cb.flush()
            except BaseException as err:  # noqa: BLE001 - as for a hook
                if self._error is None:
                    self._error = err

    def close(self, trials: list) -> None:
        """Run what is queued and the loggers' ``on_experiment_end``; return once
        they have (at most ``_CLOSE_TIMEOUT_S``: a warning then)."""
        if self._thread is None:
            for cb in self.callbacks:
                cb.on_experiment_end(trials=trials)
        else:
            thread, self._thread = self._thread, None
            self._queue.put(("on_experiment_end", {"trials": trials}))
            self._queue.put(None)
            thread.join(_CLOSE_TIMEOUT_S)
            if thread.is_alive():
                warnings.warn(f"the Tune loggers did not finish writing within "
                              f"{_CLOSE_TIMEOUT_S:g} s; the logs may be incomplete", stacklevel=2)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@hookimpl
def beamlet_tune_loggers():
    return {"json": JsonLoggerCallback, "csv": CSVLoggerCallback, "tbx": TBXLoggerCallback}

"""Trial: one run of a trainable with one config, as the driver sees it."""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from typing import Any

from .result import flatten_dict, is_number

__all__ = ["Trial", "parse_resources", "resources_to_actor_options"]

PENDING = "PENDING"
RUNNING = "RUNNING"
PAUSED = "PAUSED"
TERMINATED = "TERMINATED"
ERROR = "ERROR"

_MAX_TAG_LEN = 100
#: A trial's metric_analysis takes in its latest results at least this often.
_FOLD_EVERY = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+-]+")


def parse_resources(spec: Any) -> dict[str, float]:
    """A trial's resource request as beamlet names them: ``{"CPU": 1.0, "GPU": 0.5, ...}``.

    Takes the seed's ``{"cpu": 1, "gpu": 0}`` (also ``CPU``/``GPU``), with
    ``memory``, ``extra_cpu``/``extra_gpu`` (added), ``custom_resources``
    (a dict) and any other key as a custom resource. None means one CPU."""
    if spec is None:
        return {"CPU": 1.0}
    if not isinstance(spec, dict):
        raise TypeError(f"trial resources must be a dict like {{'cpu': 1, 'gpu': 0}}, got "
                        f"{type(spec).__name__}")
    out: dict[str, float] = {}

    def add(name: str, amount: Any, what: str) -> None:
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0 \
                or not math.isfinite(amount):
            raise ValueError(f"trial resource {what!r} must be a number >= 0, got {amount!r}")
        if amount:
            out[name] = out.get(name, 0.0) + float(amount)

    for key, amount in spec.items():
        low = key.lower() if isinstance(key, str) else key
        if low in ("cpu", "extra_cpu"):
            add("CPU", amount, key)
        elif low in ("gpu", "extra_gpu"):
            add("GPU", amount, key)
        elif low == "memory":
            add("memory", amount, key)
        elif low == "custom_resources":
            if not isinstance(amount, dict):
                raise TypeError(f"custom_resources must be a dict, got {amount!r}")
            for name, value in amount.items():
                add(name, value, name)
        elif isinstance(key, str) and key:
            add(key, amount, key)
        else:
            raise ValueError(f"invalid trial resource name {key!r}")
    if "cpu" not in {k.lower() for k in spec if isinstance(k, str)} and "CPU" not in out:
        out["CPU"] = 1.0
    return out


def resources_to_actor_options(resources: dict[str, float]) -> dict:
    """The ``.options(...)`` of the trial's actor."""
    opts: dict[str, Any] = {"num_cpus": resources.get("CPU", 0.0)}
    if resources.get("GPU"):
        opts["num_gpus"] = resources["GPU"]
    if resources.get("memory"):
        opts["memory"] = resources["memory"]
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        opts["resources"] = custom
    return opts


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_")


class Trial:
    """A trial: its config, resources, status and results so far.

    ``status`` is PENDING, RUNNING, TERMINATED (stopped by a criterion or a
    scheduler, or the trainable returned) or ERROR (it raised; ``error_msg``
    has the traceback, ``error_file`` the file holding it). ``path`` is the
    trial's directory, ``last_result`` its latest result (``{}`` before one)."""

    def __init__(self, trainable_name: str, config: dict, trial_id: str, *,
                 experiment_path: str, experiment_name: str = "", index: int = 0,
                 evaluated_params: dict | None = None, experiment_tag: str = "",
                 resources: dict[str, float] | None = None, stop_criteria: dict | None = None,
                 stopper=None, trainable=None, trial_name_creator=None,
                 trial_dirname_creator=None, max_failures: int = 0,
                 checkpoint_freq: int = 0, checkpoint_at_end: bool = False,
                 keep_checkpoints_num: int | None = None):
        self.trainable_name = trainable_name
        self.config = config
        self.trial_id = trial_id
        self.experiment_name = experiment_name
        self.experiment_path = experiment_path
        self.index = index
        self.evaluated_params = dict(evaluated_params or {})
        self.experiment_tag = experiment_tag or str(index)
        self.resources = dict(resources) if resources is not None else {"CPU": 1.0}
        self.stop_criteria = dict(stop_criteria or {})
        self.status = PENDING
        self.last_result: dict = {}
        self.metric_analysis = {}
        self.num_results = 0
        self.error_msg: str | None = None
        self.error_file: str | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self._last_values: dict[str, list] = {}
        self.checkpoint: str | None = None
        self.checkpoints: list[str] = []
        self.restore_path: str | None = None
        self.num_failures = 0
        self.max_failures = max_failures
        self.checkpoint_freq = checkpoint_freq
        self.checkpoint_at_end = checkpoint_at_end
        self.keep_checkpoints_num = keep_checkpoints_num
        self.started = False
        # Driver-side state, not part of the trial's record.
        self._stopper = stopper
        self._trainable = trainable
        self._actor = None
        self._stop_requested = False
        self._experiment = None
        self._steps: list = []  # its step refs the runner waits for, in order
        self.custom_trial_name = trial_name_creator(self) if trial_name_creator else None
        dirname = trial_dirname_creator(self) if trial_dirname_creator else self._default_dirname()
        self.path = os.path.join(experiment_path, dirname)

    def _default_dirname(self) -> str:
        tag = _safe(self.experiment_tag)[:_MAX_TAG_LEN]
        date = time.strftime("%Y-%m-%d_%H-%M-%S")
        return f"{_safe(self.trainable_name)}_{self.trial_id}_{tag}_{date}"

    # -- names and paths ---------------------------------------------------------
    @property
    def trial_name(self) -> str:
        return self.custom_trial_name or f"{self.trainable_name}_{self.trial_id}"

    @property
    def logdir(self) -> str:
        return self.path

    local_path = logdir

    @property
    def local_dir(self) -> str:
        return self.experiment_path

    def __str__(self) -> str:
        return self.trial_name

    def __repr__(self) -> str:
        return f"Trial({self.trial_name}, status={self.status})"

    # -- state -------------------------------------------------------------------
    def is_finished(self) -> bool:
        return self.status in (TERMINATED, ERROR)

    def on_checkpoint(self, path: str) -> None:
        """The trial saved a checkpoint at `path`: it becomes the latest; beyond
        ``keep_checkpoints_num`` the oldest are deleted."""
        if path in self.checkpoints:
            self.checkpoints.remove(path)
        self.checkpoints.append(path)
        self.checkpoint = path
        keep = self.keep_checkpoints_num
        while keep and len(self.checkpoints) > keep:
            old = self.checkpoints.pop(0)
            if old != self.restore_path:
                shutil.rmtree(old, ignore_errors=True)

    def take_restore_path(self) -> str | None:
        """Where the next start of this trial restores from: a checkpoint set
        for it (PBT's exploit) or else its latest; the former is used once."""
        path, self.restore_path = self.restore_path, None
        return path or self.checkpoint

    def update_last_result(self, result: dict) -> None:
        self.last_result = result
        self.num_results += 1
        # ``metric_analysis`` is brought up to date when read, or every
        # _FOLD_EVERY results: per result only its items are kept (a copy: the
        # caller may change the dict afterwards).
        pending = self._pending
        pending.append(tuple(result.items()))
        if len(pending) >= _FOLD_EVERY:
            self._fold()

    @property
    def metric_analysis(self) -> dict[str, dict[str, float]]:
        """Per numeric metric of the results (nested ones as ``a/b``): its
        ``max``, ``min``, ``avg``, ``last``, ``last-5-avg``, ``last-10-avg``."""
        if self._pending:
            self._fold()
        return self._metric_analysis

    @metric_analysis.setter
    def metric_analysis(self, value: dict) -> None:
        self._metric_analysis = value
        self._pending = []

    def _fold(self) -> None:
        """Add the results kept by update_last_result to ``metric_analysis``,
        as if each had been added when it came."""
        pending, self._pending = self._pending, []
        columns: dict[str, list] = {}  # metric -> its values, in order
        for items in pending:
            for name, value in items:
                kind = type(value)
                if kind is float or kind is int:
                    pass
                elif kind is str or kind is bool or value is None:
                    continue
                elif kind is dict:
                    if name == "config":
                        continue
                    for flat_name, flat_value in flatten_dict(value, prefix=name).items():
                        if is_number(flat_value):
                            columns.setdefault(flat_name, []).append(float(flat_value))
                    continue
                elif name == "config" or not is_number(value):
                    continue
                columns.setdefault(name, []).append(float(value))
        analysis, last_values = self._metric_analysis, self._last_values
        for name, values in columns.items():
            stats = analysis.get(name)
            if stats is None:
                first = values[0]
                stats = analysis[name] = {"max": first, "min": first, "avg": first,
                                          "last": first, "_n": 1, "last-5-avg": first,
                                          "last-10-avg": first}
                last_values[name] = [first]
                values = values[1:]
                if not values:
                    continue
            # (max/min as comparing one value at a time would: NaN never replaces)
            stats["max"] = max(stats["max"], *values)
            stats["min"] = min(stats["min"], *values)
            n, avg = stats["_n"], stats["avg"]
            for value in values:
                n += 1
                avg += (value - avg) / n
            stats["avg"], stats["_n"], stats["last"] = avg, n, values[-1]
            recent = last_values.get(name) or []  # (a restored trial: its analysis without them)
            recent = last_values[name] = (recent + values)[-10:]
            last5 = recent[-5:]
            stats["last-5-avg"] = sum(last5) / len(last5)
            stats["last-10-avg"] = sum(recent) / len(recent)

    def to_record(self) -> dict:
        """The trial as plain data (for ``experiment_state.json``)."""
        return {"trial_id": self.trial_id, "trial_name": self.trial_name,
                "trainable_name": self.trainable_name, "status": self.status,
                "config": self.config, "evaluated_params": self.evaluated_params,
                "experiment_tag": self.experiment_tag, "path": self.path,
                "resources": self.resources, "last_result": self.last_result,
                "metric_analysis": self.metric_analysis, "num_results": self.num_results,
                "error_msg": self.error_msg, "error_file": self.error_file,
                "start_time": self.start_time, "end_time": self.end_time,
                "checkpoint": self.checkpoint, "restore_path": self.restore_path,
                "num_failures": self.num_failures}

    @classmethod
    def from_record(cls, record: dict, experiment_path: str) -> "Trial":
        trial = cls.__new__(cls)
        trial.trainable_name = record.get("trainable_name", "")
        trial.config = record.get("config", {})
        trial.trial_id = record["trial_id"]
        trial.experiment_name = os.path.basename(experiment_path.rstrip(os.sep))
        trial.experiment_path = experiment_path
        trial.index = 0
        trial.evaluated_params = record.get("evaluated_params", {})
        trial.experiment_tag = record.get("experiment_tag", "")
        trial.resources = record.get("resources", {})
        trial.stop_criteria = {}
        trial.status = record.get("status", TERMINATED)
        trial.last_result = record.get("last_result") or {}
        trial.metric_analysis = record.get("metric_analysis") or {}
        trial.num_results = record.get("num_results", 0)
        trial.error_msg = record.get("error_msg")
        trial.error_file = record.get("error_file")
        trial.start_time = record.get("start_time")
        trial.end_time = record.get("end_time")
        trial._last_values = {}
        trial.checkpoint = record.get("checkpoint")
        trial.checkpoints = [trial.checkpoint] if trial.checkpoint else []
        trial.restore_path = None
        trial.num_failures = record.get("num_failures", 0)
        trial.max_failures = 0
        trial.checkpoint_freq = 0
        trial.checkpoint_at_end = False
        trial.keep_checkpoints_num = None
        trial.started = False
        trial._stopper = None
        trial._trainable = None
        trial._actor = None
        trial._stop_requested = False
        trial._experiment = None
        trial._steps = []
        name = record.get("trial_name")
        trial.custom_trial_name = name if name != f"{trial.trainable_name}_{trial.trial_id}" else None
        trial.path = record.get("path") or experiment_path
        return trial

    def __getstate__(self) -> dict:
        if self._pending:
            self._fold()
        state = dict(self.__dict__)
        state["_stopper"] = None
        state["_trainable"] = None
        state["_actor"] = None
        state["_experiment"] = None
        state["_steps"] = []
        return state

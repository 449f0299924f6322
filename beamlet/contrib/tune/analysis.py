"""ExperimentAnalysis: what ``tune.run`` returns, or what reads a finished
experiment's directory back (``ExperimentAnalysis("~/beamlet_results/exp")``).

``best_config`` / ``best_result`` / ``best_trial`` use the ``metric`` and
``mode`` given to ``tune.run``; ``get_best_config(metric, mode)`` and
``get_best_trial(metric, mode, scope)`` take them explicitly. ``scope`` is
``"last"`` (the trial's last value, the default), ``"avg"``,
``"last-5-avg"``, ``"last-10-avg"`` or ``"all"`` (its best value at any
iteration). Nested metrics are named ``"a/b"``. ``results_df`` and the other
DataFrames need pandas, which beamlet does not depend on.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

from .result import flatten_dict, is_number
from .experiment_state import STATE_LOG, ExperimentStateLog
from .trial import ERROR, TERMINATED, Trial

__all__ = ["ExperimentAnalysis"]

_SCOPES = ("last", "avg", "last-5-avg", "last-10-avg", "all")


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("this needs pandas, which beamlet does not install: "
                          "pip install pandas") from None
    return pandas


def _read_results(path: str) -> list[dict]:
    results = []
    try:
        with open(os.path.join(path, "result.json")) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        results.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by a crash
                        pass
    except OSError:
        pass
    return results


class ExperimentAnalysis:
    """The trials of an experiment and the best of them."""

    def __init__(self, experiment_checkpoint_path: str | None = None, *,
                 trials: list[Trial] | None = None, default_metric: str | None = None,
                 default_mode: str | None = None):
        if default_mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {default_mode!r}")
        self.default_metric = default_metric
        self.default_mode = default_mode
        if trials is None:
            if experiment_checkpoint_path is None:
                raise ValueError("ExperimentAnalysis needs an experiment directory or trials")
            path = os.path.abspath(os.path.expanduser(experiment_checkpoint_path))
            if not os.path.isdir(path):
                raise ValueError(f"no experiment directory at {path}")
            trials = self._load(path)
        else:
            path = (experiment_checkpoint_path or
                    (trials[0].experiment_path if trials else None))
        self.trials: list[Trial] = list(trials)
        self.experiment_path = path

    # -- loading ---------------------------------------------------------------
    @staticmethod
    def _load(path: str) -> list[Trial]:
        state_file = os.path.join(path, "experiment_state.json")
        log_file = os.path.join(path, STATE_LOG)
        # The final table, unless the log is newer: a run (or resume) going on, or
        # killed, in a directory where an earlier run had ended.
        if os.path.exists(state_file) and not (
                os.path.exists(log_file) and
                os.stat(log_file).st_mtime_ns > os.stat(state_file).st_mtime_ns):
            with open(state_file) as f:
                state = json.load(f)
            return [Trial.from_record(r, path) for r in state.get("trials", [])]
        records = ExperimentStateLog.read(path)  # a run still going, or killed
        if records:
            return [Trial.from_record(r, path) for r in records]
        trials = []
        for name in sorted(os.listdir(path)):
            trial_dir = os.path.join(path, name)
            params = os.path.join(trial_dir, "params.json")
            if not os.path.isfile(params):
                continue
            with open(params) as f:
                config = json.load(f)
            results = _read_results(trial_dir)
            last = results[-1] if results else {}
            error_file = os.path.join(trial_dir, "error.txt")
            status = ERROR if os.path.exists(error_file) else (
                TERMINATED if last.get("done") else "UNKNOWN")
            trial = Trial.from_record({"trial_id": last.get("trial_id", name), "config": config,
                                       "status": status, "path": trial_dir,
                                       "trainable_name": name.split("_")[0]}, path)
            for result in results:
                trial.update_last_result(result)
            if status == ERROR:
                trial.error_file = error_file
                with open(error_file) as f:
                    trial.error_msg = f.read()
            trials.append(trial)
        return trials

    # -- metric and mode ---------------------------------------------------------
    def _metric_mode(self, metric: str | None, mode: str | None, what: str) -> tuple[str, str]:
        metric = metric if metric is not None else self.default_metric
        mode = mode if mode is not None else self.default_mode
        if metric is None or mode is None:
            raise ValueError(f"{what} needs a metric and a mode: pass metric= and mode= to "
                             f"tune.run(), or to this method")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        return metric, mode

    # -- the best ----------------------------------------------------------------
    def get_best_trial(self, metric: str | None = None, mode: str | None = None,
                       scope: str = "last", filter_nan_and_inf: bool = True) -> Trial | None:
        """The trial with the best `metric` (None if no trial reported it)."""
        metric, mode = self._metric_mode(metric, mode, "get_best_trial()")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(_SCOPES)}, got {scope!r}")
        key = mode if scope == "all" else scope
        best, best_value = None, None
        for trial in self.trials:
            stats = trial.metric_analysis.get(metric)
            if not stats or key not in stats:
                continue
            value = stats[key]
            if filter_nan_and_inf and not math.isfinite(value):
                continue
            if best is None or (value > best_value if mode == "max" else value < best_value):
                best, best_value = trial, value
        if best is None:
            warnings.warn(f"no trial reported the metric {metric!r}; there is no best trial",
                          stacklevel=2)
        return best

    def get_best_config(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last") -> dict | None:
        trial = self.get_best_trial(metric, mode, scope)
        return trial.config if trial is not None else None

    def get_best_logdir(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last") -> str | None:
        trial = self.get_best_trial(metric, mode, scope)
        return trial.path if trial is not None else None

    get_best_path = get_best_logdir

    @property
    def best_trial(self) -> Trial | None:
        self._metric_mode(None, None, "best_trial")
        return self.get_best_trial()

    @property
    def best_config(self) -> dict | None:
        self._metric_mode(None, None, "best_config")
        return self.get_best_config()

    @property
    def best_result(self) -> dict | None:
        """The last result of the best trial."""
        trial = self.best_trial
        return dict(trial.last_result) if trial is not None else None

    @property
    def best_logdir(self) -> str | None:
        trial = self.best_trial
        return trial.path if trial is not None else None

    best_path = best_logdir

    # -- everything ----------------------------------------------------------------
    @property
    def results(self) -> dict[str, dict]:
        """trial_id -> last result."""
        return {t.trial_id: t.last_result for t in self.trials}

    def get_all_configs(self) -> dict[str, dict]:
        """trial path -> config."""
        return {t.path: t.config for t in self.trials}

    @property
    def errored_trials(self) -> list[Trial]:
        return [t for t in self.trials if t.status == ERROR]

    @property
    def results_df(self):
        """A pandas DataFrame of every trial's last result (flattened), by trial_id."""
        pd = _pandas()
        rows = [flatten_dict(dict(t.last_result, trial_id=t.trial_id)) for t in self.trials]
        return pd.DataFrame.from_records(rows, index="trial_id") if rows else pd.DataFrame()

    def dataframe(self, metric: str | None = None, mode: str | None = None):
        """Like ``results_df`` but one row per trial with ``logdir``; with a
        metric and mode, each row is the trial's best result for it."""
        pd = _pandas()
        rows = []
        for trial in self.trials:
            row = trial.last_result
            if metric is not None and mode is not None:
                row = self._best_row(trial, metric, mode) or row
            rows.append(dict(flatten_dict(row), logdir=trial.path))
        return pd.DataFrame(rows)

    def _best_row(self, trial: Trial, metric: str, mode: str) -> dict | None:
        best, best_value = None, None
        for result in _read_results(trial.path):
            value = flatten_dict(result).get(metric)
            if is_number(value) and (best is None or (value > best_value if mode == "max"
                                                      else value < best_value)):
                best, best_value = result, value
        return best

    @property
    def trial_dataframes(self) -> dict[str, Any]:
        """trial path -> a DataFrame of all its results."""
        pd = _pandas()
        return {t.path: pd.DataFrame([flatten_dict(r) for r in _read_results(t.path)])
                for t in self.trials}

    # -- plotting ------------------------------------------------------------------
    def plot(self, metric: str | None = None, file: str | None = None) -> str:
        """Draw each trial's `metric` (default: tune.run's) per training
        iteration into PNG `file` (default: ``METRIC.png`` in the experiment
        directory), the trials stopped early marked with an x; returns the
        file. Raises ValueError if no result holds the metric, ImportError
        (saying what to install) without matplotlib, an optional extra."""
        from .plot import default_file, draw_png, trial_curves

        metric = metric if metric is not None else self.default_metric
        if metric is None:
            raise ValueError("plot() needs a metric: pass metric=, or metric= to tune.run()")
        curves = trial_curves(self.trials, metric)
        if file is None:
            if self.experiment_path is None:
                raise ValueError("plot(): no experiment directory to write to; pass file=")
            file = default_file(self.experiment_path, metric, ".png")
        title = os.path.basename(os.path.abspath(self.experiment_path or file))
        return draw_png(curves, metric, file, title)

    def __repr__(self) -> str:
        return f"ExperimentAnalysis({len(self.trials)} trials, path={self.experiment_path!r})"

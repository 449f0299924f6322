"""The modern front end: ``Tuner(trainable, param_space=, tune_config=TuneConfig(...),
run_config=RunConfig(...)).fit()`` returning a :class:`ResultGrid`, as in Ray.

``Tuner.fit`` runs the same machinery as ``tune.run`` (which stays, for the
older API); it does not raise when trials fail: their errors are in the
ResultGrid (``errors``, ``num_errors``, each ``Result.error``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import cloudpickle

from .analysis import ExperimentAnalysis, _pandas
from .api import run
from .checkpoint import Checkpoint
from .error import TuneError
from .experiment import default_storage_path
from .experiment_state import ExperimentStateLog
from .result import flatten_dict
from .trainable import trainable_name
from .trial import ERROR, TERMINATED, Trial

__all__ = ["Tuner", "TuneConfig", "RunConfig", "FailureConfig", "CheckpointConfig",
           "ResultGrid", "Result"]

_TUNER_FILE = "tuner.pkl"


@dataclasses.dataclass
class TuneConfig:
    """How to search: ``metric``/``mode`` to optimise, ``search_alg``,
    ``scheduler``, ``num_samples``, ``max_concurrent_trials``, ``time_budget_s``."""
    metric: str | None = None
    mode: str | None = None
    search_alg: Any = None
    scheduler: Any = None
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    time_budget_s: float | None = None
    reuse_actors: bool | None = None
    trial_name_creator: Any = None
    trial_dirname_creator: Any = None
    seed: int | None = None


@dataclasses.dataclass
class FailureConfig:
    """``max_failures``: retries of a failed trial (from its latest checkpoint;
    -1: always); ``fail_fast``: end the experiment at the first failure."""
    max_failures: int = 0
    fail_fast: bool = False


@dataclasses.dataclass
class CheckpointConfig:
    """``num_to_keep`` checkpoints per trial (all if None);
    ``checkpoint_frequency``/``checkpoint_at_end`` for class trainables."""
    num_to_keep: int | None = None
    checkpoint_frequency: int = 0
    checkpoint_at_end: bool | None = None
    checkpoint_score_attribute: str | None = None
    checkpoint_score_order: str = "max"


@dataclasses.dataclass
class RunConfig:
    """Where and how to run: ``name`` and ``storage_path`` of the experiment,
    ``stop`` criteria, ``callbacks``, ``failure_config``, ``checkpoint_config``,
    ``verbose``."""
    name: str | None = None
    storage_path: str | None = None
    stop: Any = None
    callbacks: list | None = None
    failure_config: FailureConfig | None = None
    checkpoint_config: CheckpointConfig | None = None
    verbose: int = 1
    loggers: list | None = None


@dataclasses.dataclass
class Result:
    """One trial's outcome: ``metrics`` (its last result), ``config``,
    ``checkpoint`` (its latest), ``error`` (a TuneError if it failed), ``path``."""
    metrics: dict
    checkpoint: Checkpoint | None
    error: Exception | None
    path: str
    config: dict
    trial_id: str = ""

    @property
    def metrics_dataframe(self):
        """Every result of the trial as a pandas DataFrame (needs pandas)."""
        from .analysis import _read_results
        return _pandas().DataFrame([flatten_dict(r) for r in _read_results(self.path)])

    @classmethod
    def from_trial(cls, trial: Trial) -> "Result":
        error = None
        if trial.status == ERROR:
            error = TuneError(f"trial {trial} failed:\n{trial.error_msg}", [trial])
        checkpoint = Checkpoint(trial.checkpoint) if trial.checkpoint else None
        return cls(metrics=dict(trial.last_result), checkpoint=checkpoint, error=error,
                   path=trial.path, config=trial.config, trial_id=trial.trial_id)


class ResultGrid:
    """The results of a Tuner's trials: iterate, index, ``get_best_result``,
    ``get_dataframe`` (pandas), ``errors``, ``plot`` (matplotlib)."""

    def __init__(self, analysis: ExperimentAnalysis):
        self._analysis = analysis
        self._results = [Result.from_trial(t) for t in analysis.trials]

    @property
    def experiment_path(self) -> str:
        return self._analysis.experiment_path

    def __len__(self) -> int:
        return len(self._results)

    def __getitem__(self, index: int) -> Result:
        return self._results[index]

    def __iter__(self):
        return iter(self._results)

    @property
    def errors(self) -> list[Exception]:
        return [r.error for r in self._results if r.error is not None]

    @property
    def num_errors(self) -> int:
        return sum(1 for t in self._analysis.trials if t.status == ERROR)

    @property
    def num_terminated(self) -> int:
        return sum(1 for t in self._analysis.trials if t.status == TERMINATED)

    def get_best_result(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last", filter_nan_and_inf: bool = True) -> Result:
        """The Result of the trial best in `metric` (default: TuneConfig's);
        raises RuntimeError if no trial reported it."""
        trial = self._analysis.get_best_trial(metric, mode, scope, filter_nan_and_inf)
        if trial is None:
            raise RuntimeError(f"no trial reported the metric "
                               f"{metric or self._analysis.default_metric!r}")
        return next(r for r in self._results if r.trial_id == trial.trial_id)

    def get_dataframe(self, filter_metric: str | None = None, filter_mode: str | None = None):
        """One row per trial (its last result, or its best in `filter_metric`), with
        ``config/...`` columns; needs pandas."""
        return self._analysis.dataframe(filter_metric, filter_mode)

    def plot(self, metric: str | None = None, file: str | None = None) -> str:
        """Each trial's `metric` curve as a PNG (see ExperimentAnalysis.plot)."""
        return self._analysis.plot(metric, file)

    def __repr__(self) -> str:
        return f"ResultGrid<{len(self)} results, {self.num_errors} errors>"


class Tuner:
    """``Tuner(trainable, param_space=..., tune_config=TuneConfig(...),
    run_config=RunConfig(...))``; ``fit()`` runs the experiment."""

    def __init__(self, trainable: Any = None, *, param_space: dict | None = None,
                 tune_config: TuneConfig | None = None, run_config: RunConfig | None = None,
                 _resume: bool = False):
        if trainable is None:
            raise ValueError("Tuner needs a trainable")
        if tune_config is not None and not isinstance(tune_config, TuneConfig):
            raise TypeError(f"tune_config must be a tune.TuneConfig, got {tune_config!r:.80}")
        if run_config is not None and not isinstance(run_config, RunConfig):
            raise TypeError(f"run_config must be a tune.RunConfig, got {run_config!r:.80}")
        if param_space is not None and not isinstance(param_space, dict):
            raise TypeError(f"param_space must be a dict, got {type(param_space).__name__}")
        self.trainable = trainable
        self.param_space = param_space or {}
        self.tune_config = tune_config or TuneConfig()
        self.run_config = run_config or RunConfig()
        self._resume = _resume
        self._results: ResultGrid | None = None

    def _run_kwargs(self) -> dict:
        tc, rc = self.tune_config, self.run_config
        failure = rc.failure_config or FailureConfig()
        ckpt = rc.checkpoint_config or CheckpointConfig()
        if ckpt.checkpoint_score_attribute is not None:
            raise NotImplementedError("CheckpointConfig(checkpoint_score_attribute=) is not "
                                      "supported by beamlet.tune yet: the latest "
                                      "num_to_keep checkpoints are kept")
        return dict(
            config=self.param_space, metric=tc.metric, mode=tc.mode,
            search_alg=tc.search_alg, scheduler=tc.scheduler, num_samples=tc.num_samples,
            max_concurrent_trials=tc.max_concurrent_trials, time_budget_s=tc.time_budget_s,
            trial_name_creator=tc.trial_name_creator,
            trial_dirname_creator=tc.trial_dirname_creator, seed=tc.seed,
            reuse_actors=tc.reuse_actors,
            name=rc.name, storage_path=rc.storage_path, stop=rc.stop, callbacks=rc.callbacks,
            loggers=rc.loggers, verbose=rc.verbose, max_failures=failure.max_failures,
            fail_fast=failure.fail_fast, keep_checkpoints_num=ckpt.num_to_keep,
            checkpoint_freq=ckpt.checkpoint_frequency,
            checkpoint_at_end=bool(ckpt.checkpoint_at_end), raise_on_failed_trial=False)

    @classmethod
    def restore(cls, path: str, trainable: Any, *, param_space: dict | None = None,
                **ignored) -> "Tuner":
        """The Tuner of the experiment in directory `path`, to ``fit()`` again after
        its driver was killed: ended trials are kept, unfinished ones restart
        from their latest checkpoints, the search goes on from its saved state.
        `trainable` must be given again (it is code, not state)."""
        path = os.path.abspath(os.path.expanduser(path))
        if not cls.can_restore(path):
            raise ValueError(f"Tuner.restore: no experiment to restore at {path}")
        with open(os.path.join(path, _TUNER_FILE), "rb") as f:
            saved = cloudpickle.load(f)
        run_config = dataclasses.replace(saved["run_config"], name=os.path.basename(path),
                                         storage_path=os.path.dirname(path))
        return cls(trainable, param_space=param_space if param_space is not None
                   else saved["param_space"], tune_config=saved["tune_config"],
                   run_config=run_config, _resume=True)

    @staticmethod
    def can_restore(path: str) -> bool:
        path = os.path.abspath(os.path.expanduser(path))
        return os.path.exists(os.path.join(path, _TUNER_FILE)) and \
            ExperimentStateLog(path).exists()

    def _save(self, experiment_path: str) -> None:
        os.makedirs(experiment_path, exist_ok=True)
        tmp = os.path.join(experiment_path, _TUNER_FILE + ".tmp")
        with open(tmp, "wb") as f:
            cloudpickle.dump({"param_space": self.param_space, "tune_config": self.tune_config,
                              "run_config": self.run_config}, f)
        os.replace(tmp, os.path.join(experiment_path, _TUNER_FILE))

    def fit(self) -> ResultGrid:
        """Run every trial to its end; return their results (failures included)."""
        kwargs = self._run_kwargs()
        if kwargs["name"] is None:
            # A name is what a later Tuner.restore finds the experiment by.
            base = self.trainable if isinstance(self.trainable, str) else \
                trainable_name(self.trainable)
            kwargs["name"] = f"{base}_" \
                             f"{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        if self._resume:
            kwargs["resume"] = True
        else:
            storage = kwargs["storage_path"] or default_storage_path()
            self._save(os.path.join(os.path.abspath(os.path.expanduser(storage)),
                                    kwargs["name"]))
        analysis = run(self.trainable, **kwargs)
        self._results = ResultGrid(analysis)
        return self._results

    def get_results(self) -> ResultGrid:
        if self._results is None:
            raise RuntimeError("Tuner.get_results(): call fit() first")
        return self._results


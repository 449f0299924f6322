"""``tune.run`` and the seed's ``run_experiments``."""
from __future__ import annotations

from typing import Any

import beamlet

from .analysis import ExperimentAnalysis
from .error import TuneError
from .experiment import Experiment
from .experiment_state import ExperimentStateLog
from .loggers import Callback
from .plugins import DEFAULT_LOGGERS, logger_factories
from .progress import ProgressReporter
from .runner import TrialRunner
from .schedulers import TrialScheduler
from .stopper import TimeoutStopper
from .trial import ERROR, Trial

__all__ = ["run", "run_experiments"]

# tune.run options of Ray that need features beamlet.tune does not have yet.
_NOT_YET = frozenset({"checkpoint_score_attr", "restore", "sync_config", "progress_reporter",
                      "checkpoint_config", "export_formats", "upload_dir"})


def _ensure_initialized() -> None:
    if not beamlet.is_initialized():
        beamlet.init(ignore_reinit_error=True)


def _check_metric_mode(metric, mode) -> None:
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if metric is not None and not isinstance(metric, str):
        raise TypeError(f"metric must be a string, got {metric!r}")


def _check_unsupported(kwargs: dict, where: str) -> None:
    if not kwargs:
        return
    later = sorted(set(kwargs) & _NOT_YET)
    if later:
        raise NotImplementedError(f"{where}: {', '.join(later)} not supported by beamlet.tune "
                                  f"yet")
    raise TypeError(f"{where} got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")


def _build_callbacks(callbacks, loggers) -> list[Callback]:
    """The user's callbacks plus the loggers (default: json, csv, tbx), without
    adding a logger whose class the user already passed."""
    out: list[Callback] = []
    for cb in callbacks or []:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be tune.Callback instances, got {cb!r:.80}")
        out.append(cb)
    factories = logger_factories()
    for item in (DEFAULT_LOGGERS if loggers is None else loggers):
        if isinstance(item, str):
            if item not in factories:
                raise ValueError(f"unknown logger {item!r}; installed loggers: "
                                 f"{', '.join(sorted(factories))}")
            item = factories[item]
        if isinstance(item, type):
            if any(type(cb) is item for cb in out):
                continue
            item = item()
        elif callable(item) and not isinstance(item, Callback):
            item = item()  # a factory
        if not isinstance(item, Callback):
            raise TypeError(f"loggers must be names, Callback classes or instances, got "
                            f"{item!r:.80}")
        out.append(item)
    return out


def _execute(experiments: list[Experiment], *, scheduler, callbacks, loggers, verbose,
             metric, mode, fail_fast, max_concurrent_trials, time_budget_s,
             resume: bool = False, reuse_actors: bool | None = None) -> TrialRunner:
    """Run the experiments; raises on bad arguments, a first result without
    `metric`, or a fail_fast failure."""
    if scheduler is not None and not isinstance(scheduler, TrialScheduler):
        raise TypeError(f"scheduler must be a tune TrialScheduler, got {scheduler!r:.80}")
    if scheduler is not None:
        scheduler.set_search_properties(metric, mode)
    for exp in experiments:
        if not exp.search_alg.set_search_properties(metric, mode, exp.config):
            raise ValueError(f"the search algorithm of experiment {exp.name!r} cannot take "
                             f"metric={metric!r}, mode={mode!r}")
    names = [e.path for e in experiments]
    if len(set(names)) != len(names):
        raise ValueError("two experiments have the same name and storage path")
    cbs = _build_callbacks(callbacks, loggers)
    stopper = TimeoutStopper(time_budget_s) if time_budget_s is not None else None
    _ensure_initialized()
    runner = TrialRunner(experiments, scheduler=scheduler, callbacks=cbs,
                         progress=ProgressReporter(verbose=verbose, metric=metric, mode=mode),
                         max_concurrent_trials=max_concurrent_trials, fail_fast=fail_fast,
                         stopper=stopper, metric=metric, resume=resume,
                         reuse_actors=reuse_actors)
    runner.run()
    if runner.fail_fast_trial is not None:
        trial = runner.fail_fast_trial
        raise TuneError(f"trial {trial} failed and fail_fast=True stopped the experiment:\n"
                        f"{trial.error_msg}", [trial])
    return runner


def _check_resume(resume, experiments: list[Experiment]) -> bool:
    if resume in (False, None):
        return False
    if resume not in (True, "AUTO"):
        raise ValueError(f"resume must be True, False or 'AUTO', got {resume!r}")
    found = [e for e in experiments if ExperimentStateLog(e.path).exists()]
    if resume == "AUTO":
        return bool(found)
    missing = [e.path for e in experiments if e not in found]
    if missing:
        raise ValueError(f"resume=True, but there is no experiment to resume at "
                         f"{', '.join(missing)} (give the experiment's name and "
                         f"storage_path; resume='AUTO' starts afresh instead)")
    return True


def _raise_on_failed(trials: list[Trial]) -> None:
    failed = [t for t in trials if t.status == ERROR]
    if failed:
        first = (failed[0].error_msg or "").strip()
        raise TuneError(f"Trials did not complete: {[str(t) for t in failed]}\n"
                        f"The first failure ({failed[0]}, details in "
                        f"{failed[0].error_file}):\n{first}", failed)


def run(run_or_experiment: Any, *, config: dict | None = None, stop: Any = None,
        num_samples: int = 1, resources_per_trial: dict | None = None,
        metric: str | None = None, mode: str | None = None, name: str | None = None,
        storage_path: str | None = None, local_dir: str | None = None,
        scheduler: TrialScheduler | None = None, time_budget_s: float | None = None,
        callbacks: list | None = None, loggers: list | None = None, verbose: int = 1,
        raise_on_failed_trial: bool = True, fail_fast: bool = False,
        max_concurrent_trials: int | None = None, seed: int | None = None,
        trial_name_creator=None, trial_dirname_creator=None,
        checkpoint_freq: int = 0, checkpoint_at_end: bool = False,
        keep_checkpoints_num: int | None = None, max_failures: int = 0,
        search_alg=None, resume: bool | str = False, reuse_actors: bool | None = None,
        **kwargs) -> ExperimentAnalysis:
    """Run a trainable once per variant of `config` (x `num_samples`) and return an
    ExperimentAnalysis.

    ``run_or_experiment`` is a function (``fn(config)`` calling
    ``tune.report``, or ``fn(config, reporter)``), a ``tune.Trainable``
    subclass, a registered name, or an ``Experiment``. Results go to
    ``storage_path`` (default ``~/beamlet_results``) / ``name``. Raises
    TuneError if a trial failed, unless ``raise_on_failed_trial=False``.
    A trial that fails is retried ``max_failures`` times (-1: always) from its
    latest checkpoint; ``checkpoint_freq``/``checkpoint_at_end`` make class
    trainables save checkpoints, of which each trial keeps the latest
    ``keep_checkpoints_num`` (all if None). ``metric`` must be in every trial's
    first result (ValueError otherwise). ``resume=True`` continues the
    experiment ``name`` in ``storage_path`` after its driver was killed: ended
    trials are kept as they were, the others restart from their latest
    checkpoint, and the search goes on from its saved state (``"AUTO"``:
    resume if there is a state to resume, else start afresh). ``reuse_actors``
    (default True) runs a new trial in the actor (worker process) of an ended
    trial with the same resources, instead of starting a new one.
    """
    _check_unsupported(kwargs, "tune.run()")
    _check_metric_mode(metric, mode)
    if isinstance(run_or_experiment, Experiment):
        experiments = [run_or_experiment]
    elif isinstance(run_or_experiment, (list, tuple)) and run_or_experiment and \
            all(isinstance(e, Experiment) for e in run_or_experiment):
        experiments = list(run_or_experiment)
    else:
        experiments = [Experiment(name, run_or_experiment, config=config, stop=stop,
                                  resources_per_trial=resources_per_trial,
                                  num_samples=num_samples, storage_path=storage_path,
                                  local_dir=local_dir, seed=seed,
                                  trial_name_creator=trial_name_creator,
                                  trial_dirname_creator=trial_dirname_creator,
                                  checkpoint_freq=checkpoint_freq,
                                  checkpoint_at_end=checkpoint_at_end,
                                  keep_checkpoints_num=keep_checkpoints_num,
                                  max_failures=max_failures, search_alg=search_alg)]
    runner = _execute(experiments, scheduler=scheduler, callbacks=callbacks, loggers=loggers,
                      verbose=verbose, metric=metric, mode=mode, fail_fast=fail_fast,
                      max_concurrent_trials=max_concurrent_trials, time_budget_s=time_budget_s,
                      resume=_check_resume(resume, experiments), reuse_actors=reuse_actors)
    trials = runner.get_trials()
    if raise_on_failed_trial:
        _raise_on_failed(trials)
    return ExperimentAnalysis(experiments[0].path, trials=trials, default_metric=metric,
                              default_mode=mode)


def run_experiments(experiments: Any, *, scheduler: TrialScheduler | None = None,
                    verbose: int = 1, raise_on_failed_trial: bool = True,
                    callbacks: list | None = None, loggers: list | None = None,
                    fail_fast: bool = False, max_concurrent_trials: int | None = None,
                    **kwargs) -> list[Trial]:
    """The seed's API: run ``{name: spec, ...}`` (or Experiment objects) together
    and return the list of trials. A spec has ``run`` (a trainable or its
    registered name), ``config``, ``stop``, ``resources`` /
    ``resources_per_trial`` (``{'cpu': 1, 'gpu': 0}``), ``num_samples`` and
    ``local_dir`` / ``storage_path``."""
    _check_unsupported(kwargs, "run_experiments()")
    if isinstance(experiments, Experiment):
        exps = [experiments]
    elif isinstance(experiments, dict):
        if not experiments:
            raise ValueError("run_experiments() needs at least one experiment")
        exps = [spec if isinstance(spec, Experiment) else Experiment.from_json(name, spec)
                for name, spec in experiments.items()]
    elif isinstance(experiments, (list, tuple)) and experiments and \
            all(isinstance(e, Experiment) for e in experiments):
        exps = list(experiments)
    else:
        raise TypeError("run_experiments() takes {name: spec, ...}, an Experiment or a list "
                        f"of Experiments, got {type(experiments).__name__}")
    runner = _execute(exps, scheduler=scheduler, callbacks=callbacks, loggers=loggers,
                      verbose=verbose, metric=None, mode=None, fail_fast=fail_fast,
                      max_concurrent_trials=max_concurrent_trials, time_budget_s=None)
    trials = runner.get_trials()
    if raise_on_failed_trial:
        _raise_on_failed(trials)
    return trials

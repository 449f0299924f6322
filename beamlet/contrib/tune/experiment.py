"""Experiment: one named search (a trainable, its config space, stop rule and
resources), as in the seed's ``run_experiments({name: spec})`` and behind
``tune.run``."""
from __future__ import annotations

import os
import time
import uuid
from typing import Any

from .stopper import make_stopper
from .trainable import Trainable, get_trainable, trainable_name, validate_trainable
from .trial import ERROR, PAUSED, PENDING, TERMINATED, Trial, parse_resources
from .search.search_algorithm import BasicVariantGenerator, as_search_alg
from .variant_generator import format_params
from .wrappers import trainable_resources

__all__ = ["Experiment", "DEFAULT_STORAGE", "default_storage_path"]

DEFAULT_STORAGE = os.path.join("~", "beamlet_results")

# Spec keys that exist in Ray's spec but need features beamlet.tune does not have yet.
_NOT_YET = frozenset({"checkpoint_score_attr", "restore", "upload_dir",
                      "sync_config", "sync_to_driver", "scheduler"})
_KEYS = frozenset({"run", "config", "stop", "resources", "resources_per_trial",
                   "trial_resources", "num_samples", "repeat", "local_dir", "storage_path",
                   "trial_name_creator", "trial_dirname_creator", "seed", "env",
                   "checkpoint_freq", "checkpoint_at_end", "keep_checkpoints_num",
                   "max_failures", "search_alg"})


def _check_checkpointing(trainable, freq, at_end, keep, max_failures) -> None:
    for name, value in (("checkpoint_freq", freq), ("max_failures", max_failures)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if freq < 0:
        raise ValueError(f"checkpoint_freq must be >= 0, got {freq!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep_checkpoints_num must be an integer >= 1 or None, got {keep!r}")
    is_class = isinstance(trainable, type) and issubclass(trainable, Trainable)
    if (freq or at_end) and not is_class:
        raise ValueError("checkpoint_freq and checkpoint_at_end apply to class trainables "
                         "(tune.Trainable with save_checkpoint); a function trainable "
                         "checkpoints with tune.report(..., checkpoint=...)")
    if (freq or at_end) and trainable.save_checkpoint is Trainable.save_checkpoint:
        raise ValueError(f"checkpoint_freq/checkpoint_at_end need "
                         f"{trainable.__name__}.save_checkpoint()")


def default_storage_path() -> str:
    return os.path.expanduser(DEFAULT_STORAGE)


class Experiment:
    """A named experiment. ``run`` is a trainable (function or Trainable
    subclass) or the name it was registered under."""

    def __init__(self, name: str | None, run: Any, *, config: dict | None = None,
                 stop: Any = None, resources_per_trial: dict | None = None,
                 num_samples: int = 1, storage_path: str | None = None,
                 local_dir: str | None = None, seed: int | None = None,
                 trial_name_creator=None, trial_dirname_creator=None,
                 checkpoint_freq: int = 0, checkpoint_at_end: bool = False,
                 keep_checkpoints_num: int | None = None, max_failures: int = 0,
                 search_alg=None):
        if isinstance(run, str):
            self.trainable = get_trainable(run)
            self.trainable_name = run
        else:
            validate_trainable(run)
            self.trainable = run
            self.trainable_name = trainable_name(run)
        if name is None:
            name = f"{self.trainable_name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        if not isinstance(name, str) or not name or os.sep in name:
            raise ValueError(f"an experiment name must be a non-empty string without "
                             f"{os.sep!r}, got {name!r}")
        if storage_path is not None and local_dir is not None and \
                os.path.abspath(os.path.expanduser(storage_path)) != \
                os.path.abspath(os.path.expanduser(local_dir)):
            raise ValueError("give storage_path or local_dir (its older name), not both")
        self.name = name
        self.config = config if config is not None else {}
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict, got {type(self.config).__name__}")
        self.stopper, self.stop_criteria = make_stopper(stop)
        if resources_per_trial is None:
            resources_per_trial = trainable_resources(self.trainable)
        self.resources = parse_resources(resources_per_trial)
        self.num_samples = num_samples
        base = storage_path or local_dir or default_storage_path()
        self.storage_path = os.path.abspath(os.path.expanduser(base))
        self.path = os.path.join(self.storage_path, name)
        self.seed = seed
        self.trial_name_creator = trial_name_creator
        self.trial_dirname_creator = trial_dirname_creator
        _check_checkpointing(self.trainable, checkpoint_freq, checkpoint_at_end,
                             keep_checkpoints_num, max_failures)
        self.checkpoint_freq = checkpoint_freq
        self.checkpoint_at_end = checkpoint_at_end
        self.keep_checkpoints_num = keep_checkpoints_num
        self.max_failures = max_failures
        self.search_alg = as_search_alg(search_alg)
        self.search_alg.add_configurations(self.config, num_samples, seed)
        self._pending = 0
        self._id = uuid.uuid4().hex[:5]
        self._count = 0

    @classmethod
    def from_json(cls, name: str, spec: dict) -> "Experiment":
        """An experiment from the seed's spec dict: keys ``run``, ``config``,
        ``stop``, ``resources`` / ``resources_per_trial``, ``num_samples``,
        ``local_dir`` / ``storage_path``."""
        if not isinstance(spec, dict):
            raise TypeError(f"the spec of experiment {name!r} must be a dict, got "
                            f"{type(spec).__name__}")
        later = sorted(set(spec) & _NOT_YET)
        if later:
            raise NotImplementedError(f"experiment {name!r}: spec key(s) {', '.join(later)} "
                                      f"are not supported by beamlet.tune yet")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise ValueError(f"experiment {name!r}: unknown spec key(s) {', '.join(unknown)}; "
                             f"valid keys are: {', '.join(sorted(_KEYS))}")
        if "run" not in spec:
            raise ValueError(f"experiment {name!r} needs a 'run' key: the trainable or its "
                             f"registered name")
        resource_keys = [k for k in ("resources", "resources_per_trial", "trial_resources")
                         if k in spec]
        if len(resource_keys) > 1:
            raise ValueError(f"experiment {name!r}: give only one of {', '.join(resource_keys)}")
        if "num_samples" in spec and "repeat" in spec:
            raise ValueError(f"experiment {name!r}: give num_samples or repeat, not both")
        if spec.get("env"):
            raise NotImplementedError("the 'env' spec key (RL environments) comes with "
                                      "beamlet.rl")
        return cls(name, spec["run"], config=spec.get("config"), stop=spec.get("stop"),
                   resources_per_trial=spec.get(resource_keys[0]) if resource_keys else None,
                   num_samples=spec.get("num_samples", spec.get("repeat", 1)),
                   storage_path=spec.get("storage_path"), local_dir=spec.get("local_dir"),
                   seed=spec.get("seed"), trial_name_creator=spec.get("trial_name_creator"),
                   trial_dirname_creator=spec.get("trial_dirname_creator"),
                   checkpoint_freq=spec.get("checkpoint_freq", 0),
                   checkpoint_at_end=spec.get("checkpoint_at_end", False),
                   keep_checkpoints_num=spec.get("keep_checkpoints_num"),
                   max_failures=spec.get("max_failures", 0),
                   search_alg=spec.get("search_alg"))

    # -- trials ------------------------------------------------------------------
    @property
    def total_trials(self) -> int | None:
        return self.search_alg.total

    def next_trials(self, pending: int = 0) -> list[Trial]:
        """New trials, as many as the search algorithm gives now; with
        `pending` of this experiment's trials waiting to start, no more than
        its ``max_pending`` allows."""
        cap = self.search_alg.max_pending
        trials = []
        while cap is None or pending + len(trials) < cap:
            trial_id = f"{self._id}_{self._count:05d}"
            item = self.search_alg.next_trial(trial_id)
            if item is None:
                break
            config, params = item
            index = self._count
            self._count += 1
            tag = f"{index}_{format_params(params)}" if params else str(index)
            trial = Trial(
                self.trainable_name, config, trial_id,
                experiment_path=self.path, experiment_name=self.name, index=index,
                evaluated_params=params, experiment_tag=tag, resources=self.resources,
                stop_criteria=self.stop_criteria, stopper=self.stopper,
                trainable=self.trainable, trial_name_creator=self.trial_name_creator,
                trial_dirname_creator=self.trial_dirname_creator,
                max_failures=self.max_failures, checkpoint_freq=self.checkpoint_freq,
                checkpoint_at_end=self.checkpoint_at_end,
                keep_checkpoints_num=self.keep_checkpoints_num)
            trial._experiment = self
            trials.append(trial)
        return trials

    def is_finished(self) -> bool:
        return self.search_alg.is_finished()

    def search_state(self) -> dict:
        return {"search": self.search_alg.get_state(), "count": self._count}

    def restore_trials(self, records: list[dict], search_state: dict | None) -> list[Trial]:
        """The trials of a killed run, from their records (see experiment_state):
        ended ones as they were, paused ones PAUSED (their scheduler resumes
        them), the others PENDING, to restart from their latest checkpoint; the search algorithm goes on from its saved state."""
        trials = []
        for record in records:
            trial = Trial(self.trainable_name, record.get("config", {}), record["trial_id"],
                          experiment_path=self.path, experiment_name=self.name,
                          index=len(trials), evaluated_params=record.get("evaluated_params"),
                          experiment_tag=record.get("experiment_tag", ""),
                          resources=self.resources, stop_criteria=self.stop_criteria,
                          stopper=self.stopper, trainable=self.trainable,
                          max_failures=self.max_failures, checkpoint_freq=self.checkpoint_freq,
                          checkpoint_at_end=self.checkpoint_at_end,
                          keep_checkpoints_num=self.keep_checkpoints_num)
            trial.path = record.get("path") or trial.path
            status = record.get("status", PENDING)
            trial.status = status if status in (TERMINATED, ERROR) else PENDING
            if status == PAUSED and record.get("checkpoint") and \
                    os.path.isdir(record["checkpoint"]):
                trial.status = PAUSED  # it waits for its scheduler, as before
            for key in ("last_result", "metric_analysis", "num_results", "error_msg",
                        "error_file", "start_time", "end_time", "num_failures"):
                if record.get(key) is not None:
                    setattr(trial, key, record[key])
            if record.get("checkpoint") and os.path.isdir(record["checkpoint"]):
                trial.on_checkpoint(record["checkpoint"])
            if record.get("restore_path") and os.path.isdir(record["restore_path"]):
                trial.restore_path = record["restore_path"]  # e.g. PBT's exploit
            trial._experiment = self
            trials.append(trial)
        self._count = len(trials)
        state = dict((search_state or {}).get("search") or {})
        if isinstance(self.search_alg, BasicVariantGenerator):
            state["emitted"] = max(state.get("emitted", 0), len(trials))
        if state:
            self.search_alg.set_state(state)
        return trials

    def __repr__(self) -> str:
        return f"Experiment({self.name!r}, run={self.trainable_name!r})"

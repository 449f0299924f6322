"""Population based training (Jaderberg et al., "Population Based Training of
Neural Networks", 2017).

Every ``perturbation_interval`` of ``time_attr``, a trial in the bottom
``quantile_fraction`` of the population (by its latest metric) *exploits*:
it takes the checkpoint of a trial drawn from the top quantile, and
*explores*: its config becomes that trial's config with the
``hyperparam_mutations`` applied (each value resampled with probability
``resample_probability``, else a number multiplied by one of
``perturbation_factors``, or a list value moved to a neighbour). The trial is
paused and restarts from the copied checkpoint with the new config.
Trainables must checkpoint (a function reporting ``checkpoint=``, or a class
trainable's ``save_checkpoint``).

Each trial's last perturbation time and score, the random generator and the
counters are the scheduler's state, logged at every perturbation point: an
experiment resumed after its driver was killed perturbs each trial on the
same schedule as before (the exploit's new config and checkpoint are in the
trial's own record).
"""
from __future__ import annotations

import copy
import math
import os
import random
import shutil

from ..search_space import Domain, Function
from ..stopper import lookup
from .trial_scheduler import FIFOScheduler

__all__ = ["PopulationBasedTraining", "explore"]


def explore(config: dict, mutations: dict, resample_probability: float,
            perturbation_factors: tuple, rng: random.Random,
            custom_explore_fn=None) -> dict:
    """A perturbed copy of `config` (see the module docstring)."""
    new = copy.deepcopy(config)
    for key, spec in mutations.items():
        if isinstance(spec, dict):
            new[key] = explore(config.get(key, {}), spec, resample_probability,
                               perturbation_factors, rng)
        elif isinstance(spec, (list, tuple)):
            values = list(spec)
            if rng.random() < resample_probability or config.get(key) not in values:
                new[key] = rng.choice(values)
            else:
                index = values.index(config[key]) + rng.choice([-1, 1])
                new[key] = values[min(max(index, 0), len(values) - 1)]
        elif isinstance(spec, Domain) or callable(spec):
            if rng.random() < resample_probability or key not in config:
                new[key] = _sample(spec, rng)
            else:
                value = config[key] * rng.choice(perturbation_factors)
                new[key] = int(value) if isinstance(config[key], int) else value
        else:
            raise TypeError(f"hyperparam_mutations[{key!r}] must be a list, a dict, a "
                            f"tune search space or a function, got {spec!r:.80}")
    if custom_explore_fn is not None:
        new = custom_explore_fn(new)
        if not isinstance(new, dict):
            raise TypeError("custom_explore_fn must return the new config (a dict)")
    return new


def _sample(spec, rng: random.Random):
    if isinstance(spec, Function):
        return spec.call(None)
    if isinstance(spec, Domain):
        return spec.sample(rng)
    return spec()


class _State:
    __slots__ = ("last_score", "last_perturbation_time")

    def __init__(self):
        self.last_score: float | None = None
        self.last_perturbation_time = 0.0


class PopulationBasedTraining(FIFOScheduler):
    """PBT (see the module docstring). ``seed`` makes its draws reproducible."""

    def __init__(self, time_attr: str = "time_total_s", metric: str | None = None,
                 mode: str | None = None, perturbation_interval: float = 60.0,
                 burn_in_period: float = 0.0, hyperparam_mutations: dict | None = None,
                 quantile_fraction: float = 0.25, resample_probability: float = 0.25,
                 perturbation_factors: tuple = (1.2, 0.8), custom_explore_fn=None,
                 log_config: bool = True, require_attrs: bool = True, synch: bool = False,
                 seed: int | None = None):
        if not hyperparam_mutations and custom_explore_fn is None:
            raise ValueError("PopulationBasedTraining needs hyperparam_mutations or "
                             "custom_explore_fn")
        if hyperparam_mutations is not None and not isinstance(hyperparam_mutations, dict):
            raise TypeError("hyperparam_mutations must be a dict")
        if not 0 <= quantile_fraction <= 0.5:
            raise ValueError(f"quantile_fraction must be in [0, 0.5], got {quantile_fraction!r}")
        if perturbation_interval <= 0:
            raise ValueError(f"perturbation_interval must be > 0, got "
                             f"{perturbation_interval!r}")
        if synch:
            raise NotImplementedError("PopulationBasedTraining(synch=True) is not supported "
                                      "by beamlet.tune yet")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.time_attr = time_attr
        self.perturbation_interval = perturbation_interval
        self.burn_in_period = burn_in_period
        self.hyperparam_mutations = dict(hyperparam_mutations or {})
        self.quantile_fraction = quantile_fraction
        self.resample_probability = resample_probability
        self.perturbation_factors = tuple(perturbation_factors)
        self.custom_explore_fn = custom_explore_fn
        self.require_attrs = require_attrs
        self._rng = random.Random(seed)
        self._state: dict = {}     # Trial -> _State
        self._restored: dict = {}  # trial id -> (last_score, last_perturbation_time)
        self.num_perturbations = 0
        self.num_checkpoints = 0
        self.state_changes = 0

    def get_state(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        trials = dict(self._restored)
        trials.update({t.trial_id: (s.last_score, s.last_perturbation_time)
                       for t, s in self._state.items()})
        return {"trials": trials, "rng": [version, list(internal), gauss],
                "num_perturbations": self.num_perturbations,
                "num_checkpoints": self.num_checkpoints}

    def set_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._restored = {tid: tuple(v) for tid, v in state["trials"].items()}
        self.num_perturbations = state["num_perturbations"]
        self.num_checkpoints = state["num_checkpoints"]

    def on_trial_add(self, runner, trial) -> None:
        self._require_metric()
        state = self._state[trial] = _State()
        if trial.trial_id in self._restored:
            state.last_score, state.last_perturbation_time = \
                self._restored.pop(trial.trial_id)

    def on_trial_result(self, runner, trial, result: dict) -> str:
        metric, sign = self._require_metric()
        found_t, now = lookup(result, self.time_attr)
        found_v, value = lookup(result, metric)
        if not found_t or not found_v:
            if self.require_attrs:
                raise ValueError(f"PopulationBasedTraining: result of trial {trial} lacks "
                                 f"{self.time_attr!r} or {metric!r}")
            return self.CONTINUE
        if now < self.burn_in_period:
            return self.CONTINUE
        state = self._state[trial]
        state.last_score = sign * float(value)
        if now - state.last_perturbation_time < self.perturbation_interval:
            return self.CONTINUE
        state.last_perturbation_time = now
        self.state_changes += 1
        lower, upper = self._quantiles()
        if trial in upper:
            runner.save_trial(trial)  # class trainables: checkpoint now, for exploiters
            self.num_checkpoints += 1
        if trial not in lower:
            return self.CONTINUE
        donors = [t for t in upper if t.checkpoint]
        if not donors:
            return self.CONTINUE
        donor = self._rng.choice(donors)
        trial.config = explore(donor.config, self.hyperparam_mutations,
                               self.resample_probability, self.perturbation_factors,
                               self._rng, self.custom_explore_fn)
        trial.restore_path = self._copy_checkpoint(donor.checkpoint, trial)
        state.last_score = self._state[donor].last_score
        self.num_perturbations += 1
        return self.PAUSE

    def _copy_checkpoint(self, source: str, trial) -> str:
        """A copy of the donor's checkpoint in the exploiting trial's directory,
        so the donor may delete its own (keep_checkpoints_num) meanwhile."""
        dest = os.path.join(trial.path, f"exploit_{self.num_perturbations:05d}")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        return dest

    def _quantiles(self) -> tuple[list, list]:
        """(bottom, top) trials by latest score, among unfinished ones that have one."""
        trials = sorted((t for t, s in self._state.items()
                         if s.last_score is not None and not t.is_finished()),
                        key=lambda t: self._state[t].last_score)
        if len(trials) <= 1:
            return [], []
        count = int(math.ceil(len(trials) * self.quantile_fraction))
        count = min(count, len(trials) // 2)
        return trials[:count], trials[-count:] if count else []

    def on_trial_complete(self, runner, trial, result: dict) -> None:
        self._state.pop(trial, None)

    on_trial_remove = on_trial_complete

    def on_trial_error(self, runner, trial) -> None:
        self._state.pop(trial, None)

    def debug_string(self) -> str:
        return f"PopulationBasedTraining: {self.num_perturbations} perturbs"

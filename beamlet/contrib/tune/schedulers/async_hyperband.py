"""Asynchronous successive halving (ASHA; Li et al., "A System for Massively
Parallel Hyperparameter Tuning", 2020).

Each trial goes into one of ``brackets`` brackets. A bracket has rungs at
``grace_period * reduction_factor**k`` (in units of ``time_attr``, below
``max_t``). When a trial reaches a rung it records its metric there, and it
stops unless the metric is in the top ``1/reduction_factor`` of what the
trials that reached that rung so far recorded. Nothing waits for other
trials: a trial is judged against those that came before it. Every trial
stops at ``max_t``.
"""
from __future__ import annotations

import math
import random

from ..stopper import lookup
from .trial_scheduler import FIFOScheduler

__all__ = ["AsyncHyperBandScheduler", "ASHAScheduler"]


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class _Bracket:
    """The rungs of one bracket: ``[(milestone, {trial_id: metric}), ...]``,
    the highest milestone first."""

    def __init__(self, min_t: float, max_t: float, reduction_factor: float, s: int):
        self.rf = reduction_factor
        count = int(math.log(max_t / min_t) / math.log(reduction_factor) - s + 1)
        self.rungs = [(min_t * reduction_factor ** (k + s), {})
                      for k in reversed(range(max(count, 0)))]

    def cutoff(self, recorded: dict) -> float | None:
        if not recorded:
            return None
        return _percentile(list(recorded.values()), (1 - 1 / self.rf) * 100)

    def on_result(self, trial_id: str, now: float, value: float) -> tuple[bool, int | None]:
        """Record the trial at the rung it just reached: ``(keep, rung index)``,
        keep False meaning stop it; the index is None if nothing was recorded."""
        for index, (milestone, recorded) in enumerate(self.rungs):
            if now < milestone or trial_id in recorded:
                if now >= milestone:
                    break  # it was judged at this rung already
                continue
            cutoff = self.cutoff(recorded)
            recorded[trial_id] = value
            return cutoff is None or value >= cutoff, index
        return True, None


class AsyncHyperBandScheduler(FIFOScheduler):
    """ASHA (see the module docstring). ``metric``/``mode`` default to tune.run's.
    ``time_attr`` is the result field measuring progress (``training_iteration``),
    ``max_t`` the most any trial gets, ``grace_period`` the least before a
    trial can be stopped."""

    def __init__(self, time_attr: str = "training_iteration", metric: str | None = None,
                 mode: str | None = None, max_t: float = 100, grace_period: float = 1,
                 reduction_factor: float = 4, brackets: int = 1,
                 stop_last_trials: bool = True, seed: int | None = None):
        if grace_period <= 0:
            raise ValueError(f"grace_period must be > 0, got {grace_period!r}")
        if max_t <= 0 or max_t < grace_period:
            raise ValueError(f"max_t must be >= grace_period > 0, got max_t={max_t!r}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor!r}")
        if not isinstance(brackets, int) or brackets < 1:
            raise ValueError(f"brackets must be an integer >= 1, got {brackets!r}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.time_attr = time_attr
        self.max_t = max_t
        self.stop_last_trials = stop_last_trials
        self._brackets = [_Bracket(grace_period, max_t, reduction_factor, s)
                          for s in range(brackets)]
        self._trial_bracket: dict[str, _Bracket] = {}
        self._rng = random.Random(seed)
        self.num_stopped = 0
        self._stopped: set[str] = set()
        self._ops: list = []   # state changes not yet logged (pop_state_updates)

    def on_trial_add(self, runner, trial) -> None:
        self._require_metric()
        if trial.trial_id in self._trial_bracket:
            return  # resumed, with its bracket restored
        # Brackets with more rungs are likelier (Ray's weighting).
        sizes = [len(b.rungs) for b in self._brackets]
        weights = [math.exp(n - max(sizes)) for n in sizes]
        bracket = self._rng.choices(self._brackets, weights)[0]
        self._trial_bracket[trial.trial_id] = bracket
        self._ops.append(["add", trial.trial_id, self._brackets.index(bracket)])

    def get_state(self) -> dict:
        return {"rungs": [[dict(r) for _, r in b.rungs] for b in self._brackets],
                "trial_bracket": {tid: self._brackets.index(b)
                                  for tid, b in self._trial_bracket.items()},
                "num_stopped": self.num_stopped, "stopped": sorted(self._stopped)}

    def set_state(self, state: dict) -> None:
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            bracket.rungs = [(m, dict(r)) for (m, _), r in zip(bracket.rungs, rungs)]
        self._trial_bracket = {tid: self._brackets[i]
                               for tid, i in state["trial_bracket"].items()}
        self.num_stopped = state["num_stopped"]
        self._stopped = set(state.get("stopped", ()))

    def pop_state_updates(self) -> list:
        ops, self._ops = self._ops, []
        return ops

    def apply_state_updates(self, ops: list) -> None:
        """Ops: ``["add", trial, bracket]`` (a bracket chosen: the seeded
        choice of the next one goes on as it would have), ``["rung", bracket,
        rung, trial, value]``, ``["stop", trial]``."""
        for op in ops:
            if op[0] == "add":
                self._trial_bracket[op[1]] = self._brackets[op[2]]
                self._rng.random()  # what choices() drew for it
            elif op[0] == "rung":
                self._brackets[op[1]].rungs[op[2]][1][op[3]] = op[4]
            elif op[0] == "stop":
                self._stopped.add(op[1])
                self.num_stopped += 1
            else:
                raise ValueError(f"{type(self).__name__}: unknown state update {op!r}")

    def on_trial_result(self, runner, trial, result: dict) -> str:
        metric, sign = self._require_metric()
        found, now = lookup(result, self.time_attr)
        if not found:
            raise ValueError(f"{type(self).__name__}: result of trial {trial} has no "
                             f"time_attr {self.time_attr!r}")
        if now >= self.max_t and self.stop_last_trials:
            return self.STOP
        if trial.trial_id in self._stopped:
            return self.STOP  # stopped at a rung before the driver was killed
        found, value = lookup(result, metric)
        if not found or value is None:
            return self.CONTINUE
        keep = self._record(trial.trial_id, now, sign * float(value))
        if keep:
            return self.CONTINUE
        self.num_stopped += 1
        self._stopped.add(trial.trial_id)
        self._ops.append(["stop", trial.trial_id])
        return self.STOP

    def _record(self, trial_id: str, now: float, value: float) -> bool:
        bracket = self._trial_bracket[trial_id]
        keep, rung = bracket.on_result(trial_id, now, value)
        if rung is not None:
            self._ops.append(["rung", self._brackets.index(bracket), rung, trial_id, value])
        return keep

    def on_trial_complete(self, runner, trial, result: dict) -> None:
        metric, sign = self._require_metric()
        found, value = lookup(result or {}, metric)
        if found and value is not None and trial.trial_id in self._trial_bracket:
            self._record(trial.trial_id, lookup(result, self.time_attr)[1] or 0,
                         sign * float(value))

    def debug_string(self) -> str:
        rungs = "; ".join(", ".join(f"{m:g}: {len(r)}" for m, r in b.rungs)
                          for b in self._brackets)
        return f"Using AsyncHyperBand: num_stopped={self.num_stopped}; rungs {rungs}"


ASHAScheduler = AsyncHyperBandScheduler

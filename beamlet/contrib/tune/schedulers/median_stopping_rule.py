"""The median stopping rule (Golovin et al., "Google Vizier", 2017): stop a
trial whose best result so far is worse than the median of the other trials'
running averages at the same point in time."""
from __future__ import annotations

import statistics

from ..stopper import lookup
from .trial_scheduler import FIFOScheduler

__all__ = ["MedianStoppingRule"]


class MedianStoppingRule(FIFOScheduler):
    """Once a trial's ``time_attr`` reaches ``grace_period``, and at least
    ``min_samples_required`` other trials have got as far, the trial stops if
    its best metric is worse than the median, over those trials, of their mean
    metric up to that time. ``min_time_slice`` is the least ``time_attr``
    between two judgements of one trial; with ``hard_stop=False`` the trial is
    paused instead of stopped."""

    def __init__(self, time_attr: str = "time_total_s", metric: str | None = None,
                 mode: str | None = None, grace_period: float = 60.0,
                 min_samples_required: int = 3, min_time_slice: float = 0,
                 hard_stop: bool = True):
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.time_attr = time_attr
        self.grace_period = grace_period
        self.min_samples_required = min_samples_required
        self.min_time_slice = min_time_slice
        self.hard_stop = hard_stop
        self._results: dict[str, list[tuple[float, float]]] = {}  # id -> [(time, value)]
        self._last_judged: dict[str, float] = {}
        self.stopped: set[str] = set()
        self._ops: list = []   # state changes not yet logged (pop_state_updates)

    def on_trial_add(self, runner, trial) -> None:
        self._require_metric()

    def on_trial_result(self, runner, trial, result: dict) -> str:
        metric, sign = self._require_metric()
        found_t, now = lookup(result, self.time_attr)
        found_v, value = lookup(result, metric)
        if not found_t or not found_v or value is None:
            return self.CONTINUE
        if self.hard_stop and trial.trial_id in self.stopped:
            return self.STOP  # stopped before the driver was killed
        mine = self._add_result(trial.trial_id, float(now), sign * float(value))
        self._ops.append(["result", trial.trial_id, float(now), sign * float(value)])
        if now < self.grace_period:
            return self.CONTINUE
        if now - self._last_judged.get(trial.trial_id, -float("inf")) < self.min_time_slice:
            return self.CONTINUE
        self._last_judged[trial.trial_id] = now
        self._ops.append(["judged", trial.trial_id, now])
        others = [values for tid, values in self._results.items()
                  if tid != trial.trial_id and values and values[-1][0] >= now]
        if len(others) < self.min_samples_required:
            return self.CONTINUE
        means = [statistics.fmean(v for t, v in values if t <= now) for values in others]
        best = max(v for _, v in mine)
        if best < statistics.median(means):
            self.stopped.add(trial.trial_id)
            self._ops.append(["stop", trial.trial_id])
            return self.STOP if self.hard_stop else self.PAUSE
        return self.CONTINUE

    def get_state(self) -> dict:
        return {"results": {k: list(v) for k, v in self._results.items()},
                "last_judged": dict(self._last_judged), "stopped": set(self.stopped)}

    def set_state(self, state: dict) -> None:
        self._results = {k: list(v) for k, v in state["results"].items()}
        self._last_judged = dict(state["last_judged"])
        self.stopped = set(state["stopped"])

    def _add_result(self, trial_id: str, now: float, value: float) -> list:
        mine = self._results.setdefault(trial_id, [])
        while mine and mine[-1][0] >= now:
            mine.pop()  # the trial went back to a checkpoint (a retry, a resume)
        mine.append((now, value))
        return mine

    def pop_state_updates(self) -> list:
        ops, self._ops = self._ops, []
        return ops

    def apply_state_updates(self, ops: list) -> None:
        """Ops: ``["result", trial, time, signed value]``, ``["judged", trial,
        time]``, ``["stop", trial]``."""
        for op in ops:
            if op[0] == "result":
                self._add_result(op[1], op[2], op[3])
            elif op[0] == "judged":
                self._last_judged[op[1]] = op[2]
            elif op[0] == "stop":
                self.stopped.add(op[1])
            else:
                raise ValueError(f"{type(self).__name__}: unknown state update {op!r}")

    def debug_string(self) -> str:
        return f"Using MedianStoppingRule: num_stopped={len(self.stopped)}."

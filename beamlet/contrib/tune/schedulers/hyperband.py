"""Synchronous HyperBand (Li et al., "Hyperband", JMLR 2018).

Trials are put in brackets as they are added. Bracket ``s`` (from
``s_max`` down to 0, then again) takes ``n0 = ceil((s_max + 1) / (s + 1) *
eta**s)`` trials and first gives each ``r0 = max_t * eta**-s`` of
``time_attr``. A trial reaching its bracket's milestone is paused (its
actor saves a checkpoint and stops); once every live trial of the bracket
is at the milestone, the best ``1/eta`` of them resume from their
checkpoints with ``eta`` times the budget, and the others stop. Trials that
reach ``max_t`` stop. Trainables must checkpoint (a class trainable's
``save_checkpoint``, or a function reporting ``checkpoint=``), or a resumed
trial starts over.
"""
from __future__ import annotations

import math

from ..stopper import lookup
from .trial_scheduler import FIFOScheduler

__all__ = ["HyperBandScheduler"]


class _Bracket:
    def __init__(self, n0: int, r0: float, eta: float, max_t: float):
        self.capacity = n0
        self.eta = eta
        self.max_t = max_t
        self.milestone = min(r0, max_t)
        self.trials: list[str] = []          # trial ids, in the order added
        self.live: set[str] = set()          # trial ids not finished nor stopped
        self.recorded: dict[str, float] = {}  # at the current milestone

    def full(self) -> bool:
        return len(self.trials) >= self.capacity

    def rung_complete(self) -> bool:
        return bool(self.live) and all(tid in self.recorded for tid in self.live)

    def promote(self) -> tuple[set[str], set[str]]:
        """``(keep, drop)`` at the completed milestone; moves to the next one."""
        ranked = sorted((tid for tid in self.live), key=lambda tid: self.recorded[tid],
                        reverse=True)
        count = max(1, int(len(ranked) / self.eta))
        keep, drop = set(ranked[:count]), set(ranked[count:])
        self.live = set(keep)
        self.recorded = {}
        self.milestone = min(self.milestone * self.eta, self.max_t)
        return keep, drop

    def get_state(self) -> dict:
        return {"capacity": self.capacity, "milestone": self.milestone,
                "trials": list(self.trials), "live": sorted(self.live),
                "recorded": dict(self.recorded)}

    @classmethod
    def from_state(cls, state: dict, eta: float, max_t: float) -> "_Bracket":
        bracket = cls(state["capacity"], state["milestone"], eta, max_t)
        bracket.trials = list(state["trials"])
        bracket.live = set(state["live"])
        bracket.recorded = {tid: float(v) for tid, v in state["recorded"].items()}
        return bracket


class HyperBandScheduler(FIFOScheduler):
    """HyperBand (see the module docstring); ``reduction_factor`` is eta."""

    def __init__(self, time_attr: str = "training_iteration", metric: str | None = None,
                 mode: str | None = None, max_t: float = 81, reduction_factor: float = 3,
                 stop_last_trials: bool = True):
        if max_t <= 0:
            raise ValueError(f"max_t must be > 0, got {max_t!r}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor!r}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.time_attr = time_attr
        self.max_t = max_t
        self.eta = reduction_factor
        self.stop_last_trials = stop_last_trials
        self._s_max_1 = int(round(math.log(max_t) / math.log(reduction_factor))) + 1
        self._next_s = self._s_max_1 - 1
        self._brackets: list[_Bracket] = []
        self._of: dict[str, _Bracket] = {}
        self._resumable: set[str] = set()
        self._trials: dict = {}              # trial id -> Trial, of trials added
        self.num_stopped = 0
        self.state_changes = 0

    def _new_bracket(self) -> _Bracket:
        s = self._next_s
        self._next_s = s - 1 if s > 0 else self._s_max_1 - 1
        n0 = int(math.ceil(self._s_max_1 / (s + 1) * self.eta ** s))
        bracket = _Bracket(n0, self.max_t * self.eta ** -s, self.eta, self.max_t)
        self._brackets.append(bracket)
        return bracket

    def get_state(self) -> dict:
        return {"next_s": self._next_s, "num_stopped": self.num_stopped,
                "brackets": [b.get_state() for b in self._brackets],
                "resumable": sorted(self._resumable)}

    def set_state(self, state: dict) -> None:
        self._next_s = state["next_s"]
        self.num_stopped = state["num_stopped"]
        self._brackets = [_Bracket.from_state(b, self.eta, self.max_t)
                          for b in state["brackets"]]
        self._of = {tid: b for b in self._brackets for tid in b.trials}
        self._resumable = set(state["resumable"])

    def on_trial_add(self, runner, trial) -> None:
        self._require_metric()
        self._trials[trial.trial_id] = trial
        bracket = self._of.get(trial.trial_id)
        if bracket is not None:  # resumed, with its bracket restored
            if trial.status == "PAUSED" and trial.trial_id in bracket.live and \
                    trial.trial_id not in bracket.recorded:
                self._resumable.add(trial.trial_id)  # not waiting at a milestone: go on
            return
        bracket = self._brackets[-1] if self._brackets and not self._brackets[-1].full() \
            else self._new_bracket()
        bracket.trials.append(trial.trial_id)
        bracket.live.add(trial.trial_id)
        self._of[trial.trial_id] = bracket
        self.state_changes += 1

    def on_trial_result(self, runner, trial, result: dict) -> str:
        metric, sign = self._require_metric()
        now = lookup(result, self.time_attr)[1]
        if now is None:
            raise ValueError(f"HyperBandScheduler: result of trial {trial} has no time_attr "
                             f"{self.time_attr!r}")
        if now >= self.max_t and self.stop_last_trials:
            return self.STOP
        bracket = self._of[trial.trial_id]
        if trial.trial_id not in bracket.live:
            return self.STOP  # dropped before the driver was killed
        if trial.trial_id in self._resumable:
            self._resumable.discard(trial.trial_id)  # it runs again
            self.state_changes += 1
        if now < bracket.milestone:
            return self.CONTINUE
        value = lookup(result, metric)[1]
        bracket.recorded[trial.trial_id] = sign * float(value) if value is not None \
            else -math.inf
        self.state_changes += 1
        if not bracket.rung_complete():
            return self.PAUSE
        return self._promote(runner, bracket, current=trial)

    def _promote(self, runner, bracket: _Bracket, current=None) -> str:
        keep, drop = bracket.promote()
        self.state_changes += 1
        action = self.CONTINUE
        for tid in bracket.trials:
            trial = self._trials.get(tid)
            if tid in drop:
                self.num_stopped += 1
                if trial is current:
                    action = self.STOP
                elif trial is not None and not trial.is_finished():
                    runner.stop_trial(trial)
            elif tid in keep and trial is not current:
                self._resumable.add(tid)
        return action

    def _forget(self, runner, trial) -> None:
        bracket = self._of.get(trial.trial_id)
        if bracket is None or trial.trial_id not in bracket.live:
            return
        bracket.live.discard(trial.trial_id)
        bracket.recorded.pop(trial.trial_id, None)
        self._resumable.discard(trial.trial_id)
        self.state_changes += 1
        if bracket.rung_complete():
            self._promote(runner, bracket)

    def on_trial_complete(self, runner, trial, result: dict) -> None:
        self._forget(runner, trial)

    def on_trial_error(self, runner, trial) -> None:
        self._forget(runner, trial)

    def on_trial_remove(self, runner, trial) -> None:
        self._forget(runner, trial)

    def _dropped(self, runner, trial) -> bool:
        """Whether the trial's bracket dropped it (known only on resume, when the
        killed driver had not logged it stopped): then it is stopped now."""
        bracket = self._of.get(trial.trial_id)
        if bracket is None or trial.trial_id in bracket.live:
            return False
        runner.stop_trial(trial)
        return True

    def choose_trial_to_run(self, runner):
        # A resumable trial stays so until its next result: a driver killed
        # after starting it leaves it PAUSED in the log, and resumable.
        for trial in runner.get_trials():
            if trial.status == "PENDING" and not self._dropped(runner, trial) and \
                    runner.has_resources_for_trial(trial):
                return trial
        for trial in runner.get_trials():
            if trial.status == "PAUSED" and not self._dropped(runner, trial) and \
                    trial.trial_id in self._resumable and runner.has_resources_for_trial(trial):
                return trial
        return None

    def debug_string(self) -> str:
        return (f"Using HyperBand: {len(self._brackets)} bracket(s), "
                f"num_stopped={self.num_stopped}")

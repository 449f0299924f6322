"""The scheduler interface, and the FIFO scheduler (every trial runs to its end).

The runner asks the scheduler about every result that did not end its trial:
``on_trial_result`` returns ``CONTINUE``, ``PAUSE`` (the trial's actor stops
after saving a checkpoint; the trial is PAUSED until the scheduler chooses it
again, when it restarts from that checkpoint) or ``STOP``.
"""
from __future__ import annotations

__all__ = ["TrialScheduler", "FIFOScheduler"]


class TrialScheduler:
    """The interface a scheduler implements. ``runner`` is the TrialRunner:
    ``runner.get_trials()``, ``runner.has_resources_for_trial(trial)``,
    ``runner.stop_trial(trial)``, ``runner.save_trial(trial)``."""

    CONTINUE = "CONTINUE"
    PAUSE = "PAUSE"
    STOP = "STOP"

    metric: str | None = None
    mode: str | None = None
    #: A scheduler whose state must survive a killed driver exactly (not only as
    #: of the last periodic save) adds 1 each time :meth:`get_state` would change;
    #: the runner then appends that state to the experiment's log before logging
    #: the trials concerned, and :meth:`get_state` must return JSON data.
    state_changes: int = 0

    def pop_state_updates(self) -> list:
        """The changes of the scheduler's state since the last call, as JSON ops
        the runner appends to the experiment's log (before the trial lines
        they concern) and gives back to :meth:`apply_state_updates` on resume.
        For a scheduler whose state grows with the trials (ASHA, the median
        rule): constant work per change, where logging the whole state would
        grow with the experiment. Default: none."""
        return []

    def apply_state_updates(self, ops: list) -> None:
        """Replay :meth:`pop_state_updates`' ops, in order (on resume, after
        :meth:`set_state` with the latest whole state, if any)."""
        if ops:
            raise NotImplementedError(f"{type(self).__name__} logs no state updates")

    def set_search_properties(self, metric: str | None, mode: str | None) -> bool:
        """Take tune.run's metric and mode unless the scheduler has its own."""
        if self.metric is None:
            self.metric = metric
        if self.mode is None:
            self.mode = mode
        return True

    def _require_metric(self) -> tuple[str, float]:
        """``(metric, sign)``: sign is +1 for "max", -1 for "min" (so larger is
        better after multiplying); raises if the metric or mode is unknown."""
        if not self.metric or self.mode not in ("min", "max"):
            raise ValueError(f"{type(self).__name__} needs a metric and a mode ('min' or "
                             f"'max'): give them to the scheduler or to tune.run()")
        return self.metric, (1.0 if self.mode == "max" else -1.0)

    def on_trial_add(self, runner, trial) -> None:
        """A trial was added (PENDING)."""

    def on_trial_result(self, runner, trial, result: dict) -> str:
        """A RUNNING trial reported a result that did not end it."""
        return self.CONTINUE

    def on_trial_complete(self, runner, trial, result: dict) -> None:
        """A trial ended normally (TERMINATED)."""

    def on_trial_error(self, runner, trial) -> None:
        """A trial failed (ERROR)."""

    def on_trial_remove(self, runner, trial) -> None:
        """A trial was stopped by the experiment (stop_all, time budget, fail_fast)."""

    def choose_trial_to_run(self, runner):
        """The next PENDING (or PAUSED) trial to start, or None."""
        raise NotImplementedError

    def get_state(self) -> dict | None:
        """What ``resume`` needs to go on deciding as before (picklable, trial ids
        rather than trials), or None if the scheduler does not keep it."""
        return None

    def set_state(self, state: dict) -> None:
        """Take back :meth:`get_state`'s state (before the trials are re-added)."""

    def debug_string(self) -> str:
        return type(self).__name__


class FIFOScheduler(TrialScheduler):
    """Starts trials in the order they were added, each as soon as its resources
    fit; then PAUSED trials, in order.

    Choosing is not a scan of every trial: a cursor skips the trials that have
    started (reset when the runner puts a trial back to PENDING, for a retry),
    and when every trial asks for the same resources only the first PENDING
    one is checked."""

    def __init__(self):
        self._cursor = 0
        self._requeues = 0
        self._keys: set = set()
        self._added = 0

    def on_trial_add(self, runner, trial) -> None:
        self._keys.add(tuple(sorted(trial.resources.items())))
        self._added += 1

    def choose_trial_to_run(self, runner):
        trials = runner.get_trials()
        # Subclasses need not call __init__: hence the getattr defaults.
        if getattr(runner, "requeue_count", 0) != getattr(self, "_requeues", 0):
            self._requeues = runner.requeue_count
            self._cursor = 0
        cursor = getattr(self, "_cursor", 0)
        while cursor < len(trials) and trials[cursor].status != "PENDING":
            cursor += 1
        self._cursor = cursor
        uniform = len(getattr(self, "_keys", ())) == 1 and \
            getattr(self, "_added", 0) == len(trials)
        misfits: set = set()
        for trial in trials[cursor:]:
            if trial.status != "PENDING":
                continue
            key = tuple(sorted(trial.resources.items()))
            if key in misfits:
                continue
            if runner.has_resources_for_trial(trial):
                return trial
            if uniform:
                break
            misfits.add(key)
        paused = runner.paused_trials() if hasattr(runner, "paused_trials") else trials
        for trial in paused:
            if trial.status == "PAUSED" and runner.has_resources_for_trial(trial):
                return trial
        return None

    def debug_string(self) -> str:
        return "Using FIFO scheduling algorithm."

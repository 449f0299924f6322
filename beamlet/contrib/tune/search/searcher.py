"""The Searcher interface (Ray's ``ray.tune.search.Searcher``) and ConcurrencyLimiter.

A searcher suggests one config at a time, for a trial id, and learns from
that trial's results: the runner asks ``suggest(trial_id)`` whenever it
wants a new trial (so later suggestions see earlier results) and reports
back with ``on_trial_result`` and ``on_trial_complete``. ``suggest`` returns
a config (a dict of the searched values), None (nothing now: ask again
later) or :data:`Searcher.FINISHED` (no more trials).
"""
from __future__ import annotations

import os
import pickle

__all__ = ["Searcher", "ConcurrencyLimiter"]


class Searcher:
    """Subclass and implement ``suggest`` and ``on_trial_complete``.
    ``metric``/``mode`` default to tune.run's (``set_search_properties``)."""

    FINISHED = "FINISHED"

    def __init__(self, metric: str | None = None, mode: str | None = None):
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self._metric = metric
        self._mode = mode

    @property
    def metric(self) -> str | None:
        return self._metric

    @property
    def mode(self) -> str | None:
        return self._mode

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec) -> bool:
        """Take tune.run's metric, mode and config (the search space) where the
        searcher has none of its own; False if it cannot use them."""
        if self._metric is None:
            self._metric = metric
        if self._mode is None:
            self._mode = mode
        return True

    def suggest(self, trial_id: str):
        """A config for a new trial `trial_id`, None (not now) or FINISHED."""
        raise NotImplementedError(f"{type(self).__name__} must implement suggest()")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """An intermediate result of a trial this searcher suggested."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """The trial ended: `result` is its last result (None if it had none),
        `error` whether it failed."""

    def get_state(self) -> dict:
        """The searcher's state, for :meth:`save` (default: its attributes)."""
        return dict(self.__dict__)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        """Write the searcher's state to file `checkpoint_path` (atomically)."""
        tmp = checkpoint_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.get_state(), f)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class ConcurrencyLimiter(Searcher):
    """At most `max_concurrent` trials of `searcher` unfinished at a time (with
    ``batch=True``, a new round of suggestions only once all are finished)."""

    def __init__(self, searcher: Searcher, max_concurrent: int, batch: bool = False):
        if not isinstance(searcher, Searcher):
            raise TypeError(f"ConcurrencyLimiter wraps a tune Searcher, got {searcher!r:.80}")
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or \
                max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        super().__init__(searcher.metric, searcher.mode)
        self.searcher = searcher
        self.max_concurrent = max_concurrent
        self.batch = batch
        self.live: set[str] = set()
        self._filling = True

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def suggest(self, trial_id: str):
        if len(self.live) >= self.max_concurrent or (self.batch and not self._filling):
            return None
        config = self.searcher.suggest(trial_id)
        if isinstance(config, dict):
            self.live.add(trial_id)
            if len(self.live) >= self.max_concurrent:
                self._filling = False
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        self.live.discard(trial_id)
        if not self.live:
            self._filling = True
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"live": set(self.live), "filling": self._filling,
                "searcher": self.searcher.get_state()}

    def set_state(self, state: dict) -> None:
        self.live = set(state["live"])
        self._filling = state["filling"]
        self.searcher.set_state(state["searcher"])

"""Search algorithms: what makes an experiment's trial configs.

The runner asks an experiment's search algorithm for the next trial's config
(``next_trial(trial_id)``) and tells it about results and ends. Two kinds:

* :class:`BasicVariantGenerator`: grid and random search, all variants of
  the config ``num_samples`` times (Ray's default);
* :class:`SearchGenerator`: a :class:`~.searcher.Searcher` (Optuna, your
  own...) suggesting one config at a time from what it has seen; the runner
  asks only when no trial of the experiment is waiting to start, so later
  suggestions learn from earlier results.
"""
from __future__ import annotations

import copy
from typing import Any

from ..result import flatten_dict
from ..search_space import is_grid_search
from ..variant_generator import count_variants, generate_variants
from .searcher import Searcher

__all__ = ["SearchAlgorithm", "BasicVariantGenerator", "SearchGenerator", "as_search_alg"]


class SearchAlgorithm:
    """The protocol the runner uses (see the module docstring)."""

    #: How many of the experiment's trials may wait (PENDING) at once; None: any.
    max_pending: int | None = None
    #: Whether results change its state (then it is saved as trials end, for resume).
    learns: bool = False

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec) -> bool:
        return True

    def add_configurations(self, config: dict, num_samples: int, seed: int | None) -> None:
        """The experiment's config (with its search spaces) and sample count."""
        raise NotImplementedError

    @property
    def total(self) -> int | None:
        """How many trials there will be, if known."""
        return None

    def next_trial(self, trial_id: str) -> tuple[dict, dict] | None:
        """``(config, searched params)`` for new trial `trial_id`, or None (none now)."""
        raise NotImplementedError

    def is_finished(self) -> bool:
        raise NotImplementedError

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass


class BasicVariantGenerator(SearchAlgorithm):
    """Grid and random search. ``points_to_evaluate``: configs (partial dicts)
    to try first, each merged over the config; ``random_state``: a seed
    (tune.run's ``seed`` is used if None); ``max_concurrent``: at most this
    many of its trials running (0: no limit)."""

    def __init__(self, points_to_evaluate: list[dict] | None = None, max_concurrent: int = 0,
                 constant_grid_search: bool = False, random_state: int | None = None):
        if points_to_evaluate is not None and not all(isinstance(p, dict)
                                                      for p in points_to_evaluate):
            raise TypeError("points_to_evaluate must be a list of dicts")
        self._points = [dict(p) for p in points_to_evaluate or []]
        self.max_concurrent = max_concurrent
        self._seed = random_state
        self._variants = None
        self._total = 0
        self._finished = False
        self._buffer: list = []
        self._emitted = 0
        self._live: set[str] = set()

    def add_configurations(self, config, num_samples, seed) -> None:
        if self._variants is not None:
            raise ValueError("a BasicVariantGenerator serves one experiment")
        seed = self._seed if self._seed is not None else seed
        self._variants = generate_variants(config, num_samples, seed)
        points = [generate_variants(_merge(config, p), 1, seed) for p in self._points]
        self._buffer = [next(iter(g)) for g in points]
        self._total = count_variants(config or {}) * num_samples + len(self._buffer)

    @property
    def total(self) -> int:
        return self._total

    def next_trial(self, trial_id):
        if self.max_concurrent and len(self._live) >= self.max_concurrent:
            return None
        if self._buffer:
            item = self._buffer.pop(0)
        else:
            try:
                item = next(self._variants)
            except StopIteration:
                self._finished = True
                return None
        self._emitted += 1
        if self.max_concurrent:
            self._live.add(trial_id)
        return item

    def is_finished(self) -> bool:
        return self._finished

    def on_trial_complete(self, trial_id, result=None, error=False) -> None:
        self._live.discard(trial_id)

    def get_state(self) -> dict:
        return {"emitted": self._emitted}

    def set_state(self, state: dict) -> None:
        """Skip the variants made before: a resumed experiment makes only the
        rest (the same ones with a seed; new random samples without)."""
        for _ in range(state.get("emitted", 0)):
            if self._buffer:
                self._buffer.pop(0)
            elif next(self._variants, None) is None:
                self._finished = True
                break
            self._emitted += 1


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and \
                not is_grid_search(out[key]):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _has_grid(value: Any) -> bool:
    if is_grid_search(value):
        return True
    if isinstance(value, dict):
        return any(_has_grid(v) for v in value.values())
    return False


class SearchGenerator(SearchAlgorithm):
    """Trials from a :class:`Searcher`, ``num_samples`` of them (or until it
    says FINISHED)."""

    max_pending = 1
    learns = True

    def __init__(self, searcher: Searcher):
        if not isinstance(searcher, Searcher):
            raise TypeError(f"expected a tune Searcher, got {searcher!r:.80}")
        self.searcher = searcher
        self._config: dict = {}
        self._num_samples = 1
        self._seed = None
        self._count = 0
        self._finished = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, config, num_samples, seed) -> None:
        if _has_grid(config):
            raise ValueError(f"{type(self.searcher).__name__} does not take grid_search "
                             f"values in the config; use tune.choice()")
        self._config = config or {}
        self._num_samples = num_samples
        self._seed = seed

    @property
    def total(self) -> int:
        return self._num_samples

    def next_trial(self, trial_id):
        if self._finished:
            return None
        if self._count >= self._num_samples:
            self._finished = True
            return None
        suggested = self.searcher.suggest(trial_id)
        if suggested == Searcher.FINISHED:
            self._finished = True
            return None
        if suggested is None:
            return None
        if not isinstance(suggested, dict):
            raise TypeError(f"{type(self.searcher).__name__}.suggest() returned "
                            f"{suggested!r:.80}; expected a dict, None or FINISHED")
        self._count += 1
        merged = _merge(self._config, suggested)
        seed = None if self._seed is None else self._seed + self._count
        config, params = next(iter(generate_variants(merged, 1, seed)))
        params = dict(flatten_dict(suggested), **params)
        return config, params

    def is_finished(self) -> bool:
        return self._finished

    def on_trial_result(self, trial_id, result) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"count": self._count, "finished": self._finished,
                "searcher": self.searcher.get_state()}

    def set_state(self, state: dict) -> None:
        self._count = state["count"]
        self._finished = state["finished"]
        self.searcher.set_state(state["searcher"])


def as_search_alg(search_alg: Any) -> SearchAlgorithm:
    """A SearchAlgorithm from tune.run's ``search_alg`` (None: grid/random search)."""
    if search_alg is None:
        return BasicVariantGenerator()
    if isinstance(search_alg, SearchAlgorithm):
        return search_alg
    if isinstance(search_alg, Searcher):
        return SearchGenerator(search_alg)
    raise TypeError(f"search_alg must be a tune Searcher or search algorithm, got "
                    f"{search_alg!r:.80}")


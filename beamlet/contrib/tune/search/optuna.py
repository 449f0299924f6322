"""OptunaSearch: Optuna's samplers (TPE by default) as a tune Searcher.

Needs the optional extra ``pip install 'beamlet[optuna]'``. The search space
is tune's (``tune.uniform``, ``loguniform``, ``randint``, ``choice``...) from
the config, or Optuna distributions given as ``space``. Uses Optuna's
ask-and-tell interface: ``suggest`` asks the study for a trial,
``on_trial_complete`` tells it the trial's metric (or that it failed).
"""
from __future__ import annotations

from typing import Any

from ..search_space import Categorical, Domain, Float, Function, Integer
from ..stopper import lookup
from .searcher import Searcher

__all__ = ["OptunaSearch"]


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("OptunaSearch needs optuna: pip install 'beamlet[optuna]'") from None
    return optuna


def _flatten_space(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten_space(value, name))
        elif isinstance(value, Domain) and not isinstance(value, Function):
            out[name] = value
    return out


def _to_distribution(optuna, name: str, domain: Domain):
    dist = optuna.distributions
    if isinstance(domain, Categorical):
        return dist.CategoricalDistribution(domain.categories)
    if isinstance(domain, Float):
        if domain.log and domain.q:
            raise ValueError(f"OptunaSearch: {name!r}: a quantized log-uniform space has no "
                             f"Optuna distribution")
        return dist.FloatDistribution(domain.lower, domain.upper, log=domain.log,
                                      step=domain.q or None)
    if isinstance(domain, Integer):
        upper = domain.upper if domain.include_upper else domain.upper - 1
        return dist.IntDistribution(domain.lower, upper, log=domain.log, step=domain.q or 1)
    raise ValueError(f"OptunaSearch cannot search {name!r}: {type(domain).__name__} has no "
                     f"Optuna distribution (use uniform, loguniform, randint or choice)")


def _unflatten(params: dict) -> dict:
    out: dict = {}
    for name, value in params.items():
        node = out
        parts = name.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


class OptunaSearch(Searcher):
    """``OptunaSearch(space=None, metric=None, mode=None, points_to_evaluate=None,
    sampler=None, seed=None)``: ``space`` maps names (``a/b`` for nested
    keys) to Optuna distributions; None takes tune's search spaces from the
    config. ``sampler`` defaults to ``TPESampler(seed=seed)``."""

    def __init__(self, space: dict | None = None, metric: str | None = None,
                 mode: str | None = None, points_to_evaluate: list[dict] | None = None,
                 sampler=None, seed: int | None = None):
        super().__init__(metric, mode)
        self._optuna = _import_optuna()
        self._space = dict(space) if space else None
        self._points = list(points_to_evaluate or [])
        self._sampler = sampler
        self._seed = seed
        self._study = None
        self._live: dict[str, Any] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        super().set_search_properties(metric, mode, config)
        if self._space is None:
            space = _flatten_space(config or {})
            self._space = {name: _to_distribution(self._optuna, name, d)
                           for name, d in space.items()}
        return True

    def _setup_study(self) -> None:
        if not self.metric or self.mode not in ("min", "max"):
            raise ValueError("OptunaSearch needs a metric and a mode: give them to "
                             "OptunaSearch or to tune.run()")
        if not self._space:
            raise ValueError("OptunaSearch has no search space: put tune.uniform/choice/... "
                             "values in the config, or pass space=")
        optuna = self._optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = self._sampler or optuna.samplers.TPESampler(seed=self._seed)
        self._study = optuna.create_study(
            sampler=sampler, direction="maximize" if self.mode == "max" else "minimize")
        for point in self._points:
            self._study.enqueue_trial(point)

    def suggest(self, trial_id: str):
        if self._study is None:
            self._setup_study()
        trial = self._study.ask(fixed_distributions=self._space)
        self._live[trial_id] = trial
        return _unflatten(trial.params)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        trial = self._live.pop(trial_id, None)
        if trial is None:
            return
        value = None if result is None else lookup(result, self.metric)[1]
        if error or value is None:
            self._study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(trial, float(value))

    def get_state(self) -> dict:
        # Optuna's study and trials pickle; the module itself does not.
        state = dict(self.__dict__)
        state.pop("_optuna")
        return state

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)
        self._optuna = _import_optuna()


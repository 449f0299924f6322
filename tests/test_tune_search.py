"""beamlet.tune's search algorithms: the Searcher interface with trials made as
results come in, ConcurrencyLimiter, BasicVariantGenerator's options, and
searchers and schedulers from plugins."""
from __future__ import annotations

import importlib.util
import sys

import cloudpickle
import pytest

from test_tune import on_backend, storage  # noqa: F401 - fixtures

from beamlet import tune
from beamlet.contrib.tune import plugins as tune_plugins
from beamlet.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def peak_at_seven(config):
    tune.report(score=-(config["x"] - 7) ** 2, lr=config["lr"])


class HillClimber(Searcher):
    """Tries x = 0, 1, 2, ... while the score improves: each suggestion needs
    the previous trial's result."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.next_x = 0
        self.best = None
        self.waiting = False
        self.suggested: list = []

    def suggest(self, trial_id):
        if self.next_x is None:
            return Searcher.FINISHED
        if self.waiting:
            return None
        self.waiting = True
        self.suggested.append(self.next_x)
        return {"x": self.next_x}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.waiting = False
        score = result[self.metric]
        if self.best is None or score > self.best:
            self.best = score
            self.next_x += 1
        else:
            self.next_x = None


def test_searcher_suggests_from_the_results_so_far(on_backend, storage):
    climber = HillClimber()
    analysis = tune.run(peak_at_seven, config={"lr": 0.5}, num_samples=50,
                        search_alg=ConcurrencyLimiter(climber, max_concurrent=1),
                        metric="score", mode="max", storage_path=storage, verbose=0)
    assert climber.metric == "score"  # from tune.run
    assert [t.config["x"] for t in analysis.trials] == list(range(9))
    assert all(t.config["lr"] == 0.5 for t in analysis.trials)  # the config's constants
    assert analysis.best_config == {"x": 7, "lr": 0.5}
    assert climber.suggested == list(range(9))


class Fixed(Searcher):
    def __init__(self, values):
        super().__init__(metric="score", mode="max")
        self.values = list(values)
        self.live: set = set()
        self.most_live = 0

    def suggest(self, trial_id):
        if not self.values:
            return Searcher.FINISHED
        self.live.add(trial_id)
        self.most_live = max(self.most_live, len(self.live))
        return {"x": self.values.pop(0)}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.live.discard(trial_id)


def test_concurrency_limiter_and_num_samples(on_backend, storage):
    searcher = Fixed(range(10))
    analysis = tune.run(peak_at_seven, config={"lr": tune.uniform(0, 1)}, num_samples=6,
                        search_alg=ConcurrencyLimiter(searcher, max_concurrent=2),
                        storage_path=storage, verbose=0)
    assert [t.config["x"] for t in analysis.trials] == list(range(6))  # num_samples
    assert all(0 <= t.config["lr"] < 1 for t in analysis.trials)  # the rest sampled
    assert 1 <= searcher.most_live <= 2
    with pytest.raises(ValueError, match="max_concurrent"):
        ConcurrencyLimiter(searcher, max_concurrent=0)


def test_searcher_state_saves_and_restores(tmp_path):
    climber = HillClimber(metric="score", mode="max")
    climber.suggest("a")
    climber.on_trial_complete("a", {"score": 1})
    climber.save(str(tmp_path / "searcher.pkl"))
    other = HillClimber()
    other.restore(str(tmp_path / "searcher.pkl"))
    assert (other.next_x, other.best, other.metric) == (1, 1, "score")


def test_basic_variant_generator_points_to_evaluate(on_backend, storage):
    search = BasicVariantGenerator(points_to_evaluate=[{"x": 7}], max_concurrent=1)
    analysis = tune.run(peak_at_seven, config={"x": tune.randint(0, 5), "lr": 0.1},
                        num_samples=3, search_alg=search, storage_path=storage, verbose=0)
    xs = [t.config["x"] for t in analysis.trials]
    assert len(xs) == 4 and xs[0] == 7 and all(0 <= x < 5 for x in xs[1:])


def test_searcher_rejects_grid_search(storage):
    with pytest.raises(ValueError, match="grid_search"):
        tune.run(peak_at_seven, config={"x": tune.grid_search([1, 2])},
                 search_alg=HillClimber(), storage_path=storage, verbose=0)


def test_searchers_and_schedulers_from_plugins():
    class Plugin:
        @tune_plugins.hookimpl
        def beamlet_tune_searchers(self):
            return {"climber": HillClimber}

        @tune_plugins.hookimpl
        def beamlet_tune_schedulers(self):
            return {"my_asha": tune.schedulers.ASHAScheduler}

    plugin = Plugin()
    tune_plugins.register(plugin)
    try:
        assert isinstance(tune.create_searcher("climber", metric="m"), HillClimber)
        assert isinstance(tune.create_scheduler("my_asha", max_t=5),
                          tune.schedulers.ASHAScheduler)
        assert isinstance(tune.create_scheduler("asha"), tune.schedulers.ASHAScheduler)
        with pytest.raises(ValueError, match="unknown searcher 'nope'"):
            tune.create_searcher("nope")
    finally:
        tune_plugins.unregister(plugin)


def parabola_at_three(config):
    tune.report(loss=(config["x"] - 3) ** 2 + (0 if config["kind"] == "a" else 1))


def test_optuna_search_finds_the_minimum(inprocess, storage):
    if importlib.util.find_spec("optuna") is None:
        pytest.skip("optuna is not installed: it is the optional extra beamlet[optuna], "
                    "not part of beamlet[test] (it brings sqlalchemy and alembic)")
    from beamlet.tune.search.optuna import OptunaSearch

    search = OptunaSearch(seed=0)
    analysis = tune.run(parabola_at_three, search_alg=search, num_samples=25,
                        config={"x": tune.uniform(0, 10), "kind": tune.choice(["a", "b"])},
                        metric="loss", mode="min", storage_path=storage, verbose=0)
    assert len(analysis.trials) == 25
    best = analysis.best_config
    assert best["kind"] == "a" and abs(best["x"] - 3) < 1
    assert tune.create_searcher("optuna", metric="loss", mode="min") is not None

"""beamlet.tune's modern front end: Tuner / TuneConfig / RunConfig / ResultGrid,
tune.with_parameters and tune.with_resources."""
from __future__ import annotations

import importlib.util
import sys
import tempfile

import cloudpickle
import numpy as np
import pytest

from test_tune import on_backend, storage  # noqa: F401 - fixtures

from beamlet import tune

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def quadratic(config):
    if config["x"] == 99:
        raise ValueError("x=99 fails on purpose")
    for step in range(1, 4):
        with tempfile.TemporaryDirectory() as d:
            tune.report({"loss": (config["x"] - 2) ** 2 + 1 / step},
                        checkpoint=tune.Checkpoint.from_dict({"step": step}, d))


def test_tuner_fit_returns_a_result_grid(on_backend, storage):
    tuner = tune.Tuner(
        quadratic, param_space={"x": tune.grid_search([0, 2, 3, 99])},
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(name="tuner", storage_path=storage, verbose=0,
                                  stop={"training_iteration": 2},
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    assert grid is tuner.get_results()
    assert len(grid) == 4 and grid.num_errors == 1 and grid.num_terminated == 3
    assert "x=99 fails on purpose" in str(grid.errors[0])
    best = grid.get_best_result()
    assert best.config == {"x": 2}
    assert best.metrics["training_iteration"] == 2 and best.metrics["loss"] == 0.5
    assert best.checkpoint.to_dict() == {"step": 2}
    assert best.path.startswith(grid.experiment_path)
    assert grid.get_best_result(metric="loss", mode="max").config == {"x": 0}
    assert [r.config["x"] for r in grid] == [0, 2, 3, 99]
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pandas"):
            grid.get_dataframe()


def test_tuner_checks_its_arguments():
    with pytest.raises(TypeError, match="tune_config"):
        tune.Tuner(quadratic, tune_config={"metric": "loss"})
    with pytest.raises(TypeError, match="param_space"):
        tune.Tuner(quadratic, param_space=[1])


def uses_data(config, data, offset):
    tune.report(total=float(data.sum()) + offset, x=config["x"])


def test_with_parameters_passes_objects_through_the_store(on_backend, storage):
    data = np.arange(100_000, dtype=np.float64)
    trainable = tune.with_parameters(uses_data, data=data, offset=1)
    analysis = tune.run(trainable, config={"x": tune.grid_search([1, 2])},
                        storage_path=storage, verbose=0)
    assert [t.last_result["total"] for t in analysis.trials] == [data.sum() + 1] * 2
    assert analysis.trials[0].trainable_name == "uses_data"


class Holder(tune.Trainable):
    def setup(self, config, scale):
        self.scale = scale

    def step(self):
        return {"value": self.scale * self.config["x"], "done": True}


def test_with_parameters_and_with_resources_on_class_trainables(on_backend, storage):
    trainable = tune.with_resources(tune.with_parameters(Holder, scale=10), {"cpu": 0.5})
    analysis = tune.run(trainable, config={"x": 3}, storage_path=storage, verbose=0)
    (trial,) = analysis.trials
    assert trial.last_result["value"] == 30
    assert trial.resources == {"CPU": 0.5}
    fn = tune.with_resources(quadratic, {"cpu": 2})
    analysis = tune.run(fn, config={"x": 2}, storage_path=storage, verbose=0)
    assert analysis.trials[0].resources == {"CPU": 2.0}
    with pytest.raises(ValueError, match="resource"):
        tune.with_resources(quadratic, {"cpu": -1})

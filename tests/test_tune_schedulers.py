"""beamlet.tune's schedulers on synthetic objectives whose right answer is known:
ASHA, the median stopping rule, HyperBand (pausing and resuming from
checkpoints) and population based training."""
from __future__ import annotations

import os
import pickle
import sys
import tempfile

import cloudpickle
import pytest

from test_tune import on_backend, read_results, storage  # noqa: F401 - fixtures

from beamlet import tune
from beamlet.contrib.tune.experiment_state import ExperimentStateLog
from beamlet.tune.schedulers import (ASHAScheduler, AsyncHyperBandScheduler,
                                     HyperBandScheduler, MedianStoppingRule,
                                     PopulationBasedTraining)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def linear(config):
    """score = x * t: the trial with the largest x is the best at every t."""
    for t in range(1, 1000):
        tune.report(score=config["x"] * t)


def constant(config):
    for _ in range(6):
        tune.report(loss=-config["x"])


def checkpointed_linear(config):
    """linear, resuming from its checkpoint: ``step`` is its own counter."""
    checkpoint = tune.get_checkpoint()
    step = checkpoint.to_dict()["step"] if checkpoint else 0
    while True:
        step += 1
        with tempfile.TemporaryDirectory() as d:
            tune.report({"score": config["x"] * step, "step": step},
                        checkpoint=tune.Checkpoint.from_dict({"step": step}, d))


def iterations(trial) -> int:
    return trial.last_result["training_iteration"]


def test_ray_import_paths():
    assert ASHAScheduler is AsyncHyperBandScheduler
    assert tune.schedulers.PopulationBasedTraining is PopulationBasedTraining
    with pytest.raises(ValueError, match="reduction_factor"):
        ASHAScheduler(reduction_factor=1)
    with pytest.raises(ValueError, match="hyperparam_mutations"):
        PopulationBasedTraining()


def test_asha_stops_the_worse_trials_and_keeps_the_best(on_backend, storage):
    # Best first: each later trial meets a rung that better trials filled already.
    xs = list(range(7, -1, -1))
    asha = ASHAScheduler(time_attr="training_iteration", max_t=9, grace_period=1,
                         reduction_factor=3)
    analysis = tune.run(linear, config={"x": tune.grid_search(xs)}, scheduler=asha,
                        metric="score", mode="max", storage_path=storage, verbose=0)
    by_x = {t.config["x"]: t for t in analysis.trials}
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert iterations(by_x[7]) == 9          # never below a cutoff; ends at max_t
    assert all(iterations(by_x[x]) == 1 for x in range(4))  # judged at the first rung
    assert asha.num_stopped >= 4
    assert analysis.best_config == {"x": 7}


def test_asha_needs_a_metric(on_backend, storage):
    with pytest.raises(ValueError, match="metric"):
        tune.run(linear, config={"x": 1}, scheduler=ASHAScheduler(max_t=3),
                 storage_path=storage, verbose=0)


def test_median_stopping_rule_stops_below_median_trials(on_backend, storage):
    rule = MedianStoppingRule(time_attr="training_iteration", grace_period=2,
                              min_samples_required=2)
    analysis = tune.run(constant, config={"x": tune.grid_search([5, 4, 3, 2, 1, 0])},
                        scheduler=rule, metric="loss", mode="min", storage_path=storage,
                        verbose=0)
    by_x = {t.config["x"]: t for t in analysis.trials}
    # loss = -x, so x=5 is best: never below the median; x=0 and 1 always are.
    assert iterations(by_x[5]) == 6
    assert iterations(by_x[0]) == 2 and iterations(by_x[1]) == 2
    assert {by_x[0].trial_id, by_x[1].trial_id} <= rule.stopped
    assert by_x[5].trial_id not in rule.stopped


def test_hyperband_pauses_resumes_from_checkpoints_and_halves(on_backend, storage):
    # max_t=9, eta=3: one bracket of 9 trials with milestones 1, 3, 9.
    hyperband = HyperBandScheduler(max_t=9, reduction_factor=3)
    analysis = tune.run(checkpointed_linear, config={"x": tune.grid_search(list(range(9)))},
                        scheduler=hyperband, metric="score", mode="max",
                        storage_path=storage, verbose=0)
    by_x = {t.config["x"]: t for t in analysis.trials}
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert iterations(by_x[8]) == 9
    assert [iterations(by_x[x]) for x in (6, 7)] == [3, 3]
    assert all(iterations(by_x[x]) == 1 for x in range(6))
    assert hyperband.num_stopped == 8
    # The best trial was paused twice and resumed from its checkpoint each time:
    # its own step counter and training_iteration agree on every row.
    rows = read_results(by_x[8])
    assert [r["training_iteration"] for r in rows][:9] == list(range(1, 10))
    assert all(r["step"] == r["training_iteration"] for r in rows)
    assert any(r["iterations_since_restore"] < r["training_iteration"] for r in rows)


def pbt_objective(config):
    """Each step earns 1 - (h - 1)**2: h = 1 is best; the total is the state."""
    checkpoint = tune.get_checkpoint()
    total = checkpoint.to_dict()["total"] if checkpoint else 0.0
    while True:
        total += 1 - (config["h"] - 1) ** 2
        with tempfile.TemporaryDirectory() as d:
            tune.report({"total": total},
                        checkpoint=tune.Checkpoint.from_dict({"total": total}, d))


def test_pbt_beats_a_fixed_population_of_the_same_size_and_budget(inprocess, storage):
    population = [0.1, 0.2, 0.3, 0.4]
    stop = {"training_iteration": 24}
    half = {"cpu": 0.5}  # the whole population runs at once on 2 CPUs
    fixed = tune.run(pbt_objective, config={"h": tune.grid_search(population)}, stop=stop,
                     metric="total", mode="max", storage_path=storage, verbose=0,
                     resources_per_trial=half)
    fixed_best = fixed.best_result["total"]
    assert fixed_best == pytest.approx(24 * (1 - 0.6 ** 2))

    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2,
                                  hyperparam_mutations={"h": tune.uniform(0, 2)},
                                  quantile_fraction=0.25, resample_probability=0.0,
                                  seed=3)
    analysis = tune.run(pbt_objective, config={"h": tune.grid_search(population)},
                        stop=stop, scheduler=pbt, metric="total", mode="max",
                        storage_path=storage, verbose=0, resources_per_trial=half)
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert all(iterations(t) == 24 for t in analysis.trials)
    assert pbt.num_perturbations > 0
    # Explored: some trial's h left the initial population, towards h = 1.
    assert max(t.config["h"] for t in analysis.trials) > max(population)
    assert analysis.best_result["total"] > fixed_best


def test_asha_and_median_state_survives_a_resume(on_backend, storage):
    asha = ASHAScheduler(max_t=9, grace_period=1, reduction_factor=3)
    tune.run(linear, config={"x": tune.grid_search([3, 2, 1])}, scheduler=asha,
             metric="score", mode="max", name="asha", storage_path=storage, verbose=0)
    fresh = ASHAScheduler(max_t=9, grace_period=1, reduction_factor=3)
    saved = pickle.loads(pickle.dumps(asha.get_state()))
    fresh.set_state(saved)
    assert fresh.get_state() == asha.get_state() and fresh.num_stopped == asha.num_stopped
    # What resume reads: the updates logged as the run went.
    logged = ExperimentStateLog.read_log(os.path.join(storage, "asha"))
    replayed = ASHAScheduler(max_t=9, grace_period=1, reduction_factor=3)
    replayed.apply_state_updates(logged.scheduler_updates)
    assert logged.scheduler is None and replayed.get_state() == asha.get_state()
    rule = MedianStoppingRule(grace_period=1)
    rule.set_state(pickle.loads(pickle.dumps({"results": {"a": [(1.0, 2.0)]},
                                              "last_judged": {}, "stopped": {"a"}})))
    assert rule.stopped == {"a"}

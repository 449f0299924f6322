"""beamlet.tune: distributed hyperparameter search, on beamlet's public API.

The seed's API::

    from beamlet.tune import register_trainable, grid_search, run_experiments

    def my_func(config, reporter):
        i = 0
        while True:
            reporter(timesteps_total=i, mean_accuracy=i ** config["alpha"])
            i += config["beta"]

    register_trainable("my_func", my_func)
    trials = run_experiments({"my_experiment": {
        "run": "my_func",
        "resources": {"cpu": 1, "gpu": 0},
        "stop": {"mean_accuracy": 100, "training_iteration": 300},
        "config": {"alpha": grid_search([0.2, 0.4, 0.6]), "beta": grid_search([1, 2])},
    }})

and the modern one::

    from beamlet import tune

    def train(config):
        for step in range(100):
            tune.report({"loss": config["lr"] / (step + 1)})

    analysis = tune.run(train, config={"lr": tune.loguniform(1e-4, 1e-1)},
                        num_samples=8, metric="loss", mode="min")
    analysis.best_config

or Ray 2's front end, with early stopping and checkpoints::

    from beamlet.tune.schedulers import ASHAScheduler

    tuner = tune.Tuner(train, param_space={"lr": tune.loguniform(1e-4, 1e-1)},
                       tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=16,
                                                   scheduler=ASHAScheduler(max_t=100)),
                       run_config=tune.RunConfig(name="exp", stop={"training_iteration": 100}))
    best = tuner.fit().get_best_result()

Trials run as beamlet actors with their resources; results stream back to
the driver, which writes ``result.json``, ``progress.csv``, ``params.json``
and TensorBoard event files under ``~/beamlet_results/<name>``.
"""
from beamlet.contrib.tune import plugins
from beamlet.contrib.tune.plugins import create_scheduler, create_searcher
from beamlet.contrib.tune.analysis import ExperimentAnalysis
from beamlet.contrib.tune.api import run, run_experiments
from beamlet.contrib.tune.error import TuneError
from beamlet.contrib.tune.experiment import Experiment
from beamlet.contrib.tune.loggers import (CSVLoggerCallback, Callback, JsonLoggerCallback,
                                          LoggerCallback, TBXLoggerCallback)
from beamlet.contrib.tune.progress import ProgressReporter
from beamlet.contrib.tune.checkpoint import Checkpoint
from beamlet.contrib.tune.schedulers import FIFOScheduler, TrialScheduler
from beamlet.contrib.tune.search_space import (choice, grid_search, lograndint, loguniform,
                                               qloguniform, qrandint, quniform, randint, randn,
                                               sample_from, uniform)
from beamlet.contrib.tune.session import (get_checkpoint, get_trial_dir, get_trial_id,
                                          get_trial_name, report)
from beamlet.contrib.tune.stopper import (CombinedStopper, FunctionStopper,
                                          MaximumIterationStopper, Stopper, TimeoutStopper)
from beamlet.contrib.tune.trainable import Trainable, register_trainable
from beamlet.contrib.tune.trial import Trial
from beamlet.contrib.tune.tuner import (CheckpointConfig, FailureConfig, Result, ResultGrid,
                                       RunConfig, TuneConfig, Tuner)
from beamlet.contrib.tune.wrappers import with_parameters, with_resources

__all__ = [
    "run", "run_experiments", "register_trainable", "report", "Trainable", "Experiment",
    "ExperimentAnalysis", "Trial", "TuneError",
    "grid_search", "choice", "uniform", "quniform", "loguniform", "qloguniform", "randint",
    "qrandint", "lograndint", "randn", "sample_from",
    "Stopper", "CombinedStopper", "FunctionStopper", "MaximumIterationStopper",
    "TimeoutStopper", "TrialScheduler", "FIFOScheduler",
    "Callback", "LoggerCallback", "JsonLoggerCallback", "CSVLoggerCallback",
    "TBXLoggerCallback", "ProgressReporter", "get_trial_id", "get_trial_name",
    "get_trial_dir", "plugins", "Checkpoint", "get_checkpoint", "schedulers", "search", "create_searcher",
    "create_scheduler", "Tuner", "TuneConfig", "RunConfig", "FailureConfig",
    "CheckpointConfig", "ResultGrid", "Result", "with_parameters", "with_resources",
]

from beamlet.tune import schedulers, search  # noqa: E402 - Ray's submodule paths

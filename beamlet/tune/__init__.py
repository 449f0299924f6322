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
import importlib

# Each public name and the module that defines it, imported when the name is
# first used (PEP 562): a trial's worker that unpickles a trainable using
# ``tune.report`` imports the session, not the driver's whole machinery
# (runner, schedulers, searchers, loggers, analysis: most of a new worker's
# first trial, at about 0.1 s).
_C = "beamlet.contrib.tune."
_MODULES = {
    "plugins": "beamlet.contrib.tune.plugins",
    "schedulers": "beamlet.tune.schedulers",   # Ray's submodule paths
    "search": "beamlet.tune.search",
}
_NAMES = {
    _C + "plugins": ["create_scheduler", "create_searcher"],
    _C + "analysis": ["ExperimentAnalysis"],
    _C + "api": ["run", "run_experiments"],
    _C + "error": ["TuneError"],
    _C + "experiment": ["Experiment"],
    _C + "loggers": ["CSVLoggerCallback", "Callback", "JsonLoggerCallback", "LoggerCallback",
                     "TBXLoggerCallback"],
    _C + "progress": ["ProgressReporter"],
    _C + "checkpoint": ["Checkpoint"],
    _C + "schedulers": ["FIFOScheduler", "TrialScheduler"],
    _C + "search_space": ["choice", "grid_search", "lograndint", "loguniform", "qloguniform",
                          "qrandint", "quniform", "randint", "randn", "sample_from", "uniform"],
    _C + "session": ["get_checkpoint", "get_trial_dir", "get_trial_id", "get_trial_name",
                     "report"],
    _C + "stopper": ["CombinedStopper", "FunctionStopper", "MaximumIterationStopper", "Stopper",
                     "TimeoutStopper"],
    _C + "trainable": ["Trainable", "register_trainable"],
    _C + "trial": ["Trial"],
    _C + "tuner": ["CheckpointConfig", "FailureConfig", "Result", "ResultGrid", "RunConfig",
                   "TuneConfig", "Tuner"],
    _C + "wrappers": ["with_parameters", "with_resources"],
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

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


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        raise AttributeError(f"module 'beamlet.tune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

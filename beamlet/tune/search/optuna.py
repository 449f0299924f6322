"""``beamlet.tune.search.optuna``: Ray's import path of OptunaSearch."""
from beamlet.contrib.tune.search.optuna import OptunaSearch

__all__ = ["OptunaSearch"]

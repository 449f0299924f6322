"""``beamlet.tune.schedulers``: Ray's import path of the trial schedulers."""
from beamlet.contrib.tune.schedulers import *  # noqa: F401,F403
from beamlet.contrib.tune.schedulers import __all__  # noqa: F401

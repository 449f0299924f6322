"""``beamlet.tune.search``: Ray's import path of the searchers."""
from beamlet.contrib.tune.search import *  # noqa: F401,F403
from beamlet.contrib.tune.search import __all__  # noqa: F401

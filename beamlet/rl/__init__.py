"""beamlet.rl: reinforcement learning on Gymnasium (the code is in beamlet.contrib.rl)."""
from beamlet.contrib.rl import *  # noqa: F401,F403
from beamlet.contrib.rl import __all__  # noqa: F401

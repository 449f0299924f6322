"""beamlet.rl as a beamlet plugin: its algorithms (hook ``beamlet_rl_algorithms``),
their Tune trainables (hook ``beamlet_tune_trainables``) and the ``beamlet rl``
command (hook ``beamlet_cli_commands``). Importing this module is cheap: it
names classes by ``"module:Class"`` and imports gymnasium only when used."""
from __future__ import annotations

from beamlet.core.plugins import hookimpl

BUILTIN_ALGORITHMS = {
    "PPO": "beamlet.contrib.rl.ppo:PPO",
    "A2C": "beamlet.contrib.rl.a2c:A2C",
    "A3C": "beamlet.contrib.rl.a2c:A3C",
    "DQN": "beamlet.contrib.rl.dqn:DQN",
    "ES": "beamlet.contrib.rl.es:ES",
}


@hookimpl
def beamlet_rl_algorithms():
    return dict(BUILTIN_ALGORITHMS)


@hookimpl
def beamlet_tune_trainables():
    from .trainable import algorithm_trainables
    return algorithm_trainables()


@hookimpl
def beamlet_cli_commands(subparsers):
    from .cli import add_commands
    add_commands(subparsers)

"""beamlet.rl: scalable reinforcement learning on Gymnasium, on beamlet's public API.

::

    from beamlet.rl import PPOConfig

    algo = (PPOConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=2, num_envs_per_env_runner=8)
            .training(lr=1e-3, gamma=0.98).debugging(seed=0).build())
    for _ in range(20):
        print(algo.train()["episode_return_mean"])
    algo.save("ckpt")
    algo.stop()

Algorithms: PPO, A2C, A3C, DQN, ES (and any a plugin adds through the
``beamlet_rl_algorithms`` hook). Env runners are beamlet actors (restarted if
they crash); models are small numpy networks (:mod:`beamlet.contrib.rl.models`),
or any :class:`Model` given as ``training(model={"custom_model": factory})``.

The names below are imported on first use: beamlet loads this package's
``plugin`` module with every plugin manager, which must not pull numpy and
the algorithms into programs that never train one.
"""
import importlib

_EXPORTS = {
    "A2C": "a2c", "A2CConfig": "a2c", "A3C": "a2c", "A3CConfig": "a2c",
    "Algorithm": "algorithm", "AlgorithmConfig": "algorithm",
    "DQN": "dqn", "DQNConfig": "dqn", "ES": "es", "ESConfig": "es",
    "PPO": "ppo", "PPOConfig": "ppo", "register_env": "env", "EnvRunner": "env_runner",
    "Adam": "models", "MLP": "models", "Model": "models", "NumpyModel": "models",
    "algorithm_classes": "registry", "get_algorithm_class": "registry",
    "get_algorithm_config": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

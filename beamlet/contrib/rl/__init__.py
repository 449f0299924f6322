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
"""
from .a2c import A2C, A2CConfig, A3C, A3CConfig
from .algorithm import Algorithm, AlgorithmConfig
from .dqn import DQN, DQNConfig
from .env import register_env
from .env_runner import EnvRunner
from .es import ES, ESConfig
from .models import Adam, MLP, Model, NumpyModel
from .ppo import PPO, PPOConfig
from .registry import algorithm_classes, get_algorithm_class, get_algorithm_config

__all__ = ["Algorithm", "AlgorithmConfig", "PPO", "PPOConfig", "A2C", "A2CConfig", "A3C",
           "A3CConfig", "DQN", "DQNConfig", "ES", "ESConfig", "register_env", "EnvRunner",
           "Model", "NumpyModel", "MLP", "Adam", "algorithm_classes", "get_algorithm_class",
           "get_algorithm_config"]

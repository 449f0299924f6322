"""beamlet.rl: reinforcement learning on Gymnasium, on beamlet's public API.

::

    from beamlet.rl import PPOConfig

    algo = (PPOConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=2, num_envs_per_env_runner=8)
            .training(lr=1e-3, gamma=0.98).debugging(seed=0).build())
    result = algo.train()

The code lives in ``beamlet.contrib.rl``.
"""
from beamlet.contrib.rl import (A2C, A3C, DQN, ES, PPO, A2CConfig, A3CConfig, Adam, Algorithm,
                                AlgorithmConfig, DQNConfig, EnvRunner, ESConfig, MLP, Model,
                                NumpyModel, PPOConfig, algorithm_classes, get_algorithm_class,
                                get_algorithm_config, register_env)

__all__ = ["Algorithm", "AlgorithmConfig", "PPO", "PPOConfig", "A2C", "A2CConfig", "A3C",
           "A3CConfig", "DQN", "DQNConfig", "ES", "ESConfig", "register_env", "EnvRunner",
           "Model", "NumpyModel", "MLP", "Adam", "algorithm_classes", "get_algorithm_class",
           "get_algorithm_config"]

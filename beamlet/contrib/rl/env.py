"""Environments: Gymnasium ids, creators registered by name, and vectorised copies.

An environment is named by a Gymnasium id (``"CartPole-v1"``) or by a name given
to :func:`register_env`. The driver resolves the name to a creator once and
ships the creator itself to the env runners, so a registration made after
``beamlet.init`` (when worker processes already exist) still reaches them.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["register_env", "get_env_creator", "make_vector_env", "preprocess_obs",
           "registered_envs"]

_registry: dict[str, Callable[[dict], Any]] = {}


def register_env(name: str, creator: Callable[[dict], Any]) -> None:
    """Make ``creator(env_config) -> gymnasium.Env`` known as `name`, for
    ``config.environment(name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an environment's name must be a non-empty string, got {name!r}")
    if not callable(creator):
        raise TypeError(f"register_env({name!r}, creator): creator must be callable, got "
                        f"{type(creator).__name__}")
    _registry[name] = creator


def registered_envs() -> list[str]:
    return sorted(_registry)


class _GymCreator:
    """``gymnasium.make(env_id, **env_config)``, picklable by value of its id."""

    def __init__(self, env_id: str):
        self.env_id = env_id

    def __call__(self, env_config: dict):
        import gymnasium as gym
        return gym.make(self.env_id, **(env_config or {}))


def get_env_creator(env: Any) -> Callable[[dict], Any]:
    """The creator for `env`: a registered name, a Gymnasium id, or a callable
    ``creator(env_config)`` itself."""
    if callable(env) and not isinstance(env, str):
        return env
    if not isinstance(env, str) or not env:
        raise ValueError(f"no environment set: call config.environment('CartPole-v1') or give "
                         f"a name from register_env (got {env!r})")
    if env in _registry:
        return _registry[env]
    import gymnasium as gym
    if env not in gym.registry:
        known = ", ".join(registered_envs()) or "none"
        raise ValueError(f"unknown environment {env!r}: not a Gymnasium id and not registered "
                         f"with beamlet.rl.register_env (registered: {known})")
    return _GymCreator(env)


def make_vector_env(creator: Callable, env_config: dict, num_envs: int):
    """`num_envs` copies in one ``gymnasium.vector.SyncVectorEnv`` that resets a
    finished copy in the same step (the final observation is in
    ``infos["final_obs"]``)."""
    import gymnasium as gym

    def one():
        env = creator(dict(env_config or {}))
        if not isinstance(env, gym.Env):
            raise TypeError(f"an environment creator must return a gymnasium.Env, got "
                            f"{type(env).__name__}")
        return env

    return gym.vector.SyncVectorEnv([one for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def preprocess_obs(obs: Any, space) -> np.ndarray:
    """A batch of observations as float32 ``(N, obs_dim)`` (one-hot for Discrete)."""
    from gymnasium import spaces
    if isinstance(space, spaces.Discrete):
        obs = np.asarray(obs, dtype=np.int64).reshape(-1) - space.start
        out = np.zeros((len(obs), int(space.n)), dtype=np.float32)
        out[np.arange(len(obs)), obs] = 1.0
        return out
    obs = np.asarray(obs, dtype=np.float32)
    return obs.reshape(obs.shape[0], -1)

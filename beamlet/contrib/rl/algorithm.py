"""The algorithm base class and its config builder, in RLlib's shape.

::

    algo = (PPOConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=2, num_envs_per_env_runner=8)
            .training(lr=3e-4, gamma=0.99).debugging(seed=0).build())
    result = algo.train()          # one iteration: sample, learn, report
    path = algo.save("ckpt")       # and Algorithm.from_checkpoint("ckpt")
    algo.stop()

A subclass sets ``config_class`` and implements ``setup_algorithm()`` and
``training_step() -> learner stats``; it samples through ``self.workers`` and
reports finished episodes with ``self.record_episodes``.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import pickle
import time
from typing import Any

import numpy as np

from . import env as _env
from .blas import set_blas_threads
from .models import build_model, distribution_class, flat_obs_dim

__all__ = ["AlgorithmConfig", "Algorithm", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "algorithm_state.pkl"
METADATA_FILE = "rllib_checkpoint.json"

# Keys of the flat dict form (tune configs, --config) that go to a builder method.
_FLAT_ALIASES = {"env": "env", "env_config": "env_config", "seed": "seed",
                 "num_env_runners": "num_env_runners", "num_workers": "num_env_runners",
                 "num_envs_per_env_runner": "num_envs_per_env_runner",
                 "num_envs_per_worker": "num_envs_per_env_runner"}


class AlgorithmConfig:
    """Settings of an algorithm, set through chained builder methods. Every
    method raises ``ValueError`` naming an unknown key rather than ignoring it."""

    algo_class: type | None = None

    def __init__(self, algo_class: type | None = None):
        if algo_class is not None:
            self.algo_class = algo_class
        # environment
        self.env: Any = None
        self.env_config: dict = {}
        # env runners
        self.num_env_runners = 0
        self.num_envs_per_env_runner = 1
        self.rollout_fragment_length: int | str = "auto"
        self.num_cpus_per_env_runner: float = 0
        self.max_num_env_runner_restarts = 3
        self.sample_timeout_s = 600.0
        # training (subclasses add their own)
        self.lr = 5e-4
        self.gamma = 0.99
        self.train_batch_size = 4000
        self.grad_clip: float | None = None
        self.model: dict = {"fcnet_hiddens": [64, 64], "fcnet_activation": "tanh"}
        # reporting and evaluation
        self.metrics_num_episodes_for_smoothing = 20
        self.evaluation_duration = 10
        self.evaluation_explore = False
        self.seed: int | None = None
        # OpenBLAS threads in the driver and the runners (None: leave as is); see blas.py
        self.blas_threads: int | None = 1

    # -- builder methods -------------------------------------------------------------
    def environment(self, env: Any = None, *, env_config: dict | None = None):
        """A Gymnasium id, a name given to ``register_env``, or a creator
        ``fn(env_config) -> gymnasium.Env``."""
        if env is not None:
            self.env = env
        if env_config is not None:
            if not isinstance(env_config, dict):
                raise TypeError(f"env_config must be a dict, got {type(env_config).__name__}")
            self.env_config = dict(env_config)
        return self

    def env_runners(self, *, num_env_runners: int | None = None,
                    num_envs_per_env_runner: int | None = None,
                    rollout_fragment_length: int | str | None = None,
                    num_cpus_per_env_runner: float | None = None,
                    max_num_env_runner_restarts: int | None = None,
                    sample_timeout_s: float | None = None):
        """``num_env_runners`` actors (0: sample in the driver), each stepping
        ``num_envs_per_env_runner`` env copies ``rollout_fragment_length`` times per
        iteration ("auto": ``train_batch_size`` split evenly)."""
        for key, value in list(locals().items()):
            if key != "self" and value is not None:
                setattr(self, key, value)
        if not isinstance(self.num_env_runners, int) or self.num_env_runners < 0:
            raise ValueError(f"num_env_runners must be an int >= 0, got {self.num_env_runners!r}")
        if not isinstance(self.num_envs_per_env_runner, int) or self.num_envs_per_env_runner < 1:
            raise ValueError(f"num_envs_per_env_runner must be an int >= 1, got "
                             f"{self.num_envs_per_env_runner!r}")
        return self

    rollouts = env_runners  # RLlib's older name

    def training(self, **kwargs):
        """Training settings; the accepted keys are this config's attributes
        (``lr``, ``gamma``, ``train_batch_size``, ``model``, and the algorithm's own)."""
        for key, value in kwargs.items():
            if key in ("env", "env_config") or key.startswith("_") or not hasattr(self, key):
                raise ValueError(f"{type(self).__name__}.training() got an unknown setting "
                                 f"{key!r}; known: {', '.join(self._training_keys())}")
            if key == "model":
                merged = dict(self.model)
                merged.update(value or {})
                value = merged
            setattr(self, key, value)
        return self

    def evaluation(self, *, evaluation_duration: int | None = None,
                   evaluation_explore: bool | None = None, **_ignored):
        if evaluation_duration is not None:
            self.evaluation_duration = int(evaluation_duration)
        if evaluation_explore is not None:
            self.evaluation_explore = bool(evaluation_explore)
        return self

    def reporting(self, *, metrics_num_episodes_for_smoothing: int | None = None, **_ignored):
        if metrics_num_episodes_for_smoothing is not None:
            self.metrics_num_episodes_for_smoothing = int(metrics_num_episodes_for_smoothing)
        return self

    def debugging(self, *, seed: int | None = None, **_ignored):
        self.seed = seed
        return self

    def framework(self, framework: str = "numpy", **_ignored):
        """Only "numpy" is built in; plug another framework in through
        ``training(model={"custom_model": factory})``."""
        if framework != "numpy":
            raise ValueError(f"framework {framework!r}: beamlet.rl's built-in models are numpy; "
                             f"plug a model of another framework in with "
                             f"training(model={{'custom_model': factory}})")
        return self

    def resources(self, **_ignored):
        return self

    # -- dict form -------------------------------------------------------------------
    def _training_keys(self) -> list[str]:
        skip = set(_FLAT_ALIASES.values()) | {"env", "env_config", "algo_class"}
        return sorted(k for k in vars(self) if not k.startswith("_") and k not in skip)

    def update_from_dict(self, config: dict):
        """Apply a flat dict (``{"env": ..., "lr": ..., "num_env_runners": ...}``)."""
        if not isinstance(config, dict):
            raise TypeError(f"a config must be a dict, got {type(config).__name__}")
        for key, value in config.items():
            target = _FLAT_ALIASES.get(key, key)
            if target in ("env", "env_config"):
                self.environment(**{target: value})
            elif target == "seed":
                self.debugging(seed=value)
            elif target in ("num_env_runners", "num_envs_per_env_runner",
                            "rollout_fragment_length", "num_cpus_per_env_runner",
                            "max_num_env_runner_restarts", "sample_timeout_s"):
                self.env_runners(**{target: value})
            elif target in ("evaluation_duration", "evaluation_explore"):
                self.evaluation(**{target: value})
            elif target == "metrics_num_episodes_for_smoothing":
                self.reporting(**{target: value})
            else:
                self.training(**{target: value})
        return self

    @classmethod
    def from_dict(cls, config: dict):
        return cls().update_from_dict(config)

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in vars(self).items()
                if not k.startswith("_") and k != "algo_class"}

    def copy(self):
        return copy.deepcopy(self)

    def validate(self) -> None:
        if self.env is None:
            raise ValueError("no environment set: call config.environment('CartPole-v1')")
        if not (0.0 <= float(self.gamma) <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if float(self.lr) <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def get_rollout_fragment_length(self) -> int:
        if self.rollout_fragment_length != "auto":
            return int(self.rollout_fragment_length)
        envs = max(1, self.num_env_runners) * self.num_envs_per_env_runner
        return max(1, int(np.ceil(self.train_batch_size / envs)))

    def build(self, env: Any = None) -> "Algorithm":
        """The algorithm for this config (env runners started)."""
        if env is not None:
            self.environment(env)
        if self.algo_class is None:
            raise ValueError(f"{type(self).__name__} is not tied to an algorithm class")
        return self.algo_class(self.copy())

    build_algo = build


class Algorithm:
    """Base of every algorithm: env runners, episode metrics, checkpoints."""

    config_class: type = AlgorithmConfig
    #: the name the algorithm is registered under (plugins, Tune, the CLI)
    name: str = "Algorithm"

    def __init__(self, config: AlgorithmConfig | dict | None = None, env: Any = None):
        if config is None or isinstance(config, dict):
            config = self.config_class().update_from_dict(config or {})
        if env is not None:
            config.environment(env)
        config.validate()
        self.config = config
        if config.blas_threads is not None:
            set_blas_threads(config.blas_threads)
        self.iteration = 0
        self.num_env_steps_sampled_lifetime = 0
        self.num_episodes_lifetime = 0
        self._episodes = collections.deque(maxlen=config.metrics_num_episodes_for_smoothing)
        self._iter_episodes: list = []
        self._iter_env_steps = 0
        self.rng = np.random.default_rng(config.seed)
        self.env_creator = _env.get_env_creator(config.env)
        probe = self.env_creator(dict(config.env_config))
        self.observation_space = probe.observation_space
        self.action_space = probe.action_space
        probe.close()
        self.obs_dim = flat_obs_dim(self.observation_space)
        self.workers = None
        self.setup_algorithm()

    # -- what subclasses implement -------------------------------------------------
    def setup_algorithm(self) -> None:
        raise NotImplementedError

    def training_step(self) -> dict:
        raise NotImplementedError

    def get_policy_state(self) -> dict:
        """Algorithm-specific state for checkpoints (beyond the model)."""
        return {}

    def set_policy_state(self, state: dict) -> None:
        pass

    def compute_actions(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        """Actions for a batch of preprocessed observations (driver side)."""
        raise NotImplementedError

    # -- helpers for subclasses ------------------------------------------------------
    def make_model(self, heads: dict, lr: float | None = None, seed_offset: int = 0):
        seed = None if self.config.seed is None else self.config.seed + seed_offset
        return build_model(self.observation_space, self.action_space, heads,
                           dict(self.config.model), lr=lr or self.config.lr,
                           grad_clip=self.config.grad_clip, seed=seed)

    def pi_width(self) -> int:
        return distribution_class(self.action_space).input_dim(self.action_space)

    def record_batches(self, batches: list[dict]) -> None:
        for b in batches:
            steps = int(np.prod(b["rewards"].shape))
            self._iter_env_steps += steps
            self.record_episodes(b["episodes"])

    def record_episodes(self, episodes: list) -> None:
        self._iter_episodes.extend(episodes)
        self._episodes.extend(episodes)

    def add_env_steps(self, steps: int) -> None:
        self._iter_env_steps += int(steps)

    # -- the public API ------------------------------------------------------------------
    def train(self) -> dict:
        """One iteration; returns the result dict (``training_iteration``,
        ``episode_return_mean``, ``episode_len_mean``, ``num_env_steps_sampled``,
        ``num_env_steps_sampled_lifetime``, ``time_this_iter_s``, ``learner``...)."""
        start = time.time()
        self._iter_episodes = []
        self._iter_env_steps = 0
        learner = self.training_step()
        self.iteration += 1
        self.num_env_steps_sampled_lifetime += self._iter_env_steps
        self.num_episodes_lifetime += len(self._iter_episodes)
        returns = [r for r, _ in self._episodes]
        lengths = [n for _, n in self._episodes]
        nan = float("nan")
        return {
            "training_iteration": self.iteration,
            "episode_return_mean": float(np.mean(returns)) if returns else nan,
            "episode_return_max": float(np.max(returns)) if returns else nan,
            "episode_return_min": float(np.min(returns)) if returns else nan,
            "episode_len_mean": float(np.mean(lengths)) if lengths else nan,
            "episodes_this_iter": len(self._iter_episodes),
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "num_env_steps_sampled": self._iter_env_steps,
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "timesteps_total": self.num_env_steps_sampled_lifetime,
            "num_env_runner_restarts": self.workers.num_restarts if self.workers else 0,
            "time_this_iter_s": time.time() - start,
            "learner": learner,
        }

    def compute_single_action(self, observation: Any, explore: bool | None = None):
        """The action for one raw observation (deterministic unless `explore`)."""
        obs = _env.preprocess_obs(np.asarray(observation)[None], self.observation_space)
        action = self.compute_actions(obs, bool(explore))[0]
        from gymnasium import spaces
        if isinstance(self.action_space, spaces.Box):
            return np.clip(action, self.action_space.low, self.action_space.high).astype(
                self.action_space.dtype)
        return int(action)

    def evaluate(self, num_episodes: int | None = None, *, render_mode: str | None = None,
                 frames: list | None = None) -> dict:
        """Run `num_episodes` (default ``evaluation_duration``) episodes in the
        driver with ``compute_single_action``; returns ``{"evaluation":
        {"episode_return_mean", "episode_len_mean", "episode_returns", ...}}``.
        With ``render_mode="rgb_array"`` (passed to the env creator in its
        ``env_config``), each step's ``env.render()`` is appended to `frames`."""
        n = int(num_episodes or self.config.evaluation_duration)
        if n < 1:
            raise ValueError(f"num_episodes must be >= 1, got {n}")
        cfg = dict(self.config.env_config)
        if render_mode is not None:
            cfg["render_mode"] = render_mode
        env = self.env_creator(cfg)
        returns, lengths = [], []
        seed = None if self.config.seed is None else self.config.seed + 999_983
        try:
            for ep in range(n):
                obs, _ = env.reset(seed=None if seed is None else seed + ep)
                total, steps, done = 0.0, 0, False
                while not done:
                    if frames is not None:
                        frames.append(env.render())
                    obs, rew, term, trunc, _ = env.step(
                        self.compute_single_action(obs, explore=self.config.evaluation_explore))
                    total += float(rew)
                    steps += 1
                    done = term or trunc
                returns.append(total)
                lengths.append(steps)
        finally:
            env.close()
        return {"evaluation": {"episode_return_mean": float(np.mean(returns)),
                               "episode_return_min": float(np.min(returns)),
                               "episode_return_max": float(np.max(returns)),
                               "episode_len_mean": float(np.mean(lengths)),
                               "episode_returns": returns, "num_episodes": n}}

    def get_state(self) -> dict:
        runners = []
        if self.workers is not None and hasattr(self.workers.cls, "get_state"):
            runners = self.workers.foreach("get_state")
        return {"iteration": self.iteration,
                "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
                "num_episodes_lifetime": self.num_episodes_lifetime,
                "episodes": list(self._episodes), "rng": self.rng.bit_generator.state,
                "model": self.model.get_state(), "algorithm": self.get_policy_state(),
                "runners": runners}

    def set_state(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.num_env_steps_sampled_lifetime = state["num_env_steps_sampled_lifetime"]
        self.num_episodes_lifetime = state["num_episodes_lifetime"]
        self._episodes.clear()
        self._episodes.extend(state["episodes"])
        self.rng.bit_generator.state = state["rng"]
        self.model.set_state(state["model"])
        self.set_policy_state(state["algorithm"])
        runners = state.get("runners") or []
        if self.workers is not None and runners:
            if self.workers.local is not None:
                self.workers.local.set_state(runners[0])
            else:
                for i, rs in enumerate(runners[:len(self.workers)]):
                    self.workers.call(i, "set_state", rs)

    def save(self, checkpoint_dir: str | None = None) -> str:
        """Write a checkpoint into `checkpoint_dir` (a new temp dir if None) and
        return its path. ``Algorithm.from_checkpoint(path)`` restores it exactly."""
        import cloudpickle
        if checkpoint_dir is None:
            import tempfile
            checkpoint_dir = tempfile.mkdtemp(prefix="beamlet_rl_ckpt_")
        os.makedirs(checkpoint_dir, exist_ok=True)
        payload = {"algorithm": self.name, "config": self.config, "state": self.get_state()}
        tmp = os.path.join(checkpoint_dir, CHECKPOINT_FILE + ".tmp")
        with open(tmp, "wb") as f:
            cloudpickle.dump(payload, f)
        os.replace(tmp, os.path.join(checkpoint_dir, CHECKPOINT_FILE))
        with open(os.path.join(checkpoint_dir, METADATA_FILE), "w") as f:
            json.dump({"type": "Algorithm", "algorithm": self.name,
                       "training_iteration": self.iteration,
                       "checkpoint_version": "1"}, f)
        return checkpoint_dir

    save_to_path = save

    def restore(self, checkpoint_dir: str) -> None:
        payload = _load_checkpoint(checkpoint_dir)
        self.set_state(payload["state"])

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str) -> "Algorithm":
        """The algorithm saved in `checkpoint_dir`, or in the latest
        ``checkpoint_*`` directory inside it."""
        payload = _load_checkpoint(checkpoint_dir)
        algo_cls = cls
        if cls is Algorithm or cls.name != payload["algorithm"]:
            from .registry import get_algorithm_class
            algo_cls = get_algorithm_class(payload["algorithm"])
        algo = algo_cls(payload["config"])
        algo.set_state(payload["state"])
        return algo

    def stop(self) -> None:
        """Stop the env runners."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def find_checkpoint(path: str) -> str:
    """`path` if it holds a checkpoint, else its latest ``checkpoint_*`` subdirectory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path!r}")
    if os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        return path
    subs = sorted(d for d in os.listdir(path)
                  if d.startswith("checkpoint_") and
                  os.path.isfile(os.path.join(path, d, CHECKPOINT_FILE)))
    if not subs:
        raise FileNotFoundError(f"{path!r} holds no beamlet.rl checkpoint ({CHECKPOINT_FILE} "
                                f"or checkpoint_*/{CHECKPOINT_FILE})")
    return os.path.join(path, subs[-1])


def _load_checkpoint(path: str) -> dict:
    with open(os.path.join(find_checkpoint(path), CHECKPOINT_FILE), "rb") as f:
        return pickle.load(f)

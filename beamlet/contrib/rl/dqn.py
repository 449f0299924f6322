"""Deep Q-Networks (Mnih et al. 2015) with a target network, double-Q targets
(van Hasselt et al. 2016), a uniform replay buffer, Huber loss and a linearly
decaying epsilon-greedy exploration. Discrete action spaces only."""
from __future__ import annotations

import numpy as np

from .algorithm import Algorithm, AlgorithmConfig
from .env_runner import EnvRunner, RunnerSpec, WorkerSet

__all__ = ["DQN", "DQNConfig", "ReplayBuffer", "EpsilonGreedyPolicy"]


class ReplayBuffer:
    """A ring buffer of transitions ``(obs, action, reward, next_obs, terminated)``."""

    def __init__(self, capacity: int, obs_dim: int):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float64)
        self.terminateds = np.zeros(capacity, np.float64)
        self.size = 0
        self.pos = 0

    def add(self, obs, actions, rewards, next_obs, terminateds) -> None:
        for i in range(len(obs)):
            p = self.pos
            self.obs[p], self.next_obs[p] = obs[i], next_obs[i]
            self.actions[p], self.rewards[p] = actions[i], rewards[i]
            self.terminateds[p] = terminateds[i]
            self.pos = (p + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict:
        idx = rng.integers(0, self.size, size=batch_size)
        return {"obs": self.obs[idx], "next_obs": self.next_obs[idx],
                "actions": self.actions[idx], "rewards": self.rewards[idx],
                "terminateds": self.terminateds[idx]}

    def __len__(self) -> int:
        return self.size

    def get_state(self) -> dict:
        return {k: getattr(self, k).copy() if isinstance(getattr(self, k), np.ndarray)
                else getattr(self, k)
                for k in ("obs", "next_obs", "actions", "rewards", "terminateds", "size", "pos")}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.copy() if isinstance(v, np.ndarray) else v)


class EpsilonGreedyPolicy:
    """Greedy in the ``"q"`` head; uniformly random with probability ``epsilon``."""

    def __call__(self, model, obs, rng, explore, epsilon: float = 0.0, **_):
        q = model(obs)["q"]
        actions = q.argmax(axis=1)
        if explore and epsilon > 0:
            rand = rng.random(len(actions)) < epsilon
            actions = np.where(rand, rng.integers(0, q.shape[1], size=len(actions)), actions)
        return actions, {}


class DQNConfig(AlgorithmConfig):
    """DQN's settings: ``replay_buffer_capacity``, ``num_steps_sampled_before_learning_starts``,
    ``train_batch_size`` (per gradient step), ``training_intensity`` (gradient
    steps per sampled env step), ``target_network_update_freq`` (env steps),
    ``double_q``, ``epsilon_initial``/``epsilon_final``/``epsilon_timesteps``."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class or DQN)
        self.lr = 1e-3
        self.train_batch_size = 64
        self.replay_buffer_capacity = 50_000
        self.num_steps_sampled_before_learning_starts = 1000
        self.training_intensity = 0.5
        self.target_network_update_freq = 500
        self.double_q = True
        self.epsilon_initial = 1.0
        self.epsilon_final = 0.04
        self.epsilon_timesteps = 10_000
        self.grad_clip = 10.0
        self.rollout_fragment_length = 32
        self.num_envs_per_env_runner = 8
        self.model = {"fcnet_hiddens": [256, 256], "fcnet_activation": "relu"}


class DQN(Algorithm):
    config_class = DQNConfig
    name = "DQN"

    def setup_algorithm(self) -> None:
        from gymnasium import spaces
        if not isinstance(self.action_space, spaces.Discrete):
            raise ValueError(f"DQN needs a Discrete action space, got {self.action_space}")
        cfg = self.config
        heads = {"q": int(self.action_space.n)}
        self.model = self.make_model(heads)
        self.target = self.make_model(heads)
        self.target.set_weights(self.model.get_weights())
        self.buffer = ReplayBuffer(cfg.replay_buffer_capacity, self.obs_dim)
        self._last_target_update = 0
        self._grad_credit = 0.0
        from .actor_critic import ModelFactory  # noqa: I001
        spec = RunnerSpec(self.env_creator, dict(cfg.env_config), cfg.num_envs_per_env_runner,
                          cfg.seed, ModelFactory(self.observation_space, self.action_space,
                                                  heads, dict(cfg.model), cfg.lr, None,
                                                  cfg.seed),
                          EpsilonGreedyPolicy(), blas_threads=cfg.blas_threads)
        self.workers = WorkerSet(EnvRunner, lambda i: (spec, i), cfg.num_env_runners,
                                 max_restarts=cfg.max_num_env_runner_restarts,
                                 num_cpus=cfg.num_cpus_per_env_runner,
                                 timeout_s=cfg.sample_timeout_s)

    def epsilon(self) -> float:
        cfg = self.config
        frac = min(1.0, self.num_env_steps_sampled_lifetime / max(1, cfg.epsilon_timesteps))
        return cfg.epsilon_initial + frac * (cfg.epsilon_final - cfg.epsilon_initial)

    def training_step(self) -> dict:
        import beamlet
        cfg = self.config
        eps = self.epsilon()
        weights = self.model.get_weights()
        arg = beamlet.put(weights) if self.workers.actors else weights
        batches = self.workers.foreach("sample", arg, cfg.get_rollout_fragment_length(),
                                       epsilon=eps)
        self.record_batches(batches)
        sampled = 0
        for b in batches:
            d = b["obs"].shape[-1]
            self.buffer.add(b["obs"].reshape(-1, d), b["actions"].reshape(-1),
                            b["rewards"].reshape(-1), b["next_obs"].reshape(-1, d),
                            b["terminateds"].reshape(-1))
            sampled += b["rewards"].size
        total = self.num_env_steps_sampled_lifetime + sampled
        stats: dict[str, list] = {}
        if total >= cfg.num_steps_sampled_before_learning_starts:
            self._grad_credit += sampled * cfg.training_intensity
            while self._grad_credit >= 1.0:
                self._grad_credit -= 1.0
                for k, v in self._learn_on(self.buffer.sample(self.rng,
                                                              cfg.train_batch_size)).items():
                    stats.setdefault(k, []).append(v)
            if total - self._last_target_update >= cfg.target_network_update_freq:
                self.target.set_weights(self.model.get_weights())
                self._last_target_update = total
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(epsilon=eps, replay_buffer_size=len(self.buffer))
        return out

    def _learn_on(self, mb: dict) -> dict:
        cfg = self.config
        out, cache = self.model.forward(mb["obs"])
        q = out["q"]
        q_next_target = self.target(mb["next_obs"])["q"]
        if cfg.double_q:
            best = self.model(mb["next_obs"])["q"].argmax(axis=1)
        else:
            best = q_next_target.argmax(axis=1)
        next_q = q_next_target[np.arange(len(best)), best]
        target = mb["rewards"] + cfg.gamma * (1.0 - mb["terminateds"]) * next_q
        rows = np.arange(len(target))
        td = q[rows, mb["actions"]] - target
        d_q = np.zeros_like(q)
        d_q[rows, mb["actions"]] = np.clip(td, -1.0, 1.0) / len(td)  # Huber loss
        gnorm = self.model.apply_gradients(self.model.backward(cache, {"q": d_q}))
        absd = np.abs(td)
        loss = np.where(absd <= 1.0, 0.5 * td * td, absd - 0.5).mean()
        return {"td_loss": float(loss), "mean_q": float(q.mean()), "grad_gnorm": gnorm}

    def compute_actions(self, obs, explore):
        actions, _ = EpsilonGreedyPolicy()(self.model, obs, self.rng, explore,
                                           epsilon=self.epsilon())
        return actions

    def get_policy_state(self) -> dict:
        return {"target": self.target.get_weights(), "buffer": self.buffer.get_state(),
                "last_target_update": self._last_target_update,
                "grad_credit": self._grad_credit}

    def set_policy_state(self, state: dict) -> None:
        self.target.set_weights(state["target"])
        self.buffer.set_state(state["buffer"])
        self._last_target_update = state["last_target_update"]
        self._grad_credit = state["grad_credit"]

"""Deep Q-Networks (Mnih et al. 2015) with a target network, double-Q targets
(van Hasselt et al. 2016), a uniform replay buffer, Huber loss, a linearly
decaying epsilon-greedy exploration and optional n-step returns (Sutton 1988;
as in Rainbow, Hessel et al. 2018). Discrete action spaces only."""
from __future__ import annotations

import numpy as np

from .algorithm import Algorithm, AlgorithmConfig
from .env_runner import EnvRunner, RunnerSpec, WorkerSet

__all__ = ["DQN", "DQNConfig", "ReplayBuffer", "EpsilonGreedyPolicy", "n_step_transitions"]


class ReplayBuffer:
    """A ring buffer of transitions ``(obs, action, reward, next_obs, terminated,
    discount)``; ``discount`` is what multiplies the bootstrapped value of
    ``next_obs`` (``gamma ** n`` for an n-step transition)."""

    _FIELDS = ("obs", "next_obs", "actions", "rewards", "terminateds", "discounts")

    def __init__(self, capacity: int, obs_dim: int):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float64)
        self.terminateds = np.zeros(capacity, np.float64)
        self.discounts = np.zeros(capacity, np.float64)
        self.size = 0
        self.pos = 0

    def add(self, obs, actions, rewards, next_obs, terminateds, discounts) -> None:
        n = len(obs)
        if n > self.capacity:  # only the newest `capacity` survive anyway
            obs, actions, rewards, next_obs, terminateds, discounts = (
                np.asarray(a)[-self.capacity:] for a in
                (obs, actions, rewards, next_obs, terminateds, discounts))
            n = self.capacity
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.next_obs[idx] = obs, next_obs
        self.actions[idx], self.rewards[idx] = actions, rewards
        self.terminateds[idx], self.discounts[idx] = terminateds, discounts
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict:
        idx = rng.integers(0, self.size, size=batch_size)
        return {k: getattr(self, k)[idx] for k in self._FIELDS}

    def __len__(self) -> int:
        return self.size

    def get_state(self) -> dict:
        state = {k: getattr(self, k).copy() for k in self._FIELDS}
        state.update(size=self.size, pos=self.pos)
        return state

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.copy() if isinstance(v, np.ndarray) else v)


def n_step_transitions(batch: dict, n: int, gamma: float) -> dict:
    """The n-step transitions of a time-major batch (``(T, N)`` arrays as an env
    runner returns them), one per start ``t = 0 .. T-n``: the discounted sum of
    up to `n` rewards, stopping early where an episode ends (terminated or
    truncated); ``next_obs`` and ``terminated`` of the last step summed; and
    ``discount = gamma ** (steps summed)``. The last ``n - 1`` starts are left out
    (their windows are incomplete): the caller carries those steps over to the
    next batch. Flat arrays ``(S * N, ...)`` are returned."""
    steps = len(batch["rewards"])
    starts = steps - n + 1
    if starts <= 0:
        return {}
    dones = np.logical_or(batch["terminateds"], batch["truncateds"])
    shape = batch["rewards"][:starts].shape
    ret = np.zeros(shape)
    alive = np.ones(shape, bool)
    last = np.zeros(shape, np.int64)
    term = np.zeros(shape, bool)
    disc = np.ones(shape)
    for k in range(n):
        ret += np.where(alive, gamma ** k * batch["rewards"][k:k + starts], 0.0)
        last = np.where(alive, k, last)
        term = np.where(alive, batch["terminateds"][k:k + starts], term)
        disc = np.where(alive, gamma ** (k + 1), disc)
        alive &= ~dones[k:k + starts]
    t_idx = np.arange(starts)[:, None] + last
    env_idx = np.broadcast_to(np.arange(shape[1]), shape)
    d = batch["obs"].shape[-1]
    return {"obs": batch["obs"][:starts].reshape(-1, d),
            "actions": batch["actions"][:starts].reshape(-1),
            "rewards": ret.reshape(-1),
            "next_obs": batch["next_obs"][t_idx, env_idx].reshape(-1, d),
            "terminateds": term.reshape(-1).astype(np.float64),
            "discounts": disc.reshape(-1)}


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
    ``tau`` (1.0: the target network is copied; below: moved that fraction of
    the way, Polyak averaging), ``double_q``, ``n_step`` (rewards summed per
    transition before bootstrapping), ``epsilon_initial``/``epsilon_final``/
    ``epsilon_timesteps``, ``lr_schedule`` (None or ``"linear"``: decays to 0
    over ``lr_decay_env_steps``, as PPO's)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class or DQN)
        self.lr = 1e-3
        self.train_batch_size = 64
        self.replay_buffer_capacity = 50_000
        self.num_steps_sampled_before_learning_starts = 1000
        self.training_intensity = 0.5
        self.target_network_update_freq = 500
        self.tau = 1.0
        self.double_q = True
        self.n_step = 1
        self.lr_schedule: str | None = None
        self.lr_decay_env_steps = 100_000
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
        if int(cfg.n_step) < 1:
            raise ValueError(f"n_step must be an int >= 1, got {cfg.n_step!r}")
        if not 0.0 < float(cfg.tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {cfg.tau!r}")
        if cfg.lr_schedule not in (None, "linear"):
            raise ValueError(f"lr_schedule must be None or 'linear', got {cfg.lr_schedule!r}")
        # Per env runner, its last n_step - 1 steps (their n-step windows are incomplete).
        self._pending: dict[int, dict] = {}
        self._restarts_seen = 0
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
        if cfg.lr_schedule == "linear":
            frac = max(0.0, 1.0 - self.num_env_steps_sampled_lifetime / cfg.lr_decay_env_steps)
            self.model.set_lr(max(cfg.lr * frac, 1e-8))
        weights = self.model.get_weights()
        arg = beamlet.put(weights) if self.workers.actors else weights
        batches = self.workers.foreach("sample", arg, cfg.get_rollout_fragment_length(),
                                       epsilon=eps)
        self.record_batches(batches)
        sampled = sum(b["rewards"].size for b in batches)
        self._add_to_buffer(batches)
        total = self.num_env_steps_sampled_lifetime + sampled
        stats: dict[str, list] = {}
        if total >= cfg.num_steps_sampled_before_learning_starts and len(self.buffer):
            self._grad_credit += sampled * cfg.training_intensity
            while self._grad_credit >= 1.0:
                self._grad_credit -= 1.0
                for k, v in self._learn_on(self.buffer.sample(self.rng,
                                                              cfg.train_batch_size)).items():
                    stats.setdefault(k, []).append(v)
            if total - self._last_target_update >= cfg.target_network_update_freq:
                self.update_target()
                self._last_target_update = total
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(epsilon=eps, replay_buffer_size=len(self.buffer))
        return out

    def _add_to_buffer(self, batches: list[dict]) -> None:
        """Turn each runner's batch into n-step transitions, joining it to that
        runner's steps carried over from the last iteration."""
        n = int(self.config.n_step)
        restarts = self.workers.num_restarts
        if restarts != self._restarts_seen:  # a restarted runner's envs began anew
            self._pending.clear()
            self._restarts_seen = restarts
        keys = ("obs", "next_obs", "actions", "rewards", "terminateds", "truncateds")
        for i, b in enumerate(batches):
            b = {k: b[k] for k in keys}
            prev = self._pending.get(i)
            if prev is not None:
                b = {k: np.concatenate([prev[k], b[k]]) for k in keys}
            tr = n_step_transitions(b, n, self.config.gamma)
            if tr:
                self.buffer.add(tr["obs"], tr["actions"], tr["rewards"], tr["next_obs"],
                                tr["terminateds"], tr["discounts"])
            keep = min(n - 1, len(b["rewards"]))
            self._pending[i] = {k: v[len(v) - keep:] for k, v in b.items()} if keep else None

    def update_target(self) -> None:
        """Copy the online network into the target one (or move it by ``tau``)."""
        tau = float(self.config.tau)
        if tau >= 1.0:
            self.target.set_weights(self.model.get_weights())
        else:
            self.target.set_weights([tau * w + (1.0 - tau) * t for w, t in
                                     zip(self.model.get_weights(), self.target.get_weights())])

    def td_targets(self, mb: dict) -> np.ndarray:
        """``r + discount * (1 - terminated) * Q_target(s', a*)`` for a batch of
        transitions, where ``a*`` is the online network's greedy action in
        ``s'`` with ``double_q`` (van Hasselt et al.), else the target network's."""
        q_next_target = self.target(mb["next_obs"])["q"]
        if self.config.double_q:
            best = self.model(mb["next_obs"])["q"].argmax(axis=1)
        else:
            best = q_next_target.argmax(axis=1)
        next_q = q_next_target[np.arange(len(best)), best]
        return mb["rewards"] + mb["discounts"] * (1.0 - mb["terminateds"]) * next_q

    def _learn_on(self, mb: dict) -> dict:
        out, cache = self.model.forward(mb["obs"])
        q = out["q"]
        target = self.td_targets(mb)
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
                "grad_credit": self._grad_credit, "pending": dict(self._pending)}

    def set_policy_state(self, state: dict) -> None:
        self.target.set_weights(state["target"])
        self.buffer.set_state(state["buffer"])
        self._last_target_update = state["last_target_update"]
        self._grad_credit = state["grad_credit"]
        self._pending = dict(state.get("pending") or {})

"""Evolution Strategies, OpenAI style (Salimans et al. 2017).

The driver puts one table of Gaussian noise in the object store once; every
worker reads it zero-copy (a read-only view on backends that share memory).
A worker perturbs the flat policy weights by ``±noise_stdev * table[i:i+d]`` for
random offsets ``i`` (mirrored sampling), runs one episode with each, and sends
back only the offsets and the returns; the driver rebuilds the noise from the
same table, forms the gradient estimate with centred ranks, and takes an Adam step.
The returns reported as ``episode_return_mean`` / ``episode_len_mean`` are those
of ``episodes_per_eval`` episodes per iteration of the unperturbed policy
(``theta`` itself), run by the workers next to the perturbed ones, as RLlib's
and OpenAI's ES report; the perturbed episodes' mean return is the learner stat
``perturbed_return_mean``. Both kinds of episode count in ``num_env_steps_sampled``.
The unperturbed episodes draw their start states from a stream of their own and
leave the observation filter alone, so training is the same whatever
``episodes_per_eval`` is.
With ``observation_filter="MeanStdFilter"`` the policy sees observations
normalised by the running mean and standard deviation of every observation the
workers have met (they send back the sums, the driver merges them and sends the
current statistics with the weights), as in the paper's MuJoCo runs.
With ``action_bins=k`` a Box action space is discretised as the paper did for
Hopper and Swimmer: the policy outputs ``k`` scores per action dimension and
takes the value of the best one on a grid of ``k`` points from ``low`` to
``high``. The piecewise-constant policy explores far better than a continuous
one clipped to the bounds; on Pendulum-v1 it is what lets ES find the swing-up.
"""
from __future__ import annotations

import os

import numpy as np

import beamlet

from .algorithm import Algorithm, AlgorithmConfig
from .blas import set_blas_threads
from .env import preprocess_obs
from .env_runner import WorkerSet, _runner_seed
from .models import Adam, build_model, distribution_class

__all__ = ["ES", "ESConfig", "ESWorker", "make_noise_table", "centered_ranks", "ObsStats",
           "BinnedActions"]

FILTERS = ("NoFilter", "MeanStdFilter")


def make_noise_table(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(size), dtype=np.float32)


def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of `x` scaled to [-0.5, 0.5] (same shape)."""
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[x.ravel().argsort()] = np.arange(x.size)
    return (ranks / max(1, x.size - 1) - 0.5).reshape(x.shape)


class BinnedActions:
    """A Box space's actions on a grid of `bins` values per dimension: the
    policy's ``bins * dim`` outputs are scores, dimension-major, and the action is
    the grid value with the highest score in each dimension."""

    def __init__(self, space, bins: int):
        from gymnasium import spaces
        if not isinstance(space, spaces.Box):
            raise ValueError(f"action_bins needs a Box action space, got {space}")
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
            raise ValueError(f"action_bins must be an integer >= 2, got {bins!r}")
        low = np.asarray(space.low, np.float64).ravel()
        high = np.asarray(space.high, np.float64).ravel()
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(f"action_bins needs finite action bounds, got {space}")
        self.bins = int(bins)
        self.shape = space.shape
        self.dim = low.size
        self.grid = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, self.bins)
        self.dtype = space.dtype

    @property
    def width(self) -> int:
        return self.dim * self.bins

    def actions(self, scores: np.ndarray) -> np.ndarray:
        """``(N, dim * bins)`` scores -> ``(N, *shape)`` actions."""
        idx = scores.reshape(len(scores), self.dim, self.bins).argmax(axis=-1)
        acts = np.take_along_axis(self.grid[None], idx[..., None], -1)[..., 0]
        return acts.reshape(len(scores), *self.shape).astype(self.dtype)


class ObsStats:
    """Running count, sum and sum of squares of observations (per dimension)."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim)
        self.sumsq = np.zeros(dim)

    def add(self, count: int, total: np.ndarray, totalsq: np.ndarray) -> None:
        self.count += int(count)
        self.sum += total
        self.sumsq += totalsq

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean and standard deviation (0 and 1 before any observation; the
        std is floored at 1e-2 so a constant dimension is not blown up)."""
        if self.count < 2:
            return np.zeros_like(self.sum), np.ones_like(self.sum)
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - mean * mean, 0.0)
        return mean, np.maximum(np.sqrt(var), 1e-2)

    def get_state(self) -> dict:
        return {"count": self.count, "sum": self.sum.copy(), "sumsq": self.sumsq.copy()}

    def set_state(self, state: dict) -> None:
        self.count = state["count"]
        self.sum = state["sum"].copy()
        self.sumsq = state["sumsq"].copy()


class ESWorker:
    """Runs perturbed episodes; holds the shared noise table (never copies it)."""

    def __init__(self, env_creator, env_config: dict, model_factory, noise: np.ndarray,
                 seed: int | None, worker_index: int, max_episode_steps: int | None,
                 blas_threads: int | None = 1, action_bins: int | None = None):
        if blas_threads is not None:
            set_blas_threads(blas_threads)
        self.env = env_creator(dict(env_config))
        self.noise = noise
        self.model = model_factory()
        self.rng = np.random.default_rng(_runner_seed(seed, worker_index))
        # The unperturbed episodes' start states come from their own stream, so
        # that reporting them does not change what is trained.
        runner_seed = _runner_seed(seed, worker_index)
        self.eval_rng = np.random.default_rng(None if runner_seed is None else [runner_seed, 1])
        self.dist_cls = distribution_class(self.env.action_space)
        self.max_steps = max_episode_steps
        self.binned = BinnedActions(self.env.action_space, action_bins) if action_bins else None

    def pid(self) -> int:
        return os.getpid()

    def noise_is_shared(self) -> bool:
        """True when the table is a read-only view (zero-copy), not a private copy."""
        return not self.noise.flags.writeable

    def _episode(self, flat: np.ndarray, seed: int | None, norm, stats: list | None
                 ) -> tuple[float, int]:
        from gymnasium import spaces
        self.model.set_flat(flat)
        obs, _ = self.env.reset(seed=seed)
        total, steps, done = 0.0, 0, False
        box = isinstance(self.env.action_space, spaces.Box)
        while not done:
            x = preprocess_obs(np.asarray(obs)[None], self.env.observation_space)
            if stats is not None:
                stats[0] += 1
                stats[1] += x[0]
                stats[2] += x[0].astype(np.float64) ** 2
            if norm is not None:
                x = (x - norm[0]) / norm[1]
            if self.binned is not None:
                action = self.binned.actions(self.model(x)["pi"])[0]
            elif box:
                action = self.dist_cls(self.model(x)["pi"]).deterministic()[0]
                action = np.clip(action, self.env.action_space.low, self.env.action_space.high)
            else:
                action = int(self.dist_cls(self.model(x)["pi"]).deterministic()[0])
            obs, rew, term, trunc, _ = self.env.step(action)
            total += float(rew)
            steps += 1
            done = term or trunc or (self.max_steps is not None and steps >= self.max_steps)
        return total, steps

    def do_rollouts(self, theta: np.ndarray, num_pairs: int, noise_stdev: float,
                    obs_norm: tuple | None = None, num_eval: int = 0) -> dict:
        """`num_pairs` mirrored pairs of episodes around `theta`, then `num_eval`
        episodes of `theta` itself (unperturbed; their ``eval_returns`` and
        ``eval_lengths`` are in the result, and their observations are not in
        ``obs_stats``). With `obs_norm` ``(mean, std)`` the policy sees normalised
        observations, and the result also holds ``obs_stats`` ``(count, sum, sum
        of squares)`` of the raw ones of the perturbed episodes."""
        dim = theta.size
        indices, pos, neg, lens = [], [], [], []
        stats = None
        if obs_norm is not None:
            d = len(obs_norm[0])
            stats = [0, np.zeros(d), np.zeros(d)]
        for _ in range(int(num_pairs)):
            i = int(self.rng.integers(0, self.noise.size - dim + 1))
            eps = noise_stdev * self.noise[i:i + dim]
            # Both halves of a pair start from the same state (common random numbers).
            seed = int(self.rng.integers(2**31))
            rp, lp = self._episode(theta + eps, seed, obs_norm, stats)
            rn, ln = self._episode(theta - eps, seed, obs_norm, stats)
            indices.append(i)
            pos.append(rp)
            neg.append(rn)
            lens.append((lp, ln))
        evals = [self._episode(theta, int(self.eval_rng.integers(2**31)), obs_norm, None)
                 for _ in range(int(num_eval))]
        out = {"indices": np.asarray(indices, np.int64), "returns": np.asarray([pos, neg]).T,
               "lengths": np.asarray(lens, np.int64),
               "eval_returns": np.asarray([r for r, _ in evals], np.float64),
               "eval_lengths": np.asarray([n for _, n in evals], np.int64)}
        if stats is not None:
            out["obs_stats"] = tuple(stats)
        return out

    def get_state(self) -> dict:
        return {"rng": self.rng.bit_generator.state,
                "eval_rng": self.eval_rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        if "eval_rng" in state:   # checkpoints from before the unperturbed episodes
            self.eval_rng.bit_generator.state = state["eval_rng"]


class ESConfig(AlgorithmConfig):
    """ES's settings: ``noise_size`` (floats in the shared table),
    ``noise_stdev``, ``episodes_per_batch`` (perturbed episodes per iteration,
    split over the workers in mirrored pairs), ``episodes_per_eval`` (episodes
    of the unperturbed policy per iteration, split over the workers, at least
    one each: the source of ``episode_return_mean``), ``stepsize`` (Adam's learning
    rate), ``l2_coeff`` (weight decay), ``max_episode_steps``,
    ``observation_filter`` ("NoFilter" or "MeanStdFilter"), ``action_bins``
    (None: a continuous Box action, clipped to the bounds; k >= 2: k grid values
    per action dimension, see :class:`BinnedActions`)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class or ES)
        self.noise_size = 25_000_000
        self.noise_stdev = 0.02
        self.episodes_per_batch = 40
        self.episodes_per_eval = 4
        self.stepsize = 0.02
        self.lr = 0.02
        self.l2_coeff = 0.005
        self.max_episode_steps: int | None = None
        self.observation_filter = "NoFilter"
        self.action_bins: int | None = None
        self.model = {"fcnet_hiddens": [32], "fcnet_activation": "tanh", "pi_out_gain": 1.0}

    def training(self, **kwargs):
        if "stepsize" in kwargs:
            kwargs.setdefault("lr", kwargs["stepsize"])
        return super().training(**kwargs)


class ES(Algorithm):
    config_class = ESConfig
    name = "ES"

    def setup_algorithm(self) -> None:
        from .actor_critic import ModelFactory
        cfg = self.config
        self.binned = (BinnedActions(self.action_space, cfg.action_bins)
                       if cfg.action_bins is not None else None)
        heads = {"pi": self.binned.width if self.binned else self.pi_width()}
        model_config = dict(cfg.model)
        if self.binned:
            model_config["free_log_std"] = False  # all of "pi" are scores
        self.model = build_model(self.observation_space, self.action_space, heads,
                                 model_config, lr=cfg.lr, grad_clip=cfg.grad_clip,
                                 seed=cfg.seed)
        self.theta = self.model.get_flat().astype(np.float64)
        self.optimizer = Adam([self.theta], lr=cfg.lr)
        if (isinstance(cfg.episodes_per_eval, bool)
                or not isinstance(cfg.episodes_per_eval, (int, np.integer))
                or cfg.episodes_per_eval < 1):
            raise ValueError(f"episodes_per_eval must be an integer >= 1, got "
                             f"{cfg.episodes_per_eval!r}")
        if cfg.observation_filter not in FILTERS:
            raise ValueError(f"observation_filter must be one of {FILTERS}, got "
                             f"{cfg.observation_filter!r}")
        self.obs_stats = (ObsStats(self.obs_dim) if cfg.observation_filter == "MeanStdFilter"
                          else None)
        seed = 0 if cfg.seed is None else cfg.seed
        self.noise = make_noise_table(max(cfg.noise_size, self.theta.size + 1), seed + 7)
        factory = ModelFactory(self.observation_space, self.action_space, heads,
                               model_config, cfg.lr, cfg.grad_clip, cfg.seed)
        if cfg.num_env_runners and not beamlet.is_initialized():
            beamlet.init(ignore_reinit_error=True)
        noise_arg = beamlet.put(self.noise) if cfg.num_env_runners else self.noise
        self.noise_ref = noise_arg
        creator, env_config = self.env_creator, dict(cfg.env_config)
        self.workers = WorkerSet(
            ESWorker, lambda i: (creator, env_config, factory, noise_arg, cfg.seed, i,
                                 cfg.max_episode_steps, cfg.blas_threads, cfg.action_bins),
            cfg.num_env_runners, max_restarts=cfg.max_num_env_runner_restarts,
            num_cpus=cfg.num_cpus_per_env_runner, timeout_s=cfg.sample_timeout_s)

    def training_step(self) -> dict:
        cfg = self.config
        n_workers = max(1, len(self.workers))
        pairs = max(1, int(np.ceil(cfg.episodes_per_batch / 2 / n_workers)))
        n_eval = int(np.ceil(cfg.episodes_per_eval / n_workers))
        theta = self.theta.astype(np.float32)
        arg = beamlet.put(theta) if self.workers.actors else theta
        norm = self.obs_stats.mean_std() if self.obs_stats is not None else None
        results = self.workers.foreach("do_rollouts", arg, pairs, cfg.noise_stdev, norm, n_eval)
        if self.obs_stats is not None:
            for r in results:
                self.obs_stats.add(*r["obs_stats"])
        indices = np.concatenate([r["indices"] for r in results])
        returns = np.concatenate([r["returns"] for r in results])
        lengths = np.concatenate([r["lengths"] for r in results])
        eval_returns = np.concatenate([r["eval_returns"] for r in results])
        eval_lengths = np.concatenate([r["eval_lengths"] for r in results])
        self.record_episodes(list(zip(eval_returns.tolist(), eval_lengths.tolist())))
        self.add_env_steps(int(lengths.sum() + eval_lengths.sum()))
        ranks = centered_ranks(returns)
        weights = ranks[:, 0] - ranks[:, 1]
        dim = self.theta.size
        grad = np.zeros(dim)
        for w, i in zip(weights, indices):
            grad += w * self.noise[i:i + dim]
        grad /= returns.size
        gnorm = self.optimizer.step([-grad + cfg.l2_coeff * self.theta])
        self.model.set_flat(self.theta)
        return {"grad_gnorm": gnorm, "weights_norm": float(np.linalg.norm(self.theta)),
                "perturbed_episodes_this_iter": int(returns.size),
                "perturbed_return_mean": float(returns.mean()),
                "perturbed_len_mean": float(lengths.mean()),
                "eval_episodes_this_iter": int(eval_returns.size)}

    def compute_actions(self, obs, explore):
        if self.obs_stats is not None:
            mean, std = self.obs_stats.mean_std()
            obs = (obs - mean) / std
        if self.binned is not None:
            return self.binned.actions(self.model(obs)["pi"])
        dist = distribution_class(self.action_space)(self.model(obs)["pi"])
        return dist.sample(self.rng) if explore else dist.deterministic()

    def get_policy_state(self) -> dict:
        return {"theta": self.theta.copy(), "optimizer": self.optimizer.get_state(),
                "obs_stats": self.obs_stats.get_state() if self.obs_stats else None}

    def set_policy_state(self, state: dict) -> None:
        self.theta[...] = state["theta"]
        self.optimizer.set_state(state["optimizer"])
        if self.obs_stats is not None and state.get("obs_stats") is not None:
            self.obs_stats.set_state(state["obs_stats"])
        self.model.set_flat(self.theta)

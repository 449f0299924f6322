"""Evolution Strategies, OpenAI style (Salimans et al. 2017).

The driver puts one table of Gaussian noise in the object store once; every
worker reads it zero-copy (a read-only view on backends that share memory).
Each iteration the driver draws random offsets ``i`` into the table and a start
state (a seed) for each; a worker perturbs the flat policy weights by
``±noise_stdev * table[i:i+d]`` (mirrored sampling), runs one episode with each
from that start state, and sends back only the returns and lengths, a few
numbers per pair; the driver rebuilds the noise from the same table, forms the
gradient estimate with centred ranks, and takes an Adam step. Every worker is
sent the iteration's whole list of episodes and takes them one at a time from
a counter the workers share (:meth:`WorkerSet.claimed`), so that they end an
iteration within one episode of each other although CartPole's episodes last
from 10 to 500 steps, and the driver handles one message per worker (where
the counter cannot be shared, the episodes go out in slices that shrink as
they run out, each to the first worker free: :meth:`WorkerSet.balanced`);
since the driver draws everything and an episode depends only on what it was
sent, training is the same whatever the number of workers and whichever
worker ran what.
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
import time

import numpy as np

import beamlet

from .algorithm import Algorithm, AlgorithmConfig
from .blas import set_blas_threads
from .claims import ClaimCounter, attach
from .env import preprocess_obs
from .env_runner import WorkerSet
from .models import Adam, build_model, distribution_class

__all__ = ["ES", "ESConfig", "ESWorker", "make_noise_table", "centered_ranks", "ObsStats",
           "BinnedActions", "weighted_noise_sum", "unit_episodes"]

FILTERS = ("NoFilter", "MeanStdFilter")
# Weights up to this size travel inside each slice's message (in the pickle
# stream: cheaper than a ref to resolve); larger ones are put in the object
# store once per iteration and the slices carry the ref.
_PUT_THETA_BYTES = 16 * 1024
# A slice of episodes handed to a worker is at least this many env steps'
# worth (by the last call's mean episode length): a slice costs the driver and
# the worker a message each way, which short episodes (CartPole's first ones,
# ~20 steps) do not repay.
_SLICE_MIN_STEPS = 100
# The workers take their episodes one at a time from a counter they share
# (`WorkerSet.claimed`: one message each way per worker per iteration) rather
# than being handed slices by the driver (a round trip per slice, whose CPU
# the driver takes from the workers when they have a core each).
_SELF_SCHEDULED = True


def make_noise_table(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(size), dtype=np.float32)


def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of `x` scaled to [-0.5, 0.5] (same shape)."""
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[x.ravel().argsort()] = np.arange(x.size)
    return (ranks / max(1, x.size - 1) - 0.5).reshape(x.shape)


def weighted_noise_sum(noise: np.ndarray, offsets: np.ndarray, weights: np.ndarray,
                       dim: int) -> np.ndarray:
    """``sum_k weights[k] * noise[offsets[k]:offsets[k] + dim]`` (float64), a
    block of rows at a time (a matrix product per block, of about a million
    floats) instead of one slice at a time."""
    offsets = np.asarray(offsets, np.int64)
    weights = np.asarray(weights, np.float64)
    total = np.zeros(dim)
    block = max(1, (1 << 20) // max(1, dim))
    cols = np.arange(dim)
    for s in range(0, len(offsets), block):
        rows = noise[offsets[s:s + block, None] + cols]
        total += weights[s:s + block] @ rows
    return total


def unit_episodes(units: list) -> tuple[list, np.ndarray]:
    """The episodes of `units` (rows ``(offset, seed)``, ``offset == -1`` for an
    unperturbed episode), as the rows ``(offset, seed, sign)`` of
    :meth:`ESWorker.episodes`: a pair's ``+1`` then its ``-1`` episode, an
    unperturbed one with sign 0; and the index of each unit's first episode."""
    rows, first = [], np.empty(len(units), np.int64)
    for u, (offset, seed) in enumerate(units):
        first[u] = len(rows)
        if offset >= 0:
            rows += [[offset, seed, 1], [offset, seed, -1]]
        else:
            rows.append([-1, seed, 0])
    return rows, first


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
    """Runs episodes of perturbed policies; holds the shared noise table (never
    copies it). It draws nothing at random: the driver sends the noise offsets
    and start-state seeds, so an episode depends only on what it was sent."""

    def __init__(self, env_creator, env_config: dict, model_factory, noise: np.ndarray,
                 max_episode_steps: int | None, blas_threads: int | None = 1,
                 action_bins: int | None = None):
        from gymnasium import spaces
        if blas_threads is not None:
            set_blas_threads(blas_threads)
        self.env = env_creator(dict(env_config))
        self.noise = noise
        self.model = model_factory()
        self.dist_cls = distribution_class(self.env.action_space)
        self.max_steps = max_episode_steps
        self.binned = BinnedActions(self.env.action_space, action_bins) if action_bins else None
        self.box = isinstance(self.env.action_space, spaces.Box)

    def pid(self) -> int:
        return os.getpid()

    def noise_is_shared(self) -> bool:
        """True when the table is a read-only view (zero-copy), not a private copy."""
        return not self.noise.flags.writeable

    def _episode(self, flat: np.ndarray, seed: int, norm, seen: list | None
                 ) -> tuple[float, int]:
        """One episode of the policy with weights `flat` from the start state of
        `seed`; with `seen`, its preprocessed observations are appended to it."""
        self.model.set_flat(flat)
        obs, _ = self.env.reset(seed=seed)
        space = self.env.observation_space
        total, steps, done = 0.0, 0, False
        while not done:
            x = preprocess_obs(np.asarray(obs)[None], space)
            if seen is not None:
                seen.append(x[0])
            if norm is not None:
                x = (x - norm[0]) / norm[1]
            if self.binned is not None:
                action = self.binned.actions(self.model(x)["pi"])[0]
            elif self.box:
                action = self.dist_cls(self.model(x)["pi"]).deterministic()[0]
                action = np.clip(action, self.env.action_space.low, self.env.action_space.high)
            else:
                action = int(self.dist_cls(self.model(x)["pi"]).deterministic()[0])
            obs, rew, term, trunc, _ = self.env.step(action)
            total += float(rew)
            steps += 1
            done = term or trunc or (self.max_steps is not None and steps >= self.max_steps)
        return total, steps

    def episodes(self, theta: np.ndarray, noise_stdev: float, obs_norm: tuple | None,
                 rows: list) -> tuple[np.ndarray, np.ndarray | None, float]:
        """One episode per row ``(offset, seed, sign)`` (ints) from the start
        state of `seed`: with sign ``±1`` of the weights ``theta ± noise_stdev *
        noise[offset:offset + theta.size]`` (a mirrored pair is two rows with
        the same offset and seed: common random numbers), with sign 0 of
        `theta` itself (unperturbed). Returns ``(out, stats, seconds)``: `out`
        float64 rows ``(return, length)``; with `obs_norm` ``(mean, std)`` the
        policy sees normalised observations and `stats` holds per row
        ``(count, sum..., sum of squares...)`` of the raw observations of a
        perturbed episode (zeros for an unperturbed one), else None; `seconds`,
        the time the call took here."""
        start = time.perf_counter()
        out, stats = self._rows(theta, noise_stdev, obs_norm, rows, range(len(rows)))
        return out, stats, time.perf_counter() - start

    def claimed_episodes(self, theta: np.ndarray, noise_stdev: float, obs_norm: tuple | None,
                         rows: list, ticket: tuple) -> tuple[np.ndarray, tuple]:
        """:meth:`episodes` of the rows this worker claims, one at a time,
        from the counter of `ticket` (:mod:`.claims`), until none is left:
        ``(indices, (out, stats, seconds))``, `out` and `stats` in the order
        of `indices`. No rows if the counter cannot be reached from here."""
        start = time.perf_counter()
        taken: list[int] = []

        def claims(counter):
            for index in counter.indices(len(rows)):
                taken.append(index)
                yield index
        counter = attach(ticket)
        if counter is None:
            out, stats = self._rows(theta, noise_stdev, obs_norm, rows, ())
        else:
            with counter:
                out, stats = self._rows(theta, noise_stdev, obs_norm, rows, claims(counter))
        return np.asarray(taken, np.int64), (out, stats, time.perf_counter() - start)

    def _rows(self, theta, noise_stdev, obs_norm, rows, order) -> tuple:
        """``(out, stats)`` of :meth:`episodes` for the rows of `rows` at the
        indices `order` yields, in that order."""
        dim = theta.size
        outs, all_stats = [], []
        d = len(obs_norm[0]) if obs_norm is not None else 0
        for index in order:
            offset, seed, sign = rows[index]
            stats = np.zeros(1 + 2 * d) if obs_norm is not None else None
            if sign == 0:
                outs.append(self._episode(theta, seed, obs_norm, None))
                all_stats.append(stats)
                continue
            if not 0 <= offset <= self.noise.size - dim:
                raise ValueError(f"noise offset {offset} is outside the table "
                                 f"({self.noise.size} floats, {dim} weights)")
            eps = noise_stdev * self.noise[offset:offset + dim]
            seen = [] if stats is not None else None
            outs.append(self._episode(theta + eps if sign > 0 else theta - eps, seed,
                                      obs_norm, seen))
            if seen:
                x = np.asarray(seen, np.float64)
                stats[0] = len(x)
                stats[1:1 + d] = x.sum(0)
                stats[1 + d:] = (x * x).sum(0)
            all_stats.append(stats)
        out = np.array(outs, np.float64).reshape(len(outs), 2)
        stats = (np.array(all_stats).reshape(len(outs), 1 + 2 * d) if obs_norm is not None
                 else None)
        return out, stats


class ESConfig(AlgorithmConfig):
    """ES's settings: ``noise_size`` (floats in the shared table),
    ``noise_stdev``, ``episodes_per_batch`` (perturbed episodes per iteration,
    in mirrored pairs: rounded up to an even number), ``episodes_per_eval``
    (episodes of the unperturbed policy per iteration: the source of
    ``episode_return_mean``), ``stepsize`` (Adam's learning
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
        # The driver draws every perturbation and start state, from streams of
        # its own (the unperturbed episodes' apart, so that reporting them does
        # not change what is trained): training does not depend on how many
        # workers run the episodes, nor on which runs which.
        self.perturb_rng = np.random.default_rng(None if cfg.seed is None else [cfg.seed, 8])
        self.eval_rng = np.random.default_rng(None if cfg.seed is None else [cfg.seed, 9])
        #: what the last run_units call took (see there); the driver's local
        #: worker counts as one worker
        self.last_worker_steps: list[int] = []
        self.last_episode_steps = np.zeros(0, np.int64)   # per episode, in claim order
        self.last_worker_busy_s: list[float] = []
        self.last_wait_s = self.last_run_s = 0.0
        self._mean_episode_len = float(_SLICE_MIN_STEPS)   # (until the first call)
        factory = ModelFactory(self.observation_space, self.action_space, heads,
                               model_config, cfg.lr, cfg.grad_clip, cfg.seed)
        if cfg.num_env_runners and not beamlet.is_initialized():
            beamlet.init(ignore_reinit_error=True)
        noise_arg = beamlet.put(self.noise) if cfg.num_env_runners else self.noise
        #: the workers take their episodes from it (`WorkerSet.claimed`); None
        #: (no workers, or no memory files here): slices (`WorkerSet.balanced`)
        self.claims = None
        if cfg.num_env_runners and _SELF_SCHEDULED:
            try:
                self.claims = ClaimCounter()
            except OSError:
                pass
        self.noise_ref = noise_arg
        creator, env_config = self.env_creator, dict(cfg.env_config)
        self.workers = WorkerSet(
            ESWorker, lambda i: (creator, env_config, factory, noise_arg,
                                 cfg.max_episode_steps, cfg.blas_threads, cfg.action_bins),
            cfg.num_env_runners, max_restarts=cfg.max_num_env_runner_restarts,
            num_cpus=cfg.num_cpus_per_env_runner, timeout_s=cfg.sample_timeout_s)

    def draw_units(self, num_pairs: int, num_eval: int) -> list:
        """The rows ``[offset, seed]`` of :meth:`run_units` for
        `num_pairs` mirrored pairs then `num_eval` unperturbed episodes."""
        rng = self.perturb_rng
        offsets = rng.integers(0, self.noise.size - self.theta.size + 1, size=num_pairs)
        seeds = rng.integers(2**31, size=num_pairs)
        return ([[o, s] for o, s in zip(offsets.tolist(), seeds.tolist())]
                + [[-1, s] for s in self.eval_rng.integers(2**31, size=num_eval).tolist()])

    def run_units(self, units: list) -> tuple[np.ndarray, np.ndarray | None]:
        """The episodes of `units` (rows of :meth:`draw_units`) with the current
        weights: ``(out, stats)``, per unit ``(return+, return-, length+,
        length-)`` (an unperturbed unit: ``(return, 0, length, 0)``) and, with
        the observation filter, the sums of :meth:`ESWorker.episodes` over the
        unit's episodes (else None), in the order of `units`. Every worker is
        sent all the episodes and takes them one at a time whenever it is free
        (:meth:`WorkerSet.claimed`); without the claim counter, they go out in
        slices to the first worker free (:meth:`WorkerSet.balanced`), each at
        least ``_SLICE_MIN_STEPS`` env steps by the last call's mean episode
        length. Which worker ran what changes nothing in the result. Sets
        ``last_worker_steps`` and ``last_worker_busy_s`` (env steps and time
        spent per worker), ``last_wait_s`` (the driver's time waiting for
        results), ``last_run_s`` (the whole call) and ``last_episode_steps``
        (each episode's length, in the order the workers claim them)."""
        began = time.perf_counter()
        cfg = self.config
        theta = self.theta.astype(np.float32)
        norm = self.obs_stats.mean_std() if self.obs_stats is not None else None
        rows, first = unit_episodes(units)
        theta_arg = (beamlet.put(theta) if self.workers.local is None
                     and theta.nbytes > _PUT_THETA_BYTES else theta)
        eps_out = np.empty((len(rows), 2))
        eps_stats = None if norm is None else np.empty((len(rows), 1 + 2 * len(norm[0])))
        n = max(1, len(self.workers))
        steps, busy = [0] * n, [0.0] * n
        args = (theta_arg, cfg.noise_stdev, norm)
        if self.claims is not None:
            parts = self.workers.claimed("claimed_episodes", args, rows, self.claims,
                                         fallback="episodes")
        else:
            min_size = max(1, round(_SLICE_MIN_STEPS / self._mean_episode_len))
            parts = ((w, slice(a, b), result) for w, a, b, result
                     in self.workers.balanced("episodes", args, rows, min_size=min_size))
        for w, where, (part, part_stats, seconds) in parts:
            eps_out[where] = part
            if eps_stats is not None:
                eps_stats[where] = part_stats
            steps[w] += int(part[:, 1].sum())
            busy[w] += seconds
        pair = np.array([offset >= 0 for offset, _ in units], bool)
        second = first[pair] + 1
        out = np.zeros((len(units), 4))
        out[:, 0::2] = eps_out[first]
        out[pair, 1::2] = eps_out[second]
        stats = None
        if eps_stats is not None:
            stats = eps_stats[first]
            stats[pair] += eps_stats[second]
        if rows:
            self._mean_episode_len = max(1.0, sum(steps) / len(rows))
        self.last_worker_steps, self.last_worker_busy_s = steps, busy
        self.last_episode_steps = eps_out[:, 1].astype(np.int64)
        self.last_wait_s = self.workers.last_wait_s
        self.last_run_s = time.perf_counter() - began
        return out, stats

    def training_step(self) -> dict:
        cfg = self.config
        pairs = max(1, int(np.ceil(cfg.episodes_per_batch / 2)))
        units = self.draw_units(pairs, int(cfg.episodes_per_eval))
        out, stats = self.run_units(units)
        perturbed, unperturbed = out[:pairs], out[pairs:]
        if self.obs_stats is not None:
            d = self.obs_dim
            total = stats[:pairs].sum(0)
            self.obs_stats.add(int(total[0]), total[1:1 + d], total[1 + d:])
        returns = perturbed[:, :2]
        self.record_episodes(list(zip(unperturbed[:, 0].tolist(),
                                      unperturbed[:, 2].astype(np.int64).tolist())))
        self.add_env_steps(int(perturbed[:, 2:].sum() + unperturbed[:, 2].sum()))
        ranks = centered_ranks(returns)
        offsets = np.array([offset for offset, _ in units[:pairs]], np.int64)
        grad = weighted_noise_sum(self.noise, offsets, ranks[:, 0] - ranks[:, 1],
                                  self.theta.size)
        grad /= returns.size
        gnorm = self.optimizer.step([-grad + cfg.l2_coeff * self.theta])
        self.model.set_flat(self.theta)
        return {"grad_gnorm": gnorm, "weights_norm": float(np.linalg.norm(self.theta)),
                "perturbed_episodes_this_iter": int(returns.size),
                "perturbed_return_mean": float(returns.mean()),
                "perturbed_len_mean": float(perturbed[:, 2:].mean()),
                "eval_episodes_this_iter": len(unperturbed)}

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
                "obs_stats": self.obs_stats.get_state() if self.obs_stats else None,
                "perturb_rng": self.perturb_rng.bit_generator.state,
                "eval_rng": self.eval_rng.bit_generator.state}

    def set_policy_state(self, state: dict) -> None:
        self.theta[...] = state["theta"]
        self.optimizer.set_state(state["optimizer"])
        if "perturb_rng" in state:   # checkpoints from before kept them in the workers
            self.perturb_rng.bit_generator.state = state["perturb_rng"]
            self.eval_rng.bit_generator.state = state["eval_rng"]
        if self.obs_stats is not None and state.get("obs_stats") is not None:
            self.obs_stats.set_state(state["obs_stats"])
        self.model.set_flat(self.theta)

    def stop(self) -> None:
        super().stop()
        if self.claims is not None:
            self.claims.close()
            self.claims = None

    def set_state(self, state: dict) -> None:
        # The workers hold no state (checkpoints from before held their generators).
        super().set_state({**state, "runners": []})

"""Env runners: vectorised environments that sample with the current weights.

An :class:`EnvRunner` owns ``num_envs`` copies of an environment in one Gymnasium
vector env, a copy of the model, and a random generator; ``sample(weights,
num_steps)`` loads the weights and steps every copy `num_steps` times. Runners
are beamlet actors (:class:`WorkerSet`), or one plain object in the driver when
``num_env_runners=0``.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import beamlet
from beamlet.exceptions import ActorError, GetTimeoutError

from .blas import set_blas_threads
from .env import make_vector_env, preprocess_obs

__all__ = ["RunnerSpec", "EnvRunner", "WorkerSet", "concat_episodes", "slice_bounds"]


@dataclass
class RunnerSpec:
    """Everything an env runner is built from (shipped to the actor by value).

    ``policy(model, obs, rng, explore, **kwargs) -> (actions, extras)`` picks the
    actions for a batch of preprocessed observations; ``extras`` is a dict of
    per-step arrays (e.g. ``logp``, ``vf``) stored in the batch."""

    env_creator: Callable
    env_config: dict
    num_envs: int
    seed: int | None
    model_factory: Callable[[], Any]
    policy: Callable
    extra: dict = field(default_factory=dict)
    blas_threads: int | None = 1


def _runner_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else int(seed) * 1000 + 17 * index + 1


class EnvRunner:
    """Steps a vector env with a policy; keeps running episode statistics."""

    def __init__(self, spec: RunnerSpec, worker_index: int = 0):
        self.spec = spec
        self.worker_index = worker_index
        if spec.blas_threads is not None:
            set_blas_threads(spec.blas_threads)
        seed = _runner_seed(spec.seed, worker_index)
        self.env = make_vector_env(spec.env_creator, spec.env_config, spec.num_envs)
        self.obs_space = self.env.single_observation_space
        self.act_space = self.env.single_action_space
        self.rng = np.random.default_rng(seed)
        self.model = spec.model_factory()
        raw, _ = self.env.reset(seed=seed)
        self.obs = preprocess_obs(raw, self.obs_space)
        self.ep_return = np.zeros(spec.num_envs)
        self.ep_len = np.zeros(spec.num_envs, dtype=np.int64)
        from gymnasium import spaces
        self._box = isinstance(self.act_space, spaces.Box)

    def pid(self) -> int:
        return os.getpid()

    def _env_actions(self, actions: np.ndarray) -> np.ndarray:
        if self._box:
            return np.clip(actions, self.act_space.low, self.act_space.high).astype(
                self.act_space.dtype)
        return actions

    def sample(self, weights: Any, num_steps: int, explore: bool = True, **kwargs) -> dict:
        """`num_steps` steps of every env copy, time-major: ``obs``/``next_obs``
        ``(T, N, D)``, ``actions``, ``rewards``, ``terminateds``, ``truncateds``
        ``(T, N)`` and the policy's extras; ``episodes`` is the list of
        ``(return, length)`` of the episodes that ended."""
        if weights is not None:
            self.model.set_weights(weights)
        n = self.spec.num_envs
        obs_b, next_b, act_b, rew_b, term_b, trunc_b = [], [], [], [], [], []
        extras_b: dict[str, list] = {}
        episodes = []
        for _ in range(int(num_steps)):
            actions, extras = self.spec.policy(self.model, self.obs, self.rng, explore, **kwargs)
            raw, rew, term, trunc, infos = self.env.step(self._env_actions(actions))
            nxt = preprocess_obs(raw, self.obs_space)
            done = np.logical_or(term, trunc)
            true_next = nxt
            if done.any():
                true_next = nxt.copy()
                final = infos["final_obs"]
                for i in np.flatnonzero(done):
                    true_next[i] = preprocess_obs(final[i][None], self.obs_space)[0]
            obs_b.append(self.obs)
            next_b.append(true_next)
            act_b.append(actions)
            rew_b.append(np.asarray(rew, dtype=np.float64))
            term_b.append(np.asarray(term, dtype=bool))
            trunc_b.append(np.asarray(trunc, dtype=bool))
            for key, value in extras.items():
                extras_b.setdefault(key, []).append(value)
            self.ep_return += rew
            self.ep_len += 1
            for i in np.flatnonzero(done):
                episodes.append((float(self.ep_return[i]), int(self.ep_len[i])))
                self.ep_return[i] = 0.0
                self.ep_len[i] = 0
            self.obs = nxt
        batch = {"obs": np.asarray(obs_b, np.float32).reshape(len(obs_b), n, -1),
                 "next_obs": np.asarray(next_b, np.float32).reshape(len(obs_b), n, -1),
                 "actions": np.asarray(act_b), "rewards": np.asarray(rew_b),
                 "terminateds": np.asarray(term_b), "truncateds": np.asarray(trunc_b),
                 "episodes": episodes}
        for key, values in extras_b.items():
            batch[key] = np.asarray(values)
        return batch

    def get_state(self) -> dict:
        """The runner's whole state (envs included) when the envs pickle, so a
        restored algorithm continues exactly; otherwise only the generator."""
        import cloudpickle
        state = {"rng": self.rng.bit_generator.state, "obs": self.obs,
                 "ep_return": self.ep_return, "ep_len": self.ep_len, "env": None}
        try:
            state["env"] = cloudpickle.dumps(self.env.envs)
        except Exception:  # noqa: BLE001 - an env that does not pickle restarts fresh
            pass
        return state

    def set_state(self, state: dict) -> None:
        import pickle
        self.rng.bit_generator.state = state["rng"]
        if state.get("env") is not None:
            self.env.envs = pickle.loads(state["env"])
            self.obs = np.array(state["obs"])
            self.ep_return = np.array(state["ep_return"])
            self.ep_len = np.array(state["ep_len"])

    def stop(self) -> None:
        self.env.close()


def slice_bounds(total: int, workers: int, min_size: int = 1, divisor: int = 2) -> list:
    """The slices ``(a, b)`` of :meth:`WorkerSet.balanced` over `total` items:
    ``ceil(left / (divisor * workers))`` items each, at least `min_size`, or
    one equal slice per worker when a worker's share is at most two slices of
    `min_size` (or there is one worker)."""
    if workers == 1 or 2 * min_size * workers >= total:
        bounds = [total * k // workers for k in range(workers + 1)]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    out, start = [], 0
    while start < total:
        size = max(min_size, -(-(total - start) // (divisor * workers)))
        out.append((start, min(total, start + size)))
        start += size
    return out


def concat_episodes(batches: list[dict]) -> list:
    return [ep for b in batches for ep in b["episodes"]]


class WorkerSet:
    """`num_workers` actors of class `cls` built as ``cls(*make_args(i))`` for
    ``i = 1..num_workers`` (or, with ``num_workers=0``, one local object with
    index 0). A crashed actor is restarted by beamlet (``max_restarts``); if
    restarts are used up it is replaced by a new actor. ``num_restarts`` counts
    both."""

    def __init__(self, cls: type, make_args: Callable[[int], tuple], num_workers: int, *,
                 max_restarts: int = 3, num_cpus: float = 0, timeout_s: float = 600.0):
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"the number of env runners must be an int >= 0, got "
                             f"{num_workers!r}")
        self.cls = cls
        self.make_args = make_args
        self.timeout_s = timeout_s
        self.num_restarts = 0
        self.last_wait_s = 0.0
        self.local = cls(*make_args(0)) if num_workers == 0 else None
        self._remote_cls = None
        self.actors: list = []
        if num_workers:
            if not beamlet.is_initialized():
                beamlet.init(ignore_reinit_error=True)
            self._remote_cls = beamlet.remote(num_cpus=num_cpus, max_restarts=max_restarts)(cls)
            self.actors = [self._remote_cls.remote(*make_args(i + 1))
                           for i in range(num_workers)]

    def __len__(self) -> int:
        return len(self.actors)

    def replace(self, i: int) -> None:
        """A fresh actor in slot `i` (the old one is killed if still alive)."""
        try:
            beamlet.kill(self.actors[i])
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        self.actors[i] = self._remote_cls.remote(*self.make_args(i + 1))
        self.num_restarts += 1

    def submit(self, i: int, method: str, *args, **kwargs):
        return getattr(self.actors[i], method).remote(*args, **kwargs)

    def call(self, i: int, method: str, *args, **kwargs):
        """Call `method` on worker `i` and return its result; on an actor crash,
        retry once on the restarted actor, then once on a new one."""
        for attempt in range(3):
            try:
                return beamlet.get(self.submit(i, method, *args, **kwargs),
                                   timeout=self.timeout_s)
            except ActorError:
                if attempt == 0:
                    self.num_restarts += 1
                elif attempt == 1:
                    self.replace(i)
                else:
                    raise
        raise AssertionError("unreachable")

    def _result(self, i: int, ref, method: str, args: tuple, kwargs: dict):
        """The result of `ref`, the call ``method(*args, **kwargs)`` submitted
        to worker `i`; if the actor crashed, the call is run again (`call`)."""
        try:
            return beamlet.get(ref, timeout=self.timeout_s)
        except ActorError:
            self.num_restarts += 1
            return self.call(i, method, *args, **kwargs)

    def foreach(self, method: str, *args, **kwargs) -> list:
        """`method` on every worker in parallel (on the local one if there are none)."""
        if self.local is not None:
            return [getattr(self.local, method)(*args, **kwargs)]
        refs = [self.submit(i, method, *args, **kwargs) for i in range(len(self.actors))]
        return [self._result(i, ref, method, args, kwargs) for i, ref in enumerate(refs)]

    def balanced(self, method: str, args: tuple, items: list, *, min_size: int = 1,
                 in_flight: int = 2, divisor: int = 2):
        """``method(*args, items[a:b])`` over consecutive slices of `items` that
        cover it once, each slice run by whichever worker is free first; yields
        ``(worker index, a, b, result)`` as the results arrive.

        The slices shrink as the items run out (``ceil(left / (divisor *
        workers))`` items, at least `min_size`), so that the workers end about
        together however unequal the items' costs; each worker has up to
        `in_flight` slices handed to it, so that it does not wait for the
        driver between two. When a worker's share is at most two slices of
        `min_size` (cheap items: a slice would cost more than it balances),
        and with one actor, each worker gets one equal slice; with the local
        worker, it is one call. The boundaries depend only on ``len(items)``,
        `min_size` and the number of workers, never on timing. A slice whose
        actor crashed is run again (`call`). ``last_wait_s`` is the time the
        driver spent waiting for results. Raises GetTimeoutError if no result
        arrives within ``timeout_s``."""
        self.last_wait_s = 0.0
        if self.local is not None:
            yield 0, 0, len(items), getattr(self.local, method)(*args, items)
            return
        n, total = len(self.actors), len(items)
        slices = deque(slice_bounds(total, n, min_size, divisor))
        pending: dict = {}

        def hand_out(i: int) -> None:
            a, b = slices.popleft()
            pending[self.submit(i, method, *args, items[a:b])] = (i, a, b)

        for _ in range(in_flight):
            for i in range(n):
                if slices:
                    hand_out(i)
        if not slices:   # all handed out at once (one slice each): no wait needed
            for ref, (i, a, b) in pending.items():
                start = time.perf_counter()
                result = self._result(i, ref, method, (*args, items[a:b]), {})
                self.last_wait_s += time.perf_counter() - start
                yield i, a, b, result
            return
        while pending:
            start = time.perf_counter()
            ready, _ = beamlet.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            self.last_wait_s += time.perf_counter() - start
            if not ready:
                raise GetTimeoutError(f"no env runner answered {method} within "
                                      f"{self.timeout_s} s")
            i, a, b = pending.pop(ready[0])
            result = self._result(i, ready[0], method, (*args, items[a:b]), {})
            if slices:
                hand_out(i)
            yield i, a, b, result

    def claimed(self, method: str, args: tuple, items: list, counter, *, fallback: str):
        """Every item of `items` run once, the workers taking them one at a
        time from `counter` (a :class:`~.claims.ClaimCounter`) whenever they
        are free, so that they end within one item of each other, with one
        call each: ``method(*args, items, ticket)`` on every worker at once
        returns ``(indices, result)``, the indices of the items it ran and its
        result for them, in that order. Yields ``(worker index, indices,
        result)`` as the calls end. Items that no call ran (its actor crashed
        mid-call, or it could not reach the counter: another host) are then
        run by ``fallback(*args, some_items)`` through `balanced`, and yielded
        the same way. With the local worker, one ``fallback`` call of all.
        ``last_wait_s`` is the time the driver spent waiting for results. A
        call whose actor crashed is run again (`call`, the same ticket: it
        claims what is left). Raises GetTimeoutError if a result does not
        arrive within ``timeout_s``."""
        self.last_wait_s = 0.0
        if self.local is not None:
            yield 0, np.arange(len(items)), getattr(self.local, fallback)(*args, items)
            return
        ticket = counter.ticket()
        call_args = (*args, items, ticket)
        refs = [self.submit(i, method, *call_args) for i in range(len(self.actors))]
        done = np.zeros(len(items), bool)
        for i, ref in enumerate(refs):
            start = time.perf_counter()
            indices, result = self._result(i, ref, method, call_args, {})
            self.last_wait_s += time.perf_counter() - start
            indices = np.asarray(indices, np.int64)
            done[indices] = True
            yield i, indices, result
        missing = np.flatnonzero(~done)
        if len(missing):
            waited = self.last_wait_s
            for w, a, b, result in self.balanced(fallback, args, [items[k] for k in missing]):
                yield w, missing[a:b], result
            self.last_wait_s += waited

    def stop(self) -> None:
        if self.local is not None and hasattr(self.local, "stop"):
            self.local.stop()
        for actor in self.actors:
            try:
                beamlet.kill(actor)
            except Exception:  # noqa: BLE001 - already gone, or the runtime is down
                pass
        self.actors = []

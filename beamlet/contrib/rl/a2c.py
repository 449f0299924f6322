"""Advantage Actor-Critic: synchronous (A2C: all env runners sample, one
gradient step on the whole batch) and asynchronous (A3C: every runner computes
gradients on its own samples; the driver applies each as it arrives and sends
the new weights back to that runner only, while the others keep working)."""
from __future__ import annotations

import numpy as np

import beamlet
from beamlet.exceptions import ActorError

from .actor_critic import (BATCH_KEYS, ActorCriticAlgorithm, ActorCriticConfig, EnvRunner,
                           actor_critic_grads, compute_gae, flatten_batches)

__all__ = ["A2C", "A2CConfig", "A3C", "A3CConfig", "A3CWorker"]


class A2CConfig(ActorCriticConfig):
    """A2C's settings: ``rollout_fragment_length`` (steps per env copy and
    update, default 5), ``lambda_`` (1.0: plain n-step returns),
    ``vf_loss_coeff``, ``entropy_coeff`` and the common ones."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class or A2C)
        self.lr = 7e-4
        self.rollout_fragment_length = 5
        self.lambda_ = 1.0
        self.entropy_coeff = 0.0
        self.grad_clip = 0.5
        self.normalize_advantages = False
        self.num_envs_per_env_runner = 8
        self.updates_per_iteration = 20


class A2C(ActorCriticAlgorithm):
    """One iteration is ``updates_per_iteration`` synchronous updates."""

    config_class = A2CConfig
    name = "A2C"

    def training_step(self) -> dict:
        cfg = self.config
        stats: dict[str, list] = {}
        for _ in range(int(cfg.updates_per_iteration)):
            batch = flatten_batches(self.sample_batches(), BATCH_KEYS)
            grads, s = actor_critic_grads(self.model, self.dist_cls, batch, clip_param=None,
                                          vf_coeff=cfg.vf_loss_coeff,
                                          entropy_coeff=cfg.entropy_coeff,
                                          normalize_advantages=cfg.normalize_advantages)
            s["grad_gnorm"] = self.model.apply_gradients(grads)
            for k, v in s.items():
                stats.setdefault(k, []).append(v)
        return {k: float(np.mean(v)) for k, v in stats.items()}


class A3CWorker(EnvRunner):
    """An env runner that also computes the A2C gradient of what it sampled."""

    def compute_gradients(self, weights, num_steps: int, hyper: dict) -> dict:
        batch = self.sample(weights, num_steps)
        next_values = self.model(batch["next_obs"].reshape(-1, batch["obs"].shape[-1]))["vf"]
        compute_gae(batch, next_values.reshape(batch["rewards"].shape), hyper["gamma"],
                    hyper["lambda_"])
        flat = flatten_batches([batch], BATCH_KEYS)
        grads, stats = actor_critic_grads(self.model, hyper["dist_cls"], flat, clip_param=None,
                                          vf_coeff=hyper["vf_loss_coeff"],
                                          entropy_coeff=hyper["entropy_coeff"],
                                          normalize_advantages=hyper["normalize_advantages"])
        return {"grads": grads, "stats": stats, "episodes": batch["episodes"],
                "steps": int(np.prod(batch["rewards"].shape))}


class A3CConfig(A2CConfig):
    """A3C: A2C's settings; each iteration applies ``updates_per_iteration``
    gradients, whichever runner they come from. Runners default to 2."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class or A3C)
        self.num_env_runners = 2


class A3C(A2C):
    config_class = A3CConfig
    name = "A3C"
    runner_class = A3CWorker

    def setup_algorithm(self) -> None:
        super().setup_algorithm()
        self._in_flight: dict = {}  # ref -> worker index

    def _hyper(self) -> dict:
        cfg = self.config
        return {"gamma": cfg.gamma, "lambda_": cfg.lambda_, "vf_loss_coeff": cfg.vf_loss_coeff,
                "entropy_coeff": cfg.entropy_coeff, "dist_cls": self.dist_cls,
                "normalize_advantages": cfg.normalize_advantages}

    def _submit(self, i: int) -> None:
        ref = self.workers.submit(i, "compute_gradients", self.model.get_weights(),
                                  self.config.get_rollout_fragment_length(), self._hyper())
        self._in_flight[ref] = i

    def _apply(self, result: dict, stats: dict) -> None:
        result["stats"]["grad_gnorm"] = self.model.apply_gradients(result["grads"])
        self.add_env_steps(result["steps"])
        self.record_episodes(result["episodes"])
        for k, v in result["stats"].items():
            stats.setdefault(k, []).append(v)

    def training_step(self) -> dict:
        cfg = self.config
        stats: dict[str, list] = {}
        if not self.workers.actors:  # no runner actors: A2C's loop on the local one
            for _ in range(int(cfg.updates_per_iteration)):
                self._apply(self.workers.local.compute_gradients(
                    self.model.get_weights(), cfg.get_rollout_fragment_length(),
                    self._hyper()), stats)
            return {k: float(np.mean(v)) for k, v in stats.items()}
        for i in range(len(self.workers)):
            if i not in self._in_flight.values():
                self._submit(i)
        for _ in range(int(cfg.updates_per_iteration)):
            ready, _ = beamlet.wait(list(self._in_flight), num_returns=1,
                                    timeout=cfg.sample_timeout_s)
            if not ready:
                raise TimeoutError(f"no A3C worker sent gradients within "
                                   f"{cfg.sample_timeout_s} s")
            i = self._in_flight.pop(ready[0])
            try:
                result = beamlet.get(ready[0], timeout=cfg.sample_timeout_s)
            except ActorError:
                self.workers.num_restarts += 1
                result = self.workers.call(i, "compute_gradients", self.model.get_weights(),
                                           cfg.get_rollout_fragment_length(), self._hyper())
            self._apply(result, stats)
            self._submit(i)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def get_state(self) -> dict:
        # Gradients in flight were computed for older weights: let them land first.
        if self._in_flight:
            beamlet.wait(list(self._in_flight), num_returns=len(self._in_flight),
                         timeout=self.config.sample_timeout_s)
            self._in_flight.clear()
        return super().get_state()

    def stop(self) -> None:
        self._in_flight.clear()
        super().stop()

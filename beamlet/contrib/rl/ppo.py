"""Proximal Policy Optimization (Schulman et al. 2017): clipped surrogate
objective, GAE, several epochs of minibatch Adam over each sampled batch."""
from __future__ import annotations

import numpy as np

from .actor_critic import (BATCH_KEYS, ActorCriticAlgorithm, ActorCriticConfig,
                           actor_critic_grads, flatten_batches)

__all__ = ["PPO", "PPOConfig"]


class PPOConfig(ActorCriticConfig):
    """PPO's settings: ``clip_param``, ``num_epochs``, ``minibatch_size``,
    ``lambda_``, ``vf_loss_coeff``, ``entropy_coeff``, ``lr_schedule`` (None or
    ``"linear"``: decays to 0 over ``lr_decay_env_steps``) and the common ones."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class or PPO)
        self.lr = 3e-4
        self.train_batch_size = 2048
        self.minibatch_size = 64
        self.num_epochs = 10
        self.clip_param = 0.2
        self.grad_clip = 0.5
        self.lr_schedule: str | None = None
        self.lr_decay_env_steps = 100_000

    def training(self, **kwargs):
        for old, new in (("sgd_minibatch_size", "minibatch_size"), ("num_sgd_iter", "num_epochs")):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
        return super().training(**kwargs)


class PPO(ActorCriticAlgorithm):
    config_class = PPOConfig
    name = "PPO"

    def training_step(self) -> dict:
        cfg = self.config
        if cfg.lr_schedule == "linear":
            frac = max(0.0, 1.0 - self.num_env_steps_sampled_lifetime / cfg.lr_decay_env_steps)
            self.model.set_lr(max(cfg.lr * frac, 1e-8))
        elif cfg.lr_schedule is not None:
            raise ValueError(f"lr_schedule must be None or 'linear', got {cfg.lr_schedule!r}")
        batch = flatten_batches(self.sample_batches(), BATCH_KEYS)
        n = len(batch["obs"])
        mb_size = max(1, min(int(cfg.minibatch_size), n))
        stats: dict[str, list] = {}
        for _ in range(int(cfg.num_epochs)):
            order = self.rng.permutation(n)
            for start in range(0, n, mb_size):
                idx = order[start:start + mb_size]
                mb = {k: v[idx] for k, v in batch.items()}
                grads, s = actor_critic_grads(
                    self.model, self.dist_cls, mb, clip_param=cfg.clip_param,
                    vf_coeff=cfg.vf_loss_coeff, entropy_coeff=cfg.entropy_coeff,
                    normalize_advantages=cfg.normalize_advantages)
                s["grad_gnorm"] = self.model.apply_gradients(grads)
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["cur_lr"] = float(getattr(getattr(self.model, "optimizer", None), "lr", cfg.lr))
        return out

"""What PPO, A2C and A3C share: the stochastic policy of the env runners,
generalised advantage estimation, and the actor-critic base algorithm."""
from __future__ import annotations

import numpy as np

import beamlet

from .algorithm import Algorithm, AlgorithmConfig
from .env_runner import EnvRunner, RunnerSpec, WorkerSet
from .models import distribution_class

__all__ = ["ActorCriticPolicy", "ActorCriticConfig", "ActorCriticAlgorithm", "compute_gae",
           "flatten_batches"]


class ActorCriticPolicy:
    """Samples from the ``"pi"`` head (or takes its mode) and records the
    action's log-probability and the ``"vf"`` estimate."""

    def __init__(self, dist_cls):
        self.dist_cls = dist_cls

    def __call__(self, model, obs, rng, explore, **_):
        out = model(obs)
        dist = self.dist_cls(out["pi"])
        actions = dist.sample(rng) if explore else dist.deterministic()
        return actions, {"logp": dist.logp(actions), "vf": out["vf"]}


def compute_gae(batch: dict, next_values: np.ndarray, gamma: float, lam: float) -> None:
    """Add ``advantages`` and ``value_targets`` ``(T, N)`` to a time-major batch.
    ``next_values`` are V(next_obs); a terminated step does not bootstrap, a
    truncated one does (from its true final observation), and no advantage
    flows across the end of an episode."""
    rewards, values = batch["rewards"], batch["vf"]
    term = batch["terminateds"].astype(np.float64)
    done = np.logical_or(batch["terminateds"], batch["truncateds"]).astype(np.float64)
    delta = rewards + gamma * next_values * (1.0 - term) - values
    adv = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[1])
    for t in reversed(range(rewards.shape[0])):
        last = delta[t] + gamma * lam * (1.0 - done[t]) * last
        adv[t] = last
    batch["advantages"] = adv
    batch["value_targets"] = adv + values


def flatten_batches(batches: list[dict], keys) -> dict:
    """Concatenate time-major batches into flat ``(T*N, ...)`` arrays."""
    out = {}
    for key in keys:
        parts = [b[key].reshape(-1, *b[key].shape[2:]) for b in batches]
        out[key] = np.concatenate(parts, axis=0)
    return out


def actor_critic_grads(model, dist_cls, mb: dict, *, clip_param: float | None,
                       vf_coeff: float, entropy_coeff: float, normalize_advantages: bool):
    """The gradient of the PPO clipped loss (``clip_param`` set) or of the
    vanilla policy-gradient loss (``clip_param=None``, A2C/A3C) on minibatch `mb`,
    and the loss statistics."""
    out, cache = model.forward(mb["obs"])
    dist = dist_cls(out["pi"])
    n = len(mb["obs"])
    adv = mb["advantages"]
    if normalize_advantages and n > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    logp = dist.logp(mb["actions"])
    stats = {}
    if clip_param is not None:
        ratio = np.exp(logp - mb["logp"])
        surr1 = ratio * adv
        surr2 = np.clip(ratio, 1.0 - clip_param, 1.0 + clip_param) * adv
        coef = -(adv * ratio * (surr1 <= surr2)) / n
        stats["policy_loss"] = float(-np.minimum(surr1, surr2).mean())
        stats["kl"] = float(np.mean(mb["logp"] - logp))
        stats["clip_fraction"] = float(np.mean(np.abs(ratio - 1.0) > clip_param))
    else:
        coef = -adv / n
        stats["policy_loss"] = float(-(logp * adv).mean())
    entropy = dist.entropy()
    d_pi = coef[:, None] * dist.d_logp(mb["actions"]) - (entropy_coeff / n) * dist.d_entropy()
    err = out["vf"] - mb["value_targets"]
    d_vf = vf_coeff * err / n
    stats["vf_loss"] = float(0.5 * np.mean(err * err))
    stats["entropy"] = float(entropy.mean())
    grads = model.backward(cache, {"pi": d_pi, "vf": d_vf})
    return grads, stats


class ActorCriticConfig(AlgorithmConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class)
        self.lambda_ = 0.95
        self.vf_loss_coeff = 0.5
        self.entropy_coeff = 0.0
        self.normalize_advantages = True

    def training(self, **kwargs):
        if "lambda" in kwargs:
            kwargs["lambda_"] = kwargs.pop("lambda")
        return super().training(**kwargs)


class ActorCriticAlgorithm(Algorithm):
    """Env runners sampling with an :class:`ActorCriticPolicy`; subclasses learn."""

    runner_class = EnvRunner

    def setup_algorithm(self) -> None:
        self.dist_cls = distribution_class(self.action_space)
        heads = {"pi": self.pi_width(), "vf": 1}
        self.model = self.make_model(heads)
        cfg = self.config
        model_factory = ModelFactory(self.observation_space, self.action_space, heads,
                                      dict(cfg.model), cfg.lr, cfg.grad_clip, cfg.seed)
        spec = RunnerSpec(self.env_creator, dict(cfg.env_config), cfg.num_envs_per_env_runner,
                          cfg.seed, model_factory, ActorCriticPolicy(self.dist_cls),
                          extra=self.runner_extra(), blas_threads=cfg.blas_threads)
        self.workers = WorkerSet(self.runner_class, lambda i: (spec, i), cfg.num_env_runners,
                                 max_restarts=cfg.max_num_env_runner_restarts,
                                 num_cpus=cfg.num_cpus_per_env_runner,
                                 timeout_s=cfg.sample_timeout_s)

    def runner_extra(self) -> dict:
        return {}

    def weights_arg(self):
        """The current weights, put once in the object store when runners are actors."""
        weights = self.model.get_weights()
        return beamlet.put(weights) if self.workers.actors else weights

    def sample_batches(self) -> list[dict]:
        frag = self.config.get_rollout_fragment_length()
        batches = self.workers.foreach("sample", self.weights_arg(), frag)
        self.record_batches(batches)
        for b in batches:
            next_values = self.model(b["next_obs"].reshape(-1, self.obs_dim))["vf"]
            compute_gae(b, next_values.reshape(b["rewards"].shape), self.config.gamma,
                        self.config.lambda_)
        return batches

    def compute_actions(self, obs, explore):
        dist = self.dist_cls(self.model(obs)["pi"])
        return dist.sample(self.rng) if explore else dist.deterministic()


class ModelFactory:
    """Builds the env runners' copy of the model (same architecture)."""

    def __init__(self, obs_space, act_space, heads, model_config, lr, grad_clip, seed):
        self.args = (obs_space, act_space, heads, model_config)
        self.kwargs = {"lr": lr, "grad_clip": grad_clip, "seed": seed}

    def __call__(self):
        from .models import build_model
        return build_model(*self.args, **self.kwargs)


BATCH_KEYS = ("obs", "actions", "logp", "advantages", "value_targets")

"""Small numpy networks with their own backward pass, and the model interface.

The algorithms never differentiate a loss themselves: they ask a model for its
outputs (``forward``), compute the gradient of their loss with respect to those
outputs (a few lines of closed-form algebra per loss), and hand it back
(``backward``), which returns the parameter gradients that ``apply_gradients``
feeds to the model's optimiser. Any model that implements :class:`Model` (for
instance a torch module whose ``backward`` calls ``torch.autograd.backward(outputs,
grad_outputs)``) therefore plugs into every algorithm unchanged, through
``config.training(model={"custom_model": factory})``.

Outputs are named: ``"pi"`` (the action distribution's inputs: logits for a
Discrete space, mean then log-std for a Box space), ``"vf"`` (state value, shape
``(N,)``) and ``"q"`` (one Q-value per discrete action).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["Model", "MLP", "Adam", "NumpyModel", "Categorical", "DiagGaussian",
           "distribution_class", "build_model", "flat_obs_dim"]


# -- the interface ---------------------------------------------------------------

class Model:
    """What an algorithm needs from a model.

    * ``forward(obs) -> (outputs: dict[str, ndarray], cache)``: ``obs`` is a float32
      batch ``(N, obs_dim)``; ``cache`` is whatever ``backward`` needs.
    * ``backward(cache, d_outputs: dict[str, ndarray]) -> grads``: the gradient of
      the loss with respect to the parameters, given its gradient with respect to
      (some of) the outputs of that ``forward``. ``grads`` is opaque to algorithms
      except through ``apply_gradients`` and ``global_norm``.
    * ``apply_gradients(grads)``: one optimiser step (gradient *descent*).
    * ``get_weights()``/``set_weights(w)``: picklable weights (sent to env runners).
    * ``get_state()``/``set_state(s)``: weights plus optimiser state (checkpoints).
    * ``get_flat()``/``set_flat(v)``: all weights as one float32 vector (ES).
    """

    def forward(self, obs: np.ndarray) -> tuple[dict, Any]:
        raise NotImplementedError

    def backward(self, cache: Any, d_outputs: dict) -> Any:
        raise NotImplementedError

    def apply_gradients(self, grads: Any) -> None:
        raise NotImplementedError

    def get_weights(self) -> Any:
        raise NotImplementedError

    def set_weights(self, weights: Any) -> None:
        raise NotImplementedError

    def get_state(self) -> Any:
        return self.get_weights()

    def set_state(self, state: Any) -> None:
        self.set_weights(state)

    def get_flat(self) -> np.ndarray:
        raise NotImplementedError

    def set_flat(self, flat: np.ndarray) -> None:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        """Change the optimiser's learning rate (schedules)."""

    @staticmethod
    def global_norm(grads) -> float:
        return float(math.sqrt(sum(float(np.sum(g * g)) for g in grads)))

    def __call__(self, obs: np.ndarray) -> dict:
        return self.forward(obs)[0]


# -- numpy building blocks -------------------------------------------------------------

_ACTIVATIONS = ("tanh", "relu", "linear")


class MLP:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` with `activation`
    between layers and a linear output. Parameters are the list ``params``
    ``[W0, b0, W1, b1, ...]`` (float64); ``W`` is ``(in, out)``. Weights are
    orthogonally initialised (gain sqrt(2) for hidden layers, `out_gain` for the
    last), biases zero, as in the usual PPO/A2C implementations."""

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", *,
                 rng: np.random.Generator, out_gain: float = 1.0):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {_ACTIVATIONS}")
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"an MLP needs at least two positive layer sizes, got {sizes}")
        self.sizes = sizes
        self.activation = activation
        self.params: list[np.ndarray] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2.0)
            self.params.append(_orthogonal((n_in, n_out), gain, rng))
            self.params.append(np.zeros(n_out))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list]:
        """Output ``(N, sizes[-1])`` and the cache for `backward`."""
        acts = [x]
        h = x
        last = len(self.params) // 2 - 1
        for i in range(0, len(self.params), 2):
            h = h @ self.params[i] + self.params[i + 1]
            if i // 2 != last:
                if self.activation == "tanh":
                    h = np.tanh(h)
                elif self.activation == "relu":
                    h = np.maximum(h, 0.0)
            acts.append(h)
        return h, acts

    def backward(self, acts: list, dout: np.ndarray) -> list[np.ndarray]:
        """Gradients ``[dW0, db0, ...]`` given ``d loss / d output``."""
        grads: list[np.ndarray] = [None] * len(self.params)  # type: ignore[list-item]
        d = dout
        n_layers = len(self.params) // 2
        for layer in reversed(range(n_layers)):
            if layer != n_layers - 1:
                h = acts[layer + 1]
                if self.activation == "tanh":
                    d = d * (1.0 - h * h)
                elif self.activation == "relu":
                    d = d * (h > 0)
            grads[2 * layer] = acts[layer].T @ d
            grads[2 * layer + 1] = d.sum(axis=0)
            if layer:
                d = d @ self.params[2 * layer].T
        return grads


def _orthogonal(shape, gain, rng) -> np.ndarray:
    a = rng.standard_normal(shape)
    q, r = np.linalg.qr(a if shape[0] >= shape[1] else a.T)
    q = q * np.sign(np.diag(r))
    if shape[0] < shape[1]:
        q = q.T
    return gain * q[:shape[0], :shape[1]]


class Adam:
    """Adam (Kingma & Ba) over a list of numpy arrays, updated in place.
    ``step(grads)`` descends; `grad_clip` (if set) rescales the gradients to
    that global norm first."""

    def __init__(self, params: list[np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, grad_clip: float | None = None):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.params = params
        self.lr = float(lr)
        self.b1, self.b2 = betas
        self.eps = eps
        self.grad_clip = grad_clip
        self.t = 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray]) -> float:
        """One update; returns the global norm of `grads` before clipping."""
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        norm = Model.global_norm(grads)
        scale = 1.0
        if self.grad_clip is not None and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-12)
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = g * scale
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * g * g
            p -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
        return norm

    def get_state(self) -> dict:
        return {"t": self.t, "m": [m.copy() for m in self.m], "v": [v.copy() for v in self.v],
                "lr": self.lr}

    def set_state(self, state: dict) -> None:
        self.t = state["t"]
        self.lr = state["lr"]
        for dst, src in zip(self.m, state["m"]):
            dst[...] = src
        for dst, src in zip(self.v, state["v"]):
            dst[...] = src


# -- action distributions ---------------------------------------------------------------

class Categorical:
    """Softmax over logits ``(N, n)``. ``d_logp``/``d_entropy`` are gradients with
    respect to the logits."""

    def __init__(self, logits: np.ndarray):
        z = logits - logits.max(axis=-1, keepdims=True)
        self.log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        self.p = np.exp(self.log_p)

    @staticmethod
    def input_dim(space) -> int:
        return int(space.n)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        u = rng.random((self.p.shape[0], 1))
        a = (np.cumsum(self.p, axis=-1) < u).sum(axis=-1)
        return np.minimum(a, self.p.shape[1] - 1)

    def deterministic(self) -> np.ndarray:
        return self.p.argmax(axis=-1)

    def logp(self, actions: np.ndarray) -> np.ndarray:
        return np.take_along_axis(self.log_p, actions.astype(np.int64)[:, None], -1)[:, 0]

    def d_logp(self, actions: np.ndarray) -> np.ndarray:
        g = -self.p.copy()
        g[np.arange(len(g)), actions.astype(np.int64)] += 1.0
        return g

    def entropy(self) -> np.ndarray:
        return -(self.p * self.log_p).sum(axis=-1)

    def d_entropy(self) -> np.ndarray:
        h = self.entropy()[:, None]
        return -self.p * (self.log_p + h)


class DiagGaussian:
    """A diagonal Gaussian; the inputs ``(N, 2d)`` are the mean then the log-std."""

    def __init__(self, inputs: np.ndarray):
        d = inputs.shape[-1] // 2
        self.mean = inputs[:, :d]
        self.log_std = inputs[:, d:]
        self.std = np.exp(self.log_std)

    @staticmethod
    def input_dim(space) -> int:
        return 2 * int(np.prod(space.shape))

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        return self.mean + self.std * rng.standard_normal(self.mean.shape)

    def deterministic(self) -> np.ndarray:
        return self.mean.copy()

    def logp(self, actions: np.ndarray) -> np.ndarray:
        z = (actions - self.mean) / self.std
        return (-0.5 * z * z - self.log_std - 0.5 * math.log(2 * math.pi)).sum(axis=-1)

    def d_logp(self, actions: np.ndarray) -> np.ndarray:
        z = (actions - self.mean) / self.std
        return np.concatenate([z / self.std, z * z - 1.0], axis=-1)

    def entropy(self) -> np.ndarray:
        return (self.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(axis=-1)

    def d_entropy(self) -> np.ndarray:
        return np.concatenate([np.zeros_like(self.mean), np.ones_like(self.log_std)], axis=-1)


def distribution_class(action_space):
    """Categorical for a Discrete space, DiagGaussian for a Box one."""
    from gymnasium import spaces
    if isinstance(action_space, spaces.Discrete):
        return Categorical
    if isinstance(action_space, spaces.Box):
        return DiagGaussian
    raise ValueError(f"beamlet.rl supports Discrete and Box action spaces, got {action_space}")


def flat_obs_dim(observation_space) -> int:
    from gymnasium import spaces
    if isinstance(observation_space, spaces.Discrete):
        return int(observation_space.n)
    if observation_space.shape is None:
        raise ValueError(f"unsupported observation space {observation_space}")
    return int(np.prod(observation_space.shape))


# -- the default numpy model ------------------------------------------------------------------

class NumpyModel(Model):
    """Separate MLPs per output head, one Adam over all of them.

    ``heads`` maps an output name to its width: ``{"pi": k, "vf": 1}`` for
    actor-critic, ``{"q": n}`` for DQN, ``{"pi": k}`` for ES. With
    `free_log_std`, the second half of ``"pi"`` (the log-std of a Gaussian) is a
    state-independent parameter vector rather than a network output."""

    def __init__(self, obs_dim: int, heads: dict, *, hiddens=(64, 64), activation="tanh",
                 lr: float = 3e-4, grad_clip: float | None = None, free_log_std: bool = False,
                 seed: int | None = None, pi_out_gain: float = 0.01):
        rng = np.random.default_rng(seed)
        self.obs_dim = int(obs_dim)
        self.heads = dict(heads)
        self.free_log_std = free_log_std
        self.nets: dict[str, MLP] = {}
        self.log_std = None
        for name, width in self.heads.items():
            out = width // 2 if (name == "pi" and free_log_std) else width
            gain = pi_out_gain if name == "pi" else 1.0
            self.nets[name] = MLP([self.obs_dim, *hiddens, out], activation, rng=rng,
                                  out_gain=gain)
        self.params: list[np.ndarray] = [p for net in self.nets.values() for p in net.params]
        if free_log_std:
            self.log_std = np.zeros(self.heads["pi"] // 2)
            self.params.append(self.log_std)
        self.optimizer = Adam(self.params, lr=lr, grad_clip=grad_clip)

    def forward(self, obs: np.ndarray) -> tuple[dict, Any]:
        obs = np.asarray(obs, dtype=np.float64).reshape(len(obs), self.obs_dim)
        outputs, caches = {}, {}
        for name, net in self.nets.items():
            out, caches[name] = net.forward(obs)
            if name == "vf":
                out = out[:, 0]
            elif name == "pi" and self.free_log_std:
                out = np.concatenate([out, np.broadcast_to(self.log_std, out.shape)], axis=1)
            outputs[name] = out
        return outputs, caches

    def backward(self, cache: Any, d_outputs: dict) -> list[np.ndarray]:
        grads: list[np.ndarray] = []
        d_log_std = None
        for name, net in self.nets.items():
            d = d_outputs.get(name)
            if d is None:
                grads.extend(np.zeros_like(p) for p in net.params)
                continue
            if name == "vf":
                d = d[:, None]
            elif name == "pi" and self.free_log_std:
                half = d.shape[1] // 2
                d_log_std = d[:, half:].sum(axis=0)
                d = d[:, :half]
            grads.extend(net.backward(cache[name], d))
        if self.free_log_std:
            grads.append(d_log_std if d_log_std is not None else np.zeros_like(self.log_std))
        return grads

    def apply_gradients(self, grads) -> float:
        return self.optimizer.step(grads)

    def set_lr(self, lr: float) -> None:
        self.optimizer.lr = float(lr)

    def get_weights(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]

    def set_weights(self, weights) -> None:
        if len(weights) != len(self.params):
            raise ValueError(f"got {len(weights)} weight arrays for {len(self.params)}")
        for dst, src in zip(self.params, weights):
            dst[...] = src

    def get_state(self) -> dict:
        return {"weights": self.get_weights(), "optimizer": self.optimizer.get_state()}

    def set_state(self, state: dict) -> None:
        self.set_weights(state["weights"])
        self.optimizer.set_state(state["optimizer"])

    def get_flat(self) -> np.ndarray:
        return np.concatenate([p.ravel() for p in self.params]).astype(np.float32)

    def set_flat(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat)
        if flat.size != sum(p.size for p in self.params):
            raise ValueError(f"a flat vector of {flat.size} values for "
                             f"{sum(p.size for p in self.params)} parameters")
        i = 0
        for p in self.params:
            p[...] = flat[i:i + p.size].reshape(p.shape)
            i += p.size

    def num_params(self) -> int:
        return sum(p.size for p in self.params)


def build_model(observation_space, action_space, heads: dict, model_config: dict, *,
                lr: float, grad_clip: float | None, seed: int | None) -> Model:
    """The model for an algorithm: ``model_config["custom_model"](observation_space,
    action_space, heads, model_config)`` when given (any :class:`Model`), else a
    :class:`NumpyModel` with ``fcnet_hiddens``/``fcnet_activation``."""
    custom = model_config.get("custom_model")
    if custom is not None:
        model = custom(observation_space, action_space, heads, model_config)
        if not isinstance(model, Model):
            raise TypeError(f"custom_model must return a beamlet.rl Model, got "
                            f"{type(model).__name__}")
        model.set_lr(lr)
        return model
    from gymnasium import spaces
    free_log_std = isinstance(action_space, spaces.Box) and "pi" in heads and \
        model_config.get("free_log_std", True)
    return NumpyModel(flat_obs_dim(observation_space), heads,
                      hiddens=tuple(model_config.get("fcnet_hiddens", (64, 64))),
                      activation=model_config.get("fcnet_activation", "tanh"),
                      lr=lr, grad_clip=grad_clip, free_log_std=free_log_std, seed=seed,
                      pi_out_gain=model_config.get("pi_out_gain", 0.01))

"""Search spaces: what a config value may be instead of a plain value.

``grid_search(values)`` marks a value to expand into one trial per item (all
grid values of a config are crossed). The other constructors make a
:class:`Domain` that is sampled once per trial:

    config = {
        "lr": tune.loguniform(1e-4, 1e-1),
        "layers": tune.choice([2, 3, 4]),
        "batch": tune.grid_search([32, 64]),
        "seed": tune.randint(0, 1000),          # 1000 excluded
        "wd": tune.sample_from(lambda spec: spec.config.lr / 10),
    }

A grid search is the dict ``{"grid_search": [...]}`` (as in Ray), so specs
written as plain JSON work too.
"""
from __future__ import annotations

import inspect
import math
import random
from typing import Any, Callable, Sequence

GRID_SEARCH = "grid_search"

__all__ = ["Domain", "Categorical", "Float", "Integer", "Normal", "Function", "grid_search",
           "choice", "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint",
           "lograndint", "randn", "sample_from", "is_grid_search"]


def grid_search(values: Sequence) -> dict:
    """One trial per value (crossed with every other grid search of the config)."""
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise TypeError(f"grid_search() takes a list of values, got {values!r:.80}")
    if len(values) == 0:
        raise ValueError("grid_search() needs at least one value")
    return {GRID_SEARCH: list(values)}


def is_grid_search(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) == 1 and GRID_SEARCH in value
            and isinstance(value[GRID_SEARCH], (list, tuple)))


class Domain:
    """A value to sample once per trial. ``sample(rng)`` takes a ``random.Random``."""

    def sample(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return value


def _quantize(value: float, q: float | None) -> float:
    if q is None:
        return value
    return round(value / q) * q


class Categorical(Domain):
    """One of `categories`, uniformly."""

    def __init__(self, categories: Sequence):
        if isinstance(categories, (str, bytes, dict)) or not isinstance(categories, Sequence):
            raise TypeError(f"choice() takes a list of values, got {categories!r:.80}")
        if len(categories) == 0:
            raise ValueError("choice() needs at least one value")
        self.categories = list(categories)

    def sample(self, rng: random.Random) -> Any:
        return self.categories[rng.randrange(len(self.categories))]


class Float(Domain):
    """A float in ``[lower, upper)``, uniform or log-uniform, optionally rounded to a multiple of q."""

    def __init__(self, lower: float, upper: float, log: bool = False, base: float = 10,
                 q: float | None = None):
        self.lower = _number("lower", lower)
        self.upper = _number("upper", upper)
        if not lower < upper:
            raise ValueError(f"lower ({lower}) must be less than upper ({upper})")
        if log and lower <= 0:
            raise ValueError(f"a log-uniform range must be positive, got lower={lower}")
        if q is not None and _number("q", q) <= 0:
            raise ValueError(f"q must be > 0, got {q}")
        self.log = log
        self.base = base
        self.q = q

    def sample(self, rng: random.Random) -> float:
        if self.log:
            lo, hi = math.log(self.lower, self.base), math.log(self.upper, self.base)
            value = self.base ** rng.uniform(lo, hi)
        else:
            value = rng.uniform(self.lower, self.upper)
        value = min(max(value, self.lower), self.upper)
        return float(_quantize(value, self.q))


class Integer(Domain):
    """An int in ``[lower, upper)`` (``upper`` excluded), uniform or log-uniform.

    ``qrandint`` includes `upper`, as in Ray."""

    def __init__(self, lower: int, upper: int, log: bool = False, base: float = 10,
                 q: int | None = None, include_upper: bool = False):
        for name, v in (("lower", lower), ("upper", upper)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
        hi = upper if include_upper else upper - 1
        if hi < lower:
            raise ValueError(f"empty integer range: lower={lower}, upper={upper}"
                             f"{' (included)' if include_upper else ' (excluded)'}")
        if log and lower <= 0:
            raise ValueError(f"a log-uniform range must be positive, got lower={lower}")
        if q is not None and (not isinstance(q, int) or q < 1):
            raise ValueError(f"q must be an int >= 1, got {q!r}")
        self.lower = lower
        self.upper = upper
        self.log = log
        self.base = base
        self.q = q
        self.include_upper = include_upper

    def sample(self, rng: random.Random) -> int:
        hi = self.upper if self.include_upper else self.upper - 1
        if self.log:
            lo_l, hi_l = math.log(self.lower, self.base), math.log(hi + 1, self.base)
            value = int(math.floor(self.base ** rng.uniform(lo_l, hi_l)))
        else:
            value = rng.randint(self.lower, hi)
        if self.q is not None:
            value = int(round(value / self.q) * self.q)
        return min(max(value, self.lower), hi)


class Normal(Domain):
    """A float from a normal distribution."""

    def __init__(self, mean: float = 0.0, sd: float = 1.0, q: float | None = None):
        self.mean = _number("mean", mean)
        self.sd = _number("sd", sd)
        if sd <= 0:
            raise ValueError(f"sd must be > 0, got {sd}")
        self.q = q

    def sample(self, rng: random.Random) -> float:
        return float(_quantize(rng.gauss(self.mean, self.sd), self.q))


class Function(Domain):
    """``sample_from(fn)``: ``fn(spec)`` computes the value; ``spec.config`` is the
    trial's config (other values already resolved). ``fn()`` with no
    parameters is called without `spec`."""

    def __init__(self, func: Callable):
        if not callable(func):
            raise TypeError(f"sample_from() takes a callable, got {func!r:.80}")
        self.func = func
        try:
            params = [p for p in inspect.signature(func).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        except (TypeError, ValueError):  # builtins without a signature
            params = [None]
        self._pass_spec = bool(params)

    def call(self, spec: Any) -> Any:
        return self.func(spec) if self._pass_spec else self.func()

    def sample(self, rng: random.Random) -> Any:  # pragma: no cover - resolved with a spec
        raise TypeError("sample_from() values are resolved by the variant generator")


def choice(categories: Sequence) -> Categorical:
    return Categorical(categories)


def uniform(lower: float, upper: float) -> Float:
    return Float(lower, upper)


def quniform(lower: float, upper: float, q: float) -> Float:
    return Float(lower, upper, q=q)


def loguniform(lower: float, upper: float, base: float = 10) -> Float:
    return Float(lower, upper, log=True, base=base)


def qloguniform(lower: float, upper: float, q: float, base: float = 10) -> Float:
    return Float(lower, upper, log=True, base=base, q=q)


def randint(lower: int, upper: int) -> Integer:
    """An int in ``[lower, upper)``: `upper` is excluded."""
    return Integer(lower, upper)


def qrandint(lower: int, upper: int, q: int = 1) -> Integer:
    """An int in ``[lower, upper]`` rounded to a multiple of `q` (`upper` included, as in Ray)."""
    return Integer(lower, upper, q=q, include_upper=True)


def lograndint(lower: int, upper: int, base: float = 10) -> Integer:
    """An int in ``[lower, upper)``, log-uniformly."""
    return Integer(lower, upper, log=True, base=base)


def randn(mean: float = 0.0, sd: float = 1.0) -> Normal:
    return Normal(mean, sd)


def sample_from(func: Callable) -> Function:
    return Function(func)

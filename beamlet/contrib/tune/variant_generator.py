"""Turning a config with search spaces into concrete trial configs.

``generate_variants(config, num_samples, seed)`` yields ``(config, params)``
pairs: for each of `num_samples` rounds, one variant per point of the grid
(the first grid value in the config varies fastest, as in Ray), with every
:class:`Domain` sampled afresh and ``sample_from`` functions resolved last
(they may read other values through ``spec.config``). ``params`` maps each
searched path (``"a/b"`` for nested keys) to its value; it names the trial.

With a `seed`, the same call yields the same configs. ``sample_from``
functions that use the global ``random`` / ``numpy.random`` generators are
made reproducible too: those generators are seeded for the call and then
restored, so the caller's random state is left as it was.
"""
from __future__ import annotations

import itertools
import random
from contextlib import contextmanager
from typing import Any, Iterator

from .search_space import GRID_SEARCH, Domain, Function, is_grid_search

__all__ = ["generate_variants", "count_variants", "format_params"]

Path = tuple


def _copy_structure(value: Any) -> Any:
    """Copy dicts and lists (the structure the generator fills in); share the leaves."""
    if isinstance(value, dict):
        return {k: _copy_structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_structure(v) for v in value]
    return value


def _walk(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every grid search, Domain or plain leaf, depth first in order.
    Raises ValueError for ``{"grid_search": <not a list>}``, a typo for a grid."""
    if is_grid_search(value) or isinstance(value, Domain):
        yield path, value
    elif isinstance(value, dict):
        if GRID_SEARCH in value:
            raise ValueError(f"config value {_path_name(path) or '<root>'!r} is {value!r:.80}: "
                             f"a grid search is {{'grid_search': [values...]}} (use "
                             f"tune.grid_search(list)) and has no other key")
        for k, v in value.items():
            yield from _walk(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, path + (i,))


def _set(config: Any, path: Path, value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def _path_name(path: Path) -> str:
    return "/".join(str(p) for p in path)


def count_variants(config: dict) -> int:
    """How many variants one sample of `config` has (the size of its grid).
    Grid values that hold further grid searches are counted as they expand."""
    total = 1
    for _, leaf in _walk(config):
        if is_grid_search(leaf):
            total *= sum(count_variants({"v": v}) for v in leaf[GRID_SEARCH])
    return total


def _expand_grid(config: dict, params: dict) -> Iterator[tuple[dict, dict]]:
    grids = [(path, leaf[GRID_SEARCH]) for path, leaf in _walk(config) if is_grid_search(leaf)]
    if not grids:
        yield config, params
        return
    # itertools.product varies the last axis fastest; reverse so the first grid does.
    axes = [values for _, values in reversed(grids)]
    for combo in itertools.product(*axes):
        variant = _copy_structure(config)
        new_params = dict(params)
        for (path, _), value in zip(reversed(grids), combo):
            _set(variant, path, _copy_structure(value))
            new_params[_path_name(path)] = value
        # A grid value may itself hold grid searches: expand those too.
        yield from _expand_grid(variant, new_params)


class _Unresolved(Exception):
    """A sample_from function read a value that is still unresolved."""


class AttrDict(dict):
    """A dict whose keys are also attributes (``spec.config.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return value

    def __getitem__(self, key):
        value = dict.__getitem__(self, key)
        if isinstance(value, Function):
            raise _Unresolved(key)
        return value


def _attr_view(value: Any) -> Any:
    if isinstance(value, dict):
        return AttrDict({k: _attr_view(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_attr_view(v) for v in value]
    return value


def _resolve(config: dict, params: dict, rng: random.Random) -> dict:
    functions = []
    for path, leaf in _walk(config):
        if isinstance(leaf, Function):
            functions.append(path)
        elif isinstance(leaf, Domain):
            value = leaf.sample(rng)
            _set(config, path, value)
            params[_path_name(path)] = value
    # sample_from functions last, in passes: one may depend on another.
    while functions:
        left = []
        for path in functions:
            domain = _get(config, path)
            spec = AttrDict(config=_attr_view(config))
            try:
                value = domain.call(spec)
            except _Unresolved:
                left.append(path)
                continue
            _set(config, path, value)
            params[_path_name(path)] = value
        if len(left) == len(functions):
            names = ", ".join(_path_name(p) for p in left)
            raise ValueError(f"sample_from() values depend on each other in a cycle: {names}")
        functions = left
    return config


def _get(config: Any, path: Path) -> Any:
    for key in path:
        config = config[key]
    return config


@contextmanager
def _seeded_globals(rng: random.Random | None):
    """Seed the global random generators from `rng` for a while, then restore them."""
    if rng is None:
        yield
        return
    import numpy as np
    py_state = random.getstate()
    np_state = np.random.get_state()
    random.seed(rng.getrandbits(64))
    np.random.seed(rng.getrandbits(32))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def generate_variants(config: dict | None, num_samples: int = 1,
                      seed: int | None = None) -> Iterator[tuple[dict, dict]]:
    """Yield ``(resolved_config, searched_params)`` for every trial of a config."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    return _generate(config, num_samples, seed)


def _generate(config: dict, num_samples: int, seed: int | None) -> Iterator[tuple[dict, dict]]:
    rng = random.Random(seed)
    seeded = rng if seed is not None else None
    order = [_path_name(path) for path, _ in _walk(config)]
    for _ in range(num_samples):
        for variant, params in _expand_grid(_copy_structure(config), {}):
            with _seeded_globals(seeded):
                resolved = _resolve(variant, params, rng)
            yield resolved, _ordered(params, order)


def _ordered(params: dict, order: list[str]) -> dict:
    """`params` in the order its paths appear in the config."""
    out = {name: params[name] for name in order if name in params}
    out.update((k, v) for k, v in params.items() if k not in out)
    return out


def _clean_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5}"
    return str(value)


def format_params(params: dict) -> str:
    """``alpha=0.2,beta=1``: the searched values, for trial tags and tables."""
    parts = []
    for name, value in params.items():
        if isinstance(value, (dict, list)):
            value = "..."
        parts.append(f"{name.split('/')[-1]}={_clean_value(value)}")
    return ",".join(parts)


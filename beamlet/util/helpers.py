"""Ray's ``ray.util.as_completed`` and ``ray.util.map_unordered``: results as they
become ready, on top of `wait`."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from ..core import api

DEFAULT_CHUNK_SIZE = 10
DEFAULT_BACKPRESSURE_SIZE = 100


def _check(chunk_size: int, wait_options: dict) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if "num_returns" in wait_options:
        raise ValueError("pass chunk_size=, not num_returns=")


def _next_batch(refs: list, chunk_size: int, yield_obj_refs: bool, wait_options: dict):
    """Wait for up to `chunk_size` of `refs`; return (their values or refs, the rest)."""
    ready, rest = api.wait(refs, num_returns=min(chunk_size, len(refs)), **wait_options)
    return (ready if yield_obj_refs else api.get(ready)), rest


def as_completed(refs: Sequence, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 yield_obj_refs: bool = False, **wait_options) -> Iterator[Any]:
    """Yield the values of `refs` (or the refs, with ``yield_obj_refs=True``) batch by
    batch as they become ready, `chunk_size` at a time; no order is promised.
    Extra keywords (``timeout``, ``fetch_local``) go to each `wait`; as in Ray, a
    wait that times out with nothing ready is simply tried again."""
    _check(chunk_size, wait_options)
    refs = list(refs)
    while refs:
        values, refs = _next_batch(refs, chunk_size, yield_obj_refs, wait_options)
        yield from values


def map_unordered(fn, items: Iterable, *, backpressure_size: int | None = DEFAULT_BACKPRESSURE_SIZE,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, yield_obj_refs: bool = False,
                  **wait_options) -> Iterator[Any]:
    """Run ``fn.remote(item)`` for each item, keeping at most `backpressure_size`
    tasks in flight (None: no limit), and yield results as they finish, in no
    promised order."""
    _check(chunk_size, wait_options)
    limit = float("inf") if backpressure_size is None else backpressure_size
    if limit <= 0:
        raise ValueError(f"backpressure_size must be > 0 or None, got {backpressure_size!r}")
    refs: list = []
    for item in items:
        refs.append(fn.remote(item))
        if len(refs) >= limit:
            values, refs = _next_batch(refs, chunk_size, yield_obj_refs, wait_options)
            yield from values
    yield from as_completed(refs, chunk_size=chunk_size, yield_obj_refs=yield_obj_refs,
                            **wait_options)

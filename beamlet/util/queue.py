"""A FIFO queue that tasks and actors share (Ray's ``ray.util.queue.Queue``).

The items live in an async actor, so a `get` waiting on an empty queue does
not stop a `put` from getting in. The Queue object pickles (it holds the
actor's handle): pass it to tasks and actors like any argument.
"""
from __future__ import annotations

import asyncio
import queue as _queue
from typing import Any

from ..core import api


class Empty(_queue.Empty):
    """`get` found nothing (``block=False``) or waited past its timeout."""


class Full(_queue.Full):
    """`put` found no room (``block=False``) or waited past its timeout."""


class _QueueActor:
    """Holds the items. Every method is ``async def``: they all run on the
    actor's event loop, the only thread that touches the asyncio.Queue."""

    def __init__(self, maxsize: int):
        self.queue = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.queue.qsize()

    async def empty(self) -> bool:
        return self.queue.empty()

    async def full(self) -> bool:
        return self.queue.full()

    async def put(self, item, timeout=None) -> None:
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            raise Full(f"the queue stayed full for {timeout}s") from None

    async def get(self, timeout=None):
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Empty(f"the queue stayed empty for {timeout}s") from None

    async def put_nowait(self, item) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Full("the queue is full") from None

    async def put_nowait_batch(self, items) -> None:
        if self.queue.maxsize > 0 and len(items) + self.queue.qsize() > self.queue.maxsize:
            raise Full(f"cannot add {len(items)} items to a queue holding "
                       f"{self.queue.qsize()} of at most {self.queue.maxsize}")
        for item in items:
            self.queue.put_nowait(item)

    async def get_nowait(self):
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            raise Empty("the queue is empty") from None

    async def get_nowait_batch(self, num_items: int) -> list:
        if num_items > self.queue.qsize():
            raise Empty(f"cannot take {num_items} items from a queue holding "
                        f"{self.queue.qsize()}")
        return [self.queue.get_nowait() for _ in range(num_items)]


def _unwrap(call):
    """Run `call()`, raising Empty/Full as themselves (not wrapped in a task error)."""
    try:
        return call()
    except (Empty, Full) as err:
        cause = getattr(err, "cause", None)
        raise (cause if isinstance(cause, (Empty, Full)) else err) from None


class Queue:
    """A first-in first-out queue of at most `maxsize` items (0: no limit).

    ``put``/``get`` block by default (``timeout`` seconds at most, then Full /
    Empty); ``block=False`` or the ``*_nowait`` forms never wait.
    `actor_options` go to the actor that holds the items (e.g. ``name``)."""

    def __init__(self, maxsize: int = 0, actor_options: dict | None = None):
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an integer >= 0, got {maxsize!r}")
        self.maxsize = maxsize
        actor_class = api.remote(_QueueActor)
        self.actor = actor_class.options(**(actor_options or {})).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        return api.get(self.actor.qsize.remote())

    qsize = size

    def empty(self) -> bool:
        return api.get(self.actor.empty.remote())

    def full(self) -> bool:
        return api.get(self.actor.full.remote())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if not block:
            return _unwrap(lambda: api.get(self.actor.put_nowait.remote(item)))
        _check_timeout(timeout)
        _unwrap(lambda: api.get(self.actor.put.remote(item, timeout)))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return _unwrap(lambda: api.get(self.actor.get_nowait.remote()))
        _check_timeout(timeout)
        return _unwrap(lambda: api.get(self.actor.get.remote(timeout)))

    async def put_async(self, item: Any, block: bool = True, timeout: float | None = None):
        if not block:
            return await self.actor.put_nowait.remote(item)
        _check_timeout(timeout)
        return await self.actor.put.remote(item, timeout)

    async def get_async(self, block: bool = True, timeout: float | None = None):
        if not block:
            return await self.actor.get_nowait.remote()
        _check_timeout(timeout)
        return await self.actor.get.remote(timeout)

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def put_nowait_batch(self, items) -> None:
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"put_nowait_batch takes a list of items, got {type(items).__name__}")
        _unwrap(lambda: api.get(self.actor.put_nowait_batch.remote(list(items))))

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list:
        if not isinstance(num_items, int) or num_items < 0:
            raise ValueError(f"num_items must be an integer >= 0, got {num_items!r}")
        return _unwrap(lambda: api.get(self.actor.get_nowait_batch.remote(num_items)))

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the actor holding the items (they are lost)."""
        if self.actor is not None:
            api.kill(self.actor)
        self.actor = None


def _check_timeout(timeout) -> None:
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")


__all__ = ["Queue", "Empty", "Full"]

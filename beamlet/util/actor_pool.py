"""ActorPool: spread work over a fixed set of actors (Ray's ``ray.util.ActorPool``)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from ..core import api


class ActorPool:
    """Runs ``fn(actor, value) -> ObjectRef`` on whichever actor is idle.

    `map` yields results in submission order, `map_unordered` as they finish.
    """

    def __init__(self, actors: list):
        if not actors:
            raise ValueError("ActorPool needs at least one actor")
        self._idle = list(actors)
        self._future_to_actor: dict = {}
        self._index_to_future: dict[int, Any] = {}
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending: list[tuple[Callable, Any]] = []

    def submit(self, fn: Callable, value: Any) -> None:
        """Schedule ``fn(actor, value)`` on an idle actor, or queue it until one is free."""
        if self._idle:
            actor = self._idle.pop()
            future = fn(actor, value)
            self._future_to_actor[future] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = future
            self._next_task_index += 1
        else:
            self._pending.append((fn, value))

    def has_next(self) -> bool:
        return bool(self._future_to_actor) or bool(self._pending)

    def has_free(self) -> bool:
        return bool(self._idle) and not self._pending

    def _return_actor(self, actor) -> None:
        self._idle.append(actor)
        if self._pending:
            self.submit(*self._pending.pop(0))

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False):
        """The next result in submission order."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("it is not allowed to call get_next() after get_next_unordered()")
        future = self._index_to_future[self._next_return_index]
        if timeout is not None:
            ready, _ = api.wait([future], timeout=timeout)
            if not ready:
                if ignore_if_timedout:
                    return None
                raise TimeoutError("timed out waiting for the next result")
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(future)
        self._return_actor(actor)
        return api.get(future)

    def get_next_unordered(self, timeout: float | None = None, ignore_if_timedout: bool = False):
        """Whichever result is ready first."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        ready, _ = api.wait(list(self._future_to_actor), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                return None
            raise TimeoutError("timed out waiting for a result")
        future = ready[0]
        index, actor = self._future_to_actor.pop(future)
        self._index_to_future.pop(index, None)
        # get_next() resumes after the newest result taken here (as in Ray), not
        # at an index whose future is already gone.
        self._next_return_index = max(self._next_return_index, index + 1)
        self._return_actor(actor)
        return api.get(future)

    def map(self, fn: Callable, values: Iterable):
        """Results of ``fn(actor, v)`` for each value, in order."""
        while self.has_next():  # drain what an earlier call left
            self.get_next_unordered()
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn: Callable, values: Iterable):
        """Results of ``fn(actor, v)`` for each value, as they finish."""
        while self.has_next():
            self.get_next_unordered()
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next_unordered()

    def push(self, actor) -> None:
        """Add an idle actor to the pool."""
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle or actor in busy:
            raise ValueError("the actor is already in the pool")
        self._return_actor(actor)

    def pop_idle(self):
        """Remove and return an idle actor, or None."""
        return self._idle.pop() if self.has_free() else None

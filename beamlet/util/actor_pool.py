"""ActorPool: spread work over a fixed set of actors (Ray's ``ray.util.ActorPool``)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from .. import exceptions as exc
from ..core import api


def _key(future):
    """What a submission is filed under: its ref, or the tuple of its refs (a
    method with ``num_returns > 1`` gives a list, which cannot be a dict key)."""
    return tuple(future) if isinstance(future, list) else future


def _first_ref(future):
    return future[0] if isinstance(future, (list, tuple)) else future


class ActorPool:
    """Runs ``fn(actor, value) -> ObjectRef`` (or a list of refs) on whichever
    actor is idle; an actor stays busy until its result has been taken.

    `map` and `map_unordered` submit every value at once (as far as there are
    idle actors; the rest start as results are taken) and return an iterator:
    in submission order, or as results finish. An actor whose call raised
    ActorDiedError is dropped from the pool, not handed more work.
    """

    def __init__(self, actors: list):
        if not actors:
            raise ValueError("ActorPool needs at least one actor")
        self._idle = list(actors)
        self._future_to_actor: dict = {}  # key -> (index, actor)
        self._index_to_future: dict[int, Any] = {}
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending: list[tuple[Callable, Any]] = []

    def submit(self, fn: Callable, value: Any) -> None:
        """Schedule ``fn(actor, value)`` on an idle actor, or queue it until one is free."""
        if self._idle:
            actor = self._idle.pop()
            future = fn(actor, value)
            self._future_to_actor[_key(future)] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = future
            self._next_task_index += 1
        else:
            self._pending.append((fn, value))

    def has_next(self) -> bool:
        """Whether a submitted result has not been taken yet."""
        return bool(self._future_to_actor) or (bool(self._pending) and bool(self._idle))

    def has_free(self) -> bool:
        return bool(self._idle) and not self._pending

    def _return_actor(self, actor, alive: bool = True) -> None:
        if alive:
            self._idle.append(actor)
        while self._pending and self._idle:
            self.submit(*self._pending.pop(0))

    def _result(self, future, actor):
        """The value(s) of `future`; its actor goes back to the pool unless it died."""
        alive = True
        try:
            return api.get(future)
        except exc.ActorDiedError:
            alive = False
            raise
        finally:
            self._return_actor(actor, alive)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False):
        """The next result in submission order; TimeoutError after `timeout`
        (with `ignore_if_timedout`, that result is skipped for good)."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("it is not allowed to call get_next() after get_next_unordered()")
        future = self._index_to_future[self._next_return_index]
        timed_out = False
        if timeout is not None:
            ready, _ = api.wait([_first_ref(future)], timeout=timeout)
            if not ready:
                if not ignore_if_timedout:
                    raise TimeoutError("timed out waiting for the next result")
                timed_out = True
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(_key(future))
        if timed_out:
            self._return_actor(actor)
            raise TimeoutError(f"timed out waiting for the next result; {future} is ignored")
        return self._result(future, actor)

    def get_next_unordered(self, timeout: float | None = None, ignore_if_timedout: bool = False):
        """Whichever result is ready first; TimeoutError after `timeout`."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        by_ref = {_first_ref(key): key for key in self._future_to_actor}
        ready, _ = api.wait(list(by_ref), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError("timed out waiting for a result")
        key = by_ref[ready[0]]
        index, actor = self._future_to_actor.pop(key)
        future = self._index_to_future.pop(index)
        # get_next() resumes after the newest result taken here (as in Ray), not
        # at an index whose future is already gone.
        self._next_return_index = max(self._next_return_index, index + 1)
        return self._result(future, actor)

    def _drain(self) -> None:
        """Drop the results an earlier map or submit left untaken, without
        waiting for them (their calls still run; their actors take new work
        after them, as in Ray)."""
        while self._future_to_actor:
            key = next(iter(self._future_to_actor))
            index, actor = self._future_to_actor.pop(key)
            self._index_to_future.pop(index, None)
            self._next_return_index = max(self._next_return_index, index + 1)
            self._return_actor(actor)

    def map(self, fn: Callable, values: Iterable):
        """Results of ``fn(actor, v)`` for each value, in order. Submits at once;
        returns an iterator."""
        self._drain()
        for v in values:
            self.submit(fn, v)
        return self._results(self.get_next)

    def map_unordered(self, fn: Callable, values: Iterable):
        """Results of ``fn(actor, v)`` for each value, as they finish. Submits at
        once; returns an iterator."""
        self._drain()
        for v in values:
            self.submit(fn, v)
        return self._results(self.get_next_unordered)

    def _results(self, take: Callable):
        while self.has_next():
            yield take()

    def push(self, actor) -> None:
        """Add an idle actor to the pool."""
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle or actor in busy:
            raise ValueError("the actor is already in the pool")
        self._return_actor(actor)

    def pop_idle(self):
        """Remove and return an idle actor, or None."""
        return self._idle.pop() if self.has_free() else None

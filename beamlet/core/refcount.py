"""Counting references to objects, so that an object is freed once nothing
can reach it any more.

One ReferenceCounter per process. A count is the number of live ObjectRef
instances for an id in this process, plus the pins taken on its behalf: a
queued task's arguments, the refs contained in a stored value, the borrows
that worker processes report to their owner. When a count goes 0 -> 1 the
`on_referenced` callback runs, when it goes back to 0 `on_released` runs, both
outside the lock (they may re-enter the counter).
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable


class ReferenceCounter:
    """Thread-safe counts per object id, with callbacks on the edges."""

    def __init__(self, on_released: Callable[[bytes], None],
                 on_referenced: Callable[[bytes], None] | None = None):
        self._counts: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._on_released = on_released
        self._on_referenced = on_referenced
        self.closed = False
        #: Decrements handed over for later (`settle` does them); only a backend
        #: that settles them soon (the local driver's node) puts ids here.
        self.later: collections.deque[bytes] = collections.deque()
        #: How ``ObjectRef.__del__`` lets go of its reference: `decr`, unless
        #: the backend replaces it with a function that may instead append the
        #: id to `later` (taking the decrement off the caller's path).
        self.drop: Callable[[bytes], None] = self.decr

    def settle(self) -> None:
        """Do the decrements handed over for later (see `later`)."""
        later = self.later
        while later:
            try:
                object_id = later.popleft()
            except IndexError:
                return
            self.decr(object_id)

    def skip_referenced(self) -> None:
        """Run no callback when a count goes 0 -> 1 (its receiver does nothing)."""
        self._on_referenced = None

    def counts(self) -> dict[bytes, int]:
        """A copy of the live counts: object id -> references this process holds."""
        if self.later:
            self.settle()
        with self._lock:
            return dict(self._counts)

    def incr(self, object_id: bytes) -> None:
        with self._lock:
            count = self._counts.get(object_id, 0)
            self._counts[object_id] = count + 1
        if count == 0 and self._on_referenced is not None:
            self._on_referenced(object_id)

    def decr(self, object_id: bytes) -> None:
        with self._lock:
            count = self._counts.get(object_id, 0) - 1
            if count > 0:
                self._counts[object_id] = count
                return
            self._counts.pop(object_id, None)
        if count == 0 and not self.closed:
            self._on_released(object_id)

    def incr_all(self, object_ids: Iterable[bytes]) -> None:
        for object_id in object_ids:
            self.incr(object_id)

    def decr_all(self, object_ids: Iterable[bytes]) -> None:
        for object_id in object_ids:
            self.decr(object_id)

    def count(self, object_id: bytes) -> int:
        if self.later:
            self.settle()
        return self._counts.get(object_id, 0)

    def __len__(self) -> int:
        if self.later:
            self.settle()
        return len(self._counts)

    def close(self) -> None:
        """Stop firing callbacks (the backend is going away)."""
        self.closed = True
        self._on_referenced = None

"""MemoryObjectStore: an ObjectStore in one process's memory.

The in-process backend stores everything here; the local backend's driver
keeps its inline (small) objects here too. Values are kept as
SerializedObjects, so what is read back was really serialized, as on any
other backend.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence

from .. import exceptions as exc
from .interfaces import ObjectStore
from .refcount import ReferenceCounter
from .runtime import deadline, remaining
from .serialization import SerializedObject


class MemoryObjectStore(ObjectStore):
    """Dict of id -> SerializedObject with a condition variable for blocking reads.

    ``refs`` (optional) is the process's ReferenceCounter: the refs inside a
    stored value are pinned in it until the value is deleted.
    """

    def __init__(self, refs: ReferenceCounter | None = None):
        self._objects: dict[bytes, SerializedObject] = {}
        self._callbacks: dict[bytes, list[Callable]] = {}
        self._deleted: set[bytes] = set()  # deleted before their value arrived
        # Re-entrant: an ObjectRef collected by the cyclic GC while this thread
        # holds the lock frees its object through delete(), which takes it again.
        self._cond = threading.Condition(threading.RLock())
        self._refs = refs
        self.closed = False
        self.failure: BaseException | None = None  # see fail()

    def put(self, object_id: bytes, value: SerializedObject) -> None:
        self.put_entry(object_id, value.detached())

    def put_entry(self, object_id: bytes, value) -> None:
        """Store an entry: a SerializedObject here; subclasses may store other
        kinds with ``refs`` and ``is_error`` attributes."""
        with self._cond:
            if object_id in self._objects:
                return
            discard = object_id in self._deleted
            if discard:
                self._deleted.discard(object_id)
            else:
                self._objects[object_id] = value
                self._stored(object_id, value)
            callbacks = self._callbacks.pop(object_id, ())
            self._cond.notify_all()
        if discard:
            self._discarded(object_id, value)
        elif value.refs and self._refs is not None:
            self._refs.incr_all(value.refs)
        for callback in callbacks:
            callback(object_id)

    def get(self, object_ids: Sequence[bytes], timeout: float | None = None) -> list[SerializedObject]:
        objects = self._objects
        try:
            return [self._materialize(i, objects[i]) for i in object_ids]
        except KeyError:
            pass
        until = deadline(timeout)
        with self._cond:
            while True:
                missing = [i for i in object_ids if i not in objects]
                if not missing:
                    found = [objects[i] for i in object_ids]
                    break
                lost = [i for i in missing if i in self._deleted]
                if lost:
                    raise exc.ObjectLostError(f"object {lost[0].hex()} was freed")
                if self.closed:
                    raise exc.BackendError(str(self.failure) if self.failure is not None
                                           else "the object store was shut down")
                left = remaining(until)
                if left == 0:
                    raise exc.GetTimeoutError(
                        f"get() timed out after {timeout}s waiting for {len(missing)} of "
                        f"{len(object_ids)} objects")
                self._cond.wait(left if left is not None else 1.0)
        return [self._materialize(i, entry) for i, entry in zip(object_ids, found)]

    def _materialize(self, object_id: bytes, entry) -> SerializedObject:
        """The SerializedObject for a stored entry (subclasses store other kinds)."""
        return entry

    def _stored(self, object_id: bytes, entry) -> None:
        """An entry was stored, under the lock (subclasses account for it)."""

    def _freed(self, object_id: bytes, entry) -> None:
        """An entry was deleted (subclasses release what backs it)."""

    def _discarded(self, object_id: bytes, entry) -> None:
        """An entry arrived after its id was deleted and was never stored
        (subclasses release what backs it; nothing was accounted for it)."""

    def wait(self, object_ids: Sequence[bytes], num_returns: int,
             timeout: float | None = None) -> set[bytes]:
        until = deadline(timeout)
        with self._cond:
            while True:
                ready = {i for i in object_ids if i in self._objects}
                if len(ready) >= num_returns:
                    return ready
                if self.failure is not None:
                    raise exc.BackendError(str(self.failure))
                if self.closed:
                    return ready
                left = remaining(until)
                if left == 0:
                    return ready
                self._cond.wait(left if left is not None else 1.0)

    def contains(self, object_id: bytes) -> bool:
        return object_id in self._objects

    def entry(self, object_id: bytes):
        """The stored entry as it is (None if absent), without materializing it."""
        return self._objects.get(object_id)

    def delete(self, object_ids: Iterable[bytes]) -> None:
        freed = []
        with self._cond:
            for object_id in object_ids:
                value = self._objects.pop(object_id, None)
                if value is None:  # not arrived yet: drop it when it does
                    self._deleted.add(object_id)
                else:
                    freed.append((object_id, value))
        for object_id, value in freed:
            self._freed(object_id, value)
            if value.refs and self._refs is not None:
                self._refs.decr_all(value.refs)

    def on_ready(self, object_id: bytes, callback: Callable[[bytes], object]) -> None:
        with self._cond:
            if object_id not in self._objects and not self.closed:
                self._callbacks.setdefault(object_id, []).append(callback)
                return
        callback(object_id)  # (closed: its get raises at once)

    def stats(self) -> dict:
        with self._cond:
            return {"num_objects": len(self._objects),
                    "bytes_used": sum(getattr(v, "total_bytes", 0) for v in self._objects.values())}

    def fail(self, error: BaseException) -> None:
        """No value can arrive any more (whatever delivered them died): every
        blocked and later read of a missing object raises BackendError with
        `error`'s text, and every pending on_ready callback runs now (its get
        raises it too). Objects already present stay readable."""
        with self._cond:
            self.failure = error
            self.closed = True
            self._cond.notify_all()
            callbacks, self._callbacks = self._callbacks, {}
        self._run_callbacks(callbacks)

    def close(self) -> None:
        """Wake every blocked reader (they raise BackendError) and run every
        pending on_ready callback (their get raises it too), so no future waits
        for ever."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            self._objects.clear()
            callbacks, self._callbacks = self._callbacks, {}
        self._run_callbacks(callbacks)

    @staticmethod
    def _run_callbacks(callbacks: dict) -> None:
        for object_id, pending in callbacks.items():
            for callback in pending:
                try:
                    callback(object_id)
                except Exception:  # noqa: BLE001 - shutting down: nothing to tell
                    pass

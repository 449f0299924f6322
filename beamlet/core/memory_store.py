"""MemoryObjectStore: an ObjectStore in one process's memory.

The in-process backend stores everything here; the local backend's driver
keeps its inline (small) objects here too. Values are kept as
SerializedObjects, so what is read back was really serialized, as on any
other backend.
"""
from __future__ import annotations

import _thread
import itertools
import threading
from typing import Callable, Iterable, Sequence

from .. import exceptions as exc
from .interfaces import ObjectStore
from .refcount import ReferenceCounter
from .serialization import SerializedObject


# Waiters on at most this many ids are indexed per id; larger ones (a get or
# wait on a long list) keep a set of their ids that each arriving object is
# checked against, so that registering costs one C-level set build, not a
# Python loop over the list (a `wait(num_returns=100)` loop over 100,000
# refs registers a thousand times).
_INDEXED_MAX = 32


class _Signal:
    """A one-shot wake-up for one waiting thread: a bare lock, cheaper to make
    than a threading.Event (a get makes one per call). `set` runs at most once
    (a Waiter's callback runs once)."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else timeout)


class Waiter:
    """A pending `notify_when` registration: `callback()` runs once `needed`
    more of its ids arrived (or were deleted before arriving), or at close."""

    __slots__ = ("needed", "callback", "ids", "broad", "done", "fail_fast")

    def __init__(self, needed: int, callback: Callable[[], object], ids: set, broad: bool,
                 fail_fast: bool = False):
        self.needed = needed
        self.callback = callback
        self.ids = ids  # the ids not arrived yet when it was registered
        self.broad = broad
        self.done = False
        self.fail_fast = fail_fast  # due at the first of its ids stored as an error


class MemoryObjectStore(ObjectStore):
    """Dict of id -> SerializedObject, with waiters woken per arriving object.

    ``refs`` (optional) is the process's ReferenceCounter: the refs inside a
    stored value are pinned in it until the value is deleted.

    Cost: storing an object wakes only the waiters registered for its id (and
    checks the few waiters on long id lists), so `get` of N refs or a `wait`
    loop over them is linear in N, never a rescan per arrival.
    """

    def __init__(self, refs: ReferenceCounter | None = None):
        self._objects: dict[bytes, SerializedObject] = {}
        self._indexed: dict[bytes, list[Waiter]] = {}  # id -> waiters on few ids
        self._broad: list[Waiter] = []  # waiters on many ids (ids is a set)
        self._deleted: set[bytes] = set()  # deleted before their value arrived
        # Re-entrant: an ObjectRef collected by the cyclic GC while this thread
        # holds the lock frees its object through delete(), which takes it again.
        # (A bare RLock, not a Condition: nothing waits on it, and its `with` runs in C.)
        self._guard = threading.RLock()
        self._refs = refs
        #: ``peek(object_id)``: the stored entry as it is, or None: what `entry`
        #: returns (unless a subclass changes `entry`), in one C-level step.
        self.peek = self._objects.get
        self.closed = False
        self.failure: BaseException | None = None  # see fail()

    # -- waiters ----------------------------------------------------------------
    def notify_when(self, object_ids: Iterable[bytes], count: int,
                    callback: Callable[[], object], broad: bool | None = None,
                    fail_fast: bool = False) -> Waiter | None:
        """Call ``callback()`` once `count` of the distinct `object_ids` are present
        (an id deleted before its value arrived counts as present: the caller finds
        it missing and reports it lost), or when the store closes. Runs it at once,
        in this thread, if that is already so, and returns None; otherwise returns
        the Waiter (`cancel_waiter` withdraws it) and the callback runs later in
        the thread that stores the object. The callback must be quick.

        `broad` chooses how it is registered: per id (False: a Python step per id,
        nothing added to other objects' arrival) or as one set that every arriving
        object is checked against (True: a C-level set build, but each store pays a
        lookup while it waits). None picks broad for more than a few ids, which
        suits blocked `get`/`wait` calls (few at a time, long lists); a scheduler
        registering one waiter per queued task passes False.

        `fail_fast`: also due as soon as one of the ids is (or is already) stored
        as an error, however many are missing (a `get` of a list raises the first
        error without waiting for the rest, as Ray's does)."""
        with self._guard:
            objects = self._objects
            if self.closed:
                pending = None
            elif type(object_ids) in (list, tuple) and len(object_ids) == 1:
                object_id = object_ids[0]  # (the common case, without building sets)
                if object_id in objects or object_id in self._deleted:
                    pending, count = (), count - 1
                else:
                    pending = {object_id}
            else:
                ids = object_ids if isinstance(object_ids, (set, frozenset)) else set(object_ids)
                # (Not ids - objects.keys(): that walks every key of the store.)
                pending = set(itertools.filterfalse(objects.__contains__, ids))
                if self._deleted:
                    pending -= self._deleted
                count -= len(ids) - len(pending)
                if fail_fast and count > 0 and len(pending) < len(ids) and any(
                        getattr(objects.get(i), "is_error", False) for i in ids
                        if i not in pending):
                    count = 0
            if pending is None or count <= 0:
                waiter = None
            else:
                if broad is None:
                    broad = len(pending) > _INDEXED_MAX
                waiter = Waiter(count, callback, pending, broad, fail_fast)
                if not waiter.broad:
                    indexed = self._indexed
                    for object_id in pending:
                        waiters = indexed.get(object_id)
                        if waiters is None:
                            indexed[object_id] = [waiter]
                        else:
                            waiters.append(waiter)
                else:
                    self._broad.append(waiter)
        if waiter is None:
            callback()
        return waiter

    def cancel_waiter(self, waiter: Waiter | None) -> None:
        """Withdraw a waiter (its callback will not run); harmless once it ran."""
        if waiter is None:
            return
        with self._guard:
            if not waiter.done:
                waiter.done = True
                self._unregister(waiter)

    def _unregister(self, waiter: Waiter) -> None:
        if waiter.broad:
            try:
                self._broad.remove(waiter)
            except ValueError:
                pass
            return
        indexed = self._indexed
        for object_id in waiter.ids:
            waiters = indexed.get(object_id)
            if waiters is not None:
                try:
                    waiters.remove(waiter)
                except ValueError:
                    continue
                if not waiters:
                    del indexed[object_id]

    def _arrived(self, object_id: bytes, is_error: bool = False) -> list[Waiter]:
        """Count `object_id` for its waiters; return those now due. Under the lock.
        `is_error`: it was stored as an error (fail-fast waiters are due at once)."""
        waiters = self._indexed.pop(object_id, None)
        if waiters is not None and len(waiters) == 1 and not self._broad:
            # (The usual case: one get waits for it. A waiter on this id alone was
            # registered only here, which the pop undid: nothing to unregister.)
            waiter = waiters[0]
            if waiter.done:
                return []
            waiter.needed -= 1
            if waiter.needed > 0 and not (is_error and waiter.fail_fast):
                return []
            waiter.done = True
            if len(waiter.ids) > 1:
                self._unregister(waiter)
            return waiters
        due = []
        if waiters:
            for waiter in waiters:
                if not waiter.done:
                    waiter.needed -= 1
                    if waiter.needed <= 0 or (is_error and waiter.fail_fast):
                        waiter.done = True
                        due.append(waiter)
        if self._broad:
            for waiter in self._broad:
                if object_id in waiter.ids:
                    waiter.ids.discard(object_id)  # (it may "arrive" twice: deleted, then stored)
                    waiter.needed -= 1
                    if waiter.needed <= 0 or (is_error and waiter.fail_fast):
                        waiter.done = True
                        due.append(waiter)
        for waiter in due:
            self._unregister(waiter)
        return due

    @staticmethod
    def _run(due: list[Waiter]) -> None:
        for waiter in due:
            waiter.callback()

    # -- writing ------------------------------------------------------------------
    def put(self, object_id: bytes, value: SerializedObject) -> None:
        self.put_entry(object_id, value.detached())

    def put_entry(self, object_id: bytes, value) -> None:
        """Store an entry: a SerializedObject here; subclasses may store other
        kinds with ``refs`` and ``is_error`` attributes. A second value for a
        stored id is not stored (the first stays): it goes to `_discarded`."""
        with self._guard:
            if object_id in self._objects:
                discard, due = True, ()  # (its waiters were woken by the first)
            else:
                discard = object_id in self._deleted
                if discard:
                    self._deleted.discard(object_id)
                else:
                    self._objects[object_id] = value
                    self._stored(object_id, value)
                # (Nobody waits for it, the usual case: no _arrived call.)
                due = self._arrived(object_id, not discard and value.is_error) \
                    if object_id in self._indexed or self._broad else ()
        if discard:
            self._discarded(object_id, value)
        elif value.refs and self._refs is not None:
            self._refs.incr_all(value.refs)
        if due:
            for waiter in due:  # (what _run does)
                waiter.callback()

    # -- reading ------------------------------------------------------------------
    def get(self, object_ids: Sequence[bytes], timeout: float | None = None,
            fail_fast: bool = False) -> list[SerializedObject]:
        objects = self._objects
        if len(object_ids) == 1:  # (the common case: no KeyError raised when it is absent)
            object_id = object_ids[0]
            entry = objects.get(object_id)
            if entry is not None:
                return [self._materialize(object_id, entry)]
            return [self._get_one(object_id, timeout)]
        else:
            try:
                return [self._materialize(i, objects[i]) for i in object_ids]
            except KeyError:
                pass
        one = len(object_ids) == 1
        arrived = _Signal()
        waiter = self.notify_when(object_ids, 1 if one else len(set(object_ids)), arrived.set,
                                  fail_fast=fail_fast)
        if waiter is not None and not self._block(object_ids, arrived, timeout):
            self.cancel_waiter(waiter)
            if not arrived.wait(0):
                with self._guard:
                    missing = sum(1 for i in set(object_ids) if i not in objects)
                raise exc.GetTimeoutError(
                    f"get() timed out after {timeout}s waiting for {missing} of "
                    f"{len(object_ids)} objects")
        with self._guard:
            found = [objects.get(object_ids[0])] if one else [objects.get(i) for i in object_ids]
            closed, failure = self.closed, self.failure
        if one and found[0] is not None:
            return [self._materialize(object_ids[0], found[0])]
        if fail_fast and None in found and any(e is not None and e.is_error for e in found):
            return [None if e is None else self._materialize(i, e)
                    for i, e in zip(object_ids, found)]
        for object_id, entry in zip(object_ids, found):
            if entry is None:
                if closed:
                    raise exc.BackendError(str(failure) if failure is not None
                                           else "the object store was shut down")
                raise exc.ObjectFreedError(f"object {object_id.hex()} was freed")
        return [self._materialize(i, entry) for i, entry in zip(object_ids, found)]

    def _get_one(self, object_id: bytes, timeout: float | None) -> SerializedObject:
        """`get` of one id that was absent a moment ago: what the general path
        does for it, with its waiter registered inline (a sync task's get)."""
        arrived = _Signal()
        objects = self._objects
        with self._guard:
            entry = objects.get(object_id)
            if entry is None and not self.closed and object_id not in self._deleted:
                waiter = Waiter(1, arrived.set, (object_id,), False)
                waiters = self._indexed.get(object_id)
                if waiters is None:
                    self._indexed[object_id] = [waiter]
                else:
                    waiters.append(waiter)
            else:
                waiter = None
        if waiter is not None:
            if not self._block((object_id,), arrived, timeout):
                self.cancel_waiter(waiter)
                if not arrived.wait(0):
                    raise exc.GetTimeoutError(
                        f"get() timed out after {timeout}s waiting for 1 of 1 objects")
            with self._guard:
                entry = objects.get(object_id)
        if entry is not None:
            return self._materialize(object_id, entry)
        if self.closed:
            failure = self.failure
            raise exc.BackendError(str(failure) if failure is not None
                                   else "the object store was shut down")
        raise exc.ObjectFreedError(f"object {object_id.hex()} was freed")

    def _materialize(self, object_id: bytes, entry) -> SerializedObject:
        """The SerializedObject for a stored entry (subclasses store other kinds)."""
        return entry

    def _block(self, object_ids: Sequence[bytes], arrived: _Signal,
               timeout: float | None) -> bool:
        """Wait until `arrived` is set (the objects `get` waits for are in) or
        `timeout` passes; whether it was set. A subclass may make the objects
        arrive meanwhile in this very thread (e.g. read them off a socket)."""
        return arrived.wait(timeout)

    def _stored(self, object_id: bytes, entry) -> None:
        """An entry was stored, under the lock (subclasses account for it)."""

    def _freed(self, object_id: bytes, entry) -> None:
        """An entry was deleted (subclasses release what backs it)."""

    def _discarded(self, object_id: bytes, entry) -> None:
        """An entry arrived after its id was deleted and was never stored
        (subclasses release what backs it; nothing was accounted for it)."""

    def wait(self, object_ids: Sequence[bytes], num_returns: int,
             timeout: float | None = None) -> set[bytes]:
        objects = self._objects
        present = map(objects.__contains__, object_ids)  # (C-level steps, no Python loop)
        if num_returns <= 0:
            return set(itertools.compress(object_ids, present))
        # The first `num_returns` present ids, if there are that many (the common case).
        ready = set(itertools.islice(itertools.compress(object_ids, present), num_returns))
        if len(ready) >= num_returns:
            return ready
        if self.failure is not None:
            raise exc.BackendError(str(self.failure))
        if timeout == 0 or self.closed:
            return ready
        arrived = _Signal()
        waiter = self.notify_when(object_ids, num_returns, arrived.set)
        if waiter is not None and not arrived.wait(timeout):
            self.cancel_waiter(waiter)
        with self._guard:
            # (Not objects.keys() & ids: that would copy every key of the store.)
            ready = set(itertools.compress(object_ids, map(objects.__contains__, object_ids)))
            if len(ready) < num_returns and self.failure is not None:
                raise exc.BackendError(str(self.failure))
            return ready

    def has_at_least(self, object_ids: Sequence[bytes], count: int) -> bool:
        """Whether `count` of the ids are present now (stops looking once they are)."""
        if count <= 0:
            return True
        objects = self._objects
        for object_id in object_ids:
            if object_id in objects:
                count -= 1
                if not count:
                    return True
        return False

    def contains(self, object_id: bytes) -> bool:
        return object_id in self._objects

    def entry(self, object_id: bytes):
        """The stored entry as it is (None if absent), without materializing it."""
        return self._objects.get(object_id)

    def delete(self, object_ids: Iterable[bytes]) -> None:
        freed = []
        due = []
        with self._guard:
            for object_id in object_ids:
                value = self._objects.pop(object_id, None)
                if value is None:  # not arrived yet: drop it when it does
                    self._deleted.add(object_id)
                    due.extend(self._arrived_deleted(object_id))
                else:
                    freed.append((object_id, value))
        for object_id, value in freed:
            self._freed(object_id, value)
            if value.refs and self._refs is not None:
                self._refs.decr_all(value.refs)
        if due:
            self._run(due)

    def _arrived_deleted(self, object_id: bytes) -> list[Waiter]:
        # Waiters on an id that will never be stored must not wait for ever: they
        # count it as arrived, find it missing and report it lost.
        if object_id in self._indexed or self._broad:
            return self._arrived(object_id)
        return []

    def on_ready(self, object_id: bytes, callback: Callable[[bytes], object]) -> None:
        self.notify_when((object_id,), 1, lambda: callback(object_id))

    def stats(self) -> dict:
        with self._guard:
            return {"num_objects": len(self._objects),
                    "bytes_used": sum(getattr(v, "total_bytes", 0) for v in self._objects.values())}

    def fail(self, error: BaseException) -> None:
        """No value can arrive any more (whatever delivered them died): every
        blocked and later read of a missing object raises BackendError with
        `error`'s text, and every pending on_ready callback runs now (its get
        raises it too). Objects already present stay readable."""
        with self._guard:
            self.failure = error
            self.closed = True
        self._wake_all()

    def close(self) -> None:
        """Wake every blocked reader (they raise BackendError) and run every
        pending callback (their get raises it too), so no future waits for ever."""
        with self._guard:
            self.closed = True
            self._objects.clear()
        self._wake_all()

    def _wake_all(self) -> None:
        """Run every pending waiter's callback now (the store closed or failed)."""
        with self._guard:
            pending = [w for ws in self._indexed.values() for w in ws] + self._broad
            self._indexed, self._broad = {}, []
            due = []
            for waiter in pending:
                if not waiter.done:
                    waiter.done = True
                    due.append(waiter)
        for waiter in due:
            try:
                waiter.callback()
            except Exception:  # noqa: BLE001 - shutting down: nothing to tell
                pass

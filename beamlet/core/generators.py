"""Generator tasks: the caller's side of a stream of refs (Ray's ``ObjectRefGenerator``).

A task or actor method that ``yield``s, called with ``num_returns="streaming"``
(the default for a generator function, as in Ray), has one return id: the
*stream id*. Its producer (``core/execution.py``) stores item ``i`` under
`item_id` ``(stream, i)`` as soon as it is yielded, an exception raised
mid-stream as the item after the last good one, then an end-of-stream marker
(an ``ObjectRefStreamEndOfStreamError``, which `get` of that ref raises) as the
item after that; the stream id itself gets None when the task ends, or the
error of a failure outside the generator (its worker died, it was cancelled
before it started). A consumer waits for "item ``i`` or the stream id",
whichever comes first, through the object store, so every backend that stores
objects can carry a stream (``Backend.streaming_generators`` says which do).

Backpressure (``_generator_backpressure_num_objects=N``): the consumer stores an
acknowledgement `ack_id` ``(stream, i)`` when it has taken item ``i``, for every
``max(1, N // 4)``-th item (and lets go of the previous one, so one is alive
at a time); the producer, once it is ``N`` items ahead of the last
acknowledgement it saw, waits until at most half that many are unacknowledged
(or for `closed_id`: the consumer dropped the generator, and the producer
stops). So the producer is never more than ``N`` items ahead of its consumer.

``num_returns="dynamic"`` (Ray's older form) stores the items the same way;
the task's one ref then holds a `DynamicObjectRefGenerator` of all of them.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from typing import Any, Sequence

from .. import exceptions as exc
from . import runtime as _runtime
from .ids import ID_SIZE
from .object_ref import ObjectRef
from .serialization import deserialize, serialize


@functools.lru_cache(maxsize=256)
def _prefix(stream_id: bytes, tag: bytes) -> bytes:
    # (Hashed once per stream; an id is this and the index: a hash per item
    # would cost more than the rest of handing the item over.)
    return hashlib.blake2b(stream_id + tag, digest_size=ID_SIZE - 8).digest()


def item_id(stream_id: bytes, index: int) -> bytes:
    """The object id of item `index` of a stream (0-based)."""
    return _prefix(stream_id, b"i") + index.to_bytes(8, "little")


def stream_prefix(stream_id: bytes) -> bytes:
    """What the ids of a stream's items start with (``item_id(stream_id, i)``
    is this and `i` in 8 bytes): ``item_id[:-8]`` of any of its items."""
    return _prefix(stream_id, b"i")


def ack_id(stream_id: bytes, index: int) -> bytes:
    """The id a consumer stores when it has taken item `index` (backpressure only)."""
    return _prefix(stream_id, b"a") + index.to_bytes(8, "little")


def closed_id(stream_id: bytes) -> bytes:
    """The id a consumer stores when it drops the generator before its end."""
    return _prefix(stream_id, b"c") + bytes(8)


def ack_step(limit: int) -> int:
    """Every how many items a consumer acknowledges, for a backpressure `limit`:
    often enough that a producer waiting for half its window to be taken
    always hears of it."""
    return max(1, limit // 4)


def end_marker():
    """The value stored after a stream's last item (a fresh SerializedObject)."""
    return serialize(exc.ObjectRefStreamEndOfStreamError(
        "the generator task has no more items"), is_error=True)


_SIGNAL = serialize(None)  # what an acknowledgement or the closed mark holds


def _is_end(store, object_id: bytes) -> bool:
    """Whether the (present) object is the end-of-stream marker. Reads only
    errors: the owner's store tells that from the entry, without mapping it."""
    entry_of = getattr(store, "entry", None)
    entry = entry_of(object_id) if entry_of is not None else None
    if entry is None:
        entry = store.get([object_id], None)[0]  # (present: no wait)
    if not entry.is_error:
        return False
    sobj = store.get([object_id], None)[0] if entry_of is not None else entry
    try:
        return isinstance(deserialize(sobj), exc.ObjectRefStreamEndOfStreamError)
    except Exception:  # noqa: BLE001 - an error that does not unpickle is an item
        return False


class ObjectRefGenerator:
    """The refs of a generator task's items, as they are made.

    ``next(gen)`` blocks until the next item exists and returns its ObjectRef
    (`get` raises the exception of a failed item), and raises StopIteration
    after the last one; ``async for`` / ``await gen.__anext__()`` wait without
    blocking the event loop; ``wait([gen, ...])`` counts a generator as ready
    when ``next`` would not block. `completed()` is the ref of the task itself
    (`cancel` takes the generator too). Like Ray's, it cannot be sent to
    another task, is not thread-safe, and has no ``send``/``throw``/``close``.
    Items it never handed out are freed when it is dropped (once the task ends).
    """

    def __init__(self, ref: ObjectRef, backpressure: int = -1):
        self._ref = ref
        self._backpressure = backpressure
        self._index = 0  # the next item to hand out
        self._finished = False  # StopIteration from now on
        self._ack: ObjectRef | None = None  # the last acknowledgement (backpressure)

    # -- iteration ---------------------------------------------------------------
    def __iter__(self) -> "ObjectRefGenerator":
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync()

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next item's ref, waiting at most `timeout_s` (None or -1: no
        limit) for it; ``ObjectRef.nil()`` when it runs out, as in Ray."""
        if self._finished:
            raise StopIteration
        if timeout_s is not None and timeout_s < 0:
            timeout_s = None
        stream = self._ref.id
        item = item_id(stream, self._index)
        store = self._runtime().backend.object_store
        entry_of = getattr(store, "entry", None)  # (the owner's store: a dict lookup)
        if entry_of is not None and entry_of(item) is not None:
            ready = (item,)
        else:
            ready = store.wait([item, stream], 1, timeout_s)
            if not ready:
                return ObjectRef.nil()
        if item not in ready and not store.contains(item) \
                and not store.get([stream], None)[0].is_error:  # (present: no wait)
            # The task ended well, so it stored every item and the end marker
            # before the stream id: this store let go of its copy (a cluster
            # node frees what it sent to the owner), which has it.
            if not store.wait([item], 1, timeout_s):
                return ObjectRef.nil()
            ready = (item,)
        if item in ready or store.contains(item):  # (stored before the stream id)
            if _is_end(store, item):
                self._end(item)
                raise StopIteration
            self._index += 1
            ref = ObjectRef(item)
            limit = self._backpressure
            if limit > 0 and self._index % ack_step(limit) == 0:
                self._acknowledge(store)
            return ref
        # The task ended without this item: it failed outside the generator, and
        # the stream's own ref holds the error (given once, as Ray does).
        self._end(None)
        return self._ref

    def _acknowledge(self, store) -> None:
        ack = ObjectRef(ack_id(self._ref.id, self._index - 1))
        store.put(ack.id, _SIGNAL)
        self._ack = ack  # (the previous one is let go, so it is freed)

    def _end(self, marker: bytes | None) -> None:
        self._finished = True
        self._ack = None
        if marker is not None:
            ObjectRef(marker)  # taken and let go: the marker is freed

    def __aiter__(self) -> "ObjectRefGenerator":
        return self

    async def __anext__(self) -> ObjectRef:
        return await self._next_async()

    async def _next_async(self, timeout_s: float | None = None) -> ObjectRef:
        """As `_next_sync`, without blocking the loop (nil ref: timed out)."""
        try:
            ref = self._next_sync(0)
        except StopIteration:
            raise StopAsyncIteration from None
        if not ref.is_nil() or timeout_s == 0:
            return ref
        import asyncio
        # Waiting blocks a thread of the loop's executor, not the loop.
        ref = await asyncio.get_running_loop().run_in_executor(None, self._next_or_end,
                                                               timeout_s)
        if ref is None:
            raise StopAsyncIteration
        return ref

    def _next_or_end(self, timeout_s):
        # (StopIteration cannot cross a Future.)
        try:
            return self._next_sync(timeout_s)
        except StopIteration:
            return None

    # -- Ray's other methods ---------------------------------------------------------
    def completed(self) -> ObjectRef:
        """A ref that is ready once the task has ended (None, or its failure)."""
        return self._ref

    def next_ready(self) -> bool:
        """Whether ``next`` would return (or end) without waiting."""
        if self._finished:
            return True
        stream = self._ref.id
        return bool(self._runtime().backend.object_store.wait(
            [item_id(stream, self._index), stream], 1, 0))

    def is_finished(self) -> bool:
        """Whether every item was taken (``next`` raises StopIteration)."""
        return self._finished

    def send(self, value):
        raise NotImplementedError("ObjectRefGenerator.send is not supported (as in Ray)")

    def throw(self, *args):
        raise NotImplementedError("ObjectRefGenerator.throw is not supported (as in Ray)")

    def close(self):
        raise NotImplementedError("ObjectRefGenerator.close is not supported (as in Ray); "
                                  "use cancel(generator) to stop its task")

    def _wait_ids(self) -> list[bytes]:
        """The ids whose arrival makes this generator ready (none: it is)."""
        if self._finished:
            return []
        return [item_id(self._ref.id, self._index), self._ref.id]

    def _runtime(self):
        rt = self._ref._runtime
        if rt is None or rt is not _runtime.current_or_none():
            raise exc.ObjectLostError(f"{self!r} belongs to a beamlet session that was shut "
                                      f"down; its items are gone")
        return rt

    def __reduce__(self):
        raise TypeError("an ObjectRefGenerator cannot be passed to a task or actor (as in "
                        "Ray): pass the refs it gives, or use num_returns='dynamic'")

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._ref.hex()}, next={self._index})"

    def __del__(self):
        if self._finished:
            return
        rt = self._ref._runtime
        if rt is None or rt.refs.closed:
            return
        try:
            # (On the callback thread: this may run inside the cyclic GC.)
            rt.call_soon(_Abandoned(rt, self._ref, self._index, self._backpressure,
                                    self._ack).start)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free
            pass


class _Abandoned:
    """Cleans up after a generator dropped before its end: tells a producer held
    back by backpressure to stop, and once the task has ended frees the items
    nobody took (everything is kept alive until then by holding refs here)."""

    def __init__(self, rt, ref: ObjectRef, index: int, backpressure: int, ack):
        self.rt = rt
        self.keep = [ref, ack]
        self.stream = ref.id
        self.index = index
        self.backpressure = backpressure
        self.lock = threading.Lock()

    def start(self) -> None:
        if self.rt is not _runtime.current_or_none():
            return
        store = self.rt.backend.object_store
        if self.backpressure > 0:
            closed = ObjectRef(closed_id(self.stream))
            store.put(closed.id, _SIGNAL)
            self.keep.append(closed)
        store.on_ready(self.stream, lambda _id: self.rt.call_soon(self.free))

    def free(self) -> None:
        if self.rt is not _runtime.current_or_none():
            return
        store = self.rt.backend.object_store
        index = self.index
        while True:
            item = item_id(self.stream, index)
            if not store.contains(item):
                break
            end = _is_end(store, item)
            ObjectRef(item)  # taken and let go: freed
            if end:
                break
            index += 1
        self.keep = []


class DynamicObjectRefGenerator:
    """What the ref of a ``num_returns="dynamic"`` call holds: the refs of the
    items its generator yielded (an exception it raised is the last one)."""

    def __init__(self, refs: Sequence[ObjectRef]):
        self._refs = list(refs)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"


def is_waitable(obj: Any) -> bool:
    return isinstance(obj, (ObjectRef, ObjectRefGenerator))


def wait(rt, waitables: list, num_returns: int, timeout: float | None):
    """``wait`` over refs and generators (`api.wait` with a generator among
    them): a generator is ready when its next item, or its end, is there.
    Returns ``(ready, not_ready)`` in input order, at most `num_returns` ready;
    ObjectLostError for one of a session that was shut down."""
    rt._ids([w._ref if isinstance(w, ObjectRefGenerator) else w for w in waitables])
    groups = [w._wait_ids() if isinstance(w, ObjectRefGenerator) else [w.id]
              for w in waitables]
    all_ids = [i for ids in groups for i in ids]
    until = _runtime.deadline(timeout)
    store = rt.backend.object_store
    want = num_returns
    while True:
        present = (store.wait(all_ids, min(want, len(all_ids)), _runtime.remaining(until))
                   if all_ids else set())
        ready = [pos for pos, ids in enumerate(groups)
                 if not ids or any(i in present for i in ids)]
        # Two present ids of one generator count once: ask for more until enough
        # waitables are ready, everything is, or the time is up.
        if len(ready) >= num_returns or len(present) < min(want, len(all_ids)) \
                or len(present) >= len(all_ids):
            break
        want = len(present) + 1
    chosen = set(ready[:num_returns])
    return ([waitables[p] for p in sorted(chosen)],
            [w for p, w in enumerate(waitables) if p not in chosen])


__all__ = ["ObjectRefGenerator", "DynamicObjectRefGenerator", "item_id", "ack_id",
           "closed_id"]

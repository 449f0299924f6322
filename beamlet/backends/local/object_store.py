"""The local backend's object store, as its owner (the driver or a node) keeps it.

Small values (up to the inline threshold) are kept in memory and travel
inside messages. Large ones live in shared-memory segments (``shm.py``) that
every process on the machine maps read-only. Freed segments go to a pool of
warm segments that later puts reuse. When the segments would exceed
``capacity`` bytes, the least recently used objects spill to files on disk
and come back on the next read; an object that cannot fit even then raises
``ObjectStoreFullError`` naming the sizes.

Only the store creates segments, so ``capacity`` bounds what workers write
too (as in plasma's create/seal): a worker asks for segments (`allocate`),
which are *unsealed* (counted, not readable, not spillable) until it reports
the object (`put_from_worker` seals them). A worker that dies leaves its
unsealed segments to `writer_died`, which unlinks them. An allocation that
does not fit while other writes are unsealed waits for them (they will seal
or die); once none is, it fails with ``ObjectStoreFullError``.
"""
from __future__ import annotations

import collections
import functools
import mmap
import os
import shutil
import threading
import time
from typing import Callable

from ... import exceptions as exc
from ...core.memory_store import MemoryObjectStore
from ...core.refcount import ReferenceCounter
from ...core.serialization import SerializedObject, serialize
from . import shm
from .protocol import ShmEntry

#: How long a driver's put waits for workers' unsealed writes to make room.
PUT_WAIT = 60.0


class LocalObjectStore(MemoryObjectStore):
    """Entries are SerializedObjects (inline) or ShmEntries (in shared memory)."""

    def __init__(self, refs: ReferenceCounter, session: str, capacity: int,
                 inline_threshold: int, spill_dir: Callable[[], str]):
        super().__init__(refs)
        self.session = session
        self.capacity = capacity
        self.inline_threshold = inline_threshold
        self._spill_dir = spill_dir
        self.pool = shm.SegmentPool(capacity // 4)
        self._mappings: dict[str, shm.Segment] = {}  # segment name -> our writable mapping
        self._lru: collections.OrderedDict[bytes, ShmEntry] = collections.OrderedDict()
        self._space = threading.RLock()
        self._space_changed = threading.Condition(self._space)
        self.shm_bytes = 0
        self.spilled_bytes = 0
        # Segments given to writers and not yet sealed: name -> (writer, size, our
        # mapping if it came from the pool); by writer; and the allocations waiting
        # for room as (writer, sizes, answer).
        self._unsealed: dict[str, tuple[str, int, shm.Segment | None]] = {}
        self._unsealed_by: dict[str, set[str]] = {}
        self.unsealed_bytes = 0
        self._alloc_waiting: collections.deque = collections.deque()
        #: Set by the backend: frees objects whose release is still queued. Never
        #: call it with the space lock held (it takes the scheduler's lock).
        self.reclaim: Callable[[], None] | None = None
        #: Set by the node: ``wait_here(object_id, arrived, timeout)`` blocks a
        #: `get` of one object like `_block`, reading its result itself.
        self.wait_here: Callable | None = None
        #: Set by the node: ``read_here(object_id, done, until)`` reads the result
        #: of a `get` of one object in the caller's thread until ``done()``
        #: (True), `until` (a monotonic time) passes (False), or it cannot (None).
        self.read_here: Callable | None = None
        #: Set by a node whose callers read their sync calls' replies themselves:
        #: its claimed connections (their replies held back until a get reads
        #: them), and what gives them back to its I/O thread; called before
        #: anything waits on this store otherwise (see Node.claim).
        self.claims: dict | None = None
        self.release_claims: Callable[[], None] | None = None
        self._pins: dict[bytes, int] = {}  # objects shipped to running tasks: not spilled
        self._owners: dict[bytes, str] = {}  # object id -> worker that put it
        self._owned: dict[str, set[bytes]] = {}  # worker -> ids it put, still alive

    # -- writing --------------------------------------------------------------
    def put(self, object_id: bytes, value: SerializedObject) -> None:
        if value.total_bytes <= self.inline_threshold:
            super().put(object_id, value)  # kept in memory, as a copy
            return
        header, size, pieces = shm.layout(value)
        seg = self.reserve(size)
        try:
            shm.write_into(memoryview(seg.mm), header, pieces)
        except BaseException:
            self.abandon(seg)
            raise
        self.commit(object_id, seg, value.is_error, value.refs)

    def reserve(self, size: int) -> shm.Segment:
        """A writable segment of at least `size` bytes, counted as used, for an
        object to be written into here (by `put`, or as it arrives from another
        node); then `commit` it, or `abandon` it. ObjectStoreFullError if it
        cannot fit."""
        if self.reclaim is not None:
            # Free what was released a moment ago, so its segment can be reused (or
            # its room taken) by this put. Not under the space lock: freeing takes
            # the scheduler's lock, and the scheduler takes the space lock.
            self.reclaim()
        with self._space:
            self._check_size(size)
            seg = self.pool.take(self.session, size)
            if seg is None:
                self._wait_for_room(size)
                seg = shm.create_segment(self.session, size)
            self._mappings[seg.name] = seg
            self.shm_bytes += seg.size  # (counted before it is stored: see _stored)
            return seg

    def commit(self, object_id: bytes, seg: shm.Segment, is_error: bool, refs) -> None:
        """Store the object written into `seg` (from `reserve`) under `object_id`."""
        self.put_entry(object_id, ShmEntry(seg.name, seg.size, is_error, tuple(refs)))

    def abandon(self, seg: shm.Segment) -> None:
        """A reserved segment that will not be committed: unlink it."""
        with self._space:
            self._mappings.pop(seg.name, None)
            self.shm_bytes -= seg.size
            shm.discard(seg)
            self._space_changed.notify_all()

    def segment_view(self, object_id: bytes):
        """``(view, is_error, refs)``: a read-only view of the whole segment of a
        stored object in shared memory (see ``shm.used_size``), which keeps it
        alive while any view of it lives; None if the object is absent or kept
        inline (then `get` it)."""
        entry = self._objects.get(object_id)
        if not isinstance(entry, ShmEntry):
            return None
        refs = self._refs
        with self._space:
            if entry.spilled:
                self._restore(object_id, entry)
        refs.incr(object_id)  # a mapping is a reference, as in _materialize
        try:
            view = shm.map_segment(entry.name, lambda: refs.decr(object_id))
        except FileNotFoundError:
            refs.decr(object_id)
            return None
        return view, entry.is_error, entry.refs

    def _check_size(self, size: int) -> None:
        if size > self.capacity:
            raise exc.ObjectStoreFullError(
                f"an object of {size} bytes cannot be stored: the object store holds at most "
                f"{self.capacity} bytes (object_store_memory)")

    def _wait_for_room(self, size: int) -> None:
        """Make room for `size` bytes, waiting for unsealed writes if that is what
        it takes. Called with the space lock held (waiting lets it go)."""
        until = time.monotonic() + PUT_WAIT
        while True:
            try:
                self._make_room(size)
                return
            except exc.ObjectStoreFullError:
                left = until - time.monotonic()
                if not self.unsealed_bytes or left <= 0:
                    raise
            self._space_changed.wait(left)

    # -- writers in other processes ---------------------------------------------------
    def allocate(self, writer: str, sizes: list[int], answer: Callable[[bool, object], None]) -> None:
        """Give `writer` new segments of these sizes to fill, all or none:
        ``answer(True, [(name, size), ...])`` (a size may be larger than asked),
        or ``answer(False, ObjectStoreFullError)``. Answers at once, or later when
        unsealed writes of others are sealed or their writers die."""
        if self.reclaim is not None:
            self.reclaim()  # (not under the space lock: see put)
        with self._space:
            if self._alloc_waiting:  # first come, first served
                self._alloc_waiting.append((writer, sizes, answer))
                return
            try:
                granted = self._try_allocate(writer, sizes)
            except exc.BeamletError as err:
                granted = err
            if granted is None:
                self._alloc_waiting.append((writer, sizes, answer))
                return
        if isinstance(granted, BaseException):
            answer(False, granted)
        else:
            answer(True, granted)

    def _try_allocate(self, writer: str, sizes: list[int]) -> list | None:
        """Segments for `writer` (None: wait for unsealed writes). Under the space lock."""
        total = sum(sizes)
        if total > self.capacity:
            what = f"an object of {total} bytes" if len(sizes) == 1 else \
                f"{len(sizes)} objects of {total} bytes in all"
            raise exc.ObjectStoreFullError(
                f"{what} cannot be stored: the object store holds at most {self.capacity} "
                f"bytes (object_store_memory)")
        # Warm pooled segments first (they are counted already), then room for the rest.
        pooled = [self.pool.take(self.session, size) for size in sizes]
        try:
            self._make_room(sum(size for size, seg in zip(sizes, pooled) if seg is None))
        except exc.ObjectStoreFullError:
            self._return_to_pool(pooled)
            if self.unsealed_bytes:
                return None
            raise
        granted = []
        try:
            for size, seg in zip(sizes, pooled):
                if seg is None:
                    name = shm.create_unmapped(self.session, size)
                else:
                    name, size = seg.name, seg.size
                self._unsealed[name] = (writer, size, seg)
                self._unsealed_by.setdefault(writer, set()).add(name)
                self.unsealed_bytes += size
                granted.append((name, size))
        except BaseException:
            for name, _ in granted:
                self._drop_unsealed(name)
            self._return_to_pool(pooled[len(granted):])
            raise
        return granted

    def _return_to_pool(self, segments) -> None:
        for seg in segments:
            if seg is not None and not self.pool.give(seg):
                shm.discard(seg)

    def _drop_unsealed(self, name: str) -> None:
        """Unlink an unsealed segment and stop counting it. Under the space lock."""
        writer, size, seg = self._unsealed.pop(name)
        names = self._unsealed_by.get(writer)
        if names is not None:
            names.discard(name)
            if not names:
                del self._unsealed_by[writer]
        self.unsealed_bytes -= size
        if seg is not None:
            shm.discard(seg)
        else:
            shm.unlink(name)
        self._space_changed.notify_all()

    def _retry_allocations(self) -> None:
        """Grant (or fail) waiting allocations now that room may have been made.
        Not under the space lock (answers go out after it is released)."""
        answers = []
        with self._space:
            while self._alloc_waiting:
                writer, sizes, answer = self._alloc_waiting[0]
                try:
                    granted = self._try_allocate(writer, sizes)
                except exc.BeamletError as err:
                    granted = err
                if granted is None:
                    break
                self._alloc_waiting.popleft()
                answers.append((answer, granted))
        for answer, granted in answers:
            if isinstance(granted, BaseException):
                answer(False, granted)
            else:
                answer(True, granted)

    def drop_unsealed(self, writer: str, names) -> None:
        """`writer` will not report these segments (it gave up, or its report
        was not stored): unlink them."""
        if not self._unsealed_by.get(writer):
            return
        with self._space:
            mine = self._unsealed_by.get(writer, ())
            for name in [n for n in names if n in mine]:
                self._drop_unsealed(name)
        self._retry_allocations()

    def drop_unreported(self, writer: str, entries) -> None:
        """After a worker's DONE was handled: its entries that were not stored
        (e.g. a result dropped for a retry) still hold segments; unlink them."""
        if self._unsealed_by.get(writer):
            self.drop_unsealed(writer, [e.name for e in entries if isinstance(e, ShmEntry)])

    def writer_died(self, writer: str) -> None:
        """`writer` is gone: unlink what it was writing, forget what it asked for."""
        if not self._unsealed_by.get(writer) and not self._alloc_waiting:
            return
        with self._space:
            for name in list(self._unsealed_by.get(writer, ())):
                self._drop_unsealed(name)
            self._alloc_waiting = collections.deque(
                w for w in self._alloc_waiting if w[0] != writer)
        self._retry_allocations()

    def _seal(self, entry: ShmEntry, writer: str | None):
        """The stored form of a worker's ShmEntry, its bytes now counted as stored:
        its segment must be one given to that writer; otherwise an error entry
        (the file is left alone)."""
        with self._space:
            record = self._unsealed.get(entry.name)
            if record is None or record[0] != writer:
                return serialize(exc.ObjectLostError(
                    f"a worker reported segment {entry.name!r}, which the object store "
                    f"did not give it"), is_error=True)
            del self._unsealed[entry.name]
            names = self._unsealed_by[writer]
            names.discard(entry.name)
            if not names:
                del self._unsealed_by[writer]
            _, size, seg = record
            self.unsealed_bytes -= size
            self.shm_bytes += size
            if seg is not None:
                self._mappings[entry.name] = seg
            self._space_changed.notify_all()
            return ShmEntry(entry.name, size, entry.is_error, entry.refs)

    def put_from_worker(self, object_id: bytes, entry, owner: str | None,
                        writer: str | None = None) -> None:
        """Store an entry that worker `writer` produced (a segment it was given
        and has written, or an inline value); `owner`: the worker that put it."""
        sealed = isinstance(entry, ShmEntry)
        if sealed:
            entry = self._seal(entry, writer)
        if owner is not None:
            self._owners[object_id] = owner
            self._owned.setdefault(owner, set()).add(object_id)
        self.put_entry(object_id, entry)
        if sealed and self._alloc_waiting:
            self._retry_allocations()

    def _stored(self, object_id: bytes, entry) -> None:
        # Its bytes were counted under the space lock before (put, _seal): this runs
        # under the store's condition lock, which must not take the space lock.
        if isinstance(entry, ShmEntry):
            self._lru[object_id] = entry

    # -- reading --------------------------------------------------------------
    def notify_when(self, object_ids, count, callback, broad=None, fail_fast=False):
        if self.claims:
            self.release_claims()  # (a waiter here may need what a claim holds back)
        return MemoryObjectStore.notify_when(self, object_ids, count, callback, broad,
                                             fail_fast)

    def has_waiters(self) -> bool:
        """Whether anything waits here for an object to arrive (see `notify_when`)."""
        return bool(self._indexed or self._broad)

    def wait(self, object_ids, num_returns, timeout=None):
        if self.claims:
            self.release_claims()  # (so that a loop of wait(timeout=0) sees results come)
        return MemoryObjectStore.wait(self, object_ids, num_returns, timeout)

    def _get_one(self, object_id: bytes, timeout: float | None) -> SerializedObject:
        # Read the result off its worker's socket in this thread, looking for it
        # in the store after each message handled: no waiter to register, no
        # wake-up (a sync call's get). Else the general path.
        read_here = self.read_here
        if read_here is not None and not self.closed:
            until = None if timeout is None else time.monotonic() + timeout
            got = read_here(object_id, functools.partial(self._objects.__contains__, object_id),
                            until)
            if got is not None:
                entry = self._objects.get(object_id)  # (False: stored just after the look?)
                if entry is not None:
                    return self._materialize(object_id, entry)
            if got is False:
                raise exc.GetTimeoutError(
                    f"get() timed out after {timeout}s waiting for 1 of 1 objects")
            if until is not None:
                timeout = max(0.0, until - time.monotonic())
        return super()._get_one(object_id, timeout)

    def _block(self, object_ids, arrived, timeout) -> bool:
        if len(object_ids) == 1 and self.wait_here is not None:
            return self.wait_here(object_ids[0], arrived, timeout)
        return arrived.wait(timeout)

    def _materialize(self, object_id: bytes, entry) -> SerializedObject:
        if not isinstance(entry, ShmEntry):
            return entry
        refs = self._refs
        for _ in range(3):
            # The LRU touch is under the space lock, so that a spill running in another
            # thread cannot be undone by it (leaving a spilled entry in the LRU).
            with self._space:
                if entry.spilled:
                    self._restore(object_id, entry)
                else:
                    self._lru.pop(object_id, None)
                    self._lru[object_id] = entry
            refs.incr(object_id)  # a mapping is a reference: see shm.read_object
            try:
                return shm.read_object(entry.name, lambda: refs.decr(object_id))
            except FileNotFoundError:
                refs.decr(object_id)
                if self._objects.get(object_id) is not entry:
                    break  # freed, or lost with its owner
                # Spilled by another thread since the check: restore it and map again.
        raise exc.ObjectLostError(f"object {object_id.hex()} is no longer in shared memory")

    def pin(self, object_ids) -> None:
        """Keep these objects in shared memory (not spilled) until `unpin`: a
        worker was told where they are and will map them."""
        with self._space:
            for object_id in object_ids:
                self._pins[object_id] = self._pins.get(object_id, 0) + 1

    def unpin(self, object_ids) -> None:
        with self._space:
            for object_id in object_ids:
                count = self._pins.get(object_id, 0) - 1
                if count > 0:
                    self._pins[object_id] = count
                else:
                    self._pins.pop(object_id, None)

    def materialize_entry(self, object_id: bytes, entry) -> SerializedObject:
        """The SerializedObject of an entry a worker reported, before it is stored
        (it may never be: a second result for an id keeps the first). Raises
        ObjectLostError for a segment the store did not give out."""
        if not isinstance(entry, ShmEntry) or self._objects.get(object_id) is entry:
            return self._materialize(object_id, entry)
        with self._space:
            if entry.name not in self._unsealed:
                raise exc.ObjectLostError(f"segment {entry.name!r} was not given out by "
                                          f"the object store")
        return shm.read_object(entry.name)

    def wire_entry(self, object_id: bytes):
        """The entry to send to a worker (restored from disk first if spilled), or None."""
        entry = self._objects.get(object_id)
        if isinstance(entry, ShmEntry) and entry.spilled:
            self._restore(object_id, entry)
        return entry

    # -- freeing --------------------------------------------------------------
    def _forget_owner(self, object_id: bytes) -> None:
        owner = self._owners.pop(object_id, None)
        if owner is not None:
            owned = self._owned.get(owner)
            if owned is not None:
                owned.discard(object_id)
                if not owned:
                    del self._owned[owner]

    def _freed(self, object_id: bytes, entry, reuse: bool = True) -> None:
        self._forget_owner(object_id)
        if not isinstance(entry, ShmEntry):
            return
        with self._space:
            self._lru.pop(object_id, None)
            if entry.spilled:
                self.spilled_bytes -= entry.size
                _remove(entry.spilled)
            else:
                self._release_segment(entry, reuse)
            self._space_changed.notify_all()
        if self._alloc_waiting:
            self._retry_allocations()

    def _release_segment(self, entry: ShmEntry, reuse: bool) -> None:
        """Stop counting `entry`'s segment and give it to the warm pool (`reuse`)
        or unlink it. Called with the space lock held."""
        self.shm_bytes -= entry.size
        seg = self._mappings.pop(entry.name, None)
        if seg is None and reuse:
            seg = _map_for_reuse(entry)
        if seg is None or not reuse or not self.pool.give(seg):
            if seg is not None:
                seg.close()
            shm.unlink(entry.name)

    def _discarded(self, object_id: bytes, entry) -> None:
        if object_id not in self._objects:  # (not a second copy of a stored object)
            self._forget_owner(object_id)
        if isinstance(entry, ShmEntry):
            # Nobody can have mapped it: no ref to this copy ever reached anyone.
            with self._space:
                self._release_segment(entry, reuse=False)  # (counted before put_entry)
                self._space_changed.notify_all()
            if self._alloc_waiting:
                self._retry_allocations()

    def objects_owned_by(self, owner: str) -> list[bytes]:
        """Live objects that worker `owner` put (they die with it, as in Ray)."""
        return list(self._owned.get(owner, ()))

    #: Called as ``on_lost(object_ids, error)`` after `mark_lost` (a cluster
    #: node tells the drivers that hold copies); None: nobody to tell.
    on_lost: Callable[[list, BaseException], None] | None = None

    def mark_lost(self, object_ids: list[bytes], error: BaseException) -> None:
        """Replace the objects' values with `error` (their owner died)."""
        if self.on_lost is not None:
            self.on_lost(object_ids, error)
        sobj = serialize(error, is_error=True)
        freed = []
        with self._guard:
            for object_id in object_ids:
                old = self._objects.get(object_id)
                if old is not None:
                    self._objects[object_id] = sobj
                    freed.append((object_id, old))
        for object_id, old in freed:
            # Still referenced (maybe mapped, by us or a worker): unlink, never reuse.
            self._freed(object_id, old, reuse=False)
            if old.refs and self._refs is not None:
                self._refs.decr_all(old.refs)

    # -- space ------------------------------------------------------------------
    def _make_room(self, size: int) -> None:
        """Trim the pool, then spill least recently used objects, until `size`
        more bytes fit. Called with the space lock held."""
        excess = self.shm_bytes + self.pool.bytes + self.unsealed_bytes + size - self.capacity
        if excess <= 0:
            return
        excess -= self.pool.trim(excess)
        lru = self._lru
        kept = []  # in use by running tasks: they stay, first in line for next time
        while excess > 0 and lru:
            object_id, entry = lru.popitem(last=False)  # (no copy of the whole LRU)
            if self._objects.get(object_id) is not entry or entry.spilled:
                continue
            if object_id in self._pins:
                kept.append((object_id, entry))
                continue
            self._spill(object_id, entry)
            excess -= entry.size
        for object_id, entry in reversed(kept):
            lru[object_id] = entry
            lru.move_to_end(object_id, last=False)
        if excess > 0:
            raise exc.ObjectStoreFullError(
                f"cannot store an object of {size} bytes: the object store holds "
                f"{self.shm_bytes} bytes of {self.capacity} (object_store_memory) in objects "
                f"that cannot be spilled, and {self.unsealed_bytes} bytes are being written")

    def _spill(self, object_id: bytes, entry: ShmEntry) -> None:
        path = os.path.join(self._spill_dir(), entry.name)
        shutil.copyfile(shm.segment_path(entry.name), path)
        seg = self._mappings.pop(entry.name, None)
        if seg is not None:
            seg.close()
        shm.unlink(entry.name)
        entry.spilled = path
        self.shm_bytes -= entry.size
        self.spilled_bytes += entry.size

    def _restore(self, object_id: bytes, entry: ShmEntry) -> None:
        with self._space:
            if not entry.spilled:
                return
            self._make_room(entry.size)
            path = entry.spilled
            # A new name: the old one was free for anyone to take while it was unused.
            entry.name = shm.copy_to_new_segment(self.session, path)
            _remove(path)
            entry.spilled = None
            self.spilled_bytes -= entry.size
            self.shm_bytes += entry.size
            self._lru[object_id] = entry

    def stats(self) -> dict:
        with self._space:  # (a segment is unlinked under it as its bytes stop counting)
            return {"num_objects": len(self._objects), "shm_bytes": self.shm_bytes,
                    "spilled_bytes": self.spilled_bytes, "pool_bytes": self.pool.bytes,
                    "unsealed_bytes": self.unsealed_bytes, "capacity": self.capacity}

    def close(self) -> None:
        super().close()
        with self._space:
            for seg in self._mappings.values():
                seg.close()
            self._mappings.clear()
            for name in list(self._unsealed):
                self._drop_unsealed(name)
            self._alloc_waiting.clear()
            self.pool.clear()
            self._lru.clear()


def _map_for_reuse(entry: ShmEntry) -> shm.Segment | None:
    """A writable mapping of a worker-written segment, so the pool can reuse it."""
    try:
        fd = os.open(shm.segment_path(entry.name), os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        return shm.Segment(entry.name, entry.size, mmap.mmap(fd, entry.size))
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

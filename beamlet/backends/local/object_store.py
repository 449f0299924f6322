"""The local backend's object store, as its owner (the driver or a node) keeps it.

Small values (up to the inline threshold) are kept in memory and travel
inside messages. Large ones live in shared-memory segments (``shm.py``) that
every process on the machine maps read-only. Freed segments go to a pool of
warm segments that later puts reuse. When the segments would exceed
``capacity`` bytes, the least recently used objects spill to files on disk
and come back on the next read; an object that cannot fit even then raises
``ObjectStoreFullError`` naming the sizes.
"""
from __future__ import annotations

import collections
import mmap
import os
import shutil
import threading
from typing import Callable

from ... import exceptions as exc
from ...core.memory_store import MemoryObjectStore
from ...core.refcount import ReferenceCounter
from ...core.serialization import SerializedObject, serialize
from . import shm
from .protocol import ShmEntry


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
        self._writers: dict[bytes, shm.Segment] = {}  # mappings of segments written here
        self._lru: collections.OrderedDict[bytes, ShmEntry] = collections.OrderedDict()
        self._space = threading.RLock()
        self.shm_bytes = 0
        self.spilled_bytes = 0
        #: Set by the backend: frees objects whose release is still queued. Never
        #: call it with the space lock held (it takes the scheduler's lock).
        self.reclaim: Callable[[], None] | None = None
        self._pins: dict[bytes, int] = {}  # objects shipped to running tasks: not spilled
        self._owners: dict[bytes, str] = {}  # object id -> worker that put it
        self._owned: dict[str, set[bytes]] = {}  # worker -> ids it put, still alive

    # -- writing --------------------------------------------------------------
    def put(self, object_id: bytes, value: SerializedObject) -> None:
        if value.total_bytes <= self.inline_threshold:
            super().put(object_id, value)  # kept in memory, as a copy
            return
        _, size, _ = shm.layout(value)
        if self.reclaim is not None:
            # Free what was released a moment ago, so its segment can be reused (or
            # its room taken) by this put. Not under the space lock: freeing takes
            # the scheduler's lock, and the scheduler takes the space lock.
            self.reclaim()
        with self._space:
            self._make_room(size)
            seg = shm.write_object(shm.segment_name(self.session, object_id), value, self.pool)
            self._writers[object_id] = seg
            self.put_entry(object_id, ShmEntry(seg.name, seg.size, value.is_error, value.refs))

    def put_from_worker(self, object_id: bytes, entry, owner: str | None) -> None:
        """Store an entry a worker produced (its segment already written)."""
        if isinstance(entry, ShmEntry) and self.reclaim is not None:
            self.reclaim()
        if isinstance(entry, ShmEntry) and entry.size > self.capacity:
            shm.unlink(entry.name)
            entry = serialize(exc.ObjectStoreFullError(
                f"an object of {entry.size} bytes cannot be stored: the object store holds "
                f"at most {self.capacity} bytes (object_store_memory)"), is_error=True)
        if owner is not None:
            self._owners[object_id] = owner
            self._owned.setdefault(owner, set()).add(object_id)
        self.put_entry(object_id, entry)
        if isinstance(entry, ShmEntry):
            with self._space:
                try:
                    self._make_room(0)
                except exc.ObjectStoreFullError:
                    pass  # over capacity with nothing to spill: the next put will say so

    def _stored(self, object_id: bytes, entry) -> None:
        if isinstance(entry, ShmEntry):
            self.shm_bytes += entry.size
            self._lru[object_id] = entry

    # -- reading --------------------------------------------------------------
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
        """The SerializedObject of an entry that may not be (or not be the one) stored."""
        return self._materialize(object_id, entry)

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
                return
            self.shm_bytes -= entry.size
            seg = self._writers.pop(object_id, None)
            if seg is None and reuse:
                seg = _map_for_reuse(entry)
            if seg is None or not reuse or not self.pool.give(seg):
                if seg is not None:
                    seg.close()
                shm.unlink(entry.name)

    def _discarded(self, object_id: bytes, entry) -> None:
        self._forget_owner(object_id)
        if isinstance(entry, ShmEntry):
            shm.unlink(entry.name)  # nobody can have mapped it: no ref ever reached anyone

    def objects_owned_by(self, owner: str) -> list[bytes]:
        """Live objects that worker `owner` put (they die with it, as in Ray)."""
        return list(self._owned.get(owner, ()))

    def mark_lost(self, object_ids: list[bytes], error: BaseException) -> None:
        """Replace the objects' values with `error` (their owner died)."""
        sobj = serialize(error, is_error=True)
        freed = []
        with self._cond:
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
        excess = self.shm_bytes + self.pool.bytes + size - self.capacity
        if excess <= 0:
            return
        excess -= self.pool.trim(excess)
        for object_id in list(self._lru):
            if excess <= 0:
                break
            entry = self._lru.pop(object_id)
            if self._objects.get(object_id) is not entry or entry.spilled:
                continue
            if object_id in self._pins:
                self._lru[object_id] = entry  # in use by a running task: keep, look again later
                continue
            self._spill(object_id, entry)
            excess -= entry.size
        if excess > 0:
            raise exc.ObjectStoreFullError(
                f"cannot store an object of {size} bytes: the object store holds "
                f"{self.shm_bytes} bytes of {self.capacity} (object_store_memory) in objects "
                f"that cannot be spilled")

    def _spill(self, object_id: bytes, entry: ShmEntry) -> None:
        path = os.path.join(self._spill_dir(), entry.name)
        shutil.copyfile(shm.segment_path(entry.name), path)
        seg = self._writers.pop(object_id, None)
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
            shutil.copyfile(path, shm.segment_path(entry.name))
            _remove(path)
            entry.spilled = None
            self.spilled_bytes -= entry.size
            self.shm_bytes += entry.size
            self._lru[object_id] = entry

    def stats(self) -> dict:
        return {"num_objects": len(self._objects), "shm_bytes": self.shm_bytes,
                "spilled_bytes": self.spilled_bytes, "pool_bytes": self.pool.bytes,
                "capacity": self.capacity}

    def close(self) -> None:
        super().close()
        with self._space:
            for seg in self._writers.values():
                seg.close()
            self._writers.clear()
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

"""Objects in shared memory: one file in /dev/shm per large object.

Layout of a segment::

    8 bytes   b"BMLT" + u32 length of the header
    header    pickle of (data_offset, data_length, [(offset, length), ...], is_error, refs)
    ...       the pickle stream and the out-of-band buffers, each 64-byte aligned

Readers map the file read-only and hand the buffers to pickle as memoryviews
of the mapping, so numpy arrays come back as read-only views with no copy. A
mapping keeps the object alive: `read_object` takes a reference for it, and a
finalizer drops the reference when the last view of the mapping is gone, so
a segment is never freed (or reused) under a live view.

Writers reuse freed segments from a `SegmentPool` when one is big enough:
their pages are already allocated and mapped, so a large put runs at memcpy
speed instead of paying a page fault per 4 KiB.
"""
from __future__ import annotations

import mmap
import os
import pickle
import struct
import threading
import weakref
from typing import Callable

from ...core.serialization import SerializedObject

SHM_DIR = "/dev/shm"
_MAGIC = b"BMLT"
_PREFIX = struct.Struct("<4sI")
_ALIGN = 64


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def segment_name(session: str, object_id: bytes) -> str:
    return f"beamlet-{session}-{object_id.hex()}"


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def layout(sobj: SerializedObject) -> tuple[bytes, int, list]:
    """The header bytes, total size and [(offset, buffer)] placement of `sobj`."""
    buffers = [memoryview(b).cast("B") for b in sobj.buffers]
    # The header size depends on the offsets; two passes settle it.
    header = b""
    for _ in range(2):
        pos = _align(_PREFIX.size + len(header) + 16)
        data_off = pos
        pos = _align(pos + len(sobj.data))
        places = []
        for buf in buffers:
            places.append((pos, buf.nbytes))
            pos = _align(pos + buf.nbytes)
        header = pickle.dumps((data_off, len(sobj.data), places, sobj.is_error, sobj.refs), 5)
    total = max(pos, _ALIGN)
    return header, total, [(data_off, sobj.data)] + [(off, buf) for (off, _), buf in zip(places, buffers)]


# Buffers at least this big are copied by several threads: one thread's memcpy
# does not saturate the memory bus (a 100 MB copy into warm shared memory
# measured here: ~10.8 GB/s with one thread, ~13-15 with four; eight were no better).
PARALLEL_COPY_MIN = 8 << 20
_COPY_THREADS = 4
_copy_pool = None
_copy_pool_lock = threading.Lock()


def _parallel_copy(dst: memoryview, src) -> None:
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="beamlet-copy")
    d = np.frombuffer(dst, dtype=np.uint8)
    s = np.frombuffer(src, dtype=np.uint8)
    step = -(-len(d) // _COPY_THREADS)
    # numpy releases the GIL for a plain copy, so the chunks really run at once.
    futures = [_copy_pool.submit(np.copyto, d[i:i + step], s[i:i + step])
               for i in range(0, len(d), step)]
    for future in futures:
        future.result()


def write_into(view: memoryview, header: bytes, pieces: list) -> None:
    view[:_PREFIX.size] = _PREFIX.pack(_MAGIC, len(header))
    view[_PREFIX.size:_PREFIX.size + len(header)] = header
    for off, piece in pieces:
        n = len(piece) if isinstance(piece, bytes) else piece.nbytes
        if n >= PARALLEL_COPY_MIN:
            _parallel_copy(view[off:off + n], piece)
        else:
            view[off:off + n] = piece


class Segment:
    """A writable mapping of one segment file, kept by its writer for reuse."""

    __slots__ = ("name", "size", "mm")

    def __init__(self, name: str, size: int, mm: mmap.mmap):
        self.name = name
        self.size = size
        self.mm = mm

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view still exists; the mapping goes with it
            pass


def create_segment(name: str, size: int) -> Segment:
    fd = os.open(segment_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return Segment(name, size, mm)


class SegmentPool:
    """Freed segments kept allocated and mapped for reuse by later puts.

    Bounded by `capacity` bytes; `take` hands out the smallest segment that
    fits (and is not more than twice too big), renamed to the new object's name.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.bytes = 0
        self._free: list[Segment] = []
        self._lock = threading.Lock()

    def give(self, segment: Segment) -> bool:
        """Keep `segment` (its file is still named for the freed object); False if full."""
        with self._lock:
            if segment.size > self.capacity - self.bytes:
                return False
            self._free.append(segment)
            self.bytes += segment.size
            return True

    def take(self, name: str, size: int) -> Segment | None:
        with self._lock:
            best = None
            for seg in self._free:
                if size <= seg.size <= 2 * size and (best is None or seg.size < best.size):
                    best = seg
            if best is None:
                return None
            self._free.remove(best)
            self.bytes -= best.size
        os.rename(segment_path(best.name), segment_path(name))
        best.name = name
        return best

    def trim(self, nbytes: int) -> int:
        """Unlink pooled segments until `nbytes` are released; returns the bytes released."""
        released = 0
        with self._lock:
            while self._free and released < nbytes:
                seg = self._free.pop(0)
                self.bytes -= seg.size
                released += seg.size
                _discard(seg)
        return released

    def clear(self) -> None:
        self.trim(self.bytes + 1)


def _discard(seg: Segment) -> None:
    seg.close()
    try:
        os.unlink(segment_path(seg.name))
    except FileNotFoundError:
        pass


def write_object(name: str, sobj: SerializedObject, pool: SegmentPool | None = None) -> Segment:
    """Write `sobj` to a segment named `name` (from the pool when one fits)."""
    header, total, pieces = layout(sobj)
    seg = pool.take(name, total) if pool is not None else None
    if seg is None:
        seg = create_segment(name, total)
    write_into(memoryview(seg.mm), header, pieces)
    return seg


def read_object(name: str, on_unmap: Callable[[], None] | None = None) -> SerializedObject:
    """Map segment `name` read-only and return its object, buffers zero-copy.

    `on_unmap` runs once the mapping (and every view of it) is gone.
    Raises FileNotFoundError if the segment does not exist.
    """
    fd = os.open(segment_path(name), os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    view = memoryview(mm)
    magic, hlen = _PREFIX.unpack_from(view, 0)
    if magic != _MAGIC:
        raise ValueError(f"segment {name} is not a beamlet object")
    data_off, data_len, places, is_error, refs = pickle.loads(view[_PREFIX.size:_PREFIX.size + hlen])
    data = view[data_off:data_off + data_len]
    buffers = [view[off:off + n] for off, n in places]
    if on_unmap is not None:
        weakref.finalize(mm, on_unmap)
    return SerializedObject(data, buffers, refs, is_error)


def unlink(name: str) -> None:
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        pass


def remove_session_segments(session: str) -> int:
    """Unlink every segment of a session (cleanup after a crash); returns how many."""
    prefix = f"beamlet-{session}-"
    count = 0
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for entry in names:
        if entry.startswith(prefix):
            unlink(entry)
            count += 1
    return count

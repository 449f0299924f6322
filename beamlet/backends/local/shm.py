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

Segment names are ``beamlet-{session}-{random}``: a random part per segment
(never derived from the object id), so another user of the machine cannot
guess a name and create the file first. Every segment is created O_EXCL with
mode 0600; a name found taken is retried with a fresh one. Only the object
store's owner creates segments (`create_segment`, `create_unmapped`); a
worker fills one it was given (`fill_segment`).

Writers reuse freed segments from a `SegmentPool` when one is big enough:
their pages are already allocated and mapped, so a large put runs at memcpy
speed instead of paying a page fault per 4 KiB.
"""
from __future__ import annotations

import mmap
import os
import pickle
import secrets
import struct
import threading
import weakref
from typing import Callable, Iterable, Iterator, TypeVar

from ... import exceptions as exc
from ...core.serialization import SerializedObject

T = TypeVar("T")

SHM_DIR = "/dev/shm"
_MAGIC = b"BMLT"
_PREFIX = struct.Struct("<4sI")
_ALIGN = 64


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


#: How many taken names in a row `claim_name` tries before it gives up. With
#: 128 random bits per name one collision is already a sign of tampering.
NAME_ATTEMPTS = 16


def segment_prefix(session: str) -> str:
    """Every segment of `session` is named with this prefix (and nothing else is)."""
    return f"beamlet-{session}-"


def fresh_names(session: str) -> Iterator[str]:
    """Endless new segment names for `session`, each with 128 random bits."""
    prefix = segment_prefix(session)
    while True:
        yield prefix + secrets.token_hex(16)


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def claim_name(names: Iterable[str], claim: Callable[[str], T]) -> tuple[str, T]:
    """Call ``claim(path)`` for the paths of `names` in turn until one does not
    raise FileExistsError (that name was taken: by a stale file or another
    user); returns (name, what claim returned). Raises BackendError after
    NAME_ATTEMPTS taken names, never FileExistsError."""
    for attempt, name in enumerate(names):
        if attempt >= NAME_ATTEMPTS:
            break
        try:
            return name, claim(segment_path(name))
        except FileExistsError:
            continue
    raise exc.BackendError(f"no free shared-memory segment name after {NAME_ATTEMPTS} "
                           f"attempts in {SHM_DIR}: every name tried was taken")


def _open_new(path: str) -> int:
    return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)


def _link_new(source: str) -> Callable[[str], None]:
    return lambda path: os.link(source, path)  # fails with EEXIST, unlike rename


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


def _new_file(session: str, size: int, names: Iterable[str] | None = None) -> tuple[str, int]:
    name, fd = claim_name(names if names is not None else fresh_names(session), _open_new)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    return name, fd


def create_segment(session: str, size: int) -> Segment:
    """A new segment of `size` bytes under a fresh name, mapped writable (and
    faulted in at once, MAP_POPULATE: it is about to be written whole)."""
    name, fd = _new_file(session, size)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)
    return Segment(name, size, mm)


def create_unmapped(session: str, size: int, names: Iterable[str] | None = None) -> str:
    """A new segment of `size` bytes (not mapped here) for another process to
    fill; its name (from `names`, default `fresh_names(session)`)."""
    name, fd = _new_file(session, size, names)
    os.close(fd)
    return name


def rename_fresh(session: str, name: str) -> str:
    """Give segment `name` a fresh name (readers holding the old name then find
    nothing, rather than another object's data); returns the new name."""
    new, _ = claim_name(fresh_names(session), _link_new(segment_path(name)))
    unlink(name)
    return new


def copy_to_new_segment(session: str, path: str) -> str:
    """A new segment holding a copy of the file at `path`; its name."""
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        name, fd = _new_file(session, size)
        try:
            offset = 0
            while offset < size:
                sent = os.sendfile(fd, src.fileno(), offset, size - offset)
                if not sent:
                    raise OSError(f"{path} ended after {offset} of {size} bytes")
                offset += sent
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
    return name


class SegmentPool:
    """Freed segments kept allocated and mapped for reuse by later puts.

    Bounded by `capacity` bytes; `take` hands out the smallest segment that
    fits (and is not more than twice too big), under a fresh name.
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

    def take(self, session: str, size: int) -> Segment | None:
        """A pooled segment of at least `size` bytes (renamed fresh), or None."""
        with self._lock:
            best = None
            for seg in self._free:
                if size <= seg.size <= 2 * size and (best is None or seg.size < best.size):
                    best = seg
            if best is None:
                return None
            self._free.remove(best)
            self.bytes -= best.size
        try:
            best.name = rename_fresh(session, best.name)
        except BaseException:
            discard(best)
            raise
        return best

    def trim(self, nbytes: int) -> int:
        """Unlink pooled segments until `nbytes` are released; returns the bytes released."""
        released = 0
        with self._lock:
            while self._free and released < nbytes:
                seg = self._free.pop(0)
                self.bytes -= seg.size
                released += seg.size
                discard(seg)
        return released

    def clear(self) -> None:
        self.trim(self.bytes + 1)


def discard(seg: Segment) -> None:
    seg.close()
    try:
        os.unlink(segment_path(seg.name))
    except FileNotFoundError:
        pass


def fill_segment(name: str, header: bytes, total: int, pieces: list) -> None:
    """Write a laid-out object (see `layout`) into the existing segment `name`,
    which must hold at least `total` bytes."""
    fd = os.open(segment_path(name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < total:
            raise ValueError(f"segment {name} holds {size} bytes, {total} needed")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        write_into(memoryview(mm), header, pieces)
    finally:
        try:
            mm.close()
        except BufferError:  # a view of it is still referenced (an exception's frame)
            pass


def read_object(name: str, on_unmap: Callable[[], None] | None = None) -> SerializedObject:
    """Map segment `name` read-only and return its object, buffers zero-copy.

    `on_unmap` runs once the mapping (and every view of it) is gone.
    Raises FileNotFoundError if the segment does not exist.
    """
    return object_from_view(map_segment(name, on_unmap), name)


def map_segment(name: str, on_unmap: Callable[[], None] | None = None) -> memoryview:
    """A read-only view of all of segment `name` (for copying it elsewhere as it
    is: see `used_size`). `on_unmap` runs once every view of it is gone.
    Raises FileNotFoundError if the segment does not exist."""
    fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    if on_unmap is not None:
        weakref.finalize(mm, on_unmap)
    return memoryview(mm)


def _header(view, name: str) -> tuple:
    magic, hlen = _PREFIX.unpack_from(view, 0)
    if magic != _MAGIC:
        raise ValueError(f"segment {name} is not a beamlet object")
    return pickle.loads(view[_PREFIX.size:_PREFIX.size + hlen])


def used_size(view) -> int:
    """How many leading bytes of a segment's view hold its object (a segment
    reused from the pool may be larger): a copy of those bytes is the object."""
    data_off, data_len, places, _, _ = _header(view, "?")
    return max([data_off + data_len] + [off + n for off, n in places])


def object_from_view(view: memoryview, name: str = "(copy)") -> SerializedObject:
    """The object laid out in `view` (a segment's bytes, or a copy of them),
    its data and buffers views of `view` (no copy)."""
    data_off, data_len, places, is_error, refs = _header(view, name)
    data = view[data_off:data_off + data_len]
    buffers = [view[off:off + n] for off, n in places]
    return SerializedObject(data, buffers, refs, is_error)


def unlink(name: str) -> None:
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        pass


def remove_session_segments(session: str) -> int:
    """Unlink every segment of a session (cleanup after a crash); returns how many."""
    prefix = segment_prefix(session)
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

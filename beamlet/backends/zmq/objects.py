"""Moving objects between a cluster's processes: a node serves ``Pull``
requests from its store, and the puller (another node, or a driver's get)
assembles the pieces.

An object goes as its shared-memory layout (``local/shm.py``: a header, the
pickle stream, the buffers), cut by ``transport.chunks`` into pieces that
are views of the sender's mapping: nothing is pickled again on the way out,
each piece is encrypted from the mapping into the message sent
(``send_piece``), and the puller decrypts (and authenticates) it at its
offset straight into a segment of its own store. A piece that does not
authenticate fails the transfer (its segment is dropped, never read) and
closes that connection. A small object kept inline is laid out into a
buffer first, the same way.

`Puller` is a node's side of pulling: one connection and one reader thread
per node it pulls from, made on first use. (Its store reuses freed segments
of the same size class, already mapped and faulted in.) A driver, which has
no store, pulls into a `BufferPool`'s buffers: anonymous memory faulted in
at once when new, and reused once every view of an object pulled into it
is gone.
"""
from __future__ import annotations

import collections
import ctypes
import mmap
import sys
import threading
import weakref
from typing import Callable

import zmq

from ... import exceptions as exc
from ...core.serialization import serialize
from ..local import shm
from . import protocol as P
from .transport import Piece, chunks

CONNECT_TIMEOUT = 5.0  # seconds to reach a node to pull from
SEND_WINDOW = 8  # sealed pieces a serving node lets wait in the transport
READ_SLICE = 0.5  # seconds a reader waits for a message before it looks whether to stop


def serve_pull(store, conn, object_ids, done: Callable | None = None) -> None:
    """Send `conn` each of `object_ids` held in `store` (a LocalObjectStore) in
    ``Chunk`` pieces, from a thread of its own (the caller goes on at once);
    ``Missing`` for those it does not hold. Each piece is sealed from the
    object's mapping, which stays mapped (and the object alive) meanwhile; at
    most `SEND_WINDOW` sealed pieces wait in the transport at a time, so
    serving an object does not hold a second copy of it in memory. That
    thread calls `done()` once it is over (sent, or the puller left)."""
    threading.Thread(target=_serve, args=(store, conn, list(object_ids), done),
                     name="beamlet-serve-pull", daemon=True).start()


def _serve(store, conn, object_ids, done) -> None:
    try:
        _send_objects(store, conn, object_ids)
    except exc.BackendError:
        pass  # the puller left (or this node is closing)
    finally:
        if done is not None:
            done()


def _send_objects(store, conn, object_ids) -> None:
    missing = []
    for object_id in object_ids:
        held = store.segment_view(object_id)
        if held is None:
            if not store.contains(object_id):
                missing.append(object_id)
                continue
            try:
                sobj = store.get([object_id], 0)[0]
            except exc.BeamletError:
                missing.append(object_id)
                continue
            header, size, pieces = shm.layout(sobj)
            view = memoryview(bytearray(size))
            shm.write_into(view, header, pieces)
            is_error, refs = sobj.is_error, tuple(sobj.refs)
        else:
            view, is_error, refs = held
        total = shm.used_size(view)
        in_flight: collections.deque = collections.deque()
        for offset, piece in chunks(view[:total]):
            if len(in_flight) >= SEND_WINDOW and not _sent(in_flight.popleft(), conn):
                return
            in_flight.append(conn.send_piece(P.Chunk(object_id, offset, total, is_error, refs,
                                                     None), piece, track=True))
        view = held = piece = None  # (unmapped once the transport lets go too)
    if missing:
        conn.send(P.Missing(missing))


def as_chunk(message):
    """A received `Piece` whose header is a ``Chunk``, as that Chunk (its data
    the Piece); any other message as it is."""
    if type(message) is Piece and type(message.header) is P.Chunk:
        return message.header._replace(data=message)
    return message


def _sent(tracker, conn) -> bool:
    """Wait until a tracked piece has left; False if its connection closed
    first (a peer that stops reading is closed by the transport's heartbeats)."""
    while not tracker.done:
        if conn.closed:
            return False
        try:
            tracker.wait(READ_SLICE)
        except zmq.NotDone:
            pass
    return True


class Assembly:
    """One object arriving in pieces, written into `target` (a writable buffer
    of at least `total` bytes: a bytearray, or a segment's mapping)."""

    __slots__ = ("target", "view", "total", "received")

    def __init__(self, target, total: int):
        self.target = target
        self.view = memoryview(target)
        self.total = total
        self.received = 0

    def add(self, chunk: P.Chunk) -> bool:
        """Write a piece (its `data` a buffer, or a `Piece` to decrypt into
        place: ProtocolError if it does not authenticate); whether the object
        is complete."""
        n = chunk.data.nbytes
        if chunk.offset < 0 or chunk.offset + n > self.total:
            raise ValueError(f"a piece at {chunk.offset} of {n} bytes lies outside the "
                             f"object's {self.total}")
        if type(chunk.data) is Piece:
            chunk.data.read_into(self.view[chunk.offset:chunk.offset + n])
        else:
            self.view[chunk.offset:chunk.offset + n] = chunk.data
        self.received += n
        return self.received >= self.total

    def release(self) -> None:
        self.view.release()


class BufferPool:
    """Writable buffers for objects a driver pulls, kept for reuse.

    A buffer `take` hands out is a view whose memory (a private anonymous
    mapping, faulted in at once with MAP_POPULATE when new: one kernel pass
    instead of a fault per 4 KiB page) comes back to the pool when the last
    view of it (the object, numpy arrays made from it) is gone; the pool
    keeps at most `capacity` bytes of such free memory and hands out the
    smallest free buffer that fits (and is at most twice too big). Nothing of
    it is a file: `close` unmaps what is free, the rest goes with its views."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.bytes = 0
        self._free: list[mmap.mmap] = []
        self._lock = threading.RLock()  # (a finalizer may run inside `take`)
        self.closed = False

    def take(self, size: int) -> memoryview:
        """A writable byte view of `size` bytes (contents undefined)."""
        with self._lock:
            best = None
            for mm in self._free:
                if size <= len(mm) <= 2 * size and (best is None or len(mm) < len(best)):
                    best = mm
            if best is not None:
                self._free.remove(best)
                self.bytes -= len(best)
        if best is None:
            best = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                             | getattr(mmap, "MAP_POPULATE", 0))
        holder = (ctypes.c_char * size).from_buffer(best)
        weakref.finalize(holder, self._give, best)
        return memoryview(holder).cast("B")

    def _give(self, mm: mmap.mmap) -> None:
        with self._lock:
            if not self.closed and self.bytes + len(mm) <= self.capacity:
                self._free.append(mm)
                self.bytes += len(mm)
        # Else not kept: it is unmapped as the dying view lets go of it, just
        # after this finalizer (which runs while that view still exports it,
        # so closing it here would raise BufferError).

    def close(self) -> None:
        with self._lock:
            self.closed = True
            free, self._free, self.bytes = self._free, [], 0
        for mm in free:
            mm.close()


class Puller:
    """A node's pulls from other nodes into its store.

    `pull(address, ids)` asks the node at `address` for objects; each one that
    arrives whole is stored and reported to `arrived(object_id, size, is_error,
    refs)`; the ids a node does not hold, or that were in flight when its
    connection dropped, go to `failed(object_ids)`. Thread-safe."""

    def __init__(self, transport, store, arrived: Callable, failed: Callable):
        self.transport = transport
        self.store = store
        self.arrived = arrived
        self.failed = failed
        self.lock = threading.Lock()
        self.sources: dict[str, _Source] = {}
        self.closed = False

    def pull(self, address: str, object_ids, claim: bool = False) -> None:
        """Ask the node at `address` for these (`claim`: each once it is made
        there, ``Claim``; else what it holds now, ``Pull``)."""
        with self.lock:
            if self.closed:
                return
            source = self.sources.get(address)
            if source is None or not source.want(object_ids, claim):  # (none yet, or it died)
                source = self.sources[address] = _Source(self, address)
                source.want(object_ids, claim)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            sources, self.sources = list(self.sources.values()), {}
        for source in sources:
            source.stop()


class _Source:
    """One node pulled from: its connection and the thread that reads it."""

    def __init__(self, puller: Puller, address: str):
        self.puller = puller
        self.address = address
        self.lock = threading.Lock()
        self.wanted: set[bytes] = set()  # asked for, not yet complete
        self.incoming: dict[bytes, tuple[Assembly, object]] = {}
        self.queue: list = []  # ids to ask for once connected
        self.claims: list = []  # ids to claim once connected
        self.conn = None
        self.dead = False
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="beamlet-pull", daemon=True)
        self.thread.start()

    def want(self, object_ids, claim: bool = False) -> bool:
        """Ask for these (`claim`: once made there); False if this source's
        connection is gone (ask a new one)."""
        with self.lock:
            if self.dead:
                return False
            new = [i for i in object_ids if i not in self.wanted]
            self.wanted.update(new)
            if self.conn is None:
                (self.claims if claim else self.queue).extend(new)
                return True
        if new:
            self._send(P.Claim(new) if claim else P.Pull(new))
        return True

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except exc.BackendError:
            pass  # the reader sees the connection drop

    def _run(self) -> None:
        try:
            conn = self.puller.transport.connect(self.address, timeout=CONNECT_TIMEOUT)
        except Exception as err:  # noqa: BLE001 - whatever it was, the wanted ones failed
            print(f"beamlet: cannot pull objects from {self.address}: {err}",
                  file=sys.stderr, flush=True)
            self._end()
            return
        with self.lock:
            self.conn = conn
            queued, self.queue = self.queue, []
            claims, self.claims = self.claims, []
        if queued:
            self._send(P.Pull(queued))
        if claims:
            self._send(P.Claim(claims))
        try:
            while not self.stopping:
                try:
                    message = conn.recv(timeout=READ_SLICE)
                except exc.GetTimeoutError:
                    continue
                self._handle(message)
        except EOFError:
            pass
        except Exception as err:  # noqa: BLE001 - a broken peer is a gone peer
            if not self.stopping:
                print(f"beamlet: pulling from {self.address} failed: {err!r}",
                      file=sys.stderr, flush=True)
        finally:
            conn.close()
            self._end()

    def _handle(self, message) -> None:
        message = as_chunk(message)
        kind = type(message)
        if kind is P.Chunk:
            self._chunk(message)
        elif kind is P.Missing:
            with self.lock:
                ids = [i for i in message.object_ids if i in self.wanted]
                self.wanted.difference_update(ids)
            if ids:
                self.puller.failed(ids)
        else:
            raise ValueError(f"{P.describe(message)} is not an answer to a pull")

    def _chunk(self, chunk: P.Chunk) -> None:
        store = self.puller.store
        object_id = chunk.object_id
        if object_id not in self.wanted:
            return
        got = self.incoming.get(object_id)
        if got is None:
            try:
                seg = store.reserve(chunk.total)
            except exc.ObjectStoreFullError as err:  # (whoever reads it is told why)
                with self.lock:
                    self.wanted.discard(object_id)
                store.put(object_id, serialize(err, is_error=True))
                return
            got = self.incoming[object_id] = (Assembly(seg.mm, chunk.total), seg)
        assembly, seg = got
        if not assembly.add(chunk):
            return
        del self.incoming[object_id]
        assembly.release()
        with self.lock:
            self.wanted.discard(object_id)
        store.commit(object_id, seg, chunk.is_error, chunk.refs)
        self.puller.arrived(object_id, chunk.total, chunk.is_error, chunk.refs)

    def _end(self) -> None:
        """The connection is gone: what was wanted failed."""
        store = self.puller.store
        with self.lock:
            self.dead = True
            failed = list(self.wanted)
            self.wanted.clear()
            incoming, self.incoming = self.incoming, {}
        for assembly, seg in incoming.values():
            assembly.release()
            store.abandon(seg)
        if failed and not self.stopping:
            self.puller.failed(failed)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(READ_SLICE * 4 + CONNECT_TIMEOUT)

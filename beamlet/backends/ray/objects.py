"""RayObjectStore: beamlet objects as Ray objects, one Ray ObjectRef per id this process holds.

Each process keeps the Ray ObjectRef of every beamlet id its Runtime
references (made when the process submits or puts the object, or learnt when
a value naming the id reaches it) and drops it in `delete`, when the
Runtime's count for the id reaches zero: Ray's own distributed reference
counting then frees the object once no process holds it.

The Ray value under an id is the beamlet ``SerializedObject`` itself, or
only its pickle stream (``bytes``) when it has no buffers, refs or error (the
common small value: Ray passes bytes through without pickling them again,
where pickling a ``SerializedObject`` costs it some 50-100 us). Its
out-of-band buffers (numpy arrays' data) go to Ray as ``PickleBuffer``s
(`_OutOfBand`), which Ray's serializer writes into its object store and
hands back to a reader as read-only views of it: ``get`` of a large array
is zero-copy and read-only, as Ray's own and beamlet's local backend's are.
When the value contains beamlet refs, the Ray value is ``(SerializedObject, {id: Ray
ObjectRef}, {actor id: (creation id, Ray ActorHandle)})``: the Ray refs and
actor handles travel beside the ids they stand for, so Ray counts them as
borrowed wherever the value goes, and a reader learns them with the value
(`unpack`). Refs nested in a task's inline arguments travel the same way
(`carried`). An id that reaches a process by no such way (a bare id) reads
back as ``ObjectLostError``.

A Ray-level failure (a cancelled task, a crashed worker, a dead actor, a
lost object) reads back as the beamlet error of that failure (`error_of`).
"""
from __future__ import annotations

import contextlib
import contextvars
import operator
import pickle
import queue
import threading
from typing import Callable, Iterable, Sequence

import ray as _ray
import ray.exceptions as _rex

from ... import exceptions as exc
from ...core.generators import closed_id, end_marker, item_id, stream_prefix
from ...core.interfaces import ObjectStore
from ...core.runtime import deadline, remaining
from ...core.serialization import SerializedObject, serialize
from . import threads


_RayDynamic = _ray.DynamicObjectRefGenerator
_IS_ERROR = operator.attrgetter("is_error")
_DYNAMIC_TIMEOUT = 60.0


class _Stream:
    """A generator call this process consumes: Ray's ObjectRefGenerator, and
    how many refs were taken from it (items ``0..taken-1`` are in ``_refs``
    while referenced)."""

    __slots__ = ("stream_id", "prefix", "generator", "taken", "ended", "lock")

    def __init__(self, stream_id: bytes, generator):
        self.stream_id = stream_id
        self.prefix = stream_prefix(stream_id)
        self.generator = generator
        self.taken = 0
        self.ended = False
        self.lock = threading.Lock()


#: What `entry` answers for a value read here that is not an error.
_READ_OK = SerializedObject(b"")
_NOTHING_PROVIDED = contextlib.nullcontext()


class _OutOfBand:
    """A SerializedObject with buffers, as Ray stores it: unpickled by Ray as
    that SerializedObject again, its buffers Ray's read-only views of the
    stored object. (Ray copies the buffers into its store during ``ray.put``
    or as the task returns, so the caller's arrays need no copy of their own
    first: changing them later changes nothing stored.)"""

    __slots__ = ("sobj",)

    def __init__(self, sobj: SerializedObject):
        self.sobj = sobj

    def __reduce__(self):
        sobj = self.sobj
        return (SerializedObject, (sobj.data, [pickle.PickleBuffer(b) for b in sobj.buffers],
                                   sobj.refs, sobj.is_error))


def error_of(err: BaseException, what: str = "") -> BaseException:
    """The beamlet exception for a Ray exception raised by ``ray.get`` of `what`."""
    text = f"{what}: {err}" if what else str(err)
    if isinstance(err, _rex.TaskPlacementGroupRemoved):
        return exc.TaskPlacementGroupRemoved(text)
    if isinstance(err, _rex.ActorPlacementGroupRemoved):
        return exc.ActorDiedError(f"the actor is dead: its placement group was removed ({text})")
    if isinstance(err, _rex.TaskCancelledError):
        return exc.TaskCancelledError(text)
    if isinstance(err, _rex.ActorUnavailableError):
        return exc.ActorUnavailableError(text)
    if isinstance(err, _rex.RayActorError):
        return exc.ActorDiedError(text)
    if isinstance(err, _rex.OwnerDiedError):
        return exc.OwnerDiedError(text)
    if isinstance(err, _rex.ObjectFreedError):
        return exc.ObjectFreedError(text)
    if isinstance(err, _rex.ObjectReconstructionFailedError):
        return exc.ObjectReconstructionFailedError(text)
    if isinstance(err, _rex.ObjectLostError):
        return exc.ObjectLostError(text)
    if isinstance(err, _rex.WorkerCrashedError):
        return exc.WorkerCrashedError(text)
    if isinstance(err, _rex.NodeDiedError):
        return exc.NodeDiedError(text)
    if isinstance(err, _rex.OutOfMemoryError):
        return exc.OutOfMemoryError(text)
    if isinstance(err, _rex.RuntimeEnvSetupError):
        return exc.RuntimeEnvSetupError(text)
    if isinstance(err, _rex.RayTaskError):
        # Our own wrapper code failed (user code's errors are stored as values).
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
        return exc.TaskError(what or "beamlet task", str(err), cause, getattr(err, "pid", None))\
            .as_instanceof_cause()
    return exc.BackendError(f"Ray failed to compute {what or 'an object'}: "
                            f"{type(err).__name__}: {err}")


class RayObjectStore(ObjectStore):
    """The ObjectStore of one process (driver or Ray worker) on Ray."""

    def __init__(self, refs, death_of: Callable[[bytes], str | None] | None = None,
                 in_worker: bool = False):
        """`refs`: the Runtime's ReferenceCounter; `death_of(actor_id)`: that the
        actor is dead and why, as beamlet recorded it (None if it did not), so
        that a call to it fails saying so rather than Ray's account of its process.
        `in_worker`: this process is a Ray worker (see `entry`)."""
        self._counter = refs
        self._in_worker = in_worker
        self._death_of = death_of
        self._calls: dict[bytes, bytes] = {}  # return id of an actor call -> actor id
        self._lock = threading.Lock()
        self._refs: dict[bytes, object] = {}        # id -> Ray ObjectRef
        #: Actors this process holds a handle to: actor id -> Ray ActorHandle, and
        #: the id of each one's creation ref (its "token", which keeps it alive).
        self.actors: dict[bytes, object] = {}
        self.tokens: dict[bytes, bytes] = {}          # creation ref id -> actor id
        #: actor id -> {method name: its Ray ActorMethod} (scheduler._submit_direct),
        #: held as long as the actor's handle in `actors` (each holds the handle).
        self.methods: dict[bytes, dict] = {}
        #: Values Ray resolved for the task running in this context (its
        #: arguments): per thread, and per asyncio task in an async actor.
        self._local: contextvars.ContextVar[dict] = contextvars.ContextVar("beamlet_ray_args",
                                                                           default={})
        #: id of an object read here -> the ids it contains, counted while we hold it.
        self._contained: dict[bytes, tuple] = {}
        #: id of an object read here -> its value if an error, else _READ_OK (`entry`).
        self._read: dict[bytes, SerializedObject] = {}
        self._callbacks: queue.SimpleQueue | None = None
        self._closed = False
        #: Streams this process consumes: item prefix (and closed id) -> _Stream.
        self._streams: dict[bytes, _Stream] = {}

    # -- Ray refs --------------------------------------------------------------------
    def adopt(self, object_ids: Sequence[bytes], ray_refs: Sequence,
              actor_id: bytes | None = None) -> None:
        """Hold the Ray refs of objects this process just submitted (the results
        of a call to `actor_id`, if given)."""
        with self._lock:
            self._refs.update(zip(object_ids, ray_refs))
            if actor_id is not None:
                self._calls.update(dict.fromkeys(object_ids, actor_id))

    def adopt_call(self, object_id: bytes, ray_ref, actor_id: bytes) -> None:
        """`adopt` of the one result of a call to `actor_id`."""
        with self._lock:
            self._refs[object_id] = ray_ref
            self._calls[object_id] = actor_id

    def note_method(self, actor_id: bytes, handle, name: str, method) -> None:
        """Keep `method`, the Ray ActorMethod `name` of the actor's Ray `handle`,
        while this process holds that handle (else nothing: it would keep the
        actor alive)."""
        with self._lock:
            if self.actors.get(actor_id) is handle:
                self.methods.setdefault(actor_id, {})[name] = method

    def adopt_one(self, object_id: bytes, ray_ref) -> None:
        """`adopt` of a task's one result."""
        with self._lock:
            self._refs[object_id] = ray_ref

    def adopt_stream(self, stream_id: bytes, generator) -> None:
        """Hold the Ray ObjectRefGenerator of a generator call this process just
        submitted: the stream's id stands for its ``completed()`` ref, and item
        ``i`` (``generators.item_id``) for the ``i``-th ref it gives."""
        stream = _Stream(stream_id, generator)
        with self._lock:
            self._refs[stream_id] = generator.completed()
            self._streams[stream.prefix] = stream
            self._streams[closed_id(stream_id)] = stream

    def _stream_of(self, object_id: bytes) -> "_Stream | None":
        return self._streams.get(object_id[:-8]) if self._streams else None

    def _pull(self, object_id: bytes, timeout: float | None) -> bool:
        """Take refs from the stream `object_id` is an item of, until that item's
        (or the stream's end); whether it is known now. Waits up to `timeout`."""
        stream = self._stream_of(object_id)
        if stream is None:
            return False
        index = int.from_bytes(object_id[-8:], "little")
        until = deadline(timeout)
        with stream.lock:
            while stream.taken <= index and not stream.ended:
                generator = stream.generator
                if generator is None:  # (the consumer is gone: nothing more comes)
                    return False
                try:
                    ref = generator._next_sync(remaining(until))
                except StopIteration:
                    stream.ended = True
                    break
                if ref.is_nil():
                    return False
                with self._lock:
                    self._refs[item_id(stream.stream_id, stream.taken)] = ref
                stream.taken += 1
        with self._lock:
            return object_id in self._refs or (stream.ended and index >= stream.taken)

    def _end_of(self, object_id: bytes):
        """For an item past the end of its (ended) stream: a Ray ref holding the
        end-of-stream marker (Ray ends a failed call's stream with its error,
        without beamlet's marker). None for any other id."""
        stream = self._stream_of(object_id)
        if stream is None or not stream.ended or \
                int.from_bytes(object_id[-8:], "little") < stream.taken:
            return None
        return _ray.put(end_marker())

    def adopt_actor(self, actor_id: bytes, token_id: bytes, handle) -> None:
        with self._lock:
            if self.actors.get(actor_id) is not handle:
                self.methods.pop(actor_id, None)
            self.actors[actor_id] = handle
            self.tokens[token_id] = actor_id

    def held_ref(self, object_id: bytes):
        """The Ray ObjectRef this process holds for `object_id` (None: none)."""
        with self._lock:
            return self._refs.get(object_id)

    def ray_ref(self, object_id: bytes):
        """The Ray ObjectRef of `object_id`; for an id this process never learnt, a
        Ray object holding ``ObjectLostError``."""
        with self._lock:
            ref = self._refs.get(object_id)
        if ref is None and self._streams and self._pull(object_id, 0):
            with self._lock:
                ref = self._refs.get(object_id)
            if ref is None:
                ref = self._end_of(object_id)
        if ref is None:
            ref = _ray.put(serialize(self._lost(object_id), is_error=True))
        return ref

    def fail(self, object_ids: Sequence[bytes], error: BaseException) -> None:
        """Make `error` the value of each id (a submission that cannot reach Ray)."""
        sobj = serialize(error, is_error=True)
        self.adopt(object_ids, [_ray.put(sobj) for _ in object_ids])

    @staticmethod
    def _lost(object_id: bytes) -> exc.ObjectLostError:
        return exc.ObjectLostError(f"object {object_id.hex()} is unknown in this process: its "
                                   f"ref reached it without the Ray ref that stands for it, or "
                                   f"it was freed")

    def carried(self, object_ids: Iterable[bytes]) -> tuple[dict, dict]:
        """The Ray refs and actor handles standing for `object_ids` (refs inside a
        value), to travel beside it."""
        refs, actors = {}, {}
        with self._lock:
            for object_id in object_ids:
                ref = self._refs.get(object_id)
                if ref is not None:
                    refs[object_id] = ref
                actor_id = self.tokens.get(object_id)
                if actor_id is not None and actor_id in self.actors:
                    actors[actor_id] = (object_id, self.actors[actor_id])
        return refs, actors

    def pack(self, sobj: SerializedObject):
        """The Ray value to store for `sobj` (see the module's docstring)."""
        value = _OutOfBand(sobj) if sobj.buffers else sobj
        if not sobj.refs:
            if value is sobj and not sobj.is_error:
                return sobj.data  # (see the module docstring)
            return value
        refs, actors = self.carried(sobj.refs)
        return (value, refs, actors)

    def learn(self, refs: dict, actors: dict) -> None:
        """Remember Ray refs and actor handles that came with a value (those this
        process has already are kept)."""
        with self._lock:
            for object_id, ref in refs.items():
                self._refs.setdefault(object_id, ref)
            for actor_id, (token_id, handle) in actors.items():
                self.actors.setdefault(actor_id, handle)
                self.tokens.setdefault(token_id, actor_id)

    def unpack(self, object_id: bytes | None, value) -> SerializedObject:
        """The SerializedObject of a Ray value; what it carries is learnt, and the
        refs it contains are counted while this process holds `object_id`."""
        kind = type(value)
        if kind is bytes:
            if object_id is not None:
                self._read[object_id] = _READ_OK
            return SerializedObject(value)
        if kind is SerializedObject:
            if object_id is not None:
                self._read[object_id] = value if value.is_error else _READ_OK
            return value
        if kind is _RayDynamic:
            return self._unpack_dynamic(object_id, value)
        if value is None:  # (a generator call's completed() ref: its end)
            if object_id is not None:
                self._read[object_id] = _READ_OK
            return serialize(None)
        sobj, refs, actors = value
        if object_id is not None:
            self._read[object_id] = _READ_OK
        self.learn(refs, actors)
        if object_id is not None:
            with self._lock:
                first = object_id not in self._contained
                if first:
                    self._contained[object_id] = sobj.refs
            if first:
                self._counter.incr_all(sobj.refs)
        return sobj

    def unpack_arg(self, value) -> SerializedObject:
        """The SerializedObject of a ref argument's value as Ray resolved it
        (see `worker.plain_function`); what it carries is learnt."""
        kind = type(value)
        if kind is bytes:
            return SerializedObject(value)
        if kind is _RayDynamic:
            return self._unpack_dynamic(None, value)
        return self.unpack(None, value)

    def _unpack_dynamic(self, object_id: bytes | None, value) -> SerializedObject:
        """A ``num_returns="dynamic"`` call's value, as Ray gives it (the refs of
        everything its generator yielded: the items, then the call's own value,
        worker.py): the items' refs are learnt under their item ids."""
        refs = list(value)
        own = _ray.get(refs[-1], timeout=_DYNAMIC_TIMEOUT)  # (stored before the call ended)
        sobj = self.unpack(object_id, own)
        # (Without the call's id: its value holds the items' refs, in their order.)
        ids = (item_id(object_id, i) for i in range(len(refs) - 1)) if object_id is not None \
            else sobj.refs
        with self._lock:
            for item, ref in zip(ids, refs[:-1]):
                self._refs.setdefault(item, ref)
        return sobj

    def provided(self, dep_ids: Sequence[bytes], dep_values: Sequence, carried: tuple):
        """A context manager: within the block (in this thread), `get` of these
        ids answers from the values Ray resolved for the running task; the refs
        nested in its inline arguments (`carried`) are known, and counted until
        the block ends."""
        if not dep_ids and not carried[0] and not carried[1]:
            return _NOTHING_PROVIDED  # (the common call: nothing to set up or undo)
        return self._provided(dep_ids, dep_values, carried)

    @contextlib.contextmanager
    def _provided(self, dep_ids: Sequence[bytes], dep_values: Sequence, carried: tuple):
        refs, actors = carried
        self.learn(refs, actors)
        held = list(refs)
        if held:
            self._counter.incr_all(held)
        # (Not counted under their ids: this process holds no ref to them. The
        # refs inside are counted once the task deserializes its arguments.)
        values = {i: self._unpack_dynamic(i, v) if type(v) is _RayDynamic else
                  self.unpack(None, v) for i, v in zip(dep_ids, dep_values)}
        outer = self._local.get()
        token = self._local.set({**outer, **values} if outer else values)
        try:
            yield
        finally:
            self._local.reset(token)
            if held:
                self._counter.decr_all(held)

    # -- ObjectStore -------------------------------------------------------------------
    def put(self, object_id: bytes, value: SerializedObject) -> None:
        self._check_open()
        if self._streams:
            stream = self._streams.get(object_id)
            if stream is not None and object_id == closed_id(stream.stream_id):
                # The consumer dropped the generator: the producer is stopped
                # (Ray, told only that the stream is gone, would let it run on
                # unchecked), and this process lets go of Ray's generator.
                with stream.lock:
                    generator, stream.generator = stream.generator, None
                if generator is not None and not stream.ended and \
                        not _ray.wait([generator.completed()], timeout=0,
                                      fetch_local=False)[0]:
                    # (Not once its task has ended: see scheduler._finished.)
                    try:
                        _ray.cancel(generator, force=False, recursive=True)
                    except Exception:  # noqa: BLE001 - it ended meanwhile
                        pass
        ref = _ray.put(self.pack(value))  # (Ray copies the buffers: see _OutOfBand)
        with self._lock:
            self._refs[object_id] = ref

    def get(self, object_ids: Sequence[bytes], timeout: float | None = None,
            fail_fast: bool = False) -> list:
        self._check_open()
        local = self._local.get()
        if len(object_ids) == 1 and not self._streams and not local:
            # (The common get of one ref, in fewer steps: the same as below.)
            object_id = object_ids[0]
            with self._lock:
                ref = self._refs.get(object_id)
            if ref is not None:
                try:
                    value = _ray.get(ref, timeout=timeout)
                except _rex.GetTimeoutError:
                    raise exc.GetTimeoutError(f"get timed out after {timeout} s") from None
                except _rex.RayError:
                    return self._one_by_one(object_ids, [ref], timeout)
                return [self.unpack(object_id, value)]
        if local:
            out = {i: local[i] for i in object_ids if i in local}
            missing = [i for i in dict.fromkeys(object_ids) if i not in out]
        else:  # (the driver's get: nothing resolved by Ray for a running task)
            out = {}
            missing = list(dict.fromkeys(object_ids)) if len(object_ids) > 1 else object_ids
        if missing:
            if self._streams:
                until = deadline(timeout)
                for i in missing:
                    if i not in self._refs and self._stream_of(i) is not None and \
                            not self._pull(i, remaining(until)):
                        raise exc.GetTimeoutError(f"get timed out after {timeout} s")
            with self._lock:
                refs = list(map(self._refs.get, missing))
            if None in refs:  # (ids this process does not hold a Ray ref for)
                refs = [r if r is not None else self.ray_ref(i) for i, r in zip(missing, refs)]
            if fail_fast and len(refs) > 1:
                values = self._until_error(missing, refs, timeout)
            else:
                values = self._fetch(missing, refs, timeout)
            out.update(zip(missing, values))
        return [out[i] for i in object_ids]

    def _fetch(self, object_ids, refs, timeout) -> list:
        """The values, each Ray failure as its beamlet error."""
        try:
            values = _ray.get(refs, timeout=timeout)
        except _rex.GetTimeoutError:
            raise exc.GetTimeoutError(f"get timed out after {timeout} s") from None
        except _rex.RayError:
            return self._one_by_one(object_ids, refs, timeout)
        return list(map(self.unpack, object_ids, values))

    def _until_error(self, object_ids, refs, timeout) -> list:
        """The values once all are ready, or as soon as a ready one is an error
        (beamlet's or Ray's), with None for those not ready then."""
        until = deadline(timeout)
        id_of = dict(zip(refs, object_ids))
        got: dict = {}
        pending, poll = list(refs), 0.0
        while pending:
            left = remaining(until)
            if left == 0 and poll:
                raise exc.GetTimeoutError(f"get timed out after {timeout} s")
            step = poll if left is None else min(poll, left)
            ready, pending = _ray.wait(pending, num_returns=len(pending), timeout=step,
                                       fetch_local=False)
            poll = min(0.5, max(0.01, poll * 2))
            if not ready:
                continue
            ids = list(map(id_of.__getitem__, ready))
            values = self._fetch(ids, ready, None)
            got.update(zip(ids, values))
            if any(map(_IS_ERROR, values)):
                break
        return list(map(got.get, object_ids))

    def _one_by_one(self, object_ids, refs, timeout) -> list:
        """The values, when some failed in Ray: each failure as its beamlet error."""
        until = deadline(timeout)
        values = []
        for object_id, ref in zip(object_ids, refs):
            try:
                values.append(self.unpack(object_id, _ray.get(ref, timeout=remaining(until))))
            except _rex.GetTimeoutError:
                raise exc.GetTimeoutError(f"get timed out after {timeout} s") from None
            except _rex.RayError as err:
                if self._stream_id(object_id):
                    # Ray gave the failure as the stream's last item already
                    # (beamlet's stream id then holds None: the task is over).
                    values.append(self.unpack(object_id, None))
                    continue
                values.append(serialize(self._error(object_id, err), is_error=True))
                self._read[object_id] = values[-1]
        return values

    def _stream_id(self, object_id: bytes) -> bool:
        """Whether `object_id` is the own id of a stream this process consumes."""
        if not self._streams:
            return False
        stream = self._streams.get(stream_prefix(object_id))
        return stream is not None and stream.stream_id == object_id

    def entry(self, object_id: bytes) -> SerializedObject | None:
        """The object's value as far as it can be known without waiting (None: not
        ready, or unknown here), for the Runtime's log of errors nobody read
        when the last ref goes: a value read here is not read again."""
        known = self._read.pop(object_id, None)
        if known is not None:
            return known
        if self._in_worker and threading.current_thread() is threading.main_thread():
            # No Ray call here: Ray delivers cancel() to the task running in this
            # thread as a KeyboardInterrupt out of its next blocking call, and
            # this runs when a ref is released, often in ObjectRef.__del__, where
            # Python swallows it: the cancelled task then ran on, holding its
            # resources (seen under load in test_cancel). So in a worker's task
            # thread an error nobody read is logged only if it was read here.
            return None
        with self._lock:
            ref = self._refs.get(object_id)
        if ref is None or self._closed:
            return None
        try:
            ready, _ = _ray.wait([ref], timeout=0, fetch_local=False)
            if not ready:
                return None
            return self.unpack(None, _ray.get(ref, timeout=0))
        except _rex.GetTimeoutError:
            return None
        except _rex.RayError as err:
            if self._stream_id(object_id):
                return _READ_OK  # (see _one_by_one)
            return serialize(self._error(object_id, err), is_error=True)
        except Exception:  # noqa: BLE001 - (a release may come late, as Ray disconnects)
            return None

    def _error(self, object_id: bytes, err: BaseException) -> BaseException:
        actor_id = self._calls.get(object_id)
        if actor_id is not None and isinstance(err, _rex.RayActorError) and \
                not isinstance(err, _rex.ActorUnavailableError) and self._death_of is not None:
            try:
                reason = self._death_of(actor_id)
            except exc.BeamletError:
                reason = None
            if reason:
                return exc.ActorDiedError(reason)
        return error_of(err, f"object {object_id.hex()}")

    def wait(self, object_ids: Sequence[bytes], num_returns: int,
             timeout: float | None = None) -> set[bytes]:
        self._check_open()
        local = self._local.get()
        unique = list(dict.fromkeys(object_ids))
        ready = {i for i in unique if i in local}
        pending = [i for i in unique if i not in ready]
        if len(ready) >= num_returns or not pending:
            return ready
        if self._streams and any(self._stream_of(i) is not None for i in pending):
            return self._wait_streams(ready, pending, num_returns, timeout)
        refs = [self.ray_ref(i) for i in pending]
        by_ref = dict(zip(refs, pending))
        done, _ = _ray.wait(refs, num_returns=min(num_returns - len(ready), len(refs)),
                            timeout=timeout, fetch_local=False)
        ready.update(by_ref[r] for r in done)
        return ready

    def _wait_streams(self, ready: set, pending: list, num_returns: int,
                      timeout: float | None) -> set:
        """`wait` where some ids are items of streams not taken from Ray yet: for
        those, Ray's generator is what is waited on (ready: its next ref, or its
        end, is there); one that is ready is taken from, and waited on again
        while it has not reached the item."""
        until = deadline(timeout)
        while True:
            waitables, whose = [], {}
            for object_id in pending:
                if object_id in ready:
                    continue
                with self._lock:
                    ref = self._refs.get(object_id)
                stream = self._stream_of(object_id) if ref is None else None
                if stream is not None:
                    if self._pull(object_id, 0):
                        ready.add(object_id)
                        continue
                    if stream.generator is None:
                        continue  # (dropped: it never comes)
                    ref = stream.generator
                elif ref is None:
                    ref = self.ray_ref(object_id)
                if ref not in whose:
                    waitables.append(ref)
                whose.setdefault(ref, []).append(object_id)
            need = num_returns - len(ready)
            if need <= 0 or not waitables:
                return ready
            left = remaining(until)
            done, _ = _ray.wait(waitables, num_returns=min(need, len(waitables)), timeout=left,
                                fetch_local=False)
            for waitable in done:
                for object_id in whose[waitable]:
                    if self._stream_of(object_id) is None or object_id in self._refs:
                        ready.add(object_id)
            if not done and left is not None and left <= 0:
                return ready

    def contains(self, object_id: bytes) -> bool:
        local = self._local.get()
        if object_id in local:
            return True
        with self._lock:
            ref = self._refs.get(object_id)
        if ref is None:
            return bool(self._streams) and self._pull(object_id, 0)
        ready, _ = _ray.wait([ref], timeout=0, fetch_local=False)
        return bool(ready)

    def release(self, object_id: bytes) -> None:
        """`delete` of one id: the backend's ``object_released`` (the last ref to
        it in this process went), the common one in few steps."""
        if self._streams or object_id in self.tokens or object_id in self._contained:
            self.delete((object_id,))
            return
        with self._lock:
            self._refs.pop(object_id, None)
            self._calls.pop(object_id, None)
            self._read.pop(object_id, None)

    def delete(self, object_ids: Iterable[bytes]) -> None:
        released = []
        refs, calls, read, tokens, contained_in = (self._refs, self._calls, self._read,
                                                   self.tokens, self._contained)
        with self._lock:
            for object_id in object_ids:
                refs.pop(object_id, None)
                if calls:
                    calls.pop(object_id, None)
                if read:
                    read.pop(object_id, None)
                if tokens:
                    actor_id = tokens.pop(object_id, None)
                    if actor_id is not None:
                        self.actors.pop(actor_id, None)  # (Ray ends it once no handle is left)
                        self.methods.pop(actor_id, None)
                if contained_in:
                    contained = contained_in.pop(object_id, None)
                    if contained:
                        released.extend(contained)
                if self._streams:
                    stream = self._streams.get(stream_prefix(object_id))
                    if stream is not None and stream.stream_id == object_id:
                        del self._streams[stream.prefix]
                        self._streams.pop(closed_id(object_id), None)
        if released:
            self._counter.decr_all(released)

    def on_ready(self, object_id: bytes, callback: Callable[[bytes], object]) -> None:
        with self._lock:
            ref = self._refs.get(object_id)
            if self._callbacks is None and ref is not None:
                self._callbacks = queue.SimpleQueue()
                threads.start(self._run_callbacks, self._callbacks, name="beamlet-ray-ready")
            callbacks = self._callbacks
        if ref is None:
            callback(object_id)  # (unknown here: it reads back as lost, at once)
            return
        # Ray completes futures on its own I/O thread, which must not run our
        # code (a callback may drop Ray refs): hand it to ours.
        ref.future().add_done_callback(lambda _f: callbacks.put((callback, object_id)))

    @staticmethod
    def _run_callbacks(pending: queue.SimpleQueue) -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            callback, object_id = item
            try:
                callback(object_id)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
                import traceback
                traceback.print_exc()

    def stats(self) -> dict:
        return {"num_objects": len(self._refs), "bytes_used": 0}

    def close(self) -> None:
        """Drop every Ray ref and actor handle this process holds."""
        with self._lock:
            self._closed = True
            self._refs.clear()
            self._calls.clear()
            self.actors.clear()
            self.methods.clear()
            self.tokens.clear()
            self._contained.clear()
            self._read.clear()
            self._streams.clear()
            callbacks, self._callbacks = self._callbacks, None
        if callbacks is not None:
            callbacks.put(None)

    def _check_open(self) -> None:
        if self._closed:
            raise exc.BackendError("the Ray backend was shut down")

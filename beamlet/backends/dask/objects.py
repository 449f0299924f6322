"""DaskObjectStore: beamlet objects as Dask keys, one Future per key this process holds.

An object id maps to the key ``beamlet-<id hex>``; its Dask value is the
beamlet ``SerializedObject`` (a task's result, an error object, or a `put`
value scattered to a worker: the driver's small ones several at a time, and
read here meanwhile, see `DaskObjectStore.put`). Dask keeps a key's data while some client
holds a Future for it, so each process keeps one Future per id its Runtime
references (created when the process submits or puts the object, or when a
ref to it arrives and is first used) and drops it in `delete`, when the
Runtime's count for the id reaches zero.

The results of actor calls are the exception: they come straight back to the
caller over one Dask actor call (see ``scheduler.py``), so each is held here
as a local *call result* (a ``concurrent.futures.Future`` of its value),
unknown to Dask. Only when such a ref leaves the process (an argument of a
task or actor call, a ref inside a ``put`` value or a result) is it
*published* under its key (`publish`): scattered if its value is here, else
through a relay task that the value is handed to once it arrives.

A Future whose task failed at the Dask level (a cancelled task, a worker
that died too often, a lost scattered value) reads back as the beamlet error
of that failure, so callers see ``TaskCancelledError``, ``WorkerCrashedError``
or ``ObjectLostError`` as on any other backend.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import pickle
import threading
import time
import uuid
from typing import Callable, Iterable, Sequence

from ... import exceptions as exc
from ...core.interfaces import ObjectStore
from ...core.serialization import SerializedObject, serialize
from ...core.task_spec import ARG_VALUE

PREFIX = "beamlet-"


def key_of(object_id: bytes) -> str:
    """The Dask key holding the object `object_id`."""
    return PREFIX + object_id.hex()


_KNOWN_GRACE = 2.0
_BATCH_MAX = 1000  # tasks in one submission to the Dask scheduler at most
_GATHER_TIMEOUT = 300.0  # seconds for one fetch of finished values


#: Bytes from which a buffer travels as a Dask frame of its own (see DaskObject).
_OWN_FRAME = 64 * 1024
#: Bytes from which a value scattered from the driver goes straight to a worker
#: (three round trips: the scheduler's list of workers, the worker, the
#: scheduler told) rather than through the scheduler (one round trip, and a
#: copy through the scheduler's process: dearer for large values only).
_DIRECT_SCATTER = 1024 * 1024
#: Bytes below which a value the driver `put`s waits here to be scattered with
#: others (one scatter for many: `_flush_puts`)...
_BATCHED_PUT = _OWN_FRAME
#: ...until this many wait, or this many bytes.
_PUTS_MAX = 1000
_PUTS_MAX_BYTES = 8 * 1024 * 1024


class DaskObject(SerializedObject):
    """A SerializedObject as Dask carries it (a task's argument or result, a
    `put` value): its large buffers leave the pickle stream (protocol 5, out
    of band) and travel as frames of their own, without a copy into the
    stream, as Dask sends a numpy array. They read back as read-only views of
    the frames received (a numpy array made from them is read-only, as from
    the bytes that a plain SerializedObject carries), as a DaskObject again,
    so that a process passing it on (the Dask scheduler, handing a task's
    arguments to a worker) does not copy them either."""

    __slots__ = ()

    def __reduce_ex__(self, protocol):
        if protocol < 5:
            return super().__reduce__()
        return (_received, (self.data, [_wire(b) for b in self.buffers], self.refs,
                            self.is_error))


def _wire(buffer):
    """A buffer as it goes into the pickle stream: out of band (as its raw bytes:
    Dask sends frames of bytes) if large, else as bytes."""
    if isinstance(buffer, bytes) and len(buffer) < _OWN_FRAME:
        return buffer
    raw = pickle.PickleBuffer(buffer).raw()
    return pickle.PickleBuffer(raw) if raw.nbytes >= _OWN_FRAME else raw.tobytes()


def _received(data, buffers, refs, is_error) -> DaskObject:
    return DaskObject(data, [b if isinstance(b, bytes) else memoryview(b).toreadonly()
                             for b in buffers], refs, is_error)


def carried(value: SerializedObject) -> SerializedObject:
    """`value`, as a DaskObject if it has a buffer large enough for a frame of its own."""
    if value.buffers and type(value) is SerializedObject and \
            any(memoryview(b).nbytes >= _OWN_FRAME for b in value.buffers):
        return DaskObject(value.data, value.buffers, value.refs, value.is_error)
    return value


def carry_args(spec) -> None:
    """Make the large by-value arguments of a TaskSpec (about to be handed to
    Dask) `carried` ones, in place."""
    if any(kind == ARG_VALUE and value.buffers for kind, value in spec.args):
        spec.args = [(kind, carried(value)) if kind == ARG_VALUE else (kind, value)
                     for kind, value in spec.args]
    if spec.kwargs and any(kind == ARG_VALUE and value.buffers
                           for kind, value in spec.kwargs.values()):
        spec.kwargs = {name: (kind, carried(value)) if kind == ARG_VALUE else (kind, value)
                       for name, (kind, value) in spec.kwargs.items()}


class FailedObject(SerializedObject):
    """A stored error (``is_error``) as a Dask task's value. Dask tells every
    client holding the key its value's type, so `get` of a list can fail fast
    without fetching each value as it comes (it reads back as a plain
    SerializedObject)."""

    __slots__ = ()


def as_stored(value: SerializedObject) -> SerializedObject:
    """`value` as a task's Dask value: a FailedObject if it is an error, else
    `carried`."""
    if value.is_error and not isinstance(value, FailedObject):
        return FailedObject(value.data, value.buffers, value.refs, True)
    return carried(value)


def _nbytes(value: SerializedObject) -> int:
    return len(value.data) + sum(memoryview(b).nbytes for b in value.buffers)


def _may_be_error(fut) -> bool:
    """Whether a finished future's value may be an error (a FailedObject, or
    of a type Dask did not say)."""
    kind = fut.type
    return not (isinstance(kind, type) and issubclass(kind, SerializedObject)) or \
        issubclass(kind, FailedObject)


def _scheduler_knows(key: str, dask_scheduler=None) -> bool:
    """(Runs in the Dask scheduler.)"""
    return key in dask_scheduler.tasks


def _assigned_worker(key: str, dask_scheduler=None) -> str | None:
    """(Runs in the Dask scheduler.) The worker the key's task is assigned to."""
    ts = dask_scheduler.tasks.get(key)
    if ts is None or ts.processing_on is None:
        return None
    return ts.processing_on.address


def _executing(key: str, dask_worker=None) -> bool:
    """(Runs in a Dask worker.) Whether the key's task is running there now
    (the scheduler's "processing" also covers tasks queued on the worker)."""
    ts = dask_worker.state.tasks.get(key)
    return ts is not None and ts.state in ("executing", "long-running")


_RELAY_POLL = 10.0  # seconds between a relay's checks that its value is still wanted


def _relay(name: str):
    """(A Dask task, under the key of a published call result whose value had
    not arrived.) Wait, seceded, for the caller to hand the value over (a
    Future in the Dask ``Variable`` `name`) and return it; give up once the
    scheduler no longer wants this task (its caller is gone)."""
    from distributed import Variable, get_worker, rejoin, secede
    from distributed.worker import thread_state
    key = thread_state.key
    variable = Variable(name)
    secede()
    try:
        while True:
            try:
                handed = variable.get(timeout=_RELAY_POLL)
                break
            except TimeoutError:
                if key not in get_worker().state.tasks:
                    raise exc.ObjectLostError("the caller of the actor call went away "
                                              "before its result arrived") from None
        value = handed.result()
    finally:
        rejoin()
    variable.delete()
    return value


async def _report_settled(client, futures: dict, report: Callable[[bytes], object],
                          stop: asyncio.Event, done: bool) -> None:
    """(On `client`'s event loop.) `report(id)` for each of the Dask
    `futures` ({id: Future}) once it is no longer pending (`done`: once it is
    done, as Dask's ``wait`` has it: a lost value is not), until `stop` is
    set. Dask's own ``add_done_callback`` costs a loop wake-up, a coroutine
    and a hop through a thread per future, and its ``wait(...,
    FIRST_COMPLETED)`` a coroutine per future on every call: here each
    future costs one waiting task on the loop, once."""
    def unsettled(state) -> bool:
        return not state.done() if done else state.status == "pending"

    async def settled(state, object_id: bytes) -> None:
        while unsettled(state):  # (as Dask's own callback waits)
            await state.wait()
        report(object_id)

    states = client.futures
    waiting = []
    for object_id, fut in futures.items():
        state = states.get(fut.key)
        if state is None or not unsettled(state):
            report(object_id)
        else:
            waiting.append(asyncio.ensure_future(settled(state, object_id)))
    try:
        await stop.wait()
    finally:
        for task in waiting:
            task.cancel()


def wait_futures(futures: list, timeout: float | None, return_when: str = "ALL_COMPLETED"):
    """Dask's ``wait``, which returns as it does but raises FuturesCancelledError
    once its condition holds if some future was cancelled: that is an outcome
    here (read by `DaskObjectStore._value`), not an error. TimeoutError as Dask's."""
    from distributed import wait
    from distributed.client import FuturesCancelledError
    try:
        wait(futures, timeout=timeout, return_when=return_when)
    except FuturesCancelledError:
        pass


@contextlib.contextmanager
def seceded():
    """Inside a Dask worker's task thread, give the thread's slot back while
    blocking (Dask's ``secede``), and take one again afterwards (``rejoin``):
    a task waiting for its own nested tasks must not hold the slot they need.
    Elsewhere (the driver, an actor's thread) it does nothing."""
    from distributed.worker import thread_state
    in_task = getattr(thread_state, "execution_state", None) is not None and \
        getattr(thread_state, "key", None) is not None and \
        not getattr(thread_state, "beamlet_seceded", False)
    if not in_task:
        yield
        return
    from distributed import rejoin, secede
    secede()
    thread_state.beamlet_seceded = True
    try:
        yield
    finally:
        thread_state.beamlet_seceded = False
        rejoin()


class DaskObjectStore(ObjectStore):
    """The ObjectStore of one process (driver or worker) on a Dask ``Client``."""

    def __init__(self, client, refs):
        self.client = client
        self._refs = refs
        self._lock = threading.Lock()
        self._futures: dict[bytes, object] = {}
        #: Values handed to a task running in this process by Dask itself (its
        #: resolved ref arguments), read by the executor without a round trip.
        #: Also the values of the small objects this process `put` (while it
        #: holds them): read, and ready, here without asking Dask.
        self._local: dict[bytes, SerializedObject] = {}
        self._put_here: set[bytes] = set()  # (those puts)
        #: Puts not scattered yet: key -> value (see `put`), and their bytes.
        self._puts: dict[str, SerializedObject] = {}
        self._puts_bytes = 0
        self._puts_lock = threading.Lock()  # (never taken on the client's event loop)
        #: The refs contained in objects this process read, kept alive while it
        #: holds the containing object (the ObjectStore contract).
        self._contained: dict[bytes, tuple] = {}
        self._pinned: list = []
        self._pinned_ids: set[bytes] = set()
        #: Ids of the tasks this process submitted: their Futures are kept until
        #: the task ran even once nobody holds a ref (Dask would cancel a task
        #: nobody wants; Ray runs it, for its side effects).
        self._submitted: set[bytes] = set()
        self._lost: set[str] = set()
        #: id -> whether its task was running when this process cancelled it.
        self._cancelled: dict[bytes, bool] = {}  # keys borrowed after the scheduler forgot them
        self._unwanted: dict[bytes, object] = {}
        #: The results of actor calls made here: id -> a concurrent Future of
        #: its SerializedObject, set when the answer arrives (see `expect`).
        self._calls: dict[bytes, concurrent.futures.Future] = {}
        self._handover = None  # (a thread handing values to relays: see publish)
        self._closed = False
        #: Tasks submitted here and not yet sent to the scheduler (see `submit_batched`).
        self._batch: list = []
        self._batch_armed = False
        self._batch_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # (batches are sent in the order made)
        #: Each graph's token (Dask's name of the submission): unique per client.
        self._token_prefix = f"beamlet-graph-{uuid.uuid4().hex}-"
        self._graphs = itertools.count()
        #: The Dask scheduler, when it runs in this process on the client's event
        #: loop (the LocalCluster the driver started): see `_gather_here`.
        self.local_scheduler = None
        from distributed import get_worker
        try:
            #: The Dask worker this process is (None in a driver): gathers
            #: take values it holds itself without a round trip.
            self._worker = get_worker()
        except ValueError:
            self._worker = None

    # -- futures ------------------------------------------------------------------
    def adopt(self, object_id: bytes, future) -> None:
        """Hold `future` (just submitted or scattered by this process) for `object_id`."""
        with self._lock:
            self._futures[object_id] = future
            self._submitted.add(object_id)

    # -- batched submission -------------------------------------------------------------
    def submit_batched(self, object_id: bytes, fn, args: tuple, resources: dict | None) -> None:
        """Submit the task ``fn(*args)`` under the key of `object_id` with others
        made at about the same time: one graph sent to the Dask scheduler for
        many tasks, as Dask's ``Client.map`` does, costs it far less per task
        than one each. Only the last of `args` may hold Futures (a dict of
        them, resolved on the worker); the others go as they are. The batch
        is sent (`flush`) when it is full, before anything else of this store
        or its scheduler talks to Dask (so the scheduler hears of every key
        before anything that uses it), and else from the client's event loop
        as soon as that runs. Batches go out in the order made, each task
        keeping its place (its Dask priority)."""
        from distributed import Future
        if self._puts or self._puts_lock.locked():  # (its arguments' puts go first)
            self._flush_puts()
        key = key_of(object_id)
        self.adopt(object_id, Future(key, self.client))
        with self._batch_lock:
            self._batch.append((key, fn, args, resources))
            arm = not self._batch_armed
            self._batch_armed = True
            full = len(self._batch) >= _BATCH_MAX
        if full:
            self.flush()
        elif arm:
            self.client.loop.add_callback(self._flush_tasks)

    def _flush_for_read(self) -> None:
        """Before a read (`get`, `wait`): the batch must reach the scheduler
        first. When a flush of it waits on the client's event loop (armed), it
        runs there before anything the read asks of the loop (callbacks run in
        the order queued), so it is left to do so: flushing here too would wake
        the loop once more per task."""
        if self._batch and not self._batch_armed:
            self.flush()

    def flush(self) -> None:
        """Scatter the puts waiting here (`put`; not from the client's event
        loop, where the scatter could not wait for it), then
        send the tasks `submit_batched` holds to the Dask scheduler."""
        if self._puts or self._puts_lock.locked():
            from distributed.utils import in_async_call
            if not in_async_call(self.client.loop):  # (there they wait for the next flush)
                self._flush_puts()
        self._flush_tasks()

    def _flush_puts(self) -> None:
        """Scatter the puts waiting here, in one scatter, and return once the
        scheduler has their keys (also those another thread's call of this
        took first: while it holds `_puts_lock`, which callers check with
        `_puts`, they wait for it here)."""
        with self._puts_lock:  # (a second flush returns once the first's scatter is done)
            with self._batch_lock:
                values, self._puts = self._puts, {}
                self._puts_bytes = 0
            if not values:
                return
            try:
                futures = self._scatter(values)
            except Exception as err:  # noqa: BLE001 - e.g. no worker left
                for key in values:
                    state = self.client.futures.get(key)
                    if state is not None:
                        state.set_error(err, err.__traceback__)
                # (Raised at the call that needed them sent: a task given one of
                # these refs must not reach the scheduler with a key it never had.)
                raise exc.BackendError(f"{len(values)} object(s) put in this process could "
                                       f"not be sent to the Dask cluster: "
                                       f"{type(err).__name__}: {err}") from err
        for fut in futures.values():
            fut.release()  # (the Future `put` adopted holds the key)

    def _flush_tasks(self) -> None:
        """Send the tasks `submit_batched` holds to the Dask scheduler (from any thread)."""
        if not self._batch:
            return
        with self._flush_lock:
            with self._batch_lock:
                batch, self._batch = self._batch, []
                self._batch_armed = False
            start = 0
            while start < len(batch):  # (one graph per run of equal resource requests)
                end = start + 1
                while end < len(batch) and batch[end][3] == batch[start][3]:
                    end += 1
                self._send_graph(batch[start:end])
                start = end

    def _send_graph(self, tasks: list) -> None:
        from dask._expr import LLGExpr
        from dask._task_spec import Task, parse_input
        from distributed.spans import SpanMetadata
        client = self.client
        try:
            # (Not parse_input of every argument, which walks the job's dict
            # and lists on each task: only the last argument holds Futures.)
            graph = {key: Task(key, fn, *args[:-1], parse_input(args[-1]) if args[-1]
                               else args[-1]) for key, fn, args, _ in tasks}
            client._graph_to_futures(
                LLGExpr(graph, _determ_token=f"{self._token_prefix}{next(self._graphs)}"),
                list(graph),
                span_metadata=SpanMetadata(collections=[{"type": "Future"}]),
                internal_priority={key: i for i, key in enumerate(graph)},
                resources=tasks[0][3], fifo_timeout="100 ms", actors=False)
        except Exception as err:  # noqa: BLE001 - e.g. an argument Dask cannot pickle
            if len(tasks) > 1:  # (each alone: only the culprit fails)
                for task in tasks:
                    self._send_graph([task])
                return
            state = client.futures.get(tasks[0][0])
            if state is not None:
                state.set_error(err, err.__traceback__)

    def _scatter(self, values: dict) -> dict:
        """Dask's scatter of {key: SerializedObject} (never hashed): Futures by key.
        Large values go straight to a worker only if the client may connect to
        workers (``direct_to_workers`` true: a worker's client, the driver's in
        the cluster beamlet started); else they pass through the scheduler, as
        the client asks (its workers may be unreachable from here)."""
        direct = (bool(self.client.direct_to_workers)
                  and sum(_nbytes(v) for v in values.values()) >= _DIRECT_SCATTER)
        return self.client.scatter(values, hash=False, direct=direct)

    # -- call results -------------------------------------------------------------------
    def expect(self, object_id: bytes) -> concurrent.futures.Future:
        """Hold `object_id` as the result of an actor call made here: the
        returned Future is set to its SerializedObject when the answer arrives."""
        entry = concurrent.futures.Future()
        self._calls[object_id] = entry
        return entry

    def publish(self, object_ids: Iterable[bytes]) -> None:
        """Make sure each id that is a call result held here also exists as a
        Dask key (it is about to leave this process): its value is scattered,
        or, until it arrives, a relay task stands under its key. Other ids
        are left alone. Never waits for a call."""
        self.flush()
        calls = self._calls
        if not calls:
            return
        with self._lock:
            todo = [(i, calls[i]) for i in dict.fromkeys(object_ids)
                    if i in calls and i not in self._futures]
        if not todo:
            return
        arrived = {key_of(i): as_stored(entry.result()) for i, entry in todo if entry.done()}
        if arrived:
            futures = self._scatter(arrived)
            for object_id, entry in todo:
                fut = futures.get(key_of(object_id))
                if fut is not None:
                    self._adopt_published(object_id, fut)
        for object_id, entry in todo:
            if not entry.done():
                self._relay(object_id, entry)

    def _adopt_published(self, object_id: bytes, fut) -> None:
        with self._lock:
            held = self._futures.setdefault(object_id, fut)
        if held is not fut:
            fut.release()  # (published meanwhile by another thread)

    def _relay(self, object_id: bytes, entry: concurrent.futures.Future) -> None:
        """Publish a call result whose value has not arrived: a `_relay` task
        under its key, handed the value (through a Dask Variable) once it does."""
        name = f"beamlet-relay-{object_id.hex()}"
        fut = self.client.submit(_relay, name, key=key_of(object_id), pure=False)
        with self._lock:
            held = self._futures.setdefault(object_id, fut)
            if held is fut:
                self._submitted.add(object_id)
            if self._handover is None:
                self._handover = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="beamlet-dask-relay")
            handover = self._handover
        if held is not fut:
            fut.release()
            return

        def hand_over(value: SerializedObject) -> None:
            from distributed import Variable
            try:
                scattered = self._scatter({f"beamlet-relayed-{uuid.uuid4().hex}":
                                           as_stored(value)}).popitem()[1]
                Variable(name, client=self.client).set(scattered)
                scattered.release()  # (the Variable holds it now)
            except Exception:  # noqa: BLE001 - the cluster is going away: nobody reads it
                pass
        # (The callback runs on the thread that set the value, the client's
        # event loop, where blocking client calls are not allowed.)
        def arrived(done: concurrent.futures.Future) -> None:
            try:
                handover.submit(hand_over, done.result())
            except RuntimeError:
                pass  # (this store was closed: nobody reads it)
        entry.add_done_callback(arrived)

    def _pending(self, object_id: bytes):
        """What to wait on for `object_id`: its call result, else its Dask Future."""
        entry = self._calls.get(object_id)
        return entry if entry is not None else self.future(object_id)

    def future(self, object_id: bytes):
        """The Future for `object_id`, made (and the scheduler told that this
        client wants the key) on first use in this process."""
        with self._lock:
            fut = self._futures.get(object_id)
        if fut is not None:
            return fut
        fut = self.borrow_key(key_of(object_id))  # (a scheduler round trip: not under the lock)
        with self._lock:
            held = self._futures.setdefault(object_id, fut)
        if held is not fut:
            fut.release()
        return held

    def borrow_key(self, key: str):
        """A new Future for an existing Dask `key`, held by this process's client.
        A key the scheduler does not know (any more) reads back as lost, rather
        than a Future that never resolves."""
        from distributed import Future
        self.flush()
        fut = Future(key, self.client)
        if not self._known(key):
            self._lost.add(key)
        # A Future made from a key alone does not tell the scheduler this client
        # wants it (Dask does that for futures it unpickles in task arguments);
        # without it the key could be freed under us and the future never resolve.
        self.client._send_to_scheduler({"op": "client-desires-keys", "keys": [key],
                                        "client": self.client.id})
        return fut

    def pin_for_job(self, object_ids: Iterable[bytes]) -> None:
        """Keep the objects alive until this process's job ends (the refs inside a
        task's result, until the reader of the result holds them itself)."""
        object_ids = list(object_ids)
        self.publish(object_ids)
        pinned = [self.borrow_key(key_of(i)) for i in object_ids]
        with self._lock:
            self._pinned.extend(pinned)
            self._pinned_ids.update(object_ids)

    def is_pinned(self, object_id: bytes) -> bool:
        return object_id in self._pinned_ids

    def _known(self, key: str) -> bool:
        """Whether the scheduler knows `key`; asked again for a while, since the
        submission of a ref that reached us through another process may still
        be on its way to the scheduler."""
        deadline = time.monotonic() + _KNOWN_GRACE
        while True:
            if self.client.run_on_scheduler(_scheduler_knows, key):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def hold_all(self, object_ids: Iterable[bytes]) -> None:
        """Make sure this process holds a Future for each id (a borrower keeping
        objects alive beyond the task that passed them)."""
        for object_id in object_ids:
            self.future(object_id)

    def read_borrowed(self, object_ids: Sequence[bytes]) -> dict[bytes, SerializedObject]:
        """The values of objects other processes hold (an actor call's ref
        arguments, which its caller keeps until the call ends), read without
        holding them here afterwards; waits for them (seceded in a task)."""
        futures = [self.borrow_key(key_of(i)) for i in object_ids]
        try:
            self._wait_all(futures, None)
            return {i: self._value(i, fut, contained=False)
                    for i, fut in zip(object_ids, futures)}
        finally:
            for fut in futures:
                fut.release()

    @contextlib.contextmanager
    def provided(self, values: dict[bytes, SerializedObject]):
        """Within the block, `get` of these ids answers from `values` (a task's
        arguments, which Dask already fetched to this worker)."""
        with self._lock:
            self._local.update(values)
        try:
            yield
        finally:
            with self._lock:
                for object_id in values:
                    self._local.pop(object_id, None)

    # -- ObjectStore ------------------------------------------------------------------
    def put(self, object_id: bytes, value: SerializedObject) -> None:
        """A small value in the driver (below `_BATCHED_PUT` bytes) is copied
        now, kept here for this process's reads, and scattered with the puts
        after it (`_flush_puts`) once enough wait, or before anything that
        could carry its ref elsewhere: a submission, an actor call, another
        put, `publish`, `borrow_key` or `cancel` (from a thread other than the
        client's event loop). Any other value is scattered before this returns."""
        self._check_open()
        key = key_of(object_id)
        if value.refs:
            self.publish(value.refs)
        size = _nbytes(value)
        if self._worker is None and size < _BATCHED_PUT:
            from distributed import Future
            value = value.detached()  # (the object is the value as it was at the call)
            with self._lock:
                self._local[object_id] = value
                self._put_here.add(object_id)
            self.adopt(object_id, Future(key, self.client))
            with self._batch_lock:
                self._puts[key] = value
                self._puts_bytes += size
                full = len(self._puts) >= _PUTS_MAX or self._puts_bytes >= _PUTS_MAX_BYTES
            if full:
                self._flush_puts()
        else:
            self.flush()
            futures = self._scatter({key: carried(value)})
            self.adopt(object_id, futures[key])
        if value.refs:
            with self._lock:
                self._contained[object_id] = value.refs
            self._refs.incr_all(value.refs)

    def get(self, object_ids: Sequence[bytes], timeout: float | None = None,
            fail_fast: bool = False) -> list[SerializedObject]:
        self._check_open()
        self._flush_for_read()
        with self._lock:
            local = {i: self._local[i] for i in object_ids if i in self._local}
        missing = [i for i in dict.fromkeys(object_ids) if i not in local]
        if missing and fail_fast and (len(missing) > 1 or
                                      any(v.is_error for v in local.values())):
            self._read_failing_fast(missing, local, timeout)
            return [local.get(i) for i in object_ids]
        if missing:
            futures = [self._pending(i) for i in missing]
            if timeout != 0 and not any(isinstance(f, concurrent.futures.Future) or
                                        f.key in self._lost or f.done() for f in futures):
                local.update(self._gathered(missing, futures, timeout))
            else:
                self._wait_all(futures, timeout)
                local.update(self._values(list(zip(missing, futures))))
        return [local[i] for i in object_ids]

    def _gathered(self, object_ids: list, futures: list,
                  timeout: float | None) -> dict[bytes, SerializedObject]:
        """Wait for unfinished Dask Futures and fetch their values in one round
        trip to the client's event loop (Dask's gather, which waits for them),
        rather than a wait and then a fetch; those that did not finish (or whose
        value went away) read as `_value` says. GetTimeoutError."""
        with seceded():
            try:
                # (A dict: Dask leaves failed futures out of a gathered list.)
                wanted = {f.key: f for f in futures}
                if self.local_scheduler is not None:
                    values = self.client.sync(self._gather_here, wanted,
                                              callback_timeout=timeout)
                else:
                    values = self.client.sync(self.client._gather, wanted, errors="skip",
                                              local_worker=self._worker,
                                              callback_timeout=timeout)
            except TimeoutError:
                raise exc.GetTimeoutError(f"get timed out after {timeout} s") from None
            except Exception:  # noqa: BLE001 - some value went away: each is read alone
                values = {}
        out = {}
        for object_id, fut in zip(object_ids, futures):
            value = values.get(fut.key)
            if value is None or fut.status != "finished":
                self._wait_all([fut], timeout)
                value = self._value(object_id, fut)
            else:
                self._hold_contained(object_id, value)
            out[object_id] = value
        return out

    async def _gather_here(self, futures: dict) -> dict:
        """(On the client's event loop, which `local_scheduler` runs on too.)
        Dask's ``_gather(futures, errors="skip")`` ({key: Future}: the values
        of those that finished), with the workers holding them read off the
        scheduler object rather than asked of it over a connection (Dask's
        ``who_has`` round trip: a message each way, both handled in this
        process). Values no worker answers for are gathered Dask's way."""
        from distributed.utils_comm import gather_from_workers
        client = self.client
        for key in futures:
            state = client.futures.get(key)
            if state is not None and not state.done():
                await state.wait()
        tasks = self.local_scheduler.tasks
        who_has = {}
        for key, fut in futures.items():
            if fut.status != "finished":
                continue
            ts = tasks.get(key)
            if ts is None or not ts.who_has:
                return await client._gather(futures, errors="skip")
            who_has[key] = [ws.address for ws in ts.who_has]
        if not who_has:
            return {}
        data, missing, failed, _ = await gather_from_workers(who_has, rpc=client.rpc)
        if missing or failed:
            return await client._gather(futures, errors="skip")
        return data

    def _values(self, settled: list) -> dict[bytes, SerializedObject]:
        """`_value` of each settled (id, call result or Future), the finished
        Futures fetched in one gather rather than a round trip each."""
        batch = [(i, f) for i, f in settled if not isinstance(f, concurrent.futures.Future)
                 and f.status == "finished" and f.key not in self._lost]
        out = {}
        if len(batch) > 1:
            try:
                values = self.client.sync(self.client._gather, [f for _, f in batch],
                                          local_worker=self._worker,
                                          callback_timeout=_GATHER_TIMEOUT)
            except Exception:  # noqa: BLE001 - some value went away: each is read alone
                values = None
            if values is not None:
                for (object_id, _fut), value in zip(batch, values):
                    self._hold_contained(object_id, value)
                    out[object_id] = value
        for object_id, fut in settled:
            if object_id not in out:
                out[object_id] = self._value(object_id, fut)
        return out

    def _read_failing_fast(self, missing: list, local: dict, timeout: float | None) -> None:
        """Read the `missing` objects into `local` as they arrive, until all are
        there or one is an error (or one in `local` is already)."""
        import queue
        if any(v.is_error for v in local.values()):
            return
        pending = {i: self._pending(i) for i in missing}
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        stop = self._watch(pending, arrived.put, done=False)
        try:
            self._take_arrivals(pending, arrived, local, timeout)
        finally:
            stop()

    def _watch(self, futures: dict, report: Callable[[bytes], object],
               done: bool) -> Callable[[], None]:
        """`report(id)` for each of `futures` ({id: call result or Dask Future})
        once it is settled (see `_report_settled` for `done`), at once for those
        that are; returns the function that stops the watching."""
        dask = {}
        for object_id, fut in futures.items():
            if self._settled(fut):  # (a callback would come later)
                report(object_id)
            elif isinstance(fut, concurrent.futures.Future):
                fut.add_done_callback(lambda _f, i=object_id: report(i))
            else:
                dask[object_id] = fut
        if not dask:
            return lambda: None
        stop = asyncio.Event()
        self.client.loop.add_callback(_report_settled, self.client, dask, report, stop, done)
        return lambda: self.client.loop.add_callback(stop.set)

    def _take_arrivals(self, pending: dict, arrived, local: dict,
                       timeout: float | None) -> None:
        """(`_read_failing_fast`'s reading: `arrived` says which of `pending` settled.)"""
        import queue
        until = None if timeout is None else time.monotonic() + timeout
        fine = []  # (finished with a value Dask says is no error: read at the end)
        with seceded():
            while pending:
                left = None if until is None else max(0.0, until - time.monotonic())
                try:
                    object_id = arrived.get(timeout=left)
                except queue.Empty:
                    raise exc.GetTimeoutError(f"get timed out after {timeout} s") from None
                fut = pending.pop(object_id, None)
                if fut is None:
                    continue
                if not isinstance(fut, concurrent.futures.Future) and \
                        fut.key not in self._lost and fut.status == "finished" and \
                        not _may_be_error(fut):
                    fine.append((object_id, fut))
                    continue
                value = local[object_id] = self._value(object_id, fut)
                if value.is_error:
                    return
        local.update(self._values(fine))

    def _settled(self, fut) -> bool:
        """Whether a call result or Dask Future can be read without waiting."""
        return fut.done() or (not isinstance(fut, concurrent.futures.Future) and
                              fut.key in self._lost)

    def _wait_all(self, futures: list, timeout: float | None) -> None:
        """Wait for call results and Dask Futures alike; GetTimeoutError."""
        if all(self._settled(f) for f in futures):
            return
        if timeout == 0:
            raise exc.GetTimeoutError("get timed out after 0 s")
        calls = [f for f in futures if isinstance(f, concurrent.futures.Future)]
        dask = [f for f in futures if not isinstance(f, concurrent.futures.Future)]
        until = None if timeout is None else time.monotonic() + timeout
        with seceded():
            if calls:
                _, not_done = concurrent.futures.wait(calls, timeout)
                if not_done:
                    raise exc.GetTimeoutError(f"get timed out after {timeout} s")
            if dask:
                left = None if until is None else max(0.0, until - time.monotonic())
                try:
                    wait_futures(dask, left)
                except TimeoutError:
                    raise exc.GetTimeoutError(f"get timed out after {timeout} s") from None

    def _value(self, object_id: bytes, fut, contained: bool = True) -> SerializedObject:
        """The value of a settled call result or Dask Future. `contained`: hold
        the refs inside it while this process holds `object_id`."""
        if isinstance(fut, concurrent.futures.Future):
            value = fut.result()
            if contained:
                self._hold_contained(object_id, value)
            return value
        if fut.key in self._lost:
            return serialize(exc.ObjectLostError(
                f"object {object_id.hex()} is gone: nothing in the Dask cluster holds it any "
                f"more"), is_error=True)
        status = fut.status
        if status == "finished":
            try:
                value = fut.result(timeout=60)
            except Exception as err:  # noqa: BLE001 - the data went away meanwhile
                return serialize(exc.ObjectLostError(f"object {object_id.hex()} was lost: {err}"),
                                 is_error=True)
            if contained:
                self._hold_contained(object_id, value)
            return value
        if status == "cancelled":
            error = exc.TaskCancelledError(f"the task producing {object_id.hex()} was cancelled")
            if self._cancelled.get(object_id, True):
                # Running when cancelled (or not cancelled from here: unknown), as
                # on other backends: a TaskError whose cause is the cancellation.
                error = exc.TaskError(f"task {object_id.hex()}", "cancelled by beamlet.cancel()",
                                      error, None).as_instanceof_cause()
            return serialize(error, is_error=True)
        if status == "lost":
            return serialize(exc.ObjectLostError(
                f"object {object_id.hex()} was lost with the Dask worker holding it"),
                is_error=True)
        try:
            error = fut.exception(timeout=60)
        except Exception as err:  # noqa: BLE001
            error = err
        return serialize(exc.WorkerCrashedError(
            f"Dask could not compute {object_id.hex()}: {type(error).__name__}: {error}"),
            is_error=True)

    def _hold_contained(self, object_id: bytes, value: SerializedObject) -> None:
        if value.refs and object_id not in self._contained:
            self._contained[object_id] = value.refs
            self._refs.incr_all(value.refs)
            self.hold_all(value.refs)

    def entry(self, object_id: bytes) -> SerializedObject | None:
        """The object if it is a stored error that has arrived (Dask names a
        finished key's type: only a FailedObject is fetched), else None: for
        the Runtime's log of errors nobody read, as the last ref goes."""
        call = self._calls.get(object_id)
        if call is not None:
            if not call.done():
                return None
            value = call.result()
            return value if value.is_error else None
        with self._lock:
            fut = self._futures.get(object_id)
        if fut is None or fut.status != "finished":
            return None
        kind = fut.type
        if not (isinstance(kind, type) and issubclass(kind, FailedObject)):
            return None
        if asyncio._get_running_loop() is not None:
            # (On an event loop's thread, where a ref may be dropped by a garbage
            # collection: the client's, where a fetch cannot block, or the
            # scheduler's, when it runs in this process, which would stop answering
            # while its fetch waited for it.)
            return None
        return self._value(object_id, fut)

    def wait(self, object_ids: Sequence[bytes], num_returns: int,
             timeout: float | None = None) -> set[bytes]:
        self._check_open()
        self._flush_for_read()
        import queue
        futures = {i: self._pending(i) for i in dict.fromkeys(object_ids)
                   if i not in self._local}
        ready = {i for i in object_ids if i in self._local}
        ready.update(i for i, f in futures.items() if self._settled(f))
        if len(ready) >= num_returns or (timeout is not None and timeout <= 0):
            return ready
        until = None if timeout is None else time.monotonic() + timeout
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        stop = self._watch({i: f for i, f in futures.items() if i not in ready},
                           arrived.put, done=True)
        try:
            with seceded():
                while len(ready) < num_returns:
                    left = None if until is None else until - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    try:
                        ready.add(arrived.get(timeout=left))
                    except queue.Empty:
                        break
        finally:
            stop()
        # (As many as are ready now, as Dask's wait and the loop before it answered.)
        ready.update(i for i, f in futures.items() if i not in ready and self._settled(f))
        return ready

    def contains(self, object_id: bytes) -> bool:
        if object_id in self._local:
            return True
        call = self._calls.get(object_id)
        if call is not None:
            return call.done()
        with self._lock:
            fut = self._futures.get(object_id)
        return fut is not None and (fut.done() or fut.key in self._lost)

    def delete(self, object_ids: Iterable[bytes]) -> None:
        released = []
        calls = self._calls
        with self._lock:
            for object_id in object_ids:
                if calls:
                    calls.pop(object_id, None)
                unsent = False  # (a put still waiting for `_flush_puts`: now never sent)
                if object_id in self._put_here:
                    self._put_here.discard(object_id)
                    del self._local[object_id]
                    if self._puts:
                        with self._batch_lock:
                            value = self._puts.pop(key_of(object_id), None)
                            if value is not None:
                                self._puts_bytes -= _nbytes(value)
                                unsent = True
                fut = self._futures.pop(object_id, None)
                submitted = object_id in self._submitted and not unsent
                self._submitted.discard(object_id)
                if fut is not None and submitted and not fut.done():
                    self._unwanted[object_id] = fut
                    fut.add_done_callback(lambda f, i=object_id: self._ran(i))
                elif fut is not None:
                    fut.release()
                contained = self._contained.pop(object_id, None)
                if contained:
                    released.extend(contained)
        if released:
            self._refs.decr_all(released)

    def running_call(self, object_id: bytes) -> bool:
        """Whether `object_id` is the result of an actor call not ended yet."""
        call = self._calls.get(object_id)
        return call is not None and not call.done()

    def cancel(self, object_id: bytes) -> bool:
        """Cancel the task producing `object_id` unless it has finished (Dask's
        cancel would delete a finished result); whether it was cancelled. An
        actor call's result reads as cancelled from now on (the call itself,
        sent already, runs: as on Dask, nothing stops it)."""
        call = self._calls.get(object_id)
        if call is not None:
            error = exc.TaskError(f"task {object_id.hex()}", "cancelled by beamlet.cancel()",
                                  exc.TaskCancelledError(f"the actor call producing "
                                                         f"{object_id.hex()} was cancelled"),
                                  None).as_instanceof_cause()
            try:
                call.set_result(as_stored(serialize(error, is_error=True)))
            except concurrent.futures.InvalidStateError:
                return False  # (it ended already)
            return True
        self.flush()
        fut = self.future(object_id)
        if fut.done():
            return False
        running = False
        worker = self.client.run_on_scheduler(_assigned_worker, fut.key)
        if worker is not None:
            try:
                running = bool(self.client.run(_executing, fut.key, workers=[worker])
                               .get(worker))
            except Exception:  # noqa: BLE001 - the worker left meanwhile
                running = False
        self._cancelled[object_id] = running
        fut.cancel(force=True)  # (also when other clients hold the ref: a cancel is the task's)
        return True

    def _ran(self, object_id: bytes) -> None:
        with self._lock:
            fut = self._unwanted.pop(object_id, None)
        if fut is not None:
            fut.release()

    def on_ready(self, object_id: bytes, callback: Callable[[bytes], object]) -> None:
        if object_id in self._local:
            callback(object_id)
            return
        call = self._calls.get(object_id)
        if call is not None:  # (called at once if it is done, else where it is set)
            call.add_done_callback(lambda _f: callback(object_id))
            return
        fut = self.future(object_id)
        if fut.key in self._lost:
            callback(object_id)
            return
        fut.add_done_callback(lambda _f: callback(object_id))

    def stats(self) -> dict:
        return {"num_objects": len(self._futures.keys() | self._calls.keys()), "bytes_used": 0}

    def close(self) -> None:
        """Release every Future this process holds."""
        with self._batch_lock:  # (puts whose refs never left: nobody can read them now)
            self._puts, self._puts_bytes = {}, 0
        self.flush()  # (submitted tasks run, as on every backend)
        with self._lock:
            self._closed = True
            futures, self._futures = list(self._futures.values()), {}
            futures.extend(self._pinned)
            futures.extend(self._unwanted.values())
            self._unwanted = {}
            self._pinned = []
            self._contained.clear()
            for object_id in self._put_here:
                self._local.pop(object_id, None)
            self._put_here.clear()
            self._calls = {}
            handover, self._handover = self._handover, None
        for fut in futures:
            fut.release()
        if handover is not None:
            handover.shutdown(wait=False)

    def _check_open(self) -> None:
        if self._closed:
            raise exc.BackendError("the Dask backend was shut down")

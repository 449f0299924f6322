"""A worker process of the local backend, and its client side of the backend.

A worker connects to the driver, then runs what it is sent: tasks one at a
time on its main thread, or, once it hosts an actor, the actor's calls (in
order; on a thread pool with ``max_concurrency``; on an event loop for async
actors). Messages are taken off the socket by the main thread itself while
it waits for work, and by a reader thread while it runs a task that asks for
something or runs long (see `_Reading`): tasks go to the inbox, replies wake
the thread that asked, a cancel interrupts the main thread, and end-of-file
(the driver is gone) ends the process.

Inside a task the full API works: `WorkerBackend` forwards submissions, puts
and control-store calls to the driver, reads shared-memory objects directly,
and reports which objects this process holds references to.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

from ... import exceptions as exc
from ...core import runtime as _runtime
from ...core.actor import concurrency_group_of
from ...core.execution import Executor
from ...core.interfaces import Backend, ControlStore, ObjectStore, Scheduler
from ...core.resources import ResourcePool
from ...core.serialization import SerializedObject
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, TASK, TaskSpec
from . import protocol as P
from . import shm
from ...core.auth import AuthenticationError
from .transport import SPIN, ProtocolError, SocketConnection, UnixSocketTransport, poll_spinning


IDLE_FLUSH_INTERVAL = 0.2  # seconds: how soon an idle worker reports released refs
#: Seconds a task runs on the main thread before the reader thread starts
#: reading for it (a cancel or an exit waits at most about this long).
READER_TAKEOVER = 0.005
#: Seconds without a task after which the reader thread stops looking at the
#: clock and sleeps until the next task starts (an idle worker costs nothing);
#: after a long task it does not look at the clock at all (see `_Reading`).
READER_PARK_AFTER = 0.05
#: A task that follows one that ran at least this many seconds with no message
#: coming meanwhile has the socket armed in the reader thread's wait instead
#: of its timer (see `_Reading`): two system calls of the main thread's per
#: task, which a task this long does not feel.
ARM_AFTER = 0.001
#: A generator's items are sent in batches (one write for many): at most this
#: many, and none waits longer than STREAM_FLUSH_DELAY seconds (or past the
#: next message the worker sends, whichever comes first).
STREAM_BATCH = 256
STREAM_FLUSH_DELAY = 0.001


class _Requests:
    """Outstanding requests to the driver, answered by REPLY messages."""

    def __init__(self):
        self._next = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, Any] = {}
        #: Called after each new request: someone must read the socket for its reply.
        self.on_new: Callable[[], None] = lambda: None

    def new(self, callback: Callable | None = None) -> tuple[int, concurrent.futures.Future | None]:
        with self._lock:
            self._next += 1
            req_id = self._next
        if callback is not None:
            self._waiting[req_id] = callback
            fut = None
        else:
            fut = concurrent.futures.Future()
            self._waiting[req_id] = fut
        self.on_new()
        return req_id, fut

    def pending(self) -> bool:
        """Whether a request still awaits its reply."""
        return bool(self._waiting)

    def forget(self, req_id: int) -> None:
        self._waiting.pop(req_id, None)

    def answer(self, req_id: int, ok: bool, payload: Any) -> None:
        waiter = self._waiting.pop(req_id, None)
        if waiter is None:
            return  # the asker timed out and left
        if isinstance(waiter, concurrent.futures.Future):
            if ok:
                waiter.set_result(payload)
            else:
                waiter.set_exception(payload)
        else:
            waiter(ok, payload)

    def fail_all(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            if isinstance(waiter, concurrent.futures.Future):
                waiter.set_exception(error)


class WorkerObjectStore(ObjectStore):
    """Reads objects from the driver (inline) or from shared memory (by name)."""

    def __init__(self, backend: "WorkerBackend"):
        self._b = backend
        # Entries the driver shipped with the running task(s), by id.
        self.shipped: dict[bytes, Any] = {}

    def materialize(self, object_id: bytes, entry) -> SerializedObject:
        if isinstance(entry, P.ShmEntry):
            refs = self._b.runtime.refs
            refs.incr(object_id)
            try:
                return shm.read_object(entry.name, lambda: refs.decr(object_id))
            except FileNotFoundError:
                refs.decr(object_id)
                raise exc.ObjectLostError(f"object {object_id.hex()} is no longer in "
                                          f"shared memory") from None
        return entry

    def put(self, object_id: bytes, value: SerializedObject) -> None:
        self._b.told += 1
        self._b.send(P.Put(object_id, self._b.entries_for([value])[0]))

    def get(self, object_ids: Sequence[bytes], timeout: float | None = None,
            fail_fast: bool = False) -> list[SerializedObject]:
        shipped = self.shipped
        if all(i in shipped for i in object_ids):
            try:
                return [self.materialize(i, shipped[i]) for i in object_ids]
            except exc.ObjectLostError:
                # Spilled since it was shipped (it was not pinned for us): ask the
                # driver, which brings it back into shared memory.
                for i in object_ids:
                    shipped.pop(i, None)
        for attempt in range(3):
            entries = self._b.request("get", (list(object_ids), True, fail_fast), timeout,
                                      f"get() timed out after {timeout}s")
            try:
                return [None if e is None else self.materialize(i, e)
                        for i, e in zip(object_ids, entries)]
            except exc.ObjectLostError:
                # Spilled to disk between the reply and our mapping: asking again
                # brings it back into shared memory (if it still exists at all).
                if attempt == 2:
                    raise

    def wait(self, object_ids: Sequence[bytes], num_returns: int,
             timeout: float | None = None) -> set[bytes]:
        ids = list(object_ids)
        if timeout != 0:
            try:
                # Blocking: our CPUs are lent out while this thread waits.
                return self._b.request("wait", (ids, num_returns, True), timeout, "")
            except exc.GetTimeoutError:
                pass
        return self._b.request("wait", (ids, 0, False), 60.0, "wait() got no answer")

    def contains(self, object_id: bytes) -> bool:
        return self._b.request("wait", ([object_id], 0, False), 60.0,
                               "the object store did not answer") == {object_id}

    def delete(self, object_ids) -> None:
        """The driver owns the objects: it frees them when no process refers to them."""

    def on_ready(self, object_id: bytes, callback: Callable[[bytes], Any]) -> None:
        # The reply carries the entry, so the callback's get() needs no second
        # request (which only this reader thread could answer).
        def arrived(ok: bool, payload) -> None:
            if ok:
                self.shipped[object_id] = payload[0]
            callback(object_id)

        self._b.request_async("get", ([object_id], False), arrived)


class ControlStoreClient(ControlStore):
    """The driver's control store, through requests: each call is one round trip,
    and the driver's store runs it atomically (so compare-and-set stays atomic)."""

    def __init__(self, backend: "WorkerBackend"):
        self._b = backend

    def _call(self, op: str, *args):
        return self._b.request("control", (op, args), 60.0, f"control store {op} timed out")

    def put(self, table, key, value, overwrite=True) -> bool:
        return self._call("put", table, key, value, overwrite)

    def compare_and_set(self, table, key, expected, new) -> bool:
        return self._call("compare_and_set", table, key, expected, new)

    def get(self, table, key):
        return self._call("get", table, key)

    def delete(self, table, key) -> bool:
        return self._call("delete", table, key)

    def keys(self, table) -> list:
        return self._call("keys", table)

    def publish(self, channel, message) -> None:
        self._call("publish", channel, message)

    def subscribe(self, channel, callback):
        raise NotImplementedError("subscribing from inside a task is not supported yet")


class SchedulerClient(Scheduler):
    """The node's scheduler, through messages."""

    def __init__(self, backend: "WorkerBackend", totals: dict):
        self._b = backend
        resources = {k: v for k, v in totals.items() if k not in ("CPU", "GPU")}
        self._pool = ResourcePool(totals.get("CPU", 0), totals.get("GPU", 0), resources)

    def submit(self, spec: TaskSpec) -> None:
        # Infeasible requests fail here, at the call site (the node judges those
        # in placement groups: only it knows them; a cluster's driver judges a
        # cluster job's against every node, and its get raises the error).
        if spec.kind != ACTOR_METHOD and spec.placement_group is None and not self._b.cluster:
            self._pool.check_feasible(spec.resources, spec.display_name)
        b = self._b
        b.told += 1
        cancelled = b.hosts_actor and spec.kind == TASK and b.child_submitted(spec)
        b.send(P.Submit(spec))
        if cancelled:  # (submitted by a call cancelled already: see Worker.cancel_children)
            self.cancel(spec.return_ids[0])

    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True) -> None:
        self._b.told += 1
        self._b.send(P.CancelTask(object_id, force, recursive))

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        self._b.told += 1
        self._b.send(P.KillActor(actor_id, no_restart))

    def create_placement_group(self, info) -> None:
        raise ValueError("on the local backend placement groups are created and removed by "
                         "the driver; pass the group to tasks and actors to use it")

    remove_placement_group = create_placement_group

    def actor_exited(self, actor_id: bytes) -> None:
        self._b.send(P.KillActor(actor_id, True, True))

    def total_resources(self) -> dict[str, float]:
        return self._b.request("resources", ("total",), 60.0, "resources timed out")

    def available_resources(self) -> dict[str, float]:
        return self._b.request("resources", ("available",), 60.0, "resources timed out")


class WorkerBackend(Backend):
    """The local backend as a worker process sees it."""

    name = "local"
    parallel = True
    isolated = True
    zero_copy = True
    placement_groups = True  # (tasks run in them; the driver creates and removes them)
    owns_objects = False

    def __init__(self, conn: SocketConnection, config: dict, runtime):
        self.conn = conn
        self.runtime = runtime
        self.session = config["session"]
        self.node_id = config["node_id"]
        self.worker_id = config["worker_id"]
        self.inline_threshold = config["inline_threshold"]
        # As the job's owner says: its items must reach the consumer through it.
        self.streaming_generators = bool(config.get("streaming_generators"))
        # A cluster's job: the tasks we submit are placed by its driver, which
        # can pin them to any of the cluster's nodes (see `nodes`).
        self.cluster = bool(config.get("cluster"))
        if self.cluster:
            self.node_affinity = self.multi_node = True
        self.requests = _Requests()
        # Re-entrant: sending pickles, the GC may then free a ref, and that reports here.
        self._ref_lock = threading.RLock()
        self._added: list[bytes] = []
        self._released: list[bytes] = []
        #: Messages held back to go out in one write (generator items, and the
        #: reference changes made before them), in order; see put_stream_item.
        self._held: list = []
        self._flush_soon: threading.Event | None = None  # (the flusher's, once started)
        self.object_store = WorkerObjectStore(self)
        self.control_store = ControlStoreClient(self)
        self.scheduler = SchedulerClient(self, config.get("resources", {}))
        #: Set by the Worker: ``worker_blocks(True)`` before a thread waits in a
        #: blocking get or wait, ``worker_blocks(False)`` after.
        self.worker_blocks: Callable[[bool], None] = lambda blocked: None
        #: How many submissions, puts, cancels and kills were sent to the node
        #: (a direct call that made any answers through the node: see
        #: Worker._finish_direct).
        self.told = 0
        #: Set by the Worker once an actor lives here, and what notes a task
        #: one of its calls submits (``Worker._child_submitted``: True if that
        #: call was cancelled already), for a recursive cancel of that call.
        self.hosts_actor = False
        self.child_submitted: Callable[[TaskSpec], bool] = lambda spec: False

    def nodes(self) -> list[dict]:
        """This node; in a cluster's job, every node of the cluster (its nodes table)."""
        if not self.cluster:
            return super().nodes()
        from ...core.tables import Tables
        return [{"NodeID": n.node_id, "Alive": str(n.state) == "ALIVE",
                 "Resources": dict(n.resources),
                 "NodeManagerAddress": n.address.rsplit(":", 1)[0]}
                for n in Tables(self.control_store).nodes()]

    # -- messages ---------------------------------------------------------------
    def send(self, message, then=None) -> None:
        """Send a message, preceded by any pending reference-count changes (and
        followed by `then`, if given, in the same write)."""
        # Under the lock: two threads must not send their batches out of order
        # (a release overtaking its add would leave the object pinned for ever).
        with self._ref_lock:
            added, released = self._added, self._released
            if added or released or self._held or then is not None:
                self._added, self._released = [], []
                messages, self._held = self._held, []
                if added or released:
                    messages.append(P.Refs(added, released))
                messages.append(message)
                if then is not None:
                    messages.append(then)
                self.conn.send_many(messages)
            else:
                self.conn.send(message)

    def send_done(self, task_id: bytes, value: SerializedObject, retryable: bool) -> None:
        """`send` of ``Done(task_id, [value], retryable)``, `value` inline without
        buffers (the usual answer to a call), in its wire form at once."""
        with self._ref_lock:
            if not (self._added or self._released or self._held):
                self.conn.send_encoded(P.inline_done(task_id, value, retryable))
                return
        self.send(tuple.__new__(P.Done, (task_id, [value], retryable)))

    def flush_refs(self) -> None:
        """Send pending reference-count changes (and held-back items) now (an
        idle worker would otherwise keep the objects it let go of alive until
        its next message)."""
        with self._ref_lock:
            added, released = self._added, self._released
            self._added, self._released = [], []
            messages, self._held = self._held, []
            if added or released:
                messages.append(P.Refs(added, released))
            if messages:
                self.conn.send_many(messages)

    def request(self, op: str, args: tuple, timeout: float | None, timeout_text: str):
        """Send request `op` (a key of protocol.REQUESTS) with `args` (its fields
        after req_id) and wait for its reply."""
        blocking = (op == "get" and args[1] is True) or (op == "wait" and args[2] is True)
        if blocking:
            self.worker_blocks(True)  # (gives back tasks sent ahead: see Worker.blocks)
        try:
            req_id, fut = self.requests.new()
            self.send(P.REQUESTS[op](req_id, *args))
            try:
                return fut.result(timeout)
            except concurrent.futures.TimeoutError:
                self.requests.forget(req_id)
                if op in ("get", "wait"):
                    self.send(P.Forget(req_id))  # so the driver takes our CPUs back
                raise exc.GetTimeoutError(timeout_text or f"{op} timed out after {timeout}s") \
                    from None
        finally:
            if blocking:
                self.worker_blocks(False)

    def put_stream_item(self, object_id: bytes, value: SerializedObject) -> None:
        """Queue the item to go out with the next message, in a batch of at most
        STREAM_BATCH, or STREAM_FLUSH_DELAY seconds from now (one write per item
        would cost the producer and the node's I/O thread a syscall each)."""
        message = P.StreamItem(object_id, self.entries_for([value])[0])
        with self._ref_lock:
            held = self._held
            if self._added or self._released:  # (they go before the item, as made)
                held.append(P.Refs(self._added, self._released))
                self._added, self._released = [], []
            held.append(message)
            if len(held) >= STREAM_BATCH:
                self._held = []
                self.conn.send_many(held)
                return
            first = len(held) == 1
        if first:
            self._flusher().set()

    def _flusher(self) -> threading.Event:
        """The event that asks the flusher thread to send held messages soon."""
        if self._flush_soon is None:
            with self._ref_lock:
                if self._flush_soon is None:
                    soon = threading.Event()
                    threading.Thread(target=self._flush_later, args=(soon,),
                                     name="beamlet-stream-flush", daemon=True).start()
                    self._flush_soon = soon
        return self._flush_soon

    def _flush_later(self, soon: threading.Event) -> None:
        while True:
            soon.wait()
            time.sleep(STREAM_FLUSH_DELAY)
            soon.clear()  # (what is held after this is sent below, or asks again)
            with self._ref_lock:
                held, self._held = self._held, []
                if held:
                    try:
                        self.conn.send_many(held)
                    except exc.BackendError:
                        return  # the driver is gone: this process ends

    def request_async(self, op: str, args: tuple, callback: Callable[[bool, Any], Any]) -> None:
        req_id, _ = self.requests.new(callback)
        self.send(P.REQUESTS[op](req_id, *args))

    def entries_for(self, values: list[SerializedObject]) -> list:
        """The entries to report for `values`: small ones inline; large ones written
        to segments the driver gives out, asked for in one request (all or none,
        so that a writer never waits for room while holding some).
        Raises ObjectStoreFullError when the store cannot make room."""
        threshold = self.inline_threshold
        if len(values) == 1 and values[0].total_bytes <= threshold:
            return values  # (the common case, without a list to build)
        large = [i for i, v in enumerate(values) if v.total_bytes > threshold]
        if not large:
            return values
        layouts = [shm.layout(values[i]) for i in large]
        req_id, fut = self.requests.new()
        self.send(P.AllocRequest(req_id, [total for _, total, _ in layouts]))
        try:
            # No timeout: the driver answers (at once, or when writes in flight
            # finish), or it is gone and this process ends.
            granted = fut.result()
        except BaseException:
            # Interrupted (a cancel): give back what the driver may grant still.
            fut.add_done_callback(lambda f: f.exception() is None and self._abandon(f.result()))
            raise
        entries = list(values)
        try:
            for i, (header, total, pieces), (name, size) in zip(large, layouts, granted):
                shm.fill_segment(name, header, total, pieces)
                entries[i] = P.ShmEntry(name, size, values[i].is_error, values[i].refs)
        except BaseException:
            self._abandon(granted)
            raise
        return entries

    def _abandon(self, granted) -> None:
        """Tell the driver these segments it gave us will not be reported."""
        self.request_async("abandon", ([name for name, _ in granted],), lambda ok, payload: None)

    # -- reference counting -------------------------------------------------------
    def object_referenced(self, object_id: bytes) -> None:
        with self._ref_lock:
            self._added.append(object_id)

    def object_released(self, object_id: bytes) -> None:
        self.object_store.shipped.pop(object_id, None)
        with self._ref_lock:
            self._released.append(object_id)

    def shutdown(self) -> None:
        self.conn.close()


class _PrefixedStream:
    """Prefixes each line a task prints with ``(name pid=N)``, as Ray does."""

    def __init__(self, stream):
        self._stream = stream
        self._at_line_start = True
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        ctx = _runtime.task_context.get()
        name = ctx.function_name if ctx is not None else "worker"
        prefix = f"({name} pid={os.getpid()}) "
        with self._lock:
            out = []
            for piece in text.splitlines(keepends=True):
                if self._at_line_start:
                    out.append(prefix)
                out.append(piece)
                self._at_line_start = piece.endswith("\n")
            self._stream.write("".join(out))
            if "\n" in text:
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Reading:
    """Who reads the worker's socket, so that running a task needs no thread hand-off.

    The main thread reads the socket itself whenever it waits for work, so a
    task that arrives wakes the thread that runs it, directly. While the main
    thread runs a task, the socket must still be read (replies to the task's
    requests, a cancel, the order to exit, and calls queued behind it, so that
    the node never blocks sending to us): the reader thread does it, but only
    once that is needed, i.e. a request awaits its reply or the task has run
    `READER_TAKEOVER` seconds. A short task that asks for nothing costs no
    thread switch; what arrives meanwhile waits in the socket's buffer. When
    the main thread wants the socket back, the reader thread lets it go.

    A task that follows one that ran `ARM_AFTER` or longer, with no message
    coming meanwhile, is likely the same (an env runner's rollouts, an ES
    worker's episodes): for it the socket is armed in the reader thread's
    wait instead of the timer (an ``epoll`` set that the main thread changes
    without waking it), so that the reader thread sleeps through the task
    unless a message comes, and then reads it at once. The timer's way costs
    such a task up to two wake-ups of the reader thread (the timer, and the
    "look again soon" of tasks that come and go), each taking the GIL from the
    running task (a forced switch, and one more for each system call it makes
    meanwhile); with two such workers on two cores, those wake-ups also
    preempt the other worker. Calls that arrive while others run (a pipeline)
    keep the timer's way, so that they wait in the buffer for the main thread.

    A cluster actor's direct channels to drivers (``zmq/direct.py``) are read
    the same way, by whichever thread reads the socket (`add_direct`); while
    there are any, tasks take the timer's way.

    One thread at a time reads (it holds `_read_lock`); the flags, changed
    under `_state`, say who should. `dispatch(message)` handles each message
    in the thread that read it; `pending()` says whether a reply is awaited.
    """

    def __init__(self, conn: SocketConnection, dispatch: Callable[[Any], None],
                 pending: Callable[[], bool]):
        self.conn = conn
        self._dispatch = dispatch
        self._pending = pending
        self._read_lock = threading.Lock()
        self._state = threading.Lock()
        self._main_reading = False
        self._reader_active = False
        self._parked = False  # the reader thread sleeps until woken (the main thread idles)
        self._busy_since: float | None = None  # when the main thread's task started
        self._last_start = 0.0  # when the main thread's last task started
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # wakes the reader thread
        #: What the reader thread waits on while it does not read: `_wake`,
        #: and the socket while a task runs `_armed` (see the class's doc).
        self._idle_wait = select.epoll()
        self._idle_wait.register(self._wake, select.EPOLLIN)
        self._idle_wait.register(conn.fileno(), 0)
        self._armed = False  # the socket is in `_idle_wait` (set and cleared by the main thread)
        self._arm_next = False  # the last task ran ARM_AFTER or longer, and no message came
        self._message_came = False  # (the reader thread read a message the armed task did not wait for)
        self._sock_poll = select.poll()
        self._spin_next = True  # (see read_until)
        self._sock_poll.register(conn.fileno(), select.POLLIN)
        #: Direct channels (cluster actors: see `Worker.open_direct`), read by
        #: whichever thread reads the socket: channel -> its handler; those
        #: connected and not yet watched; the eventfd that wakes the main
        #: thread for them; the reader thread's poll (see `_adopt`).
        self.direct: dict = {}
        self._new_direct: list = []
        self._posted = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sock_poll.register(self._posted, select.POLLIN)
        self._both: select.poll | None = None

    def start(self) -> None:
        threading.Thread(target=self._reader, name="beamlet-reader", daemon=True).start()

    def _signal(self) -> None:
        os.eventfd_write(self._wake, 1)

    def add_direct(self, wire, handle: Callable[[Any], None]) -> None:
        """(Any thread.) Read `wire` from now on as the socket is read,
        `handle(message)` for each message (it raises to close the channel)."""
        with self._state:
            self._new_direct.append((wire, handle))
        # (The main thread adopts it as it waits for work, else whichever
        # thread reads the socket next: see _read.)
        os.eventfd_write(self._posted, 1)

    def _adopt(self) -> None:
        """(The thread holding the read lock.) Watch the channels connected since."""
        try:
            os.eventfd_read(self._posted)
        except BlockingIOError:
            pass
        with self._state:
            new, self._new_direct = self._new_direct, []
        for wire, handle in new:
            self.direct[wire] = handle
            self._sock_poll.register(wire.fileno(), select.POLLIN)
            if self._both is not None:
                self._both.register(wire.fileno(), select.POLLIN)

    def _read_direct(self) -> None:
        """Dispatch what the direct channels hold now; close those that ended or broke."""
        if self._new_direct:
            self._adopt()
        for wire, handle in list(self.direct.items()):
            try:
                for message in wire.recv_all():
                    handle(message)
            except EOFError:
                self._drop_direct(wire)
            except Exception as err:  # noqa: BLE001 - a broken channel is closed, not fatal
                print(f"beamlet worker {os.getpid()}: closed a direct channel: {err!r}",
                      file=sys.__stderr__, flush=True)
                self._drop_direct(wire)

    def _drop_direct(self, wire) -> None:
        self.direct.pop(wire, None)
        for poll in (self._sock_poll, self._both):
            if poll is not None:
                try:
                    poll.unregister(wire.fileno())
                except (KeyError, ValueError):
                    pass
        wire.close()

    def _read(self) -> None:
        """Dispatch what the socket (and the direct channels) hold now; the
        process ends with the socket's connection."""
        if self.direct or self._new_direct:
            self._read_direct()
        try:
            for message in self.conn.recv_all():
                self._dispatch(message)
        except EOFError:
            os._exit(1)  # the driver is gone: nothing left to do
        except Exception as err:  # noqa: BLE001 - a broken reader must not hang the worker
            print(f"beamlet worker reader failed: {err!r}", file=sys.__stderr__, flush=True)
            os._exit(1)

    # -- the main thread ------------------------------------------------------------
    def read_until(self, inbox, on_idle: Callable[[], None]) -> None:
        """Read (in the main thread) until `inbox` holds something; `on_idle()`
        after each `IDLE_FLUSH_INTERVAL` without a message."""
        if self._armed:
            self._armed = False
            self._idle_wait.modify(self.conn.fileno(), 0)
        with self._state:
            self._main_reading = True
            if self._reader_active:
                self._signal()  # let go of the socket
        self._read_lock.acquire()
        try:
            conn, poll = self.conn, self._sock_poll
            timeout = IDLE_FLUSH_INTERVAL * 1000
            if SPIN and not inbox and not conn.buffered:
                # Spin only while messages have been coming that quickly (a sync
                # caller's next call): a worker whose last wait was longer, or
                # whose last spin found nothing, sleeps at once, so idle workers
                # on a busy machine burn no CPU (they look again, by the time
                # their next wait took, after each message).
                if self._spin_next:
                    self._spin_next = poll_spinning(poll, SPIN)
                else:
                    started = time.perf_counter()
                    if poll.poll(timeout):
                        self._spin_next = time.perf_counter() - started <= SPIN
                    else:
                        on_idle()
            while not inbox:
                if not conn.buffered and not poll.poll(timeout):
                    on_idle()
                    continue
                self._read()
        finally:
            with self._state:
                self._main_reading = False
                wake = self._pending() and not self._reader_active
                if wake:
                    self._parked = False
            self._read_lock.release()
            if wake:
                self._signal()

    def task_started(self) -> None:
        # No lock: the reader thread sets _parked before it reads these, and we
        # set these before we read _parked, so one of us sees the other.
        self._busy_since = self._last_start = time.monotonic()
        self._message_came = False
        if self._arming():
            if not self._armed:
                # (Before this, the reader thread does not look at the socket:
                # it reads the flag only once woken, by the socket or a signal.)
                self._armed = True
                self._idle_wait.modify(self.conn.fileno(), select.EPOLLIN)
            return
        if self._parked:
            with self._state:
                if self._parked:
                    self._parked = False
                    self._signal()

    def _arming(self) -> bool:
        """Whether the next task has the socket armed (see the class's doc)."""
        return self._arm_next and not (self.direct or self._new_direct)

    def task_finished(self) -> None:
        """(Once the task's result is made, before it is sent: the next call
        may come back before the main thread gets to read.)"""
        since, self._busy_since = self._busy_since, None
        if since is not None:
            self._arm_next = (not self._message_came
                              and time.monotonic() - since >= ARM_AFTER)

    def nudge(self) -> None:
        """A reply is awaited: make sure a thread reads the socket."""
        if self._main_reading or self._reader_active:
            return  # (it either goes on, or wakes the reader as it stops: see read_until)
        with self._state:
            if not self._main_reading and not self._reader_active:
                self._parked = False
                self._signal()

    # -- the reader thread ----------------------------------------------------------
    def _reader(self) -> None:
        both = select.poll()
        both.register(self.conn.fileno(), select.POLLIN)
        both.register(self._wake, select.POLLIN)
        with self._read_lock:  # (the channels' descriptors are added under it: _adopt)
            self._both = both
            for wire in self.direct:
                both.register(wire.fileno(), select.POLLIN)
        conn = self.conn
        sock, wake, idle_wait = conn.fileno(), self._wake, self._idle_wait
        message_came = False  # (the socket is readable: it was armed for the running task)
        while True:
            with self._state:
                now = time.monotonic()
                since, last = self._busy_since, self._last_start
                timeout = None
                if self._main_reading:
                    activate = False
                elif self._pending():
                    activate = True
                elif self._armed and not (self.direct or self._new_direct):
                    # A message came: read it. If the task still runs, it did
                    # not wait for it (a pipeline): the next task is not armed.
                    activate = message_came
                    if message_came and since is not None:
                        self._message_came = True
                elif since is not None:
                    timeout = since + READER_TAKEOVER - now
                    activate = timeout <= 0
                else:
                    activate = False
                if not activate and timeout is None and not self._arming() \
                        and now - last < READER_PARK_AFTER:
                    timeout = READER_TAKEOVER  # tasks come and go: look again soon
                self._reader_active = activate
                if not activate and timeout is None:
                    self._parked = True
                    if self._busy_since is not since or self._last_start != last:
                        self._parked = False  # a task started meanwhile
                        timeout = 0
            message_came = False
            if not activate:
                for fd, _ in idle_wait.poll(-1 if timeout is None else timeout):
                    if fd == wake:
                        self._drain_wake()
                    elif fd == sock:
                        message_came = True
                continue
            with self._read_lock:
                try:
                    while not self._main_reading:
                        if not conn.buffered:
                            both.poll()
                            self._drain_wake()
                            if self._main_reading:
                                break
                        self._read()
                        # Not needed any more (the long task ended, no reply is
                        # awaited)? Then the main thread reads once it runs dry.
                        since = self._busy_since
                        if not self._pending() and (
                                since is None or time.monotonic() - since < READER_TAKEOVER):
                            break
                finally:
                    with self._state:
                        self._reader_active = False

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass


def _new_execute(spec: TaskSpec) -> P.Execute:
    """The inbox's form of a call that came over a direct channel."""
    return tuple.__new__(P.Execute, (spec, [], None, None, False))


class Worker:
    """The worker's loop: take EXECUTE messages, run them, send DONE."""

    def __init__(self, conn: SocketConnection, config: dict):
        self.conn = conn
        self.config = config
        self.runtime = _runtime.Runtime(lambda cfg, rt: WorkerBackend(conn, cfg, rt), config)
        _runtime.set_current(self.runtime)
        self.backend: WorkerBackend = self.runtime.backend
        self.executor = Executor(self.runtime)
        self.inbox: collections.deque = collections.deque()  # EXECUTEs read, not yet run
        self.reading = _Reading(conn, self.handle, self.backend.requests.pending)
        self.backend.requests.on_new = self.reading.nudge
        self._blocked = 0  # threads waiting in a blocking get or wait (under _inbox_lock)
        self._inbox_lock = threading.Lock()
        self.backend.worker_blocks = self.blocks
        self.current_task: bytes | None = None
        self._interrupt_for: bytes | None = None  # the task a cancel signal is meant for
        self.cancelled: set[bytes] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        # The actor's concurrency groups (Ray's concurrency_groups): name -> its
        # own thread pool, or semaphore for an async actor; None without groups.
        self._groups: dict[str, Any] | None = None
        self._actor_options: dict = {}
        self._async_tasks: dict[bytes, asyncio.Task] = {}
        #: Calls that came over a direct channel (cluster actors, zmq/direct.py):
        #: task id -> (the channel, its token, when it came), until answered there.
        self._direct_calls: dict[bytes, tuple] = {}
        #: Actor calls running in the actor's thread pool (threaded actors).
        self._threaded: set[bytes] = set()
        #: Running actor calls (node's or direct) that submitted tasks: task
        #: id -> the first return ids of those tasks (None once it was
        #: cancelled recursively: what it submits from then on is cancelled
        #: at once). The node cannot note them (``LocalScheduler.submitted_by``
        #: goes by the one task a worker runs; an actor runs calls at once,
        #: and never sees a direct call): the worker cancels them itself
        #: (`cancel_children`). Under `_children_lock`.
        self._children: dict[bytes, list | None] = {}
        self._children_lock = threading.Lock()
        self.backend.child_submitted = self._child_submitted

    # -- reading ------------------------------------------------------------------
    def handle(self, message) -> None:
        """Act on a message from the node (in whichever thread read it)."""
        kind = type(message)
        if kind is P.Execute:
            if message.ahead:
                with self._inbox_lock:
                    if not self._blocked:
                        self.inbox.append(message)
                        return
                self.backend.send(P.Returned([message.spec.task_id]))  # (see blocks)
            else:
                self.inbox.append(message)
        elif kind is P.Reply:
            self.backend.requests.answer(message.req_id, message.ok, message.payload)
        elif kind is P.Interrupt:
            if message.recursive:
                self.cancel_children(message.task_id)
            self.cancel(message.task_id, message.force)
        elif kind is P.Revoke:
            self.give_back(message.task_id)
        elif kind is P.Exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        elif kind is P.DirectConnect:
            threading.Thread(target=self._serve_direct, args=tuple(message),
                             name="beamlet-direct", daemon=True).start()
        else:
            raise ProtocolError(f"the driver sent a message that is not one of the "
                                f"protocol's: {P.describe(message)}")

    def blocks(self, blocked: bool) -> None:
        """A thread starts (`blocked`) or stops waiting in a blocking get or
        wait. Meanwhile the node lends this worker's CPUs out, so the tasks it
        sent ahead to run after the current one (EXECUTE `ahead`: the
        scheduler's pipelining) must run elsewhere, or one of them may be what
        the current task waits for: they are given back unstarted (RETURNED),
        those already here and those that arrive while it waits."""
        if not blocked:
            with self._inbox_lock:
                self._blocked -= 1
            return
        with self._inbox_lock:
            self._blocked += 1
            ahead = []
            if self.executor.actors:
                return  # (an actor's worker is sent its calls only, never a task ahead)
            for message in list(self.inbox):  # (a copy: the main thread may pop meanwhile)
                if message.ahead:
                    try:
                        self.inbox.remove(message)
                    except ValueError:
                        continue  # the main thread took it: it runs here after all
                    ahead.append(message)
        if ahead:
            self.backend.send(P.Returned([m.spec.task_id for m in ahead]))

    def give_back(self, task_id: bytes) -> None:
        """The node wants task `task_id`, sent ahead, back: return it unless it
        started (then its answer tells the node where it ran)."""
        with self._inbox_lock:
            for message in list(self.inbox):
                if message.ahead and message.spec.task_id == task_id:
                    try:
                        self.inbox.remove(message)
                    except ValueError:
                        return  # the main thread took it just now: it runs here
                    break
            else:
                return
        self.backend.send(P.Returned([task_id]))

    def cancel(self, task_id: bytes, force: bool) -> None:
        if force and self.current_task == task_id:
            os._exit(1)
        self.cancelled.add(task_id)
        task = self._async_tasks.get(task_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)
        elif self.current_task == task_id:
            # A signal (not just a flag) so that a sleeping or blocked task wakes up.
            self._interrupt_for = task_id
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # -- running --------------------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:
        # Only a cancel sends SIGINT here (workers have their own session, so a
        # Ctrl-C in the driver's terminal does not reach them); between tasks it is moot.
        if self.current_task is not None and self.current_task == self._interrupt_for:
            raise KeyboardInterrupt  # (not a cancel that arrived as another task started)

    def run(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.reading.start()
        inbox, reading = self.inbox, self.reading
        # Idle (or an actor working on other threads): report the refs let go of since
        # the last message, e.g. the ones a finished task's result held.
        on_idle = self.backend.flush_refs
        has_gpus = bool(self.config.get("resources", {}).get("GPU"))
        while True:
            if not inbox:
                reading.read_until(inbox, on_idle)
            spec, blobs, entries, gpu_ids, _ = inbox.popleft()
            if blobs or entries or gpu_ids is not None or has_gpus:
                for function_id, blob in blobs:
                    self.executor.add_function(function_id, blob)
                if entries:
                    self.backend.object_store.shipped.update(entries)
                if gpu_ids is not None:
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
                elif has_gpus and spec.kind != ACTOR_METHOD:
                    # No GPU asked for: see none (as in Ray), not the last task's device.
                    os.environ["CUDA_VISIBLE_DEVICES"] = ""
            if spec.kind == ACTOR_METHOD:
                if self._loop is not None:
                    self._start_async(spec)
                    continue
                if self._pool is not None:
                    pool = self._in_group(spec, self._pool)
                    if pool is not None:
                        pool.submit(self._run_one, spec)
                    continue
                if spec.actor_options is not None and self._in_group(spec, self) is None:
                    continue  # (a group the actor does not have: failed)
            reading.task_started()
            try:
                self._run_one(spec, main=True)
            finally:
                reading.task_finished()

    def _run_one(self, spec: TaskSpec, main: bool = False) -> None:
        if spec.task_id in self.cancelled:
            self.cancelled.discard(spec.task_id)
            self._finish(spec, self.executor._failure(
                spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled")))
            return
        if main:
            self.current_task = spec.task_id
        else:
            self._threaded.add(spec.task_id)
        try:
            result = self.executor.execute(spec)
            self.current_task = None
        except KeyboardInterrupt:  # a cancel that landed just outside the task's frames
            self.current_task = None
            result = self.executor._failure(
                spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
        if self.cancelled:
            self.cancelled.discard(spec.task_id)
        if main:
            self.reading.task_finished()
        else:
            self._threaded.discard(spec.task_id)
        if spec.kind == ACTOR_CREATION and result.error is None:
            self._setup_actor(spec)
        if self.executor.exiting is not None:
            self._exit_actor(spec, result)
        else:
            self._finish(spec, result)

    def _finish(self, spec: TaskSpec, result, exiting: bytes | None = None) -> None:
        """Send the call's result; with `exiting` (the actor's id, which called
        exit_actor()), the actor's exit notice right behind it in the same
        write: the node must learn of the exit before it hands the result to
        the caller, who could otherwise send its next call to the dying actor."""
        if self._direct_calls:
            call = self._direct_calls.pop(spec.task_id, None)
            if call is not None:
                self._finish_direct(call, spec, result, exiting)
                return
        if self._children:  # (after the call stopped counting as running: see cancel_children)
            with self._children_lock:
                self._children.pop(spec.task_id, None)
        if spec.args or spec.kwargs:
            for dep in spec.dependencies():
                self.backend.object_store.shipped.pop(dep, None)
        values = result.values
        if len(values) == 1 and exiting is None:
            value = values[0]
            if not value.buffers and len(value.data) <= self.backend.inline_threshold:
                # (entries_for's answer, and its Done in wire form at once)
                self.backend.send_done(spec.task_id, value, result.retryable)
                return
        entries = self._entries(spec, values)
        self.backend.send(tuple.__new__(P.Done, (spec.task_id, entries, result.retryable)),
                          None if exiting is None else P.KillActor(exiting, True, True))

    # -- direct channels (a cluster actor's calls from a driver: zmq/direct.py) ------
    def _serve_direct(self, token: bytes, address: str, key: bytes) -> None:
        """(A thread, until connected.) Connect to the driver that asked; from
        then on the channel is read as the node's socket is (`_Reading`), each
        call it sends put in the inbox, as the node's calls are; it ends with
        the channel (the driver left, or broke it: it hears from the node)."""
        from ..zmq import direct as D
        try:
            wire = D.connect(address, key, token)
        except (exc.BeamletError, OSError) as err:
            print(f"beamlet worker {os.getpid()}: no direct channel to {address}: {err}",
                  file=sys.__stderr__, flush=True)
            return
        calls, inbox, backend = self._direct_calls, self.inbox, self.backend

        def handle(message) -> None:
            tag = message[0] if type(message) is tuple and message else None
            if tag == "call" and len(message) == 3:
                spec = TaskSpec(*message[1])
                if spec.kind != ACTOR_METHOD:
                    raise ProtocolError("a direct channel's call that is not an actor call")
                calls[spec.task_id] = (wire, token, time.perf_counter(), message[2],
                                       backend.told)
                inbox.append(_new_execute(spec))
            elif tag == "cancel" and len(message) == 3:
                if message[2]:  # (recursive)
                    self.cancel_children(message[1])
                self.cancel(message[1], False)
            else:
                raise ProtocolError(f"a message that is not one of the direct channel's: "
                                    f"{P.describe(message)}")

        self.reading.add_direct(wire, handle)

    def _running_call(self, task_id) -> bool:
        """Whether actor call `task_id` runs here (or waits to, for a direct
        call). Each way of running one stops counting it before `_finish`,
        which drops its `_children`."""
        return task_id == self.current_task or task_id in self._async_tasks \
            or task_id in self._threaded or task_id in self._direct_calls

    def _child_submitted(self, spec: TaskSpec) -> bool:
        """(The thread of a running call.) Task `spec` is being submitted: note
        it as a child of the actor call this thread (or coroutine) runs, if
        any. True: that call was cancelled recursively already (cancel it too)."""
        context = _runtime.task_context.get()
        if context is None:
            return False
        parent = context.task_id
        with self._children_lock:
            if not self._running_call(parent):
                return False
            children = self._children.get(parent, ())
            if children is None:
                return True
            if not children:
                children = self._children[parent] = []
            children.append(spec.return_ids[0])
            if not self._running_call(parent):  # (it finished meanwhile: see _finish)
                self._children.pop(parent, None)
        return False

    def cancel_children(self, task_id: bytes) -> None:
        """(A recursive cancel of actor call `task_id`, before the call is
        interrupted, which could end it first.) Cancel the tasks it
        submitted, through the node as a task's own cancel is (their children
        with them, wherever their driver placed them: the node names the ones
        it does not run to the driver), and those it submits from now on. A
        call that finished cancels nothing, as in Ray."""
        with self._children_lock:
            if not self._running_call(task_id):
                return
            children = self._children.get(task_id)
            self._children[task_id] = None
            if not self._running_call(task_id):  # (it finished meanwhile: see _finish)
                del self._children[task_id]
        for child in children or ():
            self.backend.scheduler.cancel(child, False, True)

    def _finish_direct(self, call: tuple, spec: TaskSpec, result,
                       exiting: bytes | None) -> None:
        """`_finish` of a call that came over a direct channel: a small result
        holding no refs goes back on it; any other through the node's store
        (``DirectDone``), the channel saying so (``routed``). So does the
        result of a call that told the node something meanwhile (submitted a
        task, put, cancelled, killed: ``told`` changed since the call came):
        the node must act on that before the caller sees the call end, as
        through the node (on its socket the result comes after it): e.g. a
        detached actor's nested task must reach its creator's driver, which
        owns it, before a caller that saw the call end lets that driver leave."""
        from ..zmq.direct import RESULT_MAX
        wire, token, came, tag, told = call
        if self._children:
            with self._children_lock:
                self._children.pop(spec.task_id, None)
        values = result.values
        value = values[0] if len(values) == 1 else None
        if value is not None and not value.refs and not result.retryable \
                and value.total_bytes <= RESULT_MAX and self.backend.told == told:
            if exiting is not None:  # (the node first: the caller's next call fails)
                self.backend.send(P.KillActor(exiting, True, True))
            buffers = [memoryview(b).tobytes() for b in value.buffers] if value.buffers else []
            try:
                wire.send(("done", spec.task_id, (value.data, buffers, (), value.is_error),
                           time.perf_counter() - came))
            except exc.BackendError:
                pass  # (its driver left, or will hear from the node: DirectLost)
            return
        entries = self._entries(spec, values)
        self.backend.send(P.DirectDone(token, spec.fields(), entries, result.retryable, tag),
                          None if exiting is None else P.KillActor(exiting, True, True))
        try:
            wire.send(("routed", spec.task_id, time.perf_counter() - came,
                       result.error is not None))
        except exc.BackendError:
            pass

    def _entries(self, spec: TaskSpec, values: list) -> list:
        """The entries to report for a call's result `values` (large ones in
        shared memory); an error entry per return if they cannot be stored."""
        try:
            return self.backend.entries_for(values)
        except (OSError, ValueError, exc.BeamletError) as err:
            error = exc.ObjectStoreFullError(f"cannot store the result of {spec.display_name}: "
                                             f"{err}")
            return [self.executor._failure(spec, error).values[0]] * len(spec.return_ids)

    def _setup_actor(self, spec: TaskSpec) -> None:
        self.backend.hosts_actor = True
        options = spec.actor_options
        self._actor_options = options
        groups = options.get("concurrency_groups")
        if options["is_async"]:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="beamlet-actor-loop",
                             daemon=True).start()
            self._loop = loop
            self._semaphore = asyncio.Semaphore(options["max_concurrency"])
            if groups:
                self._groups = {name: asyncio.Semaphore(n) for name, n in groups.items()}
        elif options["max_concurrency"] > 1 or groups:
            # (With groups even a default group of 1 gets a thread: the main
            # thread must stay free to hand calls to the other groups.)
            self._pool = concurrent.futures.ThreadPoolExecutor(
                options["max_concurrency"], thread_name_prefix="beamlet-actor")
            if groups:
                self._groups = {name: concurrent.futures.ThreadPoolExecutor(
                    n, thread_name_prefix=f"beamlet-actor-{name}")
                    for name, n in groups.items()}

    def _in_group(self, spec: TaskSpec, default):
        """The pool (or semaphore) of the call's concurrency group, `default`
        for the default group; None after failing a call to a group the actor
        does not have."""
        if self._groups is None and spec.actor_options is None:
            return default
        try:
            group = concurrency_group_of(spec, self._actor_options)
        except ValueError as err:
            self._finish(spec, self.executor._failure(spec, err))
            return None
        return default if group is None else self._groups[group]

    def _start_async(self, spec: TaskSpec) -> None:
        semaphore = self._in_group(spec, self._semaphore)
        if semaphore is None:
            return

        async def call():
            async with semaphore:
                if spec.task_id in self.cancelled:
                    raise asyncio.CancelledError()
                return await self.executor.execute_async(spec)

        def run_in_loop():
            task = self._loop.create_task(call())
            self._async_tasks[spec.task_id] = task
            task.add_done_callback(lambda t: self._async_done(spec, t))

        self._loop.call_soon_threadsafe(run_in_loop)

    def _async_done(self, spec: TaskSpec, task: asyncio.Task) -> None:
        self._async_tasks.pop(spec.task_id, None)
        self.cancelled.discard(spec.task_id)
        if task.cancelled():
            result = self.executor._failure(
                spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
        else:
            result = task.result()
        if self.executor.exiting is not None:
            self._exit_actor(spec, result)
        elif any(v.total_bytes > self.backend.inline_threshold for v in result.values):
            # Writing a large result to shared memory must not stall the event loop.
            threading.Thread(target=self._finish, args=(spec, result), daemon=True).start()
        else:
            self._finish(spec, result)

    def _exit_actor(self, spec: TaskSpec, result) -> None:
        """The actor called exit_actor() in the call `spec`: send its `result`
        with the exit notice, and end the actor gracefully. The node fails the
        calls queued behind it; then its ``__ray_shutdown__`` and this
        process's atexit handlers run, and the process exits (whatever thread
        this is)."""
        import atexit
        actor_id = self.executor.exiting
        self._finish(spec, result, exiting=actor_id)
        self.executor.end_actor(actor_id)
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def main(address: str, worker_id: str, secret: bytes) -> None:
    """Entry point of a worker process (forked by the zygote, which passes on
    the session's `secret`)."""
    # The driver listens before the zygote starts, so a refused connection (or one
    # closed before WELCOME) means it shut down while this worker was being forked:
    # leave at once and quietly, rather than retrying while the zygote waits for us.
    try:
        conn = UnixSocketTransport(secret, P.VERSION, P.CODEC).connect(address, timeout=0)
    except AuthenticationError as err:
        # (The driver logs its side; this one says what the worker saw.)
        if not err.closed:
            print(f"beamlet worker {os.getpid()}: {err}", file=sys.stderr, flush=True)
        return
    except exc.BackendError:
        return
    try:
        conn.send(P.Hello(worker_id, os.getpid()))
        message = conn.recv(timeout=60)
    except (exc.BackendError, EOFError):
        return
    if type(message) is not P.Welcome:
        raise RuntimeError(f"unexpected first message from the driver: {P.describe(message)}")
    config = message.config
    config["worker_id"] = worker_id
    for path in reversed(config.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    if config.get("cwd"):
        try:
            os.chdir(config["cwd"])
        except OSError:
            pass
    sys.stdout = _PrefixedStream(sys.stdout)
    sys.stderr = _PrefixedStream(sys.stderr)
    Worker(conn, config).run()

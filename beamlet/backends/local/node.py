"""A node: the engine that runs tasks on one machine.

`Node` is everything of the local backend that is not the driver: the
session (its lock, private temp directory and secret), the listener its
workers connect to, the zygote that forks them, the shared-memory object
store, the scheduler, and one I/O thread that serves every connection and
answers the requests workers send (the dispatch table below). The
single-machine backend runs one inside the driver's process
(``driver.py``); a cluster node daemon runs the same class.

What a node needs from the owner of a job's objects (the driver: it counts
the references and accepts submissions) is the narrow `JobOwner` interface,
so the node never reaches into a Runtime or a Backend. Connections are
served only through the ``Listener.poll`` boundary of
``core/interfaces.py``, so a listener of another transport (ZeroMQ, for
drivers and peer nodes on other machines) can be served by the same loop.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import selectors
import shutil
import sys
import threading
import time
import traceback
from typing import Protocol

from ... import exceptions as exc
from ...core import auth
from ...core.interfaces import ControlStore, Joined, Left, Received
from ...core.refcount import ReferenceCounter
from ...core.resources import ResourcePool
from ...core.serialization import SerializedObject
from ...core.task_spec import ACTOR_METHOD, TASK, TaskSpec
from . import protocol as P
from . import shm
from .launcher import WorkerLauncher
from .object_store import LocalObjectStore
from .scheduler import LocalScheduler, WorkerInfo
from .session import SessionLock, sweep
from .transport import SPIN, ProtocolError, SocketConnection, UnixSocketTransport

_EXECUTE = P.Execute

#: The ControlStore methods a worker may call through a "control" request.
CONTROL_OPS = frozenset({"put", "compare_and_set", "get", "delete", "keys", "publish"})

DEFAULT_STORE_FRACTION = 0.3
IDLE_WORKER_TIMEOUT = 2.0  # seconds before a surplus idle worker is let go
WORKER_START_TIMEOUT = 30.0  # seconds before a worker that never said hello is given up
CHORES_INTERVAL = 0.5  # seconds between the I/O thread's periodic chores
RELEASE_BATCH = 1000  # released small objects that wake the I/O thread to free them
DIRECT_SLICE = 0.05  # seconds a get reading its result itself waits before looking around
#: Seconds a worker's connection claimed for a sync call's reply (see
#: `Node.claim`) goes unread at most, when no get comes to read it.
CLAIM_TIMEOUT = 0.005
#: Seconds after the last claim during which the I/O thread looks at the claims
#: every CLAIM_TIMEOUT, instead of being woken for each new one.
CLAIM_LINGER = 0.05


class JobOwner(Protocol):
    """What a node asks of the process that owns a job's objects (its driver)."""

    #: The job's reference counts: the node takes references on what queued
    #: tasks and stored objects hold, and frees an object only when its count
    #: is zero.
    refs: ReferenceCounter

    def job_config(self) -> dict:
        """What a worker of the job needs before its first task: ``job_id``,
        ``namespace``, ``sys_path`` (prepended to the worker's), ``cwd`` and
        (optional) ``runtime_env``, the job's (its env_vars go into the specs
        the worker submits)."""

    def accept(self, spec: TaskSpec) -> None:
        """A task submitted by a worker (nested): check, count and schedule it
        as if the owner had submitted it. An exception fails the task."""

    # Optional: ``fetch(object_ids)``, called (I/O thread) when a worker waits
    # for objects this node's store lacks, for an owner that keeps objects
    # elsewhere (a cluster driver): it should bring them into the store. An
    # owner without it (the local driver) has every object in the node's store.
    # Optional: ``pin(object_ids)`` / ``unpin(object_ids)``, called for the refs
    # the node's workers hold (borrow) and let go of, for an owner whose own
    # counts are elsewhere (a cluster driver); without them, ``refs`` counts them.
    # Optional: ``defer_results(deferring)``, called (I/O thread) with True before
    # and False after each turn of the loop that handles workers' messages: an
    # owner that ships results elsewhere (a cluster node) may send those stored
    # meanwhile together at the end.
    # Optional: ``cancel_elsewhere(object_ids, force)``, called (I/O thread) when
    # a worker's cancel names tasks this node does not run (placed on other
    # nodes by an owner that places tasks on many: a cluster driver), or their
    # children that it does not run: the owner cancels them where they run.
    # Several jobs (a cluster node's drivers): the owner sets the scheduler's
    # ``job_of`` (spec -> its job). A job is itself a JobOwner (its
    # ``job_config``, ``accept`` (told also the actor whose worker submitted,
    # or None: ``accept(spec, actor_id)``), ``fetch``, ``pin``, ``unpin``): what a worker
    # sends about its task goes to its worker's job (``WorkerInfo.job``), and
    # what has no job (None) to this owner.


def log_error(what: str, err: BaseException | None = None) -> None:
    """Log an unexpected error (with its traceback) that beamlet survives."""
    detail = ("".join(traceback.format_exception(err)) if err is not None
              else traceback.format_exc())
    print(f"beamlet: error {what}:\n{detail}", file=sys.stderr, end="", flush=True)


def default_store_capacity() -> int:
    """Bytes of shared memory a node's store may use unless told: a fraction
    of RAM, and no more than what /dev/shm has free."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        st = os.statvfs(shm.SHM_DIR)
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = total
    return int(min(total * DEFAULT_STORE_FRACTION, shm_free * 0.8))


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: a node holds a
    socket per worker, and a thousand actors are a thousand workers (a common
    default soft limit is 1024)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # not allowed here: keep what we have


class Node:
    """Worker processes, a shared-memory store and a scheduler on this machine.

    Made with validated settings; starts its I/O thread and the first
    `prestart_workers` workers at once. `close()` stops everything it started
    and removes every segment and file of its session. Thread-safe: the
    scheduler and store take their own locks. `direct_calls`: the owner's
    threads submit and get here themselves (the single-machine driver), so a
    sync actor call's reply is left for its caller to read (see `claim`).
    """

    def __init__(self, owner: JobOwner, control_store: ControlStore, pool: ResourcePool,
                 capacity: int, inline_threshold: int, max_workers: int | None = None,
                 prestart_workers: int | None = None, direct_calls: bool = False):
        _raise_open_files_limit()
        self.owner = owner
        self.control_store = control_store
        self.inline_threshold = inline_threshold
        sweep()  # what sessions that died without cleaning up left behind
        self._session_lock = SessionLock()  # before any segment or file of the session
        self.session = self._session_lock.session
        self.node_id = f"local-{self.session}"
        self.temp_dir = self._session_lock.temp_dir
        #: Every process of the session proves it holds this before it is heard
        #: (core/auth.py); workers get it from the zygote, which gets it on stdin.
        self.secret = auth.new_secret()
        self.transport = UnixSocketTransport(self.secret, P.VERSION, P.CODEC)
        self.listener = self.transport.listen(f"@beamlet-{self.session}")
        self.object_store = LocalObjectStore(owner.refs, self.session, capacity,
                                             inline_threshold, self._spill_dir)
        cpus = max(1, math.ceil(pool.total()["CPU"]))
        self._keep_workers = cpus
        self.launcher = WorkerLauncher(self.session, self.listener.address, self.temp_dir,
                                       self.secret, self._session_lock.fd)
        self.scheduler = LocalScheduler(self, self.object_store, control_store, pool,
                                        max_workers or 4 * cpus)
        self._closed = False
        #: Why the node cannot go on (its I/O thread died), once it cannot.
        self.failure: exc.BackendError | None = None
        self._released: collections.deque[bytes] = collections.deque()
        self._later = owner.refs.later  # (see drop_ref)
        self._release_pending = False
        self.object_store.reclaim = self._free_released
        self._workers: dict[SocketConnection, WorkerInfo | None] = {}  # joined -> its worker
        self._awaiting: dict[tuple, object] = {}  # (worker id, request id) -> store Waiter
        self._handlers = self._dispatch_table()
        #: Held while handling what peers sent: by the I/O thread, or by a thread
        #: that reads a worker's connection itself (see `_wait_here`), so the
        #: handling never runs in two threads at once. `_turn_holder`: its thread.
        self._turn = threading.Lock()
        self._turn_holder = 0
        self.object_store.wait_here = self._wait_here
        self.object_store.read_here = self.read_here
        self._peek = self.object_store.peek
        self._decr = owner.refs.decr
        self._tokens = self.scheduler.actor_tokens
        #: Worker connections claimed for the reply of a sync actor call (see
        #: `claim`) -> when the I/O thread reads them again, unless a get took
        #: them over first. `_claims_due`: release them all at its next turn.
        self._claims: dict[SocketConnection, float] = {}
        self._claims_due = False
        self._last_claim = 0.0
        self._io_deadline = math.inf  # when the I/O thread's wait ends at the latest
        self._wake_r, self._wake_w = os.pipe()
        self._io = threading.Thread(target=self._io_loop, name="beamlet-io", daemon=True)
        self._io.start()
        self._io_ident = self._io.ident
        self._actors = self.scheduler.actors
        self.direct_calls = direct_calls
        if direct_calls:
            self.scheduler.claim = self.claim
            self.scheduler.claims = self._claims
            self.scheduler.release_claims = self.release_claims
            self.object_store.claims = self._claims
            self.object_store.release_claims = self.release_claims
        self.scheduler.prestart(cpus if prestart_workers is None else prestart_workers)

    def _spill_dir(self) -> str:
        path = os.path.join(self.temp_dir, "spill")
        os.makedirs(path, mode=0o700, exist_ok=True)  # (inside the private temp dir)
        return path

    # -- the I/O thread -----------------------------------------------------------
    # It serves the listener (which authenticates newcomers without blocking on
    # them and reads every joined peer), answers the workers' messages and does
    # the periodic chores. Whatever goes wrong in handling one message is logged
    # and the loop goes on; a peer that breaks the protocol loses its
    # connection. Should the loop itself ever die, every waiter is failed (see
    # _io_died) instead of left hanging.
    def _io_loop(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # noqa: BLE001 - whatever it was, nobody may hang
            if not self._closed:
                self._io_died(err)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener.fileno(), selectors.EVENT_READ, "listener")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_chores = 0.0
        me = threading.get_ident()
        defer_results = getattr(self.owner, "defer_results", None)
        try:
            while not self._closed:
                ready = sel.select(timeout=self._claims_timeout() if self._last_claim
                                   else CHORES_INTERVAL)
                now = time.monotonic()
                if now >= next_chores:
                    next_chores = now + CHORES_INTERVAL
                    try:
                        self._chores()
                    except Exception:  # noqa: BLE001
                        log_error("in the I/O thread's periodic chores")
                for key, _ in ready:
                    if key.data == "wake":
                        os.read(self._wake_r, 4096)
                        self._free_released()
                # The listener is polled on every turn: it also gives up
                # handshakes past their deadline.
                with self._turn:
                    self._turn_holder = me
                    self.scheduler.defer_sends(True)  # (one send per worker per turn)
                    if defer_results is not None:
                        defer_results(True)
                    try:
                        for event in self.listener.poll():
                            if self._closed:
                                return
                            try:
                                self._on_event(event)
                            except Exception:  # noqa: BLE001
                                log_error("in the I/O thread")
                    finally:
                        self._turn_holder = 0
                        self.scheduler.defer_sends(False)
                        if defer_results is not None:
                            defer_results(False)
                if self._released or self._later:
                    self._free_released()
        finally:
            sel.close()

    def _claims_timeout(self) -> float:
        """(I/O thread, before it waits) Read again the claimed connections
        that are due (see `claim`); how long to wait."""
        self._io_deadline = math.inf  # (first: a claim made from now on wakes us)
        now = time.monotonic()
        timeout = CHORES_INTERVAL
        if self._claims or self._claims_due:
            with self._turn:
                due, self._claims_due = self._claims_due, False
                for conn, deadline in list(self._claims.items()):
                    if due or deadline <= now:
                        del self._claims[conn]
                        self.listener.resume(conn)
                    else:
                        timeout = min(timeout, deadline - now)
        if now - self._last_claim < CLAIM_LINGER:
            timeout = min(timeout, CLAIM_TIMEOUT)
        self._io_deadline = now + timeout
        return timeout

    def _chores(self) -> None:
        self.scheduler.reap_idle(self._keep_workers, IDLE_WORKER_TIMEOUT)
        relaunched = self.launcher.relaunch_if_dead()
        if self.launcher.error is not None:
            if self.scheduler.launch_error is None or self.scheduler.starting:
                self.scheduler.launcher_failed(self.launcher.error)
        elif relaunched or self.scheduler.starting:
            self.scheduler.restart_lost_forks(relaunched, WORKER_START_TIMEOUT)

    def _on_event(self, event) -> None:
        kind = type(event)
        if kind is Received:
            self._received(event.conn, event.messages)
        elif kind is Joined:
            self._workers[event.conn] = None  # until it says hello
        elif kind is Left:
            self._left(event.conn, event.error)

    def _received(self, conn: SocketConnection, messages: list) -> None:
        worker = self._workers.get(conn)
        for message in messages:
            if type(message) not in P.FROM_WORKER:
                self._drop(conn, ProtocolError(
                    f"a message that is not one of the protocol's: {P.describe(message)}"))
                return
            try:
                if worker is None:
                    worker = self._workers[conn] = self._hello(conn, message)
                    if worker is None:
                        self._drop(conn, None)
                        return
                else:
                    self._handlers[type(message)](worker, message)
            except ProtocolError as err:
                self._drop(conn, err)
                return
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the I/O thread
                if self._closed:
                    return
                log_error(f"handling {type(message).__name__} from worker "
                          f"{getattr(worker, 'pid', '?')}", err)

    def _drop(self, conn: SocketConnection, error: BaseException | None) -> None:
        """Close a connection that broke the protocol (`error`) or is not wanted."""
        conn.close()
        self._left(conn, error)

    def _left(self, conn: SocketConnection, error: BaseException | None) -> None:
        """A connection is gone; its worker, if it had said hello, is dead to
        the scheduler. `error`: why we closed it (logged)."""
        worker = self._workers.pop(conn, None)
        self._claims.pop(conn, None)
        if error is not None:
            who = (f"worker {worker.worker_id} ({conn.peer})" if worker is not None
                   else conn.peer)
            print(f"beamlet: closed the connection of {who}: {error}", file=sys.stderr,
                  flush=True)
        if worker is not None:
            self._forget_worker(worker)
            self.object_store.writer_died(worker.worker_id)
            self.scheduler.worker_died(worker)

    def _hello(self, conn: SocketConnection, message) -> WorkerInfo | None:
        """The first message of an authenticated connection: a worker's HELLO.
        None for a worker that is not awaited (a duplicate fork, or given up)."""
        if type(message) is not P.Hello:
            raise ProtocolError(f"the first message was not HELLO: {P.describe(message)}")
        worker_id, pid = message
        if type(worker_id) is not str or type(pid) is not int:
            raise ProtocolError(f"a malformed HELLO: {P.describe(message)}")
        if not self.scheduler.awaits_worker(worker_id):
            return None
        starting = self.scheduler.workers.get(worker_id)
        job = (starting.job if starting is not None else None) or self.owner
        conn.send(P.Welcome({
            **job.job_config(), "session": self.session, "node_id": self.node_id,
            "inline_threshold": self.inline_threshold,
            "resources": self.scheduler.total_resources()}))
        worker = self.scheduler.worker_connected(worker_id, pid, conn)
        if worker is not None:
            self.launcher.worker_started()
        return worker

    def _io_died(self, err: BaseException) -> None:
        """The I/O thread is dying: nothing will be read or answered any more,
        so fail every waiter (driver get/wait, futures, later submits) with a
        clear error, and close the workers' connections (they exit)."""
        log_error("the I/O thread died", err)
        self.failure = exc.BackendError(
            f"the local backend's I/O thread died ({err!r}), so no result can arrive any "
            f"more; call beamlet.shutdown() and init() again")
        self.scheduler.fail(self.failure)
        self.object_store.fail(self.failure)
        self._close_worker_connections()

    def _close_worker_connections(self) -> None:
        with self.scheduler.lock:
            workers = list(self.scheduler.workers.values())
        for worker in workers:
            if worker.conn is not None:
                worker.conn.close()

    # -- the request service: one handler per message a worker may send ------------
    def _dispatch_table(self) -> dict:
        return {
            P.Hello: self._on_second_hello, P.Done: self._on_done, P.Refs: self._on_refs,
            P.Submit: self._on_submit, P.Put: self._on_put, P.CancelTask: self._on_cancel,
            P.KillActor: self._on_kill_actor, P.Forget: self._on_forget,
            P.GetRequest: self._on_get, P.WaitRequest: self._on_wait,
            P.AllocRequest: self._on_alloc, P.AbandonRequest: self._on_abandon,
            P.ControlRequest: self._on_control, P.ResourcesRequest: self._on_resources,
            P.Returned: self._on_returned, P.StreamItem: self._on_stream_item,
            P.DirectDone: self._on_direct_done,
        }

    def _on_second_hello(self, worker: WorkerInfo, message: P.Hello) -> None:
        raise ProtocolError("a second HELLO on one connection")

    def _on_done(self, worker: WorkerInfo, message: P.Done) -> None:
        self.scheduler.task_done(worker, message.task_id, message.entries, message.retryable)
        self.object_store.drop_unreported(worker.worker_id, message.entries)

    def _on_direct_done(self, worker: WorkerInfo, message: P.DirectDone) -> None:
        """(A cluster node's: see zmq/direct.py.) Results of a call that came to
        the worker over a direct channel, which the node's store hands on."""
        direct_done = getattr(self.owner, "direct_done", None)
        if direct_done is None:
            raise ProtocolError("DirectDone from a worker of a node without direct channels")
        direct_done(worker, message)
        self.object_store.drop_unreported(worker.worker_id, message.entries)

    def _on_returned(self, worker: WorkerInfo, message: P.Returned) -> None:
        self.scheduler.tasks_returned(worker, message.task_ids)

    def _on_refs(self, worker: WorkerInfo, message: P.Refs) -> None:
        self.scheduler.record_borrow(worker, message.added, message.released)

    def _on_submit(self, worker: WorkerInfo, message: P.Submit) -> None:
        spec = message.spec
        self.scheduler.submitted_by(worker, spec)
        try:
            if worker.job is not None:
                worker.job.accept(spec, worker.actor_id)
            else:
                self.owner.accept(spec)
        except Exception as err:  # noqa: BLE001 - the submitter gets it from get()
            self.scheduler.reject(spec, exc.TaskError.from_exception(err, spec.display_name))

    def _on_put(self, worker: WorkerInfo, message: P.Put) -> None:
        self.object_store.put_from_worker(message.object_id, message.entry, worker.worker_id,
                                          worker.worker_id)

    def _on_stream_item(self, worker: WorkerInfo, message: P.StreamItem) -> None:
        object_id = message.object_id  # (the stream's prefix, then the item's index)
        self.scheduler.streamed[object_id[:-8]] = int.from_bytes(object_id[-8:], "little") + 1
        self.object_store.put_from_worker(message.object_id, message.entry, None,
                                          worker.worker_id)

    def _on_cancel(self, worker: WorkerInfo, message: P.CancelTask) -> None:
        try:
            elsewhere = self.scheduler.cancel(message.object_id, message.force,
                                              message.recursive, named=True)
        except ValueError:
            return  # (the same call in the driver raises; a task cannot be told)
        if elsewhere:
            cancel = getattr(worker.job or self.owner, "cancel_elsewhere", None)
            if cancel is not None:
                cancel(elsewhere, message.force)

    def _on_kill_actor(self, worker: WorkerInfo, message: P.KillActor) -> None:
        if message.exited and worker.actor_id == message.actor_id:
            self.scheduler.actor_exited(message.actor_id)
        else:
            self.scheduler.kill_actor(message.actor_id, message.no_restart)

    def _on_forget(self, worker: WorkerInfo, message: P.Forget) -> None:
        self._forget(worker, message.req_id)

    def _await(self, worker: WorkerInfo, req_id: int, blocking: bool, ids, count: int,
               answer, fail_fast: bool = False) -> None:
        """Run `answer()` once `count` of `ids` exist (`fail_fast`: or one exists
        as an error). While it waits, a `blocking`
        request's worker lends out its CPUs (its thread is stuck in get or wait),
        and the worker may give up on it (FORGET)."""
        store = self.object_store
        fetch = getattr(worker.job or self.owner, "fetch", None)  # (see JobOwner)
        if fetch is not None and not store.has_at_least(ids, len(ids)):
            fetch([i for i in ids if not store.contains(i)])
        if blocking and not store.has_at_least(ids, count):
            self.scheduler.worker_blocked(worker, req_id)
        else:
            blocking = False
        key = (worker.worker_id, req_id)

        def arrived():
            self._awaiting.pop(key, None)
            if blocking:
                self.scheduler.worker_unblocked(worker, req_id)
            answer()

        waiter = store.notify_when(ids, count, arrived, fail_fast=fail_fast)
        if waiter is not None:
            self._awaiting[key] = waiter
            if waiter.done:  # it ran in another thread before we noted it
                self._awaiting.pop(key, None)

    def _forget_worker(self, worker: WorkerInfo) -> None:
        """A worker died: withdraw the requests it was waiting on."""
        # (A copy first: answers arriving in other threads pop from the dict.)
        for key in [k for k in list(self._awaiting) if k[0] == worker.worker_id]:
            self.object_store.cancel_waiter(self._awaiting.pop(key, None))

    def _forget(self, worker: WorkerInfo, req_id: int) -> None:
        """The worker stopped waiting for request `req_id` (it timed out)."""
        waiter = self._awaiting.pop((worker.worker_id, req_id), None)
        if waiter is not None:
            self.object_store.cancel_waiter(waiter)
        self.scheduler.worker_unblocked(worker, req_id)

    def _reply(self, worker: WorkerInfo, req_id: int, ok: bool, payload) -> None:
        try:
            worker.conn.send(P.Reply(req_id, ok, payload))
        except exc.BackendError:
            pass  # it died; its EOF is being handled

    def _on_get(self, worker: WorkerInfo, message: P.GetRequest) -> None:
        store, req_id, ids = self.object_store, message.req_id, message.ids

        def answer_get():
            try:
                entries = [store.wire_entry(i) for i in ids]
                if None in entries and not (message.fail_fast and any(
                        e is not None and e.is_error for e in entries)):
                    raise exc.ObjectLostError("an object was freed before it could be read")
            except Exception as err:  # noqa: BLE001
                self._reply(worker, req_id, False, err)
                return
            self._reply(worker, req_id, True, entries)

        self._await(worker, req_id, message.blocking, ids, len(set(ids)), answer_get,
                    message.fail_fast)

    def _on_wait(self, worker: WorkerInfo, message: P.WaitRequest) -> None:
        store, req_id, ids, num_returns = (self.object_store, message.req_id, message.ids,
                                           message.num_returns)
        self._await(worker, req_id, message.blocking, ids, num_returns,
                    lambda: self._reply(worker, req_id, True, store.wait(ids, num_returns, 0)))

    def _on_alloc(self, worker: WorkerInfo, message: P.AllocRequest) -> None:
        sizes, req_id = message.sizes, message.req_id
        if not isinstance(sizes, list) or not sizes or \
                not all(type(n) is int and n > 0 for n in sizes):
            self._reply(worker, req_id, False, ValueError(f"bad segment sizes {sizes!r}"))
            return
        self.object_store.allocate(worker.worker_id, sizes,
                                   lambda ok, payload: self._reply(worker, req_id, ok, payload))

    def _on_abandon(self, worker: WorkerInfo, message: P.AbandonRequest) -> None:
        self.object_store.drop_unsealed(worker.worker_id, message.names)
        self._reply(worker, message.req_id, True, None)

    def _on_control(self, worker: WorkerInfo, message: P.ControlRequest) -> None:
        try:
            if message.op not in CONTROL_OPS:
                raise ValueError(f"unknown control store operation {message.op!r}")
            result = getattr(self.control_store, message.op)(*message.args)
        except Exception as err:  # noqa: BLE001 - the asker raises it
            self._reply(worker, message.req_id, False, err)
            return
        self._reply(worker, message.req_id, True, result)

    def _on_resources(self, worker: WorkerInfo, message: P.ResourcesRequest) -> None:
        result = (self.scheduler.total_resources() if message.which == "total"
                  else self.scheduler.available_resources())
        self._reply(worker, message.req_id, True, result)

    # -- a get that reads its result itself ----------------------------------------
    def _wait_here(self, object_id: bytes, arrived, timeout: float | None) -> bool:
        """Block a `get` of one object (in the caller's thread) until `arrived`
        is set or `timeout` passes; whether it was set.

        Rather than sleep until the I/O thread reads the result and wakes us (a
        thread switch per call), read it off the socket of the worker that makes
        it, handling everything that worker sends as the I/O thread would (its
        connection is paused in the listener meanwhile). Plain waiting when no
        worker runs that task yet, another thread reads that worker already, or
        this thread is the one handling messages (a get inside a handler)."""
        until = None if timeout is None else time.monotonic() + timeout
        got = self.read_here(object_id, functools.partial(arrived.wait, 0), until)
        if got is not None:
            return got
        if self._claims:
            self.release_claims()  # (what we wait for may need a reply they hold back)
        return arrived.wait(None if until is None else max(0.0, until - time.monotonic()))

    def read_here(self, object_id: bytes, done, until: float | None) -> bool | None:
        """Read and handle, in this thread, the messages of the worker that makes
        `object_id` until ``done()`` (True), `until` passes (False), or that is
        not possible (None: no worker runs that task, the task moved, its worker
        died, another thread reads that worker, or this thread is the one
        handling messages). What a `get` of one object does instead of
        sleeping until the I/O thread stores the result: no thread switch, and
        (with a `done` that looks at the store) no waiter to register and wake."""
        if self._turn_holder == threading.get_ident():
            return None
        tried = None
        while True:
            worker = self.scheduler.running_on(object_id)
            if worker is None or worker is tried or worker.conn is None:
                if self._released or self._later:
                    self._free_released()
                return None
            tried = worker
            got = self._read_worker(worker, object_id, done, until)
            if got is not None:
                return got

    def _read_worker(self, worker: WorkerInfo, object_id: bytes, done,
                     until: float | None) -> bool | None:
        """Read and handle `worker`'s messages until ``done()`` (True), `until`
        passes (False), or the task moved, the worker died or the connection
        is read elsewhere (None)."""
        conn = worker.conn
        with self._turn:
            if self._closed:
                return None
            # (Claimed for this call: paused already, see `claim`.)
            if self._claims.pop(conn, None) is None and not self.listener.pause(conn):
                return None
        gone = False
        got = None
        try:
            if self._released or self._later:
                self._free_released()  # (this thread holds no lock: a good moment)
            running_on = self.scheduler.running_on
            me = threading.get_ident()
            first = True  # (the caller has just found the task on this worker)
            spin = SPIN  # (the first wait only: a sync call's answer is often that quick)
            while True:
                # (First: the I/O thread may have handled the result before the pause.)
                if done():
                    got = True
                    return True
                if self._closed or conn.closed or (
                        not first and running_on(object_id) is not worker):
                    return None
                first = False
                left = DIRECT_SLICE if until is None else min(DIRECT_SLICE,
                                                              until - time.monotonic())
                if left <= 0:
                    return False
                readable = conn.readable(left, spin)
                spin = 0.0
                if readable:
                    error = None
                    try:
                        messages = conn.recv_all()
                    except EOFError:
                        messages = None
                    except ProtocolError as err:
                        messages, error = None, err
                    with self._turn:
                        if self._closed:
                            return None
                        self._turn_holder = me
                        try:
                            if messages is None:
                                gone = True
                                self._drop(conn, error)  # (what the I/O thread does at EOF)
                                return None
                            if messages:
                                self._received(conn, messages)
                        finally:
                            self._turn_holder = 0
                    if messages and done():
                        got = True
                        return True
        finally:
            if not gone:
                self._put_back(conn, got and worker.actor_id is not None)

    def _put_back(self, conn: SocketConnection, keep: bool) -> None:
        """End a direct read of `conn`: the I/O thread reads it again, or
        (`keep`: an actor's, read up to its reply, and nobody waits in the
        store for anything the I/O thread could bring) it stays claimed (see
        `claim`), so that the caller's next sync call to that actor needs
        neither the pause nor this resume (two epoll_ctl calls)."""
        with self._turn:
            if not (keep and self.direct_calls) or self._closed or conn.closed \
                    or self.object_store.has_waiters():
                self.listener.resume(conn)
                return
            self._last_claim = now = time.monotonic()
            deadline = self._claims[conn] = now + CLAIM_TIMEOUT
        if deadline < self._io_deadline:
            self._wake_io()

    # -- claims: a sync call's reply read by its caller only ---------------------------
    def claim(self, worker: WorkerInfo, message) -> None:
        """(The scheduler's `claim`: `message` is about to be sent to `worker`.)
        Before a call that is its actor's only one in flight, or a task that is
        all its worker is sent, goes out from a thread that is not handling
        messages (the caller's, which is about to `get` its result: a sync
        call), stop reading the worker's connection in the I/O thread now, as
        the caller's `_read_worker` would only once it gets there: a reply
        quicker than the caller's way from its send to its get (the worker
        often runs as soon as the send wakes it) would wake the I/O thread,
        which then handles it while the caller waits for its turn, two thread
        switches more per call. `_read_worker` takes the claim over (and, for
        an actor, may leave it in place after the reply, for the next call: see
        `_put_back`). If no get does within CLAIM_TIMEOUT (of the claim, or of
        the reply it was kept after), or anything else is sent to that worker,
        or a thread waits on the store otherwise (`release_claims`), or a task
        is submitted, the I/O thread reads the connection again.
        (Only with `direct_calls`.)"""
        conn = worker.conn
        claims = self._claims
        if type(message) is not _EXECUTE or message.ahead:
            if claims and conn in claims:
                self.release_claims(conn)  # (not a lone sync call's: let the I/O thread read)
            return
        spec = message.spec
        if spec.kind == ACTOR_METHOD:
            record = self._actors.get(spec.actor_id)
            lone = record is not None and len(record.inflight) == 1
        else:  # (a task, alone on its worker: nothing sent ahead of it)
            task = worker.task
            lone = spec.kind == TASK and task is not None and task.task_id == spec.task_id \
                and worker.next is None
        if not lone or threading.get_ident() == self._io_ident:
            if claims and conn in claims:
                self.release_claims(conn)
            return
        if conn in claims:
            # Kept since its last reply (see _put_back): nothing to do. (Should
            # the I/O thread take it back meanwhile, it reads the reply: no harm.)
            return
        turn = self._turn
        if not turn.acquire(False):
            return  # (messages are being handled, perhaps by this very thread)
        try:
            if self._closed or not self.listener.pause(conn):
                return
            self._last_claim = now = time.monotonic()
            deadline = claims[conn] = now + CLAIM_TIMEOUT
        finally:
            turn.release()
        if deadline < self._io_deadline:  # (it would sleep past it: see _claims_timeout)
            self._wake_io()

    def release_claims(self, conn: SocketConnection | None = None) -> None:
        """Have the I/O thread read the claimed connection `conn` (default:
        every one) again (see `claim`): at once, or at its next turn if
        messages are being handled in another thread. Called before a driver
        thread waits on the store otherwise than by reading a worker itself,
        or registers a callback there: what it waits for may need a reply a
        claim holds back."""
        if not self._claims:
            return
        turn = self._turn
        if self._turn_holder == threading.get_ident():
            self._release(conn)  # (this thread has the turn)
        elif turn.acquire(False):
            try:
                self._release(conn)
            finally:
                turn.release()
        else:
            self._claims_due = True  # (all of them: rare)
            self._wake_io()

    def _release(self, conn: SocketConnection | None) -> None:
        claims = self._claims
        for one in list(claims) if conn is None else (conn,):
            if claims.pop(one, None) is not None:
                self.listener.resume(one)

    def _wake_io(self) -> None:
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass  # closed: the node is shutting down

    # -- SchedulerHost (scheduler.py): what the scheduler may ask of this node ----------
    def start_worker(self, worker_id: str) -> None:
        self.launcher.fork(worker_id)

    def pin(self, object_ids, job=None) -> None:
        pin = getattr(job or self.owner, "pin", None)  # (see JobOwner)
        if pin is not None:
            pin(object_ids)
        else:
            self.owner.refs.incr_all(object_ids)

    def unpin(self, object_ids, job=None) -> None:
        unpin = getattr(job or self.owner, "unpin", None)
        if unpin is not None:
            unpin(object_ids)
        else:
            self.owner.refs.decr_all(object_ids)

    # -- freeing --------------------------------------------------------------------
    def release(self, object_id: bytes) -> None:
        """The owner holds no reference to the object any more: free it soon.

        Safe to call from anywhere, even from ``ObjectRef.__del__`` run by the
        cyclic GC in a thread that holds the scheduler's or the store's lock:
        it only queues the id (a deque append takes no lock); the I/O thread
        frees it, or a put that needs the room does at once.

        The I/O thread frees what is queued at each turn of its loop (and at
        least every `CHORES_INTERVAL`), so it is woken only for what should go
        at once: a value in shared memory or holding refs, an actor's handle
        token, or a long queue. A small value just waits for the next turn:
        waking the I/O thread for it cost a thread switch per task."""
        released = self._released
        released.append(object_id)
        if self._release_pending:
            return
        entry = self._peek(object_id)  # (LocalObjectStore keeps `entry`'s)
        if entry is None or type(entry) is SerializedObject:
            if (entry is None or not entry.refs) and len(released) < RELEASE_BATCH \
                    and object_id not in self.scheduler.actor_tokens:
                return
        if not self._release_pending:
            self._release_pending = True
            try:
                os.write(self._wake_w, b"r")
            except OSError:
                pass  # closed: nothing left to free

    def drop_ref(self, object_id: bytes) -> None:
        """How an ``ObjectRef`` of the owner lets go of its reference (the
        owner's ``refs.drop``): a ref to a small inline value that holds no refs,
        is no error and no actor's handle token hands its decrement over to
        `_free_released` (the caller's next wait for a result, or the I/O
        thread's next turn), which would only then free the value anyway: the
        caller goes on at once. Any other at once (`release` decides how soon
        its object goes; an unhandled error is logged at once)."""
        entry = self._peek(object_id)
        if type(entry) is SerializedObject and not entry.refs and not entry.is_error \
                and object_id not in self._tokens:
            self._later.append(object_id)
        else:
            self._decr(object_id)

    def _free_released(self) -> None:
        """Free the objects whose last reference went away (see `release`),
        after the decrements handed over by `drop_ref`."""
        self._release_pending = False
        refs = self.owner.refs
        if self._later:
            refs.settle()
        released = self._released
        count = refs.count
        delete = self.object_store.delete
        tokens = self.scheduler.actor_tokens
        while released:
            try:
                object_id = released.popleft()
            except IndexError:
                break
            if count(object_id):
                continue  # referenced again meanwhile (e.g. get_actor made a new handle)
            delete((object_id,))
            if object_id in tokens:  # (what token_released looks at first)
                self.scheduler.token_released(object_id)

    def describe(self) -> dict:
        """This node as ``beamlet.nodes()`` shows it."""
        return {"NodeID": self.node_id, "Alive": True, "NodeManagerAddress": "127.0.0.1",
                "Resources": self.scheduler.total_resources(),
                "ObjectStoreMemory": self.object_store.capacity}

    def close(self) -> None:
        """Stop the workers, the zygote and the I/O thread; remove every segment
        and file of the session. Idempotent."""
        if self._closed:
            return
        self.scheduler.shutdown()
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._io.join(5)
        self._close_worker_connections()
        self.listener.close()
        self.launcher.close()
        self.object_store.close()
        shm.remove_session_segments(self.session)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._session_lock.release()
        os.close(self._wake_r)
        os.close(self._wake_w)


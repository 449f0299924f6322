"""The local backend's scheduler: tasks and actors over a pool of worker processes.

It is node-local: it owns a ResourcePool, a LocalObjectStore and the workers
it started, and knows nothing about drivers beyond the Runtime that feeds it,
so a cluster node daemon can run the same class.

Tasks wait for their dependencies without holding resources, then queue by
resource shape; a queued task runs when its request fits and a worker is
idle (more workers are forked when none is). A task whose worker blocks in
`get` gives its CPUs back while it waits, so nested tasks never deadlock.
While tasks queue, a busy worker is also sent the next task of its shape
ahead of time (pipelining, `_fill_next`), so that it starts it without
waiting for the round trip of its answer; the resources pass from one task
to the next when the answer arrives. A worker whose task blocks gives the
task sent ahead back (RETURNED) and it runs elsewhere.
Actors each get a worker of their own; calls to an actor are sent to it as
soon as it is alive, in submission order, and it runs them in that order.

All state is guarded by one lock; the node's I/O thread (``node.py``) and
the threads that submit call in. Messages to workers are queued under it and
sent once it is released (`_SchedulerLock`), in order per worker and several
in one send when they pile up, so no thread waits on the lock while another
is in a send.
"""
from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterable, Protocol

from ... import exceptions as exc
from ...core import plugins
from ...core.actor import EXIT_REASON
from ...core.generators import stream_prefix
from ...core.interfaces import Scheduler
from ...core.placement import in_group, ready_value, removed_value
from ...core.resources import ResourcePool, asks_gpu
from ...core.scheduling import (CANCELLED, FAILED, FINISHED, RETRYING, ActorLifecycle,
                                attempt_status, may_retry)
from ...core.serialization import SerializedObject, deserialize, serialize
from ...core.tables import Tables
from ...core.task_events import (PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT, RUNNING,
                                 SUBMITTED_TO_WORKER)
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, ARG_REF, ARG_VALUE, TASK, TaskSpec
from . import protocol as P

if TYPE_CHECKING:
    from .object_store import LocalObjectStore

_get_ident = threading.get_ident
#: Makes a message (a NamedTuple) from a tuple of all its fields, in C: its class's
#: own __new__ is a Python function (a call per message on the hot path).
_new_tuple = tuple.__new__

_ALIVE = ActorLifecycle.ALIVE

STARTING, IDLE, BUSY, ACTOR, EXITING, DEAD = "STARTING", "IDLE", "BUSY", "ACTOR", "EXITING", "DEAD"

#: Calls an actor (one call at a time) is sent ahead of its answers; the calls
#: submitted beyond that wait and go in one batch (one send) at its next answer.
ACTOR_WINDOW = 2


class WorkerInfo:
    """The scheduler's view of one worker process."""

    __slots__ = ("worker_id", "pid", "conn", "state", "task", "actor_id", "known_functions",
                 "blocking", "borrowed", "started", "gpu_ids", "dispatched_at", "idle_since",
                 "next", "revoking", "outbox", "send_lock", "gpu_kind", "job")

    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.pid = 0
        self.conn = None
        self.state = STARTING
        self.task: TaskSpec | None = None  # the task it runs (normal workers)
        self.next: TaskSpec | None = None  # the task sent ahead, to run after it (see _fill_next)
        self.revoking = False  # asked to give `next` back (see _steal)
        self.outbox: collections.deque = collections.deque()  # messages to send (see _send)
        self.send_lock = threading.Lock()  # held while taking from the outbox and sending
        self.actor_id: bytes | None = None
        self.known_functions: set[bytes] = set()
        self.blocking: set[int] = set()  # its get requests still waiting (its CPUs are free)
        self.borrowed: collections.Counter = collections.Counter()
        self.started = time.monotonic()
        self.gpu_ids: list[int] = []
        # Whether what it ran used GPUs (None: it has run nothing yet). A worker
        # runs work of one kind only: a GPU task leaves its CUDA state behind.
        self.gpu_kind: bool | None = None
        self.dispatched_at = 0.0
        self.idle_since = 0.0
        #: The job it runs tasks of (see LocalScheduler.job_of); None: the node's one.
        self.job = None


class ActorRecord:
    __slots__ = ("spec", "state", "worker", "calls", "inflight", "restarts_left", "reason",
                 "gpu_ids", "token", "out_of_scope", "killed", "watched", "pinned", "held",
                 "batched")

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.state = ActorLifecycle.PENDING
        self.worker: WorkerInfo | None = None
        self.calls = CallQueue()  # calls not sent to it yet
        self.inflight: dict[bytes, TaskSpec] = {}
        restarts = spec.actor_options["max_restarts"]
        self.restarts_left = float("inf") if restarts == -1 else restarts
        self.reason = ""
        self.gpu_ids: list[int] = []
        self.token = spec.return_ids[0]
        self.out_of_scope = False
        self.killed = False
        self.watched: set[bytes] = set()  # queued calls we wait on arguments for
        self.pinned: list[bytes] = []  # constructor args kept for restarts
        # Calls in `inflight` not sent yet, with their messages: they go in one
        # batch at the next answer (only `batched` actors, which run one call at
        # a time, so that a call held back cannot be one that a running call
        # waits for).
        self.held: list[tuple[TaskSpec, P.Execute]] = []
        options = spec.actor_options
        self.batched = not options.get("is_async") and options.get("max_concurrency", 1) == 1 \
            and not options.get("concurrency_groups")


class CallQueue:
    """An actor's calls that were not sent to it yet, in order per caller.

    Calls from one caller run in submission order (a call whose arguments are
    still being computed holds back that caller's later calls, not other
    callers'), so each caller has its own FIFO: a call whose arguments arrive
    is looked at without rescanning anyone else's calls."""

    __slots__ = ("_by_caller", "_len")

    def __init__(self):
        self._by_caller: dict[bytes, collections.deque[TaskSpec]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def has_calls_of(self, caller_id: bytes) -> bool:
        return caller_id in self._by_caller

    def callers(self) -> list[bytes]:
        return list(self._by_caller)

    def _calls_of(self, caller_id: bytes) -> collections.deque:
        calls = self._by_caller.get(caller_id)
        if calls is None:
            calls = self._by_caller[caller_id] = collections.deque()
        return calls

    def push(self, spec: TaskSpec) -> None:
        self._calls_of(spec.caller_id).append(spec)
        self._len += 1

    def push_front(self, spec: TaskSpec) -> None:
        """Queue a call ahead of its caller's others (a retry goes first)."""
        self._calls_of(spec.caller_id).appendleft(spec)
        self._len += 1

    def head(self, caller_id: bytes) -> TaskSpec | None:
        calls = self._by_caller.get(caller_id)
        return calls[0] if calls else None

    def pop(self, caller_id: bytes) -> TaskSpec:
        calls = self._by_caller[caller_id]
        spec = calls.popleft()
        if not calls:
            del self._by_caller[caller_id]
        self._len -= 1
        return spec

    def remove(self, spec: TaskSpec) -> bool:
        calls = self._by_caller.get(spec.caller_id)
        if not calls or spec not in calls:
            return False
        calls.remove(spec)
        if not calls:
            del self._by_caller[spec.caller_id]
        self._len -= 1
        return True

    def drain(self) -> list[TaskSpec]:
        """Every queued call (removed from the queue)."""
        out = [spec for calls in self._by_caller.values() for spec in calls]
        self._by_caller.clear()
        self._len = 0
        return out


class _SchedulerLock:
    """The scheduler's re-entrant lock; the outermost release sends what was
    queued for workers meanwhile (see LocalScheduler._send), unless the
    releasing thread defers its sends (`deferring`: a thread ident)."""

    __slots__ = ("_lock", "_depth", "_flush", "_pending", "deferring")

    def __init__(self, flush, pending: collections.deque):
        self._lock = threading.RLock()
        self._depth = 0  # (changed only by the thread holding the lock)
        self._flush = flush
        self._pending = pending
        self.deferring = 0

    def __enter__(self):
        self._lock.acquire()
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        depth = self._depth = self._depth - 1
        self._lock.release()
        if not depth and self._pending and self.deferring != _get_ident():
            self._flush()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking, timeout):
            self._depth += 1
            return True
        return False

    def release(self) -> None:
        self.__exit__()


class SchedulerHost(Protocol):
    """What the scheduler needs from the node it runs in, and nothing more: the
    same scheduler serves the single-machine backend and a cluster node."""

    node_id: str

    def start_worker(self, worker_id: str) -> None:
        """Start a worker process that will connect and say hello as `worker_id`
        (then `worker_connected` is called); BackendError if none can be started."""

    def pin(self, object_ids: Iterable[bytes], job=None) -> None:
        """Keep these objects alive (a reference each) until `unpin`; `job`:
        whose they are (see LocalScheduler.job_of)."""

    def unpin(self, object_ids: Iterable[bytes], job=None) -> None:
        """Drop references taken by `pin` (an object may then be freed)."""


class LocalScheduler(Scheduler):
    """Runs specs on worker processes of one node; results go to `store`."""

    def __init__(self, host: SchedulerHost, store: "LocalObjectStore", control_store,
                 pool: ResourcePool, max_workers: int):
        self.host = host
        self.store = store
        self.tables = Tables(control_store)
        self.pool = pool
        self._unsent: collections.deque[WorkerInfo] = collections.deque()  # workers with an outbox
        self.lock = _SchedulerLock(self._flush_sends, self._unsent)
        self.max_workers = max_workers
        self.workers: dict[str, WorkerInfo] = {}
        self.idle: list[WorkerInfo] = []
        self.starting = 0
        self._waiting: dict[bytes, TaskSpec] = {}  # task_id -> spec waiting for its arguments
        # Resource shape -> ready specs (tasks and actor creations), FIFO per shape.
        self._queues: dict[tuple, collections.deque] = {}
        self.actors: dict[bytes, ActorRecord] = {}
        #: An actor's handle token -> its id (read without the lock: a dict read is atomic).
        self.actor_tokens: dict[bytes, bytes] = {}
        self._producer: dict[bytes, bytes] = {}    # return id -> task id, while unfinished
        self._tasks: dict[bytes, TaskSpec] = {}    # task id -> spec, while unfinished
        self._running: dict[bytes, WorkerInfo] = {}  # task id -> worker
        self._ahead: set[WorkerInfo] = set()  # workers that were sent a task ahead
        self._cancelled: set[bytes] = set()
        #: task id -> why it fails, for running tasks whose placement group was
        #: removed (their workers were killed; no retry).
        self._group_removed: dict[bytes, BaseException] = {}
        # task id -> return ids of the tasks it submitted (see submitted_by), while it runs
        self._children: dict[bytes, list[bytes]] = {}
        self._shipped: dict[bytes, list[bytes]] = {}  # task id -> shm args pinned for it
        #: A running generator's item-id prefix -> how many items it delivered
        #: (the node counts them; a retry does not store them again).
        self.streamed: dict[bytes, int] = {}
        self.closed = False
        self.failure: BaseException | None = None  # why the backend cannot go on (see fail)
        self.launch_error: BaseException | None = None  # why no worker can be started any more
        self._groups: dict[str, object] = {}  # placement group key -> its PlacementGroupInfo
        self._groups_pending = False  # whether some group waits to be reserved
        self._hosted_groups: set[str] = set()  # those a cluster's driver placed some bundles of
        #: A node that runs the tasks of several jobs (a cluster node's drivers)
        #: sets this: spec -> its job. A worker runs the tasks of one job only
        #: (it keeps the job's settings it started with): it is started for the
        #: job of the task that waits for it (`WorkerInfo.job`), and an idle one
        #: is given only its job's tasks. None: one job (`job` None everywhere).
        self.job_of = None
        #: A node that can hand a result to its owner without storing it sets
        #: this: (spec, return id, entry) -> whether it took the entry (else it
        #: is stored as usual). Called once per result of a finished task or
        #: call, under the lock, in place of the store's put.
        self.deliver = None
        #: A cluster node sets this: (spec, lent) -> None, told when the CPUs of
        #: `spec` (a task, or an actor's creation) are lent out while its worker
        #: waits in get or wait (True), and when they are taken back (False),
        #: so that the driver that placed it can count them free meanwhile.
        self.lending = None
        #: Jobs that ended (see job_ended): their idle workers are let go.
        self.ended_jobs: set = set()
        #: A node whose callers read a worker's replies in their own thread sets
        #: this: ``(worker, message)``, called (without the lock) just before
        #: each message for `worker` goes out (`message` None: several at once).
        #: See Node.claim.
        self.claim = None
        #: That node's claimed connections, and what hands them all back to
        #: its I/O thread: a task submitted behind a claimed one means that
        #: its caller is not about to get, so the claim would only hold a
        #: reply back.
        self.claims: dict | None = None
        self.release_claims = None

    # -- submission -----------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        kind = spec.kind
        if kind != ACTOR_METHOD:
            if self.claims:
                self.release_claims()
            resources = spec.resources
            if self.pool.feasible.get(id(resources)) is not resources:  # (checked before)
                self.pool.check_feasible(resources, spec.display_name)
        plugins.notify("beamlet_task_submitted", spec=spec)
        lock = self.lock
        lock._lock.acquire()  # (what `with self.lock` does, without its two calls)
        lock._depth += 1
        try:
            if self.closed:
                raise exc.BackendError(str(self.failure) if self.failure is not None
                                       else "beamlet has been shut down")
            task_id = spec.task_id
            self._tasks[task_id] = spec
            producer = self._producer
            for rid in spec.return_ids:
                producer[rid] = task_id
            if kind == ACTOR_METHOD:
                # (_submit_actor_call's common case, inline: nothing to wait for)
                record = self.actors.get(spec.actor_id)
                if record is not None and record.state is _ALIVE \
                        and spec.caller_id not in record.calls._by_caller \
                        and not spec.args and not spec.kwargs:
                    self._send_actor_call(record, spec)
                else:
                    self._submit_actor_call(spec)
                return
            if kind == TASK and not spec.args and not spec.kwargs:
                deps = None  # (the common case: nothing to wait for, no dependency scan)
            else:
                if kind == ACTOR_CREATION and spec.actor_id not in self.actors:
                    # Known from now on, so calls queue while it waits for its arguments.
                    record = self.actors[spec.actor_id] = ActorRecord(spec)
                    self.actor_tokens[record.token] = spec.actor_id
                    if record.restarts_left:
                        # A restart runs __init__ again with the same arguments: keep them.
                        record.pinned = spec.dependencies() + spec.contained_refs()
                    if spec.actor_options.get("detached"):
                        # Lives until killed: the owner holds its handle, not the creator.
                        record.pinned.append(record.token)
                    self.host.pin(record.pinned,
                                  None if self.job_of is None else self.job_of(spec))
                deps = spec.dependencies()
                if deps:
                    deps = [d for d in dict.fromkeys(deps) if not self.store.contains(d)]
            if not deps:
                # Nothing queued ahead of it: straight to an idle worker, if any.
                if kind == TASK and not self._queues and self._run_on_idle(spec):
                    return
                self._make_ready(spec)
                self._dispatch()
                return
            self._waiting[spec.task_id] = spec
            if self.task_progress is not None:
                self.task_progress((spec.task_id, spec.attempt, PENDING_ARGS_AVAIL, None,
                                    time.perf_counter()))
            # (Registered under the lock: if they arrived meanwhile, the callback
            # runs right here, and the lock is re-entrant.)
            self.store.notify_when(deps, len(deps), lambda: self._deps_ready(spec.task_id),
                                   broad=False)
        finally:
            depth = lock._depth = lock._depth - 1
            lock._lock.release()
            if not depth and self._unsent and lock.deferring != _get_ident():
                self._flush_sends()

    def _run_on_idle(self, spec: TaskSpec) -> bool:
        """Run a ready task on an idle worker of its kind and job now, if there is one
        and its resources are free; whether it did."""
        idle = self.idle
        if not idle:
            return False
        resources = spec.resources
        gpu = bool(resources.get("GPU")) or (
            spec.placement_group is not None and asks_gpu(resources))
        job = None if self.job_of is None else self.job_of(spec)
        worker = idle[-1]
        if worker.state == IDLE and (worker.gpu_kind is None or worker.gpu_kind is gpu) \
                and worker.job is job:
            gpu_ids = self.pool.try_acquire(resources)  # (the usual case, in one step)
            if gpu_ids is None:
                return False
            del idle[-1]
            self._run_task(spec, worker, gpu_ids)
            return True
        if not self.pool.fits(resources):
            return False
        worker = self._take_idle(gpu, job)
        if worker is None:
            return False
        self._run_task(spec, worker)
        return True

    def _deps_ready(self, task_id: bytes) -> None:
        with self.lock:
            spec = self._waiting.pop(task_id, None)
            if spec is None:
                return  # cancelled meanwhile
            if self.task_progress is not None:
                self.task_progress((task_id, spec.attempt, PENDING_NODE_ASSIGNMENT, None,
                                    time.perf_counter()))
            self._make_ready(spec)
            self._dispatch()

    def _make_ready(self, spec: TaskSpec, first: bool = False) -> None:
        """Queue a spec whose arguments exist (`first`: ahead of its shape's queue)."""
        shape = self.pool.shape(spec.resources)
        queue = self._queues.get(shape)
        if queue is None:
            queue = self._queues[shape] = collections.deque()
        if first:
            queue.appendleft(spec)
        else:
            queue.append(spec)

    # -- dispatch -------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start whatever fits now. Called with the lock held after any change."""
        if self.closed:
            return
        if self._groups_pending:
            self._reserve_groups()
        starved = False
        starved_jobs: dict = {}  # (with job_of: the jobs whose tasks wait for a worker)
        for shape, queue in list(self._queues.items()):
            while queue:
                spec = queue[0]
                record = self.actors.get(spec.actor_id) if spec.kind == ACTOR_CREATION else None
                if record is not None and record.state == ActorLifecycle.DEAD:
                    queue.popleft()  # killed while it waited to start
                    continue
                if not self.pool.fits(spec.resources):
                    break
                gpu = bool(spec.resources.get("GPU")) or (
                    spec.placement_group is not None and asks_gpu(spec.resources))
                job = None if self.job_of is None else self.job_of(spec)
                worker = self._take_idle(gpu, job)
                if worker is None:
                    starved = True
                    starved_jobs[job] = None
                    if not self.starting:
                        self._retire_idle_of_kind(not gpu)
                    break
                queue.popleft()
                if record is not None:
                    self._start_actor(record, worker)
                else:
                    self._run_task(spec, worker)
                    self._fill_next(worker)
            if not queue:
                self._queues.pop(shape, None)  # (a nested dispatch may have removed it)
        if starved:
            if self.job_of is None:
                self._start_workers(self._runnable_now())
            else:
                for job in starved_jobs:
                    self._start_workers(self._runnable_now(job), job)
        if self._ahead and self.idle:
            self._steal()
        if self.launch_error is not None:
            self._fail_unstartable()

    def _runnable_now(self, job=None) -> int:
        """How many queued tasks and actors would start if there were workers for
        them (with `job_of`: of those, how many are `job`'s)."""
        free = self.pool.available()
        count = 0
        for queue in self._queues.values():
            for spec in queue:
                if any(free.get(k, 0) < v for k, v in spec.resources.items()):
                    break
                for k, v in spec.resources.items():
                    free[k] -= v
                if job is not None and self.job_of(spec) is not job:
                    continue
                count += 1
                if count >= self.max_workers:
                    return count
        return count

    def _take_idle(self, gpu: bool, job=None) -> WorkerInfo | None:
        """An idle worker of `job` for a task that uses GPUs (`gpu`) or not: a
        fresh one or one that ran the same kind (the most recently idle first)."""
        idle = self.idle
        for i in range(len(idle) - 1, -1, -1):
            worker = idle[i]
            if worker.state != IDLE:
                del idle[i]  # (stale: it left the idle state since)
            elif (worker.gpu_kind is None or worker.gpu_kind is gpu) and worker.job is job:
                del idle[i]
                return worker
        return None

    def _retire_idle_of_kind(self, gpu: bool) -> None:
        """No idle worker may run what waits, but one of the other kind idles:
        let one such go (it may be what keeps max_workers from starting another).
        Not one that owns live objects: they would be lost."""
        for worker in self.idle:
            if worker.state == IDLE and worker.gpu_kind is gpu \
                    and not self.store.objects_owned_by(worker.worker_id):
                worker.state = EXITING  # worker_died finishes the bookkeeping at its EOF
                self.idle.remove(worker)
                self._send(worker, P.Exit())
                return

    def _start_workers(self, wanted: int, job=None) -> None:
        """Start workers for `wanted` tasks (of `job`: see job_of)."""
        if self.launch_error is not None:
            return
        # (Idle workers of other jobs do not count: they cannot run these, and
        # may not be let go if they own live objects. One is let go per worker
        # started beyond max_workers with them, if it can be.)
        running = others = 0
        for w in self.workers.values():
            if w.state in (BUSY, STARTING, IDLE) and not w.blocking:
                if w.state == IDLE and w.job is not job:
                    others += 1
                else:
                    running += 1
        room = self.max_workers - running
        starting = self.starting if self.job_of is None else sum(
            1 for w in self.workers.values() if w.state == STARTING and w.job is job)
        n = min(wanted - starting, room)
        for _ in range(min(others, running + others + n - self.max_workers)):
            if not self._retire_idle_of_other_job(job):
                break
        for _ in range(max(0, n)):
            worker_id = os.urandom(8).hex()
            try:
                self.host.start_worker(worker_id)
            except exc.BackendError as err:
                self.launch_error = err  # _dispatch fails what waits for a worker
                return
            self.starting += 1
            self.workers[worker_id] = worker = WorkerInfo(worker_id)
            worker.job = job

    def _retire_idle_of_other_job(self, job) -> bool:
        """Let an idle worker of another job than `job` go (not one that owns
        live objects: they would be lost); whether there was one."""
        for worker in self.idle:
            if worker.state == IDLE and worker.job is not job \
                    and not self.store.objects_owned_by(worker.worker_id):
                worker.state = EXITING  # worker_died finishes the bookkeeping at its EOF
                self.idle.remove(worker)
                self._send(worker, P.Exit())
                return True
        return False

    def job_ended(self, job) -> None:
        """`job` will submit nothing more: its idle workers are let go (now, and
        its busy ones once idle: see reap_idle)."""
        with self.lock:
            self.ended_jobs.add(job)
        self.reap_idle(1 << 30, 1e9)

    def _fail_unstartable(self) -> None:
        """No worker can be started any more: fail the tasks and actors that
        wait only for a worker (they fit the free resources), unless a busy
        worker will come free to run them."""
        if self.starting or any(w.state in (IDLE, BUSY) and not w.blocking
                                for w in self.workers.values()):
            return
        error = exc.BackendError(f"no worker process can be started for this task: "
                                 f"{self.launch_error}")
        tasks, actors = [], []
        for shape, queue in list(self._queues.items()):
            keep = collections.deque(s for s in queue if not self.pool.fits(s.resources))
            for spec in queue:
                if not self.pool.fits(spec.resources):
                    continue
                if spec.kind != ACTOR_CREATION:
                    tasks.append(spec)
                elif self.actors[spec.actor_id].state != ActorLifecycle.DEAD:
                    actors.append(self.actors[spec.actor_id])
            if keep:
                self._queues[shape] = keep
            else:
                self._queues.pop(shape, None)
        for spec in tasks:
            self._fail(spec, error)
        for record in actors:
            self._end_actor(record, f"its worker process cannot be started: "
                                    f"{self.launch_error}", kill=False)

    def defer_sends(self, deferring: bool) -> None:
        """While a thread handles a batch of answers (the node's I/O thread, a
        turn of its loop), let what it queues for workers pile up, to go in one
        send per worker when it stops deferring."""
        self.lock.deferring = threading.get_ident() if deferring else 0
        if not deferring and self._unsent:
            self._flush_sends()

    def _send(self, worker: WorkerInfo, message) -> None:
        """Queue a message for `worker` (with the lock held): it goes out when the
        lock is released (see _flush_sends)."""
        worker.outbox.append(message)
        self._unsent.append(worker)

    def _flush_sends(self) -> None:
        """Send what is queued for workers, without the lock: each worker's
        messages in order, all that piled up in one send. A dead worker's are
        dropped (its EOF is being handled)."""
        unsent = self._unsent
        claim = self.claim
        while unsent:
            try:
                worker = unsent.popleft()
            except IndexError:
                return
            outbox = worker.outbox
            if not outbox:
                continue
            with worker.send_lock:  # (so that what one thread took goes before the rest)
                if len(outbox) == 1:  # (the usual case: one message, no list to build)
                    try:
                        message = outbox.popleft()
                    except IndexError:
                        continue
                    if worker.conn is not None:
                        if claim is not None:
                            claim(worker, message)
                        try:
                            worker.conn.send(message)
                        except exc.BackendError:
                            pass
                        except Exception as err:  # noqa: BLE001 - one that does not pickle
                            self._send_one_by_one(worker, [message], err)
                    continue
                else:
                    messages = []
                    while outbox:
                        try:
                            messages.append(outbox.popleft())
                        except IndexError:
                            break
                if messages and worker.conn is not None:
                    if claim is not None:
                        claim(worker, messages[0] if len(messages) == 1 else None)
                    try:
                        if len(messages) == 1:
                            worker.conn.send(messages[0])
                        else:
                            worker.conn.send_many(messages)
                    except exc.BackendError:
                        pass
                    except Exception as err:  # noqa: BLE001 - one that does not pickle
                        self._send_one_by_one(worker, messages, err)

    def _send_one_by_one(self, worker: WorkerInfo, messages: list, err: BaseException) -> None:
        """A message of `messages` cannot be sent (it does not pickle: a spec that
        arrived from another process holding what cannot be pickled again): send
        the others; a task that cannot be sent fails with the reason (as if its
        worker had reported the error), and the thread that flushes goes on."""
        for message in messages:
            try:
                worker.conn.send_many([message])
                continue
            except exc.BackendError:
                return  # (its EOF is being handled)
            except Exception as one:  # noqa: BLE001
                err = one
            if type(message) is P.Execute:
                spec = message.spec
                error = exc.TaskError.from_exception(TypeError(
                    f"{spec.display_name} cannot be sent to its worker: {err}"),
                    spec.display_name)
                self.task_done(worker, spec.task_id,
                               [serialize(error, is_error=True)] * len(spec.return_ids), False)
            else:
                print(f"beamlet: dropped a {type(message).__name__} message for worker "
                      f"{worker.worker_id}, which cannot be sent: {err!r}", file=sys.stderr,
                      flush=True)

    def _send_execute(self, worker: WorkerInfo, spec: TaskSpec, gpu_ids) -> BaseException | None:
        """Send the task to its worker. Returns the error when its arguments cannot
        be made available (e.g. the store is too full to restore one from disk);
        then nothing was sent. A dead worker is left to its EOF handler."""
        message = self._execute_message(worker, spec, gpu_ids)
        if type(message) is not P.Execute:
            return message
        self._send(worker, message)
        return None

    def _execute_message(self, worker: WorkerInfo, spec: TaskSpec, gpu_ids, ahead=False):
        """The EXECUTE for `worker` (its arguments pinned until the task ends), or
        the error when its arguments cannot be made available."""
        try:
            shipped, entries = self._ship_args(spec)
        except exc.BeamletError as err:
            return err
        blobs = []
        if spec.kind != ACTOR_METHOD and spec.function_id not in worker.known_functions:
            blobs.append((spec.function_id, self.tables.function(spec.function_id)))
            worker.known_functions.add(spec.function_id)
        if entries:
            # The worker maps these when the task starts: they must not spill before.
            previous = self._shipped.pop(spec.task_id, None)
            if previous:
                self.store.unpin(previous)
            self._shipped[spec.task_id] = list(entries)
            self.store.pin(entries)
        return P.Execute(shipped, blobs, entries, gpu_ids, ahead)

    def _ship_args(self, spec: TaskSpec):
        """Inline small ready dependencies into the spec; name shared-memory ones."""
        deps = spec.dependencies()
        if not deps:
            return spec, None
        entries = {}
        inline = {}
        for dep in deps:
            entry = self.store.wire_entry(dep)
            if isinstance(entry, SerializedObject):
                inline[dep] = entry
            elif entry is not None:
                entries[dep] = entry
        if inline:
            shipped = TaskSpec.__new__(TaskSpec)
            for name in TaskSpec.__slots__:
                setattr(shipped, name, getattr(spec, name))
            shipped.args = [(ARG_VALUE, inline[v]) if k == ARG_REF and v in inline else (k, v)
                            for k, v in spec.args]
            shipped.kwargs = {n: (ARG_VALUE, inline[v]) if k == ARG_REF and v in inline else (k, v)
                              for n, (k, v) in spec.kwargs.items()}
            spec = shipped
        return spec, entries or None

    def _run_task(self, spec: TaskSpec, worker: WorkerInfo, gpu_ids=None) -> None:
        """Run `spec` on `worker` (taking its resources, unless taken already:
        then `gpu_ids` are the GPUs they came with)."""
        resources = spec.resources
        if gpu_ids is None:
            gpu_ids = self.pool.acquire(resources)
        worker.state = BUSY
        worker.task = spec
        worker.gpu_kind = gpu = bool(resources.get("GPU")) or (
            spec.placement_group is not None and asks_gpu(resources))
        worker.gpu_ids = gpu_ids
        worker.dispatched_at = now = time.perf_counter()
        self._running[spec.task_id] = worker
        if self.task_progress is not None:
            self.task_progress((spec.task_id, spec.attempt, RUNNING, worker.pid, now))
        if not spec.args and not spec.kwargs:
            # (What _send_execute does, for a task with no argument to ship.)
            function_id = spec.function_id
            if function_id in worker.known_functions:
                blobs = []
            else:
                blobs = [(function_id, self.tables.function(function_id))]
                worker.known_functions.add(function_id)
            worker.outbox.append(_new_tuple(P.Execute, (spec, blobs, None,
                                                         gpu_ids if gpu else None, False)))
            self._unsent.append(worker)
            return
        error = self._send_execute(worker, spec, gpu_ids if gpu else None)
        if error is not None:
            self._running.pop(spec.task_id, None)
            self.pool.release(spec.resources, gpu_ids)
            worker.state, worker.task, worker.gpu_ids = IDLE, None, []
            self.idle.append(worker)
            self._fail(spec, error)

    def _fill_next(self, worker: WorkerInfo) -> None:
        """Pipelining: send a busy worker the next queued task of its task's
        shape, when the resources to run that one now are not free, to run when
        its task ends (at most one ahead per worker). It holds no resources
        until then: at the answer, the running task's pass to it (`_promote`).
        Not for GPU tasks (their devices are per task), nor tasks with ref
        arguments (pinned in memory from the send on), nor for a worker whose
        task waits in get (it would give it back)."""
        task = worker.task
        if worker.next is not None or worker.state != BUSY or worker.blocking \
                or task is None or worker.gpu_kind:
            return
        shape = self.pool.shape(task.resources)
        queue = self._queues.get(shape)
        if not queue:
            return
        head = queue[0]
        if head.kind != TASK or ((head.args or head.kwargs) and head.has_ref_args()) \
                or self.pool.fits(head.resources):
            return  # (one that fits gets a worker of its own, as soon as there is one)
        if self.job_of is not None and self.job_of(queue[0]) is not worker.job:
            return  # (a worker runs its job's tasks only)
        spec = queue.popleft()
        if not queue:
            self._queues.pop(shape, None)
        message = self._execute_message(worker, spec, None, ahead=True)
        if type(message) is not P.Execute:
            self._fail(spec, message)
            return
        worker.next = spec
        self._ahead.add(worker)
        self._running[spec.task_id] = worker
        self._send(worker, message)

    def _steal(self) -> None:
        """A worker is idle while tasks wait on busy ones, sent ahead: ask for
        those it could run now back (REVOKE; the worker returns one that has
        not started), so that a long task does not hold up the one behind it."""
        if not any(w.state == IDLE for w in self.idle):
            return
        for worker in list(self._ahead):
            spec = worker.next
            if spec is None:
                self._ahead.discard(worker)
            elif not worker.revoking and self.pool.fits(spec.resources):
                worker.revoking = True
                self._send(worker, P.Revoke(spec.task_id))

    def _clear_next(self, worker: WorkerInfo) -> None:
        worker.next = None
        worker.revoking = False
        self._ahead.discard(worker)

    def _promote(self, worker: WorkerInfo, spec: TaskSpec, taken: bool = False) -> None:
        """The task sent ahead to `worker` runs now: it takes the resources (of
        the same shape) that the task before it just gave back (`taken`: it
        kept them, no GPUs among them)."""
        self._clear_next(worker)
        worker.task = spec
        worker.gpu_ids = [] if taken else self.pool.acquire(spec.resources)
        worker.dispatched_at = time.perf_counter()
        if self.task_progress is not None:
            self.task_progress((spec.task_id, spec.attempt, RUNNING, worker.pid,
                                worker.dispatched_at))

    def _requeue_ahead(self, spec: TaskSpec) -> None:
        """A task sent ahead never ran: queue it first again (or fail it if it
        was cancelled meanwhile)."""
        self._running.pop(spec.task_id, None)
        if spec.task_id in self._cancelled:
            self._fail(spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
        elif spec.task_id in self._group_removed:
            self._fail(spec, self._group_removed[spec.task_id])
        else:
            self._make_ready(spec, first=True)

    def tasks_returned(self, worker: WorkerInfo, task_ids) -> None:
        """`worker` gave back tasks sent ahead to it, unstarted (its task blocks)."""
        with self.lock:
            for task_id in task_ids:
                if worker.next is not None and worker.next.task_id == task_id:
                    spec = worker.next
                    self._clear_next(worker)
                elif worker.task is not None and worker.task.task_id == task_id \
                        and worker.state == BUSY:
                    # Its answer to the task before overtook this: it was promoted
                    # (see _promote) but never ran; what it took goes back.
                    spec = worker.task
                    self._take_back_lent(worker, spec.resources)
                    self.pool.release(spec.resources, worker.gpu_ids)
                    worker.task, worker.gpu_ids = None, []
                    if worker.next is not None:
                        self._promote(worker, worker.next)
                    else:
                        worker.state = IDLE
                        worker.idle_since = time.monotonic()
                        self.idle.append(worker)
                else:
                    continue  # (not one we sent it ahead)
                self._requeue_ahead(spec)
            self._dispatch()

    # -- actors ---------------------------------------------------------------
    def _start_actor(self, record: ActorRecord, worker: WorkerInfo) -> None:
        spec = record.spec
        record.gpu_ids = self.pool.acquire(spec.resources)
        record.worker = worker
        self._move(record, ActorLifecycle.STARTING)
        worker.state = ACTOR
        worker.gpu_kind = gpu = asks_gpu(spec.resources)
        worker.actor_id = spec.actor_id
        self._running[spec.task_id] = worker
        if self.task_progress is not None:
            self.task_progress((spec.task_id, spec.attempt, RUNNING, worker.pid,
                                time.perf_counter()))
        error = self._send_execute(worker, spec,
                                   record.gpu_ids if gpu else None)
        if error is not None:
            self._running.pop(spec.task_id, None)
            worker.state, worker.actor_id = IDLE, None
            self.idle.append(worker)
            record.worker = None
            self._end_actor(record, f"its constructor's arguments are unavailable: {error}",
                            kill=False)

    def _submit_actor_call(self, spec: TaskSpec) -> None:
        record = self.actors.get(spec.actor_id)
        if record is None:
            # Created from a handle whose creation spec has not reached us yet? Not
            # possible: creation is submitted first on the same channel. Unknown = dead.
            self._fail(spec, exc.ActorDiedError(
                f"the actor {spec.function_name} is unknown to this scheduler"))
            return
        if record.state == ActorLifecycle.DEAD:
            self._fail(spec, exc.ActorDiedError(f"the actor {spec.function_name} is dead: "
                                                f"{record.reason}"))
            return
        # (CallQueue.has_calls_of and TaskSpec.has_ref_args, without the calls)
        if record.state == ActorLifecycle.ALIVE \
                and spec.caller_id not in record.calls._by_caller \
                and (not spec.args and not spec.kwargs or not spec.has_ref_args()):
            self._send_actor_call(record, spec)  # the common case: nothing to wait for
            return
        record.calls.push(spec)
        self._pump_caller(record, spec.caller_id)

    def _pump_actor(self, record: ActorRecord) -> None:
        """Send the actor every queued call whose arguments exist (see `_pump_caller`)."""
        for caller_id in record.calls.callers():
            self._pump_caller(record, caller_id)

    def _pump_caller(self, record: ActorRecord, caller_id: bytes) -> None:
        """Send the actor one caller's queued calls, in order, up to the first whose
        arguments are still being computed; that one is sent when they arrive.
        Re-entrant (a failed send stores a result another call may wait on): each
        step reads the queue afresh."""
        calls = record.calls
        while record.state == ActorLifecycle.ALIVE:
            spec = calls.head(caller_id)
            if spec is None or spec.task_id in record.watched:
                return
            missing = [d for d in dict.fromkeys(spec.dependencies())
                       if not self.store.contains(d)]
            if missing:
                record.watched.add(spec.task_id)
                if self.task_progress is not None:
                    self.task_progress((spec.task_id, spec.attempt, PENDING_ARGS_AVAIL, None,
                                        time.perf_counter()))
                self.store.notify_when(missing, len(missing),
                                       lambda: self._call_args_ready(record, spec), broad=False)
                return
            calls.pop(caller_id)
            self._send_actor_call(record, spec)

    def _call_args_ready(self, record: ActorRecord, spec: TaskSpec) -> None:
        with self.lock:
            record.watched.discard(spec.task_id)
            self._pump_caller(record, spec.caller_id)

    def _send_actor_call(self, record: ActorRecord, spec: TaskSpec) -> None:
        record.inflight[spec.task_id] = spec
        worker = record.worker
        if not spec.args and not spec.kwargs:  # (_execute_message's, with nothing to ship)
            message = _new_tuple(P.Execute, (spec, [], None, None, False))
        else:
            message = self._execute_message(worker, spec, None)
            if type(message) is not P.Execute:
                record.inflight.pop(spec.task_id, None)
                self._fail(spec, message)
                return
        if self.task_progress is not None:
            # (Running if nothing is ahead of it in the actor; else it starts
            # when the call before it ends: see task_done.)
            self.task_progress((spec.task_id, spec.attempt, RUNNING if len(record.inflight) == 1
                                else SUBMITTED_TO_WORKER, worker.pid, time.perf_counter()))
        if record.batched and (record.held or
                               len(record.inflight) - len(record.held) > ACTOR_WINDOW):
            record.held.append((spec, message))  # (see ActorRecord.held)
            return
        worker.outbox.append(message)  # (what _send does)
        self._unsent.append(worker)

    def _send_held(self, record: ActorRecord) -> None:
        """Send the actor every held call, in one batch."""
        held, record.held = record.held, []
        if held and record.worker is not None:
            for _, message in held:
                self._send(record.worker, message)

    def _actor_alive(self, record: ActorRecord) -> None:
        self._move(record, ActorLifecycle.ALIVE)
        self._pump_actor(record)
        if record.out_of_scope and not record.inflight and not record.calls:
            self._end_actor(record, "all handles to it went out of scope", kill=True)

    def _move(self, record: ActorRecord, state: ActorLifecycle, reason: str = "") -> None:
        """Move the actor to `state`; the actors table and observers hear of
        the states it records (not STARTING)."""
        record.state = record.state.to(state)
        if state is ActorLifecycle.STARTING:
            return
        self.tables.set_actor_state(record.spec.actor_id, state.recorded, reason,
                                    self.host.node_id)
        plugins.notify("beamlet_actor_state", actor_id=record.spec.actor_id,
                       class_name=record.spec.function_name, state=state.recorded,
                       reason=reason)

    def _end_actor(self, record: ActorRecord, reason: str, kill: bool,
                   holding: bool = True) -> None:
        """The actor is dead for good: fail its calls, free its resources
        (unless not `holding` them any more) and worker."""
        if record.state == ActorLifecycle.DEAD:
            return
        worker = record.worker
        if holding and record.state in (ActorLifecycle.STARTING, ActorLifecycle.ALIVE):
            self._take_back_lent(worker, record.spec.resources)
            self.pool.release(record.spec.resources, record.gpu_ids)
        record.reason = reason
        job = None if self.job_of is None else self.job_of(record.spec)  # (before it is dead)
        self._move(record, ActorLifecycle.DEAD, reason)
        if record.pinned:
            self.host.unpin(record.pinned, job)
            record.pinned = []
        error = exc.ActorDiedError(f"the actor {record.spec.function_name} is dead: {reason}")
        if record.spec.task_id in self._tasks:  # it never finished starting
            self._waiting.pop(record.spec.task_id, None)
            self._running.pop(record.spec.task_id, None)
            self._fail(record.spec, error)
        calls = list(record.inflight.values()) + record.calls.drain()
        record.inflight.clear()
        record.held = []
        record.watched.clear()
        for spec in calls:
            self._fail(spec, error)
        if worker is not None and kill and worker.state != DEAD:
            self._kill_worker(worker)
        self._dispatch()

    # -- placement groups -------------------------------------------------------
    def create_placement_group(self, info, hosted: list[int] | None = None) -> None:
        """(`hosted`: on a cluster node, the indices of the bundles it holds;
        more of a group it holds some of: the bundles the driver placed here
        again, lost with another node. Their driver keeps the group's state in
        the tables; this node answers under `info`'s ready id, the latest.)"""
        with self.lock:
            self.pool.add_group(info.pg_id.hex(), list(info.bundles), hosted)
            self._groups[info.pg_id.hex()] = info
            if hosted is not None:
                self._hosted_groups.add(info.pg_id.hex())
            self._groups_pending = True
            self._dispatch()

    def _reserve_groups(self) -> None:
        """Reserve the pending groups that fit now, oldest first (ahead of the
        queued tasks, which may be the ones to run in them)."""
        pending = self.pool.pending_groups()
        for key in pending:
            if self.pool.reserve_group(key):
                pending.remove(key)
                info = self._groups[key]
                if key not in self._hosted_groups:
                    self.tables.set_placement_group_state(info.pg_id, "CREATED")
                self.store.put(info.ready_id, ready_value(info))
        self._groups_pending = bool(pending)

    def remove_placement_group(self, pg_id: bytes) -> None:
        key = pg_id.hex()
        with self.lock:
            info = self._groups.pop(key, None)
            if info is None:
                return
            self._hosted_groups.discard(key)
            pending = key in self.pool.pending_groups()
            error = exc.TaskPlacementGroupRemoved(f"the placement group {key} the task was "
                                                  f"scheduled in was removed")
            for shape, queue in list(self._queues.items()):
                doomed = [spec for spec in queue if spec.kind == TASK
                          and in_group(spec.resources, key)]
                for spec in doomed:
                    queue.remove(spec)
                    self._fail(spec, error)
                if not queue:
                    self._queues.pop(shape, None)
            for task_id, spec in list(self._waiting.items()):
                if spec.kind == TASK and in_group(spec.resources, key):
                    del self._waiting[task_id]
                    self._fail(spec, error)
            # Running ones are killed, as in Ray (their worker_died fails them).
            for task_id, worker in list(self._running.items()):
                spec = self._tasks.get(task_id)
                if spec is not None and spec.kind == TASK and in_group(spec.resources, key):
                    self._group_removed[task_id] = error
                    if worker.next is not spec:  # (sent ahead: fails when requeued)
                        self._kill_worker(worker)
            # (After the tasks: ending an actor frees its share, which the
            # queued tasks of the group would otherwise start on.)
            for record in list(self.actors.values()):
                if record.state != ActorLifecycle.DEAD and in_group(record.spec.resources, key):
                    self._end_actor(record, "its placement group was removed", kill=True)
            self.pool.remove_group(key)
            if pending:
                self.store.put(info.ready_id, removed_value(info))
            self._dispatch()

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        with self.lock:
            record = self.actors.get(actor_id)
            if record is None or record.state == ActorLifecycle.DEAD:
                return
            if not no_restart and record.restarts_left > 0 and record.worker is not None:
                self._kill_worker(record.worker)  # the EOF handler restarts it
                return
            record.killed = True
            self._end_actor(record, "it was killed by beamlet.kill()", kill=True)

    def actor_exited(self, actor_id: bytes) -> None:
        with self.lock:
            record = self.actors.get(actor_id)
            if record is None or record.state == ActorLifecycle.DEAD:
                return
            record.killed = True  # (no restart)
            # Not killed: its process runs __ray_shutdown__ and atexit, then exits.
            self._end_actor(record, EXIT_REASON, kill=False)

    def token_released(self, object_id: bytes) -> None:
        """The last handle to an actor is gone: end it once its calls are done.
        Called for every freed object, so most calls return at the first line."""
        if object_id not in self.actor_tokens:  # (a dict read needs no lock)
            return
        with self.lock:
            actor_id = self.actor_tokens.pop(object_id, None)
            record = self.actors.get(actor_id) if actor_id else None
            if record is None or record.state == ActorLifecycle.DEAD:
                return
            record.out_of_scope = True
            if record.state == ActorLifecycle.ALIVE and not record.inflight and not record.calls:
                self._end_actor(record, "all handles to it went out of scope", kill=True)

    # -- completion -----------------------------------------------------------
    def task_done(self, worker: WorkerInfo, task_id: bytes, entries: list, retryable: bool) -> None:
        """A worker finished a task or call (called by the I/O thread)."""
        with self.lock:
            spec = self._tasks.get(task_id)
            if spec is None:
                return
            if spec.kind == ACTOR_METHOD:
                record = self.actors.get(spec.actor_id)
                if record is not None:
                    record.inflight.pop(task_id, None)
                    if record.held and record.worker is worker:
                        self._send_held(record)
                    if record.inflight and self.task_progress is not None:
                        after = next(iter(record.inflight.values()))
                        self.task_progress((after.task_id, after.attempt, RUNNING, worker.pid,
                                            time.perf_counter()))
                if retryable and self._retry_left(spec, record):
                    self._retrying(spec, worker)
                    self._resend_actor_call(record, spec)
                    return
                # (_outcome's answer, without the calls)
                self._finish(spec, entries, CANCELLED if task_id in self._cancelled else
                             FAILED if entries and entries[0].is_error else FINISHED, worker)
                if record is not None and record.out_of_scope and not record.inflight \
                        and not record.calls and record.state == ActorLifecycle.ALIVE:
                    self._end_actor(record, "all handles to it went out of scope", kill=True)
                return
            self._running.pop(task_id, None)
            if spec.kind == ACTOR_CREATION:
                record = self.actors[spec.actor_id]
                failed = bool(entries) and entries[0].is_error
                if failed:
                    # From the entry itself, before it is stored: on a restart the
                    # store keeps the first start's result and drops this one.
                    try:
                        reason = _error_text(self.store.materialize_entry(spec.return_ids[0],
                                                                           entries[0]))
                    except exc.BeamletError as err:
                        reason = repr(err)
                self._finish(spec, entries, self._outcome(spec, entries), worker)
                if failed:
                    self._end_actor(record, f"its constructor raised:\n{reason}", kill=True)
                else:
                    self._actor_alive(record)
                return
            if worker.blocking:  # a get timed out and it went on without telling us
                worker.blocking.clear()
                self.pool.reacquire_cpus(spec.resources)
            after = worker.next if worker.state == BUSY else None
            if after is not None and after.resources is spec.resources and not worker.gpu_ids:
                # The task sent ahead takes the very resources this one gives back
                # (what release, then acquire in _promote, would do).
                worker.task = None
                self._promote(worker, after, taken=True)
            else:
                self.pool.release(spec.resources, worker.gpu_ids)
                worker.task = None
                worker.gpu_ids = []
                if after is not None:  # it runs the task sent ahead now
                    self._promote(worker, after)
                elif worker.state == BUSY:
                    worker.state = IDLE
                    worker.idle_since = time.monotonic()
                    self.idle.append(worker)
            if retryable and task_id not in self._cancelled and self._retry_left(spec, None) \
                    and task_id not in self._group_removed:
                self._retrying(spec, worker)
                self._make_ready(spec)
            else:
                self._finish(spec, entries, self._outcome(spec, entries), worker)
            if self._queues or self._ahead:
                self._fill_next(worker)
                self._dispatch()

    def _outcome(self, spec: TaskSpec, entries: list) -> str:
        """The status observers are told for a finished attempt."""
        return attempt_status(bool(entries) and entries[0].is_error,
                              cancelled=spec.task_id in self._cancelled)

    def _retrying(self, spec: TaskSpec, worker: WorkerInfo | None) -> None:
        """The attempt failed and another one follows."""
        started = worker.dispatched_at if worker is not None else time.perf_counter()
        plugins.notify("beamlet_task_finished", spec=spec, status=RETRYING,
                       duration=time.perf_counter() - started,
                       pid=worker.pid if worker is not None else None)
        spec.attempt += 1
        if spec.generator is not None:
            self._skip_delivered(spec)

    def _skip_delivered(self, spec: TaskSpec) -> None:
        """A generator call runs again: the items it delivered are not stored again."""
        delivered = self.streamed.get(stream_prefix(spec.return_ids[0]), 0)
        if delivered and spec.generator[0] == "streaming":
            spec.generator = spec.generator[:2] + (delivered,)

    def _retry_left(self, spec: TaskSpec, record: ActorRecord | None) -> bool:
        return may_retry(spec, record.spec if record is not None else None)

    def _resend_actor_call(self, record: ActorRecord, spec: TaskSpec) -> None:
        record.calls.push_front(spec)
        self._pump_caller(record, spec.caller_id)

    def _finish(self, spec: TaskSpec, entries: list, status: str, worker=None) -> None:
        task_id = spec.task_id
        self._tasks.pop(task_id, None)
        if self._children:
            self._children.pop(task_id, None)
        if self._shipped:
            shipped = self._shipped.pop(task_id, None)
            if shipped:
                self.store.unpin(shipped)
        if self._cancelled:
            self._cancelled.discard(task_id)
        if spec.generator is not None:
            self.streamed.pop(stream_prefix(spec.return_ids[0]), None)
        if self._group_removed:
            self._group_removed.pop(task_id, None)
        producer = self._producer
        for rid in spec.return_ids:
            producer.pop(rid, None)
        started = worker.dispatched_at if worker is not None else time.perf_counter()
        plugins.notify("beamlet_task_finished", spec=spec, status=status,
                       duration=time.perf_counter() - started,
                       pid=worker.pid if worker is not None else None)
        deliver = self.deliver
        if len(entries) == 1 and type(entries[0]) is SerializedObject:
            # (what put_from_worker does with an inline entry nobody owns)
            if deliver is None or not deliver(spec, spec.return_ids[0], entries[0]):
                self.store.put_entry(spec.return_ids[0], entries[0])
            return
        writer = worker.worker_id if worker is not None else None
        for rid, entry in zip(spec.return_ids, entries):
            if deliver is None or not deliver(spec, rid, entry):
                self.store.put_from_worker(rid, entry, None, writer)

    def describe_workers(self) -> list[dict]:
        """A row per worker process this scheduler has started and not yet seen
        exit (see `Backend.workers`)."""
        with self.lock:
            return [{"worker_id": w.worker_id, "pid": w.pid, "is_alive": w.state != DEAD,
                     "worker_type": "WORKER", "state": w.state,
                     "actor_id": w.actor_id.hex() if w.actor_id else None}
                    for w in self.workers.values()]

    def prestart(self, count: int) -> None:
        """Start `count` workers ahead of the first task."""
        with self.lock:
            self._start_workers(count)

    def reject(self, spec: TaskSpec, error: BaseException) -> None:
        """Fail a task that was never accepted (its submission failed): its
        results become `error`."""
        with self.lock:
            self._fail(spec, error)

    def _fail(self, spec: TaskSpec, error: BaseException) -> None:
        sobj = serialize(error, is_error=True)
        self._finish(spec, [sobj] * len(spec.return_ids),
                     "CANCELLED" if isinstance(error, exc.TaskCancelledError) else "FAILED")

    def running_on(self, object_id: bytes) -> WorkerInfo | None:
        """The worker running the task or actor call that makes `object_id`
        right now (None: none is). Takes no lock (dict reads are atomic), so
        the answer may be stale by the time it is used: a hint."""
        task_id = self._producer.get(object_id)
        if task_id is None:
            return None
        worker = self._running.get(task_id)
        if worker is not None:
            return worker
        spec = self._tasks.get(task_id)
        if spec is not None and spec.kind == ACTOR_METHOD:
            record = self.actors.get(spec.actor_id)
            if record is not None and task_id in record.inflight:
                return record.worker
        return None

    # -- blocking get inside a task -------------------------------------------
    def _lendable(self, worker: WorkerInfo) -> TaskSpec | None:
        """The spec whose CPUs a blocked worker lends out: its task, or its live
        actor's creation (None when it holds nothing)."""
        if worker.task is not None:
            return worker.task
        record = self.actors.get(worker.actor_id) if worker.actor_id is not None else None
        if record is not None and record.worker is worker \
                and record.state in (ActorLifecycle.STARTING, ActorLifecycle.ALIVE):
            return record.spec
        return None

    def worker_blocked(self, worker: WorkerInfo, req_id: int) -> None:
        """The worker's task or actor waits in get or wait (request `req_id`): lend
        its CPUs out, so that what it waits for can run."""
        with self.lock:
            spec = self._lendable(worker)
            if spec is None:
                return
            if not worker.blocking:
                self.pool.release_cpus(spec.resources)
                if self.lending is not None:
                    self.lending(spec, True)
            worker.blocking.add(req_id)
            self._dispatch()

    def worker_unblocked(self, worker: WorkerInfo, req_id: int) -> None:
        """Request `req_id` was answered or given up: take the CPUs back once no
        request of the worker is waiting (a stale answer changes nothing)."""
        with self.lock:
            if req_id not in worker.blocking:
                return
            worker.blocking.discard(req_id)
            if not worker.blocking:
                spec = self._lendable(worker)
                if spec is not None:
                    self.pool.reacquire_cpus(spec.resources)
                    if self.lending is not None:
                        self.lending(spec, False)

    def _take_back_lent(self, worker: WorkerInfo | None, resources: dict) -> None:
        """Before `resources` held by `worker` are released: undo any CPU lending,
        so that they are not given back twice."""
        if worker is not None and worker.blocking:
            worker.blocking.clear()
            self.pool.reacquire_cpus(resources)
            if self.lending is not None:
                spec = self._lendable(worker)
                if spec is not None:
                    self.lending(spec, False)

    # -- workers ----------------------------------------------------------------
    def awaits_worker(self, worker_id: str) -> bool:
        """Whether `worker_id` is a worker being started that has not connected yet."""
        with self.lock:
            worker = self.workers.get(worker_id)
            return worker is not None and worker.state == STARTING and not self.closed

    def worker_connected(self, worker_id: str, pid: int, conn) -> WorkerInfo | None:
        with self.lock:
            worker = self.workers.get(worker_id)
            if worker is None or worker.state != STARTING or self.closed:
                return None  # unknown, given up on, or a second fork of a re-sent request
            worker.pid = pid
            worker.conn = conn
            self.starting -= 1
            worker.state = IDLE
            worker.idle_since = time.monotonic()
            self.idle.append(worker)
            self._dispatch()
            return worker

    def launcher_failed(self, error: BaseException) -> None:
        """The launcher gave up (it cannot start worker processes any more): the
        workers being started never will be, and what waits for one fails."""
        with self.lock:
            self.launch_error = error
            for worker in [w for w in self.workers.values() if w.state == STARTING]:
                worker.state = DEAD
                self.workers.pop(worker.worker_id, None)
            self.starting = 0
            self._dispatch()

    def fail(self, error: BaseException) -> None:
        """The backend cannot go on (its I/O thread died): every later submit
        raises `error`; the caller fails the waiters."""
        with self.lock:
            self.closed = True
            self.failure = error

    def restart_lost_forks(self, relaunched: bool, deadline: float) -> None:
        """Fork requests may be lost: the zygote died (`relaunched`: ask the new
        one again) or a worker died before saying hello (given up after
        `deadline` seconds, so that another is started)."""
        with self.lock:
            now = time.monotonic()
            for worker in [w for w in self.workers.values() if w.state == STARTING]:
                if now - worker.started > deadline:
                    worker.state = DEAD
                    self.workers.pop(worker.worker_id, None)
                    self.starting -= 1
                elif relaunched and self.launch_error is None:
                    try:
                        self.host.start_worker(worker.worker_id)
                    except exc.BackendError as err:
                        self.launch_error = err  # the driver then calls launcher_failed
            self._dispatch()

    def reap_idle(self, keep: int, idle_for: float) -> None:
        """Let workers beyond the first `keep` go once idle for `idle_for` seconds
        (the extra ones forked while tasks were blocked in get)."""
        with self.lock:
            if self.ended_jobs:
                self._reap_ended_jobs()
            pool_workers = [w for w in self.workers.values() if w.actor_id is None]
            surplus = len(pool_workers) - keep
            if surplus <= 0:
                return
            now = time.monotonic()
            for worker in sorted(self.idle, key=lambda w: w.idle_since):
                if surplus <= 0 or now - worker.idle_since < idle_for:
                    break
                if worker.state != IDLE or self.store.objects_owned_by(worker.worker_id):
                    continue  # a worker that owns live objects must stay, or they are lost
                worker.state = EXITING  # worker_died finishes the bookkeeping at its EOF
                self.idle.remove(worker)
                surplus -= 1
                self._send(worker, P.Exit())

    def _reap_ended_jobs(self) -> None:
        """Let the idle workers of ended jobs go (lock held); forget a job that
        has no worker left."""
        for worker in list(self.idle):
            if worker.state == IDLE and worker.job in self.ended_jobs \
                    and not self.store.objects_owned_by(worker.worker_id):
                worker.state = EXITING  # worker_died finishes the bookkeeping at its EOF
                self.idle.remove(worker)
                self._send(worker, P.Exit())
        alive = {w.job for w in self.workers.values() if w.state != DEAD}
        self.ended_jobs &= alive

    def worker_died(self, worker: WorkerInfo) -> None:
        """The worker's connection closed: retry, restart or fail what it ran."""
        with self.lock:
            if worker.state == DEAD:
                return
            # (A worker still STARTING has no connection, so it never gets here:
            # restart_lost_forks gives those up.)
            worker.state = DEAD
            self.workers.pop(worker.worker_id, None)
            self.host.unpin(worker.borrowed.elements(), worker.job)
            worker.borrowed.clear()
            self._lose_objects_of(worker)
            if worker.next is not None:  # sent ahead, never started (its task was running)
                spec = worker.next
                self._clear_next(worker)
                self._requeue_ahead(spec)
            if worker.actor_id is not None:
                self._actor_worker_died(worker)
            elif worker.task is not None:
                spec = worker.task
                worker.task = None
                self._running.pop(spec.task_id, None)
                if worker.blocking:
                    worker.blocking.clear()
                    self.pool.reacquire_cpus(spec.resources)
                self.pool.release(spec.resources, worker.gpu_ids)
                if spec.task_id in self._cancelled:
                    self._fail(spec, exc.TaskCancelledError(
                        f"task {spec.display_name} was cancelled (its worker was killed)"))
                elif spec.task_id in self._group_removed:
                    self._fail(spec, self._group_removed[spec.task_id])
                elif may_retry(spec):
                    self._retrying(spec, worker)
                    self._make_ready(spec)
                else:
                    self._fail(spec, exc.WorkerCrashedError(
                        f"the worker running {spec.display_name} (pid {worker.pid}) died "
                        f"unexpectedly; it was tried {spec.attempt + 1} time(s) "
                        f"(max_retries={spec.max_retries})"))
            self._dispatch()

    def _actor_worker_died(self, worker: WorkerInfo) -> None:
        record = self.actors.get(worker.actor_id)
        if record is None or record.state == ActorLifecycle.DEAD or record.worker is not worker:
            return
        self._running.pop(record.spec.task_id, None)
        self._take_back_lent(worker, record.spec.resources)
        self.pool.release(record.spec.resources, record.gpu_ids)
        if record.restarts_left > 0 and not record.killed:
            record.restarts_left -= 1
            record.worker = None
            self._move(record, ActorLifecycle.RESTARTING, "its process died")
            unavailable = exc.ActorUnavailableError(
                f"the actor {record.spec.function_name} died during this call and is "
                f"restarting; the call may or may not have run")
            retry = []
            for spec in record.inflight.values():
                if self._retry_left(spec, record):
                    spec.attempt += 1
                    if spec.generator is not None:
                        self._skip_delivered(spec)
                    retry.append(spec)
                else:
                    self._fail(spec, unavailable)
            record.inflight.clear()
            record.held = []
            for spec in reversed(retry):
                record.calls.push_front(spec)
            record.spec.attempt += 1  # (its restarted process sees it was reconstructed)
            self._tasks[record.spec.task_id] = record.spec  # its creation runs again
            self._make_ready(record.spec, first=True)
        else:
            self._end_actor(record, f"its process (pid {worker.pid}) died unexpectedly"
                            if not record.killed else "it was killed by beamlet.kill()",
                            kill=False, holding=False)  # (given back just above)

    def _kill_worker(self, worker: WorkerInfo) -> None:
        # Nothing more is placed on it: an answer it sent before the signal
        # landed may still be unread, and handling it must not make the dead
        # process idle (see task_done); worker_died finishes at its EOF.
        if worker.state != DEAD:
            worker.state = EXITING
        if worker.pid:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Now, not at its EOF: whoever sees the actor dead must see its objects lost too.
        self._lose_objects_of(worker)

    def _lose_objects_of(self, worker: WorkerInfo) -> None:
        """The objects a dead worker put die with it (their owner), as in Ray."""
        lost = self.store.objects_owned_by(worker.worker_id)
        if lost:
            self.store.mark_lost(lost, exc.OwnerDiedError(
                f"the worker that put this object (pid {worker.pid}) died"))

    def record_borrow(self, worker: WorkerInfo, added, released) -> None:
        borrowed = worker.borrowed
        for object_id in added:
            borrowed[object_id] += 1
        self.host.pin(added, worker.job)
        let_go = []
        for object_id in released:
            if borrowed[object_id] > 0:
                borrowed[object_id] -= 1
                if not borrowed[object_id]:
                    del borrowed[object_id]
                let_go.append(object_id)
        self.host.unpin(let_go, worker.job)

    # -- cancel -----------------------------------------------------------------
    def submitted_by(self, worker: WorkerInfo, spec: TaskSpec) -> None:
        """`worker` submitted `spec`: note it as a child of the task the worker
        runs, for a recursive cancel of that task (tasks only: actor calls and
        creations are not cancelled with their submitter). An actor's worker
        notes its calls' children itself (``Worker.cancel_children``)."""
        parent = worker.task
        if parent is None or spec.kind != TASK:
            return
        with self.lock:
            if parent.task_id in self._tasks:
                self._children.setdefault(parent.task_id, []).append(spec.return_ids[0])

    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True,
               named: bool = False) -> list:
        """Cancel the task making `object_id` (and, `recursive`, its children).
        Returns the children (first return ids) it does not know (finished, or
        placed on another node by their owner), for an owner that cancels
        them where they run; `named` (a worker's cancel, which names a task of
        its owner's, wherever that placed it): `object_id` too if not known."""
        with self.lock:
            task_id = self._producer.get(object_id)
            spec = self._tasks.get(task_id) if task_id else None
            if spec is None:
                return [object_id] if named else []
            children = self._children.pop(task_id, None) if recursive else None
            unknown = []
            for child in children or ():
                if child in self._producer:
                    unknown.extend(self.cancel(child, force, True))
                else:
                    unknown.append(child)
            if spec.kind == ACTOR_CREATION:
                raise ValueError("cancel() cannot cancel an actor's creation; use kill()")
            if spec.kind == ACTOR_METHOD:
                if force:
                    raise ValueError("force=True is not supported for actor calls; use kill()")
                record = self.actors.get(spec.actor_id)
                held = [i for i, (h, _) in enumerate(record.held) if h is spec] if record else ()
                if held:  # not sent yet: it never runs
                    del record.held[held[0]]
                    record.inflight.pop(task_id, None)
                    self._fail(spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
                elif record is not None and record.calls.remove(spec):
                    record.watched.discard(spec.task_id)
                    self._fail(spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
                elif record is not None and task_id in record.inflight and record.worker:
                    # (The worker knows what the call submitted, not this
                    # node: an actor's calls may run at once. `recursive`:
                    # it cancels those too, through this node.)
                    self._cancelled.add(task_id)
                    self._send(record.worker, P.Interrupt(task_id, False, bool(recursive)))
                return unknown
            if task_id in self._waiting:
                del self._waiting[task_id]
                self._fail(spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
                return unknown
            for queue in self._queues.values():
                if spec in queue:
                    queue.remove(spec)
                    self._fail(spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))
                    return unknown
            worker = self._running.get(task_id)
            if worker is not None:
                self._cancelled.add(task_id)
                if force and worker.next is not spec:
                    self._kill_worker(worker)
                else:
                    # (Sent ahead: its worker ends the process only if that task
                    # runs by now, else fails it when it would start.)
                    self._send(worker, P.Interrupt(task_id, force, False))
        return unknown

    # -- resources --------------------------------------------------------------
    def total_resources(self) -> dict[str, float]:
        return self.pool.total()

    def available_resources(self) -> dict[str, float]:
        with self.lock:
            return self.pool.available()

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            workers = list(self.workers.values())
        for worker in workers:
            if worker.conn is not None:
                try:
                    worker.conn.send(P.Exit())
                except exc.BackendError:
                    pass

    def making(self, object_id: bytes) -> bool:
        """Whether an unfinished task here is to produce `object_id`."""
        return object_id in self._producer

    def maker(self, object_id: bytes) -> bytes | None:
        """The id of the unfinished task here that is to produce `object_id`, if any."""
        return self._producer.get(object_id)

    def stats(self) -> dict:
        with self.lock:
            return {"workers": len(self.workers), "idle": len(self.idle),
                    "actors": sum(1 for r in self.actors.values() if r.state != ActorLifecycle.DEAD),
                    "queued": sum(len(q) for q in self._queues.values()),
                    "waiting": len(self._waiting)}


def _error_text(sobj) -> str:
    """The traceback text of a stored error."""
    try:
        err = deserialize(sobj)
    except Exception as err:  # noqa: BLE001 - describing a failure must not fail
        return repr(err)
    return getattr(err, "traceback_str", None) or str(err)

"""beamlet-threads: a third-party beamlet backend that runs tasks on a thread pool.

``tests/test_plugins.py`` copies this module into a temporary directory next
to a hand-written ``beamlet_threads-0.1.dist-info`` whose ``entry_points.txt``
registers it under the ``beamlet`` group, so it is found the way any installed
plugin is. It uses nothing but beamlet's public core pieces, to show that
they are enough to build a parallel backend outside the beamlet repository:

- tasks wait for their dependencies without holding resources, then run on a
  pool thread once their resource request fits in the ResourcePool;
- a task that blocks in ``get``/``wait`` gives its CPUs back while it waits and
  the pool grows a thread when every thread is busy, so nested tasks never
  deadlock;
- each actor has one thread of its own, which runs its calls one at a time in
  submission order; an actor ends when killed, or once its last handle is gone
  and its queued calls have run;
- ``cancel`` drops a task that has not started (a running thread cannot be
  interrupted safely, so a started task runs to its end).
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import time

from beamlet import exceptions as exc
from beamlet.core import plugins
from beamlet.core.control_store import MemoryControlStore
from beamlet.core.execution import Executor
from beamlet.core.interfaces import Backend, Scheduler
from beamlet.core.memory_store import MemoryObjectStore
from beamlet.core.plugins import hookimpl
from beamlet.core.resources import ResourcePool
from beamlet.core.scheduling import ActorLifecycle, run_attempts
from beamlet.core.serialization import serialize
from beamlet.core.tables import Tables
from beamlet.core.task_spec import ACTOR_CREATION, ACTOR_METHOD

# The normal task a pool thread is running (None in actor threads and the driver).
_current = threading.local()


class ThreadPool:
    """Threads that grow on demand: each job goes to an idle thread, else to a new one."""

    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    def run(self, job) -> None:
        with self._lock:
            if self._closed:
                raise exc.BackendError("the thread pool was shut down")
            if self._idle:
                self._idle -= 1
            else:
                thread = threading.Thread(target=self._loop, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
            self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job never kills its thread
                pass
            with self._lock:
                self._idle += 1

    @property
    def size(self) -> int:
        return len(self._threads)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        until = time.monotonic() + timeout
        for thread in threads:  # threads stuck in user code are daemons: not waited for
            thread.join(max(0.0, until - time.monotonic()))


class _Actor:
    def __init__(self, spec):
        self.spec = spec
        self.state = ActorLifecycle.PENDING
        self.reason = ""
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.gpu_ids: list = []


_STOP = object()  # sentinel in an actor's queue: calls queued before it still run


class ThreadScheduler(Scheduler):
    def __init__(self, runtime, store: "ThreadObjectStore", control_store, pool: ResourcePool):
        self._store = store
        self._tables = Tables(control_store)
        self._pool = pool
        self.executor = Executor(runtime)
        self.threads = ThreadPool("beamlet-threads")
        self._lock = threading.RLock()  # ObjectRef.__del__ may re-enter from any frame
        self._ready: collections.deque = collections.deque()
        self._queued: dict[bytes, object] = {}  # return id -> spec not started yet
        self._actors: dict[bytes, _Actor] = {}
        self._actor_by_token: dict[bytes, bytes] = {}
        self._closed = False

    # -- submission -------------------------------------------------------------
    def submit(self, spec) -> None:
        hook = plugins.observer("beamlet_task_submitted")
        if hook is not None:
            hook(spec=spec)
        if spec.kind == ACTOR_METHOD:
            self._actor_call(spec)
            return
        self._pool.check_feasible(spec.resources, spec.display_name)
        with self._lock:
            if self._closed:
                raise exc.BackendError("beamlet was shut down")
            self._queued[spec.return_ids[0]] = spec
            if spec.kind == ACTOR_CREATION:
                self._actors[spec.actor_id] = _Actor(spec)
                self._actor_by_token[spec.return_ids[0]] = spec.actor_id
        deps = list(dict.fromkeys(spec.dependencies()))
        if not deps:
            self._make_ready(spec)
            return
        missing = [len(deps)]

        def dep_ready(_object_id):
            with self._lock:
                missing[0] -= 1
                done = missing[0] == 0
            if done:
                self._make_ready(spec)

        for dep in deps:
            self._store.on_ready(dep, dep_ready)

    def _make_ready(self, spec) -> None:
        with self._lock:
            if spec.return_ids[0] not in self._queued:  # cancelled meanwhile
                return
            self._ready.append(spec)
        self._dispatch()

    def _dispatch(self) -> None:
        """Start every ready spec whose resources fit now (any order: no head-of-line block)."""
        start = []
        with self._lock:
            if self._closed:
                return
            waiting = collections.deque()
            while self._ready:
                spec = self._ready.popleft()
                if self._pool.fits(spec.resources):
                    self._queued.pop(spec.return_ids[0], None)
                    start.append((spec, self._pool.acquire(spec.resources)))
                else:
                    waiting.append(spec)
            self._ready = waiting
        for spec, gpu_ids in start:
            if spec.kind == ACTOR_CREATION:
                actor = self._actors[spec.actor_id]
                actor.gpu_ids = gpu_ids
                threading.Thread(target=self._actor_loop, args=(actor,), daemon=True,
                                 name=f"beamlet-actor-{spec.function_name}").start()
            else:
                self.threads.run(lambda spec=spec, gpu_ids=gpu_ids: self._run_task(spec, gpu_ids))

    # -- running ----------------------------------------------------------------
    def _execute(self, spec):
        """One attempt (retries and observer reports: run_attempts)."""
        return self.executor.execute(spec)

    def _put_results(self, spec, values) -> None:
        for object_id, value in zip(spec.return_ids, values):
            self._store.put(object_id, value)

    def _fail(self, spec, error: BaseException) -> None:
        self._put_results(spec, [serialize(error, is_error=True)] * len(spec.return_ids))

    def _run_task(self, spec, gpu_ids) -> None:
        _current.spec = spec
        try:
            result = run_attempts(spec, self._execute)
        finally:
            _current.spec = None
            with self._lock:
                self._pool.release(spec.resources, gpu_ids)
        self._put_results(spec, result.values)
        self._dispatch()

    def blocked(self, spec) -> None:
        """The task `spec` waits in get/wait: lend its CPUs to other tasks."""
        with self._lock:
            self._pool.release_cpus(spec.resources)
        self._dispatch()

    def unblocked(self, spec) -> None:
        with self._lock:
            self._pool.reacquire_cpus(spec.resources)

    # -- actors -----------------------------------------------------------------
    def _actor_call(self, spec) -> None:
        with self._lock:
            actor = self._actors.get(spec.actor_id)
            alive = actor is not None and actor.state is not ActorLifecycle.DEAD
            if alive:
                actor.calls.put(spec)
        if not alive:
            reason = actor.reason if actor else "the actor is unknown to this backend"
            self._fail(spec, exc.ActorDiedError(f"the actor {spec.function_name} is dead: "
                                                f"{reason}"))

    def _actor_loop(self, actor: _Actor) -> None:
        spec = actor.spec
        with self._lock:
            if actor.state is not ActorLifecycle.DEAD:  # (it may be killed already)
                actor.state = actor.state.to(ActorLifecycle.STARTING)
        result = run_attempts(spec, self._execute, retries=False)
        with self._lock:
            if actor.state is ActorLifecycle.DEAD:
                pass
            elif result.error is not None:
                actor.state = actor.state.to(ActorLifecycle.DEAD)
                actor.reason = ("the actor's constructor raised:\n"
                                f"{getattr(result.error, 'traceback_str', str(result.error))}")
            else:
                actor.state = actor.state.to(ActorLifecycle.ALIVE)
            state, reason = actor.state, actor.reason
        self._set_state(spec.actor_id, state, reason)
        self._put_results(spec, result.values)
        while True:
            call = actor.calls.get()
            if call is _STOP:
                break
            if actor.state is ActorLifecycle.DEAD:
                self._fail(call, exc.ActorDiedError(
                    f"the actor {spec.function_name} is dead: {actor.reason}"))
                continue
            result = run_attempts(call, self._execute, spec)  # (held until stored)
            self._put_results(call, result.values)
        with self._lock:
            if actor.state is not ActorLifecycle.DEAD:
                actor.state = actor.state.to(ActorLifecycle.DEAD)
                actor.reason = "all handles to it went out of scope"
            left = []
            while True:
                try:
                    left.append(actor.calls.get_nowait())
                except queue.Empty:
                    break
            self._pool.release(spec.resources, actor.gpu_ids)
        self.executor.drop_actor(spec.actor_id)
        self._set_state(spec.actor_id, ActorLifecycle.DEAD, actor.reason)
        for call in left:
            if call is not _STOP:
                self._fail(call, exc.ActorDiedError(
                    f"the actor {spec.function_name} is dead: {actor.reason}"))
        self._dispatch()

    def _set_state(self, actor_id: bytes, state: ActorLifecycle, reason: str = "") -> None:
        info = self._tables.set_actor_state(actor_id, state.recorded, reason)
        hook = plugins.observer("beamlet_actor_state")
        if hook is not None and info is not None:
            hook(actor_id=actor_id, class_name=info.class_name, state=state.recorded,
                 reason=reason)

    def _stop_actor(self, actor_id: bytes, reason: str | None) -> None:
        """End an actor: at once (``reason`` given: queued and later calls fail), or
        gracefully (None: the calls queued so far still run, then it ends)."""
        with self._lock:
            actor = self._actors.get(actor_id)
            if actor is None or actor.state is ActorLifecycle.DEAD:
                return
            if reason is None:
                actor.calls.put(_STOP)
                return
            actor.state = actor.state.to(ActorLifecycle.DEAD)
            actor.reason = reason
            creation = self._queued.pop(actor.spec.return_ids[0], None)
            if creation is not None and creation in self._ready:
                self._ready.remove(creation)
            actor.calls.put(_STOP)
        if creation is None:
            return  # its thread runs: it fails the queued calls and ends
        # It never started, so no thread will drain its queue: do it here.
        self._set_state(actor_id, ActorLifecycle.DEAD, reason)
        died = exc.ActorDiedError(f"the actor {actor.spec.function_name} is dead: {reason}")
        self._fail(actor.spec, died)
        while True:
            try:
                call = actor.calls.get_nowait()
            except queue.Empty:
                break
            if call is not _STOP:
                self._fail(call, died)

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        self._stop_actor(actor_id, "it was killed by beamlet.kill()")

    def token_released(self, object_id: bytes) -> None:
        """An actor's last handle is gone: it ends once its queued calls have run."""
        with self._lock:
            actor_id = self._actor_by_token.pop(object_id, None)
        if actor_id is not None:
            self._stop_actor(actor_id, None)

    # -- the rest of the contract ---------------------------------------------------
    def cancel(self, object_id: bytes, force: bool = False) -> None:
        with self._lock:
            spec = self._queued.pop(object_id, None)
            if spec is not None and spec in self._ready:
                self._ready.remove(spec)
        if spec is not None:
            self._fail(spec, exc.TaskCancelledError(f"task {spec.display_name} was cancelled"))

    def total_resources(self) -> dict[str, float]:
        return self._pool.total()

    def available_resources(self) -> dict[str, float]:
        with self._lock:
            return self._pool.available()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.clear()
            self._queued.clear()
            actors = [a for a in self._actors.values() if a.state is not ActorLifecycle.DEAD]
        for actor in actors:
            self._stop_actor(actor.spec.actor_id, "beamlet was shut down")
        self.threads.close()


class ThreadObjectStore(MemoryObjectStore):
    """A MemoryObjectStore that tells the scheduler when a running task blocks."""

    scheduler: ThreadScheduler | None = None

    def get(self, object_ids, timeout=None):
        spec = getattr(_current, "spec", None)
        if spec is None or "CPU" not in spec.resources or all(map(self.contains, object_ids)):
            return super().get(object_ids, timeout)
        self.scheduler.blocked(spec)
        try:
            return super().get(object_ids, timeout)
        finally:
            self.scheduler.unblocked(spec)

    def wait(self, object_ids, num_returns, timeout=None):
        spec = getattr(_current, "spec", None)
        if spec is None or "CPU" not in spec.resources or timeout == 0 or \
                sum(map(self.contains, object_ids)) >= num_returns:
            return super().wait(object_ids, num_returns, timeout)
        self.scheduler.blocked(spec)
        try:
            return super().wait(object_ids, num_returns, timeout)
        finally:
            self.scheduler.unblocked(spec)


class ThreadsBackend(Backend):
    """The ``threads`` backend: tasks run in parallel on threads of the driver process."""

    name = "threads"
    parallel = True
    isolated = False
    zero_copy = False
    multi_node = False

    def __init__(self, config: dict, runtime):
        self.control_store = MemoryControlStore()
        self.object_store = ThreadObjectStore(runtime.refs)
        pool = ResourcePool(config.get("num_cpus"), config.get("num_gpus"),
                            config.get("resources"))
        self.scheduler = ThreadScheduler(runtime, self.object_store, self.control_store, pool)
        self.object_store.scheduler = self.scheduler
        self.node_id = "threads-" + runtime.job_id[:8]
        self.worker_id = f"driver-{os.getpid()}"

    def object_released(self, object_id: bytes) -> None:
        self.object_store.delete([object_id])
        self.scheduler.token_released(object_id)

    def shutdown(self) -> None:
        self.scheduler.shutdown()
        self.object_store.close()


@hookimpl
def beamlet_backends():
    # The class is its own factory (called with config, runtime), which also
    # lets `beamlet backends` read its capability flags without starting it.
    return {"threads": ThreadsBackend}

"""The ``inprocess`` backend: every task runs inside ``.remote()``, in the caller's thread.

For debugging (Ray's retired local mode): ``breakpoint()``, ``print`` and
profilers work inside tasks and actor methods. Arguments and results are
still serialized, so what fails to pickle here fails on a cluster too; a
task's exception is stored in its ref and raised by ``get``. A generator
task runs inside ``.remote()`` too, up to its backpressure limit if it has
one; then it goes on (in the consumer's thread) each time its consumer has
taken enough of its items. Resources are
accounted (``available_resources`` shows them in use while a task runs) but
never make a task wait; a request no node could meet still raises. A task or
actor scheduled in a placement group that is still pending waits, as in
Ray: ``.remote()`` returns at once and it runs when the group is reserved
(inside whatever frees the resources: another thread's task ending, a kill, a
group's removal), or fails with ``TaskPlacementGroupRemoved`` (an actor: is
dead) if its group is removed first.
"""
from __future__ import annotations

import os
import time

from ... import exceptions as exc
from ...core import plugins
from ...core.actor import EXIT_REASON, concurrency_group_of
from ...core.control_store import open_control_store
from ...core.execution import Executor
from ...core.interfaces import Backend, Scheduler
from ...core.memory_store import MemoryObjectStore
from ...core.options import check_backend_options
from ...core.placement import in_group, ready_value, removed_value
from ...core.resources import ResourcePool
from ...core.runtime import Runtime
from ...core.scheduling import ActorLifecycle, run_attempts
from ...core.serialization import serialize
from ...core.tables import Tables
from ...core.task_events import RUNNING
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, TaskSpec


class _Actor:
    __slots__ = ("spec", "state", "reason", "waiting")

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.state = ActorLifecycle.STARTING  # (it is created at once, at submission)
        self.reason = ""
        #: While its placement group is pending: the calls made to it meanwhile.
        self.waiting: list[TaskSpec] | None = None


class InProcessScheduler(Scheduler):
    """Runs each spec at submission, synchronously, with retries for user errors
    when the task asks for them."""

    def __init__(self, runtime: Runtime, store: MemoryObjectStore, control_store,
                 pool: ResourcePool):
        self._store = store
        self._tables = Tables(control_store)
        self._refs = runtime.refs
        self._pool = pool
        self.executor = Executor(runtime)
        self._actors: dict[bytes, _Actor] = {}
        self._actor_by_token: dict[bytes, bytes] = {}
        self._groups: dict[str, object] = {}  # placement group key -> PlacementGroupInfo
        self._groups_pending = False
        #: Generator calls held back by their consumer: stream id -> (spec,
        #: Stream, store waiter).
        self._held: dict[bytes, tuple] = {}
        #: Placement group key -> the specs waiting for it to be reserved.
        self._unplaced: dict[str, list[TaskSpec]] = {}

    def submit(self, spec: TaskSpec) -> None:
        plugins.notify("beamlet_task_submitted", spec=spec)
        if spec.kind == ACTOR_METHOD:
            self._run_actor_method(spec)
            return
        self._pool.check_feasible(spec.resources, spec.display_name)
        if spec.placement_group is not None:
            key = spec.placement_group[0].key
            if key in self._pool.pending_groups():
                if spec.kind == ACTOR_CREATION:  # (known now: its calls wait with it)
                    actor = self._actors[spec.actor_id] = _Actor(spec)
                    actor.waiting = []
                    self._actor_by_token[spec.return_ids[0]] = spec.actor_id
                self._unplaced.setdefault(key, []).append(spec)
                return
        self._start(spec)

    def _start(self, spec: TaskSpec) -> None:
        if spec.kind == ACTOR_CREATION:
            self._create_actor(spec)
        else:
            self._run_task(spec)

    def _execute(self, spec: TaskSpec):
        """Run one attempt, holding its resources meanwhile."""
        gpu_ids = self._pool.acquire(spec.resources)
        if self.task_progress is not None:
            self.task_progress((spec.task_id, spec.attempt, RUNNING, os.getpid(),
                                time.perf_counter()))
        try:
            return self.executor.execute(spec)
        finally:
            self._pool.release(spec.resources, gpu_ids)
            if self._groups_pending:
                self._reserve_groups()

    def _put_results(self, spec: TaskSpec, values) -> None:
        for object_id, value in zip(spec.return_ids, values):
            self._store.put(object_id, value)

    def _run_task(self, spec: TaskSpec) -> None:
        result = run_attempts(spec, self._execute)  # (held: it keeps refs in the value alive)
        self._finish(spec, result)

    def _finish(self, spec: TaskSpec, result) -> None:
        if result.stream is not None:  # a generator waiting for its consumer
            stream = result.stream
            waiter = self._store.notify_when(stream.waiting_for, 1,
                                             lambda: self._resume(spec, stream), broad=False)
            if waiter is not None:
                self._held[spec.return_ids[0]] = (spec, stream, waiter)
            return
        self._put_results(spec, result.values)

    def _resume(self, spec: TaskSpec, stream, stop: BaseException | None = None) -> None:
        """Go on with a held-back generator call (in the thread that stored what
        it waited for: its consumer's), or end it with the error `stop`."""
        if self._held.pop(spec.return_ids[0], None) is None and stop is None and \
                self._store.closed:
            return  # (shut down: the store woke every waiter)
        gpu_ids = self._pool.acquire(spec.resources)
        try:
            result = self.executor.resume(spec, stream, stop)
        finally:
            self._pool.release(spec.resources, gpu_ids)
        self._finish(spec, result)

    def _create_actor(self, spec: TaskSpec) -> None:
        waited = self._actors.get(spec.actor_id)
        if waited is not None and waited.state is ActorLifecycle.DEAD:
            return  # (killed while its group was pending)
        self._actors[spec.actor_id] = _Actor(spec)
        self._actor_by_token[spec.return_ids[0]] = spec.actor_id
        if spec.actor_options.get("detached"):
            self._refs.incr(spec.return_ids[0])  # lives until killed, handles or not
        result = run_attempts(spec, self._execute, retries=False)
        if result.error is not None:
            self._end_actor(spec.actor_id, f"the actor's constructor raised:\n"
                            f"{getattr(result.error, 'traceback_str', str(result.error))}")
        else:
            self._move(spec.actor_id, ActorLifecycle.ALIVE)
        self._put_results(spec, result.values)
        for call in waited.waiting if waited is not None and waited.waiting else ():
            self._run_actor_method(call)

    def _run_actor_method(self, spec: TaskSpec) -> None:
        actor = self._actors.get(spec.actor_id)
        if actor is not None and actor.waiting is not None:
            actor.waiting.append(spec)  # (its creation waits for its placement group)
            return
        if actor is None or actor.state is ActorLifecycle.DEAD:
            reason = actor.reason if actor else "the actor is unknown to this backend"
            err = exc.ActorDiedError(f"the actor {spec.function_name} is dead: {reason}")
            self._put_results(spec, [serialize(err, is_error=True)] * len(spec.return_ids))
            return
        if spec.actor_options is not None:
            try:  # (calls run one at a time here: a group's limit always holds)
                concurrency_group_of(spec, actor.spec.actor_options)
            except ValueError as err:
                self._put_results(spec, [serialize(err, is_error=True)] * len(spec.return_ids))
                return
        result = run_attempts(spec, self._execute, actor.spec)
        self._finish(spec, result)
        if self.executor.exiting == spec.actor_id:  # it called exit_actor()
            self.executor.exiting = None
            self.executor.end_actor(spec.actor_id)
            self._end_actor(spec.actor_id, EXIT_REASON)

    def _move(self, actor_id: bytes, state: ActorLifecycle, reason: str = "") -> None:
        actor = self._actors[actor_id]
        actor.state = actor.state.to(state)
        info = self._tables.set_actor_state(actor_id, state.recorded, reason)
        if info is not None:
            plugins.notify("beamlet_actor_state", actor_id=actor_id,
                           class_name=info.class_name, state=state.recorded, reason=reason)

    # -- placement groups -------------------------------------------------------
    def create_placement_group(self, info) -> None:
        self._pool.add_group(info.pg_id.hex(), list(info.bundles))
        self._groups[info.pg_id.hex()] = info
        self._groups_pending = True
        self._reserve_groups()

    def _reserve_groups(self) -> None:
        pending = self._pool.pending_groups()
        placed = []
        for key in list(pending):
            if self._pool.reserve_group(key):
                pending.remove(key)
                info = self._groups[key]
                self._tables.set_placement_group_state(info.pg_id, "CREATED")
                self._store.put(info.ready_id, ready_value(info))
                placed.extend(self._unplaced.pop(key, ()))
        self._groups_pending = bool(pending)
        for spec in placed:  # (after: they may free or reserve more themselves)
            self._start(spec)

    def remove_placement_group(self, pg_id: bytes) -> None:
        key = pg_id.hex()
        info = self._groups.pop(key, None)
        if info is None:
            return
        pending = key in self._pool.pending_groups()
        error = serialize(exc.TaskPlacementGroupRemoved(
            f"the placement group {key} the task was scheduled in was removed"), is_error=True)
        for spec in self._unplaced.pop(key, ()):
            self._put_results(spec, [error] * len(spec.return_ids))
            if spec.kind == ACTOR_CREATION:
                self._end_actor(spec.actor_id, "its placement group was removed")
        for actor_id, actor in list(self._actors.items()):
            if actor.state is not ActorLifecycle.DEAD and in_group(actor.spec.resources, key):
                self._end_actor(actor_id, "its placement group was removed")
        self._pool.remove_group(key)
        if pending:
            self._store.put(info.ready_id, removed_value(info))
        self._reserve_groups()

    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True) -> None:
        """Every task has finished by the time its ref exists, but a generator
        held back by its consumer: that one ends, its next item being the
        cancellation error."""
        held = self._held.pop(object_id, None)
        if held is not None:
            spec, stream, waiter = held
            self._store.cancel_waiter(waiter)
            self._resume(spec, stream, KeyboardInterrupt())

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        actor = self._actors.get(actor_id)
        if actor is None or actor.state is ActorLifecycle.DEAD:
            return
        self._end_actor(actor_id, "it was killed by beamlet.kill()")

    def _end_actor(self, actor_id: bytes, reason: str) -> None:
        actor = self._actors[actor_id]
        if actor.state is ActorLifecycle.DEAD:
            return
        actor.reason = reason
        if actor.waiting is not None:  # it never started: its group is pending
            died = serialize(exc.ActorDiedError(
                f"the actor {actor.spec.function_name} is dead: {reason}"), is_error=True)
            for specs in self._unplaced.values():
                if actor.spec in specs:
                    specs.remove(actor.spec)
                    self._put_results(actor.spec, [died] * len(actor.spec.return_ids))
            waiting, actor.waiting = actor.waiting, None
            for call in waiting:
                self._put_results(call, [died] * len(call.return_ids))
            self._move(actor_id, ActorLifecycle.DEAD, reason)
            return
        for stream_id, (spec, stream, waiter) in list(self._held.items()):
            if spec.actor_id == actor_id:  # its generators end with it
                del self._held[stream_id]
                self._store.cancel_waiter(waiter)
                self._resume(spec, stream, exc.ActorDiedError(
                    f"the actor {spec.function_name} is dead: {reason}"))
        self.executor.drop_actor(actor_id)
        self._move(actor_id, ActorLifecycle.DEAD, reason)
        if actor.spec.actor_options.get("detached"):
            self._refs.decr(actor.spec.return_ids[0])  # last: it may free the token

    def token_released(self, object_id: bytes) -> None:
        """An actor's last handle is gone: end the actor, as Ray does."""
        actor_id = self._actor_by_token.pop(object_id, None)
        if actor_id is not None and self._actors[actor_id].state is not ActorLifecycle.DEAD:
            self._end_actor(actor_id, "all handles to it went out of scope")

    def total_resources(self) -> dict[str, float]:
        return self._pool.total()

    def available_resources(self) -> dict[str, float]:
        return self._pool.available()

    def shutdown(self) -> None:
        held, self._held = self._held, {}
        for _, _, waiter in held.values():
            self._store.cancel_waiter(waiter)
        for actor_id, actor in list(self._actors.items()):
            if actor.state is not ActorLifecycle.DEAD:
                self._end_actor(actor_id, "beamlet was shut down")


def driver_worker_row(worker_id: str) -> dict:
    """The driver's own row in `Backend.workers`."""
    return {"worker_id": worker_id, "pid": os.getpid(), "is_alive": True,
            "worker_type": "DRIVER", "state": "DRIVER", "actor_id": None}


class InProcessBackend(Backend):
    """The ``inprocess`` backend (also ``init(local_mode=True)``)."""

    name = "inprocess"
    parallel = False
    isolated = False
    zero_copy = False
    task_events = True
    placement_groups = True
    concurrency_groups = True
    streaming_generators = True

    # The local backend's options are accepted (and mean nothing here), so that a
    # program switched to this backend for debugging runs unchanged.
    accepted_options = frozenset({"object_store_memory", "max_workers", "prestart_workers"})

    def __init__(self, config: dict, runtime: Runtime):
        check_backend_options(config, self.accepted_options, self.name)
        self.control_store = open_control_store(config.get("control_store"))
        self.object_store = MemoryObjectStore(runtime.refs)
        pool = ResourcePool(config.get("num_cpus"), config.get("num_gpus"),
                            config.get("resources"))
        self.scheduler = InProcessScheduler(runtime, self.object_store, self.control_store, pool)
        self.node_id = "inprocess-" + runtime.job_id[:8]
        self.worker_id = f"driver-{os.getpid()}"

    def object_released(self, object_id: bytes) -> None:
        self.object_store.delete([object_id])
        self.scheduler.token_released(object_id)

    def workers(self) -> list[dict]:
        # Every task and actor runs here, in the driver's process.
        return [driver_worker_row(self.worker_id)]

    def shutdown(self) -> None:
        self.scheduler.shutdown()
        self.object_store.close()
        self.control_store.close()  # (a Redis store's connections and listener thread)

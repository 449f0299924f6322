"""What runs on a Dask worker: beamlet tasks, and the hosts of beamlet actors.

Each worker process keeps one beamlet Runtime per job (``_Job``), made on the
job's first task there, whose backend is ``DaskBackend`` on the worker's own
Dask client: a task that submits tasks, puts or gets objects talks to the
Dask scheduler directly. ``end_job`` (run on every worker by the driver's
``shutdown``) stops the job's actors and releases everything it held.

A beamlet actor lives in an ``ActorHost``, a Dask actor. Each call arrives
as one Dask actor call of ``ActorHost.call`` (``actor_execute``, straight
from the caller), whose answer is the call's values. Several calls from one
caller may travel on several connections, so each carries its caller's
sequence number and the host starts them in that order. A call whose
arguments include refs reads them from Dask during its turn, so the calls
behind it wait, as in Ray.

A killed actor's calls end at once with ActorDiedError, the one running
included: Dask cannot stop a thread, so the host abandons that call (its
thread runs on, its outcome unread) rather than wait for it, as a kill must
not wait for the actor's code. A call whose host's worker dies ends with
ActorDiedError when its connection closes. The creation ref's task checks
every `_POLL` seconds that the host's Dask actor is still there.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading

from ... import exceptions as exc
from ...core import plugins
from ...core import runtime as _runtime
from ...core.execution import Executor
from ...core.scheduling import ActorLifecycle, run_attempts
from ...core.tables import ActorState
from ...core.serialization import serialize
from ...core.task_spec import TaskSpec
from .objects import as_stored, carried

_POLL = 10.0  # seconds between checks that an actor's host is still there
_CANCEL_GRACE = 1.0  # seconds a killed async actor's calls get to unwind

_jobs: dict[str, "_Job"] = {}
_ended_jobs: set[str] = set()  # (their tasks arriving late must not make them again)
#: Guards `_jobs` and `_ended_jobs`, briefly: `end_job` takes it on the worker's
#: event loop, so it is never held while a Runtime is made (which needs that loop).
_jobs_lock = threading.Lock()
_making_lock = threading.Lock()  # (one Runtime made at a time)


class _Job:
    """One driver's job as this worker process runs it."""

    def __init__(self, job: dict):
        for path in reversed(job.get("sys_path", ())):
            if path not in sys.path:
                sys.path.insert(0, path)
        from .backend import DaskBackend
        config = {"job_id": job["job_id"], "namespace": job["namespace"], "dask_worker": True,
                  "job": job, "job_metadata": job.get("job_metadata"),
                  "default_actor_lifetime": job.get("default_actor_lifetime")}
        self.runtime = _runtime.Runtime(DaskBackend, config)
        # A Dask worker process hosts many actors and tasks at once, so an actor's
        # runtime_env variables are set around each of its calls, not for its life.
        self.executor = Executor(self.runtime, actors_own_process=False)
        self.hosts: list[ActorHost] = []
        if job.get("task_events"):
            from .backend import task_events_channel
            self._channel = task_events_channel(job["job_id"])
            plugins.add_listener("beamlet_task_finished", self._task_finished)

    def _task_finished(self, spec, status, duration, pid) -> None:
        """Send an attempt's end of this job's task to the driver (whose plugins
        observe them), as ``task id hex, attempt, status, duration, pid``.
        On the task's thread, before its result is returned: the report is
        with the Dask scheduler before the result (the driver's `shutdown`
        counts on it)."""
        if _runtime.current_or_none() is not self.runtime:
            return  # (another job's, in this process)
        message = f"{spec.task_id.hex()},{spec.attempt},{status},{duration!r},{pid}"
        try:
            self.runtime.backend.control_store.publish(self._channel, message.encode())
        except Exception:  # noqa: BLE001 - the cluster is going away: nobody to tell
            pass

    def close(self) -> None:
        plugins.remove_listener("beamlet_task_finished", self._task_finished)
        for host in self.hosts:
            host.end("beamlet was shut down", record=False)
        self.runtime.shutdown()


def _job(job: dict) -> _Job:
    """The job's Runtime in this process (made on first use), made current;
    BackendError if the job ended here already."""
    job_id = job["job_id"]
    state = _jobs.get(job_id)  # (an ended job is no longer there: end_job pops it)
    if state is None:
        state = _known_job(job_id)
    if state is None:
        with _making_lock:
            state = _known_job(job_id)
            if state is None:
                made = _Job(job)
                with _jobs_lock:
                    ended = job_id in _ended_jobs
                    if not ended:
                        state = _jobs[job_id] = made
                if ended:  # (while it was being made)
                    made.close()
                    state = _known_job(job_id)
    _runtime.set_current(state.runtime)
    return state


def _known_job(job_id: str) -> _Job | None:
    with _jobs_lock:
        if job_id in _ended_jobs:
            raise exc.BackendError(f"beamlet job {job_id} has ended")
        return _jobs.get(job_id)


async def end_job(job_id: str) -> bool:
    """Forget the job in this worker process (run by the driver at shutdown,
    through ``Client.run``, on the worker's event loop). Its Runtime is shut
    down on another thread: that talks to the scheduler through the worker's
    client, whose blocking calls on the event loop's own thread would return
    unawaited coroutines (Dask's rule for that thread) and do nothing."""
    with _jobs_lock:
        _ended_jobs.add(job_id)
        state = _jobs.pop(job_id, None)
    if state is None:
        return False
    if _runtime.current_or_none() is state.runtime:
        _runtime.set_current(None)
    await asyncio.get_running_loop().run_in_executor(None, state.close)
    return True


def _outcome(job: _Job, spec: TaskSpec, values: list):
    """The Dask value of a finished task: its one result, or the list of them.
    The refs inside the results stay alive for the rest of the job (the
    owner reading them takes its own hold)."""
    store = job.runtime.backend.object_store
    for value in values:
        if value.refs:
            store.pin_for_job(value.refs)
    job.runtime.backend.hold_borrowed()
    values = [as_stored(value) for value in values]
    return values[0] if len(spec.return_ids) == 1 else values


#: For recursive cancels: while a task or actor call runs here, its task id ->
#: its first return id (its ref), and that ref -> (object store, return id) of
#: each task it submitted.
_running: dict[bytes, bytes] = {}
_children: dict[bytes, list] = {}
_children_lock = threading.Lock()


def run_task(job: dict, spec: TaskSpec, deps: dict):
    """A beamlet task, as a Dask task. `deps` maps the ids of its ref arguments
    to their values, which Dask fetched to this worker."""
    state = _job(job)
    with _running_as(spec):
        if deps:
            with state.runtime.backend.object_store.provided(deps):
                result = run_attempts(spec, state.executor.execute)
        else:
            result = run_attempts(spec, state.executor.execute)
    return _outcome(state, spec, result.values)


@contextlib.contextmanager
def _running_as(spec: TaskSpec):
    """While task or actor call `spec` runs here (the body), the tasks it
    submits are noted as its children (`note_child`), for a recursive cancel."""
    ref = spec.return_ids[0] if spec.return_ids else None
    if ref is None:
        yield
        return
    with _children_lock:
        _running[spec.task_id] = ref
        _children[ref] = []
    try:
        yield
    finally:
        with _children_lock:
            _running.pop(spec.task_id, None)
            _children.pop(ref, None)


def note_child(store, spec: TaskSpec) -> None:
    """(DaskScheduler, in a worker.) `spec` was just submitted: if a task running
    here submitted it, remember it as that task's child."""
    context = _runtime.task_context.get()
    if context is None or not spec.return_ids:
        return
    with _children_lock:
        ref = _running.get(context.task_id)
        if ref is not None:
            _children[ref].append((store, spec.return_ids[0]))


async def cancel_children(refs: list) -> list:
    """(Run on every worker by a recursive cancel.) Cancel the unfinished tasks
    that the running tasks of `refs` submitted here; return their refs, whose
    own children are next."""
    with _children_lock:
        children = [child for ref in refs for child in _children.get(ref, ())]
    if not children:
        return []

    def cancel():  # (off the event loop: it asks the scheduler)
        for store, child in children:
            try:
                store.cancel(child)
            except exc.BeamletError:
                pass  # (its job is over)
    await asyncio.get_running_loop().run_in_executor(None, cancel)
    return [child for _store, child in children]


def _hosted_at(key: str, address: str, dask_scheduler=None) -> bool:
    """(Runs in the Dask scheduler.) Whether the worker at `address` holds `key`."""
    ts = dask_scheduler.tasks.get(key)
    return ts is not None and ts.state == "memory" and \
        any(ws.address == address for ws in ts.who_has)


def _answer(host, pending):
    """The outcome of `pending`, a call to the Dask actor `host`, waited for in
    turns of `_POLL` seconds, between which the scheduler is asked whether the
    host's worker still holds it; RuntimeError if not. (Dask's own wait would
    not end: a worker's Actor proxy waits for its key's Future, which in a
    worker is never told the key's state.) The call's own errors are raised."""
    from distributed import get_client

    from .objects import seceded
    with seceded():
        while True:
            try:
                return pending.result(timeout=_POLL)
            except TimeoutError:
                # (Actor._address: where Dask placed it, the same for as long as it lives.)
                if not get_client().run_on_scheduler(_hosted_at, host.key, host._address):
                    raise RuntimeError("the Dask worker holding it left the cluster") from None


def died_of(name: str, err: Exception):
    """The error object of a call to an actor whose host went away."""
    error = exc.ActorDiedError(f"the actor {name} is dead: its Dask worker is gone "
                               f"({type(err).__name__}: {err})")
    return serialize(error, is_error=True)


def actor_created(host, name: str) -> object:
    """The value of an actor's creation ref: its constructor's outcome."""
    try:
        return as_stored(_answer(host, host.created()))
    except Exception as err:  # noqa: BLE001 - the host's worker is gone
        return as_stored(died_of(name, err))


class ActorHost:
    """Hosts one beamlet actor in a Dask worker (made by ``Client.submit(...,
    actor=True)``). Its ``async`` methods run on the worker's event loop and
    never block it; the actor's own code runs on the host's threads (one, or
    ``max_concurrency``), or on its event loop thread for an async actor."""

    def __init__(self, job: dict, spec: TaskSpec, deps: dict):
        self._job = _job(job)
        self._job.hosts.append(self)
        self._spec = spec
        options = spec.actor_options or {}
        self._is_async = bool(options.get("is_async"))
        threads = 1 if self._is_async else max(1, int(options.get("max_concurrency") or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="beamlet-actor")
        self._dead: str | None = None
        #: Set (on the worker's event loop) when the actor ends: what its
        #: calls wait for stops being waited for.
        self._ended = asyncio.Event()
        from distributed import get_worker
        self._loop = get_worker().loop.asyncio_loop
        self._exit_pending = False  # (see call)
        self._async_calls: set[asyncio.Task] = set()  # (on the actor's own loop)
        self._semaphore: asyncio.Semaphore | None = None
        self._next: dict[bytes, int] = {}
        self._in_flight = 0  # (calls arrived and not answered: see quiesce)
        #: The outcomes of the calls running now, awaited on the worker's loop.
        self._answers: set[asyncio.Future] = set()
        self._turns: dict[bytes, dict[int, asyncio.Future]] = {}
        self._created = self._pool.submit(self._construct, deps)

    # -- construction ---------------------------------------------------------------
    def _construct(self, deps: dict):
        _runtime.set_current(self._job.runtime)
        spec = self._spec
        record = self._job.runtime.tables.actor(spec.actor_id)
        if record is not None and record.state is ActorState.DEAD:
            # (Killed before its host existed: see DaskScheduler.end_actor.)
            self.end(record.reason, record=False)
            return self._died(spec)[0]
        with self._job.runtime.backend.object_store.provided(deps):
            result = run_attempts(spec, self._job.executor.execute, retries=False)
        if result.error is not None:
            trace = getattr(result.error, "traceback_str", str(result.error))
            self.end(f"the actor's constructor raised:\n{trace}")
        else:
            self._record(ActorLifecycle.ALIVE)
        self._job.runtime.backend.hold_borrowed()
        return result.values[0]

    async def created(self):
        """The constructor's outcome (an ActorDiedError if the actor ends first)."""
        constructing = asyncio.wrap_future(self._created)
        if not await self._unless_ended(constructing) or constructing.cancelled():
            return self._died(self._spec)[0]
        return constructing.result()

    async def _unless_ended(self, awaitable) -> bool:
        """Await `awaitable`, unless the actor ends first: then it is cancelled
        (a call running on a thread runs on, its outcome unread) and False
        returned."""
        waiting = asyncio.ensure_future(awaitable)
        if not waiting.done():
            ended = asyncio.ensure_future(self._ended.wait())
            try:
                await asyncio.wait((waiting, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
        if waiting.done():
            return True
        waiting.cancel()
        return False

    # -- calls -------------------------------------------------------------------------
    async def call(self, caller: bytes, seq: int, spec: TaskSpec):
        """One method call (a Dask actor call from its caller): its values, the
        error objects of what failed included."""
        self._in_flight += 1
        try:
            return await self._call(caller, seq, spec)
        finally:
            self._in_flight -= 1

    async def _call(self, caller: bytes, seq: int, spec: TaskSpec):
        # (The waits are skipped when there is nothing to wait for, the usual
        # case: each costs event-loop tasks, a call's main cost here.)
        try:
            if self._next.get(caller, 0) < seq and \
                    not await self._unless_ended(self._turn(caller, seq)):
                return self._died(spec)
            if not self._created.done():
                constructing = asyncio.wrap_future(self._created)
                if not await self._unless_ended(constructing):
                    return self._died(spec)
            if self._dead is not None:
                return self._died(spec)
            deps = {}
            if spec.args or spec.kwargs:
                ids = spec.dependencies()
                if ids:  # (read off the event loop: the caller holds them until we answer)
                    store = self._job.runtime.backend.object_store
                    reading = asyncio.get_running_loop().run_in_executor(
                        None, store.read_borrowed, ids)
                    if not await self._unless_ended(reading):
                        return self._died(spec)
                    deps = reading.result()
            try:
                if self._is_async:
                    running = asyncio.run_coroutine_threadsafe(
                        self._call_async(spec, deps), self._instance_loop())
                else:
                    running = self._pool.submit(self._call_sync, spec, deps)
            except (RuntimeError, KeyError):  # (it ended since, on another thread)
                return self._died(spec)
        finally:
            self._advance(caller)
        answer = asyncio.wrap_future(running)
        self._answers.add(answer)  # (cancelled by `end`)
        if self._ended.is_set():  # (killed since it was handed over)
            answer.cancel()
        try:
            values = await answer
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # (this call itself is cancelled: the worker is closing)
            return self._died(spec)  # (killed while it ran, or before it started)
        finally:
            self._answers.discard(answer)
        if self._exit_pending:  # (an async call ran exit_actor(): end it off its loop)
            self._exit_pending = False
            await asyncio.get_running_loop().run_in_executor(None, self._finish_exit)
        return values

    def _call_sync(self, spec: TaskSpec, deps: dict):
        if self._dead is not None:
            return self._died(spec)
        _runtime.set_current(self._job.runtime)
        with _running_as(spec), self._job.runtime.backend.object_store.provided(deps):
            result = run_attempts(spec, self._job.executor.execute, self._spec)
        if self._exited():
            self._finish_exit()
        return self._kept(result.values)

    def _exited(self) -> bool:
        """Whether the call that just ran called ``exit_actor()``; if so the
        actor is dead from now on (calls not started yet fail), as Ray ends one
        gracefully. Run on the thread that ran the call, before the next starts."""
        executor = self._job.executor
        if executor.exiting != self._spec.actor_id:
            return False
        from ...core.actor import EXIT_REASON
        executor.exiting = None
        if self._dead is None:
            self._dead = EXIT_REASON
        return True

    def _finish_exit(self) -> None:
        """The rest of the graceful end: the actor's ``__ray_shutdown__``, then
        its record (its worker process, shared with other tasks, lives on)."""
        from ...core.actor import EXIT_REASON
        self._job.executor.end_actor(self._spec.actor_id)
        self._record(ActorLifecycle.DEAD, EXIT_REASON)

    async def _call_async(self, spec: TaskSpec, deps: dict):
        if self._semaphore is None:  # (made here: it belongs to the actor's own loop)
            self._semaphore = asyncio.Semaphore(
                int((self._spec.actor_options or {}).get("max_concurrency") or 1000))
        task = asyncio.current_task()
        self._async_calls.add(task)
        try:
            async with self._semaphore:
                if self._dead is not None:
                    return self._died(spec)
                with _running_as(spec), self._job.runtime.backend.object_store.provided(deps):
                    result = await self._job.executor.execute_async(spec)
                if self._exited():
                    self._exit_pending = True
        finally:
            self._async_calls.discard(task)
        return self._kept(result.values)

    async def _cancel_async_calls(self) -> None:
        """(On the actor's own loop, as it ends.) Cancel its running calls and
        give them `_CANCEL_GRACE` seconds to unwind, so that the loop is not
        stopped under them."""
        calls = list(self._async_calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls, timeout=_CANCEL_GRACE)

    def _kept(self, values: list) -> list:
        """`values`, with the refs inside them kept alive here for the job's life
        (they cross to the caller's process as bare ids)."""
        for value in values:
            if value.refs:
                self._job.runtime.backend.object_store.pin_for_job(value.refs)
        self._job.runtime.backend.hold_borrowed()
        return [carried(value) for value in values]

    def _instance_loop(self):
        return self._job.executor.actors[self._spec.actor_id].loop()

    def _died(self, spec: TaskSpec) -> list:
        error = exc.ActorDiedError(f"the actor {self._spec.function_name} is dead: {self._dead}")
        return [serialize(error, is_error=True)] * len(spec.return_ids)

    # -- ordering ----------------------------------------------------------------------
    async def _turn(self, caller: bytes, seq: int) -> None:
        if self._next.get(caller, 0) >= seq:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._turns.setdefault(caller, {})[seq] = waiter
        await waiter

    def _advance(self, caller: bytes) -> None:
        nxt = self._next[caller] = self._next.get(caller, 0) + 1
        waiter = self._turns.get(caller, {}).pop(nxt, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def quiesce(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) until no call is in progress here; whether none is."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while self._in_flight and loop.time() < until and self._dead is None:
            await asyncio.sleep(0.02)
        return not self._in_flight or self._dead is not None

    # -- the end -----------------------------------------------------------------------
    async def stop(self, reason: str) -> None:
        """End the actor (its record is the caller's to update): its calls, the
        running ones included, fail with ActorDiedError."""
        self.end(reason, record=False)

    def end(self, reason: str, record: bool = True) -> None:
        """End the actor (from any thread; never blocks on the actor's code)."""
        if self._dead is not None:
            return
        self._dead = reason
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._loop.call_soon_threadsafe(self._end_waits)
        except RuntimeError:
            pass  # (the worker's loop is closed: nothing waits there any more)
        actor_id = self._spec.actor_id
        instance = self._job.executor.actors.get(actor_id)
        if self._is_async and instance is not None:
            ending = asyncio.run_coroutine_threadsafe(self._cancel_async_calls(),
                                                      instance.loop())
            ending.add_done_callback(lambda _f: self._job.executor.drop_actor(actor_id))
        else:
            self._job.executor.drop_actor(actor_id)
        if record:
            self._record(ActorLifecycle.DEAD, reason)

    def _end_waits(self) -> None:
        """(On the worker's loop.) Stop waiting for anything the actor does."""
        self._ended.set()
        for answer in list(self._answers):
            answer.cancel()

    def _record(self, state: ActorLifecycle, reason: str = "") -> None:
        try:
            self._job.runtime.tables.set_actor_state(self._spec.actor_id, state.recorded, reason)
        except exc.BeamletError:
            pass  # (the driver is gone: nobody is left to read it)

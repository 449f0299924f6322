"""What runs on a Ray worker: beamlet tasks, and the hosts of beamlet actors.

Each Ray worker process keeps one beamlet Runtime per job (``_Job``), made on
the job's first task there, whose backend is ``RayBackend`` on the worker's
own Ray connection: a task that submits tasks, puts or gets objects talks to
Ray directly, and owns what it makes, as in Ray. (A Ray worker blocked in
``ray.get`` lends its CPU, so nested tasks cannot deadlock.)

A task is a call of the job's Ray task (`task_function`); its ref arguments
are Ray ObjectRefs among its top-level arguments, which Ray resolves on the
worker before it starts.
A beamlet actor lives in an ``ActorHost`` (or ``AsyncActorHost`` for an
actor with ``async`` methods), a Ray actor: Ray orders its calls per caller,
restarts it (``max_restarts``, rerunning the constructor), kills it, and ends
it once no handle is left (calling ``__ray_shutdown__``). Each beamlet actor
class has a Ray actor class of its own (`actor_class`): the host with one Ray
method per beamlet method, so that a plain call is a call of that Ray method
with the call's arguments as Ray's (`_direct`), as in Ray; the
others (generators, concurrency groups, keyword arguments, task events...)
go through the host's ``call``/``call_stream`` with the whole spec.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import threading
import time

import ray as _ray

from ... import exceptions as exc
from ...core import plugins
from ...core import runtime as _runtime
from ...core.execution import Executor
from ...core.scheduling import ActorLifecycle, run_attempts
from ...core.runtime import TaskContext, task_context
from ...core.serialization import PLAIN_TYPES, serialize
from ...core.ids import new_id
from ...core.task_spec import ACTOR_METHOD, ARG_VALUE, TASK, TaskSpec

_jobs: dict[str, "_Job"] = {}
_FINISHED = "beamlet_task_finished"
_jobs_lock = threading.Lock()


class _Job:
    """One driver's job as this worker process runs it."""

    def __init__(self, job: dict):
        for path in reversed(job.get("sys_path", ())):
            if path not in sys.path:
                sys.path.insert(0, path)
        from .backend import RayBackend
        config = {"job_id": job["job_id"], "namespace": job["namespace"], "ray_worker": True,
                  "job": job, "job_metadata": job.get("job_metadata")}
        self.runtime = _runtime.Runtime(RayBackend, config)
        self.executor = Executor(self.runtime)
        self.store = self.runtime.backend.object_store
        self.job_id = job["job_id"]
        #: Where this process tells the job's task record what it runs (events.py).
        self.events = None
        if job.get("task_events"):
            from .events import sender
            self.events = sender()


def _job(job: dict) -> _Job:
    """The job's Runtime in this process (made on first use), made current."""
    state = _jobs.get(job["job_id"])
    if state is None:
        with _jobs_lock:
            state = _jobs.get(job["job_id"])
            if state is None:
                state = _jobs[job["job_id"]] = _Job(job)
    _runtime.set_current(state.runtime)
    return state


def _returns(state: _Job, spec: TaskSpec, values: list):
    """The Ray return value(s) of a finished task or call."""
    if len(values) == 1:
        return state.store.pack(values[0])
    packed = [state.store.pack(v) for v in values]
    return packed[0] if len(packed) == 1 else tuple(packed)


def wire(spec: TaskSpec, dep_ids: list) -> bytes:
    """The spec and the ids of its ref arguments as Ray sees them: one pickle
    stream (specs pickle plainly, see TaskSpec). Ray passes bytes through
    as they are, where pickling a TaskSpec with its own serializer costs it
    ten times more than plain pickle."""
    return pickle.dumps((spec, dep_ids), 5)


def _unwire(args: tuple) -> tuple:
    """``(spec, dep_ids, carried, dep_values)`` from the Ray arguments of a
    call, ``(payload,)`` or ``(payload, carried, *dep_values)``: `payload` the
    spec and the ids of its ref arguments (`wire`), `carried` the Ray refs
    nested in its inline arguments (None: none), `dep_values` the values of
    its ref arguments, resolved by Ray.

    (Ray's entry points take ``*args``: Ray checks each call's arguments
    against the function's signature with ``inspect``, at a cost that grows
    with the number of parameters.)"""
    spec, dep_ids = pickle.loads(args[0])
    if len(args) == 1:
        return spec, dep_ids, _NOTHING_CARRIED, ()
    return spec, dep_ids, args[1] or _NOTHING_CARRIED, args[2:]


_NOTHING_CARRIED = ({}, {})


# -- cancel: waking a task blocked in a system call ---------------------------------------
# Ray's cancel (not forced) reaches the task running in a worker's main thread
# as a simulated SIGINT (``_thread.interrupt_main``): a flag that thread reads
# between bytecodes, so a task blocked in a system call (``time.sleep(60)``)
# would run on until the call returns. (The real SIGINT cannot help: Ray's
# processes block it, so that a terminal's Ctrl-C does not reach them.) While
# a task runs, the flag also writes a byte to the process's signal wakeup fd
# (``signal.set_wakeup_fd``); a thread of ours reading it sends the main
# thread a SIGURG, whose handler here does nothing: the blocked call fails
# with EINTR, and Python raises the KeyboardInterrupt at once. (SIGURG is
# ignored by default: a stray one interrupts nothing of anyone else's.)
_wake_lock = threading.Lock()
_wake_fd: int | None = None  # the wakeup pipe's write end (-1: not used in this process)
_in_task = False  # (main thread) a task runs, between `_interruptible` and `_done`


def _interruptible():
    """(The main thread, as a task starts.) Let a cancel wake the task from a
    blocking call; returns what `_done` needs (None: nothing to undo)."""
    global _in_task
    if _wake_fd is None:
        _wake_setup()
    if _wake_fd < 0 or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.set_wakeup_fd(_wake_fd, warn_on_full_buffer=False)
    _in_task = True
    return previous


def _done(previous) -> None:
    global _in_task
    if previous is not None:
        _in_task = False
        signal.set_wakeup_fd(previous)


def _wake_setup() -> None:
    global _wake_fd
    with _wake_lock:
        if _wake_fd is not None:
            return
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGURG) is not signal.SIG_DFL:  # (someone's own)
            _wake_fd = -1
            return
        signal.signal(signal.SIGURG, _ignore)
        reader, writer = os.pipe()
        os.set_blocking(writer, False)  # (set_wakeup_fd's condition)
        threading.Thread(target=_wake_main, args=(reader, threading.get_ident()),
                         name="beamlet-ray-cancel", daemon=True).start()
        _wake_fd = writer


def _ignore(signum, frame) -> None:
    pass


def _wake_main(reader: int, main: int) -> None:
    while True:
        tripped = os.read(reader, 256)
        if not tripped:
            return
        if _in_task and signal.SIGINT in tripped:
            signal.pthread_kill(main, signal.SIGURG)


def _run_task(job: dict, args: tuple):
    """A beamlet task as a Ray task, `args` its Ray arguments (`_unwire`)."""
    spec, dep_ids, carried, dep_values = _unwire(args)
    state = _job(job)
    _started(state, spec)
    wake = _interruptible()
    try:
        with state.store.provided(dep_ids, dep_values, carried):
            result = run_attempts(spec, state.executor.execute)
    finally:
        _done(wake)
    return _returns(state, spec, result.values)


def _stream_values(state: _Job, spec: TaskSpec, steps):
    """The Ray items of a generator call (`steps`: ``Executor.execute_stream``):
    each item the call stores (``put_stream_item``), packed, as it is made;
    for ``"dynamic"``, then the call's own value (the refs of the items). A
    call that failed before it stored anything gives its error, then the end
    of the stream."""
    backend = state.runtime.backend
    stream_id = spec.return_ids[0]
    out = backend.stream_out(stream_id)
    stored, final = False, None
    start = _started(state, spec)
    try:
        for step in steps:
            while out:
                stored = True
                yield state.store.pack(out.popleft())
            if step is not None:
                final = step
        yield from _stream_end(state, spec, out, stored, final)
    finally:
        steps.close()  # (here, not when collected: it resets this thread's context)
        backend.stream_done(stream_id)
        _attempt_finished(state, spec, start, final)


def _started(state: _Job, spec: TaskSpec) -> float:
    """Tell the job's task record that `spec` runs here (if it listens); when."""
    if state.events is not None:
        state.events.running(state.job_id, spec)
    return time.perf_counter()


def _attempt_finished(state: _Job, spec: TaskSpec, start: float, final) -> None:
    """Tell how a call that does not go through ``run_attempts`` ended (a
    generator call, an async actor's call): `final` its ExecutionResult; a
    generator stopped before its end (``final`` None) is cancelled."""
    from ...core.scheduling import attempt_status
    status = attempt_status(final is None or final.error is not None, False,
                            final is None or isinstance(final.error, exc.TaskCancelledError))
    duration = time.perf_counter() - start
    plugins.notify("beamlet_task_finished", spec=spec, status=status, duration=duration,
                   pid=os.getpid())


def _stream_end(state: _Job, spec: TaskSpec, out, stored: bool, final):
    while out:
        stored = True
        yield state.store.pack(out.popleft())
    if final is None:
        return
    if spec.generator[0] == "dynamic":
        yield state.store.pack(final.values[0])
    elif not stored and final.values and final.values[0].is_error:
        from ...core.generators import end_marker
        yield state.store.pack(final.values[0])
        yield state.store.pack(end_marker())


async def _async_stream_values(state: _Job, spec: TaskSpec, steps):
    """`_stream_values` of an async actor's generator method."""
    backend = state.runtime.backend
    stream_id = spec.return_ids[0]
    out = backend.stream_out(stream_id)
    stored, final = False, None
    start = _started(state, spec)
    try:
        async for step in steps:
            while out:
                stored = True
                yield state.store.pack(out.popleft())
            if step is not None:
                final = step
        for value in _stream_end(state, spec, out, stored, final):
            yield value
    finally:
        await steps.aclose()
        backend.stream_done(stream_id)
        _attempt_finished(state, spec, start, final)


def _remote(function, code):
    """`function` as a Ray remote function that carries `code` (a
    ``control.CarriedCode``, or None): Ray pickles a function's attributes
    with it, so the code arrives in each worker with the function, once."""
    if code is not None:
        function.carried_code = code
    return _ray.remote(function)


def stream_function(job: dict, code=None):
    """`task_function` for generator tasks: a Ray generator, called with
    ``num_returns="streaming"`` or ``"dynamic"``."""
    def run_stream(*args):
        spec, dep_ids, carried, dep_values = _unwire(args)
        state = _job(job)
        with state.store.provided(dep_ids, dep_values, carried):
            yield from _stream_values(state, spec, state.executor.execute_stream(spec))
    return _remote(run_stream, code)


def task_function(job: dict, code=None):
    """`_run_task` for one job as a Ray remote function, with the job bound
    and the code of the beamlet function it runs (`code`, a
    ``control.CarriedCode``): Ray ships a function to a worker once, where an
    argument would travel (and be serialized by Ray) with every task."""
    def run_task(*args):
        return _run_task(job, args)
    return _remote(run_task, code)


def plain_function(job: dict, template: tuple, takes_args: bool, code=None):
    """A Ray remote function for the plain calls of one beamlet function (one
    return, no generator, no placement group, no task events) whose every
    argument is a ref: Ray's arguments are exactly those refs, resolved by Ray,
    and what the spec holds besides is `template` (``function_id``,
    ``function_name``, ``resources``, ``max_retries``, ``retry_exceptions``,
    ``env_vars``, ``caller_id``) and the function's code (`code`, a
    ``control.CarriedCode``), carried once with the function. Each Ray
    argument costs Ray some CPU per task (native Ray's own no-op task costs
    about a sixth more with one argument than with none), so the common call
    sends none of its own.

    Without `takes_args` the function has no parameters, for calls without
    arguments: Ray binds a call's arguments to the signature (with
    ``inspect``, some 130 bytecodes) unless the function takes none.

    The spec made here has an id of its own (what ``get_runtime_context()``
    says inside the task); nothing outside this worker names it."""
    # (The closures call module-level functions: Ray pickles a closure's
    # globals by value, but a module's functions by reference.)
    if takes_args:
        def run_plain(*values):
            return _run_plain(job, template, values)
    else:
        def run_plain():
            return _run_plain(job, template, ())
    return _remote(run_plain, code)


def _run_plain(job: dict, template: tuple, values: tuple):
    """A plain call as `plain_function` makes it, `values` its arguments' values."""
    state = _jobs.get(job["job_id"])
    if state is None:
        state = _job(job)
    else:
        _runtime.set_current(state.runtime)
    args = [(ARG_VALUE, state.store.unpack_arg(v)) for v in values] if values else []
    function_id, function_name, resources, max_retries, retry_exceptions, env_vars, \
        caller_id = template
    spec = TaskSpec(new_id(), TASK, function_id, function_name, args, {}, _ONE_RETURN,
                    resources, max_retries, retry_exceptions, None, None, None, caller_id,
                    0, env_vars, None, None)
    wake = _interruptible()
    try:
        result = run_attempts(spec, state.executor.execute)
    finally:
        _done(wake)
    return state.store.pack(result.values[0])


#: The return ids of a plain call run by `plain_function` (only their number is read here).
_ONE_RETURN = (bytes(16),)


def _placement_group_ready(job: dict, pg_id: bytes, value):
    """(Runs in the group, once its bundles are reserved.) Record the group
    CREATED, then return `value` (the group, packed): whoever gets the ready
    ref reads CREATED in the tables. A group removed meanwhile stays REMOVED."""
    _job(job).runtime.tables.set_placement_group_state(pg_id, "CREATED")
    return value


ray_placement_group_ready = _ray.remote(num_cpus=0, max_retries=0)(_placement_group_ready)


def _reconstructed() -> bool:
    """Whether Ray is restarting the actor whose constructor runs here."""
    import warnings
    with warnings.catch_warnings():  # (Ray's property reads its own deprecated actor_id)
        warnings.simplefilter("ignore")
        return _ray.get_runtime_context().was_current_actor_reconstructed


def _refused(spec: TaskSpec) -> None:
    """Tell the observers of a call refused here (its actor is dead)."""
    plugins.notify("beamlet_task_finished", spec=spec, status="FAILED", duration=0.0,
                   pid=os.getpid())


class _Host:
    """The part both actor hosts share: construction and the end.

    Constructed with ``(job, code, *args)``: `code` the actor class's
    ``control.CarriedCode`` (known in this process once Ray has unpickled the
    arguments), `args` the creation's Ray arguments (`_unwire`)."""

    def __init__(self, job: dict, code, *args):
        spec, dep_ids, carried, dep_values = _unwire(args)
        self._job = _job(job)
        self._spec = spec
        self._dead: str | None = None
        #: method name -> what its plain calls need (`_note_plain`)
        self._plain: dict[str, tuple] = {}
        reconstructed = _reconstructed()
        if reconstructed:
            # (Ray reran the constructor: the instance reads it in
            # get_runtime_context().was_current_actor_reconstructed.)
            spec.attempt = max(spec.attempt, 1)
        if self._job.events is not None:
            if reconstructed:
                self._tell(ActorLifecycle.RESTARTING, "its process died")
            self._job.events.running(self._job.job_id, spec)
        with self._job.store.provided(dep_ids, dep_values, carried):
            result = run_attempts(spec, self._job.executor.execute, retries=False)
        self._created = self._job.store.pack(result.values[0])
        if result.error is not None:
            trace = getattr(result.error, "traceback_str", str(result.error))
            self._end(f"the actor's constructor raised:\n{trace}")
        else:
            self._record(ActorLifecycle.ALIVE)

    def _died(self, spec: TaskSpec):
        _refused(spec)
        error = exc.ActorDiedError(f"the actor {self._spec.function_name} is dead: {self._dead}")
        return _returns(self._job, spec, [serialize(error, is_error=True)] * len(spec.return_ids))

    def _died_stream(self, spec: TaskSpec):
        """The Ray items of a generator call to this dead actor."""
        from ...core.execution import ExecutionResult
        _refused(spec)
        error = exc.ActorDiedError(f"the actor {self._spec.function_name} is dead: {self._dead}")
        yield from _stream_end(self._job, spec, (), False,
                               ExecutionResult([serialize(error, is_error=True)], error))

    def __ray_shutdown__(self):
        """(Ray calls it when the actor ends gracefully: no handle left.)"""
        if self._dead is None:
            self._job.executor.end_actor(self._spec.actor_id)
            self._end("all handles to it went out of scope", shutdown=False)

    def _end(self, reason: str, shutdown: bool = True) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        if shutdown:
            self._job.executor.drop_actor(self._spec.actor_id)
        self._record(ActorLifecycle.DEAD, reason)

    def _record(self, state: ActorLifecycle, reason: str = "") -> None:
        try:
            self._job.runtime.tables.set_actor_state(self._spec.actor_id, state.recorded, reason)
        except exc.BeamletError:
            pass  # (the control store is gone: nobody is left to read it)
        self._tell(state, reason)

    def _tell(self, state: ActorLifecycle, reason: str) -> None:
        if self._job.events is not None:
            self._job.events.actor_state(self._job.job_id, self._spec.actor_id,
                                         self._spec.function_name, state.value, reason)


class ActorHost(_Host):
    """Hosts one beamlet actor whose methods are plain functions (``max_concurrency``
    threads, as Ray's threaded actors)."""

    def created(self):
        return self._created

    def call(self, *args):
        spec, dep_ids, carried, dep_values = _unwire(args)
        if self._dead is not None:
            return self._died(spec)
        _started(self._job, spec)
        with self._job.store.provided(dep_ids, dep_values, carried):
            result = run_attempts(spec, self._job.executor.execute, self._spec)
        return _after(self, spec, result.values)

    def call_stream(self, *args):
        """A generator method's call (a Ray generator: see `_stream_values`)."""
        spec, dep_ids, carried, dep_values = _unwire(args)
        if self._dead is not None:
            yield from self._died_stream(spec)
            return
        with self._job.store.provided(dep_ids, dep_values, carried):
            yield from _ended_by(self, _stream_values(self._job, spec,
                                                      self._job.executor.execute_stream(spec)))


class AsyncActorHost(_Host):
    """Hosts one beamlet actor with ``async`` methods: its calls run on the Ray
    actor's event loop, up to ``max_concurrency`` at once.

    Its concurrency groups are kept here, as semaphores on that one loop (the
    Ray actor's ``max_concurrency`` is the sum of all the limits): Ray would
    run each group on an event loop of its own, in a thread of its own, where
    beamlet's async actor has one loop, so that its methods may share asyncio
    objects (an ``asyncio.Event`` set by a call in one group and awaited by
    one in another)."""

    def __init__(self, job: dict, code, *args):
        super().__init__(job, code, *args)
        options = self._spec.actor_options or {}
        self._limits = {name: asyncio.Semaphore(limit) for name, limit in
                        (options.get("concurrency_groups") or {}).items()}
        if self._limits:
            self._limits[None] = asyncio.Semaphore(options.get("max_concurrency") or 1)

    async def created(self):
        return self._created

    async def call(self, *args):
        spec, dep_ids, carried, dep_values = _unwire(args)
        if self._dead is not None:
            return self._died(spec)
        if not self._limits:
            return await _async_call(self, spec, dep_ids, dep_values, carried)
        group = (spec.actor_options or {}).get("concurrency_group")
        async with self._limits[group]:
            return await _async_call(self, spec, dep_ids, dep_values, carried)

    async def call_stream(self, *args):
        """A generator method's call (a Ray async generator: see `_stream_values`)."""
        spec, dep_ids, carried, dep_values = _unwire(args)
        if self._dead is not None:
            for value in self._died_stream(spec):
                yield value
            return
        limit = self._limits.get((spec.actor_options or {}).get("concurrency_group")) \
            if self._limits else None
        if limit is not None:
            await limit.acquire()
        ending = False
        try:
            with self._job.store.provided(dep_ids, dep_values, carried):
                async for value in _async_stream_values(
                        self._job, spec, self._job.executor.execute_async_stream(spec)):
                    if not ending and self._job.executor.exiting is not None:
                        ending = _ending(self)  # (as `_ended_by`)
                    yield value
        finally:
            if limit is not None:
                limit.release()
            if ending or _ending(self):  # (as `_ended_by`)
                _exit_now(self)



# (The hosts' helpers are functions, not methods: Ray wraps each method of an
# actor class in a tracing shim, a few dozen bytecodes per call through it.)
def _after(host: _Host, spec: TaskSpec, values: list):
    """The call's Ray return value; if the call ran ``exit_actor()``, the actor
    then ends as Ray's ``exit_actor`` ends one (not restarted)."""
    returned = _returns(host._job, spec, values)
    _exit_if_asked(host)
    return returned


def _exit_if_asked(host: _Host) -> None:
    """If a call ran ``exit_actor()``, end the actor as Ray's ``exit_actor``
    ends one (not restarted): Ray's ``exit_actor`` raises here."""
    if _ending(host):
        _ray.actor.exit_actor()


def _ending(host: _Host) -> bool:
    """Whether a call ran ``exit_actor()``; if so, the actor is dead from now
    on to the calls that come (`_Host._died`): its process is to end next."""
    job = host._job
    if job.executor.exiting != host._spec.actor_id:
        return False
    from ...core.actor import EXIT_REASON
    job.executor.exiting = None
    job.executor.end_actor(host._spec.actor_id)
    host._end(EXIT_REASON, shutdown=False)
    if job.events is not None:
        job.events.flush()  # (this process ends next)
    return True


def _ended_by(host: _Host, items):
    """The items of a generator call that may run ``exit_actor()``: the actor
    is dead to other calls before the call's error item goes out (its caller,
    told, may call again at once, and in a threaded actor that call could
    run before this one ends), and ends after the last."""
    ending = False
    try:
        for item in items:
            if not ending and host._job.executor.exiting is not None:
                ending = _ending(host)
            yield item
    finally:  # (also if the stream is closed early: the actor is dead to calls already)
        if ending or _ending(host):
            _exit_now(host)


def _exit_now(host: _Host) -> None:
    """End the actor as Ray's ``exit_actor`` ends one, once the task events
    told since `_ending` flushed (the stream call's own end) are sent: the
    exit may end the process before its atexit hooks run."""
    if host._job.events is not None:
        host._job.events.flush()
    _ray.actor.exit_actor()


async def _async_call(host: "AsyncActorHost", spec: TaskSpec, dep_ids, dep_values, carried):
    job = host._job
    start = _started(job, spec)
    with job.store.provided(dep_ids, dep_values, carried):
        result = await job.executor.execute_async(spec)
    # (Not through run_attempts: an async call has no retries of its own.)
    _attempt_finished(job, spec, start, result)
    return _after(host, spec, result.values)


def _direct_spec(host: _Host, name: str, values: tuple, task_id: bytes | None = None
                 ) -> TaskSpec:
    """The spec of a direct call (`actor_class`) of method `name`, `values`
    its arguments as Ray gave them: what the caller's spec of a plain call
    held (see ``ActorMethod.remote``), with an id of its own (`task_id`, else
    a new one: what ``get_runtime_context()`` says inside the call; nothing
    outside this process names it)."""
    args = [(ARG_VALUE, host._job.store.unpack_arg(v)) for v in values] if values else []
    return TaskSpec(task_id or new_id(), ACTOR_METHOD, b"", host._spec.function_name, args,
                    {}, _ONE_RETURN, {}, 0, False, host._spec.actor_id, name, None, None, 0,
                    None, None, None)


def _direct(host: ActorHost, name: str, values: tuple):
    """A direct call of method `name` (see `actor_class`). A method that took
    the whole way once (`_note_plain`), called with inline values (pickle
    streams) while the actor is alive and nobody here listens for the ends of
    tasks, runs as ``Executor.execute`` would run it (the task context set,
    the method called, its value or error as its Ray value) without a spec
    unless it fails."""
    fast = host._plain.get(name)
    if fast is None or host._dead is not None or plugins.observed(_FINISHED):
        return _direct_spec_path(host, name, values)
    method = getattr(fast[2], name, None)
    if getattr(method, "__func__", None) is not fast[0]:
        return _direct_spec_path(host, name, values)
    for value in values:
        if type(value) is not bytes:
            return _direct_spec_path(host, name, values)
    context = TaskContext(new_id(), host._spec.actor_id, fast[1], None, fast[3])
    token = task_context.set(context)
    try:
        try:
            result = method(*map(pickle.loads, values)) if values else method()
        except BaseException as err:  # noqa: BLE001 - user code may raise anything
            spec = _direct_spec(host, name, (), context.task_id)
            failed = host._job.executor._handle(spec, err)
        else:
            if host._job.executor.exiting is not None:  # (another call ran exit_actor())
                _exit_if_asked(host)
            if type(result) in PLAIN_TYPES:
                return pickle.dumps(result, 5)
            try:
                return host._job.store.pack(serialize(result))
            except TypeError as err:  # (as Executor._execute_plain says it)
                spec = _direct_spec(host, name, (), context.task_id)
                failed = host._job.executor._failure(spec, exc.TaskError.from_exception(
                    err, spec.display_name, host._job.executor.pid))
    finally:
        task_context.reset(token)
    if host._job.executor.exiting is None:
        return host._job.store.pack(failed.values[0])
    return _after(host, spec, failed.values)


def _direct_spec_path(host: ActorHost, name: str, values: tuple):
    """`_direct` of any call: through its spec, as every backend runs one."""
    spec = _direct_spec(host, name, values)
    if host._dead is not None:
        return host._died(spec)
    job = host._job
    if job.events is not None:
        job.events.running(job.job_id, spec)
    result = run_attempts(spec, job.executor.execute, host._spec)
    if job.executor.exiting is None:  # (`_after`, for the common call)
        if job.events is None and name not in host._plain:
            _note_plain(host, name)
        return job.store.pack(result.values[0])
    return _after(host, spec, result.values)


def _note_plain(host: ActorHost, name: str) -> None:
    """After a call of `name` went the whole way (`_direct_spec_path`): whether
    the next ones may take `_direct`'s short way: the method a plain (not
    async) method of the actor's own object, which runs in the actor's
    environment. (Where the actor's calls are told to the job's task record,
    none does.)"""
    actor = host._job.executor.actors.get(host._spec.actor_id)
    if actor is None or not actor.own_env:
        return
    known = actor._async_methods.get(name)  # (Executor._execute_plain recorded it)
    display = actor.display_names.get(name)
    if known is not None and not known[1] and display is not None and \
            getattr(getattr(actor.instance, name, None), "__func__", None) is known[0]:
        host._plain[name] = (known[0], display, actor.instance, actor.spec.placement_group)


async def _direct_async(host: AsyncActorHost, name: str, values: tuple):
    """`_direct` in an async actor (in its default group)."""
    spec = _direct_spec(host, name, values)
    if host._dead is not None:
        return host._died(spec)
    if not host._limits:
        return await _async_call(host, spec, (), (), _NOTHING_CARRIED)
    async with host._limits[None]:
        return await _async_call(host, spec, (), (), _NOTHING_CARRIED)


#: Names a beamlet method's Ray method cannot have: the hosts' own, and any
#: Ray's ActorHandle answers itself (a call of such a method goes through ``call``).
_TAKEN = frozenset(n for n in (*dir(AsyncActorHost), *dir(ActorHost), *dir(_ray.actor.ActorHandle))
                   if not n.startswith("_"))
_actor_classes: dict[tuple, object] = {}
_actor_classes_lock = threading.Lock()


def direct(method_name: str) -> bool:
    """Whether calls of the beamlet method `method_name` may go as a Ray method
    of its own (`actor_class`): not a private name (Ray's handle and the host
    keep theirs there), nor one the host or Ray's handle has."""
    return not method_name.startswith("_") and method_name not in _TAKEN


def _direct_method(name: str, takes_nothing: bool):
    # (Ray binds each call's arguments to its method's signature, at a cost
    # that grows with its parameters: a method without takes none.)
    if takes_nothing:
        def method(self):
            return _direct(self, name, ())
    else:
        def method(self, *values):
            return _direct(self, name, values)
    method.__name__ = method.__qualname__ = name
    return method


def _direct_async_method(name: str, takes_nothing: bool):
    if takes_nothing:
        async def method(self):
            return await _direct_async(self, name, ())
    else:
        async def method(self, *values):
            return await _direct_async(self, name, values)
    method.__name__ = method.__qualname__ = name
    return method


def _takes_nothing(methods, name: str) -> bool:
    """Whether the beamlet method `name` takes no arguments (`methods`: the
    class's ``{name: {"params": ...}}``; a call with some then fails at its
    call site, against the method's signature)."""
    entry = methods.get(name) if isinstance(methods, dict) else None
    return entry is not None and entry.get("params") == ()


def actor_class(class_id: bytes, class_name: str, method_names, is_async: bool,
                concurrency_groups: dict):
    """The Ray actor class that hosts the actors of one beamlet class
    (`class_id`, called `class_name`): ``ActorHost`` (``AsyncActorHost`` for
    an actor with ``async`` methods) with a Ray method of each name of
    `method_names` that `direct` allows (`method_names`: the class's methods,
    see ``core.actor``), which runs a plain call of that beamlet method, its
    arguments Ray's (`_direct`). Made once per
    class and set of concurrency groups in this process (Ray takes groups only
    where a class is declared, not in ``.options()``); an async actor keeps
    its groups itself (`AsyncActorHost`)."""
    groups = () if is_async else tuple(sorted((concurrency_groups or {}).items()))
    key = (class_id, is_async, groups)
    made = _actor_classes.get(key)
    if made is not None:
        return made
    with _actor_classes_lock:
        made = _actor_classes.get(key)
        if made is None:
            make = _direct_async_method if is_async else _direct_method
            body = {name: make(name, _takes_nothing(method_names, name))
                    for name in method_names if direct(name)}
            body["__module__"] = __name__
            host = type(class_name.rpartition(".")[2] or "Actor",
                        (AsyncActorHost if is_async else ActorHost,), body)
            host.__qualname__ = class_name
            made = _ray.remote(concurrency_groups=dict(groups))(host) if groups \
                else _ray.remote(host)
            _actor_classes[key] = made
    return made

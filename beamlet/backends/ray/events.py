"""The ray backend's task events: what the state API (``beamlet.util.state``)
and ``beamlet.timeline()`` read, recorded by beamlet itself.

Why not Ray's own task events: Ray's state API reads them through its
dashboard, which costs seconds and hundreds of MB at ``ray.init`` and is not
running on every cluster a driver joins; and Ray's records lag by up to its
report interval (a second), name Ray's task ids and count Ray's attempts, not
beamlet's (beamlet retries exceptions inside the Ray task).

So each process tells what it sees:

- The driver hears its own submissions through its hooks, as on every
  backend, and tells the progress it can see at once (an argument not ready:
  ``PENDING_ARGS_AVAIL``; an actor call: ``SUBMITTED_TO_WORKER``).
- A Ray worker (`EventSender`, one per process) tells the tasks it submits
  (nested ones), each attempt's start (``RUNNING``, with its pid) and end, the
  actors it hosts going alive or dead, and itself (its worker id and node).
  Each is a tuple appended to a deque; a thread of the sender's own sends the
  list `FLUSH_DELAY` after its first event, and at most every
  `FLUSH_INTERVAL`, as one call of the control store's actor (``control.py``),
  which keeps the batches per job.
- The driver's `EventReceiver` takes them from there when the record is read,
  and otherwise every `DRAIN_INTERVAL` on a thread of its own, and tells its
  task record (and the driver's observer plugins).

A worker's events reach the driver after the results they belong to, so
before the record is read (`EventReceiver.settle`) the driver checks which of
the tasks it submitted have a result and waits, up to `SETTLE_TIMEOUT`, for
their ends: the record then holds the end of every task whose result the
driver has. A task whose result is a Ray failure (cancelled by force, its
worker crashed, its actor died) never tells its end: the driver records it
from that failure. Tasks nested deeper are told as their workers send them.
"""
from __future__ import annotations

import atexit
import collections
import os
import _thread
import pickle
import threading
import time

import ray as _ray
import ray.exceptions as _rex

from ...core import plugins
from ...core.scheduling import CANCELLED, FAILED, FINISHED, RETRYING
from ...core.task_events import RUNNING, _name
from ...core.task_spec import ACTOR_CREATION
from . import threads
from .backend import RayBackend, _pid_alive
from .control import on_control_thread, said_control_actor_died

#: Seconds a worker gathers events before it sends them (in one call)...
FLUSH_DELAY = 0.02
#: ...and at least this many seconds between two sends, however busy it is:
#: each send is an actor call (some 0.5 ms of CPU over the processes involved).
FLUSH_INTERVAL = 0.2
#: Seconds between two takes of the driver's receiver when nobody reads:
#: the record is brought up to date when it is read (`EventReceiver.settle`).
DRAIN_INTERVAL = 1.0
#: Seconds a read of the record waits for the ends of tasks whose results are in.
SETTLE_TIMEOUT = 10.0
_CALL_TIMEOUT = 60.0
#: Seconds a worker process that is exiting waits for its last events to be kept.
EXIT_FLUSH_TIMEOUT = 5.0
#: Sends a sender remembers until it knows they were kept (`EventSender._check_sent`).
_UNCHECKED_KEPT = 64

# Event kinds (the first item of each event tuple).
_SUBMITTED, _PROGRESS, _FINISHED, _ACTOR, _WORKER = range(5)


class SpecView:
    """What the hooks' observers read of a TaskSpec, for a task another process
    told of (the spec itself, with its arguments, stays there)."""

    __slots__ = ("task_id", "kind", "function_name", "method_name", "actor_id",
                 "actor_options", "attempt")

    def __init__(self, task_id: bytes, kind: int, function_name: str, method_name,
                 actor_id, attempt: int = 0, actor_options: dict | None = None):
        self.task_id = task_id
        self.kind = kind
        self.function_name = function_name
        self.method_name = method_name
        self.actor_id = actor_id
        self.attempt = attempt
        self.actor_options = actor_options

    @property
    def display_name(self) -> str:
        return _name(self.kind, self.function_name, self.method_name)


def _view(spec) -> SpecView:
    return SpecView(spec.task_id, spec.kind, spec.function_name, spec.method_name,
                    spec.actor_id, spec.attempt)


def _control_actor():
    from .control import control_actor
    return control_actor()


class EventSender:
    """(A Ray worker process.) Gathers the events of every job that runs here
    and sends them, per job, from the process's control thread (`_send`: a
    call made from a task's thread would count as that task's child, and be
    cancelled with it).

    What a task's thread does here holds no Python lock: Ray's ``cancel``
    raises KeyboardInterrupt in that thread between any two bytecodes, and a
    lock it left held would stop every later task of the process. An event
    is a ``deque.append``, and the sending thread is woken by releasing a raw
    lock it waits on (both single C calls)."""

    def __init__(self):
        self._buffer: collections.deque = collections.deque()  # (job id, event)
        self._wake = _thread.allocate_lock()  # held while there is nothing to send
        self._wake.acquire()
        self._actor = None
        self._told: set[str] = set()     # jobs this process has told it exists to
        self.pid = os.getpid()
        self._worker = None              # (worker id hex, node id hex)
        #: Held while events are taken and sent (by the thread, or a `flush`).
        self._sending = threading.Lock()
        self._in_flight: list = []       # the refs of the thread's last send
        #: ref -> (job id, payload) of the sends not known kept yet (`_check_sent`).
        self._unchecked: dict = {}
        #: Set by `flush` (the process is ending): this thread then makes no
        #: Ray call of its own but sends, since Ray's shutdown of the process
        #: may be under way, and a call then can end the process before its
        #: atexit hooks (seen with `exit_actor`).
        self._ending = False
        self._thread = threads.start(self._run, name="beamlet-ray-task-events")
        # A process that exits (e.g. an idle worker Ray stops) sends what it
        # gathered first: its driver would otherwise wait for those reports in
        # `settle` in vain.
        atexit.register(self.flush, EXIT_FLUSH_TIMEOUT)

    def _emit(self, job_id: str, event: tuple) -> None:
        if job_id not in self._told:  # (twice at worst, which the driver folds)
            self._told.add(job_id)
            self._buffer.append((job_id, self._worker_event(None)))
        self._buffer.append((job_id, event))
        if self._wake.locked():
            try:
                self._wake.release()
            except RuntimeError:  # (another thread released it first)
                pass

    def _worker_event(self, actor_id) -> tuple:
        if self._worker is None:
            context = _ray.get_runtime_context()
            self._worker = (context.get_worker_id(), context.get_node_id())
        return (_WORKER, self._worker[0], self.pid, self._worker[1],
                actor_id.hex() if actor_id else None)

    # -- what a worker tells -----------------------------------------------------------
    def submitted(self, job_id: str, spec) -> None:
        options = spec.actor_options or {} if spec.kind == ACTOR_CREATION else {}
        self._emit(job_id, (_SUBMITTED, spec.task_id, spec.kind, spec.function_name,
                            spec.method_name, spec.actor_id, time.time(),
                            options.get("name"), options.get("namespace")))

    def progress(self, job_id: str, task_id: bytes, attempt: int, state: str,
                 pid: int | None = None) -> None:
        self._emit(job_id, (_PROGRESS, task_id, attempt, state, pid, time.time()))

    def running(self, job_id: str, spec) -> None:
        self.progress(job_id, spec.task_id, spec.attempt, RUNNING, self.pid)

    def finished(self, job_id: str, spec, status: str, duration: float, pid) -> None:
        self._emit(job_id, (_FINISHED, spec.task_id, spec.kind, spec.function_name,
                            spec.method_name, spec.actor_id, time.time(), status, duration,
                            pid, spec.attempt))

    def actor_state(self, job_id: str, actor_id: bytes, class_name: str, state: str,
                    reason: str) -> None:
        if state == "ALIVE":  # (its process: for list_workers)
            self._emit(job_id, self._worker_event(actor_id))
        self._emit(job_id, (_ACTOR, actor_id, class_name, state, reason))
        if state == "DEAD":
            # The actor's process ends next, and Ray's graceful end of an actor
            # (``__ray_shutdown__``: no handle left) runs no atexit hook: send
            # now what it ran, or its driver waits for those reports in vain.
            self.flush(EXIT_FLUSH_TIMEOUT)

    # -- sending ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            # (Released by the next event: see _emit. Meanwhile the sends not
            # known kept yet are checked, until they are.)
            while not self._wake.acquire(
                    timeout=FLUSH_INTERVAL if self._unchecked and not self._ending else -1):
                self._check_sent(0.0)
            time.sleep(FLUSH_DELAY)  # (what comes meanwhile goes in the same call)
            # (With a timeout: a flush on a task's thread that was interrupted
            # midway must not stop this thread.)
            held = self._sending.acquire(timeout=_CALL_TIMEOUT)
            try:
                self._in_flight = self._send()
            finally:
                if held:
                    self._sending.release()
            pause = time.monotonic() + FLUSH_INTERVAL - FLUSH_DELAY
            if not self._ending:
                self._check_sent(FLUSH_INTERVAL - FLUSH_DELAY)
            time.sleep(max(pause - time.monotonic(), 0.0))

    def _take(self) -> dict:
        per_job: dict = {}
        buffer = self._buffer
        while buffer:
            job_id, event = buffer.popleft()
            per_job.setdefault(job_id, []).append(event)
        return per_job

    def _send(self, batches=None, timeout: float = _CALL_TIMEOUT) -> list:
        """Send what is gathered (or `batches`, ``[(job id, payload)]``); the
        refs of the calls made. Taken and sent on the process's control
        thread (``control.on_control_thread``), not the caller's: a call
        submitted from a task's thread (a `flush` by ``exit_actor``) would be
        that task's child, for a cancel of the task to cancel, and one from
        the main thread outside any task (an actor's graceful end, the exit's
        flush) gets a task id other processes give theirs too, which crashes
        the control actor."""
        try:
            return on_control_thread(self._send_here, batches, timeout=timeout)
        except Exception:  # noqa: BLE001 - Ray is going away, or the thread is stuck
            return []

    def _send_here(self, batches) -> list:
        if batches is None:
            batches = [(job_id, pickle.dumps(events, 5))
                       for job_id, events in self._take().items()]
        refs = []
        if not _ray.is_initialized():  # (see `flush`)
            return refs
        for job_id, payload in batches:
            try:
                if self._actor is None:
                    self._actor = _control_actor()
                ref = self._actor.add_events.remote(job_id, payload)
            except Exception:  # noqa: BLE001 - Ray is going away: nobody left to tell
                continue
            refs.append(ref)
            self._unchecked[ref] = (job_id, payload)
        unchecked = self._unchecked
        while len(unchecked) > _UNCHECKED_KEPT:
            try:  # (`_check_sent`, on a caller whose wait for `_sending` timed out, pops too)
                unchecked.pop(next(iter(unchecked)), None)
            except (StopIteration, RuntimeError):
                break
        return refs

    def _check_sent(self, wait: float) -> None:
        """Wait up to `wait` for the sends not known kept yet; send again, to
        the control actor made after it, those that failed because the
        control actor died (its process crashed, with what it kept: see
        ``control.py``). Without this every later send to the dead actor
        would be lost, and each read of its drivers' records would wait
        `SETTLE_TIMEOUT` for ends that never come."""
        refs = list(self._unchecked)
        if not refs or not _ray.is_initialized():  # (see `flush`)
            return
        try:
            ready, _ = _ray.wait(refs, num_returns=len(refs), timeout=wait, fetch_local=False)
        except Exception:  # noqa: BLE001 - Ray is going away
            return
        if not ready:
            return
        if not self._sending.acquire(timeout=_CALL_TIMEOUT):
            return
        try:
            lost = []
            for ref in ready:
                batch = self._unchecked.pop(ref, None)
                if batch is None:
                    continue
                try:
                    _ray.get(ref, timeout=0)
                except _rex.ActorDiedError:
                    lost.append(batch)
                except Exception:  # noqa: BLE001 - anything else: that batch alone is lost
                    pass
            if lost:
                said_control_actor_died()
                self._actor = None  # (`_send` finds or makes the next one)
                self._send(lost)
        finally:
            self._sending.release()

    def flush(self, timeout: float = _CALL_TIMEOUT) -> None:
        """Send what is gathered now and wait (up to `timeout`) until it is
        kept, with what the sending thread sent last (before this process
        ends: ``exit_actor``, and at its exit, when that thread may be
        sending: it is a daemon, stopped midway by the exit).

        Nothing once this process left Ray (at exit, after Ray's own
        shutdown): Ray's calls would then start a Ray of their own here."""
        self._ending = True
        if not _ray.is_initialized():
            return
        deadline = time.monotonic() + timeout
        if not self._sending.acquire(timeout=timeout):
            return
        try:
            refs = self._in_flight + self._send(timeout=max(deadline - time.monotonic(), 0.0))
            self._in_flight = []
        finally:
            self._sending.release()
        if refs and _ray.is_initialized():
            try:
                _ray.get(refs, timeout=max(deadline - time.monotonic(), 0.0))
            except Exception:  # noqa: BLE001 - as in _send
                pass


_sender: EventSender | None = None
_sender_lock = threading.Lock()


def sender() -> EventSender:
    """This worker process's EventSender (made on first use), listening to the
    hooks that tell of nested submissions and of attempts' ends."""
    global _sender
    if _sender is None:
        with _sender_lock:
            if _sender is None:
                _sender = EventSender()
                plugins.add_listener("beamlet_task_finished", _task_finished)
    return _sender


def _job_id():
    """The job of the runtime current in this process, if it runs on Ray and
    sends events. (The listener stays for the process's life: a runtime of
    another backend started here later, say dask's, whose observers hear ends
    on a thread of its own, is none of its business. Telling its events here
    would call Ray, which then started a Ray of its own on that thread.)"""
    from ...core import runtime as _runtime
    rt = _runtime.current_or_none()
    if rt is None or not isinstance(rt.backend, RayBackend):
        return None
    job = rt.backend.job
    return job["job_id"] if job and job.get("task_events") else None


def _task_finished(spec, status: str, duration: float, pid) -> None:
    job_id = _job_id()
    if job_id is not None:
        _sender.finished(job_id, spec, status, duration, pid)


class EventReceiver:
    """(The driver.) Takes what the job's workers send and tells the task
    record (``runtime.task_events``) and the observer plugins; tracks the
    tasks submitted here until their ends, for `settle`."""

    def __init__(self, backend):
        self._backend = backend
        self._job_id = backend.job["job_id"]
        self._cond = threading.Condition()
        #: task id -> [the Ray ref of its first result, its SpecView]: submitted
        #: here, its end not told yet.
        self._pending: collections.OrderedDict = collections.OrderedDict()
        self._max_pending = 10_000
        #: task id -> epoch time its attempt started (told by its worker), while pending.
        self._started: dict[bytes, float] = {}
        #: task id -> the pid of the process its attempt runs in (told with its start).
        self._ran_in: dict[bytes, int] = {}
        #: Actors a call's result told dead (Ray's ActorDiedError), most recent last.
        self._dead_actors: collections.OrderedDict = collections.OrderedDict()
        #: Tasks whose end the driver recorded itself (a Ray failure): a late
        #: report of theirs is not recorded again.
        self._ended_here: collections.OrderedDict = collections.OrderedDict()
        #: pid -> {worker_id, pid, node_id, actor_id} of the processes that told.
        self.workers: dict[int, dict] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._actor = None
        self._taking = threading.Lock()  # (one take and its replay at a time, in order)

    # -- the driver's side ---------------------------------------------------------
    def submitted(self, spec) -> None:
        """A task is being submitted here (the hooks heard it); `submitted_ref`
        follows once Ray has it."""
        with self._cond:
            pending = self._pending
            pending[spec.task_id] = [None, _view(spec)]
            if len(pending) > self._max_pending:
                old, _ = pending.popitem(last=False)
                self._started.pop(old, None)
                self._ran_in.pop(old, None)
            if self._thread is None and not self._closed.is_set():
                self._actor = _control_actor()
                self._thread = threads.start(self._run, name="beamlet-ray-task-events")

    def submitted_ref(self, task_id: bytes, ref) -> None:
        """The Ray ref of the task's (first) result, held until its end is told:
        `settle` sees by it whether the task has ended, whoever else holds it."""
        with self._cond:
            entry = self._pending.get(task_id)
            if entry is not None:  # (else its end was told already)
                entry[0] = ref

    def failed_here(self, spec, error: BaseException) -> None:
        """A task this driver failed itself, before Ray ran it."""
        status = CANCELLED if isinstance(error, _rex.TaskCancelledError) else FAILED
        plugins.notify("beamlet_task_finished", spec=spec, status=status, duration=0.0,
                       pid=None)
        with self._cond:
            self._pending.pop(spec.task_id, None)

    # -- taking ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.wait(DRAIN_INTERVAL):
            self.take()

    def take(self, wait: float = 0.0) -> bool:
        """Take what the workers sent (waiting up to `wait` for something) and
        record it; False once the job's events have ended or Ray is gone."""
        with self._taking:
            if self._closed.is_set() or self._actor is None:
                return False
            try:
                batches = _ray.get(self._actor.take_events.remote(self._job_id, wait),
                                   timeout=wait + _CALL_TIMEOUT)
            except _rex.ActorDiedError:
                # (The control actor's process crashed, with what it kept: the
                # workers send to the one made next, so this driver takes there.)
                said_control_actor_died()
                try:
                    self._actor = _control_actor()
                except Exception:  # noqa: BLE001 - Ray is going away
                    return False
                return True
            except Exception:  # noqa: BLE001 - Ray is going away
                return False
            if batches is None:
                return False
            for payload in batches:
                try:
                    self._replay(pickle.loads(payload))
                except Exception as err:  # noqa: BLE001 - one bad batch must not stop the rest
                    import sys
                    print(f"beamlet: a batch of task events could not be recorded: {err!r}",
                          file=sys.stderr)
            return True

    def _replay(self, events: list) -> None:
        record = self._backend.runtime.task_events
        if record is None:
            return
        ended = []
        submitted_hook = plugins.observer("beamlet_task_submitted")
        finished_hook = plugins.observer("beamlet_task_finished")
        for event in events:
            kind = event[0]
            if kind == _PROGRESS:
                _, task_id, attempt, state, pid, when = event
                record.progressed(task_id, attempt, state, pid, when)
                if state == RUNNING and task_id in self._pending:
                    self._started[task_id] = when
                    self._ran_in[task_id] = pid
            elif kind == _FINISHED:
                (_, task_id, task_kind, function, method, actor_id, end, status, duration,
                 pid, attempt) = event
                if task_id in self._ended_here:
                    continue
                spec = SpecView(task_id, task_kind, function, method, actor_id, attempt)
                record.beamlet_task_finished(spec, status, duration, pid, end=end)
                if finished_hook is not None:
                    _observe(finished_hook, spec=spec, status=status, duration=duration,
                             pid=pid)
                if status != RETRYING:
                    ended.append(task_id)
            elif kind == _SUBMITTED:
                _, task_id, task_kind, function, method, actor_id, when, name, ns = event
                spec = SpecView(task_id, task_kind, function, method, actor_id,
                                actor_options={"name": name, "namespace": ns})
                record.beamlet_task_submitted(spec, when=when)
                if submitted_hook is not None:
                    _observe(submitted_hook, spec=spec)
            elif kind == _ACTOR:
                _, actor_id, class_name, state, reason = event
                plugins.notify("beamlet_actor_state", actor_id=actor_id,
                               class_name=class_name, state=state, reason=reason)
            elif kind == _WORKER:
                _, worker_id, pid, node_id, actor_id = event
                row = self.workers.setdefault(pid, {"worker_id": worker_id, "pid": pid,
                                                    "node_id": node_id, "actor_id": None})
                if actor_id is not None:
                    row["actor_id"] = actor_id
        if ended:
            with self._cond:
                for task_id in ended:
                    self._pending.pop(task_id, None)
                    self._started.pop(task_id, None)
                    self._ran_in.pop(task_id, None)
                self._cond.notify_all()

    # -- reading -----------------------------------------------------------------------
    def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Return once the record holds the end of every task submitted here
        whose result is ready (see the module's docstring), or after `timeout`:
        then the ends still missing are recorded from the results."""
        self.take()
        with self._cond:
            items = list(self._pending.items())
        if not items:
            return
        by_ref = {}
        for task_id, (ref, spec) in items:
            if ref is not None:
                by_ref[ref] = (task_id, spec)
        if not by_ref:
            return
        ready, _ = _ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0,
                             fetch_local=False)
        owed = {}
        for ref in ready:
            task_id, spec = by_ref[ref]
            try:
                value = _ray.get(ref, timeout=0)
            except _rex.GetTimeoutError:
                continue  # (ready on another node, not here yet: nothing to wait for)
            except _rex.RayError as err:  # (no worker tells of this end)
                if isinstance(err, _rex.ActorDiedError) and spec.actor_id is not None:
                    self._dead_actors[spec.actor_id] = None
                    if len(self._dead_actors) > self._max_pending:
                        self._dead_actors.popitem(last=False)
                self._record_end(task_id, spec, err)
            except Exception:  # noqa: BLE001 - not readable here: nothing to wait for
                continue
            else:
                owed[task_id] = (spec, value)
        if not owed:
            return
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                missing = [t for t in owed if t in self._pending]
            # (A process that has ended tells nothing more: a killed or crashed
            # worker or actor lost what it had not sent.)
            missing = [t for t in missing if not self._gone(t, owed[t][0])]
            left = deadline - time.monotonic()
            if not missing or left <= 0 or not self.take(min(left, 1.0)):
                break
        self.take()  # (what the ended ones sent before they ended)
        with self._cond:
            missing = [t for t in owed if t in self._pending]
        for task_id in missing:  # (its worker's report was lost: it ended as it was)
            spec, value = owed[task_id]
            self._record_end(task_id, spec, None, getattr(value, "is_error", False))

    def _gone(self, task_id: bytes, spec: SpecView) -> bool:
        """Whether the process the task ran in has ended, so that what it had
        not sent is lost: known by its pid (told with the task's start, or its
        actor's) on this node, or, for an actor's call, by another call's
        result (the actor died) or Ray no longer knowing the actor by its name
        (killed)."""
        pid = self._ran_in.get(task_id)
        rows = self.workers
        if pid is None and spec.actor_id is not None:
            actor = spec.actor_id.hex()
            pid = next((row["pid"] for row in list(rows.values()) if row["actor_id"] == actor),
                       None)
        row = rows.get(pid) if pid is not None else None
        if row is not None and row["node_id"] == self._backend.node_id and not _pid_alive(pid):
            return True
        if spec.actor_id is None:
            return False
        if spec.actor_id in self._dead_actors:
            return True
        from .control import NAMESPACE
        from .scheduler import ACTOR_PREFIX
        try:
            _ray.get_actor(ACTOR_PREFIX + spec.actor_id.hex(), namespace=NAMESPACE)
        except ValueError:
            return True
        except Exception:  # noqa: BLE001 - Ray could not tell: wait as for the living
            return False
        return False

    def _record_end(self, task_id: bytes, spec: SpecView, error, failed: bool = False) -> None:
        with self._cond:
            if self._pending.pop(task_id, None) is None:
                return  # (its report came meanwhile)
            started = self._started.pop(task_id, None)
            self._ran_in.pop(task_id, None)
            self._ended_here[task_id] = None
            if len(self._ended_here) > self._max_pending:
                self._ended_here.popitem(last=False)
        if isinstance(error, _rex.TaskCancelledError):
            status = CANCELLED
        else:
            status = FAILED if error is not None or failed else FINISHED
        end = time.time()
        duration = 0.0 if started is None else max(end - started, 0.0)
        record = self._backend.runtime.task_events
        if record is not None:
            record.beamlet_task_finished(spec, status, duration, None, end=end)
        hook = plugins.observer("beamlet_task_finished")
        if hook is not None:
            _observe(hook, spec=spec, status=status, duration=duration, pid=None)

    def close(self) -> None:
        """Settle, then stop taking events; the job's kept batches are dropped."""
        if self._thread is None:
            return  # (nothing was submitted: nothing was sent)
        try:
            self.settle(min(SETTLE_TIMEOUT, 5.0))
        except Exception:  # noqa: BLE001 - Ray is going away
            pass
        with self._taking:
            self._closed.set()
        thread, self._thread = self._thread, None
        try:
            _ray.get(self._actor.end_events.remote(self._job_id), timeout=_CALL_TIMEOUT)
        except Exception:  # noqa: BLE001 - Ray is going away
            pass
        thread.join(_CALL_TIMEOUT)


def _observe(hook, **kwargs) -> None:
    """Tell an observer plugin's hook, as ``plugins.notify`` does (one that
    raises is reported and otherwise ignored)."""
    try:
        hook(**kwargs)
    except Exception as err:  # noqa: BLE001
        import sys
        print(f"beamlet: observer hook {hook.name} raised {err!r}; ignored", file=sys.stderr)

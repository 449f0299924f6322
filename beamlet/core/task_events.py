"""What happened to the job's tasks and actors, as the driver's observer hooks
tell it: the record behind ``beamlet.util.state`` and ``beamlet.timeline()``.

`TaskEvents` listens to the lifecycle hooks of ``hookspecs.py`` (through
``plugins.add_listener``: no pluggy dispatch on the hot path) while the
driver's runtime runs, on backends whose ``task_events`` flag says their driver
hears every task's submission and end. Recording is an append of a small
tuple to a bounded deque (no lock, no object per task, no reference to the
spec, so arguments are not kept alive); the rows are folded from those events
only when someone reads them. It keeps the newest `max_tasks` submissions and
`max_spans` ended attempts, dropping the oldest, so a job of millions of tasks
does not grow the driver without limit.

States are Ray's (``ray.util.state``): a task is ``PENDING_ARGS_AVAIL`` while
its arguments are being computed, ``PENDING_NODE_ASSIGNMENT`` while it waits
for resources or a worker (also between a failed attempt and its retry),
``SUBMITTED_TO_WORKER`` when it is an actor call sent to its actor's process
behind earlier calls, ``RUNNING`` from when its attempt starts (as the driver
sees it: dispatched to an idle process), then ``FINISHED`` or ``FAILED`` (a
cancelled task is ``FAILED`` with ``error_type`` ``TASK_CANCELLED``, as in Ray).
The progress between submission and end comes from the scheduler, which
appends ``(task id, attempt, state, pid, time.perf_counter())`` to
`TaskEvents.progress` (see ``Scheduler.task_progress``); a scheduler that
does not tell leaves its tasks ``PENDING_NODE_ASSIGNMENT`` until they end.
"""
from __future__ import annotations

import collections
import os
import threading
import time

from .task_spec import ACTOR_CREATION, ACTOR_METHOD

#: Environment variables that change the bounds (read when the job starts).
MAX_TASKS_ENV_VAR = "BEAMLET_STATE_MAX_TASKS"
MAX_SPANS_ENV_VAR = "BEAMLET_TIMELINE_MAX_SPANS"

PENDING_ARGS_AVAIL = "PENDING_ARGS_AVAIL"
PENDING_NODE_ASSIGNMENT = "PENDING_NODE_ASSIGNMENT"
SUBMITTED_TO_WORKER = "SUBMITTED_TO_WORKER"
RUNNING = "RUNNING"

TASK_TYPES = {ACTOR_CREATION: "ACTOR_CREATION_TASK", ACTOR_METHOD: "ACTOR_TASK"}
HOOKS = ("beamlet_task_submitted", "beamlet_task_finished", "beamlet_actor_state")


class TaskRecord:
    """One task (all its attempts), as folded from its events."""

    __slots__ = ("task_id", "name", "type", "state", "actor_id", "attempt_number",
                 "creation_time", "start_time", "end_time", "pid", "error_type")

    def __init__(self, task_id: bytes, kind: int, name: str, actor_id):
        self.task_id = task_id
        self.name = name
        self.type = TASK_TYPES.get(kind, "NORMAL_TASK")
        self.state = PENDING_NODE_ASSIGNMENT
        self.actor_id = actor_id
        self.attempt_number = 0
        self.creation_time: float | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.pid: int | None = None
        self.error_type: str | None = None


class ActorRecord:
    """One actor: the mutable row behind an ``ActorState``."""

    __slots__ = ("actor_id", "class_name", "state", "name", "namespace", "death_cause",
                 "num_restarts", "pid")

    def __init__(self, actor_id: bytes, class_name: str):
        self.actor_id = actor_id
        self.class_name = class_name
        self.state = "PENDING_CREATION"
        self.name: str | None = None
        self.namespace: str | None = None
        self.death_cause: str | None = None
        self.num_restarts = 0
        self.pid: int | None = None


class TaskEvents:
    """The recorder. Its listeners run on scheduler threads; a deque's append
    is atomic, and the rare actor events take a lock."""

    def __init__(self, max_tasks: int | None = None, max_spans: int | None = None):
        self.max_tasks = max_tasks or _env_int(MAX_TASKS_ENV_VAR, 10_000)
        self.max_spans = max_spans or _env_int(MAX_SPANS_ENV_VAR, 100_000)
        #: (task id, kind, function name, method name, actor id, time) per submission.
        self._submitted: collections.deque = collections.deque(maxlen=self.max_tasks)
        #: (task id, kind, function name, method name, actor id, end time, status,
        #: duration, pid, attempt) per ended attempt.
        self._ended: collections.deque = collections.deque(maxlen=self.max_spans)
        #: (task id, attempt, state, pid, time.perf_counter()) as a task
        #: progresses between submission and end; `progress` appends one.
        self._progress: collections.deque = collections.deque(maxlen=self.max_spans)
        self.progress = self._progress.append
        #: time.time() - time.perf_counter(): the progress times as epoch times.
        self._clock = time.time() - time.perf_counter()
        self._actors: dict[bytes, ActorRecord] = {}
        self._lock = threading.Lock()

    def listen(self) -> None:
        """Start hearing the lifecycle hooks (see `close`)."""
        from . import plugins
        for hook in HOOKS:
            plugins.add_listener(hook, getattr(self, hook))

    def close(self) -> None:
        from . import plugins
        for hook in HOOKS:
            plugins.remove_listener(hook, getattr(self, hook))

    # -- the hooks ----------------------------------------------------------------
    def beamlet_task_submitted(self, spec, when: float | None = None) -> None:
        """(`when`: the epoch time of a submission told late, e.g. by another
        process; default now.)"""
        self._submitted.append((spec.task_id, spec.kind, spec.function_name, spec.method_name,
                                spec.actor_id, time.time() if when is None else when))
        if spec.kind == ACTOR_CREATION:
            options = spec.actor_options or {}
            with self._lock:
                if spec.actor_id not in self._actors:
                    actor = self._actors[spec.actor_id] = ActorRecord(spec.actor_id,
                                                                      spec.function_name)
                    actor.name = options.get("name")
                    actor.namespace = options.get("namespace")

    def beamlet_task_finished(self, spec, status: str, duration: float, pid,
                              end: float | None = None) -> None:
        """(`end`: the epoch time of an end told late; default now.)"""
        self._ended.append((spec.task_id, spec.kind, spec.function_name, spec.method_name,
                            spec.actor_id, time.time() if end is None else end, status,
                            duration, pid, spec.attempt))
        if spec.kind == ACTOR_CREATION and status == "FINISHED":
            with self._lock:
                actor = self._actors.get(spec.actor_id)
                if actor is not None:
                    actor.pid = pid

    def beamlet_actor_state(self, actor_id: bytes, class_name: str, state: str,
                            reason: str) -> None:
        state = getattr(state, "value", state)  # (schedulers may pass their enum)
        with self._lock:
            actor = self._actors.get(actor_id)
            if actor is None:
                actor = self._actors[actor_id] = ActorRecord(actor_id, class_name)
            if state == "RESTARTING":
                actor.num_restarts += 1
            actor.state = state
            if state == "DEAD":
                actor.death_cause = reason

    def progressed(self, task_id: bytes, attempt: int, state: str, pid, when: float) -> None:
        """`progress` with an epoch time (`when`), for progress another process
        tells (its ``time.perf_counter`` is not this one's)."""
        self._progress.append((task_id, attempt, state, pid, when - self._clock))

    # -- reading ----------------------------------------------------------------
    def tasks(self) -> list[TaskRecord]:
        """The tasks submitted most recently (at most `max_tasks`), in order of
        submission, folded from the recorded events."""
        submitted, progress, ended = list(self._submitted), list(self._progress), \
            list(self._ended)
        rows: dict[bytes, TaskRecord] = {}
        for task_id, kind, function, method, actor_id, when in submitted:
            record = rows.get(task_id)
            if record is None:
                record = rows[task_id] = TaskRecord(task_id, kind, _name(kind, function, method),
                                                    actor_id)
                record.creation_time = when
        # Each task's newest progress (attempt, state, pid, time); an attempt's
        # end overrides it unless a later attempt has progressed since.
        latest: dict[bytes, tuple] = {}
        for task_id, attempt, status, pid, when in progress:
            latest[task_id] = (attempt, status, pid, when)
        for task_id, kind, function, method, actor_id, end, status, duration, pid, attempt \
                in ended:
            record = rows.get(task_id)
            if record is None:
                continue  # (its submission is no longer kept)
            record.start_time = end - duration
            record.pid = pid
            if status == "RETRYING":
                record.state = PENDING_NODE_ASSIGNMENT
                record.attempt_number = attempt + 1
            else:
                record.state = status
                record.attempt_number = attempt
                record.end_time = end
                if status == "CANCELLED":
                    record.state, record.error_type = "FAILED", "TASK_CANCELLED"
        for task_id, (attempt, status, pid, when) in latest.items():
            record = rows.get(task_id)
            if record is None or record.end_time is not None \
                    or attempt < record.attempt_number:
                continue
            record.state, record.attempt_number = status, attempt
            if status in (RUNNING, SUBMITTED_TO_WORKER):
                record.pid = pid
                record.start_time = when + self._clock
        return list(rows.values())

    def actors(self) -> list[ActorRecord]:
        with self._lock:
            return [_copy(r) for r in self._actors.values()]

    def spans(self) -> list[tuple]:
        """The ended attempts, oldest first: ``(name, task_id, status, start,
        end, pid)`` with times in seconds since the epoch (pid None: unknown)."""
        return [(_name(kind, function, method), task_id, status, end - duration, end, pid)
                for task_id, kind, function, method, _actor, end, status, duration, pid, _a
                in list(self._ended)]


def _name(kind: int, function: str, method: str | None) -> str:
    """A task's display name (as TaskSpec.display_name)."""
    if kind == ACTOR_METHOD:
        return f"{function}.{method}"
    if kind == ACTOR_CREATION:
        return f"{function}.__init__"
    return function


def _copy(record):
    clone = type(record).__new__(type(record))
    for name in type(record).__slots__:
        setattr(clone, name, getattr(record, name))
    return clone


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


def chrome_trace(spans: list[tuple]) -> list[dict]:
    """`TaskEvents.spans` as Chrome trace events (the "Trace Event Format" that
    chrome://tracing and Perfetto load): one complete ("X") event per attempt,
    on the row of the process that ran it, and a name for each process row."""
    events = []
    named = set()
    driver = os.getpid()
    for name, task_id, status, start, end, pid in spans:
        row = pid if pid is not None else 0
        if row not in named:
            named.add(row)
            label = ("driver" if row == driver else "not started" if row == 0
                     else f"worker {row}")
            events.append({"name": "process_name", "ph": "M", "pid": row, "tid": row,
                           "args": {"name": label}})
        event = {"cat": "task", "name": name, "ph": "X", "pid": row, "tid": row,
                 "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6,
                 "args": {"task_id": task_id.hex(), "status": status}}
        if status in _COLOURS:
            event["cname"] = _COLOURS[status]
        events.append(event)
    return events


# Trace-viewer colour names for attempts that did not finish well.
_COLOURS = {"FAILED": "terrible", "RETRYING": "bad", "CANCELLED": "grey"}

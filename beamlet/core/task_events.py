"""What happened to the job's tasks and actors, as the driver's observer hooks
tell it: the record behind ``beamlet.util.state`` and ``beamlet.timeline()``.

`TaskEvents` is a plugin (it implements the lifecycle hooks of
``hookspecs.py``) that the driver's runtime registers while it runs, on
backends whose ``task_events`` flag says their driver hears every task's
submission and end. It is bounded: it keeps the newest `max_tasks` tasks and
`max_spans` timeline spans, dropping the oldest first, so a job of millions of
tasks does not grow the driver without limit.
"""
from __future__ import annotations

import collections
import os
import threading
import time

from .plugins import hookimpl
from .task_spec import ACTOR_CREATION, ACTOR_METHOD

#: Environment variables that change the bounds (read when the job starts).
MAX_TASKS_ENV_VAR = "BEAMLET_STATE_MAX_TASKS"
MAX_SPANS_ENV_VAR = "BEAMLET_TIMELINE_MAX_SPANS"

TASK_TYPES = {ACTOR_CREATION: "ACTOR_CREATION_TASK", ACTOR_METHOD: "ACTOR_TASK"}


class TaskRecord:
    """One task (all its attempts): the mutable row behind a ``TaskState``."""

    __slots__ = ("task_id", "name", "type", "state", "actor_id", "attempt_number",
                 "creation_time", "start_time", "end_time", "pid", "error_type")

    def __init__(self, spec, now: float):
        self.task_id = spec.task_id
        self.name = spec.display_name
        self.type = TASK_TYPES.get(spec.kind, "NORMAL_TASK")
        self.state = "PENDING"
        self.actor_id = spec.actor_id
        self.attempt_number = 0
        self.creation_time = now
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
    """The observer plugin. Its hooks run on scheduler threads: every method
    takes the lock, and readers get copies (`tasks`, `actors`, `spans`)."""

    def __init__(self, max_tasks: int | None = None, max_spans: int | None = None):
        self.max_tasks = max_tasks or _env_int(MAX_TASKS_ENV_VAR, 10_000)
        self.max_spans = max_spans or _env_int(MAX_SPANS_ENV_VAR, 100_000)
        self._tasks: collections.OrderedDict[bytes, TaskRecord] = collections.OrderedDict()
        self._actors: dict[bytes, ActorRecord] = {}
        #: Ended attempts, oldest first: (name, task id, status, start, end, pid).
        self._spans: collections.deque = collections.deque(maxlen=self.max_spans)
        self._lock = threading.Lock()
        self.dropped_tasks = 0

    # -- hooks ------------------------------------------------------------------
    @hookimpl
    def beamlet_task_submitted(self, spec) -> None:
        now = time.time()
        with self._lock:
            record = self._tasks.get(spec.task_id)
            if record is None:
                self._tasks[spec.task_id] = TaskRecord(spec, now)
                if len(self._tasks) > self.max_tasks:
                    self._tasks.popitem(last=False)
                    self.dropped_tasks += 1
            if spec.kind == ACTOR_CREATION and spec.actor_id not in self._actors:
                actor = self._actors[spec.actor_id] = ActorRecord(
                    spec.actor_id, spec.function_name)
                options = spec.actor_options or {}
                actor.name = options.get("name")
                actor.namespace = options.get("namespace")

    @hookimpl
    def beamlet_task_finished(self, spec, status: str, duration: float, pid) -> None:
        end = time.time()
        start = end - duration
        with self._lock:
            self._spans.append((spec.display_name, spec.task_id, status, start, end, pid))
            record = self._tasks.get(spec.task_id)
            if record is None:
                return  # (submitted before recording began, or dropped)
            record.attempt_number = spec.attempt
            record.start_time = start
            record.pid = pid
            if status == "RETRYING":
                record.state = "PENDING"
                record.attempt_number = spec.attempt + 1
            else:
                record.state = status
                record.end_time = end
            if spec.kind == ACTOR_CREATION and status == "FINISHED":
                actor = self._actors.get(spec.actor_id)
                if actor is not None:
                    actor.pid = pid

    @hookimpl
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

    # -- reading ----------------------------------------------------------------
    def tasks(self) -> list[TaskRecord]:
        """Copies of the task rows, oldest first."""
        with self._lock:
            return [_copy(r) for r in self._tasks.values()]

    def actors(self) -> list[ActorRecord]:
        with self._lock:
            return [_copy(r) for r in self._actors.values()]

    def spans(self) -> list[tuple]:
        """The ended attempts, oldest first: ``(name, task_id, status, start,
        end, pid)`` with times in seconds since the epoch (pid None: unknown)."""
        with self._lock:
            return list(self._spans)


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

"""The job's tasks, actors, objects and workers as the driver sees them now
(Ray's ``ray.util.state``): ``list_tasks()``, ``list_actors()``,
``list_objects()``, ``list_workers()``, ``get_task()``, ``get_actor()`` and
``summarize_tasks()``.

Tasks and actors come from the lifecycle hooks (``beamlet_task_submitted``,
``beamlet_task_finished``, ``beamlet_actor_state``), recorded in the driver
while the job runs; the newest 10,000 tasks are kept (``$BEAMLET_STATE_MAX_TASKS``).
A task's state is Ray's: ``PENDING_ARGS_AVAIL`` while its arguments are
being computed, ``PENDING_NODE_ASSIGNMENT`` while it is queued for resources
or a worker (and between an attempt that failed and its retry), ``RUNNING``
from when its attempt is dispatched to a process, then ``FINISHED`` or
``FAILED`` (``error_type`` ``"TASK_CANCELLED"`` for a cancelled task). An
actor call sent to its actor behind earlier calls is ``SUBMITTED_TO_WORKER``
until the call before it ends (calls of actors that run several at once
may show so while they run). Backends whose ``task_events`` flag is False (their tasks end on
other machines or engines) raise NotImplementedError here.

Every ``list_*`` takes ``filters``, a list of ``(field, "=" or "!=", value)``
compared as strings (as in Ray), and ``limit`` (default 100, as in Ray);
``detail`` and ``timeout`` are accepted for Ray's sake (rows always carry every
field and nothing waits); ``address`` must be None.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable

from ..core import runtime as _runtime

DEFAULT_LIMIT = 100


class _Row:
    """Rows read as attributes (``t.state``) or, as Ray's older API, as a dict
    (``t["state"]``)."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default=None) -> Any:
        return getattr(self, key, default)


@dataclasses.dataclass(frozen=True)
class TaskState(_Row):
    task_id: str
    name: str
    state: str
    type: str
    func_or_class_name: str
    actor_id: str | None
    job_id: str
    attempt_number: int
    worker_pid: int | None
    creation_time_ms: int
    start_time_ms: int | None
    end_time_ms: int | None
    error_type: str | None = None


@dataclasses.dataclass(frozen=True)
class ActorState(_Row):
    actor_id: str
    class_name: str
    state: str
    name: str | None
    ray_namespace: str | None
    pid: int | None
    num_restarts: int
    death_cause: str | None


@dataclasses.dataclass(frozen=True)
class ObjectState(_Row):
    object_id: str
    object_size: int | None
    reference_type: str
    ref_count: int
    ready: bool


@dataclasses.dataclass(frozen=True)
class WorkerState(_Row):
    worker_id: str
    pid: int | None
    is_alive: bool
    worker_type: str
    state: str
    actor_id: str | None


def list_tasks(filters: list | None = None, limit: int = DEFAULT_LIMIT, detail: bool = False,
               timeout: float | None = None, address: str | None = None) -> list[TaskState]:
    """The job's tasks, actor creations and actor calls, oldest first."""
    rt, events = _events("list_tasks", address)
    rows = [_task_row(r, rt.job_id) for r in events.tasks()]
    return _select(rows, filters, limit, TaskState)


def get_task(task_id: str, address: str | None = None) -> TaskState | None:
    """The task with this id (hex), or None if it is not (or no longer) recorded."""
    rt, events = _events("get_task", address)
    for record in events.tasks():
        if record.task_id.hex() == task_id:
            return _task_row(record, rt.job_id)
    return None


def list_actors(filters: list | None = None, limit: int = DEFAULT_LIMIT, detail: bool = False,
               timeout: float | None = None, address: str | None = None) -> list[ActorState]:
    """The job's actors, in creation order, dead ones included."""
    _rt, events = _events("list_actors", address)
    rows = [ActorState(a.actor_id.hex(), a.class_name, a.state, a.name, a.namespace, a.pid,
                       a.num_restarts, a.death_cause) for a in events.actors()]
    return _select(rows, filters, limit, ActorState)


def get_actor(actor_id: str, address: str | None = None) -> ActorState | None:
    """The actor with this id (hex), or None."""
    found = list_actors(filters=[("actor_id", "=", actor_id)], limit=1, address=address)
    return found[0] if found else None


def list_objects(filters: list | None = None, limit: int = DEFAULT_LIMIT, detail: bool = False,
               timeout: float | None = None, address: str | None = None) -> list[ObjectState]:
    """The objects the driver holds references to: size in bytes once stored
    (None while its task runs), and how many references the driver holds."""
    rt, _events_ = _events("list_objects", address)
    store = rt.backend.object_store
    rows = []
    for object_id, count in rt.refs.counts().items():
        entry = store.entry(object_id)
        rows.append(ObjectState(object_id.hex(), getattr(entry, "total_bytes", None),
                                "LOCAL_REFERENCE", count, entry is not None))
    return _select(rows, filters, limit, ObjectState)


def list_workers(filters: list | None = None, limit: int = DEFAULT_LIMIT, detail: bool = False,
               timeout: float | None = None, address: str | None = None) -> list[WorkerState]:
    """The driver and the worker processes the backend runs now."""
    rt, _events_ = _events("list_workers", address)
    rows = [WorkerState(**row) for row in rt.backend.workers()]
    return _select(rows, filters, limit, WorkerState)


def summarize_tasks(timeout: float | None = None, address: str | None = None) -> dict:
    """``{name: {state: count}}`` over the recorded tasks."""
    _rt, events = _events("summarize_tasks", address)
    summary: dict = collections.defaultdict(collections.Counter)
    for record in events.tasks():
        summary[record.name][record.state] += 1
    return {name: dict(counts) for name, counts in summary.items()}


# -- helpers ------------------------------------------------------------------

def _events(what: str, address: str | None = None):
    if address is not None:
        raise ValueError(f"{what}(address=...): beamlet reads the state of the job this "
                         f"process runs; there is no state server to connect to")
    rt = _runtime.current_or_none()
    if rt is None:
        raise RuntimeError(f"{what}(): beamlet is not initialized; call beamlet.init() first")
    if rt.task_events is None:
        name = rt.backend.name
        if "task_events" in getattr(rt.backend, "accepted_options", ()):
            raise NotImplementedError(
                f"{what}() needs task events, which the {name!r} backend records only "
                f"when asked: beamlet.init(backend={name!r}, task_events=True)")
        raise NotImplementedError(
            f"{what}() needs a backend whose driver sees every task (task_events); the "
            f"{name!r} backend does not")
    rt.backend.settle_task_events()
    return rt, rt.task_events


def _task_row(record, job_id: str) -> TaskState:
    return TaskState(record.task_id.hex(), record.name, record.state, record.type,
                     record.name, record.actor_id.hex() if record.actor_id else None, job_id,
                     record.attempt_number, record.pid, _ms(record.creation_time),
                     _ms(record.start_time), _ms(record.end_time), record.error_type)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def _select(rows: list, filters: Iterable | None, limit: int, cls) -> list:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    tests = []
    for item in filters or ():
        try:
            key, predicate, value = item
        except (TypeError, ValueError):
            raise ValueError(f"a filter is (field, '=' or '!=', value), got {item!r}") from None
        if key not in fields:
            raise ValueError(f"cannot filter {cls.__name__} on {key!r}; its fields are "
                             f"{', '.join(sorted(fields))}")
        if predicate not in ("=", "!="):
            raise ValueError(f"a filter's predicate is '=' or '!=', got {predicate!r}")
        tests.append((key, predicate == "=", str(value)))
    selected = [row for row in rows
                if all((str(getattr(row, key)) == value) is equal for key, equal, value in tests)]
    return selected[:limit]

"""RayControlStore: beamlet's control store held by a detached named Ray actor.

The tables live in one actor, ``beamlet-control`` in the Ray namespace
``beamlet``, made by the first beamlet process that needs it
(``get_if_exists``) and ``detached``, so every process of every beamlet job on
the Ray cluster (drivers, and their tasks and actors on Ray workers) sees the
same tables, for as long as the cluster runs, as Ray's own GCS does for Ray's
tables.

Why an actor and not Ray's internal key-value store: that store is reached
only through private functions (``ray.experimental.internal_kv._internal_kv_*``)
and has no compare-and-set, the primitive every beamlet read-modify-write is
built on. An actor's methods run one at a time on its event loop (none of them
awaits midway), so each is atomic.

Publish/subscribe: the actor keeps the last `_KEPT` messages of each channel,
numbered; a subscribing process reads from the number current when it
subscribed, on one thread that long-polls the actor, and runs the callbacks
there in order. A subscriber more than `_KEPT` messages behind misses the oldest.

Task events (``events.py``): batches a job's workers send for its driver,
kept per job until the driver takes them, dropped when it leaves.

The actor is made when a process first writes (or subscribes): a program
that only runs tasks never starts it, so its cold start costs what native
Ray's does (the actor is a process of its own). Until then a read answers
from the empty tables without making it.

The code of beamlet functions and classes (the ``functions`` table) is not
kept in the actor: each process keeps what it registered or received here
(`_code`), and the code travels to Ray workers inside the Ray functions and
actor constructions that run it (`CarriedCode`, scheduler.py), as Ray ships
a remote function's code once per worker: a task's first run needs no call
to the actor.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import queue
import sys
import threading
from typing import Any, Callable

import ray as _ray

from ... import exceptions as exc
from ...core.control_store import (MemoryControlStore, channel_name, key_bytes, message_bytes,
                                   value_bytes)
from ...core.interfaces import ControlStore
from ...core.tables import FUNCTIONS
from . import threads

NAME = "beamlet-control"
NAMESPACE = "beamlet"
_KEPT = 10_000
_EVENTS_BYTES = 8 << 20  # task-event batches kept per job for its driver, in bytes
_EVENTS_JOBS = 256       # jobs whose batches are kept at once
_ENDED_JOBS_KEPT = 10_000
_POLL = 1.0
_CALL_TIMEOUT = 60.0


class _Tables:
    """(The actor.) Tables of bytes, and numbered messages per channel."""

    def __init__(self):
        #: Which actor this is: one made after another died numbers its
        #: channels afresh, and subscribers must know (`RayControlStore._poll`).
        self._incarnation = os.urandom(8)
        self._tables: dict[str, dict[bytes, bytes]] = {}
        self._channels: dict[str, list] = {}  # channel -> [first number, messages]
        self._changed: asyncio.Event | None = None
        #: job id -> [its task events' batches, their bytes, the Event its driver's
        #: take waits on], least recently taken first (`_events_of`)
        self._events: dict[str, list] = {}
        self._ended_jobs: dict[str, None] = {}  # (insertion-ordered: oldest dropped)

    async def put(self, table: str, key: bytes, value: bytes, overwrite: bool) -> bool:
        entries = self._tables.setdefault(table, {})
        if not overwrite and key in entries:
            return False
        entries[key] = value
        return True

    async def compare_and_set(self, table: str, key: bytes, expected, new) -> bool:
        entries = self._tables.setdefault(table, {})
        if entries.get(key) != expected:
            return False
        if new is None:
            entries.pop(key, None)
        else:
            entries[key] = new
        return True

    async def get(self, table: str, key: bytes):
        return self._tables.get(table, {}).get(key)

    async def delete(self, table: str, key: bytes) -> bool:
        return self._tables.get(table, {}).pop(key, None) is not None

    async def keys(self, table: str) -> list:
        return list(self._tables.get(table, {}))

    async def cursor(self, channel: str) -> tuple:
        """(this actor's incarnation, the number the channel's next message will get)."""
        first, messages = self._channels.get(channel, (0, []))
        return self._incarnation, first + len(messages)

    async def publish(self, channel: str, message: bytes) -> None:
        state = self._channels.setdefault(channel, [0, []])
        state[1].append(message)
        if len(state[1]) > _KEPT:
            drop = len(state[1]) - _KEPT
            del state[1][:drop]
            state[0] += drop
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def poll(self, cursors: dict, timeout: float) -> tuple:
        """(this actor's incarnation, ``{channel: (next cursor, messages)}`` for
        the channels with messages at or after their cursor); waits up to
        `timeout` for one."""
        found = self._since(cursors)
        if not found:
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            found = self._since(cursors)
        return self._incarnation, found

    # -- task events (events.py) -----------------------------------------------------
    def _events_of(self, job_id: str) -> list:
        """The job's [batches, their bytes, the Event its driver's take waits on];
        made (as the newest) if it has none. Beyond `_EVENTS_JOBS` jobs, the one
        whose driver took least recently loses what it kept (a driver killed
        before it ended its events never takes again)."""
        state = self._events.get(job_id)
        if state is None:
            state = self._events[job_id] = [collections.deque(), 0, None]
            while len(self._events) > _EVENTS_JOBS:
                self._events.pop(next(iter(self._events)))
        return state

    async def add_events(self, job_id: str, payload: bytes) -> None:
        """Keep a batch of the job's task events for its driver (the newest
        `_EVENTS_BYTES` of them; none once the driver has left)."""
        if job_id in self._ended_jobs:
            return
        state = self._events_of(job_id)
        state[0].append(payload)
        state[1] += len(payload)
        while state[1] > _EVENTS_BYTES and len(state[0]) > 1:
            state[1] -= len(state[0].popleft())
        if state[2] is not None:
            state[2].set()
            state[2] = None

    async def take_events(self, job_id: str, timeout: float):
        """The job's batches kept so far, taken (waits up to `timeout` for one);
        None once the job has ended (`end_events`)."""
        if job_id in self._ended_jobs:
            return None
        state = self._events.pop(job_id, None)  # (taken from now: the newest)
        if state is None:
            state = self._events_of(job_id)
        else:
            self._events[job_id] = state
        if not state[0]:
            if state[2] is None:
                state[2] = asyncio.Event()
            try:
                await asyncio.wait_for(state[2].wait(), timeout)
            except asyncio.TimeoutError:
                pass
            if job_id in self._ended_jobs:
                return None
        taken = list(state[0])
        state[0].clear()
        state[1] = 0
        return taken

    async def end_events(self, job_id: str) -> None:
        """The job's driver has left: drop its batches, refuse later ones, and
        end its `take_events` waiting now."""
        self._ended_jobs[job_id] = None
        while len(self._ended_jobs) > _ENDED_JOBS_KEPT:
            self._ended_jobs.pop(next(iter(self._ended_jobs)))
        state = self._events.pop(job_id, None)
        if state is not None and state[2] is not None:
            state[2].set()

    def _since(self, cursors: dict) -> dict:
        found = {}
        for channel, cursor in cursors.items():
            first, messages = self._channels.get(channel, (0, []))
            start = max(cursor - first, 0)
            if start < len(messages):
                found[channel] = (first + len(messages), messages[start:])
        return found


_TablesActor = _ray.remote(num_cpus=0, max_concurrency=1000)(_Tables)


def control_actor():
    """The cluster's control actor, made if no process has made it yet."""
    return _TablesActor.options(name=NAME, namespace=NAMESPACE, lifetime="detached",
                                get_if_exists=True).remote()


_death_told = False


def said_control_actor_died() -> None:
    """Say on stderr, once per process, that the control actor died: the one
    made after it starts with empty tables (named actors, job records, task
    events not yet taken are lost), which a user should know of."""
    global _death_told
    if not _death_told:
        _death_told = True
        print("beamlet: the control store's Ray actor (beamlet-control) died; a new one "
              "takes over with empty tables: named actors, job records and task events "
              "it held are lost", file=sys.stderr)


def existing_control_actor():
    """The cluster's control actor if some process has made it, else None."""
    try:
        return _ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return None


# -- the control thread: where a Ray worker submits its calls to the actor -----------
# Where a call is submitted decides its Ray task id and whose child it is:
# - from a task's thread (or an actor call's), Ray counts it as that task's
#   child: ``cancel(task)`` (recursive, the default) cancels it too, leaving
#   a write half-known to its caller;
# - from a worker's main thread outside any task (an actor's graceful end,
#   ``__ray_shutdown__``; ``atexit`` hooks), Ray 2.60 gives it a task id that
#   depends only on how many such calls the process made: the same in other
#   processes, and two calls with one task id crash the control actor's
#   process ("Check failed: erased == 1" in Ray's core worker), losing every
#   table of the cluster.
# So in a Ray worker every call to the actor (the tables' `RayControlStore._call`
# and `_poll`, the task events' `events.EventSender`) is submitted from one
# thread of the process's own, made for it: no task runs there, and Ray gives
# each thread's calls ids of their own.

_control_queue: "queue.SimpleQueue | None" = None
_control_thread: threading.Thread | None = None
_control_pid: int | None = None
_control_lock = threading.Lock()


def _serve(calls: "queue.SimpleQueue") -> None:
    while True:
        future, function, args = calls.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = function(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            future.set_exception(err)
        else:
            future.set_result(result)


def on_control_thread(function: Callable, *args, timeout: float | None = None):
    """``function(*args)`` run on this process's control thread (made on first
    use): what it returns, or raises; `concurrent.futures.TimeoutError` after
    `timeout` seconds (default `_CALL_TIMEOUT`; the call still runs then).

    The caller only waits: a cancel that interrupts it (Ray raises
    KeyboardInterrupt in a task's thread) leaves the call to run to its end.
    A plain daemon thread, not an executor: Python's executors refuse work
    once the interpreter is exiting, when a worker sends its last events."""
    global _control_queue, _control_thread, _control_pid
    if threading.current_thread() is _control_thread:
        return function(*args)
    calls = _control_queue
    if calls is None or _control_pid != os.getpid():
        with _control_lock:
            if _control_queue is None or _control_pid != os.getpid():
                _control_queue = queue.SimpleQueue()
                _control_pid = os.getpid()
                _control_thread = threads.start(_serve, _control_queue, name="beamlet-ray-control")
            calls = _control_queue
    future = concurrent.futures.Future()
    calls.put((future, function, args))
    return future.result(_CALL_TIMEOUT if timeout is None else timeout)


#: The ``functions`` table of this process (function id -> the pickled
#: function or class): what it registered, and what reached it with
#: `CarriedCode`. Ids are digests of their code, so every process and job may
#: share it.
_code = MemoryControlStore()


def _arrived(function_id: bytes, blob: bytes) -> "CarriedCode":
    _code.put(FUNCTIONS, function_id, blob, overwrite=False)
    return CarriedCode(function_id, blob)


class CarriedCode:
    """A beamlet function's or class's code, travelling inside a Ray function
    or a Ray actor's constructor arguments: unpickled in a process, it is known
    there (`_code`) before anything that runs it starts."""

    __slots__ = ("function_id", "blob")

    def __init__(self, function_id: bytes, blob: bytes):
        self.function_id = function_id
        self.blob = blob

    def __reduce__(self):
        return (_arrived, (self.function_id, self.blob))


class RayControlStore(ControlStore):
    def __init__(self, actor=None, in_worker: bool = False):
        """`actor`: the actor holding the tables (default: the cluster's; tests
        use one of their own). `in_worker`: this process is a Ray worker, whose
        calls to the actor are submitted from its control thread
        (`on_control_thread`)."""
        self._actor = actor  # (the cluster's: looked up or made on first use, `_actor_for`)
        self._given = actor is not None
        self._actor_lock = threading.Lock()
        self._in_worker = in_worker
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Callable[[bytes], Any]]] = {}
        self._cursors: dict[str, int] = {}
        self._incarnation: bytes | None = None  # (the actor's the cursors count in)
        self._poller: threading.Thread | None = None
        self._closed = threading.Event()

    def _actor_for(self, make: bool):
        """The actor: made if `make` and no process has made it yet; else None
        if none has."""
        actor = self._actor
        if actor is None:
            with self._actor_lock:
                actor = self._actor
                if actor is None:
                    actor = control_actor() if make else existing_control_actor()
                    self._actor = actor
        return actor

    def _read(self, method: str, empty, *args):
        """`_call` of a method that only reads (or deletes): `empty`, the answer
        of empty tables, while no process has made the actor."""
        if self._actor is None:
            try:
                if self._actor_for(make=False) is None:
                    return empty
            except _ray.exceptions.RayError as err:
                raise exc.BackendError(f"the beamlet control store (a Ray actor) could not "
                                       f"be looked up: {type(err).__name__}: {err}") from None
        return self._call(method, *args)

    def _submit(self, method: str, *args):
        """The ref of a call of the actor's `method` (the actor made if need
        be): in a Ray worker, submitted from the control thread, so that no
        task's cancel or end reaches it (`on_control_thread`)."""
        def submit():
            return getattr(self._actor or self._actor_for(make=True), method).remote(*args)
        return on_control_thread(submit) if self._in_worker else submit()

    def _call(self, method: str, *args):
        """Call the actor's `method` (made if need be, `_submit`) and wait for
        its answer (`_CALL_TIMEOUT`).

        If the actor has died (the crash the control thread's comment tells
        of), the call goes once to the actor made after it (empty tables:
        what the dead one kept is lost, the call's own effect with it),
        rather than every later call of this process failing."""
        for last in (self._given, True):
            try:
                return _ray.get(self._submit(method, *args), timeout=_CALL_TIMEOUT)
            except concurrent.futures.TimeoutError:
                raise exc.BackendError(f"the beamlet control store (a Ray actor) did not "
                                       f"take a call within {_CALL_TIMEOUT} s") from None
            except _ray.exceptions.RayError as err:
                if isinstance(err, _ray.exceptions.ActorDiedError) and not self._given:
                    said_control_actor_died()
                    self._actor = None  # (`_actor_for` finds or makes the next one)
                    if not last:
                        continue
                raise exc.BackendError(f"the beamlet control store (a Ray actor) failed: "
                                       f"{type(err).__name__}: {err}") from None

    def put(self, table: str, key, value: bytes, overwrite: bool = True) -> bool:
        value = value_bytes(value, "value")
        if value is None:
            raise TypeError("a control store value must be bytes, got None")
        if table == FUNCTIONS:
            return _code.put(table, key, value, overwrite)
        return self._call("put", table, key_bytes(key), value, bool(overwrite))

    def compare_and_set(self, table: str, key, expected: bytes | None,
                        new: bytes | None) -> bool:
        if table == FUNCTIONS:
            return _code.compare_and_set(table, key, expected, new)
        return self._call("compare_and_set", table, key_bytes(key),
                          value_bytes(expected, "expected value"), value_bytes(new, "new value"))

    def get(self, table: str, key) -> bytes | None:
        if table == FUNCTIONS:
            return _code.get(table, key)
        return self._read("get", None, table, key_bytes(key))

    def delete(self, table: str, key) -> bool:
        if table == FUNCTIONS:
            return _code.delete(table, key)
        return self._read("delete", False, table, key_bytes(key))

    def keys(self, table: str) -> list:
        if table == FUNCTIONS:
            return _code.keys(table)
        return self._read("keys", [], table)

    def publish(self, channel, message) -> None:
        self._call("publish", channel_name(channel), message_bytes(message))

    def subscribe(self, channel, callback: Callable[[bytes], Any]) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"a subscriber must be callable, got {type(callback).__name__}")
        channel = channel_name(channel)
        with self._lock:
            first = channel not in self._cursors
        if first:  # (asked outside the lock: the poller takes it too)
            incarnation, cursor = self._call("cursor", channel)
        with self._lock:
            if first:
                if self._incarnation is None:
                    self._incarnation = incarnation
                # (A cursor of another incarnation than the poller's: from the
                # start of the channel, see `_poll`.)
                self._cursors.setdefault(channel, cursor if incarnation == self._incarnation
                                         else 0)
            self._subscribers.setdefault(channel, []).append(callback)
            if self._poller is None:
                self._poller = threads.start(self._poll, name="beamlet-ray-events")

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subscribers.get(channel, [])
                if callback in callbacks:
                    callbacks.remove(callback)
        return unsubscribe

    def _poll(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                cursors = dict(self._cursors)
            try:
                incarnation, found = _ray.get(self._submit("poll", cursors, _POLL),
                                              timeout=_POLL + _CALL_TIMEOUT)
            except Exception as err:  # noqa: BLE001 - Ray is going away (closed, or shut down)
                if isinstance(err, _ray.exceptions.ActorDiedError) and not self._given:
                    said_control_actor_died()
                    self._actor = None  # (as in `_call`)
                if self._closed.wait(_POLL):
                    return
                continue
            with self._lock:
                if incarnation != self._incarnation:
                    # An actor made after the one the cursors count in (which
                    # died): its channels are numbered from 0, and every message
                    # it holds was published after the old one's last.
                    known, self._incarnation = self._incarnation is not None, incarnation
                    if known:
                        self._cursors = dict.fromkeys(self._cursors, 0)
                        continue
            for channel, (cursor, messages) in found.items():
                with self._lock:
                    self._cursors[channel] = cursor
                    callbacks = list(self._subscribers.get(channel, ()))
                for message in messages:
                    for callback in callbacks:
                        try:
                            callback(message)
                        except Exception as err:  # noqa: BLE001 - one must not stop the rest
                            print(f"beamlet: a subscriber of {channel!r} raised {err!r}; "
                                  f"ignored", file=sys.stderr)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._subscribers.clear()
            poller, self._poller = self._poller, None
        if poller is not None and poller is not threading.current_thread():
            poller.join(_POLL + 5)

"""The Runtime: Ray's semantics on top of a Backend, one per process.

The public API (``core/api.py``) calls the current Runtime; the Runtime turns
calls into TaskSpecs and store operations on its Backend. Everything that
must behave the same on every backend lives here: argument handling (top-level
refs are resolved, nested refs stay refs, large values go through the store),
raising stored errors, `wait`'s ordering rules, reference counting and the
task context that `get_runtime_context` reports. What processes share
(functions, actors and their names) lives in the control store's tables
(``core/tables.py``), reached through ``Runtime.tables``.
"""
from __future__ import annotations

import contextvars
import itertools
import operator
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

from .. import exceptions as exc
from . import ids
from .refcount import ReferenceCounter
from .serialization import SerializedObject, deserialize, serialize
from .task_spec import ACTOR_CREATION, ACTOR_METHOD, ARG_REF, ARG_VALUE, TASK, TaskSpec

if TYPE_CHECKING:
    from .interfaces import Backend
    from .object_ref import ObjectRef

_current: "Runtime | None" = None
_ID_OF = operator.attrgetter("id")
_RUNTIME_OF = operator.attrgetter("_runtime")
_init_lock = threading.RLock()


def current_or_none() -> "Runtime | None":
    return _current


def current() -> "Runtime":
    """The Runtime of this process; initialises with defaults on first use, as Ray does."""
    rt = _current
    if rt is None:
        from .api import init
        with _init_lock:
            if _current is None:
                init()
        rt = _current
    return rt


def set_current(rt: "Runtime | None") -> None:
    global _current
    _current = rt


class TaskContext:
    """What is running in this thread/coroutine: read by get_runtime_context."""

    __slots__ = ("task_id", "actor_id", "function_name", "resources", "placement_group")

    def __init__(self, task_id=None, actor_id=None, function_name="", resources=None,
                 placement_group=None):
        self.task_id = task_id
        self.actor_id = actor_id
        self.function_name = function_name
        self.resources = resources or {}
        #: (PlacementGroup, bundle index, capture child tasks) or None: see core/placement.py
        self.placement_group = placement_group


task_context: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "beamlet_task_context", default=None)


class Runtime:
    """Ray's semantics over one process's Backend."""

    def __init__(self, backend_factory, config: dict):
        self.namespace = config.get("namespace") or "anonymous-" + ids.new_id().hex()[:8]
        self.job_id = config.get("job_id") or ids.new_id().hex()
        self.caller_id = ids.new_id()
        #: The job's runtime_env (init(runtime_env=...)): its env_vars go into every spec.
        self.runtime_env = config.get("runtime_env") or {}
        #: From init(job_config=JobConfig(...)): the job's metadata, and the
        #: lifetime of actors created without lifetime= ("detached" or not).
        self.job_metadata: dict = config.get("job_metadata") or {}
        self.default_actor_lifetime: str = config.get("default_actor_lifetime") or "non_detached"
        self._job_env_vars = self.runtime_env.get("env_vars") or None
        self.refs = ReferenceCounter(self._released, self._referenced)
        self._registered_functions: set[bytes] = set()
        #: What plain calls put in their specs, worked out at the first one here
        #: and shared by the specs of the later ones (nothing may change them).
        #: A RemoteFunction -> for ``f.remote(...)`` with its default options,
        #: one return, no generator, no placement decided per call: (ArgSpec,
        #: its error label, the scheduler's submit, whether a spec with
        #: arguments goes through `accept` instead (`pins_arguments`),
        #: function id, resources, max_retries, retry_exceptions, env_vars with
        #: the job's, placement). (actor id, method name) -> for
        #: ``handle.method.remote(...)`` without .options(), one return, no
        #: generator: (ArgSpec, its error label, submit, whether `accept`,
        #: actor_options, env_vars, the scheduler's ``submit_plain_call`` where
        #: such calls may go without a spec, else None). A call in another runtime (after init()
        #: again) finds none. See `remember_plain_call`.
        self.plain_calls: dict = {}
        self._callbacks = None  # the queue of the callback thread, once started
        self._callbacks_lock = threading.Lock()
        self.backend: Backend = backend_factory(config, self)
        self._object_released = self.backend.object_released  # (see _released)
        #: Whether a submission here pins its ref arguments until it ends (`accept`).
        self.pins_arguments = bool(self.backend.owns_objects and
                                   not getattr(self.backend, "engine_keeps_arguments", False))
        from .interfaces import Backend as _Backend
        if getattr(type(self.backend), "object_referenced", None) is _Backend.object_referenced:
            self.refs.skip_referenced()  # (the owner's backend needs no word of a 0 -> 1)
        #: What the lifecycle hooks told of this job's tasks (beamlet.util.state),
        #: where the backend's driver hears them all; else None.
        self.task_events = None
        if self.backend.owns_objects and self.backend.task_events:
            from .task_events import TaskEvents
            self.task_events = TaskEvents()
            self.task_events.listen()
            self.backend.scheduler.task_progress = self.task_events.progress
        from .tables import Tables  # not at import: `import beamlet` stays fast
        self.tables = Tables(self.backend.control_store)
        self.inline_threshold = self.backend.inline_threshold
        self._large_args_by_ref = bool(self.backend.zero_copy or
                                       getattr(self.backend, "large_arguments_by_ref", False))
        # Optional parameters a plugin's components may predate (asked once).
        self._fail_fast = _takes(self.backend.object_store.get, "fail_fast")
        self._recursive_cancel = _takes(self.backend.scheduler.cancel, "recursive")
        # Unhandled errors (see _released): errors `get` raised, by object id, and
        # how the owner reads a stored entry without materializing it.
        self._errors_raised: set[bytes] = set()
        self._entry = (_entry_reader(self.backend.object_store)
                       if self.backend.owns_objects and
                       not os.environ.get(IGNORE_UNHANDLED_ERRORS_ENV_VAR) else None)

    # -- reference counting ---------------------------------------------------
    def _referenced(self, object_id: bytes) -> None:
        self.backend.object_referenced(object_id)

    def _released(self, object_id: bytes) -> None:
        if self._entry is not None:
            entry = self._entry(object_id)
            if entry is not None and entry.is_error:
                if object_id in self._errors_raised:
                    self._errors_raised.discard(object_id)
                else:
                    _log_unhandled(object_id, entry)
        self._object_released(object_id)

    def _unpin_when_done(self, spec: TaskSpec, pinned: list[bytes]) -> None:
        if not pinned:
            return
        refs = self.refs
        self.backend.object_store.on_ready(spec.return_ids[0], lambda _id: refs.decr_all(pinned))

    # -- functions ------------------------------------------------------------
    def register_function(self, function_id: bytes, blob: bytes) -> None:
        """Make the pickled function or class known to every worker (once per process)."""
        if function_id not in self._registered_functions:
            self.tables.register_function(function_id, blob)
            self._registered_functions.add(function_id)

    def remember_plain_call(self, key, template: tuple) -> None:
        """Keep what plain calls of `key` put in their specs (see `plain_calls`;
        at most PLAIN_CALLS_KEPT keys: then it starts over)."""
        if len(self.plain_calls) >= PLAIN_CALLS_KEPT:
            self.plain_calls.clear()
        self.plain_calls[key] = template

    # -- arguments ------------------------------------------------------------
    def _pack_arg(self, value: Any, what: str, function_name: str, keep: list) -> tuple:
        from .object_ref import ObjectRef
        if type(value) is ObjectRef:
            self._ids((value,))  # a ref of a session that was shut down fails here, not later
            return (ARG_REF, value.id)
        try:
            sobj = serialize(value)
        except TypeError as err:
            raise TypeError(f"{function_name}: {what} could not be serialized: {err}") from None
        if sobj.total_bytes > self.inline_threshold and self._large_args_by_ref:
            ref = self._put_serialized(sobj)
            keep.append(ref)
            return (ARG_REF, ref.id)
        # A copy: the task sees the argument as it was at .remote(), even if it runs later.
        return (ARG_VALUE, sobj.detached())

    def pack_args(self, args: Sequence, kwargs: dict, function_name: str) -> tuple[list, dict, list]:
        """Turn call arguments into TaskSpec argument entries. Returns the ObjectRefs
        created for large values, which the caller keeps alive until submission."""
        keep: list = []
        packed = [self._pack_arg(a, f"argument {i}", function_name, keep) for i, a in enumerate(args)]
        packed_kw = {k: self._pack_arg(v, f"argument {k!r}", function_name, keep)
                     for k, v in kwargs.items()}
        return packed, packed_kw, keep

    # -- submission -----------------------------------------------------------
    def submit(self, spec: TaskSpec) -> list["ObjectRef"]:
        """Hand a spec to the scheduler; return refs to its results."""
        ObjectRef = _object_ref_class()
        refs = [ObjectRef(rid) for rid in spec.return_ids]
        if self.pins_arguments:
            self.accept(spec)
        else:
            self.backend.scheduler.submit(spec)
        return refs

    def accept(self, spec: TaskSpec) -> None:
        """Pin what the spec needs until it finishes, then schedule it (the
        owner's side of a submission, also for specs sent by workers)."""
        pinned = spec.dependencies()
        pinned.extend(spec.contained_refs())
        if pinned:
            self.refs.incr_all(pinned)
        try:
            self.backend.scheduler.submit(spec)
        except BaseException:
            self.refs.decr_all(pinned)
            raise
        if pinned:
            self._unpin_when_done(spec, pinned)

    def make_spec(self, kind: int, function_id: bytes, function_name: str, args, kwargs,
                  num_returns: int, resources: dict, max_retries: int = 0,
                  retry_exceptions: Any = False, actor_id: bytes | None = None,
                  method_name: str | None = None, actor_options: dict | None = None,
                  env_vars: dict | None = None, placement_group: tuple | None = None,
                  generator: tuple | None = None):
        """A TaskSpec for a call, and the refs made for its large arguments (keep
        them until it is submitted). `generator`: see ``TaskSpec.generator``;
        NotImplementedError on a backend without ``streaming_generators``."""
        if generator is not None and not self.backend.streaming_generators:
            raise NotImplementedError(
                f"{function_name}: generator tasks (num_returns={generator[0]!r}) are not "
                f"supported by the {self.backend.name!r} backend; use the 'local' or "
                f"'inprocess' backend, or return a list")
        if args or kwargs:
            packed, packed_kw, keep = self.pack_args(args, kwargs, function_name)
        else:
            packed, packed_kw, keep = [], {}, []
        if self._job_env_vars:
            env_vars = {**self._job_env_vars, **env_vars} if env_vars else self._job_env_vars
        return_ids = ((ids.new_id(),) if num_returns <= 1
                      else tuple(ids.new_id() for _ in range(num_returns)))
        spec = TaskSpec(ids.new_id(), kind, function_id, function_name, packed, packed_kw,
                        return_ids, resources, max_retries, retry_exceptions, actor_id,
                        method_name, actor_options, self.caller_id, 0, env_vars,
                        placement_group, generator)
        return spec, keep

    # -- objects --------------------------------------------------------------
    def _put_serialized(self, sobj: SerializedObject) -> "ObjectRef":
        from .object_ref import ObjectRef
        ref = ObjectRef(ids.new_id())
        self.backend.object_store.put(ref.id, sobj)
        return ref

    def put(self, value: Any) -> "ObjectRef":
        from .object_ref import ObjectRef
        if isinstance(value, ObjectRef):
            raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself, "
                            "or put a list holding it")
        try:
            sobj = serialize(value)
        except TypeError as err:
            raise TypeError(f"put(): {err}") from None
        return self._put_serialized(sobj)

    def _value(self, sobj: SerializedObject, object_id: bytes | None = None) -> Any:
        value = deserialize(sobj)
        if sobj.is_error:
            if object_id is not None and self._entry is not None:
                self._errors_raised.add(object_id)  # (handled: not logged when released)
            raise value
        return value

    def _ids(self, refs: Sequence["ObjectRef"]) -> list[bytes]:
        # C-level passes (map, set): wait() in a loop calls this on long lists.
        if refs and set(map(_RUNTIME_OF, refs)) != {self}:
            stale = next(r for r in refs if r._runtime is not self)
            raise exc.ObjectLostError(
                f"{stale!r} belongs to a beamlet session that was shut down; its object "
                f"is gone")
        return list(map(_ID_OF, refs))

    def get(self, refs: Sequence["ObjectRef"], timeout: float | None) -> list:
        _check_timeout(timeout)
        ids = self._ids(refs)
        if self._fail_fast and len(ids) > 1:
            sobjs = self.backend.object_store.get(ids, timeout, fail_fast=True)
        else:
            sobjs = self.backend.object_store.get(ids, timeout)
        if None in sobjs:  # failed fast: an error arrived before the rest
            for object_id, sobj in zip(ids, sobjs):
                if sobj is not None and sobj.is_error:
                    self._value(sobj, object_id)  # (raises it)
        return [self._value(s, i) for s, i in zip(sobjs, ids)]

    def get_one(self, ref: "ObjectRef", timeout: float | None) -> Any:
        if ref._runtime is not self:
            self._ids((ref,))  # (raises, naming it)
        object_id = ref.id
        return self._value(self.backend.object_store.get([object_id], timeout)[0], object_id)

    def wait(self, refs: Sequence["ObjectRef"], num_returns: int, timeout: float | None,
             ids: list[bytes] | None = None):
        """`ids`: the refs' ids, when the caller has them already."""
        _check_timeout(timeout)
        if ids is None:
            ids = self._ids(refs)
        elif refs and set(map(_RUNTIME_OF, refs)) != {self}:
            self._ids(refs)  # raises, naming the stale ref
        ready_ids = self.backend.object_store.wait(ids, num_returns, timeout)
        if not ready_ids:
            return [], list(refs)
        # The first `num_returns` ready refs in input order, found by C-level
        # iteration that stops there: a wait loop over a long list must not pay
        # a Python step per ref per call.
        wanted = min(num_returns, len(ready_ids))
        chosen = list(itertools.islice(
            itertools.compress(range(len(ids)), map(ready_ids.__contains__, ids)), wanted))
        last = chosen[-1]
        if len(chosen) == last + 1:  # (the usual case: the first ones are ready)
            not_ready = list(refs[last + 1:])
        else:
            taken = set(chosen)
            not_ready = [refs[pos] for pos in range(last) if pos not in taken]
            not_ready.extend(refs[last + 1:])
        return [refs[pos] for pos in chosen], not_ready

    # -- actors ---------------------------------------------------------------
    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        self.backend.scheduler.kill_actor(actor_id, no_restart)

    def cancel(self, ref: "ObjectRef", force: bool, recursive: bool = True) -> None:
        if self._recursive_cancel:
            self.backend.scheduler.cancel(ref.id, force, recursive=recursive)
        else:  # (a scheduler that predates the flag: it decides)
            self.backend.scheduler.cancel(ref.id, force)

    # -- callbacks --------------------------------------------------------------
    def call_soon(self, fn) -> None:
        """Run ``fn()`` on this runtime's callback thread, in call order.

        For completions that run user code (``ref.future()`` callbacks, ``await
        ref``): the thread that stores a result is the backend's I/O thread, which
        must never run user code, since code that blocks there (a `get` in a
        callback) would stall every result behind it."""
        with self._callbacks_lock:
            if self._callbacks is None:
                import queue  # here, not at import: `import beamlet` stays quick
                self._callbacks = queue.SimpleQueue()
                threading.Thread(target=self._run_callbacks, args=(self._callbacks,),
                                 name="beamlet-callbacks", daemon=True).start()
            self._callbacks.put(fn)

    @staticmethod
    def _run_callbacks(pending) -> None:
        while True:
            fn = pending.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # noqa: BLE001 - one bad callback must not stop the others
                import traceback
                traceback.print_exc()

    # -- lifecycle ------------------------------------------------------------
    def shutdown(self) -> None:
        self.plain_calls.clear()
        self.refs.close()
        try:
            self.backend.shutdown()  # (runs pending completions: futures fail, not hang)
        finally:
            if self.task_events is not None:
                self.task_events.close()
        with self._callbacks_lock:
            if self._callbacks is not None:
                self._callbacks.put(None)


IGNORE_UNHANDLED_ERRORS_ENV_VAR = "BEAMLET_IGNORE_UNHANDLED_ERRORS"
PLAIN_CALLS_KEPT = 4096  # (see Runtime.remember_plain_call)


def _log_unhandled(object_id: bytes, entry) -> None:
    """A failed task's result was let go of without `get` ever raising it: say
    so once (Ray prints "Unhandled error"), so that a failure nobody looked at
    is not silent."""
    import logging
    try:
        error = deserialize(entry) if isinstance(entry, SerializedObject) else None
        if isinstance(error, exc.ObjectRefStreamEndOfStreamError):
            return  # (a generator's end-of-stream marker: not a failure)
        text = str(error) if error is not None else \
            f"the error stored as object {object_id.hex()}"
    except Exception:  # noqa: BLE001 - describing it must not fail the release
        text = f"the error stored as object {object_id.hex()}"
    logging.getLogger("beamlet").error(
        "Unhandled error (suppress with %s=1): %s", IGNORE_UNHANDLED_ERRORS_ENV_VAR, text)


def _entry_reader(store):
    """How to read a stored entry of `store` as it is (its `entry`), at C speed
    where it can be (MemoryObjectStore's `peek`); None if it cannot."""
    # (Not imported for the question: a store built on it has imported it. A
    # Dask worker's or driver's has not, and is spared compiling it.)
    memory_store = sys.modules.get(__package__ + ".memory_store")
    if memory_store is not None and \
            getattr(type(store), "entry", None) is memory_store.MemoryObjectStore.entry:
        return store.peek
    return getattr(store, "entry", None)


def _takes(method, parameter: str) -> bool:
    """Whether `method` accepts the keyword `parameter`."""
    import inspect
    try:
        return parameter in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _object_ref_class():
    """ObjectRef (imported on first use: object_ref.py imports this module)."""
    global _ObjectRef
    if _ObjectRef is None:
        from .object_ref import ObjectRef
        _ObjectRef = ObjectRef
    return _ObjectRef


_ObjectRef = None


def _check_timeout(timeout) -> None:
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")


def deadline(timeout: float | None) -> float | None:
    """The monotonic time at which `timeout` runs out (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(until: float | None) -> float | None:
    """Seconds left before `until` (never negative), None for no deadline."""
    return None if until is None else max(0.0, until - time.monotonic())


__all__ = ["Runtime", "current", "current_or_none", "TaskContext", "task_context",
           "TASK", "ACTOR_CREATION", "ACTOR_METHOD"]

"""RemoteFunction: what `@remote` makes of a function."""
from __future__ import annotations

import functools
import inspect
from typing import Any

from . import ids
from . import runtime as _runtime
from .object_ref import ObjectRef
from .options import DYNAMIC, STREAMING, TASK_OPTIONS, env_vars_of, resource_request, validate
from .placement import may_be_captured, placement_request
from .serialization import dumps
from .signature import ArgSpec
from .task_spec import TASK, TaskSpec

DEFAULT_MAX_RETRIES = 3


class RemoteFunction:
    """A function that runs as a task: ``f.remote(*args)`` returns ObjectRef(s) at once
    (an ObjectRefGenerator for a generator function, unless ``num_returns`` says
    otherwise: see ``core/generators.py``).

    The function is pickled once (lazily, at the first call) and identified by
    a digest of its bytes; that id, not the code, travels with each task.
    Calling it directly raises TypeError, as in Ray.
    """

    def __init__(self, function, options: dict):
        if not callable(function):
            raise TypeError(f"@remote needs a function or class, got {function!r}")
        self._function = function
        self._options = validate(options, TASK_OPTIONS, f"remote function {_name(function)}")
        self._name = _name(function)
        self._blob: bytes | None = None
        self._function_id: bytes | None = None
        self._call_options: tuple | None = None  # (see _call_options), made at the first call
        functools.update_wrapper(self, function, updated=())

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Remote functions cannot be called directly. Instead of running "
                        f"'{self._name}()', try '{self._name}.remote()'.")

    def _code(self) -> tuple[bytes, bytes]:
        if self._function_id is None:
            self._pickling = True  # a recursive function refers to itself: see __reduce__
            try:
                self._blob = dumps(self._function)
            finally:
                self._pickling = False
            self._function_id = ids.function_id(self._blob)
        return self._function_id, self._blob

    def options(self, **options) -> "_BoundOptions":
        """This function with per-call options (``num_returns``, resources, retries...)."""
        merged = dict(self._options)
        merged.update(validate(options, TASK_OPTIONS, f"{self._name}.options()"))
        return _BoundOptions(self, merged)

    def remote(self, *args, **kwargs):
        rt = _runtime._current
        fast = rt.plain_calls.get(self) if rt is not None else None
        if fast is None:
            return self._remote(args, kwargs, self._options)
        # The common call (see Runtime.plain_calls): the spec built in one step.
        (argspec, what, submit, owns, function_id, resources, max_retries,
         retry_exceptions, env_vars, placed) = fast
        if argspec is not None:
            argspec.check(args, kwargs, what)
        return_id = ids.new_id()
        if args or kwargs:
            packed, packed_kw, _keep = rt.pack_args(args, kwargs, self._name)
            if owns:
                submit = rt.accept  # (pins its ref arguments until it ends)
        else:
            packed, packed_kw = [], {}
        spec = TaskSpec(ids.new_id(), TASK, function_id, self._name, packed, packed_kw,
                        (return_id,), resources, max_retries, retry_exceptions, None, None,
                        None, rt.caller_id, 0, env_vars, placed, None)
        ref = ObjectRef(return_id)
        submit(spec)
        return ref

    _argspec = _UNSET = object()  # (ArgSpec of the function, made at the first call)

    def _remote(self, args, kwargs, options: dict, call: tuple | None = None):
        argspec = self._argspec
        if argspec is RemoteFunction._UNSET:
            argspec = self._argspec = ArgSpec.of(self._function)
        if argspec is not None:
            argspec.check(args, kwargs, f"{self._name}.remote()")
        rt = _runtime.current()
        function_id, blob = self._code()
        rt.register_function(function_id, blob)
        if call is None:
            call = self._call_options
            if call is None:
                call = self._call_options = _call_options(options, self._function)
        num_returns, resources, max_retries, retry_exceptions, env_vars, placed, generator = call
        if placed is _PER_CALL:
            resources, placed = placement_request(resources, None)
        spec, _keep = rt.make_spec(TASK, function_id, self._name, args, kwargs, num_returns,
                                   resources, max_retries=max_retries,
                                   retry_exceptions=retry_exceptions, env_vars=env_vars,
                                   placement_group=placed, generator=generator)
        refs = rt.submit(spec)
        if call is self._call_options and num_returns == 1 and generator is None \
                and placed is not _PER_CALL:
            # What every later plain call of this function in this runtime puts
            # in its spec (see Runtime.plain_calls).
            rt.remember_plain_call(self, (argspec, f"{self._name}.remote()",
                                          rt.backend.scheduler.submit, rt.pins_arguments,
                                          function_id, resources, max_retries,
                                          retry_exceptions, spec.env_vars, placed))
        if generator is not None and generator[0] == STREAMING:
            from .generators import ObjectRefGenerator
            return ObjectRefGenerator(refs[0], generator[1])
        if num_returns == 0:
            return None  # (as in Ray: it runs for its effects; its one hidden ref is let go)
        return refs[0] if num_returns == 1 else refs

    def __reduce__(self):
        if getattr(self, "_pickling", False):
            # Met inside its own code while that code is being pickled: pickle the
            # function by value (cloudpickle resolves the cycle); the copy
            # computes its id when first called.
            return (_rebuild_unpickled, (self._function, self._options))
        # Inside a task, the same function keeps its id and is not re-pickled per call.
        function_id, blob = self._code()
        return (_rebuild_remote_function, (blob, function_id, self._options))

    def __repr__(self) -> str:
        return f"<beamlet remote function {self._name}>"


class _BoundOptions:
    """The result of ``f.options(...)``: call ``.remote()`` on it."""

    def __init__(self, fn: RemoteFunction, options: dict):
        self._fn = fn
        self._options = options
        self._call = _call_options(options, fn._function)

    def remote(self, *args, **kwargs):
        return self._fn._remote(args, kwargs, self._options, self._call)

    def options(self, **options) -> "_BoundOptions":
        merged = dict(self._options)
        merged.update(validate(options, TASK_OPTIONS, f"{self._fn._name}.options()"))
        return _BoundOptions(self._fn, merged)


def _call_options(options: dict, function) -> tuple:
    """What a call with these (validated) options puts in its spec, worked out
    once: (num_returns, resources, max_retries, retry_exceptions, env_vars,
    placement: the spec's placement_group, or _PER_CALL when a capturing
    placement group of the caller decides it per call, generator). The resources
    and env_vars dicts are shared by the specs of every call: nothing may change them."""
    retry_exceptions = options.get("retry_exceptions", False)
    if isinstance(retry_exceptions, (list, tuple)):
        retry_exceptions = _ExceptionTypes(retry_exceptions)
    resources = resource_request(options, 1.0)
    strategy = options.get("scheduling_strategy")
    if may_be_captured(strategy):
        placed = _PER_CALL
    else:
        resources, placed = placement_request(resources, strategy)
    num_returns = num_returns_of(options, function)
    generator = None
    if num_returns in (STREAMING, DYNAMIC):
        generator = (num_returns, options.get("_generator_backpressure_num_objects", -1))
        num_returns = 1
    return (num_returns, resources, options.get("max_retries", DEFAULT_MAX_RETRIES),
            retry_exceptions, env_vars_of(options), placed, generator)


_PER_CALL = object()


def num_returns_of(options: dict, function) -> Any:
    """The `num_returns` a call makes: as given, else ``"streaming"`` for a
    generator function (as in Ray since 2.8), else 1."""
    num_returns = options.get("num_returns")
    if num_returns is None:
        num_returns = STREAMING if (inspect.isgeneratorfunction(function) or
                                    inspect.isasyncgenfunction(function)) else 1
    return num_returns


class _ExceptionTypes(tuple):
    """``retry_exceptions=[...]`` as it travels in a TaskSpec.

    Specs cross processes with plain pickle, which names a class by its module
    and would fail in a worker for an exception class defined in the driver's
    ``__main__`` (as Ray's own examples do). This tuple pickles its classes with
    cloudpickle instead, by value where needed, like the task's own code, so
    ``isinstance`` matches the errors the task raises."""

    def __reduce__(self):
        blob = self.__dict__.get("_blob")
        if blob is None:
            blob = self._blob = dumps(tuple(self))
        return (_load_exception_types, (blob,))


def _load_exception_types(blob: bytes) -> _ExceptionTypes:
    # Still an _ExceptionTypes (keeping its blob): a process that received the
    # spec may hand it on (a cluster node to its worker), again by plain pickle.
    from .serialization import loads
    types = _ExceptionTypes(loads(blob))
    types._blob = blob
    return types


def _rebuild_unpickled(function, options: dict) -> RemoteFunction:
    fn = RemoteFunction.__new__(RemoteFunction)
    fn._function = function
    fn._options = options
    fn._name = _name(function)
    fn._blob = fn._function_id = None
    fn._call_options = None
    return fn


def _rebuild_remote_function(blob: bytes, function_id: bytes, options: dict) -> RemoteFunction:
    from .serialization import loads
    fn = RemoteFunction.__new__(RemoteFunction)
    function = loads(blob)
    fn._function = function
    fn._options = options
    fn._name = _name(function)
    fn._blob = blob
    fn._function_id = function_id
    fn._call_options = None
    functools.update_wrapper(fn, function, updated=())
    return fn


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)

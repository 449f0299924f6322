"""The errors beamlet users catch.

Hierarchy (Ray's names in brackets where they differ)::

    BeamletError
    ├── TaskError                 a task raised; also an instance of the cause's class
    ├── GetTimeoutError           also a builtin TimeoutError
    ├── ActorError
    │   ├── ActorDiedError        the actor is gone for good
    │   └── ActorUnavailableError the actor is restarting; the call may not have run
    ├── ActorAlreadyExistsError   also a ValueError
    ├── WorkerCrashedError        the worker process died and retries ran out
    ├── TaskCancelledError        cancel() stopped the task
    ├── ObjectLostError
    │   ├── OwnerDiedError        the process that owned the object died
    │   ├── ObjectFreedError      it was freed before it was read
    │   └── ObjectReconstructionFailedError
    ├── ObjectRefStreamEndOfStreamError  a stream of refs has no more items
    ├── RuntimeEnvSetupError      a runtime_env cannot be set up here
    ├── NodeDiedError, OutOfMemoryError, LocalRayletDiedError
    ├── PendingCallsLimitExceeded
    ├── AsyncioActorExit          exit_actor() in an async actor (ActorExit, a
    │                             SystemExit, in others)
    ├── UnserializableException   stands in for a cause that cannot be pickled
    ├── ObjectStoreFullError
    └── BackendError              a backend failed to start or lost its workers

All of them pickle, so a failure that happens in a worker reaches the caller intact.
"""
from __future__ import annotations

import os
import traceback

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

__all__ = [
    "BeamletError", "TaskError", "GetTimeoutError", "ActorError", "ActorDiedError",
    "ActorUnavailableError", "ActorAlreadyExistsError", "WorkerCrashedError",
    "TaskCancelledError", "ObjectLostError", "OwnerDiedError", "ObjectStoreFullError",
    "BackendError", "AsyncioActorExit", "ActorExit", "UnserializableException",
    "ObjectFreedError", "ObjectReconstructionFailedError", "ObjectRefStreamEndOfStreamError",
    "RuntimeEnvSetupError", "NodeDiedError", "OutOfMemoryError", "RaySystemError",
    "TaskPlacementGroupRemoved", "ActorPlacementGroupRemoved", "LocalRayletDiedError",
    "PendingCallsLimitExceeded",
    # Ray's names, so that `except ray.exceptions.RayTaskError` works unchanged.
    "RayError", "RayTaskError", "RayActorError",
]


class BeamletError(Exception):
    """Base class of every error beamlet raises on its own account."""


class GetTimeoutError(BeamletError, TimeoutError):
    """`get` or `wait`-style blocking ran past its timeout."""


class ActorError(BeamletError):
    """A call could not run on its actor."""


class ActorDiedError(ActorError):
    """The actor is dead for good (killed, crashed with no restarts left, or its
    constructor raised); every later call raises this too."""


class ActorUnavailableError(ActorError):
    """The actor's process died during the call and the actor is restarting.
    The call may or may not have run; later calls go to the new instance."""


class AsyncioActorExit(BeamletError):
    """Raised by ``exit_actor()`` in an async actor (as Ray's): it unwinds the
    awaited method, after which the actor exits gracefully."""


class ActorExit(SystemExit):
    """Raised by ``exit_actor()`` in a plain or threaded actor (Ray raises a
    SystemExit too): it unwinds the method, after which the actor exits
    gracefully."""


class ActorAlreadyExistsError(BeamletError, ValueError):
    """A named actor with this name already lives in this namespace."""


class WorkerCrashedError(BeamletError):
    """The worker process running the task died, and `max_retries` ran out."""


class TaskCancelledError(BeamletError):
    """The task was cancelled with `cancel()` before it could finish."""


class ObjectLostError(BeamletError):
    """The object's value is gone and cannot be rebuilt."""


class OwnerDiedError(ObjectLostError):
    """The worker or actor that owned the object (it called `put`) has died."""


class ObjectFreedError(ObjectLostError):
    """The object was freed (no reference to it was left) before it was read."""


class ObjectReconstructionFailedError(ObjectLostError):
    """The object was lost and could not be computed again."""


class ObjectRefStreamEndOfStreamError(BeamletError):
    """A stream of refs (a generator task's) has no more items."""


class RuntimeEnvSetupError(BeamletError):
    """A task's or actor's ``runtime_env`` could not be set up (or asks for
    something this backend does not do)."""


class TaskPlacementGroupRemoved(BeamletError):
    """The placement group the task was scheduled in was removed before it ran
    (also what ``get(pg.ready())`` raises for a group removed while pending)."""


class ActorPlacementGroupRemoved(BeamletError):
    """The placement group the actor was scheduled in was removed."""


class NodeDiedError(BeamletError):
    """The node the task or actor ran on died."""


class OutOfMemoryError(BeamletError):
    """The task was killed because its machine ran out of memory."""


class LocalRayletDiedError(BeamletError):
    """The node the task was submitted from died (Ray's name; raised by no
    beamlet backend today, defined so that programs catching it import)."""


class PendingCallsLimitExceeded(BeamletError):
    """An actor has more pending calls than its ``max_pending_calls`` (Ray's
    name; defined so that programs catching it import)."""


class ObjectStoreFullError(BeamletError):
    """The object store cannot hold the object, even after spilling."""


class BackendError(BeamletError):
    """The backend failed: it could not start, or lost a component it needs."""


class TaskError(BeamletError):
    """A task raised an exception.

    `get` raises an instance of a class made per cause type that derives from
    both `TaskError` and the cause's class, so ``except ValueError`` catches a
    remote ``ValueError``. ``.cause`` is the original exception (or an
    UnserializableException standing in when it could not be pickled), ``.function_name`` names the task and
    ``.traceback_str`` holds the remote traceback.
    """

    def __init__(self, function_name: str = "", traceback_str: str = "",
                 cause: BaseException | None = None, pid: int | None = None,
                 input_failed: bool = False):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        self.input_failed = input_failed
        BeamletError.__init__(self, self._text())

    def _text(self) -> str:
        where = f" (pid={self.pid})" if self.pid else ""
        if self.input_failed:
            head = (f"{self.function_name}(){where} could not run: an input could not "
                    f"be computed, because an upstream task failed:")
        else:
            head = f"{self.function_name}(){where} failed:"
        return f"{head}\n{self.traceback_str.rstrip()}"

    def __str__(self) -> str:
        return self._text()

    def __reduce__(self):
        return (_rebuild_task_error,
                (self.function_name, self.traceback_str, _picklable_cause(self.cause),
                 self.pid, self.input_failed))

    def as_instanceof_cause(self) -> "TaskError":
        """This error as an instance of a class deriving from TaskError and the
        cause's class (the cause's own class when that cannot be subclassed)."""
        cls = _combined_class(type(self.cause)) if self.cause is not None else TaskError
        if cls is type(self):
            return self
        err = cls.__new__(cls)
        TaskError.__init__(err, self.function_name, self.traceback_str, self.cause,
                           self.pid, self.input_failed)
        return err

    @classmethod
    def from_exception(cls, exc: BaseException, function_name: str, pid: int | None = None):
        """Wrap an exception caught while running `function_name`; the traceback
        starts at the user's code, not at beamlet's frames that called it."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None and \
                tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return cls(function_name, text, exc, pid).as_instanceof_cause()


class UnserializableException(BeamletError):
    """Stands in for a remote exception that could not be pickled (the cause of
    its TaskError); its text is the original's type and message."""


_CauseStandIn = UnserializableException  # (the name older pickles refer to)


_combined_classes: dict[type, type] = {}


def _combined_class(cause_cls: type) -> type:
    """The class deriving from TaskError and `cause_cls`, made once per cause type."""
    if issubclass(cause_cls, TaskError):
        return cause_cls
    cls = _combined_classes.get(cause_cls)
    if cls is None:
        try:
            cls = type(f"TaskError({cause_cls.__name__})", (TaskError, cause_cls),
                       {"__init__": TaskError.__init__, "__str__": TaskError.__str__,
                        "__reduce__": TaskError.__reduce__, "__module__": __name__})
        except TypeError:  # a layout conflict (e.g. a C-level exception base)
            cls = TaskError
        _combined_classes[cause_cls] = cls
    return cls


def _picklable_cause(cause: BaseException | None):
    """What a TaskError pickles as its cause: the cause, if it comes back from a
    pickle; else its class and state (an exception whose ``__init__`` takes other
    arguments than its ``args`` cannot be rebuilt by calling the class, but can
    without calling it: ``except TheirClass`` still catches it); else, when even
    that does not pickle, an UnserializableException saying what it was."""
    if cause is None:
        return None
    if isinstance(cause, TaskError):
        cause = cause.cause
    import cloudpickle
    try:
        cloudpickle.loads(cloudpickle.dumps(cause))
        return cause
    except Exception:
        pass
    try:
        by_state = _ExceptionByState(cause)
        cloudpickle.loads(cloudpickle.dumps(by_state))
        return by_state
    except Exception:
        return UnserializableException(f"{type(cause).__name__}: {cause}")


class _ExceptionByState:
    """Pickles an exception as its class, ``args`` and ``__dict__``; unpickles
    as that exception, made without calling its ``__init__``."""

    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        error = self.error
        return (_rebuild_exception, (type(error), error.args, dict(getattr(error, "__dict__", {}))))


def _rebuild_exception(cls: type, args: tuple, state: dict) -> BaseException:
    error = cls.__new__(cls, *args)
    error.args = args
    if state:
        error.__dict__.update(state)
    return error


def _rebuild_task_error(function_name, traceback_str, cause, pid, input_failed):
    return TaskError(function_name, traceback_str, cause, pid, input_failed).as_instanceof_cause()


# Exceptions that must reach the caller as they are, not wrapped in TaskError.
SYSTEM_ERRORS = (ActorError, WorkerCrashedError, TaskCancelledError, ObjectLostError,
                 ObjectStoreFullError, BackendError)


def is_system_error(exc: BaseException) -> bool:
    """True for errors raised by the system rather than by user code."""
    return isinstance(exc, SYSTEM_ERRORS) and not isinstance(exc, TaskError)



# Ray's names for the same errors: programs written for Ray catch these.
RayError = BeamletError
RayTaskError = TaskError
RayActorError = ActorError
RaySystemError = BackendError

"""How a task's exception reaches the caller when it is awkward to move: one
that cannot be pickled arrives with an UnserializableException (a beamlet
error) as its cause; one whose class cannot be rebuilt from its ``args`` is
still caught by ``except TheirClass``; tracebacks of code pickled by value
name the real file and line (not cloudpickle's ``<dynamic-code>``)."""
from __future__ import annotations

import inspect
import threading

import pytest

import beamlet as ray

T = 30


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArguments(Exception):
    """Its __init__ takes two arguments, but its args hold one string."""

    def __init__(self, code, reason):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def test_an_unpicklable_exception_arrives_with_a_beamlet_error_as_cause(backend):
    @ray.remote
    def fail():
        raise Unpicklable("no pickling")

    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(fail.remote(), timeout=T)
    cause = info.value.cause
    assert isinstance(cause, ray.exceptions.UnserializableException)
    assert isinstance(cause, ray.exceptions.BeamletError)
    assert "Unpicklable: no pickling" in str(cause) and "no pickling" in str(info.value)


def test_an_exception_not_rebuildable_from_its_args_is_still_caught_by_its_class(backend):
    @ray.remote
    def fail():
        raise TwoArguments(404, "missing")

    with pytest.raises(TwoArguments) as info:
        ray.get(fail.remote(), timeout=T)
    assert isinstance(info.value, ray.exceptions.RayTaskError)
    cause = info.value.cause
    assert type(cause) is TwoArguments and (cause.code, cause.reason) == (404, "missing")
    assert cause.args == ("404: missing",)


def test_tracebacks_name_the_real_file_and_line(backend):
    @ray.remote
    def fail():
        raise ValueError("where")

    line = inspect.getsourcelines(fail.__wrapped__)[1] + 2
    with pytest.raises(ValueError) as info:
        ray.get(fail.remote(), timeout=T)
    text = info.value.traceback_str
    assert "<dynamic-code>" not in text
    assert f'File "{__file__}", line {line}, in fail' in text
    assert 'raise ValueError("where")' in text  # (the source line, read from the file)

"""`get` and `wait` on lists, as Ray's behave: `get` of a list raises the first
error that arrives without waiting for the other refs (a failed task, an actor
that died), and `wait([])` returns ``([], [])``. Every blocking call has a
timeout; nothing here measures time."""
from __future__ import annotations

import threading

import pytest

import beamlet as ray

T = 30  # seconds: far above what any get here takes when it works


@ray.remote
def fail():
    raise ValueError("boom")


@ray.remote
class Gate:
    """Holds calls until `open` (an actor with threads so that `open` gets in)."""

    def __init__(self):
        self.event = threading.Event()

    def hold(self):
        self.event.wait(T)
        return "held"

    def open(self):
        self.event.set()


def test_get_of_a_list_raises_the_first_error_without_waiting(backend):
    backend.require("parallel")
    gate = Gate.options(max_concurrency=2).remote()
    held = gate.hold.remote()
    with pytest.raises(ValueError, match="boom"):
        ray.get([held, fail.remote()], timeout=T)  # held never finishes before the gate opens
    with pytest.raises(ValueError, match="boom"):
        ray.get([fail.remote(), held], timeout=T)
    gate.open.remote()
    assert ray.get(held, timeout=T) == "held"


def test_get_of_a_list_raises_at_once_for_a_dead_actor(backend):
    backend.require("parallel")
    gate = Gate.options(max_concurrency=2).remote()
    other = Gate.options(max_concurrency=2).remote()
    pending = other.hold.remote()
    doomed = gate.hold.remote()
    ray.kill(gate)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get([pending, doomed], timeout=T)
    other.open.remote()
    assert ray.get(pending, timeout=T) == "held"


def test_get_of_a_list_inside_a_task_fails_fast(backend):
    backend.require("parallel")
    gate = Gate.options(max_concurrency=2).remote()

    @ray.remote
    def outer(refs):
        try:
            ray.get(refs, timeout=T)
        except ValueError as err:
            return f"caught {err}"
        return "no error"

    held = gate.hold.remote()
    assert "boom" in ray.get(outer.remote([held, fail.remote()]), timeout=T)
    gate.open.remote()
    assert ray.get(held, timeout=T) == "held"


def test_get_of_a_list_without_errors_returns_every_value(backend):
    refs = [ray.put(i) for i in range(50)]
    assert ray.get(refs, timeout=T) == list(range(50))
    assert ray.get([], timeout=T) == []


def test_wait_on_an_empty_list_returns_two_empty_lists(backend):
    assert ray.wait([]) == ([], [])
    assert ray.wait([], num_returns=1, timeout=0) == ([], [])
    with pytest.raises(ValueError):
        ray.wait([ray.put(1)], num_returns=2)  # more than there are: still an error

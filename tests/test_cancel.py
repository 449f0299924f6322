"""``cancel(ref, recursive=True)`` (the default, as in Ray) also cancels the
tasks the cancelled task submitted that have not finished, with or without
``force``; ``recursive=False`` leaves them running. Tasks run in parallel here
(the inprocess backend runs each inside ``.remote()``: nothing is left to cancel)."""
from __future__ import annotations

import threading

import pytest

import beamlet as ray

T = 30


@ray.remote
class Registry:
    """Where a parent task leaves its children's refs (in a list: they stay refs)."""

    def __init__(self):
        self.refs = None
        self.ready = threading.Event()
        self.gate = threading.Event()

    def put(self, refs):
        self.refs = refs
        self.ready.set()

    def take(self):
        self.ready.wait(T)
        return self.refs

    def wait_gate(self):
        return self.gate.wait(T)

    def open_gate(self):
        self.gate.set()


@ray.remote(num_cpus=0.5)
def child(registry):
    # Holds its CPU until the gate opens (or it is cancelled).
    return ray.get(registry.wait_gate.remote(), timeout=T)


@ray.remote(num_cpus=0.5)
def parent(registry, n):
    refs = [child.remote(registry) for _ in range(n)]
    registry.put.remote(refs)
    return sum(ray.get(refs, timeout=T))


def _start(n=2):
    registry = Registry.options(max_concurrency=8).remote()
    top = parent.remote(registry, n)
    children = ray.get(registry.take.remote(), timeout=T)
    assert len(children) == n
    return registry, top, children


@pytest.mark.parametrize("force", [False, True], ids=["interrupt", "force"])
def test_cancel_cancels_the_children_of_the_task(backend, force):
    backend.require("parallel")
    _, top, children = _start()
    ray.cancel(top, force=force)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(top, timeout=T)
    # Under Ray's ownership model a killed task's children's results die with it.
    lost = ray.exceptions.OwnerDiedError if force and backend.owner_fate_sharing else None
    for ref in children:
        with pytest.raises(lost or ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=T)
    # Their CPUs are free again: tasks needing all of them run.
    assert ray.get([child.options(num_cpus=1).remote(_opened()) for _ in range(2)],
                   timeout=T) == [True, True]


def _opened():
    registry = Registry.remote()
    # (Waited for: a child's wait_gate, from another caller, could otherwise
    # reach the one-thread actor first and hold it; no backend orders calls
    # across callers.)
    ray.get(registry.open_gate.remote(), timeout=T)
    return registry


def test_cancel_without_recursive_leaves_the_children_running(backend):
    backend.require("parallel")
    registry, top, children = _start()
    ray.cancel(top, recursive=False)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(top, timeout=T)
    registry.open_gate.remote()
    assert ray.get(children, timeout=T) == [True, True]


def test_cancel_a_finished_task_does_nothing(backend):
    registry = _opened()
    ref = child.remote(registry)
    assert ray.get(ref, timeout=T) is True
    ray.cancel(ref)
    ray.cancel(ref, force=True, recursive=False)
    assert ray.get(ref, timeout=T) is True

"""``cancel(ref, recursive=True)`` (the default, as in Ray) also cancels the
tasks the cancelled task submitted that have not finished, with or without
``force``, and their own; ``recursive=False`` leaves them running. So for an
actor call (Ray 2.60's ``ray.cancel``: its children are cancelled too; only
``force=False`` is allowed). Tasks run in parallel here (the inprocess backend
runs each inside ``.remote()``: nothing is left to cancel)."""
from __future__ import annotations

import asyncio
import threading

import pytest

import beamlet as ray

T = 30


@ray.remote
class Registry:
    """Where a parent task leaves its children's refs (in a list: they stay
    refs), under a key (one per level of a tree of tasks)."""

    def __init__(self):
        self.refs = {}
        self.ready = threading.Condition()
        self.gate = threading.Event()

    def put(self, refs, key=None):
        with self.ready:
            self.refs[key] = refs
            self.ready.notify_all()

    def take(self, key=None):
        with self.ready:
            self.ready.wait_for(lambda: key in self.refs, T)
            return self.refs.get(key)

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


# -- actor calls ------------------------------------------------------------------------

def _submit(registry, grandchild: bool):
    """(In an actor call.) Submit a task (one that submits a grandchild, with
    `grandchild`) and leave its ref in the registry (key "call")."""
    ref = parent.remote(registry, 1) if grandchild else child.remote(registry)
    registry.put.remote([ref], "call")
    return ref


@ray.remote(num_cpus=0)
class Spawner:
    """An actor whose call submits a task and waits for it."""

    def spawn(self, registry, grandchild):
        return ray.get(_submit(registry, grandchild), timeout=T)


@ray.remote(num_cpus=0, max_concurrency=2)
class ThreadedSpawner:
    """Spawner's twin whose calls run on a pool of threads (where no backend
    interrupts a call: it ends as its wait for the cancelled child fails)."""

    def spawn(self, registry, grandchild):
        return ray.get(_submit(registry, grandchild), timeout=T)


@ray.remote(num_cpus=0)
class AsyncSpawner:
    """Spawner's async twin: its calls run as coroutines on the actor's loop."""

    async def spawn(self, registry, grandchild):
        return await asyncio.wait_for(_submit(registry, grandchild), T)


_SPAWNERS = {"sync": Spawner, "threaded": ThreadedSpawner, "async": AsyncSpawner}
_NAMES = {"sync": "Spawner", "threaded": "ThreadedSpawner", "async": "AsyncSpawner"}


def _spawn(kind: str, grandchild: bool = False):
    """A call of a new actor that waits for its child (and that for its
    grandchild), once the child (and grandchild) were submitted: (registry,
    actor, the call, the child, [the grandchild])."""
    registry = Registry.options(max_concurrency=8).remote()
    actor = _SPAWNERS[kind].remote()
    call = actor.spawn.remote(registry, grandchild)
    (child_ref,) = ray.get(registry.take.remote("call"), timeout=T)
    grandchildren = ray.get(registry.take.remote(), timeout=T) if grandchild else []
    return registry, actor, call, child_ref, grandchildren


def _cancelled_in_state_api(backend, call: str, *nested: str) -> None:
    """(Where the state API works.) The call and the nested tasks named end
    cancelled (Ray's FAILED, TASK_CANCELLED). Without `prompt_state` (Ray) the
    nested tasks are not checked: their ends are told by the workers that ran
    them, and one that Ray cancelled before it started has none to tell it
    (it stays PENDING_NODE_ASSIGNMENT there)."""
    if not backend.task_events:
        return
    from beamlet.util import state
    for name in (call, *nested) if backend.prompt_state else (call,):
        rows = state.list_tasks(filters=[("name", "=", name)])
        assert rows and {(r.state, r.error_type) for r in rows} == \
            {("FAILED", "TASK_CANCELLED")}, rows


@pytest.mark.parametrize("kind", ["sync", "threaded", "async"])
def test_cancel_of_an_actor_call_cancels_the_task_it_submitted(backend, kind):
    backend.require("parallel")
    _, actor, call, child_ref, _ = _spawn(kind)
    ray.cancel(call)  # (recursive=True, the default)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(call, timeout=T)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(child_ref, timeout=T)
    _cancelled_in_state_api(backend, _NAMES[kind] + ".spawn", "child")
    # The actor serves on, and its next call's child is not cancelled.
    assert ray.get(actor.spawn.remote(_opened(), False), timeout=T) is True


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cancel_of_an_actor_call_without_recursive_leaves_its_task_running(backend, kind):
    # (No threaded variant: no backend interrupts a call running on an actor's
    # thread pool, so it would wait on for its child; Ray only flags it.)
    backend.require("parallel")
    registry, actor, call, child_ref, _ = _spawn(kind)
    ray.cancel(call, recursive=False)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(call, timeout=T)
    registry.open_gate.remote()
    assert ray.get(child_ref, timeout=T) is True


def test_cancel_of_an_actor_call_cancels_its_grandchild(backend):
    backend.require("parallel")
    _, actor, call, child_ref, (grandchild,) = _spawn("sync", grandchild=True)
    ray.cancel(call)
    for ref in (call, child_ref, grandchild):
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=T)
    _cancelled_in_state_api(backend, "Spawner.spawn", "parent", "child")


def test_force_cancel_of_a_running_actor_call_is_refused(backend):
    # Ray 2.60: "Only force=False is allowed for an Actor Task. Otherwise, it
    # raises ValueError". The call is not cancelled by the refused attempt.
    backend.require("parallel")
    registry, actor, call, child_ref, _ = _spawn("sync")
    with pytest.raises(ValueError, match="force"):
        ray.cancel(call, force=True)
    registry.open_gate.remote()
    assert ray.get(call, timeout=T) is True
    assert ray.get(child_ref, timeout=T) is True

"""Concurrency groups (Ray's ``concurrency_groups=`` and ``@method(concurrency_group=)``):
each group of an actor has its own limit on the calls running at once; methods
without a group share the default group (``max_concurrency``); a call's
``.options(concurrency_group=)`` moves it to another group. For threaded and
async actors. Limits are shown with counters and events inside the actor."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

import beamlet as ray

T = 30


def _until(check, what: str):
    """Poll `check()` (a ref-returning call's value) until it is true; fail after T s."""
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


@ray.remote(concurrency_groups={"io": 2, "compute": 4, "admin": 1})
class Threaded:
    def __init__(self):
        self.lock = threading.Lock()
        self.inside = {"io": 0, "compute": 0, "default": 0}
        self.peak = {"io": 0, "compute": 0, "default": 0}
        self.gate = threading.Event()

    def _hold(self, group):
        with self.lock:
            self.inside[group] += 1
            self.peak[group] = max(self.peak[group], self.inside[group])
        try:
            return self.gate.wait(T)
        finally:
            with self.lock:
                self.inside[group] -= 1

    @ray.method(concurrency_group="io")
    def io(self):
        return self._hold("io")

    @ray.method(concurrency_group="compute")
    def compute(self):
        return self._hold("compute")

    @ray.method(concurrency_group="io")
    def io_quick(self):
        return "done"

    def default(self):
        return self._hold("default")

    @ray.method(concurrency_group="admin")
    def stats(self):
        with self.lock:
            return dict(self.inside), dict(self.peak)

    @ray.method(concurrency_group="admin")
    def release(self):
        self.gate.set()


@ray.remote(concurrency_groups={"io": 2, "compute": 4, "admin": 1})
class Async:
    def __init__(self):
        self.inside = {"io": 0, "compute": 0, "default": 0}
        self.peak = {"io": 0, "compute": 0, "default": 0}
        self.gate = None

    async def _hold(self, group):
        if self.gate is None:
            self.gate = asyncio.Event()
        self.inside[group] += 1
        self.peak[group] = max(self.peak[group], self.inside[group])
        try:
            await asyncio.wait_for(self.gate.wait(), T)
            return True
        finally:
            self.inside[group] -= 1

    @ray.method(concurrency_group="io")
    async def io(self):
        return await self._hold("io")

    @ray.method(concurrency_group="compute")
    async def compute(self):
        return await self._hold("compute")

    @ray.method(concurrency_group="io")
    async def io_quick(self):
        return "done"

    async def default(self):
        return await self._hold("default")

    @ray.method(concurrency_group="admin")
    async def stats(self):
        return dict(self.inside), dict(self.peak)

    @ray.method(concurrency_group="admin")
    async def release(self):
        if self.gate is None:
            self.gate = asyncio.Event()
        self.gate.set()


@pytest.mark.parametrize("cls", [Threaded, Async], ids=["threaded", "async"])
def test_each_group_has_its_own_limit(backend, cls):
    backend.require("parallel", "concurrency_groups")
    actor = cls.remote()
    io = [actor.io.remote() for _ in range(5)]
    compute = [actor.compute.remote() for _ in range(6)]
    default = [actor.default.remote() for _ in range(3)]
    # Every group fills up to its limit at once (the default one to
    # max_concurrency: 1 threaded, 1000 async), and the admin group (stats)
    # still answers while they are full.
    full = {"io": 2, "compute": 4, "default": 1 if cls is Threaded else 3}
    _until(lambda: ray.get(actor.stats.remote(), timeout=T)[0] == full,
           f"the groups to fill: {full}")
    # A call moved to another group runs although its own group is full.
    assert ray.get(actor.io_quick.options(concurrency_group="admin").remote(),
                   timeout=T) == "done"
    waiting = actor.io_quick.remote()  # behind the 2 io calls holding the group
    assert ray.get(actor.release.remote(), timeout=T) is None
    assert ray.get(io + compute + default, timeout=T) == [True] * 14
    assert ray.get(waiting, timeout=T) == "done"
    assert ray.get(actor.stats.remote(), timeout=T)[1] == full


def test_default_group_keeps_max_concurrency(backend):
    backend.require("parallel", "concurrency_groups")
    actor = Threaded.options(max_concurrency=2).remote()
    calls = [actor.default.remote() for _ in range(4)]
    _until(lambda: ray.get(actor.stats.remote(), timeout=T)[0]["default"] == 2,
           "the default group to hold 2 calls")
    ray.get(actor.release.remote(), timeout=T)
    assert ray.get(calls, timeout=T) == [True] * 4
    assert ray.get(actor.stats.remote(), timeout=T)[1]["default"] == 2


def test_groups_run_calls_on_every_backend(backend):
    if not backend.concurrency_groups:
        with pytest.raises(ValueError, match="does not support concurrency_groups"):
            Threaded.remote()
        return
    actor = Threaded.remote()
    ray.get(actor.release.remote(), timeout=T)  # (nothing waits on the gate)
    assert ray.get([actor.io.remote(), actor.compute.remote(), actor.default.remote(),
                    actor.io_quick.remote()], timeout=T) == [True, True, True, "done"]
    assert ray.get(actor.io_quick.options(concurrency_group="compute").remote(),
                   timeout=T) == "done"


def test_a_call_to_a_group_the_actor_lacks_fails(backend):
    backend.require("concurrency_groups")
    actor = Threaded.remote()
    with pytest.raises(ValueError, match="'nope'"):
        ray.get(actor.stats.options(concurrency_group="nope").remote(), timeout=T)
    assert ray.get(actor.io_quick.remote(), timeout=T) == "done"  # still serving


def test_a_method_in_an_undefined_group_is_refused_at_creation(backend):
    @ray.remote
    class Lost:
        @ray.method(concurrency_group="io")
        def f(self):
            return 1

    with pytest.raises(ValueError, match="concurrency group 'io'"):
        Lost.remote()
    backend.require("concurrency_groups")
    assert ray.get(Lost.options(concurrency_groups={"io": 1}).remote().f.remote(),
                   timeout=T) == 1


def test_bad_concurrency_groups_are_refused():
    for groups in ({"io": 0}, {"": 1}, ["io"], {"io": 1.5}):
        with pytest.raises((ValueError, TypeError), match="concurrency"):
            Threaded.options(concurrency_groups=groups)
    with pytest.raises(TypeError, match="concurrency_group"):
        ray.method(concurrency_group=3)

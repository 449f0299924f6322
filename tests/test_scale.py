"""Work at scale: many tasks, long ref lists, many actors, on the backends of
``SCALE_BACKENDS`` (conftest.py: those whose tasks beamlet schedules, unless
``BEAMLET_TEST_SCALE_BACKENDS`` names others).

These check behaviour (right results, right order, nothing lost or repeated,
nothing left running), not speed: the cost per task as the work grows is
measured in benchmarks/scaling.py.
"""
from __future__ import annotations

import gc

import pytest

import beamlet as ray
from beamlet.core import runtime as _runtime
from conftest import SCALE_BACKENDS
from procs import eventually

# pytest-timeout's guard as long as the tests' own longest wait: beside other
# tests (pytest-xdist's workers share the machine's cores) work at this scale
# takes several times as long as alone, and a test that hangs still fails.
pytestmark = pytest.mark.timeout(660)

#: (Overrides the semantic suite's backends for a test that uses `backend`.)
on_scale_backends = pytest.mark.parametrize("backend_name", SCALE_BACKENDS, indirect=True)


@ray.remote
def ident(i):
    return i


@ray.remote
def total(refs):
    return sum(ray.get(refs))


@on_scale_backends
def test_100k_tasks_complete_with_right_results(backend):
    n = 100_000
    refs = [ident.remote(i) for i in range(n)]
    values = ray.get(refs, timeout=600)
    assert values == list(range(n))


@on_scale_backends
def test_get_of_10k_refs_returns_in_input_order(backend):
    refs = [ident.remote(i) for i in range(10_000)]
    refs.reverse()  # asked in another order than submitted
    assert ray.get(refs, timeout=300) == list(range(9_999, -1, -1))


@on_scale_backends
def test_wait_loop_returns_each_ready_ref_once(backend):
    n = 5_000
    refs = [ident.remote(i) for i in range(n)]
    seen: list = []
    pending = refs
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(100, len(pending)), timeout=120)
        assert ready, "wait() returned nothing within its timeout"
        assert len(ready) <= 100
        seen.extend(ready)
    assert len(seen) == n and len(set(seen)) == n
    assert sorted(ray.get(seen, timeout=120)) == list(range(n))


@on_scale_backends
def test_a_task_taking_10k_refs_in_a_list(backend):
    refs = [ident.remote(i) for i in range(10_000)]
    assert ray.get(total.remote(refs), timeout=300) == sum(range(10_000))


@on_scale_backends
def test_10k_puts_then_one_get(backend):
    refs = [ray.put(i) for i in range(10_000)]
    assert ray.get(refs, timeout=120) == list(range(10_000))


@on_scale_backends
def test_a_10k_long_dependency_chain(backend):
    @ray.remote
    def inc(x):
        return x + 1

    ref = ray.put(0)
    for _ in range(10_000):
        ref = inc.remote(ref)
    assert ray.get(ref, timeout=300) == 10_000


@on_scale_backends
def test_100k_generator_items_with_bounded_memory(backend):
    """100,000 items of a generator task stream through with the store holding
    a bounded number of objects and the driver a bounded number of references
    (the producer is held back, consumed items are freed), and nothing is left
    afterwards."""
    backend.require("streaming_generators")

    @ray.remote(_generator_backpressure_num_objects=1000)
    def numbers(n):
        yield from range(n)

    rt = _runtime.current()
    store = rt.backend.object_store
    before = store.stats()["num_objects"]
    most_objects = most_refs = total = 0
    gen = numbers.remote(100_000)
    for i, ref in enumerate(gen):
        total += ray.get(ref, timeout=120)
        if i % 2000 == 0:
            most_objects = max(most_objects, store.stats()["num_objects"])
            most_refs = max(most_refs, len(rt.refs))
    assert total == sum(range(100_000))
    # 1000 held-back items, plus at most about as many freed lazily by the backend.
    assert most_objects <= 3000, f"the store held {most_objects} objects"
    assert most_refs <= 20, f"the driver held {most_refs} references"
    del gen, ref
    eventually(lambda: store.stats()["num_objects"] <= before, "freeing the consumed items", 60)


@ray.remote(num_cpus=0)
class Echo:
    def __init__(self, index):
        self.index = index
        self.calls = 0

    def call(self):
        self.calls += 1
        return self.index, self.calls


def test_1000_actors_all_answer_and_all_processes_go(start):
    import procs

    backend = start()
    actors = [Echo.remote(i) for i in range(1000)]
    refs = [a.call.remote() for a in actors for _ in range(3)]
    answers = ray.get(refs, timeout=600)
    assert answers == [(i, c) for i in range(1000) for c in (1, 2, 3)]
    pids = {w.pid for w in list(backend.scheduler.workers.values()) if w.pid}
    assert len(pids) >= 1000, "each actor runs in a process of its own"
    # The `start` fixture checks that every one of them is gone after shutdown().
    del actors, refs
    gc.collect()
    fp = procs.footprint(backend)
    ray.shutdown()
    procs.assert_all_gone(fp, timeout=60)

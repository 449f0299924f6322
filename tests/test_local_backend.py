"""The ``local`` backend with real processes: zero-copy shared memory, freeing,
spilling, crashes and retries, cancellation, nested tasks, resources, worker
output, and cleanup after shutdown, interpreter exit, SIGKILL and Ctrl-C.

Every test starts its own runtime through the ``start`` fixture, which checks
at the end that the runtime's processes, shared-memory segments and temp dir
are gone after ``shutdown()``. Crashes are real (``os._exit``, SIGKILL of the
worker's own pid, a segfault); tasks count their attempts with files in the
test's tmp dir. Tests never assert timings: waits poll with deadlines.
"""
from __future__ import annotations

import gc
import mmap
import os
import re
import signal
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.core import runtime as _runtime

import procs
from conftest import _dask_cluster

SUBPROCESS_TIMEOUT = 60
MB = 1_000_000


# `start` (conftest.py): a local backend, checked for leftovers after each test.

def _store():
    return _runtime.current().backend.object_store


def _base_of(array):
    """The object at the end of a numpy array's base chain (through memoryviews)."""
    obj = array
    for _ in range(20):
        nxt = getattr(obj, "base", None)
        if nxt is None and isinstance(obj, memoryview):
            nxt = obj.obj
        if nxt is None:
            return obj
        obj = nxt
    return obj


# -- remote functions shared by the tests -------------------------------------------
@ray.remote
def describe(x):
    return procs.describe_array(x)


@ray.remote
def describe_first(box):
    return procs.describe_array(ray.get(box[0]))


@ray.remote
def make_array(n, value):
    return np.full(n, value, dtype=np.float64)


@ray.remote
def total(x):
    return float(np.asarray(x).sum())


@ray.remote
def total_of_first(box):
    return float(ray.get(box[0]).sum())


@ray.remote
def add(a, b):
    return a + b


def _attempt(directory):
    """Record an attempt; returns how many attempts came before this one."""
    return procs.touch_new(directory, "a")


# ====================================================================================
# zero-copy
# ====================================================================================
def test_get_of_put_array_is_readonly_view_of_segment(start):
    backend = start()
    a = np.arange(1_000_000, dtype=np.float64)
    ref = ray.put(a)
    x = ray.get(ref)
    np.testing.assert_array_equal(x, a)
    assert not x.flags.writeable
    with pytest.raises(ValueError):
        x[0] = 1.0
    seg = procs.shm_mapping_of(x)
    assert seg is not None, "the array's data is not in a /dev/shm/beamlet-* mapping"
    assert os.path.basename(seg).startswith(f"beamlet-{backend.session}-")
    assert os.path.basename(seg) in procs.segments(backend.session)
    assert isinstance(_base_of(x), mmap.mmap)
    # A second get maps the same segment again: no copy either.
    y = ray.get(ref)
    assert procs.shm_mapping_of(y) == seg


def test_small_array_from_get_is_readonly_and_a_snapshot(start):
    start()
    a = np.arange(10)
    ref = ray.put(a)
    a[0] = 99  # put() took a copy: changing the array afterwards changes nothing
    x = ray.get(ref)
    assert list(x) == list(range(10))
    assert not x.flags.writeable
    with pytest.raises(ValueError):
        x[1] = 5
    assert ray.get(ref)[1] == 1


@ray.remote
def first_item(v):
    return int(v[0])


def test_small_array_argument_is_a_snapshot_taken_at_remote(start, tmp_path):
    # The task waits in the queue (the only slot is taken) while the caller changes
    # the array it passed: the task must see the value as it was at .remote().
    start(resources={"slot": 1})
    d = str(tmp_path)
    blocker = sleeper.options(resources={"slot": 1}).remote(d)
    _started(d)
    a = np.arange(10)
    out = first_item.options(resources={"slot": 1}).remote(a)
    a[0] = 99
    ray.cancel(blocker, force=True)
    assert ray.get(out, timeout=30) == 0


def test_large_task_result_is_readonly_view_of_segment(start):
    backend = start()
    x = ray.get(make_array.remote(1_000_000, 3.0), timeout=30)
    assert x.shape == (1_000_000,) and (x == 3.0).all()
    assert not x.flags.writeable
    seg = procs.shm_mapping_of(x)
    assert seg is not None and os.path.basename(seg).startswith(f"beamlet-{backend.session}-")


def test_large_task_argument_is_readonly_view_in_worker(start):
    backend = start()
    a = np.ones(1_000_000, dtype=np.float64)
    prefix = f"/dev/shm/beamlet-{backend.session}-"
    # Passed by value (put by the runtime), passed by ref, passed inside a list,
    # and produced by another task (a segment a worker wrote).
    seen = ray.get([describe.remote(a), describe.remote(ray.put(a)),
                    describe_first.remote([ray.put(a)]),
                    describe.remote(make_array.remote(1_000_000, 1.0))], timeout=30)
    for info in seen:
        assert info["pid"] != os.getpid()
        assert info["sum"] == 1_000_000.0
        assert info["writeable"] is False, info
        assert info["segment"] is not None and info["segment"].startswith(prefix), info


# ====================================================================================
# memory freed after refs drop
# ====================================================================================
def test_memory_freed_after_refs_drop(start):
    backend = start(object_store_memory=60 * MB)
    store = backend.object_store
    base = store.stats()["shm_bytes"]
    refs = [ray.put(np.full(MB, i, dtype=np.float64)) for i in range(5)]  # 8 MB each
    assert store.stats()["shm_bytes"] >= base + 5 * 8 * MB
    assert len(procs.segments(backend.session)) >= 5
    procs.assert_store_matches_shm(backend)
    del refs
    gc.collect()
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == base, 10), store.stats()
    # Freed segments may stay warm in the pool, but it is bounded (a quarter of the store).
    assert store.stats()["pool_bytes"] <= store.capacity // 4
    procs.assert_store_matches_shm(backend)
    # Objects made by tasks are freed too.
    refs = [make_array.remote(MB, float(i)) for i in range(3)]
    assert [float(x[0]) for x in ray.get(refs, timeout=30)] == [0.0, 1.0, 2.0]
    del refs
    gc.collect()
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == base, 10), store.stats()
    procs.assert_store_matches_shm(backend)


def test_object_held_inside_another_object_is_kept_then_freed(start):
    backend = start()
    store = backend.object_store
    base = store.stats()["shm_bytes"]
    inner = ray.put(np.full(MB, 5.0))
    outer = ray.put([inner])
    size = store.stats()["shm_bytes"] - base
    assert size >= 8 * MB
    del inner
    gc.collect()
    assert store.stats()["shm_bytes"] == base + size  # the list still holds it
    [inner_again] = ray.get(outer)
    assert float(ray.get(inner_again)[0]) == 5.0
    assert ray.get(total_of_first.remote(ray.get(outer)), timeout=30) == 5.0 * MB
    del inner_again
    del outer
    gc.collect()
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == base, 10), store.stats()


def test_object_borrowed_by_a_task_is_kept_then_freed(start):
    backend = start()
    store = backend.object_store
    base = store.stats()["shm_bytes"]
    ref = ray.put(np.full(MB, 2.0))
    out = total_of_first.remote([ref])
    del ref  # the task still holds it through the list
    gc.collect()
    assert ray.get(out, timeout=30) == 2.0 * MB
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == base, 10), store.stats()


@ray.remote
class Holder:
    def hold(self, box):
        self.ref = box[0]
        return True

    def total(self):
        return float(ray.get(self.ref).sum())

    def drop(self):
        del self.ref
        gc.collect()
        return True


def test_object_held_by_an_actor_is_kept_then_freed(start):
    backend = start()
    store = backend.object_store
    base = store.stats()["shm_bytes"]
    holder = Holder.remote()
    ref = ray.put(np.full(MB, 4.0))
    size = store.stats()["shm_bytes"] - base
    assert ray.get(holder.hold.remote([ref]), timeout=30)
    del ref
    gc.collect()
    assert store.stats()["shm_bytes"] == base + size  # the actor holds it
    assert ray.get(holder.total.remote(), timeout=30) == 4.0 * MB
    assert ray.get(holder.drop.remote(), timeout=30)
    # Freed while the actor lives on (not only when it exits).
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == base, 10), store.stats()
    assert ray.get(holder.hold.remote([None]), timeout=30)


def test_live_view_keeps_its_data_after_ref_dropped(start):
    backend = start()
    store = backend.object_store
    a = np.full(2 * MB, 1.0)
    ref = ray.put(a)
    x = ray.get(ref)
    del ref
    gc.collect()
    # Same size: the pool would hand A's segment to B if A were freed under the view.
    refs_b = [ray.put(np.full(2 * MB, 2.0)) for _ in range(3)]
    assert (x == 1.0).all()
    assert all((ray.get(r) == 2.0).all() for r in refs_b)
    base = store.stats()["shm_bytes"]
    del x
    gc.collect()
    # Once the view is gone, A is freed.
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] < base, 10), store.stats()
    procs.assert_store_matches_shm(backend)



# A ref returned inside a task's result is freed once the caller drops it (the
# worker reports its released borrow without waiting for a next message).
@ray.remote
def passthrough(box):
    return box


def test_ref_returned_inside_a_task_result_is_freed_once_dropped(start):
    backend = start()
    store = backend.object_store
    base = store.stats()["shm_bytes"]
    ref = ray.put(np.full(MB, 3.0))
    out = passthrough.remote([ref])
    [again] = ray.get(out, timeout=30)
    assert again == ref
    del ref, again, out
    gc.collect()
    # Nothing refers to the array any more: its segment must be freed.
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == base, 10), store.stats()


# A large result whose ref was dropped before it arrived is never counted as
# freed: the store's byte count stays exact and its cap keeps working.
@ray.remote
def slow_array(n, value, seconds):
    time.sleep(seconds)
    return np.full(n, value, dtype=np.float64)


def test_dropped_large_results_keep_the_store_within_its_capacity(start):
    capacity = 40 * MB
    backend = start(object_store_memory=capacity)
    store = backend.object_store
    for i in range(6):
        slow_array.remote(MB, float(i), 0.5)  # fire and forget: the ref is dropped at once
    # Wait until all six have finished and their results were discarded.
    assert procs.wait_until(lambda: not backend.scheduler._tasks, 30)
    assert store.stats()["num_objects"] == 0
    assert store.stats()["shm_bytes"] >= 0, store.stats()
    # 64 MB of live objects in a 40 MB store: some must spill to disk.
    refs = [ray.put(np.full(MB, float(i))) for i in range(8)]
    assert procs.segment_bytes(backend.session) <= capacity, store.stats()
    assert store.stats()["spilled_bytes"] > 0, store.stats()
    del refs


# A handle taken with get_actor() just after the last handle was dropped keeps the
# actor alive (the deferred release looks at the count again).
@ray.remote
class Named:
    def ping(self):
        return "pong"


def test_handle_from_get_actor_right_after_the_last_handle_dropped_stays_usable(start):
    backend = start()
    for i in range(10):
        handle = Named.options(name=f"named-{i}").remote()
        assert ray.get(handle.ping.remote(), timeout=30) == "pong"
        del handle
        try:
            again = ray.get_actor(f"named-{i}")
        except ValueError:
            continue  # already gone: fine
        # The queued release has been dealt with once the queue is empty.
        assert procs.wait_until(lambda: not backend.node._released, 10)
        assert ray.get(again.ping.remote(), timeout=30) == "pong"
        assert ray.get(again.ping.remote(), timeout=30) == "pong"


# ====================================================================================
# spilling
# ====================================================================================
def test_spilling_under_small_store_keeps_values(start):
    backend = start(object_store_memory=30 * MB)
    store = backend.object_store
    n = 10 * MB // 8
    refs = []
    max_spilled = 0
    for i in range(5):
        refs.append(ray.put(np.full(n, float(i))))
        stats = store.stats()
        max_spilled = max(max_spilled, stats["spilled_bytes"])
        assert stats["shm_bytes"] <= store.capacity
    assert max_spilled > 0
    for i in range(5):
        x = ray.get(refs[i])
        assert x.shape == (n,) and (x == i).all()
        del x
    values = ray.get(refs)  # all five at once: more than the store holds
    assert all((values[i] == i).all() for i in range(5))
    del values
    # A worker reads spilled objects too.
    assert ray.get([total.remote(r) for r in refs], timeout=30) == [float(i * n) for i in range(5)]
    del refs
    gc.collect()
    assert procs.wait_until(lambda: store.stats()["shm_bytes"] == 0
                            and store.stats()["spilled_bytes"] == 0, 10), store.stats()
    spill_dir = os.path.join(backend.temp_dir, "spill")
    assert not os.path.isdir(spill_dir) or not os.listdir(spill_dir)


def test_get_while_results_spill_concurrently(start):
    # Task results arrive (and spill older objects, on the I/O thread) while the
    # driver reads older objects back: every read sees its value, none is "lost".
    # (A stress test: before the fix it failed in about two runs out of three.)
    start(object_store_memory=16 * MB)
    refs = []
    for i in range(100):
        refs.append(make_array.remote(MB // 2, float(i)))  # 4 MB each
        for j in range(max(0, i - 4), i - 1):
            assert float(ray.get(refs[j], timeout=30)[0]) == j


@ray.remote
class Reader:
    def wait_for(self, d):
        procs.touch_new(d, "s")
        return procs.wait_until(lambda: os.path.exists(os.path.join(d, "gate")), 30)

    def first(self, x):
        return float(x[0])


def test_argument_shipped_to_a_busy_actor_survives_spilling(start, tmp_path):
    # A call to a live actor is sent to it (with its arguments' shared-memory names)
    # at once, and waits there behind the running call. Objects the driver puts
    # meanwhile must not spill that argument out from under it.
    start(object_store_memory=30 * MB)
    d = str(tmp_path)
    reader = Reader.remote()
    assert ray.get(reader.first.remote(np.ones(1)), timeout=30) == 1.0  # alive
    waiting = reader.wait_for.remote(d)
    _started(d)
    out = reader.first.remote(ray.put(np.full(10 * MB // 8, 5.0)))
    others = [ray.put(np.full(10 * MB // 8, float(i))) for i in range(3)]
    assert _store().stats()["spilled_bytes"] > 0
    open(os.path.join(d, "gate"), "w").close()
    assert ray.get(waiting, timeout=30) is True
    assert ray.get(out, timeout=30) == 5.0
    del others


def test_object_larger_than_store_raises_store_full_naming_sizes(start):
    start(object_store_memory=30 * MB)
    with pytest.raises(exc.ObjectStoreFullError) as info:
        ray.put(np.zeros(40 * MB, dtype=np.uint8))
    numbers = [int(n) for n in re.findall(r"\d+", str(info.value))]
    assert 30 * MB in numbers, str(info.value)
    assert any(n >= 40 * MB for n in numbers), str(info.value)
    # The store still works afterwards.
    assert float(ray.get(ray.put(np.ones(MB)))[0]) == 1.0



# Puts that need room (and so free queued releases) while tasks return
# shared-memory results: the store's space lock and the scheduler lock are never
# taken in opposite orders, so they cannot deadlock.
ABBA_DRIVER = """
import faulthandler, sys, threading, time
import numpy as np
import beamlet as ray

faulthandler.dump_traceback_later(30, exit=True)  # a deadlock: show where, then exit 1
ray.init(num_cpus=2, object_store_memory=24_000_000)

@ray.remote
def make(n):
    return np.ones(n)

stop = time.monotonic() + 8

def putter():
    while time.monotonic() < stop:
        refs = [ray.put(np.ones(250_000)) for _ in range(4)]  # 2 MB each
        del refs

threads = [threading.Thread(target=putter) for _ in range(2)]
for t in threads:
    t.start()
while time.monotonic() < stop:
    refs = [make.remote(250_000) for _ in range(6)]
    ray.get(refs, timeout=30)
    del refs
for t in threads:
    t.join(30)
ray.shutdown()
print("DONE", flush=True)
"""


def test_puts_needing_room_while_tasks_return_large_results_do_not_deadlock(tmp_path):
    driver = procs.Driver(ABBA_DRIVER, tmp_path)
    try:
        code = driver.finish(60)
    finally:
        driver.kill()
    assert code == 0 and "DONE" in driver.stdout, driver.stderr[-4000:]


# `await ref` in a worker does not keep a stale shared-memory entry: once the
# object spills, a later get() restores it.
@ray.remote
class AwaitHolder:
    async def load(self, box):
        self.box = box
        value = await box[0]
        return float(value.sum())

    async def again(self):
        return float(ray.get(self.box[0]).sum())


def test_get_after_await_of_a_spilled_object(start):
    start(object_store_memory=40 * MB)
    holder = AwaitHolder.remote()
    ref = ray.put(np.full(MB, 1.0))  # 8 MB
    assert ray.get(holder.load.remote([ref]), timeout=30) == MB
    others = [ray.put(np.full(MB, 2.0)) for _ in range(5)]  # pushes `ref` out to disk
    assert _runtime.current().backend.object_store.stats()["spilled_bytes"] > 0
    assert ray.get(holder.again.remote(), timeout=30) == MB
    del others


# A spilled argument that cannot be restored at dispatch yet (store full) neither
# loses the task nor keeps its worker and CPU.
@ray.remote
def hold_until(x, path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return float(np.asarray(x).sum()) if x is not None else 0.0


def test_spilled_argument_that_cannot_be_restored_yet_does_not_lose_the_task(start, tmp_path):
    backend = start(num_cpus=3, object_store_memory=40 * MB)
    a = ray.put(np.ones(MB))                # 8 MB
    b1 = ray.put(np.ones(9 * MB // 4))      # 18 MB
    b2 = ray.put(np.ones(9 * MB // 4))      # 18 MB: `a` spills to make room
    assert backend.object_store.stats()["spilled_bytes"] > 0
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    h1, h2 = hold_until.remote(b1, big), hold_until.remote(b2, big)  # pin b1, b2 while running
    h0 = hold_until.remote(None, small)                              # the third CPU
    assert procs.wait_until(lambda: ray.available_resources().get("CPU", 0) == 0.0, 20)
    t3 = total.remote(a)  # queued: no CPU free
    open(small, "w").close()  # t3 is dispatched now, while b1 and b2 fill the store
    assert ray.get(h0, timeout=30) == 0.0
    open(big, "w").close()
    assert ray.get([h1, h2], timeout=30) == [float(9 * MB // 4)] * 2
    try:
        assert ray.get(t3, timeout=15) == float(MB)
    except exc.ObjectStoreFullError:
        pass  # failing it clearly would be fine too; losing it is not
    assert procs.wait_until(lambda: ray.available_resources().get("CPU", 0) == 3.0, 10), \
        ray.available_resources()


# ====================================================================================
# failures
# ====================================================================================
@ray.remote
def crash_exit(d):
    _attempt(d)
    os._exit(1)


@ray.remote
def crash_sigkill(d):
    _attempt(d)
    os.kill(os.getpid(), signal.SIGKILL)


@ray.remote
def crash_segfault(d):
    _attempt(d)
    import ctypes
    ctypes.string_at(0)


@ray.remote
def crash_once(d):
    if _attempt(d) == 0:
        os._exit(1)
    return "second try"


def test_os_exit_is_retried_max_retries_then_worker_crashed(start, tmp_path):
    start()
    with pytest.raises(exc.WorkerCrashedError) as info:
        ray.get(crash_exit.options(max_retries=2).remote(str(tmp_path)), timeout=60)
    assert procs.count(str(tmp_path)) == 3
    assert not isinstance(info.value, exc.TaskError)
    assert "crash_exit" in str(info.value)


def test_default_max_retries_is_three(start, tmp_path):
    start()
    with pytest.raises(exc.WorkerCrashedError):
        ray.get(crash_exit.remote(str(tmp_path)), timeout=60)
    assert procs.count(str(tmp_path)) == 4


def test_sigkill_is_retried_then_worker_crashed(start, tmp_path):
    start()
    with pytest.raises(exc.WorkerCrashedError):
        ray.get(crash_sigkill.options(max_retries=1).remote(str(tmp_path)), timeout=60)
    assert procs.count(str(tmp_path)) == 2


def test_segfault_is_a_worker_crash(start, tmp_path):
    start()
    with pytest.raises(exc.WorkerCrashedError):
        ray.get(crash_segfault.options(max_retries=0).remote(str(tmp_path)), timeout=60)
    assert procs.count(str(tmp_path)) == 1


def test_max_retries_zero_means_no_retry(start, tmp_path):
    start()
    for fn in (crash_exit, crash_sigkill):
        d = tmp_path / fn.__name__
        d.mkdir()
        with pytest.raises(exc.WorkerCrashedError):
            ray.get(fn.options(max_retries=0).remote(str(d)), timeout=60)
        assert procs.count(str(d)) == 1


def test_crash_then_success_on_retry(start, tmp_path):
    start()
    assert ray.get(crash_once.remote(str(tmp_path)), timeout=60) == "second try"
    assert procs.count(str(tmp_path)) == 2


@ray.remote
def flaky(d, fail_times, error):
    n = _attempt(d)
    if n < fail_times:
        raise error(f"attempt {n}")
    return n


def test_application_errors_not_retried_by_default(start, tmp_path):
    start()
    with pytest.raises(ValueError):
        ray.get(flaky.remote(str(tmp_path), 5, ValueError), timeout=30)
    assert procs.count(str(tmp_path)) == 1


def test_retry_exceptions_true_retries_application_errors(start, tmp_path):
    start()
    ref = flaky.options(retry_exceptions=True, max_retries=3).remote(str(tmp_path), 2, ValueError)
    assert ray.get(ref, timeout=30) == 2
    assert procs.count(str(tmp_path)) == 3
    # The budget runs out: the last error is raised.
    d = tmp_path / "out"
    d.mkdir()
    ref = flaky.options(retry_exceptions=True, max_retries=1).remote(str(d), 5, ValueError)
    with pytest.raises(ValueError, match="attempt 1"):
        ray.get(ref, timeout=30)
    assert procs.count(str(d)) == 2


def test_retry_exceptions_list_retries_only_listed_types(start, tmp_path):
    start()
    listed = flaky.options(retry_exceptions=[ValueError], max_retries=3)
    d1, d2 = tmp_path / "listed", tmp_path / "other"
    d1.mkdir()
    d2.mkdir()
    assert ray.get(listed.remote(str(d1), 1, ValueError), timeout=30) == 1
    assert procs.count(str(d1)) == 2
    with pytest.raises(KeyError):
        ray.get(listed.remote(str(d2), 1, KeyError), timeout=30)
    assert procs.count(str(d2)) == 1


@ray.remote(max_restarts=1)
class Phoenix:
    def __init__(self, d):
        procs.touch_new(d, "init")
        self.calls = 0

    def incr(self):
        self.calls += 1
        return self.calls

    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(1)


def test_actor_max_restarts_reruns_init_in_new_process(start, tmp_path):
    start()
    d = str(tmp_path)
    actor = Phoenix.remote(d)
    assert ray.get(actor.incr.remote(), timeout=30) == 1
    assert ray.get(actor.incr.remote(), timeout=30) == 2
    pid1 = ray.get(actor.pid.remote(), timeout=30)
    first_process = procs.proc_id(pid1)
    with pytest.raises(exc.ActorError) as info:
        ray.get(actor.die.remote(), timeout=30)
    assert not isinstance(info.value, exc.ActorDiedError)
    # The next call runs on a fresh instance: __init__ again, state reset, new pid.
    assert ray.get(actor.incr.remote(), timeout=30) == 1
    pid2 = ray.get(actor.pid.remote(), timeout=30)
    assert pid2 != pid1
    assert procs.count(d, "init") == 2
    assert procs.wait_until(lambda: not procs.alive(first_process), 10)
    # Restarts used up: that call and every later one raise ActorDiedError.
    with pytest.raises(exc.ActorDiedError):
        ray.get(actor.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError):
        ray.get(actor.incr.remote(), timeout=30)
    assert procs.count(d, "init") == 2


def test_actor_default_no_restart(start, tmp_path):
    start()
    actor = Phoenix.options(max_restarts=0).remote(str(tmp_path))
    assert ray.get(actor.incr.remote(), timeout=30) == 1
    with pytest.raises(exc.ActorDiedError):
        ray.get(actor.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError) as info:
        ray.get(actor.incr.remote(), timeout=30)
    assert "died" in str(info.value)
    assert procs.count(str(tmp_path), "init") == 1


@ray.remote
class Plain:
    def die(self):
        os._exit(1)

    def ok(self):
        return "ok"


def test_actor_default_max_restarts_is_zero(start):
    start()
    actor = Plain.remote()
    assert ray.get(actor.ok.remote(), timeout=30) == "ok"
    with pytest.raises(exc.ActorDiedError):
        ray.get(actor.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError):
        ray.get(actor.ok.remote(), timeout=30)


@ray.remote(max_restarts=1, max_task_retries=1)
class Flaky:
    def __init__(self, d):
        self.d = d

    def once(self):
        if procs.touch_new(self.d, "a") == 0:
            os._exit(1)
        return os.getpid()


def test_actor_max_task_retries_reruns_the_call_after_restart(start, tmp_path):
    start()
    actor = Flaky.remote(str(tmp_path))
    worker_pid = ray.get(actor.once.remote(), timeout=30)
    assert isinstance(worker_pid, int)
    assert procs.count(str(tmp_path)) == 2


@ray.remote(max_restarts=1, max_task_retries=1)
class Queue:
    """Records the calls it runs, in order; `hold` blocks until a file exists."""

    def __init__(self, d):
        self.d = d
        self.ran = []

    def hold(self, gate, die_once=False):
        assert procs.wait_until(lambda: os.path.exists(gate), 60)
        if die_once and procs.touch_new(self.d, "died") == 0:
            os._exit(1)
        return "released"

    def record(self, i):
        self.ran.append(i)
        return i

    def log(self):
        return self.ran


def _held_calls(backend, actor) -> int:
    """How many calls of `actor` the scheduler holds back for its next batch."""
    with backend.scheduler.lock:
        return len(backend.scheduler.actors[actor._actor_id].held)


def test_calls_behind_a_busy_actor_go_in_order_and_a_held_one_can_be_cancelled(start, tmp_path):
    backend = start()
    gate = str(tmp_path / "gate")
    actor = Queue.remote(str(tmp_path))
    assert ray.get(actor.log.remote(), timeout=30) == []
    blocker = actor.hold.remote(gate)
    calls = [actor.record.remote(i) for i in range(20)]
    assert _held_calls(backend, actor) > 0  # (beyond the window: they wait for a batch)
    ray.cancel(calls[10])
    open(gate, "w").close()
    assert ray.get(blocker, timeout=60) == "released"
    with pytest.raises(exc.TaskCancelledError) as info:
        ray.get(calls[10], timeout=60)
    assert not isinstance(info.value, exc.TaskError)  # never ran
    expected = [i for i in range(20) if i != 10]
    assert ray.get(calls[:10] + calls[11:], timeout=60) == expected
    assert ray.get(actor.log.remote(), timeout=30) == expected
    assert _held_calls(backend, actor) == 0


def test_calls_held_back_when_an_actor_dies_run_on_its_restart(start, tmp_path):
    backend = start()
    gate = str(tmp_path / "gate")
    actor = Queue.remote(str(tmp_path))
    assert ray.get(actor.log.remote(), timeout=30) == []
    dying = actor.hold.remote(gate, die_once=True)
    calls = [actor.record.remote(i) for i in range(10)]
    assert _held_calls(backend, actor) > 0
    open(gate, "w").close()
    # The call that killed it is retried (max_task_retries=1) on the new process, and
    # the calls it held back run there after it, in order.
    assert ray.get(dying, timeout=60) == "released"
    assert ray.get(calls, timeout=60) == list(range(10))
    assert ray.get(actor.log.remote(), timeout=30) == list(range(10))
    assert procs.count(str(tmp_path), "died") == 2  # the run that died, and its retry


@ray.remote
def sleeper(d, seconds=60):
    procs.touch_new(d, "s")
    time.sleep(seconds)
    return "finished"


def _started(d, n=1, timeout=20):
    assert procs.wait_until(lambda: procs.count(d, "s") >= n, timeout), "the task never started"


def test_cancel_interrupts_a_sleeping_task(start, tmp_path):
    start()
    d = str(tmp_path)
    ref = sleeper.remote(d)
    _started(d)
    ray.cancel(ref)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=10)
    assert procs.count(d, "s") == 1  # cancelled tasks are not retried
    assert ray.get(add.remote(1, 2), timeout=30) == 3


@ray.remote
class Napper:
    def nap(self, d, seconds):
        procs.touch_new(d, "s")
        time.sleep(seconds)
        return "finished"

    def nap_then_add(self, seconds):
        time.sleep(seconds)
        return ray.get(add.remote(1, 2), timeout=30)


def test_a_call_after_a_long_one_still_hears_the_node(start, tmp_path):
    """After a call that ran long, the worker's reader thread sleeps through the
    next call unless the node sends something (no timer: see worker._Reading):
    a cancel still interrupts that call (else it sleeps its 60 s), and a call
    that waits for a nested task still gets its result."""
    start()
    d = str(tmp_path)
    actor = Napper.remote()
    assert ray.get(actor.nap.remote(d, 0.05), timeout=30) == "finished"
    ref = actor.nap.remote(d, 60)
    _started(d, 2)
    ray.cancel(ref)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=20)
    assert ray.get(actor.nap.remote(d, 0.05), timeout=30) == "finished"
    assert ray.get(actor.nap_then_add.remote(0.05), timeout=30) == 3


def test_cancel_force_kills_the_worker(start, tmp_path):
    backend = start()
    d = str(tmp_path)
    ref = sleeper.remote(d)
    _started(d)
    with backend.scheduler.lock:
        victim = [procs.proc_id(w.pid) for w in backend.scheduler.workers.values()
                  if w.task is not None and w.task.function_name.endswith("sleeper")]
    assert len(victim) == 1 and procs.alive(victim[0])
    ray.cancel(ref, force=True)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=10)
    assert procs.wait_until(lambda: not procs.alive(victim[0]), 10)
    assert procs.count(d, "s") == 1
    assert ray.get(add.remote(1, 2), timeout=30) == 3


@ray.remote
def mark_run(d):
    procs.touch_new(d, "ran")
    return "ran"


def test_cancel_queued_task(start, tmp_path):
    start(resources={"slot": 1})
    d = str(tmp_path)
    blocker = sleeper.options(resources={"slot": 1}).remote(d)
    _started(d)
    queued = mark_run.options(resources={"slot": 1}).remote(d)
    ray.cancel(queued)
    with pytest.raises(exc.TaskCancelledError) as info:
        ray.get(queued, timeout=10)
    assert not isinstance(info.value, exc.TaskError)  # never ran: plain TaskCancelledError
    ray.cancel(blocker, force=True)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(blocker, timeout=10)
    # The slot is free again and the cancelled task never ran.
    assert ray.get(mark_run.options(resources={"slot": 1}).remote(d), timeout=30) == "ran"
    assert procs.count(d, "ran") == 1


@ray.remote(num_cpus=1)
class WholeCpu:
    def pid(self):
        return os.getpid()


def test_force_cancel_of_a_task_whose_answer_is_unread_leaves_no_dead_worker_idle(start):
    """A force cancel kills the worker of a task that has just finished: the
    answer it sent before the kill is still unread. Handling that answer must
    not make the dead worker idle again: what is placed on it next (here an
    actor, waiting for the task's CPU) would die with it."""
    backend = start(num_cpus=1)
    ray.get(quick.remote(), timeout=60)  # (its worker is up)
    node = backend.node
    with node._turn:  # (the node reads no worker meanwhile)
        ref = quick.remote()
        worker = backend.scheduler.running_on(ref.id)
        assert worker is not None
        assert procs.wait_until(lambda: worker.conn.readable(0), 30)  # its answer came
        pid = worker.pid
        ray.cancel(ref, force=True)
        assert procs.wait_gone([pid], 10) == []
        actor = WholeCpu.remote()  # (waits for the task's CPU)
    assert ray.get(actor.pid.remote(), timeout=60) != pid


# -- the node's sockets: its event loop never waits on a peer ------------------------
@ray.remote
class Echo:
    def echo(self, value):
        return value


def test_calls_and_results_beyond_the_socket_buffers_both_ways_complete(start):
    """2,000 calls of 10 KB to one actor, three times: more than a Unix socket
    buffers each way, so the node sends calls while the actor sends results.
    (Both used to wait for the other to read: the first burst hung.)"""
    actor = Echo.remote()
    payload = b"x" * 10_000
    for _ in range(3):
        out = ray.get([actor.echo.remote(payload) for _ in range(2000)], timeout=60)
        assert out == [payload] * 2000


def test_a_served_connection_queues_what_a_peer_that_does_not_read_cannot_take():
    """A send on a connection the listener's event loop serves returns even
    while the peer reads nothing; the peer then gets every message, in order,
    and the thread that sent the backlog ends."""
    from beamlet.backends.local.transport import UnixSocketTransport
    from beamlet.core.interfaces import Joined

    transport = UnixSocketTransport(os.urandom(32), "beamlet-test/1")
    listener = transport.listen()
    served = []

    def serve():
        deadline = time.monotonic() + 30
        while not served and time.monotonic() < deadline:
            served.extend(e.conn for e in listener.poll() if isinstance(e, Joined))
            time.sleep(0.005)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = transport.connect(listener.address, timeout=30)
    server.join(30)
    assert served, "the listener did not accept the connection"
    conn = served[0]
    big = b"y" * 1_000_000
    sent = threading.Event()

    def send_all():
        for i in range(20):  # (20 MB: far beyond what the socket buffers)
            conn.send((i, big))
        conn.send_many([(20, b"end"), (21, b"more")])
        sent.set()

    threading.Thread(target=send_all, daemon=True).start()
    try:
        assert sent.wait(30), "a send waited for a peer that does not read"
        got = [client.recv(timeout=30) for _ in range(22)]
        assert [i for i, _ in got] == list(range(22))
        assert all(value == big for _, value in got[:20]) and got[20][1] == b"end"
        procs.eventually(lambda: not any(t.name == "beamlet-send-backlog"
                                         for t in threading.enumerate()),
                         "the end of the backlog's thread", 30)
    finally:
        client.close()
        conn.close()
        listener.close()


# -- pipelining: a task sent ahead to a busy worker -----------------------------------
@ray.remote
def quick():
    return os.getpid()


@ray.remote(max_retries=0)
def hold_then(gate, die=False):
    assert procs.wait_until(lambda: os.path.exists(gate), 60)
    if die:
        os._exit(1)
    return os.getpid()


def _sent_ahead(backend, ref) -> bool:
    """Whether the task making `ref` waits on a busy worker, sent ahead of time."""
    with backend.scheduler.lock:
        return any(w.next is not None and ref.id in w.next.return_ids
                   for w in backend.scheduler.workers.values())


def _queue_behind(backend, gate, die=False):
    """On one CPU: a task held at `gate` and a task sent ahead to its worker
    (the first quick task makes the scheduler dispatch from its queue)."""
    first = quick.remote()
    held = hold_then.remote(gate, die)
    ahead = mark_run.options(max_retries=0).remote(os.path.dirname(gate))
    ray.get(first, timeout=60)
    assert procs.wait_until(lambda: _sent_ahead(backend, ahead), 30)
    return held, ahead


def test_force_cancel_of_a_task_sent_ahead_leaves_the_running_one_alone(start, tmp_path):
    backend = start(num_cpus=1)
    gate = str(tmp_path / "gate")
    held, ahead = _queue_behind(backend, gate)
    ray.cancel(ahead, force=True)
    open(gate, "w").close()
    assert isinstance(ray.get(held, timeout=60), int)  # its worker was not killed
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ahead, timeout=60)
    assert procs.count(str(tmp_path), "ran") == 0  # the cancelled task never ran
    assert ray.get(mark_run.remote(str(tmp_path)), timeout=60) == "ran"


def test_a_task_sent_ahead_to_a_worker_that_dies_runs_elsewhere_unretried(start, tmp_path):
    backend = start(num_cpus=1)
    gate = str(tmp_path / "gate")
    held, ahead = _queue_behind(backend, gate, die=True)
    open(gate, "w").close()
    with pytest.raises(exc.WorkerCrashedError):
        ray.get(held, timeout=60)
    # It never started there: not a crash of its own, so max_retries=0 does not fail it.
    assert ray.get(ahead, timeout=60) == "ran"
    assert procs.count(str(tmp_path), "ran") == 1


@ray.remote
def outer_get(i):
    return ray.get(inner_value.remote(i), timeout=60) + 1


@ray.remote
def inner_value(i):
    return i * 10


def test_tasks_sent_ahead_are_given_back_when_their_worker_blocks(start):
    # On one CPU every outer task blocks in get on its inner task, which queues
    # behind the others and is sent ahead to busy workers: a worker whose task
    # blocks gives back what was sent ahead, or the inner tasks would wait for
    # ever behind the outer ones waiting for them.
    start(num_cpus=1)
    assert ray.get([outer_get.remote(i) for i in range(12)], timeout=120) == \
        [i * 10 + 1 for i in range(12)]


@ray.remote
def boom():
    raise RuntimeError("boom")


@ray.remote
def exits():
    sys.exit(3)


def test_errors_in_tasks_never_take_down_the_driver(start, tmp_path):
    start()
    with pytest.raises(RuntimeError, match="boom"):
        ray.get(boom.remote(), timeout=30)
    with pytest.raises(Exception):
        ray.get(exits.remote(), timeout=30)
    for fn in (crash_exit, crash_sigkill, crash_segfault):
        d = tmp_path / fn.__name__
        d.mkdir()
        with pytest.raises(exc.WorkerCrashedError):
            ray.get(fn.options(max_retries=0).remote(str(d)), timeout=60)
    actor = Plain.remote()
    with pytest.raises(exc.ActorDiedError):
        ray.get(actor.die.remote(), timeout=30)
    # Downstream of a crash: the dependent task fails, it does not hang.
    d = tmp_path / "dep"
    d.mkdir()
    with pytest.raises(exc.WorkerCrashedError):
        ray.get(add.remote(crash_exit.options(max_retries=0).remote(str(d)), 1), timeout=60)
    # Still fully working.
    assert ray.get([add.remote(i, i) for i in range(10)], timeout=30) == [2 * i for i in range(10)]
    assert float(ray.get(ray.put(np.ones(MB)))[0]) == 1.0


@ray.remote
class Maker:
    def make(self, n):
        return [ray.put(np.full(n, 7.0))]

    def pid(self):
        return os.getpid()


def _wait_lost(ref, timeout=10.0):
    """get(ref) until it raises ObjectLostError (the owner's death is noticed asynchronously)."""
    until = time.monotonic() + timeout
    while True:
        try:
            value = ray.get(ref, timeout=timeout)
        except exc.ObjectLostError as err:
            return err
        del value
        if time.monotonic() > until:
            raise AssertionError("the object outlived the actor that put it")
        time.sleep(0.05)


@pytest.mark.parametrize("n", [10, MB], ids=["small", "large"])
def test_object_put_by_actor_is_lost_when_actor_killed(start, n):
    start()
    actor = Maker.remote()
    [ref] = ray.get(actor.make.remote(n), timeout=30)
    value = ray.get(ref, timeout=30)  # fetched once
    assert value.shape == (n,) and (value == 7.0).all()
    del value
    ray.kill(actor)
    err = _wait_lost(ref)
    assert isinstance(err, exc.OwnerDiedError)


def test_view_of_lost_object_stays_intact(start):
    backend = start()
    actor = Maker.remote()
    [ref] = ray.get(actor.make.remote(2 * MB), timeout=30)
    view = ray.get(ref, timeout=30)
    ray.kill(actor)
    _wait_lost(ref)
    # Same size as the lost object: its segment must not be reused under the live view.
    others = [ray.put(np.full(2 * MB, 9.0)) for _ in range(3)]
    assert (view == 7.0).all()
    del others



# A restarted actor's constructor arguments stay pinned for every restart.
@ray.remote(max_restarts=1)
class WithData:
    def __init__(self, data):
        self.total = float(np.asarray(data).sum())

    def get_total(self):
        return self.total

    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(1)


def test_actor_restart_with_a_large_constructor_argument(start):
    start()
    # 1 MB: above the inline threshold, so it travels through the object store.
    actor = WithData.remote(np.full(MB // 8, 1.0))
    assert ray.get(actor.get_total.remote(), timeout=30) == MB // 8
    pid1 = ray.get(actor.pid.remote(), timeout=30)
    with pytest.raises(exc.ActorError):
        ray.get(actor.die.remote(), timeout=30)
    # The restart reruns __init__ with the same argument.
    assert ray.get(actor.get_total.remote(), timeout=15) == MB // 8
    assert ray.get(actor.pid.remote(), timeout=30) != pid1


# max_task_retries=-1 retries without limit, as in Ray (`Flaky` crashes on its first call).
def test_actor_max_task_retries_minus_one_retries(start, tmp_path):
    start()
    actor = Flaky.options(max_restarts=-1, max_task_retries=-1).remote(str(tmp_path))
    # The crashing call is retried on the restarted actor (Ray: -1 = without limit).
    assert ray.get(actor.once.remote(), timeout=30) > 0
    assert procs.count(str(tmp_path)) == 2


def test_actor_method_option_max_task_retries_minus_one_retries(start, tmp_path):
    start()
    actor = Flaky.options(max_restarts=1, max_task_retries=0).remote(str(tmp_path))
    ref = actor.once.options(max_task_retries=-1).remote()
    assert ray.get(ref, timeout=30) > 0
    assert procs.count(str(tmp_path)) == 2


# A ref from a session that was shut down, passed to .remote() (as an argument, or
# inside a container that the task gets it from), raises clearly instead of hanging.
@ray.remote
def identity(x):
    return x


@ray.remote
def get_first(box):
    return ray.get(box[0])


@pytest.mark.parametrize("inside", [False, True], ids=["argument", "in-a-container"])
def test_ref_from_a_previous_session_passed_to_a_task_raises_clearly(start, inside):
    start()
    stale = ray.put(7)
    ray.shutdown()
    start()
    # get(stale) raises ObjectLostError at once; a task given it must not hang (the
    # error may come at .remote() or at get).
    with pytest.raises((exc.ObjectLostError, ValueError, TypeError)):
        ref = get_first.remote([stale]) if inside else identity.remote(stale)
        ray.get(ref, timeout=15)


# A constructor that raises when the actor is restarted: every later call's error
# holds the constructor's traceback.
@ray.remote(max_restarts=1)
class FailsOnRestart:
    def __init__(self, d):
        if procs.touch_new(d, "init") > 0:
            raise ValueError("the second __init__ failed")

    def ping(self):
        return "pong"

    def die(self):
        os._exit(1)


def test_constructor_failing_on_restart_reports_its_traceback(start, tmp_path):
    start()
    actor = FailsOnRestart.remote(str(tmp_path))
    assert ray.get(actor.ping.remote(), timeout=30) == "pong"
    with pytest.raises(exc.ActorError):
        ray.get(actor.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError) as info:
        ray.get(actor.ping.remote(), timeout=30)
    assert procs.count(str(tmp_path), "init") == 2
    assert "the second __init__ failed" in str(info.value), str(info.value)


# ref.future() (and so `await ref`) of a pending ref fails at shutdown.
@ray.remote
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def test_future_of_a_pending_ref_fails_at_shutdown(start):
    start()
    fut = sleep_then.remote(60, "late").future()
    ray.shutdown()
    # Every blocking call ends with BackendError once the backend shuts down.
    with pytest.raises(exc.BackendError):
        fut.result(timeout=10)


# A detached actor created inside a task outlives that task's worker.
@ray.remote
class Survivor:
    def ping(self):
        return "alive"


@ray.remote(max_retries=0)
def create_detached_then_crash(name):
    actor = Survivor.options(name=name, lifetime="detached").remote()
    assert ray.get(actor.ping.remote()) == "alive"
    os._exit(1)


def test_detached_actor_outlives_the_worker_that_created_it(start):
    start()
    with pytest.raises(exc.WorkerCrashedError):
        ray.get(create_detached_then_crash.remote("survivor"), timeout=30)
    actor = ray.get_actor("survivor")
    assert ray.get(actor.ping.remote(), timeout=30) == "alive"
    ray.kill(actor)


# A fork request the zygote never carried out (it died first) is not counted as
# `starting` for ever: a worker is started again for what waits on it.
@ray.remote
class Pid:
    def pid(self):
        return os.getpid()


def test_worker_requested_from_a_zygote_that_died_is_started_again(start):
    import signal
    backend = start(num_cpus=1, prestart_workers=1)
    first = Pid.remote()
    assert ray.get(first.pid.remote(), timeout=30) > 0
    zygote = backend.node.launcher.proc
    os.kill(zygote.pid, signal.SIGSTOP)  # it cannot read the next fork request...
    try:
        second = Pid.remote()  # ...which is written to its stdin all the same
        assert procs.wait_until(lambda: backend.scheduler.starting >= 1, 10)
    finally:
        os.kill(zygote.pid, signal.SIGKILL)  # and it dies without having read it
        zygote.wait(10)
    assert ray.get(second.pid.remote(), timeout=15) > 0


# ====================================================================================
# nested tasks
# ====================================================================================
@ray.remote
def tree(depth, fanout):
    if depth == 0:
        return 1
    return sum(ray.get([tree.remote(depth - 1, fanout) for _ in range(fanout)]))


def test_deep_nested_fanout_does_not_deadlock_on_two_cpus(start):
    backend = start(num_cpus=2)
    assert ray.get(tree.remote(4, 3), timeout=90) == 81
    # Blocked tasks gave their CPUs back and took them again: all free now.
    assert procs.wait_until(lambda: ray.available_resources().get("CPU") == 2.0, 10), \
        ray.available_resources()
    # The extra workers forked while tasks were blocked go away once idle.
    forked = procs.children_of(backend.node.launcher.proc.pid)
    assert len(forked) > 2
    assert procs.wait_until(lambda: len(procs.children_of(backend.node.launcher.proc.pid)) <= 2, 30), \
        procs.children_of(backend.node.launcher.proc.pid)
    assert ray.get(tree.remote(2, 2), timeout=60) == 4


@ray.remote
def simulation(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random((200, 200)), rng.random((200, 200))
    return float(np.dot(a, b).sum())


@ray.remote
def experiment(index, num_simulations=8):
    refs = [simulation.remote(index * 100 + s) for s in range(num_simulations)]
    return sum(ray.get(refs))


def test_seed_nested_example_on_two_cpus(start):
    start(num_cpus=2)
    results = ray.get([experiment.remote(i) for i in range(2)], timeout=60)
    expected = [sum(ray.get([simulation.remote(i * 100 + s) for s in range(8)], timeout=60))
                for i in range(2)]
    assert np.allclose(results, expected)
    # More outer tasks than CPUs, each blocked on inner tasks.
    assert len(ray.get([experiment.remote(i, 2) for i in range(4)], timeout=60)) == 4



# A get that timed out inside a task leaves no callback that later takes back the
# CPU of the same worker while it is blocked in another task's get.
@ray.remote(max_concurrency=4)
class Gate:
    def ping(self):
        return "up"

    def wait_for(self, path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        return path


@ray.remote
def get_with_short_timeout(box):
    try:
        ray.get(box[0], timeout=0.3)
    except exc.GetTimeoutError:
        pass
    return os.getpid()


@ray.remote
def length(x):
    return len(x)


@ray.remote
def get_nested(box):
    inner = length.remote(box[0])  # waits for the gate, then needs a CPU
    return os.getpid(), ray.get(inner)


def test_stale_get_callback_does_not_take_back_a_blocked_workers_cpu(start, tmp_path):
    start(num_cpus=1)
    gate = Gate.remote()
    assert ray.get(gate.ping.remote(), timeout=30) == "up"
    p1, p2 = str(tmp_path / "one"), str(tmp_path / "two")
    g1 = gate.wait_for.remote(p1)
    g2 = gate.wait_for.remote(p2)
    pid_a = ray.get(get_with_short_timeout.remote([g1]), timeout=30)
    out = get_nested.remote([g2])
    # The outer task is blocked in get: it gave its CPU back.
    assert procs.wait_until(lambda: ray.available_resources().get("CPU", 0) == 1.0, 20)
    open(p1, "w").close()
    assert ray.get(g1, timeout=30) == p1
    open(p2, "w").close()
    pid_b, value = ray.get(out, timeout=15)
    assert value == len(p2)
    assert pid_b == pid_a  # (the scenario: both ran on the same worker)


# An async actor resolves a call's ref arguments without blocking its event loop,
# so a call may depend on an earlier call of the same actor.
@ray.remote
class AsyncChain:
    async def one(self):
        import asyncio
        await asyncio.sleep(0.2)
        return 1

    async def plus_one(self, x):
        return x + 1


def test_async_actor_call_depending_on_an_earlier_call_of_the_same_actor(start):
    start()
    actor = AsyncChain.remote()
    first = actor.one.remote()
    second = actor.plus_one.remote(first)
    assert ray.get(second, timeout=15) == 2


# An actor call's ref arguments are resolved before it is sent to the actor, so
# producing them may need another call on the same actor (from another caller).
@ray.remote
class Store:
    def __init__(self):
        self.value = 10

    def read(self):
        return self.value

    def write(self, value):
        self.value = value
        return value


@ray.remote
def read_and_double(store):
    return 2 * ray.get(store.read.remote())



def test_actor_call_whose_argument_needs_the_same_actor(start):
    start()
    store = Store.remote()
    assert ray.get(store.read.remote(), timeout=30) == 10
    # Ray resolves `write`'s argument before sending it to the actor, so `read`
    # (from another caller: the task) runs in between.
    assert ray.get(store.write.remote(read_and_double.remote(store)), timeout=15) == 20


@ray.remote
class Asker:
    def ask(self, directory):
        # A request the node must read and answer while the caller does not get.
        cpus = ray.cluster_resources()["CPU"]
        procs.touch_new(directory, "asked")
        return cpus


def test_actor_call_not_followed_by_a_get_is_still_served(start, tmp_path):
    """An actor's requests to the node are answered while its caller is not in
    `get` (the driver must not leave the actor's connection to a get that may
    never come)."""
    start(num_cpus=2)
    asker = Asker.remote()
    assert ray.get(asker.ask.remote(str(tmp_path)), timeout=30) == 2
    ref = asker.ask.remote(str(tmp_path))
    # No beamlet call here: only the node's I/O thread can answer the actor.
    assert procs.wait_until(lambda: procs.count(str(tmp_path), "asked") == 2, 30)
    assert ray.get(ref, timeout=30) == 2



@ray.remote
def ask(directory):
    cpus = ray.cluster_resources()["CPU"]  # (a request the node must answer)
    procs.touch_new(directory, "asked")
    return cpus


def test_task_not_followed_by_a_get_is_still_served(start, tmp_path):
    """The same for a task sent to an idle worker (its caller may be about
    to get it, see Node.claim), and for a burst of tasks."""
    start(num_cpus=2)
    assert ray.get(ask.remote(str(tmp_path)), timeout=30) == 2
    ref = ask.remote(str(tmp_path))
    # No beamlet call here: only the node's I/O thread can answer the task.
    assert procs.wait_until(lambda: procs.count(str(tmp_path), "asked") == 2, 30)
    assert ray.get(ref, timeout=30) == 2
    refs = [ask.remote(str(tmp_path)) for _ in range(20)]
    assert procs.wait_until(lambda: procs.count(str(tmp_path), "asked") == 22, 60)
    assert ray.get(refs, timeout=30) == [2] * 20


def test_a_spinning_poll_sees_a_message_sent_meanwhile_and_gives_up_after_its_time():
    """`poll_spinning` (a sync get's and a waiting worker's first look): True
    when the peer writes during the spin, False once its time is up, with
    nothing consumed; `readable` then still waits its whole timeout."""
    import select
    import socket

    from beamlet.backends.local.transport import poll_spinning

    ours, theirs = socket.socketpair()
    try:
        poller = select.poll()
        poller.register(ours.fileno(), select.POLLIN)
        started = time.perf_counter()
        assert poll_spinning(poller, 0.002) is False
        assert time.perf_counter() - started >= 0.002  # (it looked for its whole time)
        writer = threading.Timer(0.01, theirs.send, args=(b"x",))
        writer.start()
        assert poll_spinning(poller, 30.0) is True  # (returns at the write, not after 30 s)
        writer.join()
        assert ours.recv(1) == b"x"
        assert poll_spinning(poller, 0.0) is False
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("value, problem", [("fast", "a number of microseconds"),
                                            ("-5", "0 to 10000"), ("inf", "0 to 10000")])
def test_a_bad_spin_setting_is_refused_naming_it(value, problem):
    import subprocess

    run = subprocess.run(
        [sys.executable, "-c", "import beamlet.backends.local.transport"],
        env={**os.environ, "BEAMLET_SPIN_US": value}, capture_output=True, text=True,
        timeout=60)
    assert run.returncode != 0
    assert "BEAMLET_SPIN_US" in run.stderr and problem in run.stderr


@pytest.mark.parametrize("spin_us", ["0", "300"])
def test_sync_calls_are_answered_with_spinning_off_or_long(spin_us, tmp_path):
    """Spinning only changes how a thread waits: with it off or long, a driver
    and its workers (children: they read the same setting) answer sync tasks,
    actor calls and a burst alike."""
    import subprocess

    script = textwrap.dedent("""
        import beamlet as ray
        from beamlet.backends.local import transport
        ray.init(num_cpus=2)
        @ray.remote
        def square(x):
            from beamlet.backends.local import transport
            return x * x, transport.SPIN
        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0
            def add(self):
                self.n += 1
                return self.n
        values = [ray.get(square.remote(i), timeout=30) for i in range(50)]
        counter = Counter.remote()
        calls = [ray.get(counter.add.remote(), timeout=30) for _ in range(50)]
        burst = ray.get([square.remote(i) for i in range(200)], timeout=60)
        assert [v for v, _ in values] == [i * i for i in range(50)], values
        assert calls == list(range(1, 51)), calls
        assert [v for v, _ in burst] == [i * i for i in range(200)]
        print("spins", transport.SPIN, sorted({s for _, s in values + burst}))
        ray.shutdown()
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path),
                         env={**os.environ, "BEAMLET_SPIN_US": spin_us},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    spin = float(spin_us) / 1e6
    assert f"spins {spin} [{spin}]" in run.stdout, run.stdout

# ====================================================================================
# resources
# ====================================================================================
@ray.remote
def meet(d, n):
    return procs.barrier(d, n)


def test_fractional_cpus_run_concurrently(start, tmp_path):
    start(num_cpus=2)
    refs = [meet.options(num_cpus=0.5).remote(str(tmp_path), 4) for _ in range(4)]
    assert ray.get(refs, timeout=60) == [True] * 4


@ray.remote
def interval(d):
    t0 = time.monotonic_ns()
    time.sleep(0.1)
    t1 = time.monotonic_ns()
    with open(os.path.join(d, f"{os.getpid()}-{t0}"), "w") as f:
        f.write(f"{t0} {t1}")
    return True


def test_custom_resource_limits_concurrency(start, tmp_path):
    start(num_cpus=2, resources={"slot": 1})
    refs = [interval.options(resources={"slot": 1}).remote(str(tmp_path)) for _ in range(5)]
    assert ray.get(refs, timeout=60) == [True] * 5
    spans = sorted(tuple(map(int, p.read_text().split())) for p in tmp_path.iterdir())
    assert len(spans) == 5
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert end <= begin, f"tasks needing the only slot overlapped: {spans}"
    # Without the slot they may run side by side (the resource is what serialises them).
    d = tmp_path / "free"
    d.mkdir()
    assert ray.get([meet.remote(str(d), 2) for _ in range(2)], timeout=60) == [True, True]


@ray.remote
def visible_devices(d=None, n=0):
    if d is not None:
        procs.barrier(d, n)
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_num_gpus_sets_cuda_visible_devices(start, tmp_path):
    start(num_cpus=2, num_gpus=2)
    assert ray.cluster_resources().get("GPU") == 2.0
    one = ray.get(visible_devices.options(num_gpus=1).remote(), timeout=30)
    assert one in ("0", "1")
    both = ray.get([visible_devices.options(num_gpus=1).remote(str(tmp_path), 2)
                    for _ in range(2)], timeout=60)
    assert sorted(both) == ["0", "1"], both
    two = ray.get(visible_devices.options(num_gpus=2).remote(), timeout=30)
    assert sorted(two.split(",")) == ["0", "1"]


def test_task_without_gpus_does_not_see_a_previous_tasks_device(start):
    start(num_cpus=1, num_gpus=1)  # one worker: the CPU task reuses the GPU task's worker
    assert ray.get(visible_devices.options(num_gpus=1).remote(), timeout=30) == "0"
    seen = ray.get(visible_devices.remote(), timeout=30)
    assert seen in (None, ""), f"a task with no GPU sees CUDA_VISIBLE_DEVICES={seen!r}"


def test_infeasible_request_raises_at_remote_naming_the_resource(start):
    start(num_cpus=2, num_gpus=2)
    with pytest.raises(ValueError, match="GPU"):
        visible_devices.options(num_gpus=3).remote()
    with pytest.raises(ValueError, match="CPU"):
        add.options(num_cpus=3).remote(1, 2)
    with pytest.raises(ValueError, match="unicorn"):
        add.options(resources={"unicorn": 1}).remote(1, 2)
    with pytest.raises(ValueError, match="GPU"):
        Plain.options(num_gpus=3).remote()
    assert ray.get(add.remote(1, 2), timeout=30) == 3


@ray.remote
def submit_infeasible():
    try:
        add.options(num_gpus=5).remote(1, 2)
    except ValueError as err:
        return str(err)
    return None


def test_infeasible_request_inside_a_task_raises_there(start):
    start(num_cpus=2, num_gpus=1)
    text = ray.get(submit_infeasible.remote(), timeout=30)
    assert text is not None and "GPU" in text



# A whole-GPU task gets a device no fractional task is using.
@ray.remote
def device_until(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@ray.remote
def device_now():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_whole_gpu_task_does_not_share_a_fractionally_used_device(start, tmp_path):
    start(num_cpus=2, num_gpus=2)
    release = str(tmp_path / "release")
    half = device_until.options(num_gpus=0.5).remote(release)
    assert procs.wait_until(lambda: ray.available_resources().get("GPU") == 1.5, 20)
    whole = device_now.options(num_gpus=1, num_cpus=0).remote()
    whole_device = ray.get(whole, timeout=30)
    open(release, "w").close()
    half_device = ray.get(half, timeout=30)
    # Device 1 was entirely free; device 0 was half used.
    assert whole_device != half_device, (whole_device, half_device)


# An actor waiting for a busy GPU (or any resource) does not keep later actors
# that fit from starting.
def test_actor_waiting_for_a_gpu_does_not_block_other_actors(start):
    start(num_cpus=2, num_gpus=1)
    holder = Pid.options(num_gpus=1).remote()
    assert ray.get(holder.pid.remote(), timeout=30) > 0
    waiting = Pid.options(num_gpus=1).remote()  # must wait for the GPU: fine
    free = Pid.remote()                         # needs nothing: must start now
    assert ray.get(free.pid.remote(), timeout=15) > 0
    ray.kill(holder)
    assert ray.get(waiting.pid.remote(), timeout=30) > 0


# ====================================================================================
# worker output
# ====================================================================================
def test_worker_output_is_prefixed_with_task_name_and_pid(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        import beamlet as ray
        ray.init(backend="local", num_cpus=2)

        @ray.remote
        def chatty():
            print("hello from chatty")
            print("to stderr", file=sys.stderr)
            return os.getpid()

        @ray.remote
        class Talker:
            def talk(self):
                print("actor speaking")
                return os.getpid()

        print("TASKPID", ray.get(chatty.remote()), flush=True)
        print("ACTORPID", ray.get(Talker.remote().talk.remote()), flush=True)
        ray.shutdown()
    """)
    driver = procs.Driver(script, tmp_path)
    try:
        code = driver.finish(SUBPROCESS_TIMEOUT)
    finally:
        driver.kill()
    out, err = driver.stdout, driver.stderr
    assert code == 0, err
    task_pid = int(re.search(r"TASKPID (\d+)", out).group(1))
    actor_pid = int(re.search(r"ACTORPID (\d+)", out).group(1))
    assert f"(chatty pid={task_pid}) hello from chatty" in out, out
    assert f"(chatty pid={task_pid}) to stderr" in err, err
    assert re.search(rf"\(\S*Talker\S* pid={actor_pid}\) actor speaking", out), out


# ====================================================================================
# nothing left behind
# ====================================================================================
@ray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n


def test_shutdown_leaves_nothing_behind(start):
    backend = start(object_store_memory=30 * MB)
    refs = [ray.put(np.full(10 * MB // 8, float(i))) for i in range(4)]  # spills: temp dir used
    assert backend.object_store.stats()["spilled_bytes"] > 0
    assert os.path.isdir(backend.temp_dir)
    counter = Counter.remote()
    assert ray.get(counter.incr.remote(), timeout=30) == 1
    assert ray.get(tree.remote(2, 3), timeout=60) == 9  # more workers while blocked
    results = [make_array.remote(MB, 1.0) for _ in range(2)]
    ray.get(results, timeout=30)
    fp = procs.footprint(backend)
    assert len(fp["procs"]) >= 3 and procs.segments(backend.session)
    threads = threading.active_count()
    ray.shutdown()
    procs.assert_all_gone(fp)
    assert threading.active_count() < threads  # the I/O thread is gone
    del refs, results


_BUSY_DRIVER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import beamlet as ray
    ray.init(backend="local", num_cpus=2, object_store_memory=30_000_000)

    @ray.remote
    def sleep_long(seconds):
        time.sleep(seconds)
        return seconds

    @ray.remote
    class Holder:
        def put(self):
            self.ref = ray.put(np.ones(1_000_000))
            return True

    refs = [ray.put(np.full(1_250_000, float(i))) for i in range(4)]  # 10 MB each: spills
    holder = Holder.remote()
    assert ray.get(holder.put.remote())
    running = [sleep_long.remote(60) for _ in range(2)]
    time.sleep(0.5)  # let the sleeping tasks reach their workers
""") + procs.PRINT_FOOTPRINT


def _check_driver_footprint(fp: dict, running: bool = True) -> None:
    assert len(fp["procs"]) >= 3, fp  # zygote, two workers, the actor
    if running:  # (a driver that goes on to exit may be cleaning up already)
        assert all(procs.alive(p) for p in fp["procs"]), fp
        assert procs.segments(fp["session"]), "the driver made no segment"


def test_interpreter_exit_leaves_nothing_behind(tmp_path):
    script = _BUSY_DRIVER.replace("running = [sleep_long.remote(60) for _ in range(2)]",
                                  "running = [sleep_long.remote(0.1) for _ in range(2)]")
    script += "\nprint('EXITING', flush=True)\n"  # no shutdown(): atexit does it
    driver = procs.Driver(script, tmp_path)
    try:
        fp = driver.footprint()
        _check_driver_footprint(fp, running=False)
        code = driver.finish(SUBPROCESS_TIMEOUT)
    finally:
        driver.kill()
    assert code == 0, driver.stderr
    assert "EXITING" in driver.stdout
    procs.assert_all_gone(fp, 10)


def test_sigkilled_driver_leaves_nothing_behind(tmp_path):
    script = _BUSY_DRIVER + "\nray.get(running)\n"
    driver = procs.Driver(script, tmp_path)
    try:
        fp = driver.footprint()
        _check_driver_footprint(fp)
    finally:
        driver.kill()  # SIGKILL: no atexit, no shutdown()
    assert driver.proc.returncode == -signal.SIGKILL
    # The zygote sees its stdin close; the workers see the driver's socket close.
    procs.assert_all_gone(fp, 10)


def test_ctrl_c_in_driver_blocked_in_get_leaves_nothing_behind(tmp_path):
    script = _BUSY_DRIVER + textwrap.dedent("""
        print("BLOCKING", flush=True)
        ray.get(running)
        print("NOT REACHED", flush=True)
    """)
    driver = procs.Driver(script, tmp_path)
    try:
        fp = driver.footprint()
        _check_driver_footprint(fp)
        driver.wait_line("BLOCKING", 30)
        time.sleep(0.2)  # let it enter get(); an earlier SIGINT would be a Ctrl-C all the same
        driver.proc.send_signal(signal.SIGINT)
        code = driver.finish(SUBPROCESS_TIMEOUT)
    finally:
        driver.kill()
    assert code != 0
    assert "KeyboardInterrupt" in driver.stderr, driver.stderr
    assert "NOT REACHED" not in driver.stdout
    procs.assert_all_gone(fp, 10)


def test_a_shutdown_while_the_zygote_loads_numpy_stops_it_cleanly(tmp_path):
    """The zygote loads numpy at its first idle moment, and a shutdown may stop it
    inside that import, where numpy's own handling turns the stop into an
    ImportError: still a clean stop, with no traceback and nothing left. (The
    numpy here is a stand-in that the zygote finds first on its path, its working
    directory, and whose import takes long and fails as numpy's does.)"""
    work = tmp_path / "work"
    (work / "numpy").mkdir(parents=True)
    started = tmp_path / "numpy-import-started"
    (work / "numpy" / "__init__.py").write_text(textwrap.dedent(f"""
        import time
        open({str(started)!r}, "w").close()
        try:
            time.sleep(60)
        except BaseException as err:
            raise ImportError("Importing the numpy C-extensions failed.") from err
    """))
    script = textwrap.dedent(f"""
        import os, time
        import beamlet as ray
        ray.init(backend="local", num_cpus=1)
        assert ray.get(ray.remote(lambda: 1).remote(), timeout=60) == 1
    """) + procs.PRINT_FOOTPRINT + textwrap.dedent(f"""
        deadline = time.monotonic() + 60
        while not os.path.exists({str(started)!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("LOADING", os.path.exists({str(started)!r}), flush=True)
        ray.shutdown()
        print("DONE", flush=True)
    """)
    driver = procs.Driver(script, tmp_path, cwd=work)
    try:
        fp = driver.footprint()
        assert driver.wait_line("LOADING ", 90) == "True", "the zygote never began its numpy"
        code = driver.finish(SUBPROCESS_TIMEOUT)
    finally:
        driver.kill()
    assert code == 0 and "DONE" in driver.stdout, driver.stderr[-3000:]
    assert "Traceback" not in driver.stderr, driver.stderr[-3000:]
    procs.assert_all_gone(fp, 10)


def test_twenty_init_shutdown_cycles_leak_nothing():
    ray.shutdown()  # whatever an earlier test left running
    # (The shared Dask test cluster's scheduler runs in this process, and its
    # workers' connections come and go: stopped here, started again on demand.)
    _dask_cluster.stop()

    def cycle():
        ray.init(backend="local", num_cpus=2)
        backend = _runtime.current().backend
        assert ray.get(add.remote(1, 2), timeout=30) == 3
        x = ray.get(ray.put(np.ones(MB)))
        assert x[0] == 1.0
        del x
        fp = procs.footprint(backend)
        ray.shutdown()
        return fp

    procs.assert_all_gone(cycle())  # warm-up: lazy imports and caches
    gc.collect()
    threads = threading.active_count()
    fds = procs.fd_count()
    footprints = [cycle() for _ in range(20)]
    for fp in footprints:
        procs.assert_all_gone(fp)
    gc.collect()
    assert procs.wait_until(lambda: threading.active_count() <= threads, 5), \
        [t.name for t in threading.enumerate()]
    assert procs.fd_count() <= fds, os.listdir("/proc/self/fd")


# -- threads per worker ------------------------------------------------------------------

@ray.remote
def _omp_threads():
    return os.environ.get("OMP_NUM_THREADS")


def test_workers_default_to_one_blas_thread(start, monkeypatch):
    # With a BLAS thread per core in every worker, small matrix products slow down ~10x.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    start()
    assert ray.get(_omp_threads.remote(), timeout=30) == "1"


def test_workers_keep_the_users_blas_threads(start, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    start()
    assert ray.get(_omp_threads.remote(), timeout=30) == "3"


def test_a_dead_zygote_is_replaced(start):
    backend = start()

    @ray.remote
    class Pid:
        def pid(self):
            return os.getpid()

    first = Pid.remote()
    assert ray.get(first.pid.remote(), timeout=30) > 0
    old = backend.node.launcher.proc
    os.kill(old.pid, signal.SIGKILL)
    old.wait(10)
    # New actors need new workers: the launcher starts another zygote for them.
    actors = [Pid.remote() for _ in range(3)]
    pids = ray.get([a.pid.remote() for a in actors], timeout=30)
    assert len(set(pids)) == 3
    assert backend.node.launcher.proc is not old and backend.node.launcher.proc.poll() is None
    assert ray.get(first.pid.remote(), timeout=30) > 0  # the first actor lived on


def test_workers_forked_once_the_zygote_loaded_numpy_have_numpy_random_each_seeded(start):
    """The zygote loads numpy.random with numpy (numpy 2 loads it on first use),
    so a worker forked after has it without importing it (some 15 ms of CPU in
    each of many workers), and re-seeds it: no two workers draw the same numbers."""
    backend = start(num_cpus=2)  # (two workers forked at init)
    zygote = backend.node.launcher.proc.pid

    def zygote_has_numpy_random() -> bool:
        with open(f"/proc/{zygote}/maps") as f:
            return "/numpy/random/mtrand." in f.read()

    assert procs.wait_until(zygote_has_numpy_random, 60, interval=0.05), \
        "the zygote never loaded numpy.random"

    @ray.remote(num_cpus=0)
    class Draw:
        def __init__(self):
            self.had = "numpy.random" in sys.modules  # (before anything here asks for it)

        def draw(self):
            return self.had, int(np.random.randint(0, 2**62))

    # (six actors: two may take the workers forked at init, maybe before numpy)
    draws = ray.get([a.draw.remote() for a in [Draw.remote() for _ in range(6)]], timeout=60)
    assert sum(had for had, _ in draws) >= 4, draws
    assert len({number for _, number in draws}) == len(draws), draws


def test_workers_forked_after_preload_have_the_modules(start):
    """Backend.preload: the zygote imports the modules, so workers forked after
    start with them (beamlet.tune preloads its trial actor's module)."""
    backend = start()

    @ray.remote(num_cpus=0)
    class Has:
        def has(self, name):
            return name in sys.modules

    # (three: they take the workers forked at init, and one more)
    before = [Has.remote() for _ in range(3)]
    assert ray.get([a.has.remote("wave") for a in before], timeout=30) == [False] * 3
    backend.preload(["wave"])
    after = Has.remote()
    assert ray.get(after.has.remote("wave"), timeout=30) is True
    with pytest.raises(ValueError, match="not a module name"):
        backend.preload(["wave; rm"])

"""Review findings: each test reproduces a bug once found in the local backend
(the section headings say which), and now guards its fix.

Real processes, no mocks; every wait has a deadline; no timing assertions.
"""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.core import runtime as _runtime

import procs

MB = 1_000_000


# `start` (conftest.py): a local backend, checked for leftovers after each test.

# ====================================================================================
# 1. A worker's released borrows are only reported with its *next* message
# ====================================================================================
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


# ====================================================================================
# 2. A restarted actor's constructor arguments were unpinned after the first start
# ====================================================================================
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


# ====================================================================================
# 3. max_task_retries=-1 (retry forever) means no retry at all
# ====================================================================================
@ray.remote
class CrashOnce:
    def __init__(self, d):
        self.d = d

    def once(self):
        if procs.touch_new(self.d, "a") == 0:
            os._exit(1)
        return "ok"


def test_actor_max_task_retries_minus_one_retries(start, tmp_path):
    start()
    actor = CrashOnce.options(max_restarts=-1, max_task_retries=-1).remote(str(tmp_path))
    # The crashing call is retried on the restarted actor (Ray: -1 = without limit).
    assert ray.get(actor.once.remote(), timeout=30) == "ok"
    assert procs.count(str(tmp_path)) == 2


def test_actor_method_option_max_task_retries_minus_one_retries(start, tmp_path):
    start()
    actor = CrashOnce.options(max_restarts=1).remote(str(tmp_path))
    ref = actor.once.options(max_task_retries=-1).remote()
    assert ray.get(ref, timeout=30) == "ok"
    assert procs.count(str(tmp_path)) == 2


# ====================================================================================
# 4. A large result whose ref was dropped before it arrived is "freed" without
#    ever having been counted: shm_bytes goes negative and the cap stops working
# ====================================================================================
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


# ====================================================================================
# 5. A get that timed out inside a task leaves a callback that later "unblocks"
#    the same worker while it is blocked in another task's get: CPU deadlock
# ====================================================================================
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
    assert procs.wait_until(lambda: ray.available_resources()["CPU"] == 1.0, 20)
    open(p1, "w").close()
    assert ray.get(g1, timeout=30) == p1
    open(p2, "w").close()
    pid_b, value = ray.get(out, timeout=15)
    assert value == len(p2)
    assert pid_b == pid_a  # (the scenario: both ran on the same worker)


# ====================================================================================
# 6. Lock-order inversion: a put that needs room frees queued releases (and so
#    calls scheduler.token_released) while holding the store's space lock; the
#    I/O thread stores a task's shared-memory result while holding the scheduler
#    lock and then takes the space lock. Both wait for ever.
# ====================================================================================
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


# ====================================================================================
# 7. An async actor resolves a call's ref arguments with a blocking get on its
#    event loop: a call that depends on an earlier call of the same actor
#    blocks the loop that the earlier call needs to finish
# ====================================================================================
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


# ====================================================================================
# 8. A ref from a session that was shut down, passed to .remote(), hangs for ever
# ====================================================================================
@ray.remote
def identity(x):
    return x


def test_ref_from_a_previous_session_as_an_argument_raises_clearly(start):
    start()
    stale = ray.put(7)
    ray.shutdown()
    start()
    # get(stale) raises ObjectLostError at once; passing it to a task must not hang.
    with pytest.raises((exc.ObjectLostError, ValueError, TypeError)):
        ray.get(identity.remote(stale), timeout=15)


# ====================================================================================
# 9. A constructor that raises when the actor is restarted: the error of every
#    later call must hold the constructor's traceback (it says "None")
# ====================================================================================
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


# ====================================================================================
# 10. `await ref` in a worker caches the object's shared-memory entry for as long
#     as the ref lives; once the object spills, a later get() of it uses the stale
#     entry and raises ObjectLostError (the normal path would restore it)
# ====================================================================================
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


# ====================================================================================
# 11. ref.future() (and so `await ref`) never completes once beamlet shuts down
# ====================================================================================
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


# ====================================================================================
# 12. A whole-GPU task is given the device that fractional tasks already share
# ====================================================================================
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


# ====================================================================================
# 13. An observer plugin that raises loses the task's result: get() hangs
# ====================================================================================
@ray.remote
def answer():
    return 42


def test_raising_task_finished_observer_does_not_lose_results(start):
    from beamlet.core import plugins

    class BrokenMetrics:
        @plugins.hookimpl
        def beamlet_task_finished(self, spec, status, duration):
            raise RuntimeError("metrics backend unreachable")

    plugin = BrokenMetrics()
    start()
    plugins.register(plugin)
    try:
        assert ray.get(answer.remote(), timeout=15) == 42
    finally:
        plugins.unregister(plugin)


# ====================================================================================
# 14. An actor call is sent to the actor before its ref arguments exist and blocks
#     the actor while it resolves them: if producing the argument needs another
#     call on the same actor (from another caller), nothing can ever finish
# ====================================================================================
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


# ====================================================================================
# 15. A detached actor created inside a task dies with that task's worker
# ====================================================================================
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


# ====================================================================================
# 16. Restoring a spilled argument at dispatch can raise ObjectStoreFullError out
#     of _dispatch, after the worker and the CPU were taken: the task is never
#     sent (get hangs) and the worker and CPU stay taken for ever
# ====================================================================================
@ray.remote
def hold_until(x, path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return float(np.asarray(x).sum()) if x is not None else 0.0


@ray.remote
def total(x):
    return float(x.sum())


def test_spilled_argument_that_cannot_be_restored_yet_does_not_lose_the_task(start, tmp_path):
    backend = start(num_cpus=3, object_store_memory=40 * MB)
    a = ray.put(np.ones(MB))                # 8 MB
    b1 = ray.put(np.ones(9 * MB // 4))      # 18 MB
    b2 = ray.put(np.ones(9 * MB // 4))      # 18 MB: `a` spills to make room
    assert backend.object_store.stats()["spilled_bytes"] > 0
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    h1, h2 = hold_until.remote(b1, big), hold_until.remote(b2, big)  # pin b1, b2 while running
    h0 = hold_until.remote(None, small)                              # the third CPU
    assert procs.wait_until(lambda: ray.available_resources()["CPU"] == 0.0, 20)
    t3 = total.remote(a)  # queued: no CPU free
    open(small, "w").close()  # t3 is dispatched now, while b1 and b2 fill the store
    assert ray.get(h0, timeout=30) == 0.0
    open(big, "w").close()
    assert ray.get([h1, h2], timeout=30) == [float(9 * MB // 4)] * 2
    try:
        assert ray.get(t3, timeout=15) == float(MB)
    except exc.ObjectStoreFullError:
        pass  # failing it clearly would be fine too; losing it is not
    assert procs.wait_until(lambda: ray.available_resources()["CPU"] == 3.0, 10), \
        ray.available_resources()


# ====================================================================================
# 17. A bad value for a local-backend option fails after the zygote and the I/O
#     thread were started: an unclear TypeError, and they are left running
# ====================================================================================
BAD_OPTION_DRIVER = """
import json, os, sys, threading, time
import beamlet as ray
import procs

option = json.loads(sys.argv[1])
try:
    ray.init(backend="local", num_cpus=2, **option)
    print("ERROR none", flush=True)
except (TypeError, ValueError) as err:
    print("ERROR " + json.dumps(str(err)), flush=True)
procs.wait_until(lambda: not procs.children_of(os.getpid()), 5)
print("LEFT " + json.dumps({"children": procs.children_of(os.getpid()),
                           "io_threads": [t.name for t in threading.enumerate()
                                          if t.name == "beamlet-io"]}), flush=True)
"""


@pytest.mark.parametrize("option", [{"prestart_workers": "2"}, {"max_workers": "many"}])
def test_bad_local_option_is_named_and_leaves_nothing_running(tmp_path, option):
    import json
    import subprocess
    import sys
    script = tmp_path / "driver.py"
    script.write_text(BAD_OPTION_DRIVER)
    out = subprocess.run([sys.executable, str(script), json.dumps(option)], capture_output=True,
                         text=True, timeout=60, env=procs.driver_env(), cwd=str(tmp_path))
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "ERROR" in lines and "LEFT" in lines, (out.stdout, out.stderr[-2000:])
    assert next(iter(option)) in lines["ERROR"], lines["ERROR"]  # the error names the option
    assert json.loads(lines["LEFT"]) == {"children": [], "io_threads": []}, lines["LEFT"]


# ====================================================================================
# 18. The same stale ref inside a container argument: the task's get hangs
# ====================================================================================
@ray.remote
def get_first(box):
    return ray.get(box[0])


def test_ref_from_a_previous_session_inside_a_container_raises_clearly(start):
    start()
    stale = ray.put(7)
    ray.shutdown()
    start()
    with pytest.raises((exc.ObjectLostError, ValueError, TypeError)):
        ray.get(get_first.remote([stale]), timeout=15)


# ====================================================================================
# 19. A fork request the zygote never carried out (it died first) stays counted in
#     `starting` for ever: no worker is started again for what waits on it
# ====================================================================================
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
# 20. The deferred release does not look at the count again: a handle taken with
#     get_actor() just after the last one was dropped is to an actor that is then
#     killed "because all handles went out of scope" (and its token object freed
#     under a live ref)
# ====================================================================================
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
# 21. Pending actors start strictly in order: one waiting for a busy GPU (or any
#     resource) keeps every later actor from starting, even one that needs nothing
# ====================================================================================
def test_actor_waiting_for_a_gpu_does_not_block_other_actors(start):
    start(num_cpus=2, num_gpus=1)
    holder = Pid.options(num_gpus=1).remote()
    assert ray.get(holder.pid.remote(), timeout=30) > 0
    waiting = Pid.options(num_gpus=1).remote()  # must wait for the GPU: fine
    free = Pid.remote()                         # needs nothing: must start now
    assert ray.get(free.pid.remote(), timeout=15) > 0
    ray.kill(holder)
    assert ray.get(waiting.pid.remote(), timeout=30) > 0

"""Typical Ray core programs, written as Ray's documentation writes them, run
after ``import beamlet as ray`` on every backend.

Each test is one program or idiom from Ray's docs and examples (the core
walkthrough, the task, actor and object patterns, error handling, named and
async actors, ``ray.util``), shrunk to run in well under a second. The Ray
spellings are kept on purpose (``ray.exceptions.RayTaskError``,
``ray.actor.exit_actor()``, ``ray.util.ActorPool``...): the point is that the
program needs no edit. Programs that need tasks to overlap or to run in other
processes skip themselves on backends without that capability. Nothing here
measures time; every ``get`` has a timeout.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import threading
import time

import numpy as np
import pytest

import beamlet as ray
from beamlet.util import ActorPool  # Ray: from ray.util import ActorPool

T = 30  # seconds: the timeout of every get, far above what any of them takes
BACKENDS = ["inprocess", "local"]


# -- tasks ------------------------------------------------------------------------------

@ray.remote
def square(x):
    return x * x


def test_walkthrough_tasks_actors_objects(backend):
    """Ray core walkthrough: tasks, an actor, put/get, refs as arguments."""
    assert ray.get([square.remote(i) for i in range(4)], timeout=T) == [0, 1, 4, 9]

    @ray.remote
    class Counter:
        def __init__(self):
            self.i = 0

        def get(self):
            return self.i

        def incr(self, value):
            self.i += value

    c = Counter.remote()
    for _ in range(10):
        c.incr.remote(1)
    assert ray.get(c.get.remote(), timeout=T) == 10

    @ray.remote
    def sum_matrix(matrix):
        return np.sum(matrix)

    assert ray.get(sum_matrix.remote(np.ones((100, 100))), timeout=T) == 10000.0
    matrix_ref = ray.put(np.ones((1000, 1000)))
    assert ray.get(sum_matrix.remote(matrix_ref), timeout=T) == 1_000_000.0

    @ray.remote
    def function_with_an_argument(value):
        return value + 1

    assert ray.get(function_with_an_argument.remote(square.remote(3)), timeout=T) == 10


def test_remote_as_a_function_not_a_decorator(backend):
    """``ray.remote(f)``, ``ray.remote(**options)(f)`` and ``ray.remote(Cls)``."""
    def plain(x):
        return x + 1

    class Plain:
        def get(self):
            return "state"

    def pair():
        return 1, 2

    assert ray.get(ray.remote(plain).remote(1), timeout=T) == 2
    a, b = ray.remote(num_returns=2)(pair).remote()
    assert ray.get([a, b], timeout=T) == [1, 2]
    assert ray.get(ray.remote(Plain).remote().get.remote(), timeout=T) == "state"


def test_progress_actor_monte_carlo_pi(backend):
    """Ray's getting-started program: sampling tasks report to a progress actor."""
    @ray.remote
    class ProgressActor:
        def __init__(self, total):
            self.total = total
            self.done = {}

        def report_progress(self, task_id, n):
            self.done[task_id] = n

        def get_progress(self):
            return sum(self.done.values()) / self.total

    @ray.remote
    def sampling_task(num_samples, task_id, progress_actor):
        rng = random.Random(task_id)
        inside = 0
        for i in range(num_samples):
            if math.hypot(rng.uniform(-1, 1), rng.uniform(-1, 1)) <= 1:
                inside += 1
            if (i + 1) % 5_000 == 0:
                progress_actor.report_progress.remote(task_id, i + 1)
        progress_actor.report_progress.remote(task_id, num_samples)
        return inside

    n_tasks, n_samples = 4, 20_000
    progress = ProgressActor.remote(n_tasks * n_samples)
    results = [sampling_task.remote(n_samples, i, progress) for i in range(n_tasks)]
    pi = sum(ray.get(results, timeout=T)) * 4 / (n_tasks * n_samples)
    assert 3.0 < pi < 3.3
    # Each task's last report was sent before it returned: all have arrived by now
    # (calls from one caller run in order, and this get follows them).
    deadline = time.monotonic() + T
    while ray.get(progress.get_progress.remote(), timeout=T) != 1:
        assert time.monotonic() < deadline, "progress never reached 100%"
        time.sleep(0.01)


def test_tree_of_tasks_quick_sort(backend):
    """Pattern: nested tasks (a distributed quick sort that gets its subtrees)."""
    # (Every task blocked in get holds a worker process, so the tree needs a
    # dozen or more at once: where each is a new process (Ray: about a second of
    # CPU to start one), a loaded machine takes far more than T.)
    limit = 3 * T

    @ray.remote
    def quick_sort_distributed(collection):
        if len(collection) <= 500:
            return sorted(collection)
        pivot = collection.pop()
        lesser = [e for e in collection if e <= pivot]
        greater = [e for e in collection if e > pivot]
        lesser = quick_sort_distributed.remote(lesser)
        greater = quick_sort_distributed.remote(greater)
        return ray.get(lesser, timeout=limit) + [pivot] + ray.get(greater, timeout=limit)

    unsorted = np.random.default_rng(0).integers(1_000_000, size=5000).tolist()
    assert ray.get(quick_sort_distributed.remote(list(unsorted)),
                   timeout=limit) == sorted(unsorted)


def test_map_reduce_with_star_args(backend):
    """Pattern: map and (tree) reduce, refs unpacked with ``*`` arrive as values."""
    @ray.remote
    def map_(func, obj):
        return func(obj)

    @ray.remote
    def reduce_(func, *objs):
        return func(objs)

    map_outputs = [map_.remote(lambda i: i * 2, i) for i in range(100)]
    assert ray.get(reduce_.remote(sum, *map_outputs), timeout=T) == 9900
    partial = [reduce_.remote(sum, *map_outputs[i * 20:(i + 1) * 20]) for i in range(5)]
    assert ray.get(reduce_.remote(sum, *partial), timeout=T) == 9900


def test_process_results_as_they_finish_with_wait(backend):
    """Anti-pattern fix: process results in completion order with ``ray.wait``."""
    @ray.remote
    def f(i):
        time.sleep(random.random() * 0.005)
        return i

    unfinished = [f.remote(i) for i in range(20)]
    seen = []
    while unfinished:
        finished, unfinished = ray.wait(unfinished, num_returns=1, timeout=T)
        assert len(finished) == 1
        seen.append(ray.get(finished[0], timeout=T))
    assert sorted(seen) == list(range(20))


def test_limit_pending_tasks_with_wait(backend):
    """Pattern: ``ray.wait`` as backpressure on calls to an async actor."""
    @ray.remote
    class Actor:
        async def heavy_compute(self):
            return 1

    actor = Actor.remote()
    max_pending, done, result_refs = 10, 0, []
    for _ in range(100):
        if len(result_refs) > max_pending:
            ready_refs, result_refs = ray.wait(result_refs, num_returns=1, timeout=T)
            done += sum(ray.get(ready_refs, timeout=T))
        result_refs.append(actor.heavy_compute.remote())
        assert len(result_refs) <= max_pending + 1
    done += sum(ray.get(result_refs, timeout=T))
    assert done == 100


def test_multiple_returns_and_generator_returns(backend):
    """``num_returns=3`` from a tuple and from a generator; one ref holds a tuple."""
    @ray.remote
    def return_single():
        return 0, 1, 2

    @ray.remote(num_returns=3)
    def return_multiple():
        return 0, 1, 2

    @ray.remote(num_returns=3)
    def return_multiple_as_generator():
        for i in range(3):
            yield i

    assert ray.get(return_single.remote(), timeout=T) == (0, 1, 2)
    r0, r1, r2 = return_multiple.remote()
    assert ray.get([r0, r1, r2], timeout=T) == [0, 1, 2]
    a, b, c = return_multiple_as_generator.remote()
    assert ray.get([a, b, c], timeout=T) == [0, 1, 2]


def test_options_ray_accepts(backend):
    """Options Ray programs pass that change nothing here are accepted."""
    @ray.remote(enable_task_events=False, max_calls=1, scheduling_strategy="SPREAD")
    def f():
        return 1

    @ray.remote
    class A:
        @ray.method(enable_task_events=False)
        def foo(self):
            return 2

    assert ray.get(f.options(name="named-task").remote(), timeout=T) == 1
    a = A.options(enable_task_events=False, max_pending_calls=10).remote()
    assert ray.get(a.foo.remote(), timeout=T) == 2


# -- ray.util -------------------------------------------------------------------------------

def test_actor_pool_as_in_the_docs(backend):
    @ray.remote
    class Actor:
        def double(self, n):
            return n * 2

    a1, a2 = Actor.remote(), Actor.remote()
    pool = ActorPool([a1, a2])
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4])) == [2, 4, 6, 8]
    assert sorted(pool.map_unordered(lambda a, v: a.double.remote(v), [1, 2, 3])) == [2, 4, 6]
    # Ray's spelling without the import, after map_unordered (get_next resumes in order).
    assert ray.util.ActorPool is ActorPool
    pool.submit(lambda a, v: a.double.remote(v), 10)
    pool.submit(lambda a, v: a.double.remote(v), 20)
    pool.submit(lambda a, v: a.double.remote(v), 30)  # queued until an actor is free
    assert [pool.get_next(timeout=T) for _ in range(3)] == [20, 40, 60]
    assert not pool.has_next()


def test_util_as_completed_and_map_unordered(backend):
    refs = [square.remote(i) for i in range(10)]
    assert sorted(ray.util.as_completed(refs, chunk_size=3, timeout=T)) == \
        [i * i for i in range(10)]
    got = list(ray.util.as_completed(refs, chunk_size=4, yield_obj_refs=True))
    assert sorted(got, key=refs.index) == refs
    assert sorted(ray.util.map_unordered(square, range(7), backpressure_size=2,
                                         chunk_size=1)) == [i * i for i in range(7)]
    with pytest.raises(ValueError):
        list(ray.util.as_completed(refs, num_returns=2))


def test_util_list_named_actors_and_node_ip(backend):
    @ray.remote
    class A:
        def ping(self):
            return "pong"

    a = A.options(name="listed").remote()
    b = A.options(name="elsewhere", namespace="other-ns").remote()
    assert ray.get([a.ping.remote(), b.ping.remote()], timeout=T) == ["pong", "pong"]
    assert ray.util.list_named_actors() == ["listed"]
    assert {"namespace": "other-ns", "name": "elsewhere"} in \
        ray.util.list_named_actors(all_namespaces=True)
    ray.kill(a)
    deadline = time.monotonic() + T
    while "listed" in ray.util.list_named_actors():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert isinstance(ray.util.get_node_ip_address(), str)


# -- actors ---------------------------------------------------------------------------------

@ray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start

    def incr(self):
        self.n += 1
        return self.n


def test_named_actors_get_if_exists_detached(backend):
    c = Counter.options(name="some_name").remote()
    assert ray.get(ray.get_actor("some_name").incr.remote(), timeout=T) == 1
    assert ray.get(c.incr.remote(), timeout=T) == 2
    with pytest.raises(ValueError):
        ray.get_actor("no_such_actor")
    # Get-or-create: the second call returns the first actor, its arguments ignored.
    a = Counter.options(name="g1", get_if_exists=True).remote(10)
    b = Counter.options(name="g1", get_if_exists=True).remote(100)
    assert ray.get([a.incr.remote(), b.incr.remote()], timeout=T) == [11, 12]
    d = Counter.options(name="det", namespace="colors", lifetime="detached").remote()
    del d
    assert ray.get(ray.get_actor("det", namespace="colors").incr.remote(), timeout=T) == 1
    ray.kill(ray.get_actor("det", namespace="colors"))


def test_actor_method_num_returns(backend):
    @ray.remote
    class A:
        @ray.method(num_returns=2)
        def two(self):
            return 1, 2

        def three(self):
            return 1, 2, 3

    a = A.remote()
    r1, r2 = a.two.remote()
    assert ray.get([r1, r2], timeout=T) == [1, 2]
    x, y, z = a.three.options(num_returns=3).remote()
    assert ray.get([x, y, z], timeout=T) == [1, 2, 3]


def test_parameter_server(backend):
    """The parameter-server example: async workers pull and push, then a sync round."""
    @ray.remote
    class ParameterServer:
        def __init__(self, dim):
            self.params = np.zeros(dim)

        def get_params(self):
            return self.params

        def update_params(self, grad):
            self.params += grad

    @ray.remote
    def worker(ps, steps):
        for _ in range(steps):
            params = ray.get(ps.get_params.remote(), timeout=T)
            ray.get(ps.update_params.remote(np.ones_like(params)), timeout=T)

    ps = ParameterServer.remote(10)
    ray.get([worker.remote(ps, 5) for _ in range(2)], timeout=T)
    assert np.allclose(ray.get(ps.get_params.remote(), timeout=T), 10)

    @ray.remote
    class DataWorker:
        def compute_gradients(self, weights):
            return np.ones_like(weights)

    workers = [DataWorker.remote() for _ in range(2)]
    weights = np.zeros(4)
    for _ in range(3):
        weights = weights + sum(ray.get([w.compute_gradients.remote(weights)
                                         for w in workers], timeout=T))
    assert np.allclose(weights, 6)


def test_tree_of_actors_and_pipelining(backend):
    @ray.remote(num_cpus=0)
    class Trainer:
        def __init__(self, hyperparameter, data):
            self.hyperparameter, self.data = hyperparameter, data

        def fit(self):
            return self.data * self.hyperparameter

    @ray.remote(num_cpus=0)
    class Supervisor:
        def __init__(self, hyperparameter, data):
            self.trainers = [Trainer.remote(hyperparameter, d) for d in data]

        def fit(self):
            return ray.get([t.fit.remote() for t in self.trainers], timeout=T)

    s1, s2 = Supervisor.remote(1, [1, 2, 3]), Supervisor.remote(2, [1, 2, 3])
    assert ray.get([s1.fit.remote(), s2.fit.remote()], timeout=T) == [[1, 2, 3], [2, 4, 6]]

    @ray.remote
    class WorkQueue:
        def __init__(self):
            self.queue = list(range(10))

        def get_work_item(self):
            return self.queue.pop(0) if self.queue else None

    @ray.remote
    class WorkerWithPipelining:
        def __init__(self, work_queue):
            self.work_queue = work_queue

        def run(self):
            done, ref = [], self.work_queue.get_work_item.remote()
            while True:
                item = ray.get(ref, timeout=T)
                if item is None:
                    return done
                ref = self.work_queue.get_work_item.remote()  # fetch the next meanwhile
                done.append(item)

    w = WorkerWithPipelining.remote(WorkQueue.remote())
    assert ray.get(w.run.remote(), timeout=T) == list(range(10))


def test_exit_actor(backend):
    @ray.remote
    class Actor:
        def exit(self):
            ray.actor.exit_actor()

        def ping(self):
            return "pong"

    a = Actor.remote()
    assert ray.get(a.ping.remote(), timeout=T) == "pong"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.exit.remote(), timeout=T)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.ping.remote(), timeout=T)
    with pytest.raises(TypeError):
        ray.actor.exit_actor()  # not in an actor
    from beamlet.actor import ActorHandle, exit_actor  # Ray: from ray.actor import ...
    assert exit_actor is ray.actor.exit_actor and isinstance(a, ActorHandle)


def test_exit_actor_in_async_actor(backend):
    @ray.remote
    class AsyncActor:
        async def exit(self):
            ray.actor.exit_actor()

        async def ping(self):
            return "pong"

    a = AsyncActor.remote()
    assert ray.get(a.ping.remote(), timeout=T) == "pong"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.exit.remote(), timeout=T)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.ping.remote(), timeout=T)


def test_ray_terminate_and_ray_ready(backend):
    """``handle.__ray_terminate__.remote()`` ends the actor after the calls before it."""
    a = Counter.remote()
    assert ray.get(a.__ray_ready__.remote(), timeout=T) is True
    before = [a.incr.remote() for _ in range(3)]
    a.__ray_terminate__.remote()
    assert ray.get(before, timeout=T) == [1, 2, 3]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.incr.remote(), timeout=T)


# -- async and threaded actors ------------------------------------------------------------

def test_async_actor_calls_run_concurrently(backend):
    backend.require("parallel")

    @ray.remote
    class AsyncActor:
        def __init__(self, expected):
            self.event = asyncio.Event()
            self.n = 0
            self.expected = expected

        async def run_concurrent(self):
            self.n += 1
            if self.n == self.expected:
                self.event.set()
            await asyncio.wait_for(self.event.wait(), T)
            return self.n

    actor = AsyncActor.remote(4)
    assert ray.get([actor.run_concurrent.remote() for _ in range(4)], timeout=T) == [4] * 4


def test_signal_actor_synchronizes_tasks(backend):
    """Pattern: an async actor used as a signal that tasks block on."""
    backend.require("parallel")

    @ray.remote(num_cpus=0)
    class SignalActor:
        def __init__(self):
            self.ready_event = asyncio.Event()

        def send(self, clear=False):
            self.ready_event.set()
            if clear:
                self.ready_event.clear()

        async def wait(self, should_wait=True):
            if should_wait:
                await self.ready_event.wait()

    @ray.remote
    def wait_and_go(signal):
        ray.get(signal.wait.remote(), timeout=T)
        return "go"

    signal = SignalActor.remote()
    tasks = [wait_and_go.remote(signal) for _ in range(2)]
    ready, _ = ray.wait(tasks, num_returns=2, timeout=0.05)
    assert ready == []  # blocked on the signal
    ray.get(signal.send.remote(), timeout=T)
    assert ray.get(tasks, timeout=T) == ["go", "go"]


def test_await_refs_in_asyncio_code(backend):
    """``await ref``, ``asyncio.gather`` of refs, ``ref.as_future()``, ``ref.future()``."""
    @ray.remote
    class AsyncActor:
        def __init__(self):
            self.n = 0

        async def run(self, x):
            self.n += 1
            await asyncio.sleep(0)
            return x

        def count(self):
            return self.n

    async def main():
        a = AsyncActor.remote()
        first = await a.run.remote(1)
        more = await asyncio.gather(*[a.run.remote(i) for i in (2, 3, 4)])
        fut = await a.run.remote(5).as_future()
        wrapped = await asyncio.wrap_future(a.run.remote(6).future())
        return (first, more, fut, wrapped), await a.count.remote()

    assert asyncio.run(asyncio.wait_for(main(), T)) == ((1, [2, 3, 4], 5, 6), 6)


def test_async_actor_max_concurrency_and_awaiting_another_actor(backend):
    @ray.remote
    class Limited:
        def __init__(self):
            self.running = self.peak = 0

        async def work(self):
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(0.005)
            self.running -= 1

        async def get_peak(self):
            return self.peak

    limited = Limited.options(max_concurrency=2).remote()
    ray.get([limited.work.remote() for _ in range(6)], timeout=T)
    assert 1 <= ray.get(limited.get_peak.remote(), timeout=T) <= 2

    @ray.remote
    class TaskStore:
        def get_next_task(self):
            return "task"

    @ray.remote
    class AsyncTaskExecutor:
        def __init__(self, task_store):
            self.task_store = task_store
            self.num_executed_tasks = 0

        async def run(self, k):
            for _ in range(k):
                await self.task_store.get_next_task.remote()  # yields instead of blocking
                self.num_executed_tasks += 1
            return self.num_executed_tasks

    executor = AsyncTaskExecutor.remote(TaskStore.remote())
    assert ray.get(executor.run.remote(5), timeout=T) == 5


def test_threaded_actor_max_concurrency(backend):
    backend.require("parallel")

    @ray.remote(max_concurrency=2)
    class Threaded:
        def __init__(self):
            self.barrier = threading.Barrier(2, timeout=T)

        def meet(self):
            self.barrier.wait()  # both calls must be running at once to pass
            return threading.get_ident()

    t = Threaded.remote()
    assert len(set(ray.get([t.meet.remote(), t.meet.remote()], timeout=T))) == 2


# -- objects --------------------------------------------------------------------------------

def test_put_large_array_once_for_many_tasks(backend):
    arr = np.random.default_rng(0).random((500, 500))
    ref = ray.put(arr)

    @ray.remote
    def column_sum(a, j):
        return float(a[:, j].sum())

    sums = ray.get([column_sum.remote(ref, j) for j in range(8)], timeout=T)
    assert np.allclose(sums, arr[:, :8].sum(axis=0))


def test_nested_refs_stay_refs_and_refs_to_refs(backend):
    @ray.remote
    def echo_and_get(x_list):
        assert all(isinstance(x, ray.ObjectRef) for x in x_list)
        return ray.get(x_list, timeout=T)

    a, b, c = ray.put(1), ray.put(2), ray.put(3)
    assert ray.get(echo_and_get.remote([a, b, c]), timeout=T) == [1, 2, 3]

    @ray.remote
    def make_ref():
        return ray.put(42)

    inner = ray.get(make_ref.remote(), timeout=T)
    assert isinstance(inner, ray.ObjectRef) and ray.get(inner, timeout=T) == 42
    assert isinstance(a.hex(), str) and isinstance(a.binary(), bytes) and len({a, a}) == 1


def test_get_timeout_raises_get_timeout_error(backend):
    backend.require("parallel")

    @ray.remote
    def slow():
        time.sleep(30)

    ref = slow.remote()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray.get(ref, timeout=0.05)
    with pytest.raises(TimeoutError):  # GetTimeoutError is also a builtin TimeoutError
        ray.get(ref, timeout=0)
    ray.cancel(ref)


# -- errors ---------------------------------------------------------------------------------

def test_task_exceptions_as_ray_documents_them(backend):
    @ray.remote
    def f():
        raise Exception("the real error")

    @ray.remote
    def g(x):
        return

    with pytest.raises(ray.exceptions.RayTaskError, match="the real error"):
        ray.get(f.remote(), timeout=T)
    with pytest.raises(ray.exceptions.RayTaskError, match="the real error"):
        ray.get(g.remote(f.remote()), timeout=T)  # an input could not be computed

    class MyException(Exception):
        pass

    @ray.remote
    def raises_my_exc():
        raise MyException("a user exception")

    with pytest.raises(MyException, match="a user exception") as info:
        ray.get(raises_my_exc.remote(), timeout=T)
    assert isinstance(info.value, ray.exceptions.RayTaskError)
    assert isinstance(info.value.cause, MyException)

    class MyFinalException(Exception):
        def __init_subclass__(cls, *args, **kwargs):
            raise TypeError("Cannot subclass this little exception class.")

    @ray.remote
    def raises_my_final_exc():
        raise MyFinalException("a *final* user exception")

    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(raises_my_final_exc.remote(), timeout=T)
    assert isinstance(info.value.cause, MyFinalException)
    assert issubclass(ray.exceptions.RayTaskError, ray.exceptions.RayError)


def test_killed_actor_raises_ray_actor_error(backend):
    a = Counter.remote()
    assert ray.get(a.incr.remote(), timeout=T) == 1
    ray.kill(a)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.incr.remote(), timeout=T)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(a.incr.remote(), timeout=T)


def test_cancel_raises_task_cancelled_error(backend):
    backend.require("parallel")

    @ray.remote
    def blocking_operation():
        time.sleep(10e6)

    obj_ref = blocking_operation.remote()
    ray.cancel(obj_ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(obj_ref, timeout=T)


def test_retry_exceptions_with_a_class_defined_in_the_program(backend, tmp_path):
    """tasks_fault_tolerance.py: ``retry_exceptions=[RandomError]`` where the class is
    the program's own (not importable by a worker)."""
    class RandomError(Exception):
        pass

    attempts = tmp_path / "attempts"

    @ray.remote(max_retries=3, retry_exceptions=[RandomError])
    def flaky(path):
        with open(path, "a") as f:
            f.write("x")
        with open(path) as f:
            if len(f.read()) < 3:
                raise RandomError("Failed!")
        return "ok"

    assert ray.get(flaky.remote(str(attempts)), timeout=T) == "ok"
    assert attempts.read_text() == "xxx"

    @ray.remote(max_retries=3)
    def bad_input():
        raise ValueError("not retried: not in the list")

    with pytest.raises(ValueError):
        ray.get(bad_input.options(retry_exceptions=[RandomError]).remote(), timeout=T)


def test_worker_crash_retried_then_worker_crashed_error(backend):
    backend.require("isolated", "manages_workers")

    @ray.remote(max_retries=1)
    def potentially_fail():
        os._exit(0)

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(potentially_fail.remote(), timeout=T)


def test_actor_restart_reruns_constructor(backend):
    """actor_restart.py, with max_task_retries=3 (see the report: -1 is not honoured)."""
    backend.require("isolated", "manages_workers")

    @ray.remote(max_restarts=2, max_task_retries=3)
    class Actor:
        def __init__(self):
            self.counter = 0

        def increment_and_possibly_fail(self):
            if self.counter == 3:
                os._exit(0)
            self.counter += 1
            return self.counter

    actor = Actor.remote()
    seen = [ray.get(actor.increment_and_possibly_fail.remote(), timeout=T) for _ in range(8)]
    assert seen == [1, 2, 3, 1, 2, 3, 1, 2]
    ray.get(actor.increment_and_possibly_fail.remote(), timeout=T)  # 3
    with pytest.raises(ray.exceptions.RayActorError):  # restarts used up
        ray.get(actor.increment_and_possibly_fail.remote(), timeout=T)


# -- resources, runtime context, init -----------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_resources_gpus_and_custom(start_backend, name):
    info = start_backend(name, num_cpus=4, num_gpus=2, resources={"Custom": 1})
    total = ray.cluster_resources()
    assert (total["CPU"], total["GPU"], total["Custom"]) == (4, 2, 1)

    @ray.remote(num_gpus=1)
    class GPUActor:
        def ping(self):
            return ray.get_gpu_ids()

    @ray.remote(num_gpus=1)
    def use_gpu():
        return ray.get_gpu_ids(), ray.get_runtime_context().get_assigned_resources()

    @ray.remote(num_gpus=0.25)
    def frac():
        return 1

    @ray.remote(resources={"Custom": 1})
    def custom():
        return ray.get_runtime_context().get_assigned_resources()

    gpu_actor = GPUActor.remote()  # holds its GPU while this handle lives
    actor_gpus = ray.get(gpu_actor.ping.remote(), timeout=T)
    task_gpus, assigned = ray.get(use_gpu.remote(), timeout=T)
    assert assigned["GPU"] == 1
    assert sum(ray.get([frac.remote() for _ in range(4)], timeout=T)) == 4
    assert ray.get(custom.remote(), timeout=T)["Custom"] == 1
    assert ray.get_gpu_ids() == [0, 1]  # the driver sees every GPU
    if info.isolated:  # the inprocess backend hands out no device ids (see the report)
        assert len(actor_gpus) == 1 and len(task_gpus) == 1
        assert actor_gpus != task_gpus  # the actor holds one GPU, the task gets the other
    assert set(ray.available_resources()) <= set(total) | {"memory", "object_store_memory"}


def test_runtime_context(backend):
    ctx = ray.get_runtime_context()
    assert ctx.get_task_id() is None and ctx.get_actor_id() is None
    assert ctx.get_actor_name() is None
    assert ctx.get_job_id() and ctx.get_node_id() and isinstance(ctx.namespace, str)

    @ray.remote
    def task_ids():
        c = ray.get_runtime_context()
        return c.get_task_id(), c.get_actor_id(), c.get_node_id()

    task_id, actor_id, node_id = ray.get(task_ids.remote(), timeout=T)
    assert task_id and actor_id is None
    if backend.multi_node:  # (the task may run on another node than the driver's)
        assert node_id in {n["NodeID"] for n in ray.nodes()}
    else:
        assert node_id == ctx.get_node_id()

    @ray.remote
    class A:
        def ids(self):
            c = ray.get_runtime_context()
            return c.get_actor_id(), c.get_task_id()

        def me(self):
            return ray.get_runtime_context().current_actor

        def name(self):
            return ray.get_runtime_context().get_actor_name()

        def gpus(self):
            return ray.get_runtime_context().get_accelerator_ids()

    a = A.options(name="ctx_actor").remote()
    actor_id, task_id = ray.get(a.ids.remote(), timeout=T)
    assert actor_id == a.actor_id and task_id
    me = ray.get(a.me.remote(), timeout=T)
    assert me == a and ray.get(me.ids.remote(), timeout=T)[0] == actor_id
    assert ray.get(a.name.remote(), timeout=T) == "ctx_actor"
    assert ray.get(A.remote().name.remote(), timeout=T) == ""
    assert ray.get(a.gpus.remote(), timeout=T) == {"GPU": []}
    with pytest.raises(RuntimeError):
        ctx.current_actor  # noqa: B018 - not in an actor


@pytest.mark.parametrize("name", BACKENDS)
def test_init_options_and_context(no_backend, name):
    ctx = ray.init(backend=name, num_cpus=2, ignore_reinit_error=True, include_dashboard=False,
                   log_to_driver=False, logging_level="ERROR", configure_logging=False,
                   runtime_env={"env_vars": {"UNUSED": "1"}})
    assert ray.is_initialized() and ctx["backend"] == name
    assert ray.init(ignore_reinit_error=True)["backend"] == name
    assert ctx.address_info["namespace"] == ray.get_runtime_context().namespace
    assert ctx.dashboard_url is None
    ctx.disconnect()
    assert not ray.is_initialized()
    with ray.init(backend=name, num_cpus=1) as ctx:  # Ray's context-manager form
        assert ray.get(square.remote(3), timeout=T) == 9
    assert not ray.is_initialized()
    ray.init(backend=name, address="local", num_cpus=1)  # "local": start one here
    assert ray.get(square.remote(4), timeout=T) == 16
    ray.shutdown()

"""The semantic suite: Ray's programming model as beamlet promises it
(shared/SEMANTICS.md beside the checkout and issue 2), run on every backend by the ``backend``
fixture. Tests that need tasks to overlap, to run in other processes or to
read shared memory skip themselves through the backend's capability flags.

Nothing here measures time: where a test must wait for something to happen
on a parallel backend it polls with a generous deadline, and blocked tasks
wait on a "gate" file that the test creates, so they end on their own.
"""
from __future__ import annotations

import asyncio
import gc
import os
import pickle
import threading
import time

import numpy as np
import pytest

import beamlet as ray
from beamlet import exceptions as E
from beamlet.core import runtime as _runtime
from beamlet.core.remote_function import _call_options
from beamlet.util import ActorPool
from conftest import own_init_options
from procs import eventually

LONG = 60  # seconds: an upper bound for waits that should end at once


# -- helpers ------------------------------------------------------------------------

def count_attempt(path) -> int:
    """Append a line to `path`; return how many lines it has now (attempts so far)."""
    with open(path, "a") as f:
        f.write("x\n")
    with open(path) as f:
        return len(f.readlines())


def read_count(path) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.readlines())


class CustomError(Exception):
    pass


# -- remote functions (module level, so every backend can import them) -----------------

@ray.remote
def square(x):
    return x * x


@ray.remote
def add(a, b=0, *, c=0):
    return a + b + c


@ray.remote
def identity(x):
    return x


@ray.remote
def type_names(top, in_list, in_dict, *, kw):
    return type(top).__name__, type(in_list[0]).__name__, type(in_dict["k"]).__name__, \
        type(kw).__name__


@ray.remote
def get_first(refs):
    return ray.get(refs[0])


@ray.remote(num_returns=3)
def three(x):
    return x, x + 1, x + 2


@ray.remote
def make_ref(value):
    return ray.put(value)


@ray.remote
def boom(msg):
    raise ValueError(msg)


@ray.remote
def raise_custom():
    raise CustomError("custom failure")


@ray.remote
def downstream(x):
    return x


@ray.remote
def outer_of_failing():
    return ray.get(boom.remote("inner failure"))


@ray.remote
def fan_out(n):
    # A task that submits tasks and waits for them (nested parallelism).
    return sum(ray.get([square.remote(i) for i in range(n)]))


@ray.remote
def fib(n):
    if n < 2:
        return n
    return sum(ray.get([fib.remote(n - 1), fib.remote(n - 2)]))


@ray.remote
def mutate(values):
    values.append("changed")
    return values


@ray.remote
def wait_for_file(path, value=None, limit=30.0):
    """Blocks until `path` exists (the test's gate), at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)
    return value


@ray.remote
def context_info():
    ctx = ray.get_runtime_context()
    return ctx.get_task_id(), ctx.get_actor_id(), ctx.get_job_id(), ctx.get_node_id(), \
        ctx.get_assigned_resources()


@ray.remote
def fail_until(path, succeed_on):
    attempt = count_attempt(path)
    if attempt < succeed_on:
        raise ValueError(f"attempt {attempt} fails")
    return attempt


@ray.remote
def raise_type(path, exc_type):
    count_attempt(path)
    raise exc_type("always")


@ray.remote
def crash_until(path, succeed_on):
    if count_attempt(path) < succeed_on:
        os._exit(1)
    return "survived"


@ray.remote
def available_cpus(until=None):
    """The CPUs available now; with `until`, once that many are (at most 20 s)."""
    cpus = ray.available_resources().get("CPU", 0.0)
    deadline = time.monotonic() + 20
    while until is not None and cpus != until and time.monotonic() < deadline:
        time.sleep(0.02)
        cpus = ray.available_resources().get("CPU", 0.0)
    return cpus


@ray.remote
def return_array(n):
    return np.arange(n, dtype=np.float64)


@ray.remote
def array_sum(a):
    return float(a.sum())


@ray.remote
def call_actor(handle, n):
    return ray.get([handle.inc.remote() for _ in range(n)])


@ray.remote
def make_counter(start):
    c = Counter.remote(start)
    ray.get(c.value.remote())
    return c


@ray.remote
def count_then_sleep(path):
    count_attempt(path)
    time.sleep(60)
    return "not cancelled"


# -- actors ---------------------------------------------------------------------------

@ray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.log = []

    def inc(self, by=1):
        self.n += by
        return self.n

    def append(self, item):
        self.log.append(item)

    def get_log(self):
        return list(self.log)

    def value(self):
        return self.n

    def fail(self, msg):
        raise ValueError(msg)

    @ray.method(num_returns=2)
    def pair(self):
        return self.n, -self.n

    def two_values(self):
        return "a", "b"

    def context(self):
        ctx = ray.get_runtime_context()
        return ctx.get_actor_id(), ctx.get_task_id()

    def put_value(self, value):
        return [ray.put(value)]  # in a list, so the caller gets the ref itself

    def pid(self):
        return os.getpid()


@ray.remote
class Relay:
    """An actor that calls another actor through a handle it was given."""

    def __init__(self, target):
        self.target = target

    def forward(self, n):
        return ray.get([self.target.inc.remote() for _ in range(n)])[-1]


@ray.remote
class BadInit:
    def __init__(self):
        raise RuntimeError("constructor exploded")

    def ping(self):
        return "pong"


@ray.remote
class AsyncActor:
    def __init__(self):
        self.inflight = 0
        self.peak = 0

    async def double(self, x):
        await asyncio.sleep(0)
        return 2 * x

    async def await_ref(self, refs):
        return await refs[0]

    async def hold(self, target, limit=3.0):
        """Stay in flight until `target` calls are (or `limit` passes); record the peak."""
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        deadline = time.monotonic() + limit
        while self.inflight < target and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # let any call beyond the cap sneak in, if it could
        self.inflight -= 1

    async def get_peak(self):
        return self.peak


@ray.remote
class Fragile:
    def __init__(self):
        self.calls = 0

    def state(self):
        self.calls += 1
        return os.getpid(), self.calls

    def crash(self):
        os._exit(1)

    def reconstructed(self):
        return ray.get_runtime_context().was_current_actor_reconstructed


# ======================================================================================
# init, shutdown, backend selection
# ======================================================================================

def test_init_shutdown_and_is_initialized(backend_name):
    assert not ray.is_initialized()
    info = ray.init(backend=backend_name, **own_init_options(backend_name))
    assert ray.is_initialized()
    assert info["backend"] == backend_name
    assert ray.get_runtime_context().backend == backend_name
    assert ray.get(square.remote(3)) == 9
    ray.shutdown()
    assert not ray.is_initialized()
    ray.shutdown()  # idempotent
    # and it starts again after a shutdown
    ray.init(backend=backend_name, **own_init_options(backend_name))
    assert ray.get(square.remote(4)) == 16


def test_backend_env_var_selects_backend(backend_name, monkeypatch):
    monkeypatch.setenv("BEAMLET_BACKEND", backend_name)
    info = ray.init(**own_init_options(backend_name))
    assert info["backend"] == backend_name
    assert ray.get_runtime_context().backend == backend_name


def test_explicit_backend_wins_over_env_var(backend_name, monkeypatch):
    monkeypatch.setenv("BEAMLET_BACKEND", "no-such-backend")
    info = ray.init(backend=backend_name, **own_init_options(backend_name))
    assert info["backend"] == backend_name


def test_local_mode_means_inprocess(no_backend):
    info = ray.init(local_mode=True, num_cpus=2)
    assert info["backend"] == "inprocess"
    assert ray.get_runtime_context().backend == "inprocess"


def test_ignore_reinit_error_keeps_the_running_backend(backend):
    job = ray.get_runtime_context().get_job_id()
    info = ray.init(backend="inprocess", ignore_reinit_error=True)
    assert info["backend"] == backend.name
    assert ray.get_runtime_context().get_job_id() == job
    assert ray.get(square.remote(5)) == 25


@pytest.mark.parametrize("first_call", ["put", "remote", "get", "actor"])
def test_auto_init_before_init(backend_name, monkeypatch, first_call):
    monkeypatch.setenv("BEAMLET_BACKEND", backend_name)
    assert not ray.is_initialized()
    if first_call == "put":
        assert ray.get(ray.put("v")) == "v"
    elif first_call == "remote":
        assert ray.get(square.remote(6)) == 36
    elif first_call == "get":
        assert ray.get([]) == []
    else:
        assert ray.get(Counter.remote().inc.remote()) == 1
    assert ray.is_initialized()
    assert ray.get_runtime_context().backend == backend_name


def test_namespace_option(backend_name):
    info = ray.init(backend=backend_name, **own_init_options(backend_name), namespace="team-a")
    assert info["namespace"] == "team-a"
    assert ray.get_runtime_context().namespace == "team-a"
    assert ray.get_runtime_context().get_namespace() == "team-a"


# ======================================================================================
# tasks
# ======================================================================================

def test_tasks_return_values(backend):
    refs = [square.remote(i) for i in range(8)]
    assert all(isinstance(r, ray.ObjectRef) for r in refs)
    assert ray.get(refs) == [i * i for i in range(8)]
    assert ray.get(tuple(refs[:2])) == [0, 1]
    assert ray.get(refs[3]) == 9


def test_args_kwargs_and_defaults(backend):
    assert ray.get(add.remote(1)) == 1
    assert ray.get(add.remote(1, 2)) == 3
    assert ray.get(add.remote(1, b=2, c=3)) == 6
    assert ray.get(add.remote(a=1, c=10)) == 11


def test_lambda_and_closure_as_remote_functions(backend):
    offset = 100
    plus = ray.remote(lambda x: x + offset)
    assert ray.get(plus.remote(1)) == 101

    def local_fn(x):
        return [x, offset]

    assert ray.get(ray.remote(local_fn).remote(2)) == [2, 100]


def test_arguments_are_copies(backend):
    values = ["original"]
    assert ray.get(mutate.remote(values)) == ["original", "changed"]
    assert values == ["original"]
    ref = ray.put(values)
    values.append("later")
    assert ray.get(ref) == ["original"]


def test_num_returns_gives_k_refs(backend):
    refs = three.remote(10)
    assert isinstance(refs, list) and len(refs) == 3
    assert all(isinstance(r, ray.ObjectRef) for r in refs)
    assert ray.get(refs) == [10, 11, 12]
    assert ray.get(refs[2]) == 12


def test_options_num_returns_one_on_k_return_function(backend):
    ref = three.options(num_returns=1).remote(1)
    assert isinstance(ref, ray.ObjectRef)
    assert tuple(ray.get(ref)) == (1, 2, 3)
    # .options() does not change the function itself
    assert len(three.remote(0)) == 3


def test_options_num_returns_on_plain_function(backend):
    a, b = identity.options(num_returns=2).remote(["x", "y"])
    assert ray.get([a, b]) == ["x", "y"]


@ray.remote
class Tally:
    def __init__(self):
        self.n = 0

    def add(self):
        self.n += 1

    def total(self):
        return self.n


@ray.remote(num_returns=0)
def bump(tally):
    ray.get(tally.add.remote(), timeout=LONG)


def test_num_returns_zero_runs_for_effects_and_returns_none(backend):
    """As in Ray: no ref to wait on; the call still runs (calls from one
    caller to one actor keep their order)."""
    tally = Tally.remote()
    assert tally.add.options(num_returns=0).remote() is None
    assert ray.get(tally.total.remote(), timeout=LONG) == 1
    assert bump.remote(tally) is None
    until = time.monotonic() + LONG
    while ray.get(tally.total.remote(), timeout=LONG) != 2:
        assert time.monotonic() < until, "the num_returns=0 task never ran"
        time.sleep(0.01)


def test_ref_to_ref_is_not_flattened(backend):
    outer = make_ref.remote("deep")
    inner = ray.get(outer)
    assert isinstance(inner, ray.ObjectRef)
    assert ray.get(inner, timeout=LONG) == "deep"
    # still alive later: the stored value keeps the ref it contains alive
    gc.collect()
    assert ray.get(ray.get(outer)) == "deep"


def test_top_level_refs_resolved_nested_refs_stay_refs(backend):
    ref = ray.put(7)
    assert ray.get(type_names.remote(ref, [ref], {"k": ref}, kw=ref)) == \
        ("int", "ObjectRef", "ObjectRef", "int")
    assert ray.get(get_first.remote([ref])) == 7
    # a task's own result ref, as an argument
    assert ray.get(square.remote(square.remote(3))) == 81


def test_dynamic_graph_of_dependent_tasks(backend):
    x = square.remote(2)
    y = square.remote(3)
    z = add.remote(x, y)
    w = add.remote(z, b=x, c=y)
    assert ray.get(w) == (4 + 9) + 4 + 9


def test_nested_tasks(backend):
    assert ray.get([fan_out.remote(4), fan_out.remote(5)]) == [14, 30]


def test_recursive_remote_function(backend):
    assert ray.get(fib.remote(6)) == 8


def test_blocked_get_releases_cpu(backend):
    # 4 outer tasks each waiting on inner tasks, with num_cpus=2: if a task blocked
    # in get kept its CPU, the inner tasks could never run.
    refs = [fan_out.remote(3) for _ in range(4)]
    assert ray.get(refs, timeout=LONG) == [5, 5, 5, 5]


@ray.remote
def fan_out_waiting(n):
    # Like fan_out, but blocked in wait() rather than get().
    pending = [square.remote(i) for i in range(n)]
    done = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=LONG)
        done.extend(ready)
    return sum(ray.get(done))


def test_blocked_wait_releases_cpu(backend):
    # 4 outer tasks blocked in wait() on their inner tasks, on 2 CPUs.
    refs = [fan_out_waiting.remote(3) for _ in range(4)]
    assert ray.get(refs, timeout=LONG) == [5, 5, 5, 5]


@ray.remote(num_cpus=1)
class Waiter:
    def fetch(self, n):
        # An actor holding a CPU that waits on a task: the task needs that CPU.
        return ray.get(square.remote(n), timeout=LONG)

    def fetch_with_wait(self, n):
        ref = square.remote(n)
        ready, _ = ray.wait([ref], timeout=LONG)
        return ray.get(ready[0]) if ready else None


def test_actors_holding_every_cpu_lend_them_while_blocked(backend):
    backend.require("parallel", "actors_lend_cpus")
    actors = [Waiter.remote() for _ in range(2)]  # num_cpus=2: both CPUs are theirs
    assert ray.get([a.fetch.remote(3) for a in actors], timeout=LONG) == [9, 9]
    assert ray.get([a.fetch_with_wait.remote(4) for a in actors], timeout=LONG) == [16, 16]


def test_future_callbacks_do_not_run_on_the_backends_threads(backend):
    # A callback that blocks (here: a get of another task) must not stall the
    # thread that delivers results, or that get could never return.
    import threading
    seen = {}
    finished = threading.Event()

    def callback(fut):
        seen["thread"] = threading.current_thread().name
        seen["value"] = fut.result() + ray.get(square.remote(5), timeout=LONG)
        finished.set()

    square.remote(4).future().add_done_callback(callback)
    assert finished.wait(LONG), "the future's callback never finished"
    assert seen["value"] == 16 + 25
    assert seen["thread"] == "beamlet-callbacks"


def test_large_numpy_arguments_and_results(backend):
    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: above any inline threshold
    assert ray.get(array_sum.remote(big)) == float(big.sum())
    ref = ray.put(big)
    assert ray.get(array_sum.remote(ref)) == float(big.sum())
    out = ray.get(return_array.remote(300_000))
    assert isinstance(out, np.ndarray) and out.shape == (300_000,)
    np.testing.assert_array_equal(out, big)


# ======================================================================================
# objects and refs
# ======================================================================================

def test_put_get_values(backend):
    value = {"a": [1, 2, 3], "b": ("x", None), "c": 1.5}
    assert ray.get(ray.put(value)) == value
    assert ray.get(ray.put(None)) is None
    assert ray.get([]) == []
    ref = ray.put(42)
    assert ray.get(ref, timeout=0) == 42


@ray.remote
def read_refs(refs):
    return ray.get(refs)


@ray.remote
class RefReader:
    def read(self, refs):
        return ray.get(refs)


def test_a_put_is_its_value_at_the_call_and_ready_everywhere_at_once(backend):
    """``put`` returns a ref that is ready at once; its object is the value as
    it was at the call (changed afterwards, it stays); a task, an actor and a
    ref inside another put read it, also among many puts made in a row."""
    small, large = np.arange(10), np.arange(200_000)
    refs = [ray.put(small), ray.put(large)]
    small[:] = -1
    large[:] = -1
    assert ray.wait(refs, num_returns=2, timeout=0)[1] == []
    assert ray.get(refs[0], timeout=0).tolist() == list(range(10))
    many = [ray.put({"i": i}) for i in range(300)]
    outer = ray.put(refs + many)
    expected = [list(range(10)), list(range(200_000))] + [{"i": i} for i in range(300)]
    assert ray.get(read_refs.remote(ray.get(outer)), timeout=60)[2:] == expected[2:]
    first = ray.get(read_refs.remote(refs), timeout=60)
    assert [a.tolist() for a in first] == expected[:2]
    actor = RefReader.remote()
    assert ray.get(actor.read.remote(many[-3:]), timeout=60) == expected[-3:]
    assert ray.get(actor.read.remote(ray.get(outer)[:1]), timeout=60)[0].tolist() == \
        expected[0]


@pytest.mark.parametrize("n", [10, 200_000])
def test_put_numpy_arrays(backend, n):
    arr = np.arange(n, dtype=np.int64)
    out = ray.get(ray.put(arr))
    assert isinstance(out, np.ndarray) and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("n", [10, 200_000])
def test_numpy_from_get_is_read_only_on_zero_copy_backends(backend, n):
    backend.require("zero_copy")
    out = ray.get(ray.put(np.arange(n)))
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 5
    out2 = ray.get(return_array.remote(n))
    assert not out2.flags.writeable


def _array_samples() -> list:
    """Arrays of every layout a value can hold: C and F order, 0-d, empty,
    structured, big-endian, strings, datetimes, non-contiguous, objects."""
    grid = np.arange(12, dtype=np.int32).reshape(3, 4)
    return [np.arange(10.0), grid, np.asfortranarray(grid), np.arange(20)[::2], grid.T[1:],
            np.array(2.5, np.float32), np.float32(3.0), np.zeros(0), np.zeros((0, 3), np.int8),
            np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), np.arange(5, dtype=">i4"),
            np.array(["ab", "c"]), np.array(["2026-12-01"], dtype="datetime64[D]"),
            np.array([1, "a", None], dtype=object), np.zeros((2, 2), dtype=("f8", (3,)))]


def _assert_same_array(out, arr):
    assert type(out) is type(arr) and out.dtype == arr.dtype and out.shape == arr.shape
    if arr.dtype.hasobject:
        assert out.tolist() == arr.tolist()
    else:
        np.testing.assert_array_equal(out, arr)
    if isinstance(arr, np.ndarray) and arr.ndim > 1:
        assert out.flags.f_contiguous == arr.flags.f_contiguous


def test_small_arrays_travel_in_the_stream_and_large_ones_out_of_band():
    """Small arrays are pickled in the stream while the value's arrays total at
    most SMALL_ARRAY_BYTES, and come back the same (dtype, shape, order,
    values), the contiguous ones read-only as from shared memory; past that
    budget, and for any large array, the buffers stay out of band."""
    from beamlet.core.serialization import SMALL_ARRAY_BYTES, deserialize, serialize
    for arr in _array_samples():
        sobj = serialize(arr)
        assert not sobj.buffers, arr
        out = deserialize(sobj)
        _assert_same_array(out, arr)
        if isinstance(arr, np.ndarray) and not arr.dtype.hasobject and (
                arr.flags.c_contiguous or arr.flags.f_contiguous):
            assert not out.flags.writeable, arr
    step = np.ones(SMALL_ARRAY_BYTES // 8 // 4)    # a quarter of the budget each
    value = {"small": [step.copy() for _ in range(6)], "large": np.ones(SMALL_ARRAY_BYTES)}
    sobj = serialize(value)
    # 4 small arrays fill the budget: the 2 after them and the large one are out of band
    assert len(sobj.buffers) == 3
    assert max(memoryview(b).nbytes for b in sobj.buffers) == 8 * SMALL_ARRAY_BYTES
    out = deserialize(sobj)
    assert all(np.array_equal(a, step) for a in out["small"])
    assert out["large"].sum() == SMALL_ARRAY_BYTES
    # The budget is per value: the next one starts afresh.
    assert not serialize([step.copy() for _ in range(4)]).buffers


def test_arrays_of_every_layout_round_trip_through_put_and_tasks(backend):
    samples = _array_samples()
    for arr, out in zip(samples, ray.get([ray.put(a) for a in samples])):
        _assert_same_array(out, arr)
    for arr, out in zip(samples, ray.get([identity.remote(a) for a in samples], timeout=LONG)):
        _assert_same_array(out, arr)


def test_object_ref_hashable_and_comparable(backend):
    a = ray.put(1)
    b = ray.put(1)
    assert a != b
    assert a == ray.ObjectRef(a.binary())
    assert len({a, b, a}) == 2
    table = {a: "a", b: "b"}
    assert table[a] == "a"
    assert isinstance(a.hex(), str) and bytes.fromhex(a.hex()) == a.binary()


def test_object_ref_future(backend):
    fut = square.remote(9).future()
    assert fut.result(timeout=LONG) == 81
    failing = boom.remote("in a future").future()
    with pytest.raises(ValueError, match="in a future"):
        failing.result(timeout=LONG)


def test_object_ref_is_awaitable(backend):
    refs = [square.remote(i) for i in range(4)]

    async def main():
        first = await refs[0]
        rest = await asyncio.gather(*refs[1:])
        with pytest.raises(ValueError, match="awaited"):
            await boom.remote("awaited")
        return [first, *rest]

    assert asyncio.run(asyncio.wait_for(main(), LONG)) == [0, 1, 4, 9]


def test_object_ref_pickles_into_tasks(backend):
    ref = ray.put("payload")
    clone = pickle.loads(pickle.dumps(ref))
    assert clone == ref
    assert ray.get(clone) == "payload"
    assert ray.get(get_first.remote([clone])) == "payload"


def test_refs_inside_stored_values_keep_objects_alive(backend):
    inner = ray.put("kept")
    outer = ray.put({"ref": inner})
    del inner
    gc.collect()
    assert ray.get(ray.get(outer)["ref"]) == "kept"


def test_object_is_freed_when_last_ref_dropped(backend):
    store = _runtime.current().backend.object_store
    ref = ray.put("temporary")
    object_id = ref.binary()
    assert store.contains(object_id)
    del ref
    gc.collect()
    eventually(lambda: not store.contains(object_id))


# ======================================================================================
# errors
# ======================================================================================

def test_task_error_is_also_the_cause_class(backend):
    ref = boom.remote("bad input 42")
    with pytest.raises(ValueError) as info:
        ray.get(ref)
    err = info.value
    assert isinstance(err, E.TaskError) and isinstance(err, E.BeamletError)
    assert isinstance(err.cause, ValueError) and str(err.cause) == "bad input 42"
    assert err.function_name == "boom"
    text = str(err)
    assert "boom" in text
    assert "Traceback" in text
    assert "ValueError: bad input 42" in text
    assert "boom" in err.traceback_str


def test_task_error_with_user_exception_class(backend):
    with pytest.raises(CustomError, match="custom failure") as info:
        ray.get(raise_custom.remote())
    assert isinstance(info.value, E.TaskError)
    assert type(info.value.cause) is CustomError


def test_task_error_pickles(backend):
    with pytest.raises(ValueError) as info:
        ray.get(boom.remote("pickled"))
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is type(info.value)
    assert isinstance(clone, ValueError) and isinstance(clone, E.TaskError)
    assert str(clone.cause) == "pickled"
    assert str(clone) == str(info.value)


def test_error_propagates_downstream(backend):
    failed = boom.remote("root cause")
    middle = downstream.remote(failed)
    last = square.remote(middle)
    for ref, name in ((middle, "downstream"), (last, "square")):
        with pytest.raises(ValueError) as info:
            ray.get(ref)
        err = info.value
        assert isinstance(err, E.TaskError)
        assert err.function_name == name
        text = str(err)
        assert name in text
        assert "input could not be computed" in text
        assert "boom" in text  # the upstream traceback
        assert "ValueError: root cause" in text
        assert isinstance(err.cause, ValueError)


def test_error_from_nested_get(backend):
    with pytest.raises(ValueError) as info:
        ray.get(outer_of_failing.remote())
    text = str(info.value)
    assert "outer_of_failing" in text
    assert "inner failure" in text


def test_get_list_raises_first_error(backend):
    refs = [square.remote(1), boom.remote("in a list"), square.remote(2)]
    with pytest.raises(ValueError, match="in a list"):
        ray.get(refs)


def test_get_timeout_error_is_a_timeout_error(backend):
    assert issubclass(E.GetTimeoutError, TimeoutError)
    assert issubclass(E.GetTimeoutError, E.BeamletError)


def test_get_timeout_on_unfinished_task(backend, tmp_path):
    backend.require("parallel")
    gate = tmp_path / "gate"
    ref = wait_for_file.remote(str(gate), "done")
    with pytest.raises(TimeoutError) as info:
        ray.get(ref, timeout=0.2)
    assert isinstance(info.value, E.GetTimeoutError)
    with pytest.raises(E.GetTimeoutError):
        ray.get([square.remote(1), ref], timeout=0)
    gate.touch()
    assert ray.get(ref, timeout=LONG) == "done"


def test_unpicklable_return_value_is_a_task_error(backend):
    @ray.remote
    def make_lock():
        return threading.Lock()

    with pytest.raises(TypeError) as info:
        ray.get(make_lock.remote())
    assert isinstance(info.value, E.TaskError)
    assert "make_lock" in str(info.value)
    assert "lock" in str(info.value)


# ======================================================================================
# wait
# ======================================================================================

def _check_partition(refs, ready, not_ready, k):
    assert len(ready) <= k
    assert sorted(map(refs.index, ready + not_ready)) == list(range(len(refs)))
    assert [r for r in refs if r in ready] == ready  # input order kept
    assert [r for r in refs if r in not_ready] == not_ready


def test_wait_partitions_in_input_order(backend):
    refs = [square.remote(i) for i in range(6)]
    ray.get(refs)
    for k in (1, 3, 6):
        ready, not_ready = ray.wait(refs, num_returns=k, timeout=LONG)
        _check_partition(refs, ready, not_ready, k)
        assert len(ready) == k  # all are done: exactly k come back
    ready, not_ready = ray.wait(refs)
    assert len(ready) == 1 and len(not_ready) == 5


def test_wait_counts_failed_tasks_as_ready(backend):
    refs = [boom.remote("x"), square.remote(2)]
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=LONG)
    assert ready == refs and not_ready == []


def test_wait_timeout_zero_polls(backend, tmp_path):
    backend.require("parallel")
    gate = tmp_path / "gate"
    blocked = wait_for_file.remote(str(gate))
    done = ray.put("here")
    refs = [blocked, done]
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=0)
    assert ready == [done] and not_ready == [blocked]
    ready, not_ready = ray.wait(refs, num_returns=1, timeout=LONG)
    assert ready == [done] and not_ready == [blocked]
    gate.touch()
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=LONG)
    assert ready == refs and not_ready == []


def test_wait_returns_when_k_ready_and_others_pending(backend, tmp_path):
    backend.require("parallel")
    gate = tmp_path / "gate"
    # one CPU of two is held by the gated task; the others run on the second
    refs = [square.remote(3), wait_for_file.remote(str(gate)), square.remote(4)]
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=LONG)
    _check_partition(refs, ready, not_ready, 2)
    assert ready == [refs[0], refs[2]] and not_ready == [refs[1]]
    gate.touch()
    assert ray.get(refs, timeout=LONG) == [9, None, 16]


def test_wait_with_timeout_returns_fewer(backend, tmp_path):
    backend.require("parallel")
    gate = tmp_path / "gate"
    refs = [wait_for_file.remote(str(gate)), wait_for_file.remote(str(gate))]
    ready, not_ready = ray.wait(refs, num_returns=1, timeout=0.1)
    assert ready == [] and not_ready == refs
    gate.touch()


# ======================================================================================
# retries and cancellation
# ======================================================================================

def test_application_errors_not_retried_by_default(backend, tmp_path):
    path = tmp_path / "attempts"
    with pytest.raises(ValueError):
        ray.get(fail_until.remote(str(path), 2))
    assert read_count(path) == 1


def test_retry_exceptions_true_retries_until_success(backend, tmp_path):
    path = tmp_path / "attempts"
    ref = fail_until.options(retry_exceptions=True, max_retries=3).remote(str(path), 3)
    assert ray.get(ref, timeout=LONG) == 3
    assert read_count(path) == 3


def test_retry_exceptions_gives_up_after_max_retries(backend, tmp_path):
    path = tmp_path / "attempts"
    ref = fail_until.options(retry_exceptions=True, max_retries=2).remote(str(path), 100)
    with pytest.raises(ValueError, match="attempt 3 fails"):
        ray.get(ref, timeout=LONG)
    assert read_count(path) == 3  # the first try and two retries


def test_retry_exceptions_list_matches_types(backend, tmp_path):
    retried = tmp_path / "retried"
    with pytest.raises(KeyError):
        ray.get(raise_type.options(retry_exceptions=[KeyError], max_retries=2)
                .remote(str(retried), KeyError), timeout=LONG)
    assert read_count(retried) == 3
    not_retried = tmp_path / "not_retried"
    with pytest.raises(ValueError):
        ray.get(raise_type.options(retry_exceptions=[KeyError], max_retries=2)
                .remote(str(not_retried), ValueError), timeout=LONG)
    assert read_count(not_retried) == 1


def test_a_retry_exceptions_list_of_the_programs_own_class_survives_being_handed_on():
    """A process that received a task spec by plain pickle can pickle it again for
    the next (as a cluster node hands a task to its worker), even when
    ``retry_exceptions`` lists a class defined in the program, not importable."""
    class ProgramsOwnError(Exception):
        pass

    def task():
        pass

    in_spec = _call_options({"retry_exceptions": [ProgramsOwnError]}, task)[3]
    handed_on = pickle.loads(pickle.dumps(in_spec))
    received = pickle.loads(pickle.dumps(handed_on))
    assert [cls.__name__ for cls in received] == ["ProgramsOwnError"]
    assert issubclass(received[0], Exception)


def test_worker_crash_is_retried(backend, tmp_path):
    backend.require("isolated", "manages_workers")
    path = tmp_path / "attempts"
    assert ray.get(crash_until.remote(str(path), 2), timeout=LONG) == "survived"
    assert read_count(path) == 2


def test_worker_crash_without_retries_raises_worker_crashed(backend, tmp_path):
    backend.require("isolated", "manages_workers")
    path = tmp_path / "attempts"
    with pytest.raises(E.WorkerCrashedError) as info:
        ray.get(crash_until.options(max_retries=0).remote(str(path), 100), timeout=LONG)
    assert not isinstance(info.value, E.TaskError)
    assert read_count(path) == 1


def test_cancel_finished_task_keeps_its_value(backend):
    ref = square.remote(5)
    ray.get(ref)
    ray.cancel(ref)
    assert ray.get(ref) == 25


def test_cancel_running_task(backend, tmp_path):
    backend.require("parallel")
    path = tmp_path / "attempts"
    ref = count_then_sleep.options(max_retries=3).remote(str(path))
    eventually(lambda: read_count(path) == 1)  # it is running (in time.sleep(60))
    ray.cancel(ref)
    with pytest.raises(E.TaskCancelledError) as info:
        ray.get(ref, timeout=LONG)
    assert isinstance(info.value, E.TaskError)  # it was interrupted inside the task
    assert read_count(path) == 1  # a cancelled task is not retried


def test_cancel_queued_task(backend, tmp_path):
    backend.require("parallel")
    gate = tmp_path / "gate"
    running = [wait_for_file.remote(str(gate), i) for i in range(2)]  # both CPUs busy
    queued = square.remote(3)
    ray.cancel(queued)
    with pytest.raises(E.TaskCancelledError) as info:
        ray.get(queued, timeout=LONG)
    assert not isinstance(info.value, E.TaskError)  # it never started
    gate.touch()
    assert ray.get(running, timeout=LONG) == [0, 1]


def test_force_cancel(backend, tmp_path):
    backend.require("isolated", "manages_workers")
    path = tmp_path / "attempts"
    ref = count_then_sleep.remote(str(path))
    eventually(lambda: read_count(path) == 1)
    ray.cancel(ref, force=True)
    with pytest.raises(E.TaskCancelledError):
        ray.get(ref, timeout=LONG)
    assert read_count(path) == 1
    assert ray.get(square.remote(4), timeout=LONG) == 16  # the backend carries on


# ======================================================================================
# actors
# ======================================================================================

def test_actor_keeps_state_and_runs_calls_in_order(backend):
    c = Counter.remote(10)
    assert ray.get([c.inc.remote() for _ in range(20)]) == list(range(11, 31))
    for i in range(30):
        c.append.remote(i)
    assert ray.get(c.get_log.remote()) == list(range(30))


def test_actor_method_with_ref_arguments(backend):
    c = Counter.remote()
    assert ray.get(c.inc.remote(square.remote(3))) == 9
    assert ray.get(c.inc.remote(by=ray.put(1))) == 10


def test_actor_handle_passed_to_task(backend):
    c = Counter.remote()
    assert ray.get(call_actor.remote(c, 5)) == [1, 2, 3, 4, 5]
    assert ray.get(c.value.remote()) == 5


def test_actor_handle_passed_to_actor(backend):
    c = Counter.remote()
    relay = Relay.remote(c)
    assert ray.get(relay.forward.remote(3)) == 3
    assert ray.get(c.inc.remote()) == 4


def test_actor_handle_pickles_and_compares(backend):
    c = Counter.remote()
    clone = pickle.loads(pickle.dumps(c))
    assert clone == c and hash(clone) == hash(c)
    assert ray.get(clone.inc.remote()) == 1
    assert c != Counter.remote()
    assert isinstance(c, ray.ActorHandle)


def test_method_num_returns(backend):
    c = Counter.remote(3)
    a, b = c.pair.remote()
    assert ray.get([a, b]) == [3, -3]
    x, y = c.two_values.options(num_returns=2).remote()
    assert ray.get([x, y]) == ["a", "b"]


def test_actor_method_error_keeps_actor_alive(backend):
    c = Counter.remote()
    with pytest.raises(ValueError, match="method failed") as info:
        ray.get(c.fail.remote("method failed"))
    assert isinstance(info.value, E.TaskError)
    assert "fail" in str(info.value)
    assert ray.get(c.inc.remote()) == 1


def test_failing_init_makes_every_call_raise_actor_died(backend):
    a = BadInit.remote()  # does not raise here
    for _ in range(2):
        with pytest.raises(E.ActorDiedError) as info:
            ray.get(a.ping.remote(), timeout=LONG)
        text = str(info.value)
        assert "constructor exploded" in text
        assert "RuntimeError" in text
        assert "Traceback" in text
        assert isinstance(info.value, E.ActorError)


def test_kill_actor(backend):
    c = Counter.remote()
    assert ray.get(c.inc.remote()) == 1
    ray.kill(c)
    for _ in range(2):
        with pytest.raises(E.ActorDiedError) as info:
            ray.get(c.inc.remote(), timeout=LONG)
        assert "kill" in str(info.value).lower()


@ray.remote
class _Gate:
    """Counts the callers that arrived; `wait` blocks until `open` is called."""

    def __init__(self):
        self.arrived = 0
        self.opened = asyncio.Event()

    async def arrive(self):
        self.arrived += 1

    async def count(self):
        return self.arrived

    async def wait(self):
        await self.opened.wait()

    async def open(self):
        self.opened.set()


@ray.remote
class _GateWaiter:
    def ping(self):
        return "pong"

    def wait_at(self, gate):
        ray.get(gate.arrive.remote(), timeout=LONG)
        ray.get(gate.wait.remote(), timeout=5 * LONG)
        return "through"


@ray.remote
class _AsyncGateWaiter:
    async def ping(self):
        return "pong"

    async def wait_at(self, gate):
        await gate.arrive.remote()
        await gate.wait.remote()
        return "through"


@pytest.mark.parametrize("waiter_class", [_GateWaiter, _AsyncGateWaiter], ids=["sync", "async"])
def test_killing_an_actor_fails_its_running_call(backend, waiter_class):
    # As in Ray: the call that runs (here blocked on another actor) fails at
    # once, and so do the calls queued behind it (an async actor runs them
    # beside it) and any later one.
    backend.require("parallel")
    gate, waiter = _Gate.remote(), waiter_class.remote()
    assert ray.get(waiter.ping.remote(), timeout=LONG) == "pong"
    running = waiter.wait_at.remote(gate)
    queued = [waiter.ping.remote()] if waiter_class is _GateWaiter else []
    eventually(lambda: ray.get(gate.count.remote(), timeout=LONG) == 1)
    ray.kill(waiter)
    for ref in [running, *queued, waiter.ping.remote()]:
        with pytest.raises(E.ActorDiedError, match="kill"):
            ray.get(ref, timeout=LONG)
    ray.get(gate.open.remote(), timeout=LONG)  # (a call left running in a thread ends)


@ray.remote
def _after_gate(gate, value):
    ray.get(gate.wait.remote(), timeout=5 * LONG)
    return value


@ray.remote
class _GateCounter:
    def __init__(self, gate, value):
        ray.get(gate.arrive.remote(), timeout=LONG)

    def ping(self):
        return "pong"


def test_killing_an_actor_before_its_arguments_are_ready(backend):
    # kill() does not wait for the actor to start (this test's timeout, if it
    # did: the argument is ready only after it returns); it never starts.
    backend.require("parallel")
    gate = _Gate.remote()
    actor = _GateCounter.remote(gate, _after_gate.remote(gate, 1))
    call = actor.ping.remote()
    ray.kill(actor)
    ray.get(gate.open.remote(), timeout=LONG)
    for ref in (call, actor.ping.remote()):
        with pytest.raises(E.ActorDiedError, match="kill"):
            ray.get(ref, timeout=LONG)
    assert ray.get(gate.count.remote(), timeout=LONG) == 0  # its constructor never ran


def test_named_actor_get_actor(backend):
    c = Counter.options(name="counter").remote()
    ray.get(c.inc.remote())
    same = ray.get_actor("counter")
    assert same == c
    assert ray.get(same.inc.remote()) == 2


def test_get_actor_unknown_raises_value_error(backend):
    with pytest.raises(ValueError, match="no-such-actor"):
        ray.get_actor("no-such-actor")


def test_duplicate_actor_name_raises_at_remote(backend):
    first = Counter.options(name="unique").remote()
    with pytest.raises(E.ActorAlreadyExistsError) as info:
        Counter.options(name="unique").remote()
    assert isinstance(info.value, ValueError)
    assert "unique" in str(info.value)
    assert ray.get(first.inc.remote()) == 1  # the first one is unharmed


def test_named_actor_namespaces(backend):
    a = Counter.options(name="shared", namespace="ns1").remote(100)
    b = Counter.options(name="shared", namespace="ns2").remote(200)
    assert ray.get(ray.get_actor("shared", namespace="ns1").value.remote()) == 100
    assert ray.get(ray.get_actor("shared", namespace="ns2").value.remote()) == 200
    with pytest.raises(ValueError):
        ray.get_actor("shared")  # not in this job's namespace
    assert a != b


def test_get_if_exists(backend):
    a = Counter.options(name="singleton", get_if_exists=True).remote()
    ray.get(a.inc.remote())
    b = Counter.options(name="singleton", get_if_exists=True).remote()
    assert b == a
    assert ray.get(b.inc.remote()) == 2


def test_killed_actor_frees_its_name(backend):
    c = Counter.options(name="reusable").remote()
    ray.kill(c)
    eventually(lambda: _name_is_free("reusable"))
    again = Counter.options(name="reusable").remote(5)
    assert ray.get(ray.get_actor("reusable").value.remote()) == 5
    assert again == ray.get_actor("reusable")


def _name_is_free(name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:
        return True
    return False


def test_actor_ends_when_its_last_handle_is_dropped(backend):
    # As in Ray, a named actor is still garbage-collected once no handle to it exists.
    c = Counter.options(name="short-lived").remote()
    assert ray.get(c.inc.remote()) == 1
    del c
    gc.collect()
    eventually(lambda: _name_is_free("short-lived"))


def test_detached_actor_outlives_its_handles(backend):
    c = Counter.options(name="long-lived", lifetime="detached").remote(7)
    ray.get(c.inc.remote())
    del c
    gc.collect()
    handle = ray.get_actor("long-lived")
    assert ray.get(handle.value.remote()) == 8
    ray.kill(handle)


def test_actor_handle_returned_from_task(backend):
    handle = ray.get(make_counter.remote(40))
    gc.collect()
    assert ray.get(handle.inc.remote(2), timeout=LONG) == 42


def test_async_actor_methods(backend):
    a = AsyncActor.remote()
    assert ray.get([a.double.remote(i) for i in range(5)]) == [0, 2, 4, 6, 8]
    assert ray.get(a.await_ref.remote([square.remote(7)]), timeout=LONG) == 49


def test_async_actor_default_concurrency_is_high(backend):
    backend.require("parallel")
    a = AsyncActor.remote()
    n = 10
    ray.get([a.hold.remote(n) for _ in range(n)], timeout=LONG)
    assert ray.get(a.get_peak.remote()) == n


def test_async_actor_max_concurrency_caps_calls_in_flight(backend):
    backend.require("parallel")
    a = AsyncActor.options(max_concurrency=3).remote()
    ray.get([a.hold.remote(3) for _ in range(8)], timeout=LONG)
    assert ray.get(a.get_peak.remote()) == 3


def test_actor_restarts_after_crash(backend):
    backend.require("isolated", "manages_workers")
    a = Fragile.options(max_restarts=1).remote()
    pid1, calls = ray.get(a.state.remote(), timeout=LONG)
    assert calls == 1 and ray.get(a.reconstructed.remote(), timeout=LONG) is False
    with pytest.raises(E.ActorError) as info:
        ray.get(a.crash.remote(), timeout=LONG)
    assert not isinstance(info.value, E.ActorDiedError)  # restarting, not dead
    if backend.prompt_state:
        pid2, calls = ray.get(a.state.remote(), timeout=LONG)
    else:
        # (Ray: a call sent before this caller learnt of the crash fails as the
        # crashing call did, at most once: the restarted actor runs the next.)
        pid2, calls = eventually(lambda: _unless_unavailable(a.state.remote()))
    assert calls == 1  # a fresh instance: __init__ ran again
    assert pid2 != pid1 and ray.get(a.reconstructed.remote(), timeout=LONG) is True
    with pytest.raises(E.ActorDiedError):  # restarts used up
        ray.get(a.crash.remote(), timeout=LONG)
    with pytest.raises(E.ActorDiedError):
        ray.get(a.state.remote(), timeout=LONG)


def _unless_unavailable(ref):
    """The value of `ref`, or None if its actor was unavailable (restarting)."""
    try:
        return ray.get(ref, timeout=LONG)
    except E.ActorUnavailableError:
        return None


def test_actor_crash_without_restarts_is_dead(backend):
    backend.require("isolated", "manages_workers")
    a = Fragile.remote()
    ray.get(a.state.remote(), timeout=LONG)
    with pytest.raises(E.ActorDiedError):
        ray.get(a.crash.remote(), timeout=LONG)
    with pytest.raises(E.ActorDiedError):
        ray.get(a.state.remote(), timeout=LONG)


# Backends known not to tie an object's life to the process that put it yet; the
# test runs there as a strict xfail, so it fails loudly once they do.
OWNERSHIP_NOT_YET: dict = {}


def test_object_put_by_actor_is_lost_when_actor_dies(backend, request):
    backend.require("isolated", "manages_workers")
    if backend.name in OWNERSHIP_NOT_YET:
        request.node.add_marker(pytest.mark.xfail(reason=OWNERSHIP_NOT_YET[backend.name],
                                                  strict=True))
    c = Counter.remote()
    [ref] = ray.get(c.put_value.remote("owned by the actor"), timeout=LONG)
    assert ray.get(ref, timeout=LONG) == "owned by the actor"
    ray.kill(c)
    eventually(lambda: _raises_died(c))
    if not backend.prompt_state:
        # (Ray: the owner's death reaches the other processes a second or two later.)
        eventually(lambda: _raises_lost(ref))
    with pytest.raises(E.ObjectLostError) as info:
        ray.get(ref, timeout=LONG)
    assert isinstance(info.value, E.OwnerDiedError)


def _raises_lost(ref) -> bool:
    try:
        ray.get(ref, timeout=LONG)
    except E.ObjectLostError:
        return True
    return False


def _raises_died(handle) -> bool:
    try:
        ray.get(handle.value.remote(), timeout=LONG)
    except E.ActorDiedError:
        return True
    return False


# ======================================================================================
# ActorPool
# ======================================================================================

def _pool(n=2):
    return ActorPool([Counter.remote(100 * i) for i in range(n)])


def test_actor_pool_map_keeps_order(backend):
    pool = _pool()
    values = list(range(7))
    out = list(pool.map(lambda actor, v: square.remote(v), values))
    assert out == [v * v for v in values]


def test_actor_pool_map_uses_the_actors(backend):
    pool = _pool(2)
    out = list(pool.map(lambda actor, v: actor.value.remote(), range(6)))
    assert set(out) == {0, 100}


def test_actor_pool_map_unordered(backend):
    out = list(_pool(3).map_unordered(lambda actor, v: square.remote(v), range(6)))
    assert sorted(out) == [0, 1, 4, 9, 16, 25]


def test_actor_pool_sends_each_value_to_one_actor(backend):
    actors = [Counter.remote(100 * i) for i in range(3)]
    pool = ActorPool(actors)
    out = list(pool.map_unordered(lambda actor, v: actor.inc.remote(v), [1, 2, 3, 4, 5, 6]))
    assert len(out) == 6
    totals = ray.get([a.value.remote() for a in actors])
    assert sum(totals) == 0 + 100 + 200 + 21  # every value added exactly once


def test_actor_pool_submit_get_next(backend):
    pool = _pool(1)
    for v in (1, 2, 3):
        pool.submit(lambda actor, x: actor.inc.remote(x), v)
    assert pool.has_next()
    assert [pool.get_next(), pool.get_next(), pool.get_next()] == [1, 3, 6]
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()


def test_actor_pool_push_and_pop_idle(backend):
    a, b = Counter.remote(), Counter.remote()
    pool = ActorPool([a])
    pool.push(b)
    with pytest.raises(ValueError):
        pool.push(b)
    popped = {pool.pop_idle(), pool.pop_idle()}
    assert popped == {a, b}
    assert pool.pop_idle() is None


def test_actor_pool_needs_actors(backend):
    with pytest.raises(ValueError):
        ActorPool([])


# ======================================================================================
# runtime context, nodes and resources
# ======================================================================================

def test_runtime_context_in_driver_task_and_actor(backend):
    ctx = ray.get_runtime_context()
    job, node = ctx.get_job_id(), ctx.get_node_id()
    assert job and node
    assert ctx.get_task_id() is None and ctx.get_actor_id() is None
    t1, actor1, job1, node1, res = ray.get(context_info.remote())
    t2, *_ = ray.get(context_info.remote())
    assert t1 and t2 and t1 != t2
    assert actor1 is None
    assert job1 == job
    if backend.multi_node:  # (the task may run on another node than the driver's)
        assert node1 in {n["NodeID"] for n in ray.nodes()}
    else:
        assert node1 == node
    assert res.get("CPU") == 1.0
    _, _, _, _, res = ray.get(context_info.options(num_cpus=0.5).remote())
    assert res.get("CPU") == 0.5
    c = Counter.remote()
    actor_id, task_id = ray.get(c.context.remote())
    assert actor_id == c.actor_id
    assert task_id


def test_nodes(backend):
    nodes = ray.nodes()
    if backend.multi_node:  # (the two CPUs may be on several nodes)
        assert all(node["Alive"] is True for node in nodes)
        assert ray.get_runtime_context().get_node_id() in {n["NodeID"] for n in nodes}
        assert sum(node["Resources"]["CPU"] for node in nodes) == 2.0
        return
    assert len(nodes) == 1
    node = nodes[0]
    assert node["Alive"] is True
    assert node["NodeID"] == ray.get_runtime_context().get_node_id()
    assert node["Resources"]["CPU"] == 2.0


def test_cluster_and_available_resources(backend):
    total = ray.cluster_resources()
    assert total["CPU"] == 2.0
    assert total.get("GPU", 0) == 0
    ray.get([square.remote(i) for i in range(4)])
    eventually(lambda: ray.available_resources().get("CPU") == 2.0)
    assert set(ray.available_resources()) <= set(total) | {"memory", "object_store_memory"}


def test_custom_resources(start_backend, backend_name):
    if backend_name == "cluster":
        # As in Ray, a driver joining a running cluster cannot declare resources:
        # its nodes bring theirs (`beamlet start --resources`, see test_cluster.py).
        with pytest.raises(ValueError, match="resources cannot be given when connecting"):
            ray.init(resources={"widget": 2})
        return
    start_backend(backend_name, resources={"widget": 2})
    assert ray.cluster_resources()["widget"] == 2.0
    assert ray.nodes()[0]["Resources"]["widget"] == 2.0
    _, _, _, _, res = ray.get(context_info.options(resources={"widget": 1}).remote(),
                              timeout=LONG)
    assert res.get("widget") == 1.0
    eventually(lambda: ray.available_resources().get("widget") == 2.0)


def test_resources_held_while_task_runs(backend):
    # Seen from inside the only running task: its CPUs are in use (on Ray, once
    # its GCS has heard: the task then waits until it sees `until`).
    until = None if backend.prompt_state else 1.0
    assert ray.get(available_cpus.remote(until), timeout=LONG) == 1.0
    if backend.manages_workers:  # (on Dask a task holds one worker thread, whatever it asks)
        until = None if backend.prompt_state else 0.0
        assert ray.get(available_cpus.options(num_cpus=2).remote(until), timeout=LONG) == 0.0
        until = None if backend.prompt_state else 1.5
        assert ray.get(available_cpus.options(num_cpus=0.5).remote(until), timeout=LONG) == 1.5
    eventually(lambda: ray.available_resources().get("CPU") == 2.0)


# ======================================================================================
# the inprocess backend's own promises
# ======================================================================================

@ray.remote
def record(path, x):
    with open(path, "a") as f:
        f.write(f"{x} {threading.get_ident()}\n")
    return x


@ray.remote
class ThreadReporter:
    def where(self):
        return threading.get_ident(), os.getpid()


def test_inprocess_runs_tasks_inside_remote(inprocess, tmp_path):
    path = tmp_path / "log"
    ref = record.remote(str(path), "now")
    # the task already ran, in this thread, before get was called
    assert path.read_text() == f"now {threading.get_ident()}\n"
    assert ray.get(ref) == "now"
    assert inprocess.name == "inprocess" and not inprocess.parallel


def test_inprocess_actor_methods_run_in_caller_thread(inprocess):
    a = ThreadReporter.remote()
    assert ray.get(a.where.remote()) == (threading.get_ident(), os.getpid())


def test_inprocess_error_stored_in_ref_not_raised_at_remote(inprocess):
    ref = boom.remote("stored")  # does not raise here
    with pytest.raises(ValueError, match="stored"):
        ray.get(ref)


# ======================================================================================
# Actors whose constructor arguments are still being computed
# ======================================================================================

@ray.remote
def _slow_value(value, seconds=0.3):
    time.sleep(seconds)
    return value


@ray.remote
class _Holder:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def test_actor_calls_queue_while_its_arguments_are_computed(backend):
    holder = _Holder.remote(_slow_value.remote("ready"))
    calls = [holder.get.remote() for _ in range(3)]  # submitted before __init__ can run
    assert ray.get(calls, timeout=LONG) == ["ready"] * 3


def test_killing_an_actor_that_waits_for_its_arguments(backend):
    holder = _Holder.remote(_slow_value.remote("never used", 1.0))
    ray.kill(holder)
    with pytest.raises(E.ActorDiedError, match="kill"):
        ray.get(holder.get.remote(), timeout=LONG)


@ray.remote
class _Crasher:
    def crash(self):
        os._exit(3)

    def ping(self):
        return "pong"


def test_resources_come_back_after_an_actor_crashes(backend):
    backend.require("isolated", "manages_workers")
    total = ray.cluster_resources()["CPU"]
    actor = _Crasher.options(num_cpus=1).remote()
    assert ray.get(actor.ping.remote(), timeout=LONG) == "pong"
    if backend.prompt_state:
        assert ray.available_resources()["CPU"] == total - 1
    else:  # (Ray: what an earlier test's actors gave back is told a little later)
        eventually(lambda: ray.available_resources().get("CPU", 0) == total - 1)
    with pytest.raises(E.ActorDiedError):
        ray.get(actor.crash.remote(), timeout=LONG)
    eventually(lambda: ray.available_resources().get("CPU", 0) == total)
    time.sleep(0.2)  # given back once, not twice
    assert ray.available_resources()["CPU"] == total


def test_a_resource_with_nothing_free_is_left_out_of_available_resources(backend):
    backend.require("isolated", "manages_workers")
    total = ray.cluster_resources()["CPU"]
    actor = _Crasher.options(num_cpus=total).remote()
    assert ray.get(actor.ping.remote(), timeout=LONG) == "pong"
    assert "CPU" not in ray.available_resources()  # (as Ray: not "CPU": 0.0)
    ray.kill(actor)
    eventually(lambda: ray.available_resources().get("CPU") == total)


# ======================================================================================
# Ray's names
# ======================================================================================

def test_rays_exception_names_catch_beamlets_errors(backend):
    @ray.remote
    def divide():
        return 1 / 0

    with pytest.raises(E.RayTaskError) as info:
        ray.get(divide.remote(), timeout=LONG)
    assert isinstance(info.value, ZeroDivisionError)
    assert isinstance(info.value, E.RayError)
    assert E.RayActorError is E.ActorError


def test_gpu_ids_follow_the_assignment(start_backend):
    start_backend("local", num_gpus=2)

    @ray.remote(num_gpus=1)
    def with_gpu():
        return ray.get_gpu_ids()

    @ray.remote
    def without_gpu():
        return ray.get_gpu_ids()

    [ids] = ray.get([with_gpu.remote()], timeout=LONG)
    assert len(ids) == 1 and ids[0] in (0, 1)
    assert ray.get(without_gpu.remote(), timeout=LONG) == []

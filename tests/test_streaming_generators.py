"""Generator tasks and actor methods (Ray's streaming generators): a call that
``yield``s gives an ObjectRefGenerator whose refs arrive as the items are
made, on every backend whose ``streaming_generators`` flag is set; the others
refuse such a call at ``.remote()``."""
from __future__ import annotations

import asyncio
import gc
import itertools
import time

import numpy as np
import pytest

import beamlet as ray
from beamlet.core import runtime as _runtime
from beamlet.core.generators import item_id
from beamlet.exceptions import ObjectRefStreamEndOfStreamError, TaskCancelledError
from procs import eventually

T = 60  # seconds: the limit of every blocking call (none is reached when all is well)


@pytest.fixture
def gen_backend(backend):
    """The `backend` fixture, on backends that run generator tasks."""
    if not _runtime.current().backend.streaming_generators:
        pytest.skip(f"the {backend.name!r} backend does not run generator tasks "
                    f"(its streaming_generators flag is off)")
    return backend


def store():
    return _runtime.current().backend.object_store


def take(gen):
    """The next ref of `gen`, failing (never hanging) if it does not come in time."""
    ready, _ = ray.wait([gen], timeout=T)
    assert ready == [gen], "the generator's next item did not come"
    return next(gen)


def values(gen) -> list:
    out = []
    while True:
        try:
            ref = take(gen)
        except StopIteration:
            return out
        out.append(ray.get(ref, timeout=T))


@ray.remote
class Signal:
    """An event other tasks wait on (Ray's SignalActor)."""

    def __init__(self):
        self.event = asyncio.Event()

    async def send(self):
        self.event.set()

    async def wait(self):
        await self.event.wait()


@ray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n

    def value(self):
        return self.n


@ray.remote
def count_to(n):
    for i in range(n):
        yield i


def test_items_in_order_then_stop_iteration(gen_backend):
    """A generator function streams by default (as in Ray): items in order,
    then StopIteration, again and again; an empty one stops at once."""
    gen = count_to.remote(5)
    assert isinstance(gen, ray.ObjectRefGenerator)
    assert values(gen) == [0, 1, 2, 3, 4]
    assert gen.is_finished()
    with pytest.raises(StopIteration):
        next(gen)
    assert ray.get(gen.completed(), timeout=T) is None
    assert list(count_to.remote(0)) == []
    streamed = count_to.options(num_returns="streaming").remote(3)
    assert [ray.get(r, timeout=T) for r in streamed] == [0, 1, 2]


def test_consumer_gets_an_item_before_the_producer_finishes(gen_backend):
    """Item 0 reaches the consumer while the producer waits for an event only
    the consumer sets afterwards: items arrive as they are made."""
    gen_backend.require("parallel")

    @ray.remote
    def produce(signal):
        yield "first"
        ray.get(signal.wait.remote(), timeout=T)
        yield np.arange(50_000)  # (large: through shared memory where there is some)
        yield "last"

    signal = Signal.remote()
    gen = produce.remote(signal)
    assert ray.get(take(gen), timeout=T) == "first"
    assert ray.wait([gen], timeout=0) == ([], [gen])  # the producer is stuck: no item 1
    assert ray.wait([gen.completed()], timeout=0)[0] == []
    ray.get(signal.send.remote(), timeout=T)
    big, last = values(gen)
    assert big.sum() == np.arange(50_000).sum() and last == "last"


def test_exception_mid_stream_is_the_next_item(gen_backend):
    """An exception raised after two items is the third ref (get raises it),
    then the stream ends."""
    @ray.remote
    def fails_after_two():
        yield 0
        yield 1
        raise ValueError("bad third item")

    gen = fails_after_two.remote()
    first, second, third = take(gen), take(gen), take(gen)
    assert ray.get([first, second], timeout=T) == [0, 1]
    with pytest.raises(ValueError, match="bad third item"):
        ray.get(third, timeout=T)
    with pytest.raises(StopIteration):
        take(gen)
    assert ray.get(gen.completed(), timeout=T) is None


def test_actor_method_generators_sync_and_async(gen_backend):
    """Generator methods of a plain actor and async-generator methods of an
    async actor stream too, exceptions included; ``async for`` and
    ``await gen.__anext__()`` consume without blocking the loop."""
    @ray.remote
    class Plain:
        def __init__(self):
            self.base = 10

        def items(self, n):
            for i in range(n):
                yield self.base + i

    @ray.remote
    class Async:
        async def items(self, n):
            for i in range(n):
                await asyncio.sleep(0)
                yield i * i

        async def broken(self):
            yield "ok"
            raise KeyError("async failure")

    plain, async_actor = Plain.remote(), Async.remote()
    assert values(plain.items.remote(3)) == [10, 11, 12]
    assert values(async_actor.items.remote(4)) == [0, 1, 4, 9]
    refs = list(async_actor.broken.remote())
    assert len(refs) == 2 and ray.get(refs[0], timeout=T) == "ok"
    with pytest.raises(KeyError):
        ray.get(refs[1], timeout=T)

    async def consume():
        got = []
        async for ref in plain.items.remote(2):
            got.append(await ref)
        gen = async_actor.items.remote(3)
        got.append(await (await asyncio.wait_for(gen.__anext__(), T)))
        async for ref in gen:
            got.append(await ref)
        return got

    assert asyncio.run(consume()) == [10, 11, 0, 1, 4]


def test_async_actor_generator_with_backpressure(gen_backend):
    """An async actor's generator held back by backpressure waits without
    stopping the actor's loop: other calls (here, the count of items it made)
    go on meanwhile, and it is never more than the limit ahead."""
    @ray.remote
    class Source:
        def __init__(self):
            self.made = 0

        @ray.method(_generator_backpressure_num_objects=2)
        async def items(self, n):
            for i in range(n):
                self.made += 1
                yield i

        async def count(self):
            return self.made

    source = Source.remote()
    gen = source.items.remote(8)
    eventually(lambda: ray.get(source.count.remote(), timeout=T) >= 2, "the first items", T)
    for consumed in range(1, 9):
        assert ray.get(take(gen), timeout=T) == consumed - 1
        assert ray.get(source.count.remote(), timeout=T) <= consumed + 2
    with pytest.raises(StopIteration):
        take(gen)


def test_dynamic_generators(gen_backend):
    """``num_returns="dynamic"``: the task's one ref holds the refs of every
    item, an exception being the last one; for actor methods too."""
    @ray.remote(num_returns="dynamic")
    def squares(n, fail=False):
        for i in range(n):
            yield i * i
        if fail:
            raise RuntimeError("after the squares")

    @ray.remote
    class A:
        def items(self):
            yield "a"
            yield "b"

    ref = squares.remote(4)
    assert isinstance(ref, ray.ObjectRef)
    dynamic = ray.get(ref, timeout=T)
    assert isinstance(dynamic, ray.DynamicObjectRefGenerator) and len(dynamic) == 4
    assert ray.get(list(dynamic), timeout=T) == [0, 1, 4, 9]
    *good, bad = ray.get(squares.remote(2, fail=True), timeout=T)
    assert ray.get(good, timeout=T) == [0, 1]
    with pytest.raises(RuntimeError, match="after the squares"):
        ray.get(bad, timeout=T)
    a = A.remote()
    refs = ray.get(a.items.options(num_returns="dynamic").remote(), timeout=T)
    assert ray.get(list(refs), timeout=T) == ["a", "b"]


def test_cancel_mid_stream_stops_the_producer(gen_backend):
    """cancel(gen) while the producer is held back: the next item is the
    cancellation error, the stream ends, and the task is over (an endless
    generator could not end otherwise)."""
    @ray.remote(_generator_backpressure_num_objects=1)
    def endless():
        for i in itertools.count():
            yield i

    gen = endless.remote()
    assert ray.get(take(gen), timeout=T) == 0
    ray.cancel(gen)
    got = []
    with pytest.raises(TaskCancelledError):
        while True:
            got.append(ray.get(take(gen), timeout=T))
    assert got == list(range(1, len(got) + 1))  # (items made before the cancel came)
    with pytest.raises(StopIteration):
        take(gen)
    ray.get(gen.completed(), timeout=T)
    if not gen_backend.parallel:
        return

    @ray.remote
    def busy():
        yield "started"
        for _ in range(T * 100):  # (ends by itself should the cancel not come)
            time.sleep(0.01)
        yield "not cancelled"

    gen = busy.remote()
    assert ray.get(take(gen), timeout=T) == "started"
    ray.cancel(gen)  # (it runs user code now: interrupted there)
    with pytest.raises(TaskCancelledError):
        ray.get(take(gen), timeout=T)
    with pytest.raises(StopIteration):
        take(gen)


def test_killing_an_actor_ends_its_generator(gen_backend):
    """A generator method whose actor is killed mid-stream ends with
    ActorDiedError after the items it made."""
    @ray.remote
    class Endless:
        @ray.method(_generator_backpressure_num_objects=1)
        def items(self):
            yield from itertools.count()

    actor = Endless.remote()
    gen = actor.items.remote()
    assert ray.get(take(gen), timeout=T) == 0
    ray.kill(actor)
    got = []
    with pytest.raises(ray.exceptions.ActorDiedError):
        while True:
            got.append(ray.get(take(gen), timeout=T))
    assert got == list(range(1, len(got) + 1))
    with pytest.raises(StopIteration):
        take(gen)


def test_backpressure_bounds_how_far_the_producer_runs_ahead(gen_backend):
    """With ``_generator_backpressure_num_objects=N`` the producer (which counts
    the items it makes on an actor) is never more than N items ahead of its
    consumer, and it does stop there until the consumer takes some."""
    limit, total = 3, 12

    @ray.remote(_generator_backpressure_num_objects=limit)
    def produce(counter):
        for i in range(total):
            ray.get(counter.incr.remote(), timeout=T)
            yield i

    counter = Counter.remote()
    gen = produce.remote(counter)
    eventually(lambda: ray.get(counter.value.remote(), timeout=T) >= limit,
               "the producer making its first items", T)
    assert ray.wait([gen.completed()], timeout=0.3)[0] == []  # held back at `limit`
    assert ray.get(counter.value.remote(), timeout=T) == limit
    for consumed in range(1, total + 1):
        assert ray.get(take(gen), timeout=T) == consumed - 1
        assert ray.get(counter.value.remote(), timeout=T) <= consumed + limit
    with pytest.raises(StopIteration):
        take(gen)
    assert ray.get(counter.value.remote(), timeout=T) == total


def test_wait_on_generators(gen_backend):
    """wait() takes generators among refs: ready when next() would not block,
    including at the end."""
    @ray.remote
    def one():
        return 1

    gen, ref = count_to.remote(2), one.remote()
    ready, not_ready = ray.wait([gen, ref], num_returns=2, timeout=T)
    assert ready == [gen, ref] and not_ready == []
    assert values(gen) == [0, 1]
    assert ray.wait([gen], timeout=T) == ([gen], [])  # (its end is there)
    with pytest.raises(ValueError, match="duplicate"):
        ray.wait([gen, gen])


def test_dropped_generator_frees_its_items_and_stops_a_held_producer(gen_backend):
    """Items a generator never handed out are freed once it is dropped; a
    producer held back by backpressure stops when its consumer is gone."""
    before = store().stats()["num_objects"]
    gen = count_to.remote(20)
    assert ray.get(take(gen), timeout=T) == 0
    done = gen.completed()
    del gen
    gc.collect()
    ray.get(done, timeout=T)
    del done
    eventually(lambda: store().stats()["num_objects"] <= before, "freeing the items", T)

    @ray.remote(_generator_backpressure_num_objects=2)
    def endless():
        yield from itertools.count()

    gen = endless.remote()
    assert ray.get(take(gen), timeout=T) == 0
    done = gen.completed()
    del gen
    gc.collect()
    assert ray.get(done, timeout=T) is None


def test_generator_consumed_inside_a_task(gen_backend):
    """A task can call a generator task and consume it, backpressure included."""
    @ray.remote(_generator_backpressure_num_objects=2)
    def produce(n):
        yield from range(n)

    @ray.remote
    def consume(n):
        return sum(ray.get(ref, timeout=T) for ref in produce.remote(n))

    assert ray.get(consume.remote(10), timeout=T) == 45


def test_end_of_stream_marker(gen_backend):
    """The ref after the last item holds ObjectRefStreamEndOfStreamError, as in
    Ray (get of it raises that)."""
    gen = count_to.remote(1)
    ray.get(gen.completed(), timeout=T)
    past_end = ray.ObjectRef(item_id(gen.completed().id, 1))
    with pytest.raises(ObjectRefStreamEndOfStreamError):
        ray.get(past_end, timeout=T)
    assert values(gen) == [0]


def test_bad_input(gen_backend):
    with pytest.raises(ValueError, match="num_returns"):
        count_to.options(num_returns="stream")
    with pytest.raises(ValueError, match="_generator_backpressure_num_objects"):
        count_to.options(_generator_backpressure_num_objects=0)
    gen = count_to.remote(1)
    with pytest.raises(TypeError, match="ObjectRefGenerator"):
        ray.get(gen)
    with pytest.raises(TypeError, match="cannot be passed"):
        count_to.remote(gen)  # a generator cannot travel to a task
    for method in (gen.close, gen.throw, lambda: gen.send(1)):
        with pytest.raises(NotImplementedError):
            method()
    assert values(gen) == [0]


def test_backends_without_generators_refuse_them(backend):
    """Where the ``streaming_generators`` flag is off, .remote() raises at once."""
    if _runtime.current().backend.streaming_generators:
        pytest.skip(f"the {backend.name!r} backend runs generator tasks")
    with pytest.raises(NotImplementedError, match="generator"):
        count_to.remote(3)


@ray.remote(max_retries=1)
def crashes_once(marker, go):
    import os
    yield from range(3)
    if not os.path.exists(marker):
        open(marker, "w").close()
        until = time.monotonic() + T
        while not os.path.exists(go) and time.monotonic() < until:
            time.sleep(0.01)
        os._exit(1)  # the worker dies: the task is retried from the start
    yield from range(3, 5)


def test_a_retry_does_not_store_again_the_items_already_delivered(gen_backend, tmp_path):
    """As Ray ignores items a retried generator reports again: the items the
    consumer took and freed before the crash are not stored again (leaked)."""
    gen_backend.require("isolated")
    gen = crashes_once.remote(str(tmp_path / "crashed"), str(tmp_path / "go"))
    stream = gen.completed().id
    assert [ray.get(take(gen), timeout=T) for _ in range(3)] == [0, 1, 2]  # (and freed)
    eventually(lambda: not any(store().contains(item_id(stream, i)) for i in range(3)),
               "freeing the items taken", T)
    open(tmp_path / "go", "w").close()
    assert values(gen) == [3, 4]
    ray.get(gen.completed(), timeout=T)
    assert not any(store().contains(item_id(stream, i)) for i in range(3))


def test_next_with_a_timeout_gives_the_nil_ref_when_nothing_came(gen_backend):
    """``_next_sync(timeout_s)`` (which Ray's own libraries call) returns
    ``ObjectRef.nil()`` when no item came in time, as Ray's does."""
    gen_backend.require("parallel")
    signal = Signal.remote()

    @ray.remote
    def waits(signal):
        yield 1
        ray.get(signal.wait.remote(), timeout=T)
        yield 2

    gen = waits.remote(signal)
    assert ray.get(gen._next_sync(T), timeout=T) == 1
    nothing = gen._next_sync(0.05)
    assert nothing.is_nil() and nothing == ray.ObjectRef.nil()
    assert asyncio.run(gen._next_async(0.05)).is_nil()
    ray.get(signal.send.remote(), timeout=T)
    assert ray.get(gen._next_sync(-1), timeout=T) == 2
    with pytest.raises(StopIteration):
        gen._next_sync(T)

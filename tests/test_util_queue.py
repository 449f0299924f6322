"""``beamlet.util.queue.Queue`` (Ray's ``ray.util.queue.Queue``): a FIFO that
the driver, tasks and actors share, with blocking, timed and non-blocking
puts and gets raising Empty / Full as the standard library's queue does."""
from __future__ import annotations

import asyncio
import queue as std_queue

import pytest

import beamlet as ray
from beamlet.util.queue import Empty, Full, Queue

T = 30


@ray.remote
def produce(q, items):
    for item in items:
        q.put(item, timeout=T)
    return len(items)


@ray.remote
def consume(q, n):
    return [q.get(timeout=T) for _ in range(n)]


def test_fifo_between_the_driver_and_tasks(backend):
    q = Queue()
    assert q.empty() and q.size() == 0 and len(q) == 0
    for i in range(3):
        q.put(i)
    assert q.qsize() == 3 and not q.empty()
    assert [q.get(timeout=T) for _ in range(3)] == [0, 1, 2]
    assert ray.get(produce.remote(q, list(range(5))), timeout=T) == 5
    assert ray.get(consume.remote(q, 5), timeout=T) == [0, 1, 2, 3, 4]
    assert ray.util.queue.Queue is Queue


def test_a_waiting_get_lets_a_put_in(backend):
    backend.require("parallel")
    q = Queue()
    waiting = consume.remote(q, 2)
    q.put("a")
    q.put("b")
    assert ray.get(waiting, timeout=T) == ["a", "b"]


def test_empty_and_full(backend):
    q = Queue(maxsize=2)
    with pytest.raises(Empty):
        q.get(block=False)
    with pytest.raises(std_queue.Empty):  # (the standard library's, as in Ray)
        q.get_nowait()
    with pytest.raises(Empty):
        q.get(timeout=0.05)
    q.put_nowait_batch([1, 2])
    assert q.full()
    with pytest.raises(Full):
        q.put(3, block=False)
    with pytest.raises(std_queue.Full):
        q.put(3, timeout=0.05)
    with pytest.raises(Full):
        q.put_nowait_batch([3])
    assert q.get_nowait_batch(2) == [1, 2]
    with pytest.raises(Empty):
        q.get_nowait_batch(1)
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    with pytest.raises(ValueError):
        Queue(maxsize=-1)


def test_async_put_and_get(backend):
    q = Queue()

    async def main():
        await q.put_async("x")
        return await q.get_async(timeout=T)

    assert asyncio.run(main()) == "x"


def test_shutdown_ends_the_actor(backend):
    q = Queue(actor_options={"name": "the-queue"})
    q.put(1)
    assert ray.get_actor("the-queue") is not None
    q.shutdown()
    assert q.actor is None

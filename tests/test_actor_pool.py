"""``ActorPool`` as Ray's behaves: `map` submits at once (not when iterated),
methods with several returns work, and an actor that died is dropped from the
pool instead of swallowing later work."""
from __future__ import annotations

import pytest

import beamlet as ray
from beamlet.util import ActorPool

T = 30


@ray.remote
class Worker:
    def __init__(self):
        self.calls = 0

    def double(self, v):
        self.calls += 1
        return 2 * v

    @ray.method(num_returns=2)
    def split(self, v):
        self.calls += 1
        return v, -v

    def count(self):
        return self.calls


def test_map_submits_before_it_is_iterated(backend):
    actors = [Worker.remote(), Worker.remote()]
    pool = ActorPool(actors)
    results = pool.map(lambda a, v: a.double.remote(v), [1, 2])
    assert pool.has_next()
    # Each actor got its call already: a later call from here runs after it.
    assert ray.get([a.count.remote() for a in actors], timeout=T) == [1, 1]
    assert list(results) == [2, 4]
    unordered = pool.map_unordered(lambda a, v: a.double.remote(v), [3, 4, 5])
    assert sum(ray.get([a.count.remote() for a in actors], timeout=T)) >= 4
    assert sorted(unordered) == [6, 8, 10]


def test_a_new_map_does_not_wait_for_results_left_untaken(backend):
    pool = ActorPool([Worker.remote(), Worker.remote()])
    first = pool.map(lambda a, v: a.double.remote(v), [1, 2, 3])
    assert next(first) == 2
    second = pool.map(lambda a, v: a.double.remote(v), [10, 20])
    assert list(second) == [20, 40]
    assert not pool.has_next()


def test_methods_with_several_returns(backend):
    pool = ActorPool([Worker.remote(), Worker.remote()])
    pool.submit(lambda a, v: a.split.remote(v), 1)
    pool.submit(lambda a, v: a.split.remote(v), 2)
    pool.submit(lambda a, v: a.split.remote(v), 3)  # queued until an actor is free
    assert [pool.get_next(timeout=T) for _ in range(3)] == [[1, -1], [2, -2], [3, -3]]
    assert sorted(pool.map_unordered(lambda a, v: a.split.remote(v), [4, 5])) == \
        [[4, -4], [5, -5]]
    assert list(pool.map(lambda a, v: a.split.remote(v), [6])) == [[6, -6]]


def test_a_dead_actor_is_dropped_from_the_pool(backend):
    alive, dead = Worker.remote(), Worker.remote()
    ray.get([alive.count.remote(), dead.count.remote()], timeout=T)
    ray.kill(dead)
    pool = ActorPool([dead, alive])  # (the last idle actor is used first)
    for v in (1, 2, 3, 4):
        pool.submit(lambda a, v: a.double.remote(v), v)
    results, errors = [], 0
    while pool.has_next():
        try:
            results.append(pool.get_next(timeout=T))
        except ray.exceptions.ActorDiedError:
            errors += 1
    assert errors == 1 and results == [2, 6, 8]
    assert pool.pop_idle() == alive and pool.pop_idle() is None

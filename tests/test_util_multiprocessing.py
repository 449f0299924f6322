"""``beamlet.util.multiprocessing.Pool`` (Ray's ``ray.util.multiprocessing``):
a drop-in ``multiprocessing.Pool`` over actors, giving the standard library's
results (checked against its ThreadPool, which shares Pool's interface)."""
from __future__ import annotations

import os
import threading
from multiprocessing.pool import ThreadPool

import pytest

import beamlet as ray
from beamlet.util.multiprocessing import Pool, TimeoutError

T = 30


def square(x):
    return x * x


def power(x, n):
    return x ** n


def fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


_state = {}


def remember(value):
    _state["value"] = value


def recall(_):
    return _state.get("value")


def test_map_imap_starmap_apply_as_the_standard_library(backend):
    items = list(range(20))
    pairs = [(x, x % 3) for x in items]
    with ThreadPool(2) as reference, Pool(processes=2) as pool:
        assert pool.map(square, items) == reference.map(square, items)
        assert pool.map(square, items, chunksize=3) == reference.map(square, items, 3)
        assert list(pool.imap(square, items)) == list(reference.imap(square, items))
        assert sorted(pool.imap_unordered(square, items, chunksize=4)) == \
            sorted(reference.imap_unordered(square, items))
        assert pool.starmap(power, pairs) == reference.starmap(power, pairs)
        assert pool.apply(power, (2, 5)) == reference.apply(power, (2, 5))
        assert pool.apply_async(power, (3,), {"n": 2}).get(timeout=T) == 9
        assert pool.map_async(square, items).get(timeout=T) == reference.map(square, items)
        assert pool.starmap_async(power, pairs).get(timeout=T) == reference.starmap(power, pairs)
        assert pool.map(square, []) == []


def test_errors_callbacks_and_async_results(backend):
    with Pool(processes=2) as pool:
        with pytest.raises(ValueError, match="three"):
            pool.map(fail_on_three, range(5))
        failed = pool.map_async(fail_on_three, range(5))
        failed.wait(T)
        assert failed.ready() and not failed.successful()
        got, errors, done = [], [], threading.Event()
        pool.apply_async(square, (4,), callback=lambda v: (got.append(v), done.set()))
        assert done.wait(T) and got == [16]
        done.clear()
        pool.apply_async(fail_on_three, (3,),
                         error_callback=lambda e: (errors.append(e), done.set()))
        assert done.wait(T) and isinstance(errors[0], ValueError)
        assert pool.apply_async(square, (5,)).get(timeout=T) == 25


def test_initializer_close_join_terminate(backend):
    pool = Pool(processes=2, initializer=remember, initargs=("ready",))
    assert set(pool.map(recall, range(4), chunksize=1)) == {"ready"}
    pending = pool.map_async(square, range(10))
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.map(square, [1])
    pool.join()
    assert pending.get(timeout=T) == [x * x for x in range(10)]
    pool.terminate()
    with pytest.raises(ValueError):
        Pool(processes=0)
    assert TimeoutError.__module__ == "multiprocessing.context"


def test_the_pool_runs_in_other_processes(backend):
    backend.require("isolated")
    with Pool(processes=2) as pool:
        pids = set(pool.map(_pid, range(8), chunksize=1))
    assert os.getpid() not in pids


def _pid(_):
    return os.getpid()

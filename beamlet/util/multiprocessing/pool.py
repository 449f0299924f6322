"""Pool: ``multiprocessing.Pool``'s interface over a set of actors.

Each of the pool's `processes` is an actor that runs the initializer once,
then chunks of calls. The function travels once per map (put in the object
store), the items in chunks; results keep the standard library's semantics:
``map``/``imap``/``starmap`` in input order, ``imap_unordered`` as they come,
``*_async`` and ``apply_async`` return an AsyncResult, an exception raised by
the function is raised again by ``get`` (an instance of its own class).
"""
from __future__ import annotations

import itertools
import os
import threading
from multiprocessing import TimeoutError  # what AsyncResult.get raises, as in the stdlib
from typing import Any, Callable, Iterable

from ...core import api


class _PoolActor:
    """One of the pool's processes."""

    def __init__(self, initializer, initargs):
        if initializer is not None:
            initializer(*initargs)

    def ping(self) -> bool:
        return True

    def run_chunk(self, fn, chunk: list, star: bool) -> list:
        if star:
            return [fn(*args) for args in chunk]
        return [fn(item) for item in chunk]

    def run_one(self, fn, args: tuple, kwargs: dict):
        return fn(*args, **kwargs)


class AsyncResult:
    """The pending result of an ``*_async`` call (the stdlib's ApplyResult /
    MapResult): `get`, `wait`, `ready`, `successful`; `callback` gets the
    result, `error_callback` the exception, in a thread of the pool's."""

    def __init__(self, refs: list, combine: Callable[[list], Any], callback=None,
                 error_callback=None):
        self._refs = refs
        self._combine = combine
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._callback = callback
        self._error_callback = error_callback
        threading.Thread(target=self._collect, name="beamlet-pool-result", daemon=True).start()

    def _collect(self) -> None:
        try:
            self._value = self._combine(api.get(self._refs) if self._refs else [])
        except BaseException as err:  # noqa: BLE001 - handed to get() / error_callback
            self._error = err
        self._done.set()
        try:
            if self._error is None and self._callback is not None:
                self._callback(self._value)
            elif self._error is not None and self._error_callback is not None:
                self._error_callback(self._error)
        except Exception:  # noqa: BLE001 - as the stdlib: a bad callback breaks nothing
            import traceback
            traceback.print_exc()

    def ready(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def get(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"the result was not ready within {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value


class Pool:
    """``multiprocessing.Pool(processes, initializer, initargs)`` on actors.
    `maxtasksperchild` and `context` are accepted for compatibility (each
    actor lives as long as the pool). `ray_remote_args` are the actors'
    options (by default each holds one CPU, fewer when there are more
    processes than CPUs)."""

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None,
                 context: Any = None, ray_address: str | None = None,
                 ray_remote_args: dict | None = None):
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if not api.is_initialized():
            api.init(address=ray_address)
        cpus = api.cluster_resources().get("CPU", 0) or os.cpu_count() or 1
        self._processes = processes or max(1, int(cpus))
        options = {"num_cpus": min(1.0, cpus / self._processes)}
        options.update(ray_remote_args or {})
        actor_class = api.remote(_PoolActor)
        self._actors = [actor_class.options(**options).remote(initializer, tuple(initargs))
                        for _ in range(self._processes)]
        self._next_actor = itertools.cycle(range(self._processes))
        self._state = "RUN"
        self._pending: list = []  # refs submitted, for join()

    # -- lifecycle ----------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def close(self) -> None:
        """No more work may be submitted; `join` then waits for what was."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Stop the actors now; unfinished work is lost."""
        self._state = "TERMINATE"
        for actor in self._actors:
            api.kill(actor)
        self._actors = []

    def join(self) -> None:
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        if self._pending:
            api.wait(self._pending, num_returns=len(self._pending))
            self._pending = []

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def __reduce__(self):
        raise TypeError("a Pool cannot be passed to tasks or pickled")

    # -- submitting ---------------------------------------------------------------
    def _chunks(self, iterable: Iterable, chunksize: int | None) -> list[list]:
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            chunksize = max(1, chunksize + bool(extra))
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an integer >= 1, got {chunksize!r}")
        return [items[i:i + chunksize] for i in range(0, len(items), chunksize)]

    def _submit_chunks(self, fn: Callable, iterable: Iterable, chunksize, star: bool) -> list:
        self._check_running()
        fn_ref = api.put(fn)
        refs = [self._actors[next(self._next_actor)].run_chunk.remote(fn_ref, chunk, star)
                for chunk in self._chunks(iterable, chunksize)]
        self._pending.extend(refs)
        return refs

    @staticmethod
    def _flatten(chunks: list) -> list:
        return [value for chunk in chunks for value in chunk]

    # -- the stdlib's interface ---------------------------------------------------------
    def apply(self, func: Callable, args: tuple = (), kwds: dict | None = None):
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: tuple = (), kwds: dict | None = None,
                    callback=None, error_callback=None) -> AsyncResult:
        self._check_running()
        ref = self._actors[next(self._next_actor)].run_one.remote(func, tuple(args), kwds or {})
        self._pending.append(ref)
        return AsyncResult([ref], lambda values: values[0], callback, error_callback)

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        return self.map_async(func, iterable, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback=None, error_callback=None) -> AsyncResult:
        refs = self._submit_chunks(func, iterable, chunksize, star=False)
        return AsyncResult(refs, self._flatten, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback=None, error_callback=None) -> AsyncResult:
        refs = self._submit_chunks(func, iterable, chunksize, star=True)
        return AsyncResult(refs, self._flatten, callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1):
        """Results in input order, each as soon as it and those before it are done."""
        refs = self._submit_chunks(func, iterable, chunksize, star=False)

        def results():
            for ref in refs:
                yield from api.get(ref)
        return results()

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1):
        """Results as they finish (a chunk's in its order)."""
        refs = self._submit_chunks(func, iterable, chunksize, star=False)

        def results():
            pending = list(refs)
            while pending:
                ready, pending = api.wait(pending, num_returns=1)
                yield from api.get(ready[0])
        return results()


__all__ = ["Pool", "AsyncResult", "TimeoutError"]

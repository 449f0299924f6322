"""Just enough of Ray's API on top of dask.distributed to run core_bench's workloads.

    python benchmarks/core_bench.py --module dask --init '{"n_workers": 2}'

- ``init(**kw)`` starts ``distributed.Client(processes=True, n_workers=2,
  threads_per_worker=1, **kw)`` (a LocalCluster: scheduler in the driver, a nanny
  and a worker process per worker).
- ``f.remote(*args)`` is ``client.submit(f, *args, pure=False)``; futures passed as
  arguments arrive as values (as in Ray).
- ``get`` is ``client.gather`` (inside a task it secedes from the worker's thread pool
  while it waits, so nested tasks do not deadlock); ``put`` is ``client.scatter``.
- Actors are Dask actors (``client.submit(cls, actor=True)``); ``h.m.remote()`` is
  ``h.m()``, an ActorFuture.
- ``distributed`` is imported by ``init()``, not by importing this module: beamlet
  imports it in ``init(backend="dask")`` too, so both cold starts include it.
"""
from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("distributed")

_client = None
DEFAULTS = {"processes": True, "n_workers": 2, "threads_per_worker": 1}


def init(**kw):
    global _client
    import distributed
    if "num_cpus" in kw:      # Ray's spelling: one single-threaded worker per CPU
        kw.setdefault("n_workers", int(kw.pop("num_cpus")))
    _client = distributed.Client(**dict(DEFAULTS, **kw))
    return _client


def shutdown():
    global _client
    if _client is not None:
        _client.close()
        _client = None


def _in_worker():
    import distributed
    try:
        distributed.get_worker()
        return True
    except ValueError:
        return False


def _c():
    if _client is not None and not _in_worker():
        return _client
    import distributed
    return distributed.get_client()


class RemoteFunction:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs):
        return _c().submit(self._fn, *args, pure=False, **kwargs)

    def options(self, **_):
        return self


class _Method:
    def __init__(self, actor, name):
        self._actor, self._name = actor, name

    def remote(self, *args, **kwargs):
        return getattr(self._actor, self._name)(*args, **kwargs)


class ActorHandle:
    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self._actor, name)


class ActorClass:
    def __init__(self, cls):
        self._cls = cls

    def remote(self, *args, **kwargs):
        return ActorHandle(_c().submit(self._cls, *args, actor=True, **kwargs).result())


def remote(obj=None, **_options):
    if obj is None:
        return lambda o: remote(o)
    return ActorClass(obj) if isinstance(obj, type) else RemoteFunction(obj)


def put(value):
    return _c().scatter([value], hash=False)[0]


def _gather(refs):
    from distributed.actor import BaseActorFuture
    futures = [r for r in refs if not isinstance(r, BaseActorFuture)]
    values = iter(_c().gather(futures)) if futures else iter(())
    return [r.result() if isinstance(r, BaseActorFuture) else next(values) for r in refs]


def get(refs, timeout=None):
    single = not isinstance(refs, (list, tuple))
    refs = [refs] if single else list(refs)
    if _in_worker():
        import distributed
        distributed.secede()
        try:
            out = _gather(refs)
        finally:
            distributed.rejoin()
    else:
        out = _gather(refs)
    return out[0] if single else out


def kill(handle):
    pass    # the actor goes away when its future is released

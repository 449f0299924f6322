"""A joblib backend on beamlet (Ray's ``ray.util.joblib``): after
`register_beamlet()`, ``with joblib.parallel_backend("beamlet"):`` runs the
batches of every ``joblib.Parallel`` call as beamlet tasks, on whatever
backend the session uses (``init()`` is called with defaults if no session
runs yet). joblib is an optional extra: ``pip install 'beamlet[joblib]'``.
"""
from __future__ import annotations

try:
    import joblib
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("beamlet.util.joblib needs joblib: pip install 'beamlet[joblib]'") \
        from err

from ...core import api
from ...core.remote_function import RemoteFunction

__all__ = ["register_beamlet", "register_ray", "BeamletBackend"]


def _run_batch(batch):
    """Run one joblib batch (a callable returning the list of its results)."""
    return batch()


_run_batch_remote = RemoteFunction(_run_batch, {})


class BeamletBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase over beamlet tasks: each batch joblib
    makes is one task (1 CPU); `effective_n_jobs` counts the session's CPUs
    for ``n_jobs=-1``; an aborted call cancels the batches not finished."""

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1

    def __init__(self, nesting_level=None, inner_max_num_threads=None, **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self._pending: dict = {}  # future -> its ref, while unfinished

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **backend_kwargs):
        if not api.is_initialized():
            api.init()
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            cpus = int(api.cluster_resources().get("CPU", 1)) if api.is_initialized() else 1
            n_jobs = max(cpus + 1 + n_jobs, 1)
        return n_jobs

    def submit(self, func, callback=None):
        ref = _run_batch_remote.remote(func)
        future = ref.future()
        self._pending[future] = ref
        future.add_done_callback(lambda f: self._pending.pop(f, None))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out):
        return out.result()

    def retrieve_result(self, out, timeout=None):
        return out.result(timeout)

    def abort_everything(self, ensure_ready=True):
        for ref in list(self._pending.values()):
            try:
                api.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to stop
                pass
        self._pending.clear()


def register_beamlet() -> None:
    """Make ``"beamlet"`` (and Ray's name, ``"ray"``) a joblib backend name."""
    joblib.register_parallel_backend("beamlet", BeamletBackend)
    joblib.register_parallel_backend("ray", BeamletBackend)


#: Ray's name for `register_beamlet`.
register_ray = register_beamlet

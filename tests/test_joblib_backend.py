"""The joblib backend (Ray's ``ray.util.joblib``): ``register_beamlet()`` then
``joblib.parallel_backend("beamlet")`` runs ``joblib.Parallel`` batches as
beamlet tasks, with joblib's results, order and errors. (One test per backend:
each worker process imports joblib, which takes seconds.)"""
from __future__ import annotations

import os

import pytest

import beamlet as ray

try:
    import joblib
except ImportError as err:  # a missing test dependency fails, saying what to install
    pytest.fail(f"the joblib backend's tests need joblib ({err}): pip install -e '.[joblib]' "
                f"(it is in the test extra too)", pytrace=False)

from beamlet.util.joblib import BeamletBackend, register_beamlet  # noqa: E402


def square(x):
    return x * x


def inside_task(_):
    return ray.get_runtime_context().get_task_id() is not None, os.getpid()


def fails(x):
    if x == 3:
        raise ValueError(f"no {x}")
    return x


def test_parallel_runs_calls_as_beamlet_tasks(backend):
    register_beamlet()
    with joblib.parallel_backend("beamlet"):
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(square)(i) for i in range(50)) == \
            [i * i for i in range(50)]
        seen = joblib.Parallel(n_jobs=-1)(joblib.delayed(inside_task)(i) for i in range(4))
        with pytest.raises(ValueError, match="no 3"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(fails)(i) for i in range(6))
    assert all(in_task for in_task, _ in seen)
    if backend.isolated:
        assert os.getpid() not in {pid for _, pid in seen}
    with joblib.parallel_backend("ray", n_jobs=-1):  # (Ray's name for it)
        assert joblib.Parallel()(joblib.delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_effective_n_jobs(backend):
    assert BeamletBackend().effective_n_jobs(-1) == ray.cluster_resources()["CPU"]
    assert BeamletBackend().effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs == 0"):
        BeamletBackend().effective_n_jobs(0)

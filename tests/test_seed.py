"""The seed's five programs run unchanged, as the user would run them, on every backend.

Each runs in a subprocess (``python <program>``) with ``BEAMLET_BACKEND`` set,
from an empty temp directory, with a timeout; it must exit 0 and print its
"<name> ok" line. On ``ray`` it joins the suite's shared Ray (``$RAY_ADDRESS``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import _ray_cluster, seed_program

SEED_PROGRAMS = ["dynamic_graph", "nested", "parameter_server", "simulator", "tune_seed"]
TIMEOUT = 100  # seconds per program; under pytest's own 120 s limit


def _run(program: str, backend: str, cwd) -> subprocess.CompletedProcess:
    path = seed_program(program)
    # HOME too: tune_seed writes its results under ~/beamlet_results.
    env = dict(os.environ, BEAMLET_BACKEND=backend, PYTHONUNBUFFERED="1", HOME=str(cwd))
    if backend == "ray":
        # The program's plain ray.init() joins the suite's shared Ray through
        # $RAY_ADDRESS, as a Ray program does, rather than starting a Ray of its own.
        env.update(_ray_cluster.program_env())
    try:
        return subprocess.run([sys.executable, path], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        # subprocess.run has killed the child (its own, by pid) before raising
        pytest.fail(f"{program}.py on {backend!r} did not finish in {TIMEOUT}s\n"
                    f"stdout:\n{err.stdout}\nstderr:\n{err.stderr}")


@pytest.mark.parametrize("program", SEED_PROGRAMS)
def test_seed_program(program, backend_name, tmp_path):
    # (`backend_name` fails for a missing backend, and for `cluster` puts the test
    # cluster's address and token in the environment the program inherits.)
    backend = backend_name
    seed_program(program)  # fails, saying where it looked, if the seed is missing
    proc = _run(program, backend, tmp_path)
    report = f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"{program} ok") for line in lines), report
    if program == "tune_seed":
        _check_tune_results(tmp_path / "beamlet_results" / "my_experiment")


def _check_tune_results(exp_dir) -> None:
    """The seed's experiment left one directory per trial (6), each with a
    result.json whose rows count iterations from 1 and end with done=True only
    at the last, after the stopping condition (mean_accuracy >= 100) or 300 steps."""
    trial_dirs = [d for d in exp_dir.iterdir() if d.is_dir()]
    assert len(trial_dirs) == 6, sorted(d.name for d in trial_dirs)
    for d in trial_dirs:
        results = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        assert results[0]["training_iteration"] == 1
        assert results[-1]["done"] is True
        last = results[-1]
        assert last["mean_accuracy"] >= 100 or last["training_iteration"] == 300
        assert all(not r["done"] for r in results[:-1])

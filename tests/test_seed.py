"""The seed's five programs run unchanged, as the user would run them, on every backend.

Each runs in a subprocess (``python <program>``) with ``BEAMLET_BACKEND`` set,
from an empty temp directory, with a timeout; it must exit 0 and print its
"<name> ok" line.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from conftest import BACKENDS, backend_missing, seed_program

SEED_PROGRAMS = ["dynamic_graph", "nested", "parameter_server", "simulator", "tune_seed"]
TIMEOUT = 100  # seconds per program; under pytest's own 120 s limit


def _run(program: str, backend: str, cwd) -> subprocess.CompletedProcess:
    path = seed_program(program)
    env = dict(os.environ, BEAMLET_BACKEND=backend, PYTHONUNBUFFERED="1")
    try:
        return subprocess.run([sys.executable, path], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        # subprocess.run has killed the child (its own, by pid) before raising
        pytest.fail(f"{program}.py on {backend!r} did not finish in {TIMEOUT}s\n"
                    f"stdout:\n{err.stdout}\nstderr:\n{err.stderr}")


@pytest.mark.parametrize("backend_under_test", BACKENDS)
@pytest.mark.parametrize("program", SEED_PROGRAMS)
def test_seed_program(program, backend_under_test, tmp_path):
    backend = backend_under_test
    reason = backend_missing(backend)
    if reason:
        pytest.fail(reason)
    seed_program(program)  # fails, saying where it looked, if the seed is missing
    proc = _run(program, backend, tmp_path)
    report = f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"{program} ok") for line in lines), report

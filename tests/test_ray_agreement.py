"""The Ray-agreement runner (benchmarks/ray_agreement/run.py): it runs a Ray
program on beamlet through its shim (``import ray`` gives beamlet) and compares
what it prints with Ray's output. Ray's side comes from a results file here
(the benchmark itself runs Ray; too slow for the suite)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "benchmarks", "ray_agreement", "run.py")
PROGRAM = "00_tasks_basic.py"


def _run(tmp_path, ray_output: str) -> dict:
    cached = tmp_path / "ray.json"
    cached.write_text(json.dumps({"programs": [
        {"program": PROGRAM, "ray": {"output": ray_output, "seconds": 0.0}}]}))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, RUNNER, "--only", PROGRAM, "--backend", "inprocess",
                    "--ray-results", str(cached), "--no-ray", "--json", str(out)],
                   check=True, timeout=120, capture_output=True)
    return json.loads(out.read_text())


def test_a_program_run_on_beamlet_is_compared_with_rays_output(tmp_path):
    report = _run(tmp_path, "[0, 1, 4, 9, 16, 25]\n50")  # (Ray's, altered: they differ)
    assert (report["agreement"], report["programs_run"]) == (0.0, 1)
    (row,) = report["programs"]
    assert row["beamlet"]["output"] == "[0, 1, 4, 9, 16, 25]\n49" and not row["agree"]


def test_rays_log_lines_are_not_part_of_the_output():
    sys.path.insert(0, os.path.dirname(RUNNER))
    try:
        from run import _exception_type, normalise
    finally:
        sys.path.remove(os.path.dirname(RUNNER))
    assert normalise("a\n\x1b[33m(raylet)\x1b[0m worker died\n(f pid=12) hi\nb\n") == "a\nb"
    assert _exception_type("Traceback (most recent call last):\n  File x\n"
                           "ray.exceptions.GetTimeoutError: slow\n") == "GetTimeoutError"

"""``beamlet tune status DIR`` and ``beamlet tune plot DIR --metric M``, run as
programs on an experiment the test runs (on ``inprocess``)."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import cloudpickle
import pytest

import beamlet
from beamlet import tune
from beamlet.tune.schedulers import ASHAScheduler

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SUBPROCESS_TIMEOUT = 90


def falls(config):
    for i in range(1, 7):
        tune.report(loss=config["x"] / i, extra={"i": i})


def _beamlet(*args: str):
    env = dict(os.environ)
    env.pop("BEAMLET_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "beamlet.cli", "tune", *args], env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """4 trials; ASHA stops x=2,3,4 after their first result, x=1 runs 6."""
    storage = str(tmp_path_factory.mktemp("tune_cli"))
    beamlet.shutdown()
    beamlet.init(backend="inprocess", num_cpus=2)
    try:
        analysis = tune.run(falls, config={"x": tune.grid_search([1, 2, 3, 4])}, name="exp",
                            storage_path=storage, verbose=0,
                            scheduler=ASHAScheduler(metric="loss", mode="min", max_t=6,
                                                    grace_period=1))
    finally:
        beamlet.shutdown()
    return analysis


def test_status_prints_each_trial_with_its_iterations_and_metric(experiment):
    proc = _beamlet("status", experiment.experiment_path, "--metric", "loss")
    assert proc.returncode == 0, proc.stderr
    assert "4 trials: 4 TERMINATED" in proc.stdout
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[3:]}
    by_x = {t.config["x"]: str(t) for t in experiment.trials}
    header = proc.stdout.splitlines()[1].split()
    assert header[:3] == ["Trial", "name", "status"] and "loss" in header
    # name, status, x, iter, total time, loss
    assert rows[by_x[1]][1] == "TERMINATED" and rows[by_x[1]][3] == "6"
    assert rows[by_x[1]][5] == "0.16667"
    assert [rows[by_x[x]][3] for x in (2, 3, 4)] == ["1", "1", "1"]


def test_plot_writes_each_trials_curve(experiment, tmp_path):
    out = tmp_path / "curves.png"
    proc = _beamlet("plot", experiment.experiment_path, "--metric", "extra/i",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return
    assert "matplotlib is not installed" in proc.stdout and "curves.csv" in proc.stdout
    with open(tmp_path / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    points = {}
    for row in rows:
        points.setdefault(row["trial_name"], []).append(
            (int(row["training_iteration"]), float(row["extra/i"])))
    by_x = {t.config["x"]: str(t) for t in experiment.trials}
    assert points[by_x[1]] == [(i, float(i)) for i in range(1, 7)]
    assert all(points[by_x[x]] == [(1, 1.0)] for x in (2, 3, 4))


def test_bad_directory_or_metric_is_named(experiment, tmp_path):
    proc = _beamlet("plot", experiment.experiment_path, "--metric", "no_such_metric")
    assert proc.returncode == 1 and "'no_such_metric'" in proc.stderr
    proc = _beamlet("status", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "no experiment directory" in proc.stderr
    proc = _beamlet("status", str(tmp_path))
    assert proc.returncode == 1 and "no beamlet.tune experiment" in proc.stderr


def test_analysis_and_result_grid_plot(experiment, tmp_path):
    """analysis.plot() / ResultGrid.plot() draw a PNG; without matplotlib (an
    optional extra) they say what to install and write nothing."""
    with pytest.raises(ValueError, match="needs a metric"):
        experiment.plot()
    with pytest.raises(ValueError, match="'no_such_metric'"):
        experiment.plot("no_such_metric")
    out = tmp_path / "loss.png"
    grid = tune.ResultGrid(experiment)
    if importlib.util.find_spec("matplotlib") is not None:
        assert grid.plot("loss", str(out)) == str(out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return
    with pytest.raises(ImportError, match=r"matplotlib.*pip install 'beamlet\[plot\]'"):
        grid.plot("loss", str(out))
    assert not out.exists()

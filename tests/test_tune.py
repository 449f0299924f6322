"""beamlet.tune: search spaces, trials as actors, stop rules, logs, analysis, the seed's API."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import cloudpickle
import numpy as np
import pytest


import beamlet
from beamlet import tune
from beamlet.contrib.tune import plugins as tune_plugins
from beamlet.contrib.tune.trial import parse_resources
from beamlet.contrib.tune.variant_generator import count_variants, generate_variants
from beamlet.tune import grid_search, register_trainable, run_experiments

# Trainables defined here must reach worker processes of the local backend, which
# may not have tests/ on their path: pickle this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HAS_LOCAL = importlib.util.find_spec("beamlet.backends.local.driver") is not None
BACKENDS = ["inprocess",
            pytest.param("local", marks=pytest.mark.skipif(
                not HAS_LOCAL, reason="the local backend is not written yet"))]


@pytest.fixture(params=BACKENDS)
def on_backend(request, monkeypatch):
    """A started backend with 2 CPUs, shut down after the test."""
    monkeypatch.delenv("BEAMLET_BACKEND", raising=False)
    beamlet.shutdown()
    beamlet.init(backend=request.param, num_cpus=2)
    try:
        yield request.param
    finally:
        beamlet.shutdown()


@pytest.fixture
def storage(tmp_path):
    return str(tmp_path / "results")


def read_results(trial) -> list[dict]:
    with open(os.path.join(trial.path, "result.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- trainables -----------------------------------------------------------------

def count_forever(config, reporter):
    """The seed's style: loops forever; only a stop criterion ends it."""
    i = 0
    while True:
        i += config.get("step", 1)
        reporter(x=i, y=0)


def report_n(config):
    for i in range(config.get("n", 3)):
        tune.report({"score": config.get("x", 0) * (i + 1)})


def report_once(config):
    tune.report(score=1)


def parabola(config):
    tune.report(score=-(config["x"] - 3) ** 2)


def mixed(config):
    tune.report(i=1)
    if config["kind"] == "fail":
        raise ValueError("this trial fails on purpose")
    tune.report(i=2)
    if config["kind"] == "return":
        return None
    while True:
        tune.report(i=3)


# -- search spaces --------------------------------------------------------------

def test_grid_expansion_counts():
    config = {"a": grid_search([1, 2, 3]), "b": grid_search(["p", "q"]), "c": 7}
    assert count_variants(config) == 6
    variants = [c for c, _ in generate_variants(config, num_samples=2)]
    assert len(variants) == 12
    pairs = Counter((c["a"], c["b"]) for c in variants)
    assert set(pairs) == {(a, b) for a in (1, 2, 3) for b in ("p", "q")}
    assert set(pairs.values()) == {2}
    assert all(c["c"] == 7 for c in variants)
    # The first grid varies fastest, as in Ray; num_samples repeats the whole grid.
    assert [(c["a"], c["b"]) for c in variants[:6]] == [
        (1, "p"), (2, "p"), (3, "p"), (1, "q"), (2, "q"), (3, "q")]
    assert variants[:6] == variants[6:]


def test_grid_expansion_runs_every_trial(on_backend, storage):
    analysis = tune.run(report_once, config={"a": grid_search([1, 2, 3]),
                                             "b": grid_search([10, 20])},
                        num_samples=2, storage_path=storage, name="grid", verbose=0)
    assert len(analysis.trials) == 12
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert len({t.trial_id for t in analysis.trials}) == 12
    assert len({t.path for t in analysis.trials}) == 12
    assert Counter((t.config["a"], t.config["b"]) for t in analysis.trials) == \
        {(a, b): 2 for a in (1, 2, 3) for b in (10, 20)}
    assert all(os.path.isdir(t.path) and t.path.startswith(os.path.join(storage, "grid"))
               for t in analysis.trials)


def test_randint_excludes_upper_bound(on_backend, storage):
    rng = random.Random(0)
    values = {tune.randint(0, 3).sample(rng) for _ in range(2000)}
    assert values == {0, 1, 2}
    assert {tune.randint(5, 6).sample(rng) for _ in range(50)} == {5}
    assert {tune.qrandint(0, 4, 2).sample(rng) for _ in range(500)} == {0, 2, 4}
    with pytest.raises(ValueError):
        tune.randint(3, 3)
    analysis = tune.run(report_once, config={"r": tune.randint(0, 2)}, num_samples=40,
                        storage_path=storage, verbose=0, seed=3)
    assert {t.config["r"] for t in analysis.trials} == {0, 1}


def test_domains_stay_in_range():
    rng = random.Random(1)
    for _ in range(500):
        assert 2.0 <= tune.uniform(2, 3).sample(rng) <= 3.0
        assert 1e-4 <= tune.loguniform(1e-4, 1e-1).sample(rng) <= 1e-1
        assert tune.choice(["a", "b"]).sample(rng) in ("a", "b")
        assert 1 <= tune.lograndint(1, 100).sample(rng) < 100
        assert tune.quniform(0, 1, 0.25).sample(rng) in (0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(TypeError):
        tune.grid_search("abc")
    with pytest.raises(ValueError):
        tune.choice([])


def test_seed_makes_sampling_reproducible():
    config = {"lr": tune.loguniform(1e-4, 1e-1), "n": tune.randint(0, 1000),
              "g": grid_search([1, 2]),
              "np": tune.sample_from(lambda spec: float(np.random.uniform())),
              "py": tune.sample_from(lambda: random.random())}
    first = [c for c, _ in generate_variants(config, num_samples=5, seed=42)]
    again = [c for c, _ in generate_variants(config, num_samples=5, seed=42)]
    other = [c for c, _ in generate_variants(config, num_samples=5, seed=43)]
    assert first == again
    assert first != other
    # The global generators are restored after seeded sampling.
    np.random.seed(7)
    expected = np.random.uniform()
    np.random.seed(7)
    list(generate_variants(config, num_samples=2, seed=1))
    assert np.random.uniform() == expected


def test_nested_config_and_sample_from():
    config = {"model": {"layers": grid_search([1, 2]), "width": tune.choice([8])},
              "lr": tune.sample_from(lambda spec: spec.config.model.layers * 0.1),
              "wd": tune.sample_from(lambda spec: spec.config["lr"] / 10),
              "fixed": [1, {"k": grid_search(["u", "v"])}]}
    variants = list(generate_variants(config, seed=0))
    assert len(variants) == 4
    for cfg, params in variants:
        assert cfg["model"]["width"] == 8
        assert cfg["lr"] == pytest.approx(cfg["model"]["layers"] * 0.1)
        assert cfg["wd"] == pytest.approx(cfg["lr"] / 10)
        assert cfg["fixed"][0] == 1 and cfg["fixed"][1]["k"] in ("u", "v")
        assert list(params)[:2] == ["model/layers", "model/width"]
    cycle = {"a": tune.sample_from(lambda s: s.config.b), "b": tune.sample_from(lambda s: s.config.a)}
    with pytest.raises(ValueError, match="cycle"):
        list(generate_variants(cycle))


# -- stopping -------------------------------------------------------------------

def test_a_trial_that_runs_ahead_reports_without_waiting_and_hands_over_in_order(tmp_path):
    """run_ahead (what the runner asks for where every result is answered
    "continue"): after the first step the trainable goes on reporting with
    no further step() (the per-result protocol would hold it at its first
    report); the steps then hand over every result once, in order, the
    trial's end last; and it stops exactly at its stop criterion."""
    import threading

    from beamlet.contrib.tune.trial_actor import TrialActor

    reached = threading.Event()

    def reports(config):
        for i in range(1, 100):
            tune.report(i=i)
            if i == 10:
                reached.set()

    info = {"trial_id": "t1", "logdir": str(tmp_path / "t1"), "log_files": ["result.json"]}
    actor = TrialActor(reports, {}, info, {"i": 12}, {"run_ahead": True})
    first = actor.step()
    assert first["kind"] == "batch" and first["events"]
    assert reached.wait(60), "the trainable waited for the driver after a report"
    events = list(first["events"])
    while not (events[-1]["kind"] != "result" or events[-1]["result"]["done"]):
        batch = actor.step()
        assert batch["kind"] == "batch" and batch["events"]
        events.extend(batch["events"])
    assert [e["kind"] for e in events] == ["result"] * 12
    assert [e["result"]["i"] for e in events] == list(range(1, 13))
    assert [e["result"]["done"] for e in events] == [False] * 11 + [True]
    assert actor.step() == {"kind": "done"}  # (it has ended)
    # The directory, made by the trial's actor before the trainable starts, and
    # the loggers' files, which it makes meanwhile, on a thread of its own.
    deadline = time.monotonic() + 60
    while os.listdir(tmp_path / "t1") != ["result.json"]:
        assert time.monotonic() < deadline, os.listdir(tmp_path / "t1")
        time.sleep(0.01)


def test_stop_at_first_result_meeting_a_criterion(on_backend, storage):
    # x counts 1, 2, 3, ...: the trial ends at the result where x >= 5, i.e. x == 5.
    analysis = tune.run(count_forever, stop={"x": 5, "y": 10 ** 9}, storage_path=storage,
                        verbose=0)
    (trial,) = analysis.trials
    assert trial.status == "TERMINATED"
    assert trial.last_result["x"] == 5
    assert trial.last_result["training_iteration"] == 5
    results = read_results(trial)
    assert [r["x"] for r in results] == [1, 2, 3, 4, 5]
    assert [r["done"] for r in results] == [False] * 4 + [True]

    # Any criterion stops; a value jumping past the limit stops at that result.
    analysis = tune.run(count_forever, config={"step": grid_search([1, 4])},
                        stop={"x": 10, "training_iteration": 6}, storage_path=storage,
                        verbose=0)
    by_step = {t.config["step"]: t for t in analysis.trials}
    assert by_step[1].last_result["training_iteration"] == 6
    assert by_step[1].last_result["x"] == 6
    assert by_step[4].last_result["x"] == 12  # 4, 8, 12: the first result >= 10
    assert by_step[4].last_result["training_iteration"] == 3


def test_function_and_class_stoppers(on_backend, storage):
    analysis = tune.run(count_forever, stop=lambda trial_id, r: r["x"] >= 3,
                        storage_path=storage, verbose=0)
    (trial,) = analysis.trials
    assert trial.status == "TERMINATED" and trial.last_result["x"] == 3
    assert read_results(trial)[-1]["done"] is True

    analysis = tune.run(count_forever, stop=tune.MaximumIterationStopper(4),
                        storage_path=storage, verbose=0)
    assert analysis.trials[0].last_result["training_iteration"] == 4


def test_time_budget_zero_ends_everything(on_backend, storage):
    analysis = tune.run(count_forever, config={"step": grid_search([1, 2, 3])},
                        time_budget_s=0, storage_path=storage, verbose=0)
    assert [t.status for t in analysis.trials] == ["TERMINATED"] * 3


def report_then_sleep(config):
    tune.report(x=1)
    time.sleep(60)  # a stop that waited for the next report would wait this long
    tune.report(x=2)


class StopAllAfterFirstResult(tune.Stopper):
    def __init__(self):
        self.seen = False

    def __call__(self, trial_id, result):
        self.seen = True
        return False

    def stop_all(self):
        return self.seen


@pytest.mark.parametrize("how", ["time_budget_s", "stop_all"])
def test_experiment_stops_running_trials_at_once(start_backend, storage, how):
    # Only where trials run in other processes: on inprocess the driver itself
    # runs the trial's step until its next report.
    start_backend("local")
    options = {"time_budget_s": 0.5} if how == "time_budget_s" else \
        {"stop": StopAllAfterFirstResult()}
    analysis = tune.run(report_then_sleep, config={"a": grid_search([1, 2])},
                        storage_path=storage, verbose=0, **options)
    seen = []
    for trial in analysis.trials:
        assert trial.status == "TERMINATED"
        rows = read_results(trial)
        seen.append([r["x"] for r in rows])
        # Stopped before (or right after) its first report, never at the second;
        # after a result, the last row repeats it with done: true.
        assert seen[-1] in ([], [1, 1])
        assert not rows or rows[-1]["done"] is True
    if how == "stop_all":
        assert [1, 1] in seen


def test_metric_missing_from_the_first_result_raises(on_backend, storage):
    with pytest.raises(ValueError, match="'typo'"):
        tune.run(report_n, metric="typo", mode="max", storage_path=storage, verbose=0)
    # The trial whose result raised was stopped too (on inprocess its thread
    # would otherwise wait in tune.report forever).
    with pytest.raises(RuntimeError, match="inside a function trainable"):
        tune.report(a=1)
    def nested(config):
        tune.report(outer={"inner": 1})

    analysis = tune.run(nested, metric="outer/inner", mode="max", storage_path=storage,
                        verbose=0)
    assert analysis.trials[0].status == "TERMINATED"


def test_grid_search_of_a_non_list_is_rejected():
    with pytest.raises(ValueError, match="grid_search"):
        list(generate_variants({"a": {"grid_search": 5}}))
    with pytest.raises(ValueError, match="grid_search"):
        list(generate_variants({"a": {"grid_search": [1], "b": 2}}))


def test_zero_cpu_trials_ask_for_no_cpu(on_backend, storage):
    assert parse_resources({"cpu": 0}) == {}
    analysis = tune.run(report_once, config={"a": grid_search([1, 2, 3])},
                        resources_per_trial={"cpu": 0}, storage_path=storage, verbose=0)
    assert all(t.resources == {} and t.status == "TERMINATED" for t in analysis.trials)


def test_missing_stop_metric_warns(on_backend, storage):
    with pytest.warns(UserWarning, match="typo_metric"):
        analysis = tune.run(report_n, config={"n": 2}, stop={"typo_metric": 1},
                            storage_path=storage, verbose=0)
    assert analysis.trials[0].last_result["training_iteration"] == 2


# -- results on disk ------------------------------------------------------------

def test_result_json_progress_csv_and_params(on_backend, storage):
    def with_timesteps(config):
        for i in range(4):
            tune.report(loss=1.0 / (i + 1), timesteps_total=10 * i, nested={"a": i})

    analysis = tune.run(with_timesteps, config={"lr": grid_search([0.1, 0.2])},
                        storage_path=storage, name="files", verbose=0)
    for trial in analysis.trials:
        results = read_results(trial)
        # As in Ray: a trainable that returns gets a last row, its last result
        # again with done: true.
        assert [r["training_iteration"] for r in results] == [1, 2, 3, 4, 4]
        assert [r["done"] for r in results] == [False] * 4 + [True]
        results = results[:4]
        for r in results:
            assert r["config"] == trial.config
            assert r["trial_id"] == trial.trial_id
            assert isinstance(r["time_this_iter_s"], float)
            assert isinstance(r["time_total_s"], float)
            assert isinstance(r["done"], bool)
            assert r["nested"] == {"a": r["training_iteration"] - 1}
        assert [r["timesteps_total"] for r in results] == [0, 10, 20, 30]
        assert results[-1]["time_total_s"] == pytest.approx(
            sum(r["time_this_iter_s"] for r in results))
        with open(os.path.join(trial.path, "params.json")) as f:
            assert json.load(f) == trial.config
        with open(os.path.join(trial.path, "progress.csv")) as f:
            rows = list(csv.DictReader(f))
        assert [int(r["training_iteration"]) for r in rows] == [1, 2, 3, 4, 4]
        assert "nested/a" in rows[0] and "config" not in rows[0]
        assert float(rows[-1]["loss"]) == pytest.approx(0.25)

    # Without timesteps reported, result.json has no timesteps_total.
    analysis = tune.run(report_n, storage_path=storage, verbose=0)
    assert all("timesteps_total" not in r for r in read_results(analysis.trials[0]))


def test_default_storage_is_home_beamlet_results(on_backend, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    analysis = tune.run(report_once, name="home_exp", verbose=0)
    trial = analysis.trials[0]
    assert trial.path.startswith(str(tmp_path / "beamlet_results" / "home_exp") + os.sep)
    assert os.path.exists(os.path.join(trial.path, "result.json"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None,
                    reason="tensorboardX (whose protobuf and CRC-32C read the file back) "
                           "is not installed")
def test_tensorboard_event_files(on_backend, storage):
    """The event file, read back record by record (length, CRC-32C, Event
    protobuf, CRC-32C): the file version, then each result's scalars at its
    training_iteration."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    analysis = tune.run(report_n, config={"n": 3, "x": 2}, storage_path=storage, verbose=0)
    path = analysis.trials[0].path
    names = [n for n in os.listdir(path) if n.startswith("events.out.tfevents")]
    assert len(names) == 1
    with open(os.path.join(path, names[0]), "rb") as f:
        data = f.read()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == \
            masked_crc32c(body)
        events.append(Event.FromString(body))
        pos += 16 + length
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
    # (the last result twice: as in Ray, a trial's end logs it again with done=True)
    assert [step for step, _ in scalars] == [1, 2, 3, 3]
    assert [values["beamlet/tune/score"] for _, values in scalars] == [2.0, 4.0, 6.0, 6.0]


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None,
                    reason="tensorboardX is not installed")
def test_loggers_make_a_missing_trial_directory(tmp_path):
    """Each logger makes the trial's directory if the trial's actor has not
    yet: the JSON, CSV and TensorBoard files all land in it."""
    from beamlet.contrib.tune.loggers import (CSVLoggerCallback, JsonLoggerCallback,
                                              TBXLoggerCallback)

    class Where:  # what the loggers read of a trial
        def __init__(self, path):
            self.path, self.config, self.trial_id = str(path), {"x": 1}, str(path)

    for logger in (JsonLoggerCallback(), CSVLoggerCallback(), TBXLoggerCallback()):
        trial = Where(tmp_path / type(logger).__name__ / "trial")
        logger.log_trial_start(trial)
        logger.log_trial_result(0, trial, {"training_iteration": 1, "x": 1})
        logger.log_trial_end(trial)
        assert os.listdir(trial.path), type(logger).__name__
    assert any(n.startswith("events.out.tfevents")
               for n in os.listdir(tmp_path / "TBXLoggerCallback" / "trial"))


def test_logs_are_readable_while_the_trial_runs(on_backend, storage):
    """The loggers write on a thread of their own, but a running trial's
    result.json and progress.csv get its rows while it runs, not only at the
    end: the trainable waits for each of its rows (failing if one never comes)."""
    def watches(config):
        trial_dir = tune.get_trial_dir()
        for i in range(1, 4):
            tune.report(i=i)
            deadline = time.monotonic() + 60
            while True:
                counts = []
                for name, header in (("result.json", 0), ("progress.csv", 1)):
                    try:
                        with open(os.path.join(trial_dir, name)) as f:
                            counts.append(len(f.read().splitlines()) - header)
                    except FileNotFoundError:
                        counts.append(0)
                if min(counts) >= i:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"after report {i} the logs have {counts} rows")
                time.sleep(0.01)

    analysis = tune.run(watches, storage_path=storage, verbose=0)
    trial = analysis.trials[0]
    assert trial.status == "TERMINATED", trial.error_msg
    assert [r["i"] for r in read_results(trial)] == [1, 2, 3, 3]


def test_a_logger_error_is_raised_in_the_driver(tmp_path):
    """A built-in logger fails on its thread: the error reaches the caller (at
    its next call or at close), and the other loggers still close their files."""
    from beamlet.contrib.tune.loggers import (BackgroundLoggers, CSVLoggerCallback,
                                              JsonLoggerCallback)

    class Where:  # what the loggers read of a trial
        def __init__(self, path):
            self.path, self.config, self.trial_id = str(path), {"x": 1}, str(path)

    blocked = tmp_path / "a_file"
    blocked.write_text("")  # (a trial directory that is a file: opening in it fails)
    good, bad = Where(tmp_path / "good"), Where(blocked)
    loggers = BackgroundLoggers([JsonLoggerCallback(), CSVLoggerCallback()])
    loggers.call("on_trial_start", {"iteration": 0, "trials": [], "trial": good})
    loggers.call("on_trial_result", {"iteration": 0, "trials": [], "trial": good,
                                     "result": {"training_iteration": 1, "x": 1}})
    loggers.call("on_trial_start", {"iteration": 0, "trials": [], "trial": bad})
    with pytest.raises(NotADirectoryError):
        loggers.close([])
    assert len((tmp_path / "good" / "result.json").read_text().splitlines()) == 1
    assert len((tmp_path / "good" / "progress.csv").read_text().splitlines()) == 2


# -- statuses and errors --------------------------------------------------------

def test_statuses_and_failed_trials(on_backend, storage):
    config = {"kind": grid_search(["stop", "fail", "return"])}
    analysis = tune.run(mixed, config=config, stop={"i": 3}, storage_path=storage,
                        verbose=0, raise_on_failed_trial=False)
    by_kind = {t.config["kind"]: t for t in analysis.trials}
    assert by_kind["stop"].status == "TERMINATED"
    assert by_kind["stop"].last_result["i"] == 3
    assert by_kind["return"].status == "TERMINATED"
    assert by_kind["return"].last_result["i"] == 2
    assert by_kind["return"].last_result["done"] is True
    failed = by_kind["fail"]
    assert failed.status == "ERROR"
    assert "ValueError: this trial fails on purpose" in failed.error_msg
    with open(failed.error_file) as f:
        assert "this trial fails on purpose" in f.read()
    assert failed.last_result["i"] == 1
    assert len(read_results(failed)) == 1
    assert analysis.errored_trials == [failed]

    with pytest.raises(tune.TuneError, match="Trials did not complete") as info:
        tune.run(mixed, config=config, stop={"i": 3}, storage_path=storage, verbose=0)
    assert [t.config["kind"] for t in info.value.trials] == ["fail"]


def test_failing_setup_and_fail_fast(on_backend, storage):
    class BadSetup(tune.Trainable):
        def setup(self, config):
            raise RuntimeError("setup exploded")

    analysis = tune.run(BadSetup, storage_path=storage, verbose=0, raise_on_failed_trial=False)
    assert analysis.trials[0].status == "ERROR"
    assert "setup exploded" in analysis.trials[0].error_msg

    with pytest.raises(tune.TuneError, match="fail_fast"):
        tune.run(mixed, config={"kind": grid_search(["fail", "stop", "stop"])},
                 stop={"i": 3}, storage_path=storage, verbose=0, fail_fast=True)


def _never_stops(trial_id, result):
    return False


@pytest.mark.parametrize("per_result", [False, True], ids=["runs_ahead", "per_result"])
def test_trial_whose_process_dies_errors(on_backend, storage, per_result):
    """A trial whose process dies ends in ERROR. With a stopper function (the
    driver decides on each result) the trial waits for the driver after each
    report, so the result reported just before its death counts; running
    ahead (FIFO, no such stopper) it may be lost, never anything else."""
    if on_backend == "inprocess":
        pytest.skip("on inprocess the trial runs in the test's own process")

    def dies(config):
        tune.report(x=1)
        if config["die"]:
            os._exit(3)
        tune.report(x=2)

    analysis = tune.run(dies, config={"die": grid_search([True, False])},
                        storage_path=storage, verbose=0, raise_on_failed_trial=False,
                        stop=_never_stops if per_result else None)
    by_die = {t.config["die"]: t for t in analysis.trials}
    assert by_die[True].status == "ERROR"
    assert "ActorDiedError" in by_die[True].error_msg
    logged = [r["x"] for r in read_results(by_die[True])]
    assert logged == [1] if per_result else logged in ([], [1])
    assert by_die[True].last_result.get("x") == (logged[-1] if logged else None)
    assert by_die[False].status == "TERMINATED" and by_die[False].last_result["x"] == 2
    assert [r["x"] for r in read_results(by_die[False])] == [1, 2, 2]


@pytest.mark.parametrize("per_result", [False, True], ids=["runs_ahead", "per_result"])
def test_trial_whose_process_dies_late_keeps_its_results(on_backend, storage, per_result):
    """A trial retried after its process died: with per-result decisions every
    result it reported counts; running ahead, those it reported since its
    last batch went to the driver may be lost, but what is logged is, per
    run, the results in the order reported, none twice."""
    if on_backend == "inprocess":
        pytest.skip("on inprocess the trial runs in the test's own process")

    def dies_late(config):
        for x in range(1, 5):
            tune.report(x=x)
        os._exit(3)

    analysis = tune.run(dies_late, storage_path=storage, verbose=0,
                        raise_on_failed_trial=False, max_failures=1,
                        stop=_never_stops if per_result else None)
    trial = analysis.trials[0]
    assert trial.status == "ERROR" and "ActorDiedError" in trial.error_msg
    assert trial.num_failures == 1  # (retried once, and died the same way)
    logged = [r["x"] for r in read_results(trial)]
    if per_result:
        assert trial.last_result["x"] == 4
        assert logged == [1, 2, 3, 4, 1, 2, 3, 4]
    else:
        runs = _split_runs(logged)
        assert len(runs) <= 2 and all(run == list(range(1, len(run) + 1)) for run in runs)
        assert trial.last_result.get("x") == (logged[-1] if logged else None)


def _split_runs(values: list) -> list[list]:
    """[1, 2, 1, 2, 3] -> [[1, 2], [1, 2, 3]]: a new run where x starts over at 1."""
    runs: list[list] = []
    for value in values:
        if value == 1 or not runs:
            runs.append([])
        runs[-1].append(value)
    return runs


def test_experiment_objects(on_backend, storage):
    exps = [tune.Experiment("first", report_n, config={"n": 2}, storage_path=storage),
            tune.Experiment("second", parabola, config={"x": grid_search([2, 3])},
                            storage_path=storage)]
    trials = run_experiments(exps, verbose=0)
    assert sorted(t.experiment_name for t in trials) == ["first", "second", "second"]
    assert all(t.status == "TERMINATED" for t in trials)
    analysis = tune.run(exps[0].__class__("third", report_once, storage_path=storage),
                        verbose=0)
    assert analysis.trials[0].path.startswith(os.path.join(storage, "third"))


def test_run_experiments_raises_tune_error(on_backend, storage):
    register_trainable("mixed_trainable", mixed)
    spec = {"run": "mixed_trainable", "config": {"kind": "fail"}, "local_dir": storage}
    with pytest.raises(tune.TuneError):
        run_experiments({"failing": spec}, verbose=0)
    trials = run_experiments({"failing": spec}, verbose=0, raise_on_failed_trial=False)
    assert [t.status for t in trials] == ["ERROR"]


# -- best trial -----------------------------------------------------------------

def test_best_config_and_best_trial(on_backend, storage):
    analysis = tune.run(parabola, config={"x": grid_search([1, 2, 3, 4, 5])},
                        metric="score", mode="max", storage_path=storage, verbose=0)
    assert analysis.best_config == {"x": 3}
    assert analysis.best_result["score"] == 0
    assert analysis.best_trial.config == {"x": 3}
    assert analysis.best_logdir == analysis.best_trial.path
    assert analysis.get_best_config(metric="score", mode="min") == {"x": 1}
    assert analysis.get_best_trial("score", "min").config == {"x": 1}
    assert analysis.get_best_config("score", "max", scope="all") == {"x": 3}
    assert set(analysis.results) == {t.trial_id for t in analysis.trials}

    plain = tune.run(parabola, config={"x": grid_search([1, 3])}, storage_path=storage,
                     verbose=0)
    with pytest.raises(ValueError, match="metric"):
        plain.best_config
    assert plain.get_best_config("score", "max") == {"x": 3}
    with pytest.raises(ValueError, match="mode"):
        plain.get_best_config("score", "maximum")
    with pytest.warns(UserWarning):
        assert plain.get_best_trial("no_such_metric", "max") is None


def test_best_over_all_iterations(on_backend, storage):
    def peak(config):
        for v in config["values"]:
            tune.report(v=v)

    analysis = tune.run(peak, config={"values": grid_search([[1, 9, 2], [5, 5, 5]])},
                        storage_path=storage, verbose=0)
    assert analysis.get_best_config("v", "max")["values"] == [5, 5, 5]  # last value
    assert analysis.get_best_config("v", "max", scope="all")["values"] == [1, 9, 2]
    assert analysis.get_best_config("v", "max", scope="avg")["values"] == [5, 5, 5]


def test_analysis_reads_experiment_directory(on_backend, storage):
    analysis = tune.run(parabola, config={"x": grid_search([1, 3, 4])}, name="reload",
                        storage_path=storage, verbose=0)
    loaded = tune.ExperimentAnalysis(os.path.join(storage, "reload"),
                                     default_metric="score", default_mode="max")
    assert sorted(t.trial_id for t in loaded.trials) == sorted(t.trial_id for t in analysis.trials)
    assert loaded.best_config == {"x": 3}
    assert all(t.status == "TERMINATED" for t in loaded.trials)
    # Without the state file, the trial directories are enough.
    os.remove(os.path.join(storage, "reload", "experiment_state.json"))
    loaded = tune.ExperimentAnalysis(os.path.join(storage, "reload"))
    assert loaded.get_best_config("score", "max") == {"x": 3}
    assert len(loaded.trials) == 3


def test_results_df_needs_pandas(on_backend, storage):
    analysis = tune.run(parabola, config={"x": grid_search([1, 2])}, storage_path=storage,
                        verbose=0)
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pandas"):
            analysis.results_df
    else:
        df = analysis.results_df
        assert len(df) == 2 and "score" in df.columns


# -- the two APIs ---------------------------------------------------------------

def test_seed_api_run_experiments(on_backend, storage):
    def my_func(config, reporter):
        i = 0
        while True:
            reporter(timesteps_total=i, mean_accuracy=(i ** config["alpha"]))
            i += config["beta"]

    register_trainable("seed_style", my_func)
    trials = run_experiments({
        "seed_style_exp": {
            "run": "seed_style",
            "resources": {"cpu": 1, "gpu": 0},
            "stop": {"mean_accuracy": 4, "training_iteration": 20},
            "config": {"alpha": grid_search([0.2, 0.5]), "beta": grid_search([1, 2])},
            "local_dir": storage,
        }
    }, verbose=0)
    assert isinstance(trials, list) and len(trials) == 4
    assert all(isinstance(t, tune.Trial) and t.status == "TERMINATED" for t in trials)
    for t in trials:
        r = t.last_result
        assert r["mean_accuracy"] >= 4 or r["training_iteration"] == 20
        assert r["training_iteration"] <= 20
        assert r["timesteps_total"] == (r["training_iteration"] - 1) * t.config["beta"]
        assert t.path.startswith(os.path.join(storage, "seed_style_exp"))
    # alpha=0.5, beta=2: i = 0, 2, 4, ..., 16 -> sqrt(16) = 4 at the 9th result.
    fast = next(t for t in trials if t.config == {"alpha": 0.5, "beta": 2})
    assert fast.last_result["training_iteration"] == 9

    # resources_per_trial, storage_path and a function instead of a name work too.
    trials = run_experiments({"other": {"run": my_func, "resources_per_trial": {"cpu": 1},
                                        "stop": {"training_iteration": 2},
                                        "config": {"alpha": 1, "beta": 1},
                                        "num_samples": 3, "storage_path": storage}},
                             verbose=0)
    assert [t.last_result["training_iteration"] for t in trials] == [2, 2, 2]


def test_run_experiments_spec_validation(storage):
    beamlet.shutdown()
    register_trainable("report_once", report_once)
    with pytest.raises(ValueError, match="unknown spec key"):
        run_experiments({"e": {"run": "report_once", "bogus": 1, "local_dir": storage}})
    with pytest.raises(NotImplementedError, match="checkpoint_score_attr"):
        run_experiments({"e": {"run": "report_once", "checkpoint_score_attr": "x"}})
    with pytest.raises(ValueError, match="checkpoint_freq .*class trainables"):
        run_experiments({"e": {"run": "report_once", "checkpoint_freq": 1}})
    with pytest.raises(ValueError, match="unknown trainable"):
        run_experiments({"e": {"run": "never_registered"}})
    with pytest.raises(ValueError, match="'run'"):
        run_experiments({"e": {"config": {}}})
    with pytest.raises(TypeError, match="search_alg"):
        tune.run(report_once, search_alg=object())
    with pytest.raises(TypeError, match="unexpected"):
        tune.run(report_once, no_such_option=1)
    with pytest.raises(ValueError, match="mode"):
        tune.run(report_once, metric="score", mode="best")
    with pytest.raises(TypeError):
        register_trainable("not_a_trainable", 42)
    assert not beamlet.is_initialized()


def test_report_both_forms(on_backend, storage):
    def reporter_forms(config):
        tune.report({"a": 1, "b": 2})
        tune.report(a=3, b=4)
        tune.report({"a": 5}, b=6)
        tune.report(metrics={"a": 7, "b": 8})
        tune.report(a=9, b=10, seen_id=tune.get_trial_id(), seen_dir=tune.get_trial_dir())

    analysis = tune.run(reporter_forms, storage_path=storage, verbose=0)
    (trial,) = analysis.trials
    assert trial.status == "TERMINATED", trial.error_msg
    results = read_results(trial)
    assert [(r["a"], r["b"]) for r in results] == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10),
                                                   (9, 10)]
    assert results[-1]["seen_id"] == trial.trial_id
    assert results[-1]["seen_dir"] == trial.path
    with pytest.raises(RuntimeError, match="inside a function trainable"):
        tune.report(a=1)


def test_reporter_object_and_returned_dict(on_backend, storage):
    def with_reporter(config, reporter):
        reporter({"a": 1})
        reporter(a=2, extra="text")
        assert reporter.trial_id and reporter.logdir
        return {"a": 3}

    (trial,) = tune.run(with_reporter, storage_path=storage, verbose=0).trials
    assert trial.status == "TERMINATED", trial.error_msg
    results = read_results(trial)
    assert [r["a"] for r in results] == [1, 2, 3]
    assert results[-1]["done"] is True and results[1]["extra"] == "text"


def test_class_trainable(on_backend, storage):
    class Counter_(tune.Trainable):
        def setup(self, config):
            self.value = config["start"]

        def step(self):
            self.value += 1
            return {"value": self.value, "iteration_seen": self.iteration}

    analysis = tune.run(Counter_, config={"start": grid_search([0, 100])},
                        stop={"training_iteration": 3}, storage_path=storage, verbose=0)
    assert sorted(t.last_result["value"] for t in analysis.trials) == [3, 103]
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert [r["iteration_seen"] for r in read_results(analysis.trials[0])] == [0, 1, 2]


def test_import_forms():
    import beamlet.tune as tune_module
    from beamlet import tune as tune_attr
    assert tune_module is tune_attr
    assert tune_attr.run is tune_module.run
    assert issubclass(tune.TuneError, beamlet.exceptions.BeamletError)
    for name in tune_module.__all__:
        assert hasattr(tune_module, name), name
    # A trial's worker that unpickles a trainable using tune.report imports the
    # session, not the driver's machinery (each name is imported on first use).
    code = ("import sys; from beamlet import tune; tune.report; "
            "print(sorted(m for m in sys.modules if m.startswith('beamlet.contrib.tune.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "beamlet.contrib.tune.session" in out
    assert "beamlet.contrib.tune.runner" not in out and "beamlet.contrib.tune.api" not in out


# -- resources and concurrency --------------------------------------------------

def test_trials_share_the_cpus(on_backend, storage):
    class MaxRunning(tune.Callback):
        def __init__(self):
            self.max_running = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            running = sum(t.status == "RUNNING" for t in trials)
            self.max_running = max(self.max_running, running)

    watch = MaxRunning()
    analysis = tune.run(report_n, config={"x": grid_search(list(range(6)))},
                        resources_per_trial={"cpu": 1, "gpu": 0}, callbacks=[watch],
                        storage_path=storage, verbose=0)
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert watch.max_running == 2  # 6 one-CPU trials on 2 CPUs

    watch = MaxRunning()
    tune.run(report_n, config={"x": grid_search(list(range(4)))}, callbacks=[watch],
             max_concurrent_trials=1, storage_path=storage, verbose=0)
    assert watch.max_running == 1


def test_infeasible_resources_raise(on_backend, storage):
    with pytest.raises(tune.TuneError, match="could never run"):
        tune.run(report_once, resources_per_trial={"cpu": 64}, storage_path=storage,
                 verbose=0)
    with pytest.raises(tune.TuneError, match="GPU"):
        tune.run(report_once, resources_per_trial={"cpu": 1, "gpu": 1},
                 storage_path=storage, verbose=0)


def test_parse_resources():
    assert parse_resources(None) == {"CPU": 1.0}
    assert parse_resources({"cpu": 1, "gpu": 0}) == {"CPU": 1.0}
    assert parse_resources({"CPU": 2, "GPU": 0.5}) == {"CPU": 2.0, "GPU": 0.5}
    assert parse_resources({"gpu": 1}) == {"CPU": 1.0, "GPU": 1.0}
    assert parse_resources({"cpu": 0.5, "custom_resources": {"tpu": 1}, "disk": 2}) == \
        {"CPU": 0.5, "tpu": 1.0, "disk": 2.0}
    with pytest.raises(ValueError):
        parse_resources({"cpu": -1})


def test_auto_init_uses_the_public_api(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAMLET_BACKEND", "inprocess")
    beamlet.shutdown()
    try:
        analysis = tune.run(report_once, storage_path=str(tmp_path), verbose=0)
        assert beamlet.is_initialized()
        assert analysis.trials[0].status == "TERMINATED"
    finally:
        beamlet.shutdown()


# -- callbacks, loggers, output -------------------------------------------------

class RecordingLogger(tune.LoggerCallback):
    def __init__(self):
        self.events = []

    def log_trial_start(self, trial):
        self.events.append(("start", trial.trial_id))

    def log_trial_result(self, iteration, trial, result):
        self.events.append(("result", result["training_iteration"]))

    def log_trial_end(self, trial, failed=False):
        self.events.append(("end", failed))


def test_logger_plugin_by_name(on_backend, storage):
    recorder = RecordingLogger()

    class Plugin:
        @tune_plugins.hookimpl
        def beamlet_tune_loggers(self):
            return {"recording": lambda: recorder}

    plugin = Plugin()
    tune_plugins.register(plugin)
    try:
        analysis = tune.run(report_n, config={"n": 2}, loggers=["json", "recording"],
                            storage_path=storage, verbose=0)
    finally:
        tune_plugins.unregister(plugin)
    trial = analysis.trials[0]
    assert recorder.events == [("start", trial.trial_id), ("result", 1), ("result", 2),
                               ("result", 2), ("end", False)]
    assert os.path.exists(os.path.join(trial.path, "result.json"))
    assert not os.path.exists(os.path.join(trial.path, "progress.csv"))
    with pytest.raises(ValueError, match="unknown logger"):
        tune.run(report_n, loggers=["recording"], storage_path=storage, verbose=0)


def test_verbose_levels(on_backend, storage, capsys):
    tune.run(report_n, config={"x": grid_search([1, 2])}, storage_path=storage, verbose=0)
    assert capsys.readouterr().out == ""
    analysis = tune.run(report_n, config={"x": grid_search([1, 2])}, metric="score",
                        mode="max", storage_path=storage, verbose=1)
    out = capsys.readouterr().out
    assert "== Status ==" in out and "2 TERMINATED" in out
    assert all(str(t) in out for t in analysis.trials)
    assert "Trial name" in out and "score" in out
    tune.run(report_n, config={"x": 1}, storage_path=storage, verbose=2)
    assert "completed after 3 iterations" in capsys.readouterr().out


# -- interruption ---------------------------------------------------------------

INTERRUPTED_SCRIPT = """
import os, sys, time
import beamlet
from beamlet import tune

marker = sys.argv[1]

def forever(config):
    while True:
        open(marker, "a").close()
        time.sleep(0.02)
        tune.report(x=1)

beamlet.init(num_cpus=2)
try:
    tune.run(forever, config={"a": tune.grid_search([1, 2, 3])},
             storage_path=sys.argv[2], verbose=0)
except KeyboardInterrupt:
    print("interrupted", flush=True)
beamlet.shutdown()
print("shut down", flush=True)
"""


@pytest.mark.parametrize("which", BACKENDS)
def test_ctrl_c_stops_the_run_cleanly(which, tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SCRIPT)
    marker = tmp_path / "started"
    env = dict(os.environ, BEAMLET_BACKEND=which)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(tmp_path / "r")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=10)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert "interrupted" in out and "shut down" in out


def test_reuse_actors_runs_trials_in_the_same_workers(start_backend, storage):
    start_backend("local")
    analysis = tune.run(report_n, config={"x": grid_search(list(range(6)))},
                        storage_path=storage, verbose=0)
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    # 6 one-CPU trials on 2 CPUs: each new trial runs in the actor of an ended one.
    assert len({t.last_result["pid"] for t in analysis.trials}) <= 2
    analysis = tune.run(report_n, config={"x": grid_search(list(range(3)))},
                        reuse_actors=False, storage_path=storage, verbose=0)
    assert len({t.last_result["pid"] for t in analysis.trials}) == 3

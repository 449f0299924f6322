"""beamlet.tune's checkpoints: function trainables through tune.report /
tune.get_checkpoint, class trainables through save_checkpoint /
load_checkpoint, checkpoint_freq / checkpoint_at_end / keep_checkpoints_num,
max_failures retrying a failed trial from its latest checkpoint, and resuming
after the driver was SIGKILLed (trials, and the schedulers' and searchers' state)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import cloudpickle
import pytest

from test_tune import on_backend, read_results, storage  # noqa: F401 - fixtures

from beamlet import tune
from beamlet.contrib.tune.experiment_state import ExperimentStateLog


def _run_until_killed(args: list, env: dict, ready, what: str, interval: float = 0.02) -> None:
    """Run the experiment script `args` and SIGKILL it (our own child, by pid) as
    soon as `ready()` holds; fails saying `what` never happened within 60 s, or if
    the run ended before it was killed."""
    proc = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, what
            time.sleep(interval)
    finally:
        proc.kill()
        proc.wait(timeout=30)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def fails_once_at_three(config):
    """Counts to 5, checkpointing each step; the first attempt fails at step 3."""
    checkpoint = tune.get_checkpoint()
    restored = checkpoint is not None
    step = 0
    if restored:
        with open(os.path.join(checkpoint.path, "step.txt")) as f:
            step = int(f.read())
    while step < 5:
        step += 1
        if step == 3 and not restored:
            raise RuntimeError("failing on purpose")
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "step.txt"), "w") as f:
                f.write(str(step))
            tune.report({"step": step, "restored": restored},
                        checkpoint=tune.Checkpoint.from_directory(d))


def test_failed_function_trial_is_retried_from_its_checkpoint(on_backend, storage):
    analysis = tune.run(fails_once_at_three, max_failures=1, storage_path=storage, verbose=0)
    (trial,) = analysis.trials
    assert trial.status == "TERMINATED", trial.error_msg
    assert trial.num_failures == 1
    rows = read_results(trial)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4, 5, 5]
    assert [r["restored"] for r in rows[:5]] == [False, False, True, True, True]
    assert "failing on purpose" in open(trial.error_file).read()
    assert os.path.basename(trial.checkpoint) == "checkpoint_000005"

    # Without retries the same trainable fails.
    analysis = tune.run(fails_once_at_three, storage_path=storage, verbose=0,
                        raise_on_failed_trial=False)
    assert analysis.trials[0].status == "ERROR"
    assert analysis.trials[0].num_failures == 0


class Counter(tune.Trainable):
    """Counts; its state is saved as a dict. The first attempt fails at 5."""

    def setup(self, config):
        self.count = 0
        self.restored = False

    def step(self):
        self.count += 1
        if self.count == 5 and not self.restored:
            raise RuntimeError("class trainable failing on purpose")
        return {"count": self.count, "restored": self.restored}

    def save_checkpoint(self, checkpoint_dir):
        return {"count": self.count}

    def load_checkpoint(self, checkpoint):
        self.count = checkpoint["count"]
        self.restored = True


def test_class_trainable_checkpoint_freq_keep_num_at_end_and_retry(on_backend, storage):
    analysis = tune.run(Counter, stop={"training_iteration": 7}, checkpoint_freq=2,
                        keep_checkpoints_num=2, checkpoint_at_end=True, max_failures=2,
                        storage_path=storage, verbose=0)
    (trial,) = analysis.trials
    assert trial.status == "TERMINATED", trial.error_msg
    assert trial.num_failures == 1
    rows = read_results(trial)
    # Failed at count 5; restored from the checkpoint at 4.
    assert [r["count"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    kept = sorted(d for d in os.listdir(trial.path) if d.startswith("checkpoint_"))
    assert kept == ["checkpoint_000006", "checkpoint_000007"]
    assert tune.Checkpoint(trial.checkpoint).to_dict() == {"count": 7}


def test_checkpoint_options_are_checked(storage):
    def fn(config):
        tune.report(x=1)

    with pytest.raises(ValueError, match="class trainables"):
        tune.run(fn, checkpoint_freq=1, storage_path=storage, verbose=0)

    class NoSave(tune.Trainable):
        def step(self):
            return {"x": 1}

    with pytest.raises(ValueError, match="save_checkpoint"):
        tune.run(NoSave, checkpoint_at_end=True, storage_path=storage, verbose=0)
    with pytest.raises(ValueError, match="keep_checkpoints_num"):
        tune.run(NoSave, keep_checkpoints_num=0, storage_path=storage, verbose=0)
    with pytest.raises(ValueError, match="not a directory"):
        tune.Checkpoint.from_directory(os.path.join(storage, "missing"))


# -- resuming after the driver was killed -----------------------------------------

RESUMED_SCRIPT = """
import os, sys, tempfile, time
import beamlet
from beamlet import tune
from beamlet.contrib.tune.experiment_state import ExperimentStateLog

marks, storage, how = sys.argv[1], sys.argv[2], sys.argv[3]

def counts(config):
    checkpoint = tune.get_checkpoint()
    i = checkpoint.to_dict()["i"] if checkpoint else 0
    open(os.path.join(marks, f"start_{config['x']}_{i}"), "w").close()
    n = 2 if config["x"] < 2 else 30
    while i < n:
        i += 1
        time.sleep(0.02)
        with tempfile.TemporaryDirectory() as d:
            tune.report({"i": i}, checkpoint=tune.Checkpoint.from_dict({"i": i}, d))

beamlet.init(num_cpus=2)
space = {"x": tune.grid_search([0, 1, 2, 3])}
if how == "tuner":
    tuner = tune.Tuner(counts, param_space=space, run_config=tune.RunConfig(
        name="exp", storage_path=storage, verbose=0))
    tuner.fit()
elif how == "tuner-restore":
    tune.Tuner.restore(os.path.join(storage, "exp"), counts).fit()
else:
    tune.run(counts, config=space, name="exp", storage_path=storage, verbose=0,
             resume=(how == "resume"))
print("finished", flush=True)
"""


@pytest.mark.parametrize("api", ["run", "tuner"])
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, api):
    script = tmp_path / "resumed.py"
    script.write_text(RESUMED_SCRIPT)
    marks, results = tmp_path / "marks", tmp_path / "results"
    marks.mkdir()
    # inprocess: the trials run inside the driver, so SIGKILL leaves no process behind.
    # (TMPDIR: the trainables' temporary checkpoint dirs, left by the SIGKILL, stay in tmp_path)
    env = dict(os.environ, BEAMLET_BACKEND="inprocess", TMPDIR=str(tmp_path))
    # Killed once trial x=2 has checkpointed a few times (x=0 and x=1 have ended).
    _run_until_killed([sys.executable, str(script), str(marks), str(results),
                       "tuner" if api == "tuner" else "fresh"], env,
                      lambda: any(p.name.startswith("checkpoint_000005")
                                  for p in results.glob("exp/*x=2*/*")),
                      "trial x=2 never got to 5 results", interval=0.05)
    again = subprocess.run([sys.executable, str(script), str(marks), str(results),
                            "tuner-restore" if api == "tuner" else "resume"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    starts = sorted(p.name for p in marks.iterdir())
    assert "start_0_0" in starts and "start_1_0" in starts
    assert not [s for s in starts if s.startswith(("start_0_", "start_1_")) and
                s not in ("start_0_0", "start_1_0")]  # ended trials were not rerun
    resumed_x2 = [int(s.split("_")[2]) for s in starts if s.startswith("start_2_")]
    # x=2 went on from its checkpoint: at least the 4th, which the driver logged
    # before it let the trial make the 5th.
    assert 0 in resumed_x2 and max(resumed_x2) >= 4
    analysis = tune.ExperimentAnalysis(str(results / "exp"))
    assert sorted(t.config["x"] for t in analysis.trials) == [0, 1, 2, 3]
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert {t.config["x"]: t.last_result["i"] for t in analysis.trials} == \
        {0: 2, 1: 2, 2: 30, 3: 30}


def test_resume_needs_a_state(storage):
    with pytest.raises(ValueError, match="no experiment to resume"):
        tune.run(fails_once_at_three, name="never_ran", storage_path=storage, resume=True,
                 verbose=0)


HYPERBAND_SCRIPT = """
import os, sys, tempfile, time
import beamlet
from beamlet import tune
from beamlet.contrib.tune.experiment_state import ExperimentStateLog
from beamlet.tune.schedulers import HyperBandScheduler

marks, storage, how = sys.argv[1], sys.argv[2], sys.argv[3]

def climb(config):
    checkpoint = tune.get_checkpoint()
    i = checkpoint.to_dict()["i"] if checkpoint else 0
    open(os.path.join(marks, f"start_{config['x']}_{i}_{time.monotonic_ns()}"), "w").close()
    while True:
        i += 1
        time.sleep(0.05)
        with tempfile.TemporaryDirectory() as d:
            tune.report({"i": i, "score": config["x"] * i},
                        checkpoint=tune.Checkpoint.from_dict({"i": i}, d))

beamlet.init(num_cpus=2)
# max_t=9, eta=3: the first bracket takes all 9 trials, keeps 3 at i=1, 1 at i=3.
scheduler = HyperBandScheduler(time_attr="i", metric="score", mode="max", max_t=9,
                               reduction_factor=3)
tune.run(climb, config={"x": tune.grid_search(list(range(9)))}, name="exp",
         storage_path=storage, verbose=0, scheduler=scheduler, resume=(how == "resume"))
print("finished", flush=True)
"""


def test_killed_driver_resumes_hyperband_with_its_brackets(tmp_path):
    """Killed after the first milestone's promotion (2 promoted trials running,
    the third PAUSED and due to resume), the resumed run ends as an
    uninterrupted one would: x<6 stopped at i=1, x=6,7 at i=3, x=8 at max_t,
    and no trial dropped at a milestone runs again."""
    script = tmp_path / "hyperband.py"
    script.write_text(HYPERBAND_SCRIPT)
    marks, results = tmp_path / "marks", tmp_path / "results"
    marks.mkdir()
    # (TMPDIR: the trainables' temporary checkpoint dirs, left by the SIGKILL, stay in tmp_path)
    env = dict(os.environ, BEAMLET_BACKEND="inprocess", TMPDIR=str(tmp_path))
    _run_until_killed([sys.executable, str(script), str(marks), str(results), "fresh"], env,
                      lambda: any(p.name.startswith("start_") and p.name.split("_")[2] != "0"
                                  for p in marks.iterdir()),
                      "no trial was promoted")
    # The killed experiment's table, from its log (no backend started).
    status = subprocess.run([sys.executable, "-m", "beamlet.cli", "tune", "status",
                             str(results / "exp")], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "9 trials:" in status.stdout and "TERMINATED" in status.stdout
    again = subprocess.run([sys.executable, str(script), str(marks), str(results), "resume"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    analysis = tune.ExperimentAnalysis(str(results / "exp"))
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert {t.config["x"]: t.last_result["i"] for t in analysis.trials} == \
        {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 3, 7: 3, 8: 9}
    # Every start of a trial after its first went on from a checkpoint of its own,
    # and only the 3 promoted trials were started again.
    restarted = {int(p.name.split("_")[1]) for p in marks.iterdir()
                 if p.name.split("_")[2] != "0"}
    assert restarted <= {6, 7, 8} and restarted


PBT_SCRIPT = """
import os, sys, tempfile, time
import beamlet
from beamlet import tune
from beamlet.contrib.tune.experiment_state import ExperimentStateLog
from beamlet.tune.schedulers import PopulationBasedTraining

storage, how = sys.argv[1], sys.argv[2]

def grow(config):
    checkpoint = tune.get_checkpoint()
    i, total = (checkpoint.to_dict()["i"], checkpoint.to_dict()["total"]) if checkpoint \\
        else (0, 0.0)
    while True:
        i += 1
        total += config["h"]
        time.sleep(0.02)
        with tempfile.TemporaryDirectory() as d:
            tune.report({"i": i, "total": total},
                        checkpoint=tune.Checkpoint.from_dict({"i": i, "total": total}, d))

beamlet.init(num_cpus=2)
scheduler = PopulationBasedTraining(time_attr="i", metric="total", mode="max",
                                    perturbation_interval=2, quantile_fraction=0.25,
                                    hyperparam_mutations={"h": [1, 2, 3, 4, 5, 6]}, seed=0)
tune.run(grow, config={"h": tune.grid_search([1, 2, 3, 4])}, name="exp", stop={"i": 14},
         storage_path=storage, verbose=0, scheduler=scheduler, resume=(how == "resume"))
print("finished", flush=True)
"""


def test_killed_driver_resumes_pbt_with_its_state(tmp_path):
    """Killed after a few exploits, the resumed PBT goes on counting them (each
    exploit copies its donor's checkpoint to a directory numbered by that
    count: a PBT that forgot would number them from 0 again)."""
    script = tmp_path / "pbt.py"
    script.write_text(PBT_SCRIPT)
    results = tmp_path / "results"
    # (TMPDIR: the trainables' temporary checkpoint dirs, left by the SIGKILL, stay in tmp_path)
    env = dict(os.environ, BEAMLET_BACKEND="inprocess", TMPDIR=str(tmp_path))
    _run_until_killed([sys.executable, str(script), str(results), "fresh"], env,
                      lambda: len(list(results.glob("exp/*/exploit_*"))) >= 3,
                      "PBT never exploited")
    again = subprocess.run([sys.executable, str(script), str(results), "resume"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    analysis = tune.ExperimentAnalysis(str(results / "exp"))
    assert all(t.status == "TERMINATED" and t.last_result["i"] == 14
               for t in analysis.trials)
    _, state = ExperimentStateLog.read_all(str(results / "exp"))
    numbers = {int(p.name.split("_")[1]) for p in results.glob("exp/*/exploit_*")}
    assert numbers == set(range(state["num_perturbations"]))


RULES_SCRIPT = """
import json, os, sys, time
import beamlet
from beamlet import tune
from beamlet.tune.schedulers import ASHAScheduler, MedianStoppingRule
from beamlet.tune.search import ConcurrencyLimiter, Searcher

marks, storage, which, how = sys.argv[1:5]

def steps(config):
    if config["x"] == 3 and how == "fresh":
        open(os.path.join(marks, "blocked"), "w").close()
        time.sleep(120)  # killed here, before its first result
    for i in range(1, 5):
        tune.report({"i": i, "score": config["x"]})

class InOrder(Searcher):
    def __init__(self):
        super().__init__()
        self.todo, self.ended = [1, 5, 6, 3], {}
    def suggest(self, trial_id):
        return {"x": self.todo.pop(0)}
    def on_trial_complete(self, trial_id, result=None, error=False):
        self.ended[trial_id] = result["score"]

beamlet.init(num_cpus=1)
kwargs = dict(name="exp", storage_path=storage, verbose=0, metric="score", mode="max",
              max_concurrent_trials=1, resume=(how == "resume"))
if which == "asha":
    limiter = ConcurrencyLimiter(InOrder(), max_concurrent=2)
    tune.run(steps, num_samples=4, search_alg=limiter, **kwargs,
             scheduler=ASHAScheduler(time_attr="i", max_t=4, grace_period=1,
                                     reduction_factor=2))
    print(json.dumps({"ended": sorted(limiter.searcher.ended.values()),
                      "live": len(limiter.live)}))
else:
    tune.run(steps, config={"x": tune.grid_search([5, 6, 4, 3])}, **kwargs,
             scheduler=MedianStoppingRule(time_attr="i", grace_period=1,
                                          min_samples_required=2))
"""


@pytest.mark.parametrize("which", ["asha", "median"])
def test_killed_driver_resumes_asha_median_and_searcher_with_their_state(tmp_path, which):
    """Trials run one at a time; the driver is killed as the last one (x=3)
    starts. Resumed, it is judged against all three ended trials, as in an
    uninterrupted run (stopped at i=1: below ASHA's rung cutoff 5, below the
    median 5 of the others' means), and the searcher has seen every trial
    end (a resume from a once-a-second snapshot had forgotten the last
    trials' results, and let x=3 run to the end)."""
    script = tmp_path / "rules.py"
    script.write_text(RULES_SCRIPT)
    marks, results = tmp_path / "marks", tmp_path / "results"
    marks.mkdir()
    env = dict(os.environ, BEAMLET_BACKEND="inprocess", TMPDIR=str(tmp_path))
    args = [sys.executable, str(script), str(marks), str(results), which]
    _run_until_killed(args + ["fresh"], env, (marks / "blocked").exists,
                      "trial x=3 never started")
    again = subprocess.run(args + ["resume"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    analysis = tune.ExperimentAnalysis(str(results / "exp"))
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    last = {t.config["x"]: t.last_result["i"] for t in analysis.trials}
    if which == "asha":
        assert last == {1: 4, 5: 4, 6: 4, 3: 1}
        assert json.loads(again.stdout.splitlines()[-1]) == {"ended": [1, 3, 5, 6], "live": 0}
    else:
        assert last == {5: 4, 6: 4, 4: 1, 3: 1}

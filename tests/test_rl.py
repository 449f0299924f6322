"""beamlet.rl end to end: every algorithm on every backend, learning, checkpoints,
env runner crashes, plugins, Tune and the command line. Budgets are tiny: the
networks are small and each training runs a few iterations."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import numpy as np
import pytest

try:
    import gymnasium as gym
except ImportError as err:  # a missing test dependency fails, saying what to install
    pytest.fail(f"beamlet.rl's tests need gymnasium ({err}): pip install -e '.[rl]' "
                f"(it is in the test extra too)", pytrace=False)

import beamlet  # noqa: E402
from beamlet import rl  # noqa: E402
from beamlet.contrib.rl.algorithm import Algorithm  # noqa: E402
from beamlet.contrib.rl import es as es_module  # noqa: E402
from beamlet.contrib.rl.env_runner import WorkerSet  # noqa: E402

TINY = {
    "PPO": dict(train_batch_size=64, minibatch_size=32, num_epochs=2),
    "A2C": dict(updates_per_iteration=3),
    "A3C": dict(updates_per_iteration=3),
    "DQN": dict(num_steps_sampled_before_learning_starts=16, train_batch_size=16,
                rollout_fragment_length=8),
    "ES": dict(noise_size=50_000, episodes_per_batch=4),
}
SMALL_MODEL = {"fcnet_hiddens": [16]}
RESULT_KEYS = {"training_iteration", "episode_return_mean", "episode_len_mean",
               "num_env_steps_sampled", "num_env_steps_sampled_lifetime", "time_this_iter_s",
               "learner"}


def tiny_config(name: str, runners: int = 0, env: str = "CartPole-v1"):
    return (rl.get_algorithm_config(name).environment(env)
            .env_runners(num_env_runners=runners, num_envs_per_env_runner=2)
            .training(model=SMALL_MODEL, **TINY[name]).debugging(seed=0))


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_algorithm_trains_on_a_tiny_budget(backend, name):
    algo = tiny_config(name, runners=1).build()
    try:
        first = algo.train()
        second = algo.train()
    finally:
        algo.stop()
    assert RESULT_KEYS <= set(second)
    assert second["training_iteration"] == 2
    assert first["num_env_steps_sampled"] > 0
    assert second["num_env_steps_sampled_lifetime"] == \
        first["num_env_steps_sampled"] + second["num_env_steps_sampled"]
    assert second["episode_return_mean"] > 0
    assert isinstance(second["learner"], dict) and second["learner"]


def test_ppo_at_least_doubles_its_return_on_cartpole(inprocess):
    algo = (rl.PPOConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
            .training(lr=1e-3, gamma=0.98, lambda_=0.8, train_batch_size=256,
                      minibatch_size=64, num_epochs=10)
            .debugging(seed=0).build())
    try:
        start = algo.train()["episode_return_mean"]
        best = start
        for _ in range(25):
            best = max(best, algo.train()["episode_return_mean"])
            if best >= 2 * start:
                break
    finally:
        algo.stop()
    assert best >= 2 * start, (start, best)


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpoint_round_trip_gives_identical_actions_and_training(inprocess, tmp_path, name):
    algo = tiny_config(name).build()
    restored = None
    try:
        algo.train()
        path = algo.save(str(tmp_path / "checkpoint_000001"))
        restored = Algorithm.from_checkpoint(str(tmp_path))  # finds the latest checkpoint_*
        assert type(restored) is type(algo) and restored.iteration == 1
        obs = np.random.default_rng(0).uniform(-0.5, 0.5, size=(20, 4)).astype(np.float32)
        assert [algo.compute_single_action(o) for o in obs] == \
            [restored.compute_single_action(o) for o in obs]
        a, b = algo.train(), restored.train()
        assert a["learner"] == b["learner"]
        assert a["num_env_steps_sampled_lifetime"] == b["num_env_steps_sampled_lifetime"]
        assert path == str(tmp_path / "checkpoint_000001")
    finally:
        algo.stop()
        if restored is not None:
            restored.stop()


def test_env_runner_killed_mid_training_is_replaced(start):
    start()
    algo = tiny_config("PPO", runners=2).build()
    try:
        algo.train()
        victim = beamlet.get(algo.workers.actors[0].pid.remote(), timeout=60)
        os.kill(victim, signal.SIGKILL)
        result = algo.train()
        assert result["num_env_runner_restarts"] >= 1
        assert result["num_env_steps_sampled"] == 64
        pids = beamlet.get([a.pid.remote() for a in algo.workers.actors], timeout=60)
        assert victim not in pids
        assert algo.train()["training_iteration"] == 3
    finally:
        algo.stop()


def test_es_workers_read_one_shared_noise_table(start):
    start()
    algo = tiny_config("ES", runners=2).build()
    try:
        assert algo.workers.foreach("noise_is_shared") == [True, True]
        result = algo.train()
    finally:
        algo.stop()
    # 4 unperturbed episodes (the default episodes_per_eval, 2 per worker) are the
    # reported ones; the 4 perturbed ones are the learner's
    assert result["episodes_this_iter"] == 4 and result["learner"]["grad_gnorm"] > 0
    assert result["learner"]["perturbed_episodes_this_iter"] == 4
    assert result["learner"]["eval_episodes_this_iter"] == 4


class Slicer:
    """A worker for WorkerSet.balanced: tags the items of each slice; the slice
    holding item 0 waits until the file `gate` exists."""

    def __init__(self, gate: str):
        self.gate = gate

    def run(self, tag: int, items: list) -> list:
        if 0 in items:
            deadline = time.monotonic() + 60
            while not os.path.exists(self.gate):
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never opened the gate")
                time.sleep(0.01)
        return [tag + x for x in items]


def test_worker_set_hands_each_slice_to_the_first_worker_free(start, tmp_path):
    """While worker 0 is held on its first slice, worker 1 runs every slice but
    the two handed to worker 0 at the start; each item is covered once, by
    slices that shrink, each result with its own slice. (A static split would
    leave worker 1 idle and the driver waiting: a GetTimeoutError.) Cheap items
    (`min_size`) and a single worker get one slice per worker."""
    start()
    gate = str(tmp_path / "gate")
    items = list(range(40))
    workers = WorkerSet(Slicer, lambda i: (gate,), 2, timeout_s=30)
    try:
        seen = []
        for w, a, b, result in workers.balanced("run", (1000,), items):
            assert result == [1000 + x for x in items[a:b]]
            seen.append((w, a, b))
            if sum(b - a for _, a, b in seen) == 40 - 10 - 6:   # all but worker 0's
                open(gate, "w").close()
        assert sorted((a, b) for _, a, b in seen if _ == 0) == [(0, 10), (18, 24)]
        bounds = sorted((a, b) for _, a, b in seen)
        assert [a for a, _ in bounds] == [0] + [b for _, b in bounds[:-1]]
        assert bounds[-1][1] == 40
        sizes = [b - a for a, b in bounds]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
        assert workers.last_wait_s > 0
        # Items too cheap to balance (a share of at most two slices of min_size):
        # one equal slice each.
        halves = sorted((a, b) for _, a, b, _ in workers.balanced("run", (0,), items,
                                                                  min_size=10))
        assert halves == [(0, 20), (20, 40)]
    finally:
        workers.stop()
    one = WorkerSet(Slicer, lambda i: (gate,), 1, timeout_s=30)
    try:   # one worker: nothing to balance, one slice
        assert [(w, a, b) for w, a, b, _ in one.balanced("run", (0,), items)] == [(0, 0, 40)]
    finally:
        one.stop()


class Claimer:
    """A worker for WorkerSet.claimed: tags the items it claims. The one that
    claims item 0 holds it until the file `gate` exists, which a worker
    creates once it finds nothing left to claim; the first to claim item 5
    dies (os._exit) unless the file `crashed` exists (it creates it)."""

    def __init__(self, gate: str, crashed: str | None = None):
        self.gate, self.crashed = gate, crashed

    def run(self, tag: int, items: list, ticket: tuple) -> tuple:
        from beamlet.contrib.rl.claims import attach
        taken = []
        with attach(ticket) as counter:
            for i in counter.indices(len(items)):
                if i == 5 and self.crashed and not os.path.exists(self.crashed):
                    open(self.crashed, "w").close()
                    os._exit(1)
                if i == 0:
                    deadline = time.monotonic() + 60
                    while not os.path.exists(self.gate):
                        if time.monotonic() > deadline:
                            raise TimeoutError("no worker opened the gate")
                        time.sleep(0.01)
                taken.append(i)
        open(self.gate, "a").close()
        return taken, [tag + items[i] for i in taken]

    def fallback(self, tag: int, items: list) -> list:
        return [-(tag + x) for x in items]


def test_worker_set_lets_the_free_worker_claim_the_items(start, tmp_path):
    """Each worker takes the next item whenever it is free: while one holds
    item 0, the other runs all the rest (one call each: a static split would
    leave it idle, the gate shut, and the call timing out). Every item is run
    once, each result with its indices."""
    from beamlet.contrib.rl.claims import ClaimCounter
    start()
    gate = str(tmp_path / "gate")
    items = list(range(100, 140))
    workers = WorkerSet(Claimer, lambda i: (gate,), 2, timeout_s=60)
    counter = ClaimCounter()
    try:
        seen = {}
        for w, indices, result in workers.claimed("run", (1000,), items, counter,
                                                  fallback="fallback"):
            assert result == [1000 + items[i] for i in indices]
            seen[w] = list(indices)
        assert sorted(seen.values()) == [[0], list(range(1, 40))]
        assert workers.last_wait_s > 0
    finally:
        workers.stop()
        counter.close()


def test_worker_set_runs_again_what_a_crashed_claimer_took(start, tmp_path):
    """A worker that dies holding item 5: its actor is restarted and called
    again with the same round's ticket (it claims what is left), and the items
    the dead call took (item 5 among them), whose results died with it, are
    run by the fallback method; each item once."""
    from beamlet.contrib.rl.claims import ClaimCounter
    start()
    gate, crashed = str(tmp_path / "gate"), str(tmp_path / "crashed")
    open(gate, "w").close()
    items = list(range(12))
    workers = WorkerSet(Claimer, lambda i: (gate, crashed), 2, timeout_s=60)
    counter = ClaimCounter()
    try:
        covered, by_fallback = [], []
        for w, indices, result in workers.claimed("run", (1000,), items, counter,
                                                  fallback="fallback"):
            if result and result[0] < 0:
                assert result == [-(1000 + items[i]) for i in indices]
                by_fallback += list(indices)
            else:
                assert result == [1000 + items[i] for i in indices]
            covered += list(indices)
        assert sorted(covered) == items and os.path.exists(crashed)
        assert 5 in by_fallback
    finally:
        workers.stop()
        counter.close()


def _es_run(runners: int, iterations: int = 3, kill_after: int | None = None):
    """ES on CartPole with `runners` workers (MeanStdFilter, so the observation
    sums travel too): the weights, filter count and results after `iterations`;
    with `kill_after`, worker 0 is SIGKILLed after that many iterations."""
    algo = (rl.ESConfig().environment("CartPole-v1").env_runners(num_env_runners=runners)
            .training(noise_size=50_000, episodes_per_batch=10, episodes_per_eval=3,
                      observation_filter="MeanStdFilter", model=SMALL_MODEL)
            .debugging(seed=0).build())
    try:
        results = []
        for i in range(iterations):
            if i == kill_after:
                killed = beamlet.get(algo.workers.actors[0].pid.remote(), timeout=60)
                os.kill(killed, signal.SIGKILL)
            results.append(algo.train())
        if kill_after is not None:
            # the actor was restarted (or replaced): a new process in its slot
            assert killed not in algo.workers.foreach("pid")
        return algo.theta.copy(), algo.obs_stats.count, results
    finally:
        algo.stop()


def test_es_trains_the_same_whatever_the_number_of_workers(start, monkeypatch):
    """The driver draws every perturbation and start state, so the episodes,
    and with them the weights, do not depend on how many workers ran them (the
    13 episodes of an iteration, 5 pairs and 3 unperturbed, go to the driver's
    local worker, to one, or one at a time to whichever of 2 or 3 is free,
    claimed by the workers or in slices handed out by the driver)."""
    start()
    runs = {n: _es_run(n) for n in (0, 1, 2, 3)}
    # Without the claim counter: slices of one episode and up (the episodes of
    # this small net are too short for the default to balance them: one slice
    # per worker).
    monkeypatch.setattr(es_module, "_SELF_SCHEDULED", False)
    monkeypatch.setattr(es_module, "_SLICE_MIN_STEPS", 1)
    runs.update({f"{n}, sliced": _es_run(n) for n in (2, 3)})
    theta, count, results = runs[0]
    for n, (other_theta, other_count, other_results) in runs.items():
        assert np.array_equal(other_theta, theta), n
        assert other_count == count, n
        for a, b in zip(results, other_results):
            assert a["learner"] == b["learner"], n
            assert a["episode_return_mean"] == b["episode_return_mean"], n
            assert a["num_env_steps_sampled"] == b["num_env_steps_sampled"], n
            assert b["episodes_this_iter"] == 3 and b["learner"]["perturbed_episodes_this_iter"] == 10


def test_es_worker_killed_mid_training_changes_nothing_learned(start):
    """An ES worker SIGKILLed between iterations is restarted (its calls that
    failed are run again): the training goes on, to the very weights of a run
    without the kill."""
    start()
    theta, count, results = _es_run(2, iterations=3, kill_after=1)
    # (num_env_runner_restarts counts calls that failed: none does when beamlet
    # has restarted the actor before the next call reaches it)
    assert results[2]["training_iteration"] == 3
    same_theta, same_count, _ = _es_run(2, iterations=3)
    assert np.array_equal(theta, same_theta) and count == same_count


@pytest.mark.parametrize("name", ["PPO", "A2C", "ES"])
def test_box_actions_with_a_registered_env(inprocess, name):
    rl.register_env("short_pendulum", lambda cfg: gym.wrappers.TimeLimit(
        gym.make("Pendulum-v1").unwrapped, max_episode_steps=cfg.get("steps", 20)))
    algo = (tiny_config(name, env="short_pendulum").environment(env_config={"steps": 10})
            .build())
    try:
        result = algo.train()
        action = algo.compute_single_action(np.zeros(3, np.float32))
    finally:
        algo.stop()
    assert result["episode_len_mean"] == 10
    assert action.shape == (1,) and -2.0 <= float(action[0]) <= 2.0


def test_bad_configs_are_rejected_with_the_reason(inprocess):
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        rl.PPOConfig().training(learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown environment 'NoSuchEnv-v0'"):
        rl.PPOConfig().environment("NoSuchEnv-v0").build()
    with pytest.raises(ValueError, match="no environment set"):
        rl.PPOConfig().build()
    with pytest.raises(ValueError, match="num_env_runners must be an int >= 0"):
        rl.PPOConfig().env_runners(num_env_runners=-1)
    with pytest.raises(ValueError, match="Discrete action space"):
        rl.DQNConfig().environment("Pendulum-v1").build()
    with pytest.raises(ValueError, match="unknown RL algorithm 'NOPE'"):
        rl.get_algorithm_class("NOPE")
    with pytest.raises(FileNotFoundError, match="no beamlet.rl checkpoint"):
        Algorithm.from_checkpoint(os.path.dirname(__file__))


def test_flat_dict_config_matches_the_builder():
    built = rl.PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=2) \
        .training(lr=0.01, lambda_=0.9).debugging(seed=3)
    flat = rl.PPOConfig.from_dict({"env": "CartPole-v1", "num_env_runners": 2, "lr": 0.01,
                                   "lambda": 0.9, "seed": 3})
    assert flat.to_dict() == built.to_dict()


class _ThirdPartyPlugin:
    """An algorithm added by another package through beamlet's plugin hook."""

    @staticmethod
    @beamlet.core.plugins.hookimpl
    def beamlet_rl_algorithms():
        return {"MyPPO": "beamlet.contrib.rl.ppo:PPO"}


def test_a_plugin_adds_an_algorithm():
    from beamlet.core import plugins
    assert {"PPO", "A2C", "A3C", "DQN", "ES"} <= set(rl.algorithm_classes())
    plugin = _ThirdPartyPlugin()
    plugins.register(plugin, name="rl-test-plugin")
    try:
        assert rl.get_algorithm_class("MyPPO") is rl.PPO
        from beamlet.contrib.tune.trainable import get_trainable
        assert get_trainable("MyPPO").algorithm_name == "MyPPO"
    finally:
        plugins.unregister(plugin)
    with pytest.raises(ValueError, match="unknown RL algorithm"):
        rl.get_algorithm_class("MyPPO")


def test_algorithms_are_tune_trainables(inprocess, tmp_path):
    from beamlet import tune
    analysis = tune.run("PPO", config={"env": "CartPole-v1", "num_envs_per_env_runner": 2,
                                       "model": SMALL_MODEL, **TINY["PPO"],
                                       "lr": tune.grid_search([1e-3, 1e-4])},
                        stop={"training_iteration": 2}, storage_path=str(tmp_path),
                        name="rl", verbose=0)
    trials = analysis.trials
    assert len(trials) == 2
    assert sorted(t.config["lr"] for t in trials) == [1e-4, 1e-3]
    for t in trials:
        assert t.last_result["training_iteration"] == 2
        assert t.last_result["num_env_steps_sampled_lifetime"] == 128
        assert "learner/vf_loss" in t.last_result


class _FrameEnv(gym.Env):
    """Three steps, one 8x6 frame per step: to test --video without pygame."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(2, self.t / 3, np.float32), 1.0, self.t >= 3, False, {}

    def render(self):
        frame = np.zeros((6, 8, 3), np.uint8)
        frame[:, : self.t + 1] = (255, 0, 0)
        return frame


def test_cli_train_evaluate_plot(inprocess, tmp_path, capsys):
    from beamlet.cli import main
    out = tmp_path / "run"
    config = {"num_envs_per_env_runner": 2, "model": SMALL_MODEL, **TINY["PPO"]}
    assert main(["rl", "train", "--algo", "PPO", "--env", "CartPole-v1",
                 "--stop", '{"training_iteration": 3}', "--config", json.dumps(config),
                 "--checkpoint-dir", str(out), "--checkpoint-freq", "2", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("iter ") == 3 and "checkpoint:" in text
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint_")) == \
        ["checkpoint_000002", "checkpoint_000003"]
    lines = (out / "result.json").read_text().splitlines()
    assert [json.loads(x)["training_iteration"] for x in lines] == [1, 2, 3]
    assert (out / "progress.csv").read_text().startswith("training_iteration,")
    assert Algorithm.from_checkpoint(str(out)).iteration == 3

    assert main(["rl", "evaluate", "--checkpoint", str(out), "--episodes", "2"]) == 0
    text = capsys.readouterr().out
    assert "mean return" in text and text.count("episode ") == 2

    assert main(["rl", "plot", str(out)]) == 0
    png = (out / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")


def test_cli_evaluate_writes_a_gif(inprocess, tmp_path, capsys):
    from beamlet.cli import main
    rl.register_env("frames", lambda cfg: _FrameEnv(**cfg))
    algo = tiny_config("PPO", env="frames").build()
    try:
        algo.train()
        path = algo.save(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    gif = tmp_path / "out.gif"
    assert main(["rl", "evaluate", "--checkpoint", path, "--episodes", "2", "--render",
                 "rgb_array", "--video", str(gif)]) == 0
    assert "6 frames" in capsys.readouterr().out
    data = gif.read_bytes()
    assert data.startswith(b"GIF89a") and data.endswith(b";")
    assert data.count(b"\x21\xF9\x04") == 6  # one graphic control block per frame


def test_cli_rejects_bad_arguments(tmp_path):
    from beamlet.cli import main
    with pytest.raises(SystemExit, match="--stop is not valid JSON"):
        main(["rl", "train", "--algo", "PPO", "--env", "CartPole-v1", "--stop", "{oops"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"algo": "PPO", "envv": "CartPole-v1"}')
    with pytest.raises(SystemExit, match="unknown keys"):
        main(["rl", "train", "-f", str(bad)])


def test_tuned_examples_are_valid():
    from beamlet.contrib.rl.cli import load_tuned_example
    import beamlet.contrib.rl as package
    folder = os.path.join(os.path.dirname(package.__file__), "tuned_examples")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    assert files
    for f in files:
        spec = load_tuned_example(os.path.join(folder, f))
        config = rl.get_algorithm_config(spec["algo"]).update_from_dict(spec["config"])
        config.environment(spec["env"]).validate()
        assert spec["stop"] and not math.isnan(list(spec["stop"].values())[0])

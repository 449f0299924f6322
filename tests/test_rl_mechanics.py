"""The mechanics inside beamlet.rl's learners, on tiny hand-checked cases: DQN's
n-step transitions, double-Q targets and target-network syncs; ES's observation
filter, its gradient's sign and its discretised Box actions. Learning itself is measured in benchmarks/rl_bench.py."""
from __future__ import annotations

import numpy as np
import pytest

try:
    from gymnasium import spaces
except ImportError as err:  # a missing test dependency fails, saying what to install
    pytest.fail(f"beamlet.rl's tests need gymnasium ({err}): pip install -e '.[rl]' "
                f"(it is in the test extra too)", pytrace=False)

from beamlet import rl  # noqa: E402
from beamlet.contrib.rl.dqn import ReplayBuffer, n_step_transitions  # noqa: E402
from beamlet.contrib.rl.es import (BinnedActions, ObsStats, unit_episodes,  # noqa: E402
                                   weighted_noise_sum)


def tiny_dqn(**training):
    settings = dict(num_steps_sampled_before_learning_starts=16, train_batch_size=16,
                    rollout_fragment_length=8, model={"fcnet_hiddens": [8]})
    settings.update(training)
    return (rl.DQNConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
            .training(**settings).debugging(seed=0).build())


def time_major_batch(steps: int, envs: int) -> dict:
    obs = np.arange(steps * envs, dtype=np.float32).reshape(steps, envs, 1)
    return {"obs": obs, "next_obs": obs + 100, "actions": np.zeros((steps, envs), np.int64),
            "rewards": np.ones((steps, envs)), "terminateds": np.zeros((steps, envs), bool),
            "truncateds": np.zeros((steps, envs), bool)}


def test_n_step_transitions_stop_at_episode_ends():
    batch = time_major_batch(5, 2)
    batch["terminateds"][1, 0] = True   # env 0's episode ends in a terminal state
    batch["truncateds"][3, 1] = True    # env 1's is cut by a time limit
    tr = n_step_transitions(batch, 3, 0.5)
    col = {k: v.reshape(3, 2, -1)[..., 0] if v.ndim > 1 else v.reshape(3, 2)
           for k, v in tr.items()}
    # env 0: start 0 sums r0 + .5 r1 and stops (terminal), start 2 sums three steps
    assert col["rewards"][:, 0].tolist() == [1.5, 1.0, 1.75]
    assert col["next_obs"][:, 0].tolist() == [102, 102, 108]
    assert col["terminateds"][:, 0].tolist() == [1, 1, 0]
    assert col["discounts"][:, 0].tolist() == [0.25, 0.5, 0.125]
    # env 1: the truncation stops the sum but is bootstrapped (not terminal)
    assert col["rewards"][:, 1].tolist() == [1.75, 1.75, 1.5]
    assert col["next_obs"][:, 1].tolist() == [105, 107, 107]
    assert col["terminateds"][:, 1].tolist() == [0, 0, 0]
    assert col["discounts"][:, 1].tolist() == [0.125, 0.125, 0.25]
    one = n_step_transitions(batch, 1, 0.5)   # n=1 is the plain transition
    assert np.array_equal(one["next_obs"], batch["next_obs"].reshape(-1, 1))
    assert np.all(one["discounts"] == 0.5)
    assert n_step_transitions(time_major_batch(2, 2), 3, 0.9) == {}


def test_replay_buffer_wraps_around_keeping_the_newest():
    buf = ReplayBuffer(4, 1)
    for start in (0, 3):
        vals = np.arange(start, start + 3, dtype=np.float32)
        buf.add(vals[:, None], vals.astype(np.int64), vals, vals[:, None], vals * 0, vals)
    assert len(buf) == 4 and sorted(buf.rewards.tolist()) == [2, 3, 4, 5]
    buf.add(np.zeros((6, 1)), np.arange(6), np.arange(6.0), np.zeros((6, 1)),
            np.zeros(6), np.ones(6))
    assert sorted(buf.rewards.tolist()) == [2, 3, 4, 5]  # only the last 4 of 6 kept


def test_n_step_dqn_carries_steps_across_iterations():
    algo = tiny_dqn(n_step=3)
    try:
        algo.train()
        assert len(algo.buffer) == 2 * (8 - 2)       # 2 steps per env wait for the next batch
        algo.train()
        assert len(algo.buffer) == 2 * (16 - 2)
        assert set(np.round(algo.buffer.discounts[:len(algo.buffer)], 6)) <= \
            {0.99, round(0.99 ** 2, 6), round(0.99 ** 3, 6)}
    finally:
        algo.stop()


@pytest.mark.parametrize("double_q", [True, False])
def test_double_q_target_uses_the_online_argmax(double_q):
    algo = tiny_dqn(double_q=double_q)
    try:
        next_obs = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
        # A target network unlike the online one, so the two argmaxes differ somewhere.
        algo.target.set_weights([w + np.random.default_rng(2).normal(size=w.shape)
                                 for w in algo.model.get_weights()])
        q_online, q_target = algo.model(next_obs)["q"], algo.target(next_obs)["q"]
        assert (q_online.argmax(1) != q_target.argmax(1)).any()
        mb = {"next_obs": next_obs, "rewards": np.full(64, 1.0),
              "discounts": np.full(64, 0.5), "terminateds": (np.arange(64) % 2).astype(float)}
        got = algo.td_targets(mb)
    finally:
        algo.stop()
    pick = q_online.argmax(1) if double_q else q_target.argmax(1)
    want = 1.0 + 0.5 * (1 - mb["terminateds"]) * q_target[np.arange(64), pick]
    assert np.allclose(got, want)
    assert np.all(got[1::2] == 1.0)  # terminal transitions are not bootstrapped


def test_target_network_is_synced_every_freq_steps():
    never = tiny_dqn(target_network_update_freq=10**9)
    every = tiny_dqn(target_network_update_freq=16)
    soft = tiny_dqn(target_network_update_freq=16, tau=0.25)
    try:
        start = [w.copy() for w in never.target.get_weights()]
        for algo in (never, every, soft):
            algo.train()
            algo.train()
        assert all(np.array_equal(a, b) for a, b in zip(never.target.get_weights(), start))
        assert not all(np.array_equal(a, b)
                       for a, b in zip(never.model.get_weights(), start))  # it learned
        assert all(np.array_equal(a, b) for a, b in
                   zip(every.target.get_weights(), every.model.get_weights()))
        # Polyak: each sync moves the target a quarter of the way, never all of it.
        assert not any(np.array_equal(a, b) for a, b in
                       zip(soft.target.get_weights()[::2], soft.model.get_weights()[::2]))
    finally:
        for algo in (never, every, soft):
            algo.stop()
    with pytest.raises(ValueError, match="tau must be in"):
        tiny_dqn(tau=0.0)
    with pytest.raises(ValueError, match="n_step must be"):
        tiny_dqn(n_step=0)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        tiny_dqn(lr_schedule="cosine")


def test_obs_stats_give_the_running_mean_and_std():
    x = np.random.default_rng(0).normal([1.0, -3.0, 5.0], [2.0, 0.5, 0.0], size=(500, 3))
    stats = ObsStats(3)
    assert [a.tolist() for a in stats.mean_std()] == [[0, 0, 0], [1, 1, 1]]
    for part in np.array_split(x, 3):
        stats.add(len(part), part.sum(0), (part ** 2).sum(0))
    mean, std = stats.mean_std()
    assert np.allclose(mean, x.mean(0)) and np.allclose(std[:2], x.std(0)[:2])
    assert std[2] == 1e-2   # a constant dimension is floored, not divided by zero


def test_es_mean_std_filter_learns_the_stats_and_checkpoints_them(tmp_path):
    algo = (rl.ESConfig().environment("CartPole-v1")
            .training(noise_size=50_000, episodes_per_batch=4, model={"fcnet_hiddens": []},
                      observation_filter="MeanStdFilter").debugging(seed=0).build())
    try:
        result = algo.train()
        # the perturbed episodes' observations; the unperturbed ones' are not counted
        eval_steps = result["episode_len_mean"] * result["episodes_this_iter"]
        assert algo.obs_stats.count == result["num_env_steps_sampled"] - eval_steps > 0
        restored = rl.Algorithm.from_checkpoint(algo.save(str(tmp_path)))
        try:
            assert restored.obs_stats.count == algo.obs_stats.count
            obs = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
            assert [algo.compute_single_action(o) for o in obs] == \
                [restored.compute_single_action(o) for o in obs]
        finally:
            restored.stop()
    finally:
        algo.stop()
    with pytest.raises(ValueError, match="observation_filter must be one of"):
        rl.ESConfig().environment("CartPole-v1").training(observation_filter="Zero").build()


class _OneStepTarget:
    """A one-step episode whose reward is ``-(action - 1.5) ** 2`` (a constant
    observation), so the best policy outputs 1.5."""

    def __init__(self, config):
        self.observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = spaces.Box(-2.0, 2.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.ones(1, np.float32), {}

    def step(self, action):
        return np.ones(1, np.float32), -float((np.asarray(action)[0] - 1.5) ** 2), True, False, {}

    def close(self):
        pass


def test_es_climbs_the_return_on_a_one_step_task():
    """The gradient estimate's sign: ES moves a linear policy's action from ~0 to
    the best one, continuous (clipped) and on a grid of 9 values (spacing 0.5,
    where the initial argmax is some other grid value)."""
    rl.register_env("es-one-step-target", _OneStepTarget)
    for bins, tol, away in ((None, 0.15, 1.0), (9, 1e-6, 0.4)):
        algo = (rl.ESConfig().environment("es-one-step-target")
                .training(noise_size=20_000, episodes_per_batch=20, noise_stdev=0.1,
                          stepsize=0.05, l2_coeff=0.0, action_bins=bins,
                          model={"fcnet_hiddens": [], "pi_out_gain": 0.01})
                .debugging(seed=0).build())
        try:
            first = float(algo.compute_single_action(np.ones(1, np.float32))[0])
            for _ in range(60):
                algo.train()
            last = float(algo.compute_single_action(np.ones(1, np.float32))[0])
        finally:
            algo.stop()
        assert abs(first - 1.5) > away, (bins, first)
        assert abs(last - 1.5) <= tol, (bins, first, last)


def test_es_reports_the_unperturbed_policys_returns():
    """On the one-step task (return ``-(a - 1.5) ** 2``, concave), every mirrored
    pair around the policy scores below the policy itself, so the perturbed
    returns and the policy's own differ in a known way: ``episode_return_mean``
    is exactly the return of the policy the iteration started from (the driver's
    own action for the constant observation), ``perturbed_return_mean`` is lower,
    and the env steps count both kinds of episode."""
    rl.register_env("es-one-step-target", _OneStepTarget)
    algo = (rl.ESConfig().environment("es-one-step-target")
            .training(noise_size=20_000, episodes_per_batch=10, episodes_per_eval=3,
                      noise_stdev=0.5, stepsize=0.05, l2_coeff=0.0,
                      model={"fcnet_hiddens": [], "pi_out_gain": 0.01})
            .reporting(metrics_num_episodes_for_smoothing=3)   # this iteration's only
            .debugging(seed=0).build())
    try:
        for _ in range(3):
            action = float(algo.compute_single_action(np.ones(1, np.float32))[0])
            result = algo.train()
            own = -(action - 1.5) ** 2
            assert result["episode_return_mean"] == pytest.approx(own, rel=1e-5, abs=1e-6)
            assert result["episode_return_min"] == result["episode_return_max"]
            assert result["learner"]["perturbed_return_mean"] < own - 1e-3
            assert result["episode_len_mean"] == 1 and result["episodes_this_iter"] == 3
            assert result["learner"]["perturbed_episodes_this_iter"] == 10
            assert result["num_env_steps_sampled"] == 10 + 3
        with pytest.raises(ValueError, match="episodes_per_eval must be an integer >= 1"):
            rl.ESConfig().environment("CartPole-v1").training(episodes_per_eval=0).build()
    finally:
        algo.stop()


def test_es_unperturbed_episodes_do_not_change_training():
    """Their start states come from their own stream and their observations stay
    out of the filter: the weights after three iterations are the same with 1 or
    5 of them per iteration (and the env steps differ by theirs)."""
    thetas, steps = [], []
    for k in (1, 5):
        algo = (rl.ESConfig().environment("CartPole-v1")
                .training(noise_size=50_000, episodes_per_batch=4, episodes_per_eval=k,
                          observation_filter="MeanStdFilter", model={"fcnet_hiddens": []})
                .debugging(seed=0).build())
        try:
            for _ in range(3):
                result = algo.train()
            thetas.append(algo.theta.copy())
            steps.append(result["num_env_steps_sampled_lifetime"])
        finally:
            algo.stop()
    assert np.array_equal(thetas[0], thetas[1])
    assert steps[0] < steps[1]


def test_es_units_become_episodes_pairs_first_sign_then_the_other():
    units = [[5, 100], [-1, 200], [7, 101], [-1, 201]]
    rows, first = unit_episodes(units)
    assert rows == [[5, 100, 1], [5, 100, -1], [-1, 200, 0], [7, 101, 1], [7, 101, -1],
                    [-1, 201, 0]]
    assert first.tolist() == [0, 2, 3, 5]
    rows, first = unit_episodes([])
    assert rows == [] and first.size == 0


def test_weighted_noise_sum_matches_slice_by_slice():
    noise = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    rng = np.random.default_rng(1)
    for dim, rows in ((7, 30), (300_000 // 100, 700)):   # the second spans several blocks
        offsets = rng.integers(0, noise.size - dim + 1, size=rows)
        weights = rng.uniform(-0.5, 0.5, size=rows)
        expected = np.zeros(dim)
        for w, i in zip(weights, offsets):
            expected += w * noise[i:i + dim]
        assert np.allclose(weighted_noise_sum(noise, offsets, weights, dim), expected,
                           rtol=1e-9, atol=1e-9)


def test_binned_actions_map_scores_to_the_grid():
    one = BinnedActions(spaces.Box(-2.0, 2.0, (1,), np.float32), 5)
    assert one.width == 5
    scores = np.eye(5)[[0, 2, 4, 3]]
    assert one.actions(scores).tolist() == [[-2.0], [0.0], [2.0], [1.0]]
    two = BinnedActions(spaces.Box(np.array([-1.0, 0.0]), np.array([1.0, 10.0])), 3)
    # dimension-major: scores 0-2 are the first dimension's grid, 3-5 the second's
    acts = two.actions(np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1]], float))
    assert acts.tolist() == [[1.0, 0.0], [0.0, 10.0]]
    for bad in (1, 2.5, True, None):
        with pytest.raises(ValueError, match="action_bins must be an integer >= 2"):
            BinnedActions(spaces.Box(-1.0, 1.0, (1,)), bad)
    with pytest.raises(ValueError, match="needs a Box action space"):
        BinnedActions(spaces.Discrete(3), 5)
    with pytest.raises(ValueError, match="finite action bounds"):
        BinnedActions(spaces.Box(-np.inf, np.inf, (1,)), 5)
    with pytest.raises(ValueError, match="needs a Box action space"):
        rl.ESConfig().environment("CartPole-v1").training(action_bins=5).build()


def test_es_with_action_bins_acts_on_the_grid_and_checkpoints(tmp_path):
    algo = (rl.ESConfig().environment("Pendulum-v1")
            .env_runners(num_env_runners=1)
            .training(noise_size=50_000, episodes_per_batch=2, episodes_per_eval=1, action_bins=5,
                      observation_filter="MeanStdFilter", model={"fcnet_hiddens": [8]})
            .debugging(seed=0).build())
    try:
        result = algo.train()
        # a mirrored pair of full episodes and one of the unperturbed policy
        assert result["num_env_steps_sampled"] == 600
        assert algo.model.num_params() == 3 * 8 + 8 + 8 * 5 + 5   # no log-std
        obs = np.random.default_rng(0).uniform(-1, 1, size=(20, 3)).astype(np.float32)
        actions = [algo.compute_single_action(o) for o in obs]
        assert {float(a[0]) for a in actions} <= {-2.0, -1.0, 0.0, 1.0, 2.0}
        restored = rl.Algorithm.from_checkpoint(algo.save(str(tmp_path)))
        try:
            assert [restored.compute_single_action(o).tolist() for o in obs] == \
                [a.tolist() for a in actions]
        finally:
            restored.stop()
    finally:
        algo.stop()


def _claim_all(ticket, together, out):
    """(In a child process) claim indices below 20,000 until none is left,
    from when both processes are ready."""
    from beamlet.contrib.rl.claims import attach
    with attach(ticket) as counter:
        together.wait(timeout=120)
        out.put(list(counter.indices(20_000)))


def test_claim_counter_gives_each_index_to_one_process():
    """Two processes claiming at once from one ticket share the indices: each
    goes to exactly one of them. A ticket of an earlier round claims nothing;
    what is not the counter's memory file (another fd, another token) is not
    attached to; a closed counter hands out no ticket."""
    import multiprocessing
    import os
    import tempfile
    from beamlet.contrib.rl.claims import ClaimCounter, attach
    counter = ClaimCounter()
    try:
        old = counter.ticket()
        ticket = counter.ticket()
        ctx = multiprocessing.get_context("spawn")
        out, together = ctx.Queue(), ctx.Barrier(2)
        procs = [ctx.Process(target=_claim_all, args=(ticket, together, out))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert sorted(got[0] + got[1]) == list(range(20_000))
        assert got[0] and got[1]   # (both claimed: they ran together)
        with attach(old) as stale:
            assert stale.claim() is None
        pid, fd, token, generation = counter.ticket()
        with attach((pid, fd, token, generation)) as fresh:
            assert list(fresh.indices(3)) == [0, 1, 2]
        assert attach((pid, fd, os.urandom(16), generation)) is None
        with tempfile.TemporaryFile() as f:   # a file that is not a claim counter
            assert attach((os.getpid(), f.fileno(), token, generation)) is None
        assert attach((pid, 10_000, token, generation)) is None   # no such descriptor
    finally:
        counter.close()
    with pytest.raises(ValueError, match="closed"):
        counter.ticket()


_HOLD_THE_LOCK = """
import fcntl, os, signal, sys
from beamlet.contrib.rl.claims import attach
counter = attach(eval(sys.argv[1]))
fcntl.flock(counter.fd, fcntl.LOCK_EX)
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_claim_counter_held_by_a_stopped_process_is_an_error_not_a_hang(monkeypatch):
    """A worker stopped while it holds the counter's lock does not hold up the
    driver for ever: a new round waits `LOCK_TIMEOUT`, then raises."""
    import subprocess
    import sys
    from beamlet.contrib.rl import claims
    counter = claims.ClaimCounter()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, repr(counter.ticket())],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        monkeypatch.setattr(claims, "LOCK_TIMEOUT", 0.5)
        with pytest.raises(TimeoutError, match="claim counter's lock"):
            counter.ticket()
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdout.close()
    assert counter.ticket()[3] == 3   # the lock is free again: the next round starts
    counter.close()


def test_es_worker_claims_episodes_or_none_without_the_counter():
    """ESWorker.claimed_episodes runs the rows it claims (all of them, alone)
    with the very results of ``episodes``; with the ticket of a counter that
    is gone (as from another host) it claims and runs nothing."""
    from beamlet.contrib.rl.claims import ClaimCounter
    algo = (rl.ESConfig().environment("CartPole-v1").env_runners(num_env_runners=0)
            .training(noise_size=50_000, episodes_per_batch=4, model={"fcnet_hiddens": []},
                      observation_filter="MeanStdFilter")
            .debugging(seed=0).build())
    counter = ClaimCounter()
    try:
        worker = algo.workers.local
        rows, _ = unit_episodes(algo.draw_units(3, 2))
        args = (algo.theta.astype(np.float32), 0.1, algo.obs_stats.mean_std(), rows)
        out, stats, _ = worker.episodes(*args)
        indices, (c_out, c_stats, _) = worker.claimed_episodes(*args, counter.ticket())
        assert indices.tolist() == list(range(len(rows)))
        assert np.array_equal(c_out, out) and np.array_equal(c_stats, stats)
        gone = counter.ticket()
        counter.close()
        indices, (c_out, c_stats, _) = worker.claimed_episodes(*args, gone)
        assert len(indices) == 0 and c_out.shape == (0, 2) and c_stats.shape[0] == 0
    finally:
        counter.close()
        algo.stop()

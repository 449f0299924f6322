"""beamlet.rl learning benchmark (issue 8).

For each algorithm, trains its tuned example (beamlet/contrib/rl/tuned_examples/)
with several seeds and prints, per seed, the env steps and wall time until the
mean return of the last 20 training episodes (for ES: episodes of its unperturbed
policy, ``episodes_per_eval`` per iteration) reaches the target (475 on
CartPole-v1), then the sampling throughput (env steps/s) with 1 and 2 env
runners. Optionally runs Stable-Baselines3's PPO with its zoo hyperparameters
from another interpreter (``--sb3-python``; never a dependency of beamlet).
``--only scaling`` times ES with 1, 2, ... workers twice: sampling alone, and
the tuned example's first training iterations (the same episodes whatever the
number of workers), each row with the CPU per env step of the workers and of
the driver, how unevenly the work fell, and the speed-up those bound. Each
table is measured in several rounds; in a round one instance per number of
workers is alive and their calls are interleaved, so that they meet the same
machine, and the speed-up of every round and the median are printed.

    python benchmarks/rl_bench.py                          # all algorithms, 5 seeds
    python benchmarks/rl_bench.py --algos PPO --seeds 2    # a quick look
    python benchmarks/rl_bench.py --algos A2C:2,A3C        # A3C against A2C on 2 runners
    python benchmarks/rl_bench.py --only throughput
    python benchmarks/rl_bench.py --only scaling --scaling-rounds 7
    python benchmarks/rl_bench.py --algos PPO,ES --env Pendulum-v1
    python benchmarks/rl_bench.py --sb3-python ../sb3-venv/bin/python

The SB3 venv: ``python3 -m venv ../sb3-venv && ../sb3-venv/bin/pip install
torch stable-baselines3 gymnasium`` (a CPU build of torch); SB3 runs with one torch
thread, as beamlet.rl keeps BLAS to one, and each of its seeds right after the same
seed of beamlet's PPO, so that the pair meets about the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import beamlet  # noqa: E402
from beamlet.contrib.rl.cli import load_tuned_example  # noqa: E402
from beamlet.contrib.rl.registry import get_algorithm_class  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(HERE), "beamlet", "contrib", "rl", "tuned_examples")

# env -> (target mean return, {algo: target env steps})
TARGETS = {
    "CartPole-v1": (475.0, {"PPO": 50_000, "DQN": 60_000, "A2C": 200_000, "A3C": 200_000,
                            "ES": 300_000}),
    # The issue sets ES no step budget on Pendulum; 3M (6M at most per seed) keeps
    # a run practical on 2 cores.
    "Pendulum-v1": (None, {"PPO": 300_000, "ES": 3_000_000}),
}
PENDULUM_GOALS = {"PPO": -250.0, "ES": -400.0}
WINDOW = 20   # training episodes in the mean that must reach the goal


def example(algo: str, env: str) -> dict:
    name = f"{algo.lower()}_{env.split('-')[0].lower()}.json"
    path = os.path.join(EXAMPLES, name)
    if not os.path.isfile(path):
        raise SystemExit(f"no tuned example {path}")
    return load_tuned_example(path)


def split_runners(item: str) -> tuple[str, int | None]:
    """``"A2C:2"`` -> ("A2C", 2): the tuned example with 2 env runners."""
    name, _, runners = item.partition(":")
    return name, (int(runners) if runners else None)


def run_to_target(algo: str, env: str, seed: int, goal: float, max_steps: int,
                  max_time: float, runners: int | None = None, eval_episodes: int = 0) -> dict:
    """Trains until the mean return of the last 20 training episodes reaches
    `goal` (not before 20 episodes have been reported: ES reports a few
    episodes of its unperturbed policy per iteration, and a policy that scores
    well from the start must do so over 20 of them); with `eval_episodes`, then also the final policy's own mean return
    (``evaluate()``: deterministic, no ES perturbation) over that many episodes."""
    spec = example(algo, env)
    cls = get_algorithm_class(algo)
    cfg = cls.config_class().update_from_dict(spec["config"]).environment(env)
    if runners is not None:
        cfg.env_runners(num_env_runners=runners)
    cfg.debugging(seed=seed).reporting(metrics_num_episodes_for_smoothing=WINDOW)
    algo_obj = cls(cfg)
    start, cpu0 = time.time(), time.process_time()
    reached = None
    result = {}
    try:
        while True:
            result = algo_obj.train()
            steps = result["num_env_steps_sampled_lifetime"]
            if (result["episode_return_mean"] >= goal
                    and result["num_episodes_lifetime"] >= WINDOW):
                reached = steps
                break
            if steps >= max_steps or time.time() - start > max_time:
                break
        wall, cpu = time.time() - start, time.process_time() - cpu0
        evaluation = (round(algo_obj.evaluate(eval_episodes)["evaluation"]["episode_return_mean"], 2)
                      if eval_episodes else None)
    finally:
        algo_obj.stop()
    row = {"algo": algo, "env": env, "seed": seed, "reached": reached is not None,
           "env_steps": result.get("num_env_steps_sampled_lifetime"),
           "wall_s": round(wall, 2), "driver_cpu_s": round(cpu, 2),
           "final_return": round(result.get("episode_return_mean", float("nan")), 2)}
    if eval_episodes:
        row["eval_episodes"], row["eval_return_mean"] = eval_episodes, evaluation
    return row


def throughput(algo: str, env: str, runners: int, seconds: float) -> float:
    """Env steps/s of sampling alone (no learning) with `runners` env runners."""
    spec = example(algo, env)
    cls = get_algorithm_class(algo)
    cfg = cls.config_class().update_from_dict(spec["config"]).environment(env)
    cfg.env_runners(num_env_runners=runners).debugging(seed=0)
    a = cls(cfg)
    try:
        if algo == "ES":
            def once():
                out, _ = a.run_units(a.draw_units(2 * runners, 0))
                return int(out[:, 2:].sum())
        else:
            frag = cfg.get_rollout_fragment_length()
            weights = beamlet.put(a.model.get_weights())
            kwargs = {"epsilon": 0.1} if algo == "DQN" else {}

            def once():
                res = a.workers.foreach("sample", weights, frag, **kwargs)
                return int(sum(r["rewards"].size for r in res))
        once()  # warm up
        steps, start = 0, time.time()
        while time.time() - start < seconds:
            steps += once()
        return steps / (time.time() - start)
    finally:
        a.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Shares:
    """How evenly ES's calls spread env steps over the workers, and how long
    each side waited, summed over `run_units` calls (``ES.last_worker_steps``
    etc.). ``imbalance()`` is the sum over calls of the busiest worker's env
    steps over the sum of the mean worker's (1.0: even): the workers take the
    episodes whenever they are free, so a worker that other programs slow
    down runs fewer, and under load it measures the load as much as the split.
    ``split()`` is the same ratio for the split alone, load-free: the calls'
    episodes (``ES.last_episode_steps``) taken in their order by as many
    workers of equal speed, each episode by the first one free (the busiest
    one's steps over the mean's). ``worker_idle()`` is the share of the calls'
    wall time the workers spent outside a call (waiting for work, or for the
    others at the end of a call); ``driver_wait()`` the share the driver spent
    waiting for results."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.most = self.mean = self.run = self.busy = self.wait = 0.0
        self.split_most = self.split_mean = 0.0
        self.workers = 1

    def add(self, algo) -> None:
        per_worker = algo.last_worker_steps
        n = len(per_worker)
        self.most += max(per_worker)
        self.mean += sum(per_worker) / n
        self.workers = n
        self.run += algo.last_run_s
        self.busy += sum(algo.last_worker_busy_s)
        self.wait += algo.last_wait_s
        free = [0] * n
        for steps in algo.last_episode_steps.tolist():
            free[free.index(min(free))] += steps
        self.split_most += max(free)
        self.split_mean += sum(free) / n

    def imbalance(self) -> float:
        return round(self.most / self.mean, 3) if self.mean else 1.0

    def split(self) -> float:
        return round(self.split_most / self.split_mean, 3) if self.split_mean else 1.0

    def worker_idle(self) -> float:
        return round(max(0.0, 1 - self.busy / (self.workers * self.run)), 3) if self.run else 0.0

    def driver_wait(self) -> float:
        return round(self.wait / self.run, 3) if self.run else 0.0


class _TimedES:
    """The tuned ES example (seed 0) with `workers` actors, and what its timed
    calls took: wall time, the driver's CPU (its whole process, read around
    each call, so that the I/O thread's work for the call counts too), env
    steps, and, between `start` and `row`, the CPU of its worker processes,
    read from /proc (they run nothing between its calls), so that the scaling
    can be judged on a machine other programs load too; `shares` says how
    unevenly the steps fell on the workers (`Shares`)."""

    def __init__(self, env: str, workers: int):
        spec = example("ES", env)
        cls = get_algorithm_class("ES")
        cfg = cls.config_class().update_from_dict(spec["config"]).environment(env)
        cfg.env_runners(num_env_runners=workers).debugging(seed=0)
        self.env, self.workers = env, workers
        self.algo = cls(cfg)
        self.pids = self.algo.workers.foreach("pid")
        self.shares = Shares()
        self.wall = self.driver_cpu = 0.0
        self.steps = self.calls = 0
        self.worker_cpu0 = None

    def start(self) -> None:
        """Count from now (after a warm-up, say)."""
        self.shares = Shares()
        self.wall = self.driver_cpu = 0.0
        self.steps = self.calls = 0
        self.worker_cpu0 = sum(_cpu_seconds(p) for p in self.pids)

    def timed(self, call) -> None:
        """``call(algo, shares)`` (it returns the env steps it sampled), timed."""
        d0, t0 = time.process_time(), time.perf_counter()
        steps = call(self.algo, self.shares)
        self.wall += time.perf_counter() - t0
        self.driver_cpu += time.process_time() - d0
        self.steps += steps
        self.calls += 1

    def row(self) -> dict:
        worker_cpu = sum(_cpu_seconds(p) for p in self.pids) - self.worker_cpu0
        steps, shares = self.steps, self.shares
        return {"algo": "ES", "env": self.env, "workers": self.workers, "env_steps": steps,
                "calls": self.calls, "wall_s": round(self.wall, 3),
                "env_steps_per_s": round(steps / self.wall),
                "imbalance": shares.imbalance(), "split": shares.split(),
                "worker_idle": shares.worker_idle(),
                "driver_wait": shares.driver_wait(),
                "worker_cpu_ms_per_1k_steps": round(1e6 * worker_cpu / steps, 1),
                "driver_cpu_ms_per_1k_steps": round(1e6 * self.driver_cpu / steps, 2),
                "driver_cpu_s": round(self.driver_cpu, 3), "load_avg_1m": os.getloadavg()[0]}

    def stop(self) -> None:
        self.algo.stop()


def _interleaved(env: str, counts: list[int], calls, warm_up=None, extra=None) -> list[dict]:
    """One ES instance per number of workers in `counts`, all alive at once;
    ``calls(step, runs)`` runs their timed calls (`runs`: the `_TimedES`
    instances): ``step(order, call)`` runs ``call(algo, shares)`` once on each
    instance, in `order` (indices into `counts`; the callers alternate it, so
    that none is always first). Interleaving call by call (tens of ms each)
    makes the instances meet the same machine: this VM's speed drifts by a
    third between runs seconds apart, which decided the ratio of runs made one
    after the other. Returns a row per instance (`_TimedES.row`, updated with
    ``extra(algo)`` if given)."""
    runs = []
    try:
        for n in counts:
            runs.append(_TimedES(env, n))
        if warm_up is not None:
            for t in runs:
                t.timed(warm_up)
        for t in runs:
            t.start()

        def step(order, call):
            for i in order:
                runs[i].timed(call)
        calls(step, runs)
        return [{**t.row(), **(extra(t.algo) if extra else {})} for t in runs]
    finally:
        for t in runs:
            t.stop()


def es_scaling(env: str, counts: list[int], seconds: float, pairs: int = 4) -> list[dict]:
    """ES sampling alone, `pairs` mirrored pairs per worker per call at the
    initial weights (the shortest episodes, so the most round trips per env
    step), the instances' calls interleaved until each has been timed for
    `seconds`; see `_interleaved` and `_TimedES` for the rows."""
    def once(a, shares):
        out, _ = a.run_units(a.draw_units(pairs * len(a.workers), 0))
        shares.add(a)
        return int(out[:, 2:].sum())

    def calls(step, runs):
        k = 0
        while min(t.wall for t in runs) < seconds:
            order = list(range(len(runs)))
            step(order if k % 2 == 0 else order[::-1], once)
            k += 1
    return [{"what": "sampling", **r} for r in _interleaved(env, counts, calls, warm_up=once)]


def es_training_scaling(env: str, counts: list[int], iterations: int) -> list[dict]:
    """The tuned example's first `iterations` training iterations: the whole
    iteration (episodes, the unperturbed episodes, the driver's update), the
    instances' iterations interleaved. ES draws every perturbation on the
    driver, so they do the very same episodes whatever the number of workers
    (the row's ``weights`` digest shows it); see `_interleaved` and `_TimedES`
    for the rest of the row."""
    import hashlib

    def one(a, shares):
        steps = a.train()["num_env_steps_sampled"]
        shares.add(a)
        return steps

    def calls(step, runs):
        order = list(range(len(runs)))
        for k in range(iterations):
            step(order if k % 2 == 0 else order[::-1], one)

    def digest(a):
        return {"weights": hashlib.sha1(a.theta.tobytes()).hexdigest()[:12]}
    rows = _interleaved(env, counts, calls, extra=digest)
    for row in rows:
        row.update(what="training", iterations=iterations,
                   driver_cpu_ms_per_iter=round(1e3 * row["driver_cpu_s"] / iterations, 2))
    return rows


def cpu_bound(base: dict, row: dict) -> float:
    """Amdahl's bound on `row`'s speed-up over `base` from their CPU per env
    step: the driver's CPU counted as wholly serial, the workers' as spread
    over ``row["workers"]`` free cores, each call lasting as long as its
    busiest worker would at equal speeds (``row["split"]``); what it leaves
    out is the time messages spend in flight and the cores other programs
    take."""
    def per_step(r):
        return (r["driver_cpu_ms_per_1k_steps"]
                + r["worker_cpu_ms_per_1k_steps"] / r["workers"] * r["split"])
    return round(per_step(base) / per_step(row), 2)


SB3_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from collections import deque
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.callbacks import BaseCallback
    seed, budget = int(sys.argv[1]), int(sys.argv[2])
    class Stop(BaseCallback):
        def __init__(self):
            super().__init__(); self.returns = deque(maxlen=20); self.hit = None
        def _on_step(self):
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.returns.append(info["episode"]["r"])
            if len(self.returns) == 20 and sum(self.returns) / 20 >= 475:
                self.hit = self.num_timesteps
                return False
            return True
    import torch; torch.set_num_threads(1)  # as beamlet.rl keeps BLAS to one thread
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    lin = lambda v: (lambda p: p * v)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
                n_epochs=20, ent_coef=0.0, learning_rate=lin(0.001), clip_range=lin(0.2),
                seed=seed, device="cpu")
    cb = Stop(); t = time.time(); c = time.process_time()
    model.learn(total_timesteps=budget, callback=cb)
    print(json.dumps({"reached": cb.hit is not None, "env_steps": cb.hit or budget,
                      "wall_s": round(time.time() - t, 2),
                      "driver_cpu_s": round(time.process_time() - c, 2)}))
""")


def sb3_ppo(python: str, seed: int, budget: int) -> dict:
    out = subprocess.run([python, "-c", SB3_SCRIPT, str(seed), str(budget)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], target: int) -> str:
    steps = [r["env_steps"] for r in rows if r["reached"]]
    walls = [r["wall_s"] for r in rows if r["reached"]]
    if not steps:
        return "no seed reached the goal"
    med = statistics.median(steps)
    every = all(r["reached"] and r["env_steps"] <= 2 * target for r in rows)
    return (f"{len(steps)}/{len(rows)} seeds reached it; median {med:.0f} env steps "
            f"(target {target}: {'met' if med <= target and every else 'MISSED'}), "
            f"median wall {statistics.median(walls):.1f} s")


def compare_sb3(ours: list[dict], sb3: list[dict]) -> str:
    """The median wall and CPU time to the goal, ours against SB3's (seeds that
    reached it; a seed that did not counts as its whole run)."""
    if any("error" in r for r in sb3):
        return f"SB3 failed: {[r['error'] for r in sb3 if 'error' in r]}"
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "driver_cpu_s",
                                                                    "env_steps")}
           for name, rs in (("beamlet", ours), ("SB3", sb3))}
    b, o = med["beamlet"], med["SB3"]
    return (f"median to the goal: beamlet {b['env_steps']:.0f} env steps, {b['wall_s']:.1f} s "
            f"wall, {b['driver_cpu_s']:.1f} s CPU; SB3 {o['env_steps']:.0f} env steps, "
            f"{o['wall_s']:.1f} s wall, {o['driver_cpu_s']:.1f} s CPU; wall below SB3's: "
            f"{'yes' if b['wall_s'] < o['wall_s'] else 'NO'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="PPO,DQN,A2C,A2C:2,A3C,ES",
                   help="comma-separated; NAME:N runs NAME's tuned example on N env runners")
    p.add_argument("--env", default="CartPole-v1", choices=sorted(TARGETS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-list", default=None,
                   help="comma-separated seeds to run instead of range(--seeds)")
    p.add_argument("--only", choices=["learning", "throughput", "scaling"], default=None)
    p.add_argument("--scaling-workers", default="1,2",
                   help="ES worker counts for the scaling tables (--only scaling)")
    p.add_argument("--scaling-iterations", type=int, default=40,
                   help="ES training iterations per row of the training scaling table")
    p.add_argument("--scaling-rounds", type=int, default=5,
                   help="rounds of each ES scaling table (fresh instances each; the speed-up "
                        "of every round and their median are printed)")
    p.add_argument("--max-time", type=float, default=600.0, help="seconds per seed at most")
    p.add_argument("--throughput-seconds", type=float, default=5.0)
    p.add_argument("--eval-episodes", type=int, default=50,
                   help="Pendulum-v1: episodes of the final policy's own evaluation per seed")
    p.add_argument("--sb3-python", default=os.environ.get("BEAMLET_SB3_PYTHON"))
    p.add_argument("--backend", default="local")
    p.add_argument("--json", default=None, help="write every row here")
    args = p.parse_args(argv)
    seeds = ([int(x) for x in args.seed_list.split(",")] if args.seed_list
             else list(range(args.seeds)))
    beamlet.init(backend=args.backend, num_cpus=2)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    goal_default, targets = TARGETS[args.env]
    rows: list[dict] = []
    try:
        if args.only in (None, "learning"):
            for item in algos:
                algo, runners = split_runners(item)
                if algo not in targets:
                    print(f"{algo}: no target on {args.env}; skipped")
                    continue
                goal = goal_default if goal_default is not None else PENDULUM_GOALS[algo]
                where = "" if runners is None else f" ({runners} env runners)"
                print(f"== {algo}{where} on {args.env}: env steps until mean return of the "
                      f"last 20 episodes >= {goal}", flush=True)
                # SB3's PPO runs right after each seed of ours, so that both of a
                # seed's runs meet about the same load.
                with_sb3 = (algo == "PPO" and runners is None and args.env == "CartPole-v1"
                            and bool(args.sb3_python))
                algo_rows, sb3_rows = [], []
                for seed in seeds:
                    r = run_to_target(algo, args.env, seed, goal, 2 * targets[algo],
                                      args.max_time, runners,
                                      args.eval_episodes if goal_default is None else 0)
                    r["load_avg_1m"] = os.getloadavg()[0]
                    algo_rows.append(r)
                    print(f"  seed {seed}: {'reached' if r['reached'] else 'NOT reached'} "
                          f"at {r['env_steps']} env steps, {r['wall_s']} s, "
                          f"CPU {r['driver_cpu_s']} s (last mean return {r['final_return']}"
                          + (f"; the final policy's own mean over {r['eval_episodes']} "
                             f"episodes {r['eval_return_mean']}" if "eval_episodes" in r else "")
                          + f"; load {r['load_avg_1m']:.1f})", flush=True)
                    if with_sb3:
                        s = {"algo": "SB3-PPO", "env": args.env, "seed": seed,
                             **sb3_ppo(args.sb3_python, seed, 100_000),
                             "load_avg_1m": os.getloadavg()[0]}
                        sb3_rows.append(s)
                        print(f"  seed {seed} SB3: {s}", flush=True)
                print("  " + summarize(algo_rows, targets[algo]), flush=True)
                if sb3_rows:
                    print("  " + compare_sb3(algo_rows, sb3_rows), flush=True)
                rows += algo_rows + sb3_rows
            if args.env == "CartPole-v1" and not args.sb3_python and "PPO" in algos:
                print("== SB3 PPO: skipped (give --sb3-python or $BEAMLET_SB3_PYTHON)")
        if args.only == "scaling":
            counts = [int(w) for w in args.scaling_workers.split(",")]
            tables = [(f"sampling on {args.env} by number of workers (4 pairs per worker per "
                       f"call, initial weights)",
                       lambda: es_scaling(args.env, counts, args.throughput_seconds)),
                      (f"training on {args.env} by number of workers (the tuned example's first "
                       f"{args.scaling_iterations} iterations, the same episodes each run)",
                       lambda: es_training_scaling(args.env, counts, args.scaling_iterations))]
            for title, measure in tables:
                print(f"== ES {title}; {args.scaling_rounds} rounds, each with the counts' "
                      f"calls interleaved", flush=True)
                ratios: dict[int, list[float]] = {n: [] for n in counts}
                loads = []
                for rnd in range(args.scaling_rounds):
                    round_rows = measure()
                    base = round_rows[0]
                    for r in round_rows:
                        r["round"] = rnd
                        r["speedup"] = round(r["env_steps_per_s"] / base["env_steps_per_s"], 3)
                        r["cpu_bound_speedup"] = cpu_bound(base, r)
                        ratios[r["workers"]].append(r["speedup"])
                        loads.append(r["load_avg_1m"])
                        rows.append(r)
                        per_iter = (f" ({r['driver_cpu_ms_per_iter']} ms per iteration)"
                                    if "driver_cpu_ms_per_iter" in r else "")
                        print(f"  round {rnd}, {r['workers']} workers: {r['env_steps_per_s']:7d} "
                              f"env steps/s (x{r['speedup']:.2f}), {r['env_steps']} env steps "
                              f"in {r['wall_s']} s; per 1k steps: workers "
                              f"{r['worker_cpu_ms_per_1k_steps']} ms CPU, driver "
                              f"{r['driver_cpu_ms_per_1k_steps']} ms CPU{per_iter}; busiest "
                              f"worker x{r['imbalance']} the mean (x{r['split']} at equal "
                              f"speeds); idle: workers "
                              f"{100 * r['worker_idle']:.0f}%, driver waiting "
                              f"{100 * r['driver_wait']:.0f}% of the calls; bound from CPU "
                              f"x{r['cpu_bound_speedup']:.2f}"
                              + (f"; weights {r['weights']}" if "weights" in r else "")
                              + f"; load {r['load_avg_1m']:.1f}", flush=True)
                for n in counts[1:]:
                    summary = {"what": f"{base['what']} summary", "env": args.env,
                               "workers": n, "base_workers": counts[0],
                               "speedups": ratios[n],
                               "median_speedup": round(statistics.median(ratios[n]), 3),
                               "load_avg_1m_range": [min(loads), max(loads)]}
                    rows.append(summary)
                    print(f"  {counts[0]} -> {n} workers, each round: "
                          + ", ".join(f"x{x:.2f}" for x in ratios[n])
                          + f"; median x{summary['median_speedup']:.2f} (load "
                          f"{min(loads):.1f}-{max(loads):.1f})", flush=True)
        if args.only in (None, "throughput"):
            print(f"== sampling throughput on {args.env} (env steps/s, no learning)", flush=True)
            for algo in dict.fromkeys(split_runners(a)[0] for a in algos):
                if algo not in targets:
                    continue
                one = throughput(algo, args.env, 1, args.throughput_seconds)
                two = throughput(algo, args.env, 2, args.throughput_seconds)
                rows.append({"algo": algo, "throughput_1": round(one), "throughput_2": round(two)})
                print(f"  {algo:4s} 1 runner {one:9.0f}   2 runners {two:9.0f}   "
                      f"x{two / one:.2f}", flush=True)
    finally:
        beamlet.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

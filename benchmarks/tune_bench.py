"""beamlet.tune against Ray Tune, side by side in one run (issue 9).

    python benchmarks/tune_bench.py                    # every row, beamlet and Ray
    python benchmarks/tune_bench.py --only 200x10,asha --no-ray
    python benchmarks/tune_bench.py --rows 10000x1     # the big row (Ray only if it ends in time)

Rows (each in a fresh child process per framework, ``init(num_cpus=2)``, the
same code against Ray's API: ``Tuner(...).fit()``):

* ``NxR``: N trials of a no-op trainable reporting R times (default rows
  200x10, 1000x1, and 100x10 / 400x10 / 1600x10 for the time per trial as the
  number of trials grows); Ray with and without ``reuse_actors``;
* ``asha``: ASHA on 64 trials x 50 reports of a seed-fixed objective
  (score = x * t / (t + 5), the same 64 x for both, drawn with a fixed
  seed): the best trial's x (the largest, if ASHA keeps the best trial) must
  be the same for both.

Each cell: wall time of ``fit()`` (per trial); CPU seconds of the driver during
``fit()`` / of the whole process tree (driver, workers, daemons: start-up and
shutdown included, from ``RUSAGE_CHILDREN``), which load on the machine hardly
moves; and the machine's 1-minute load average before and after.

Ray runs in its own interpreter (``--ray-python``, default ``../raybench-venv``
next to the checkout, or ``$BEAMLET_BENCH_PYTHON``) and needs ``ray[tune]``
there; a row whose Ray run fails or exceeds ``--ray-timeout`` says so.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RAY_PYTHON = os.path.join(os.path.dirname(REPO), "raybench-venv", "bin", "python")
DEFAULT_ROWS = "200x10,1000x1,100x10,400x10,1600x10,asha"


def _child(framework: str, row: str, reuse: bool, storage: str) -> dict:
    """Run one row in this process; return its measurements."""
    if framework == "ray":
        import ray as fw
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    else:
        sys.path.insert(0, REPO)
        import beamlet as fw
        from beamlet import tune
        from beamlet.tune.schedulers import ASHAScheduler
    fw.init(num_cpus=2)

    def noop(config):
        for i in range(config["reports"]):
            tune.report({"score": i})

    def objective(config):
        for t in range(1, 51):
            tune.report({"score": config["x"] * t / (t + 5)})

    verbose = 0
    if row == "asha":
        # The same 64 x for both (each framework's own sampling would draw others).
        rng = random.Random(7)
        xs = [rng.random() for _ in range(64)]
        tuner = tune.Tuner(
            objective, param_space={"x": tune.grid_search(xs)},
            tune_config=tune.TuneConfig(
                metric="score", mode="max", num_samples=1, reuse_actors=reuse,
                scheduler=ASHAScheduler(max_t=50, grace_period=1, reduction_factor=4)),
            run_config=tune.RunConfig(storage_path=storage, name="asha", verbose=verbose))
        trials = 64
    else:
        trials, reports = (int(v) for v in row.split("x"))
        tuner = tune.Tuner(
            noop, param_space={"reports": reports},
            tune_config=tune.TuneConfig(num_samples=trials, reuse_actors=reuse),
            run_config=tune.RunConfig(storage_path=storage, name=f"noop{row}",
                                      verbose=verbose))
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    out = {"wall_s": wall, "per_trial_ms": wall / trials * 1e3, "trials": len(grid),
           "errors": grid.num_errors, "driver_cpu_s": time.process_time() - cpu,
           "load": [load, os.getloadavg()[0]]}
    if row == "asha":
        best = grid.get_best_result()
        out["best_x"] = best.config["x"]
        out["best_iterations"] = best.metrics["training_iteration"]
    fw.shutdown()
    return out


def _run(python: str, framework: str, row: str, reuse: bool, timeout: float,
         storage_dir: str | None = None) -> dict:
    # Ray gives its node 30 s to start (fixed in ray/_private/node.py): on a loaded
    # machine it may not, which says nothing of Tune; try again (at most twice).
    for _ in range(3):
        result = _run_once(python, framework, row, reuse, timeout, storage_dir)
        if "timed out during startup" not in result.get("error", ""):
            break
    return result


def _run_once(python: str, framework: str, row: str, reuse: bool, timeout: float,
              storage_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tune-bench-", dir=storage_dir) as storage:
        cmd = [python, os.path.abspath(__file__), "--child", framework, "--row", row,
               "--storage", storage] + (["--reuse"] if reuse else [])
        env = dict(os.environ, PYTHONPATH=REPO if framework == "beamlet" else "")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout:g} s"}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:120]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # CPU of the child and every descendant it (or they) waited for, start-up and
    # shutdown included: unlike wall time, other load on the machine hardly moves it.
    result["tree_cpu_s"] = (after.ru_utime + after.ru_stime
                            - before.ru_utime - before.ru_stime)
    return result


def _cell(result: dict) -> str:
    if "error" in result:
        return f"({result['error']})"
    text = f"{result['wall_s']:.2f} s ({result['per_trial_ms']:.1f} ms/trial)"
    if "tree_cpu_s" in result:
        text += f" cpu {result['driver_cpu_s']:.2f}/{result['tree_cpu_s']:.2f} s"
    if "load" in result:  # the machine's 1-minute load average, before and after
        text += " load {:.0f}-{:.0f}".format(*result["load"])
    if "best_x" in result:
        text += f" best x={result['best_x']:.4f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", "--only", default=DEFAULT_ROWS,
                        help=f"comma-separated rows (default {DEFAULT_ROWS}; also 10000x1)")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--columns", default="beamlet,ray,ray_reuse",
                        help="which of beamlet,ray,ray_reuse to run (default all)")
    parser.add_argument("--ray-python", default=os.environ.get("BEAMLET_BENCH_PYTHON",
                                                               DEFAULT_RAY_PYTHON))
    parser.add_argument("--ray-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--storage-dir", help="where each run's results go (a temporary "
                        "directory in it; default: the system's, e.g. /tmp). Both frameworks "
                        "create a few files per trial there, whose cost depends on the disk")
    parser.add_argument("--child", choices=["beamlet", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.row, args.reuse, args.storage)))
        return
    ray_ok = not args.no_ray and os.path.exists(args.ray_python)
    results = {}
    print("| row | beamlet (reuse_actors) | Ray Tune | Ray Tune, reuse_actors=True |")
    print("|---|---|---|---|")
    columns = set(args.columns.split(","))
    unknown = columns - {"beamlet", "ray", "ray_reuse"}
    if unknown:
        parser.error(f"unknown column(s) {', '.join(sorted(unknown))}")
    for row in args.rows.split(","):
        entry = results[row] = {}
        if "beamlet" in columns:
            entry["beamlet"] = _run(sys.executable, "beamlet", row, True, 3600, args.storage_dir)
        if ray_ok and "ray" in columns:
            entry["ray"] = _run(args.ray_python, "ray", row, False, args.ray_timeout,
                                args.storage_dir)
        if ray_ok and "ray_reuse" in columns:
            entry["ray_reuse"] = _run(args.ray_python, "ray", row, True, args.ray_timeout,
                                      args.storage_dir)
        cells = [_cell(entry[k]) if k in entry else "not run"
                 for k in ("beamlet", "ray", "ray_reuse")]
        print(f"| {row} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

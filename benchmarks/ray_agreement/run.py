"""How often a Ray program prints the same thing on beamlet as on Ray 2.60.

    python benchmarks/ray_agreement/run.py                       # every program, both sides
    python benchmarks/ray_agreement/run.py --only actor --json out.json
    python benchmarks/ray_agreement/run.py --ray-results results/ray_agreement.json

Each program of ``programs/`` is a small Ray program of public core behaviour
(tasks, actors, errors, wait/get/cancel/kill, named actors, generators,
placement groups, ``ray.util``) that prints a deterministic result. It runs
once under Ray (``import ray``, this interpreter or ``--ray-python``) and once
under beamlet (``ray_shim/`` first on PYTHONPATH: ``import ray`` gives
beamlet, in the driver and in the workers); they
agree when their stdout is the same. A program that exits with an error
"prints" ``EXIT <code>: <exception type>`` after its output, so failing the
same way also agrees. ``--ray-results`` reuses the Ray side of an earlier
run's JSON (Ray takes seconds to start per program). Writes the per-program
outputs and the agreement to ``--json`` (default
``results/ray_agreement.json`` beside this directory's parent).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = os.path.join(HERE, "programs")
SHIM = os.path.join(HERE, "ray_shim")  # (its ray package is beamlet)
REPO = os.path.dirname(os.path.dirname(HERE))


def programs(only: str | None = None) -> list[str]:
    """The corpus's program paths, in order (`only`: those whose name contains it)."""
    names = sorted(n for n in os.listdir(PROGRAMS) if n.endswith(".py"))
    return [os.path.join(PROGRAMS, n) for n in names if not only or only in n]


def run_one(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a program: its normalised output (see the module doc) and seconds taken."""
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=PROGRAMS, stdin=subprocess.DEVNULL)
        output = done.stdout.rstrip("\n")
        if done.returncode != 0:
            output += f"\nEXIT {done.returncode}: {_exception_type(done.stderr)}"
        # (paths inside the checkout as relative ones: the results are committed)
        stderr_tail = done.stderr.replace(REPO + os.sep, "")[-2000:]
    except subprocess.TimeoutExpired as err:
        output = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
                  else (err.stdout or "")).rstrip("\n") + f"\nTIMEOUT after {timeout}s"
        stderr_tail = ""
    return {"output": normalise(output), "seconds": round(time.monotonic() - start, 2),
            "stderr_tail": stderr_tail}


def normalise(output: str) -> str:
    """A program's stdout without the log lines Ray's log monitor prints into it
    (``(raylet) ...``, ``(pid=...) ...``, colour codes): they are not the program's."""
    import re
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.splitlines()]
    kept, in_traceback = [], False
    for line in lines:
        if re.match(r"ray::\S+\(\) \(pid=", line):  # (a retried attempt's error, logged)
            in_traceback = True
            continue
        if in_traceback:
            in_traceback = line[:1].isspace()  # (its last line, "Error: ...", goes too)
            continue
        if not re.match(r"\s*\((raylet|pid=|\w+ pid=)", line):
            kept.append(line)
    return "\n".join(kept).strip("\n")


def _exception_type(stderr: str) -> str:
    """The type of the exception a traceback ends with ("" if none)."""
    lines = [line for line in stderr.strip().splitlines() if line and not line[0].isspace()]
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if head and " " not in head and (head[0].isupper() or "." in head):
            return head.rsplit(".", 1)[-1]
    return ""


def own_ray(path: str) -> bool:
    """Whether the program must start its own Ray (see ray_batch.py)."""
    with open(path) as f:
        return "# agreement: own-ray" in f.read(2000)


def run_ray_batch(python: str, paths: list[str], timeout: float) -> dict:
    """The Ray side of `paths`, run in one Ray by ray_batch.py: {name: result}."""
    if not paths:
        return {}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ray.json")
        try:
            subprocess.run([python, os.path.join(HERE, "ray_batch.py"), out] + paths,
                           env=ray_env(), cwd=PROGRAMS, timeout=timeout * len(paths),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        if not os.path.exists(out):
            return {}
        with open(out) as f:
            return json.load(f)


def beamlet_env(backend: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SHIM, REPO] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    if backend:
        env["BEAMLET_AS_RAY_BACKEND"] = backend
    return env


def ray_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # (Ray's own ray, never the shim)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the programs whose name contains this")
    parser.add_argument("--backend", default=None, help="beamlet backend (default: local)")
    parser.add_argument("--ray-python", default=sys.executable,
                        help="the interpreter that has Ray 2.60")
    parser.add_argument("--ray-results", help="take Ray's outputs from this earlier JSON")
    parser.add_argument("--no-ray", action="store_true",
                        help="run only beamlet (with --ray-results: compare with those)")
    parser.add_argument("--no-beamlet", action="store_true",
                        help="run only Ray (to make a --ray-results file)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="programs run at once (each side runs its own Ray or beamlet)")
    parser.add_argument("--ray-per-program", action="store_true",
                        help="each Ray program starts its own Ray (default: one Ray runs "
                             "them all, see ray_batch.py)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per program run")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results",
                                                       "ray_agreement.json"))
    args = parser.parse_args(argv)
    cached = {}
    if args.ray_results:
        with open(args.ray_results) as f:
            cached = {p["program"]: p["ray"] for p in json.load(f)["programs"]}
    if not args.ray_per_program and not args.no_ray:
        batch = [p for p in programs(args.only)
                 if os.path.basename(p) not in cached and not own_ray(p)]
        cached.update(run_ray_batch(args.ray_python, batch, args.timeout))

    def one(path: str) -> dict | None:
        name = os.path.basename(path)
        if name in cached:
            ray_side = cached[name]
        elif args.no_ray:
            return None
        else:
            ray_side = run_one([args.ray_python, path], args.timeout, ray_env())
        ours = ({"output": None, "seconds": 0.0, "stderr_tail": ""} if args.no_beamlet else
                run_one([sys.executable, path], args.timeout, beamlet_env(args.backend)))
        same = ray_side["output"] == ours["output"]
        print(f"{'same' if same else 'DIFF'}  {name}  (ray {ray_side['seconds']}s, "
              f"beamlet {ours['seconds']}s)", flush=True)
        if not same and not args.no_beamlet:
            for side, out in (("ray", ray_side["output"]), ("beamlet", ours["output"])):
                print(f"    {side:8s}| " + out.replace("\n", f"\n    {side:8s}| "), flush=True)
        return {"program": name, "agree": same, "ray": ray_side, "beamlet": ours}

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = [row for row in pool.map(one, programs(args.only)) if row is not None]
    agreed = sum(r["agree"] for r in rows)
    report = {"agreement": round(100.0 * agreed / len(rows), 1) if rows else None,
              "agreed": agreed, "programs_run": len(rows), "backend": args.backend or "local",
              "python": sys.version.split()[0], "programs": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"agreement: {agreed}/{len(rows)} = {report['agreement']}%  ({args.json})")
    return report


if __name__ == "__main__":
    main()

"""Cold start of beamlet-on-dask against native Dask, in CPU seconds of the whole process tree.

    python benchmarks/dask_cold_cpu.py --runs 6 --json out.json

Each run is a fresh interpreter that imports, starts a two-worker cluster
(``init(backend="dask", num_cpus=2)``, or native ``distributed.Client(processes=True,
n_workers=2, threads_per_worker=1)`` as ``dask_shim.py`` does), runs one trivial task,
gets its result and shuts down; the two alternate. The CPU (user + system) of
the whole tree is read with ``getrusage(RUSAGE_CHILDREN)`` by this process, a
child subreaper, which also waits for any orphaned descendant (so its CPU
counts too). The driver reports its own CPU at each phase (import, init,
first result, shutdown): the rest is its workers' (and, natively, the
resource tracker's). Native Dask runs from a guarded script (its nannies
start workers with ``spawn``); beamlet's from the same script unguarded.

Both read their modules' bytecode from a cache, as an installed package
does: the runs write and read it under a private ``PYTHONPYCACHEPREFIX``
(``PYTHONDONTWRITEBYTECODE`` unset), after one untimed run of each that
fills it. Else a source checkout under ``PYTHONDONTWRITEBYTECODE`` (this
machine's environment) compiles every beamlet module in every process, about
0.08 CPU s each, which Dask's installed modules never pay. ``--source``
measures that way (the environment as it is, no untimed run).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PROGRAMS = {
    "beamlet": """
import resource, sys, time, json
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
marks = [("start", cpu())]
import beamlet
marks.append(("import", cpu()))
beamlet.init(backend="dask", num_cpus=2)
marks.append(("init", cpu()))

@beamlet.remote
def one():
    return 1

assert beamlet.get(one.remote()) == 1
marks.append(("first", cpu()))
beamlet.shutdown()
marks.append(("shutdown", cpu()))
print("MARKS " + json.dumps(marks))
""",
    "dask": """
import resource, sys, time, json
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def one():
    return 1

if __name__ == "__main__":
    marks = [("start", cpu())]
    import distributed
    marks.append(("import", cpu()))
    client = distributed.Client(processes=True, n_workers=2, threads_per_worker=1)
    marks.append(("init", cpu()))
    assert client.gather(client.submit(one, pure=False)) == 1
    marks.append(("first", cpu()))
    client.close()
    marks.append(("shutdown", cpu()))
    print("MARKS " + json.dumps(marks))
""",
}


#: On the runs' path: each Python process of the tree writes its own CPU and
#: command line at exit into $DASK_COLD_DIR (the per-process split).
SITECUSTOMIZE = """
import atexit, os, sys
_dir = os.environ.get("DASK_COLD_DIR")
if _dir:
    def _report():
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF)
        with open(os.path.join(_dir, str(os.getpid())), "w") as f:
            f.write(repr((r.ru_utime + r.ru_stime, sys.argv[:3])))
    atexit.register(_report)
"""


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reap(grace: float) -> None:
    """Wait for every child left (orphans reparented to this subreaper)."""
    until = time.monotonic() + grace
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > until:
                return
            time.sleep(0.05)


def one_run(fw: str, python: str, path: str, site: str, pycache: str | None) -> dict:
    """One run of `fw`'s program; `pycache`: the bytecode cache dir (None: the
    environment's own settings)."""
    report = tempfile.mkdtemp(prefix="procs-", dir=os.path.dirname(path))
    env = dict(os.environ, DASK_COLD_DIR=report,
               PYTHONPATH=os.pathsep.join([site] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    before = children_cpu()
    t0 = time.perf_counter()
    out = subprocess.run([python, path], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(path), env=env)
    wall = time.perf_counter() - t0
    reap(10.0)
    total = children_cpu() - before
    if out.returncode != 0:
        raise SystemExit(f"{fw} run failed:\n{out.stdout}\n{out.stderr}")
    marks = json.loads(next(line for line in out.stdout.splitlines()
                            if line.startswith("MARKS "))[6:])
    phases = {name: b - a for (_, a), (name, b) in zip(marks, marks[1:])}
    driver = marks[-1][1]  # (its CPU from the start: the interpreter's own start too)
    procs = []
    for name in os.listdir(report):
        with open(os.path.join(report, name)) as f:
            procs.append(eval(f.read()))  # (our own repr of (float, list of str))
    return {"total_s": total, "driver_s": driver, "others_s": total - driver,
            "procs": sorted(procs, key=str),
            "phases_s": phases, "wall_s": wall, "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=6, help="runs of each, alternating")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--source", action="store_true",
                   help="no bytecode cache of our own: as the environment has it")
    p.add_argument("--json")
    a = p.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    res: dict[str, list] = {"dask": [], "beamlet": []}
    with tempfile.TemporaryDirectory(prefix="dask-cold-") as tmp:
        paths = {}
        site = os.path.join(tmp, "site")
        os.mkdir(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        for fw, text in PROGRAMS.items():
            paths[fw] = os.path.join(tmp, f"cold_{fw}.py")
            with open(paths[fw], "w") as f:
                f.write(text)
        pycache = None if a.source else os.path.join(tmp, "pycache")
        if pycache is not None:
            for fw in ("dask", "beamlet"):  # (untimed: fills the bytecode cache)
                one_run(fw, a.python, paths[fw], site, pycache)
        for i in range(a.runs):
            for fw in (("dask", "beamlet") if i % 2 == 0 else ("beamlet", "dask")):
                r = one_run(fw, a.python, paths[fw], site, pycache)
                res[fw].append(r)
                ph = " ".join(f"{k}={v:.2f}" for k, v in r["phases_s"].items())
                print(f"run {i} {fw:7s} tree CPU {r['total_s']:.2f} s (driver {r['driver_s']:.2f}: "
                      f"{ph}; others {r['others_s']:.2f}) wall {r['wall_s']:.1f} s "
                      f"load {r['load']:.1f}", flush=True)
                for cpu, argv in r["procs"]:
                    print(f"      {cpu:.2f} {' '.join(argv)[:100]}")
    summary = {}
    for what in ("total_s", "driver_s", "others_s"):
        d = statistics.median(r[what] for r in res["dask"])
        b = statistics.median(r[what] for r in res["beamlet"])
        # (Each round's two runs are back to back: their ratio drifts less with
        # the machine's load than either run does.)
        pairs = statistics.median(rb[what] / rd[what] for rd, rb in zip(res["dask"],
                                                                      res["beamlet"]))
        summary[what] = {"dask": d, "beamlet": b, "ratio": b / d, "median_pair_ratio": pairs}
        print(f"median {what}: dask {d:.2f}, beamlet {b:.2f}: {b / d:.2f}x "
              f"(median of the rounds' ratios {pairs:.2f}x)")
    if a.json:
        args = dict(vars(a), python=os.path.basename(a.python))
        for runs in res.values():
            for r in runs:
                r["procs"] = [(cpu, [_portable(word) for word in argv])
                              for cpu, argv in r["procs"]]
        with open(a.json, "w") as f:
            json.dump({"args": args, "summary": summary, "runs": res}, f, indent=1)


def _portable(word: str) -> str:
    """A command-line word as the results file records it: a path inside this
    checkout relative to it, another path by its name (no machine's paths)."""
    if not os.path.isabs(word):
        return word
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if word.startswith(repo + os.sep):
        return os.path.relpath(word, repo)
    return os.path.basename(word)


if __name__ == "__main__":
    main()

"""Cold start of beamlet's ray backend against native Ray's, in alternating fresh processes.

    python benchmarks/ray_cold_start.py --rounds 6 --json out.json
    python benchmarks/ray_cold_start.py --rounds 1 --detail   # each process's CPU, by name

Each run is a fresh interpreter that imports the framework, ``init(num_cpus=2)``
(a local Ray, session files in a private temp directory; beamlet:
``backend="ray"``), runs one trivial task, ``get``\\s it and shuts down: the
``cold_start`` row of ``core_bench.py`` plus the shutdown. Native Ray is imported
by ``init()`` (``lazy_ray.py``), as beamlet imports it there too.

Measured per run, in counts that other programs' load skews little:

- ``cpu_s``: CPU seconds of the whole process tree (the driver, Ray's daemons,
  its workers), each process's CPU time read every 50 ms by this
  orchestrator (a child subreaper, so that the processes a driver leaves
  stay its descendants until they end; the run is over once none is left)
  and summed over their last readings (`_Sampler`);
- ``procs``: how many processes the run started (seen by the orchestrator);
- the driver's wall time per phase (import, init, first result, shutdown) and,
  at each phase's end, the CPU so far of the processes alive then (psutil).

Native and beamlet alternate (ABBA...); the table gives each one's medians and
the median of the per-round ratios. Needs Ray in this interpreter (``beamlet[ray]``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LEFTOVER_WAIT = 30.0


def _tree_cpu(seen: dict, names: dict) -> float:
    """CPU seconds so far of this process and its live descendants; `seen`
    keeps each one's last reading (a process gone since keeps its last)."""
    import psutil
    me = psutil.Process()
    for proc in [me] + me.children(recursive=True):
        try:
            c = proc.cpu_times()
            seen[proc.pid] = c.user + c.system
            if proc.pid not in names:
                names[proc.pid] = " ".join(proc.cmdline()[:3])[:90]
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    return sum(seen.values())


def child(kind: str, temp_dir: str, detail: bool) -> None:
    seen: dict = {}
    names: dict = {}
    phases = {}
    t0 = time.perf_counter()
    if kind == "ray":
        sys.path.insert(0, HERE)
        import lazy_ray as mod
        options = {"num_cpus": 2, "include_dashboard": False, "_temp_dir": temp_dir}
    else:
        import beamlet as mod
        options = {"backend": "ray", "num_cpus": 2}
    t1 = time.perf_counter()
    phases["import"] = (t1 - t0, _tree_cpu(seen, names))
    mod.init(**options)
    t2 = time.perf_counter()
    phases["init"] = (t2 - t1, _tree_cpu(seen, names))

    @mod.remote
    def one():
        return 1

    assert mod.get(one.remote()) == 1
    t3 = time.perf_counter()
    phases["first_result"] = (t3 - t2, _tree_cpu(seen, names))
    at_first = dict(seen)
    mod.shutdown()
    t4 = time.perf_counter()
    phases["shutdown"] = (t4 - t3, _tree_cpu(seen, names))
    out = {"phases": phases, "wall_s": t4 - t0}
    if detail:
        out["by_process"] = sorted(((round(cpu, 3), names.get(pid, "?"))
                                    for pid, cpu in at_first.items()), reverse=True)
    print("RESULT " + json.dumps(out), flush=True)


def _reap_all(deadline: float) -> list[int]:
    """Wait for every child of this subreaper (a run's orphans come here);
    past `deadline`, kill those left (they are this run's) and say which."""
    left = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return left
        if pid:
            continue
        if time.monotonic() > deadline:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == os.getpid():
                    left.append(int(entry))
                    try:
                        os.kill(int(entry), 9)
                    except ProcessLookupError:
                        pass
            deadline = float("inf")
        time.sleep(0.05)


class _Sampler(threading.Thread):
    """Reads the CPU time of every descendant of this process every `PERIOD`
    s, keeping each one's last reading: the run's CPU is their sum once all
    are gone. (Not ``getrusage(RUSAGE_CHILDREN)``: Ray's raylet ignores
    SIGCHLD, so its workers are reaped without their times reaching anyone.)
    What a process spends after its last reading is missed: at most a period
    of its exit."""

    PERIOD = 0.05

    def __init__(self):
        super().__init__(daemon=True)
        import psutil
        self._me = psutil.Process()
        self.cpu: dict = {}     # (pid, start time) -> CPU seconds at the last reading
        self.names: dict = {}
        self._done = threading.Event()

    def sample(self) -> None:
        try:
            procs = self._me.children(recursive=True)
        except Exception:  # noqa: BLE001 - one vanished during the walk
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    c = proc.cpu_times()
                    self.cpu[key] = max(self.cpu.get(key, 0.0), c.user + c.system)
                    if key not in self.names:
                        self.names[key] = proc.name()
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass

    def run(self) -> None:
        while not self._done.wait(self.PERIOD):
            self.sample()

    def stop(self) -> float:
        self._done.set()
        self.join()
        return sum(self.cpu.values())


def run_one(kind: str, detail: bool, timeout: float, tree: str = REPO) -> dict:
    temp_dir = tempfile.mkdtemp(prefix="ray-cold-")
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    sampler = _Sampler()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_child", kind,
                             "--_temp", temp_dir] + (["--detail"] if detail else []),
                            stdout=subprocess.PIPE, text=True, env=env, cwd=temp_dir)
    sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    left = _reap_all(time.monotonic() + LEFTOVER_WAIT)
    cpu = sampler.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)
    result = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if result is None:
        raise SystemExit(f"{kind}: the run failed (exit {proc.returncode}):\n{stdout}")
    result["cpu_s"] = cpu
    result["procs"] = len(sampler.cpu)
    result["process_wall_s"] = wall
    result["leftover"] = left
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json")
    p.add_argument("--detail", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--tree", action="append", metavar="NAME=PATH",
                   help="a checkout whose beamlet runs, under NAME (repeatable; default: "
                        "this one, as 'beamlet')")
    p.add_argument("--_child")
    p.add_argument("--_temp")
    a = p.parse_args()
    if a._child:
        child(a._child, a._temp, a.detail)
        return
    import ctypes
    if ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SystemExit("could not become a child subreaper: the tree's CPU would be partial")
    trees = {"beamlet": REPO}
    if a.tree:
        trees = dict(t.split("=", 1) for t in a.tree)
        if "ray" in trees:
            raise SystemExit("--tree: 'ray' names native Ray")
    kinds = ["ray"] + list(trees)
    runs = {k: [] for k in kinds}
    for rnd in range(a.rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]
        for kind in order:
            if kind == "ray":
                r = run_one("ray", a.detail, a.timeout)
            else:
                r = run_one("beamlet", a.detail, a.timeout, os.path.abspath(trees[kind]))
            runs[kind].append(r)
            ph = r["phases"]
            print(f"round {rnd} {kind:8s} tree CPU {r['cpu_s']:6.2f} s  wall {r['wall_s']:5.2f} s"
                  f" (import {ph['import'][0]:.2f}, init {ph['init'][0]:.2f}, first "
                  f"{ph['first_result'][0]:.2f}, shutdown {ph['shutdown'][0]:.2f})  CPU at "
                  f"init end {ph['init'][1]:.2f}, first result {ph['first_result'][1]:.2f}  "
                  f"procs {r['procs']}  load {os.getloadavg()[0]:.1f}"
                  + (f"  LEFTOVER {r['leftover']}" if r["leftover"] else ""), flush=True)
            for cpu, name in r.get("by_process", ()):
                print(f"      {cpu:6.3f} s  {name}")
    med = statistics.median
    summary = {}
    for key, get in (("tree CPU (s)", lambda r: r["cpu_s"]),
                     ("tree CPU to first result (s)", lambda r: r["phases"]["first_result"][1]),
                     ("driver wall, import..shutdown (s)", lambda r: r["wall_s"]),
                     ("wall init..first result (s)",
                      lambda r: r["phases"]["init"][0] + r["phases"]["first_result"][0]),
                     ("processes", lambda r: r["procs"])):
        nat = [get(r) for r in runs["ray"]]
        summary[key] = {"ray": nat}
        print(f"{key}: ray {med(nat):.2f}")
        for kind in trees:
            bm = [get(r) for r in runs[kind]]
            ratios = [b / n for b, n in zip(bm, nat)]
            summary[key][kind] = bm
            summary[key][kind + "/ray"] = ratios
            print(f"    {kind:12s} {med(bm):7.2f}  ratio median {med(ratios):.2f} (per round "
                  f"{', '.join('%.2f' % x for x in ratios)})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "runs": runs, "rounds": a.rounds,
                       "trees": {k: os.path.basename(os.path.abspath(v))
                                 for k, v in trees.items()},
                       "loadavg_end": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()

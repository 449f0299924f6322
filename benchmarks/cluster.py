"""Cluster rows (issue 7): beamlet's head + node daemons and Ray's multi-node
cluster on this machine, side by side in one run.

    python benchmarks/cluster.py                 # beamlet and Ray (the venv's), ~10 min
    python benchmarks/cluster.py --no-ray --repeat 5

Rows, each the median of `--repeat` runs:
- start a head: `beamlet start --head` / `ray start --head`, until the command returns;
- join a node: `beamlet start --address` / `ray start --address`;
- a killed node declared dead: SIGKILL the second node's daemon (beamlet's
  node daemon; Ray's raylet of that node), then poll the head's view
  (`beamlet status` / `ray.nodes()` from a driver) until the node shows dead.
  The time is from the kill to the first poll that sees it (polls every 0.1 s).

Work rows (head + one node, 1 CPU each; a driver on the head sends the work
to the other node, pinned there by a custom resource), from one driver run per
repeat, before the kill:
- sync task: ``get(f.remote())`` in a loop, median per call;
- tasks/s: `--tasks` no-op tasks submitted at once, then got;
- actor sync call / actor calls/s: the same with an actor on the other node;
- 100 MB argument moved between nodes: a task on the head makes a 100 MB
  array; once it is done, a task on the other node takes it as argument
  (returns its size); GB/s = bytes / (time of that second task's get).

Everything
started here is stopped by pid (beamlet: `beamlet stop` with a private state
directory; Ray: `ray stop` with its own temp dir is by name, so Ray runs with a
private `--temp-dir` and is stopped by the pids it started). Writes
`results/cluster-<date>.json` and `results/cluster-latest.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_RAY_PYTHON = os.path.join(os.path.dirname(REPO), "raybench-venv", "bin", "python")
POLL = 0.1
DEAD_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                parents[int(entry)] = int(text[text.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- the work rows: one driver program for both -----------------------------------------
_WORK = r"""
import json, statistics, sys, time
import numpy as np
if sys.argv[1] == "ray":
    import ray
    ray.init(address=sys.argv[2], logging_level="ERROR")
else:
    import beamlet as ray
    ray.init(address=sys.argv[2])
n_sync, n_tasks, n_calls, n_move = (int(x) for x in sys.argv[3:7])
MOVE = 100 << 20
T = 300  # (a get's timeout: nothing may hang the benchmark)

@ray.remote(num_cpus=1, resources={"far": 0.001})
def nop():
    return None

@ray.remote(num_cpus=0, resources={"far": 0.001})
class Actor:
    def m(self):
        return None

@ray.remote(num_cpus=1, resources={"near": 0.001})
def produce(n):
    import numpy as np
    return np.ones(n, dtype=np.uint8)

@ray.remote(num_cpus=1, resources={"far": 0.001})
def consume(a):
    return a.nbytes

def sync(call, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        ray.get(call(), timeout=T)
        times.append(time.perf_counter() - t)
    return statistics.median(times)

def rate(call, n):
    t = time.perf_counter()
    ray.get([call() for _ in range(n)], timeout=T)
    return n / (time.perf_counter() - t)

out = {}
ray.get([nop.remote() for _ in range(20)], timeout=T)  # (workers started)
out["task_sync_s"] = sync(nop.remote, n_sync)
out["tasks_per_s"] = rate(nop.remote, n_tasks)
actor = Actor.remote()
ray.get(actor.m.remote(), timeout=T)
out["actor_sync_s"] = sync(actor.m.remote, n_sync)
out["actor_calls_per_s"] = rate(actor.m.remote, n_calls)
speeds = []
for _ in range(n_move):
    ref = produce.remote(MOVE)
    ray.wait([ref], timeout=T)
    t = time.perf_counter()
    assert ray.get(consume.remote(ref), timeout=T) == MOVE
    speeds.append(MOVE / (time.perf_counter() - t) / 1e9)
    del ref
out["move_100mb_gb_s"] = statistics.median(speeds)
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
"""


def _work(python: str, name: str, address: str, args: list, env: dict) -> dict:
    proc = subprocess.run([python, "-c", _WORK, name, address, *map(str, args)],
                          capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {name} driver failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


# -- beamlet --------------------------------------------------------------------------
class Beamlet:
    name = "beamlet"

    def __init__(self):
        self.state = tempfile.mkdtemp(prefix="beamlet-bench-state-")
        self.env = dict(os.environ, BEAMLET_STATE_DIR=self.state,
                        PYTHONPATH=os.pathsep.join(filter(None, [REPO,
                                                                 os.environ.get("PYTHONPATH")])))

    def _cli(self, *args) -> str:
        proc = subprocess.run([sys.executable, "-m", "beamlet.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"beamlet {' '.join(args)} failed:\n{proc.stderr}")
        return proc.stdout

    def start_head(self) -> None:
        out = self._cli("start", "--head", "--num-cpus", "1", "--resources", '{"near": 1}')
        self.address = re.search(r"head started at (\S+)", out).group(1)

    def join(self) -> None:
        out = self._cli("start", "--address", self.address, "--num-cpus", "1",
                        "--resources", '{"far": 1}')
        self.node_address = re.search(r"it listens at (\S+)\.", out).group(1)

    def settle(self) -> None:
        time.sleep(1.0)  # (as Ray is given time to settle)

    def work(self, args: list) -> dict:
        return _work(sys.executable, "beamlet", self.address, args, self.env)

    def kill_node(self) -> None:
        directory = os.path.join(self.state, "processes")
        for name in os.listdir(directory):
            with open(os.path.join(directory, name)) as f:
                record = json.load(f)
            if record["address"] == self.node_address:
                os.kill(record["pid"], signal.SIGKILL)
                return
        raise RuntimeError("the node's process is not recorded")

    def node_dead(self) -> bool:
        out = self._cli("status")
        return any(self.node_address in line and " DEAD " in line for line in out.splitlines())

    def stop(self) -> None:
        self._cli("stop")
        shutil.rmtree(self.state, ignore_errors=True)


# -- Ray ------------------------------------------------------------------------------
_RAY_DEAD_PROBE = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
print(sum(1 for a in alive.values() if not a))
"""


class Ray:
    name = "ray"

    def __init__(self, python: str):
        self.python = python
        self.ray = os.path.join(os.path.dirname(python), "ray")
        self.temp = tempfile.mkdtemp(prefix="rb-")  # (Ray's socket paths must stay short)
        # Ray 2.60's head turns token authentication on (its token in ~/.ray):
        # the joining node and the probing driver must use it too.
        self.env = dict(os.environ, RAY_AUTH_MODE="token")
        self.seen: set[int] = set()

    def _start(self, *args) -> None:
        cmd = [self.ray, "start", *args, "--num-cpus", "1", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")

    def _ours(self) -> set[int]:
        """Ray processes of this run: their command line names our temp dir or
        session, or their parent is one of them."""
        ours = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and self.temp in _cmdline(int(entry)):
                ours.add(int(entry))
        for pid in list(ours):
            ours |= _descendants(pid)
        return ours

    def start_head(self) -> None:
        self.port = _free_port()
        self._start("--head", f"--port={self.port}", f"--temp-dir={self.temp}",
                    "--include-dashboard=false", '--resources={"near": 1}')
        self.address = f"127.0.0.1:{self.port}"
        self.head_pids = self._ours()

    def join(self) -> None:
        self._start(f"--address={self.address}",
                    f"--node-manager-port={_free_port()}",
                    f"--object-manager-port={_free_port()}",
                    f"--min-worker-port={_free_port() // 2 * 2}", "--max-worker-port=0",
                    '--resources={"far": 1}')
        self.node_pids = self._ours() - self.head_pids

    def settle(self) -> None:
        """Wait for the agents `ray start` leaves starting, and remember every
        pid of ours: a killed raylet's processes lose their parent, and Ray
        renames its agents, so they could not be found at stop otherwise."""
        time.sleep(1.0)
        self.node_pids = self._ours() - self.head_pids
        self.seen |= self.head_pids | self.node_pids

    def work(self, args: list) -> dict:
        return _work(self.python, "ray", self.address, args, self.env)

    def kill_node(self) -> None:
        raylets = [p for p in self.node_pids if "raylet" in _cmdline(p).split(" ")[0]]
        if not raylets:
            raise RuntimeError("the second node's raylet was not found")
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)

    def node_dead(self) -> bool:
        proc = subprocess.run([self.python, "-c", _RAY_DEAD_PROBE, self.address],
                              capture_output=True, text=True, timeout=60, env=self.env)
        return proc.stdout.strip().splitlines()[-1:] not in ([], ["0"])

    def stop(self) -> None:
        for pid in self._ours() | self.seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def measure(framework, work_args) -> dict:
    t = time.perf_counter()
    framework.start_head()
    head = time.perf_counter() - t
    try:
        t = time.perf_counter()
        framework.join()
        join = time.perf_counter() - t
        framework.settle()
        work = framework.work(work_args) if work_args else {}
        killed = time.perf_counter()
        framework.kill_node()
        dead = None
        while time.perf_counter() - killed < DEAD_TIMEOUT:
            if framework.node_dead():
                dead = time.perf_counter() - killed
                break
            time.sleep(POLL)
    finally:
        framework.stop()
    return {"start_head_s": head, "join_s": join, "declared_dead_s": dead, **work}


#: (label, key, unit) of each row; the ratio is beamlet's figure over Ray's
#: (below 1 is better for times, above 1 for rates).
ROWS = [("start a head", "start_head_s", "s"), ("join a node", "join_s", "s"),
        ("killed node declared dead", "declared_dead_s", "s"),
        ("sync task on the other node", "task_sync_s", "ms"),
        ("tasks/s on the other node", "tasks_per_s", "/s"),
        ("actor sync call on the other node", "actor_sync_s", "ms"),
        ("actor calls/s on the other node", "actor_calls_per_s", "/s"),
        ("100 MB argument moved between nodes", "move_100mb_gb_s", "GB/s")]


def _show(value, unit: str) -> str:
    if value is None:
        return "never"
    if unit == "ms":
        return f"{value * 1e3:.2f} ms"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    return f"{value:.2f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-work", action="store_true", help="only the start/join/dead rows")
    parser.add_argument("--sync", type=int, default=200, help="sync calls per latency row")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks (and actor calls) "
                        "per throughput row")
    parser.add_argument("--moves", type=int, default=3, help="100 MB moves per run")
    parser.add_argument("--ray-python", default=os.environ.get("BEAMLET_BENCH_PYTHON",
                                                               DEFAULT_RAY_PYTHON))
    args = parser.parse_args(argv)
    frameworks = [Beamlet]
    if not args.no_ray:
        if not os.path.exists(args.ray_python):
            print(f"no Ray interpreter at {args.ray_python}: see benchmarks/README.md "
                  f"(or --no-ray)", file=sys.stderr)
            return 2
        frameworks.append(lambda: Ray(args.ray_python))
    samples: dict[str, list[dict]] = {}
    work_args = None if args.no_work else [args.sync, args.tasks, args.tasks, args.moves]
    for _ in range(args.repeat):
        for make in frameworks:
            framework = make()
            samples.setdefault(framework.name, []).append(measure(framework, work_args))
    rows = [(label, key, unit) for label, key, unit in ROWS
            if any(key in s for runs in samples.values() for s in runs)]
    medians = {name: {key: statistics.median([s[key] for s in runs if s.get(key) is not None])
                      if any(s.get(key) is not None for s in runs) else None
                      for _, key, _ in rows} for name, runs in samples.items()}
    names = list(samples)
    lines = [f"| row | {' | '.join(names)} |" + (" beamlet/ray |" if "ray" in names else ""),
             "|---|" + "---:|" * (len(names) + ("ray" in names))]
    for label, key, unit in rows:
        cells = [_show(medians[n][key], unit) for n in names]
        ratio = ""
        if "ray" in names and medians["ray"][key] and medians["beamlet"][key] is not None:
            ratio = f" {medians['beamlet'][key] / medians['ray'][key]:.3f}x |"
        lines.append(f"| {label} | {' | '.join(cells)} |{ratio}")
    table = "\n".join(lines)
    print(table)
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    with open(os.path.join(out_dir, f"cluster-{stamp}.json"), "w") as f:
        json.dump({"samples": samples, "medians": medians, "repeat": args.repeat}, f, indent=1)
    with open(os.path.join(out_dir, "cluster-latest.md"), "w") as f:
        f.write(f"Medians of {args.repeat} runs, {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

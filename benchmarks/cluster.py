"""Cluster rows (issue 7): beamlet's head + node daemons and Ray's multi-node
cluster on this machine, side by side in one run.

    python benchmarks/cluster.py                 # beamlet and Ray (the venv's), ~2 min
    python benchmarks/cluster.py --no-ray --repeat 5

Rows, each the median of `--repeat` runs:
- start a head: `beamlet start --head` / `ray start --head`, until the command returns;
- join a node: `beamlet start --address` / `ray start --address`;
- a killed node declared dead: SIGKILL the second node's daemon (beamlet's
  node daemon; Ray's raylet of that node), then poll the head's view
  (`beamlet status` / `ray.nodes()` from a driver) until the node shows dead.
  The time is from the kill to the first poll that sees it (polls every 0.1 s).

Task and object rows join when drivers can run work on the cluster. Everything
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
        out = self._cli("start", "--head", "--num-cpus", "1")
        self.address = re.search(r"head started at (\S+)", out).group(1)

    def join(self) -> None:
        out = self._cli("start", "--address", self.address, "--num-cpus", "1")
        self.node_address = re.search(r"it listens at (\S+)\.", out).group(1)

    def settle(self) -> None:
        time.sleep(1.0)  # (as Ray is given time to settle)

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
                    "--include-dashboard=false")
        self.address = f"127.0.0.1:{self.port}"
        self.head_pids = self._ours()

    def join(self) -> None:
        self._start(f"--address={self.address}",
                    f"--node-manager-port={_free_port()}",
                    f"--object-manager-port={_free_port()}",
                    f"--min-worker-port={_free_port() // 2 * 2}", "--max-worker-port=0")
        self.node_pids = self._ours() - self.head_pids

    def settle(self) -> None:
        """Wait for the agents `ray start` leaves starting, and remember every
        pid of ours: a killed raylet's processes lose their parent, and Ray
        renames its agents, so they could not be found at stop otherwise."""
        time.sleep(1.0)
        self.node_pids = self._ours() - self.head_pids
        self.seen |= self.head_pids | self.node_pids

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


def measure(framework) -> dict:
    t = time.perf_counter()
    framework.start_head()
    head = time.perf_counter() - t
    try:
        t = time.perf_counter()
        framework.join()
        join = time.perf_counter() - t
        framework.settle()
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
    return {"start_head_s": head, "join_s": join, "declared_dead_s": dead}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
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
    for _ in range(args.repeat):
        for make in frameworks:
            framework = make()
            samples.setdefault(framework.name, []).append(measure(framework))
    rows = [("start a head", "start_head_s"), ("join a node", "join_s"),
            ("killed node declared dead", "declared_dead_s")]
    medians = {name: {key: statistics.median([s[key] for s in runs if s[key] is not None])
                      if any(s[key] is not None for s in runs) else None
                      for _, key in rows} for name, runs in samples.items()}
    names = list(samples)
    lines = [f"| row | {' | '.join(names)} |" + (" beamlet/ray |" if "ray" in names else ""),
             "|---|" + "---:|" * (len(names) + ("ray" in names))]
    for label, key in rows:
        cells = [f"{medians[n][key]:.2f} s" if medians[n][key] is not None else "never"
                 for n in names]
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

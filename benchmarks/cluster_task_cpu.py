"""CPU per no-op task on a cluster (driver + node daemons + their workers),
for two or more checkouts of beamlet, in alternating runs.

    python benchmarks/cluster_task_cpu.py --tree main=../beamlet-main --tree mine=. --rounds 4

Each run: a head and one node (`--cpus` CPUs each) started from that
checkout, a driver that warms up, then submits `--tasks` no-op tasks at once
and gets them (`--bursts` times); with ``--work actor-calls`` the same with
calls of an actor's no-op method on the node (not the head), and with
``--work actor-sync`` those calls one at a time (``get(a.m.remote())``). CPU is counted, not wall time (the machine
is shared): the driver's own (getrusage, all its threads) over the bursts,
and the daemons' and their workers' (psutil cpu_times of each process tree,
children that exited included) over the same span. The table gives the median
per checkout of microseconds of CPU per task (or call);
`results/cluster-task-cpu-<date>.json` (``cluster-actor-sync-cpu-...`` for
``--work actor-sync``, and so on) keeps every run.

``--threads`` also splits that CPU by thread (from ``/proc/<pid>/task/*/schedstat``,
threads alive at the end): per process (the driver, the head's and the node's
daemons, the workers under each) its main thread, libzmq's I/O threads
(``ZMQbg/IO``) and its other threads together (in a daemon: mostly the node
engine's I/O thread, which reads the workers), each with its voluntary context
switches per task: how many times it was woken, the hops of a call (written
to ``cluster-<work>-cpu-threads-<date>.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))

_DRIVER = r"""
import json, resource, sys
import beamlet
beamlet.init(address=sys.argv[1])
tasks, bursts, work = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

@beamlet.remote
def nop():
    return None

@beamlet.remote(num_cpus=0)
class Actor:
    def m(self):
        return None

beamlet.get([nop.remote() for _ in range(200)], timeout=300)  # (workers started)
if work == "tasks":
    call = nop.remote
else:
    actor = Actor.options(resources={"far": 0.001}).remote()
    call = actor.m.remote
    beamlet.get([call() for _ in range(200)], timeout=300)
print("READY", flush=True)
sys.stdin.readline()
before = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(bursts):
    if work == "actor-sync":
        for _ in range(tasks):
            beamlet.get(call(), timeout=60)
    else:
        beamlet.get([call() for _ in range(tasks)], timeout=600)
after = resource.getrusage(resource.RUSAGE_SELF)
print("DRIVER " + json.dumps(after.ru_utime + after.ru_stime
                              - before.ru_utime - before.ru_stime), flush=True)
print("FROM " + beamlet.__file__, flush=True)
sys.stdin.readline()
beamlet.shutdown()
"""


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and their descendants (alive; each
    process's exited children too)."""
    total = 0.0
    seen = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _thread_kind(pid: int, tid: str, comm: str) -> str:
    """A thread's kind: its process's main thread, a libzmq I/O thread, or other."""
    if tid == str(pid):
        return "main"
    return "zmq-io" if comm.startswith("ZMQbg/IO") else "other"


def _threads(roles: dict) -> dict:
    """(role, thread kind) -> [CPU seconds, voluntary switches] of the threads
    alive now of each process in `roles` (role -> pid)."""
    out: dict = {}
    for role, pid in roles.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
                with open(f"{base}/schedstat") as f:
                    cpu = int(f.read().split()[0]) / 1e9
                with open(f"{base}/status") as f:
                    switches = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", f.read(),
                                             re.M).group(1))
            except (OSError, AttributeError):
                continue
            entry = out.setdefault((role, _thread_kind(pid, tid, comm)), [0.0, 0])
            entry[0] += cpu
            entry[1] += switches
    return out


def _roles(driver: int, daemons: list[int], head: int) -> dict:
    """role -> pid: the driver, each daemon, and the processes under each daemon
    (its workers and zygote; the head's redis-server too), named after their daemon."""
    roles = {"driver": driver}
    for pid in daemons:
        name = "head" if pid == head else "node"
        roles[name] = pid
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                what = "redis" if "redis" in child.name() else "worker"
            except psutil.NoSuchProcess:
                continue
            roles[f"{name} {what} {child.pid}"] = child.pid
    return roles


def _per_thread(before: dict, after: dict, n: int) -> dict:
    """'role/kind' -> (CPU us, voluntary switches) per item, workers of a node summed."""
    out: dict = {}
    for (role, kind), (cpu, switches) in after.items():
        cpu0, switches0 = before.get((role, kind), (0.0, 0))
        parts = role.split()
        key = f"{' '.join(parts[:2])}/{kind}"  # (drops a worker's pid)
        entry = out.setdefault(key, [0.0, 0.0])
        entry[0] += (cpu - cpu0) / n * 1e6
        entry[1] += (switches - switches0) / n
    return {k: v for k, v in out.items() if v[0] >= 0.5 or v[1] >= 0.01}


def run(tree: str, tasks: int, bursts: int, cpus: int, work: str = "tasks",
        threads: bool = False) -> dict:
    # (Every process runs in a directory of its own: `-m` and `-c` put the
    # working directory first on the path, where a checkout would win.)
    state = tempfile.mkdtemp(prefix="beamlet-cpu-bench-")
    env = dict(os.environ, BEAMLET_STATE_DIR=state, PYTHONPATH=tree)
    env.pop("BEAMLET_ADDRESS", None)
    env.pop("BEAMLET_SPILLBACK_HOLD_MAX", None)

    def cli(*args) -> str:
        proc = subprocess.run([sys.executable, "-m", "beamlet.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd=state)
        if proc.returncode != 0:
            raise RuntimeError(f"beamlet {' '.join(args)} failed:\n{proc.stderr}")
        return proc.stdout

    try:
        out = cli("start", "--head", "--num-cpus", str(cpus))
        address = re.search(r"head started at (\S+)", out).group(1)
        cli("start", "--address", address, "--num-cpus", str(cpus),
            "--resources", json.dumps({"far": 1}))
        daemons, head = [], None
        for name in os.listdir(os.path.join(state, "processes")):
            with open(os.path.join(state, "processes", name)) as f:
                record = json.load(f)
            if record.get("role") == "redis":
                continue
            daemons.append(record["pid"])
            if record.get("role") == "head":
                head = record["pid"]
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER, address, str(tasks),
                                   str(bursts), work], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=state)
        try:
            line = driver.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"the driver failed: {line}")
            roles = _roles(driver.pid, daemons, head) if threads else {}
            threads_before = _threads(roles)
            nodes_before = _tree_cpu(daemons)
            driver.stdin.write("\n")
            driver.stdin.flush()
            line = driver.stdout.readline()
            nodes_after = _tree_cpu(daemons)
            threads_after = _threads(roles)
            if not line.startswith("DRIVER "):
                raise RuntimeError(f"the driver failed: {line}")
            driver_cpu = json.loads(line[len("DRIVER "):])
            where = driver.stdout.readline()
            if os.path.realpath(where.split(" ", 1)[1].strip()) != os.path.realpath(
                    os.path.join(tree, "beamlet", "__init__.py")):
                raise RuntimeError(f"the driver ran another checkout's beamlet: {where}")
            driver.stdin.write("\n")
            driver.stdin.flush()
            driver.wait(60)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    finally:
        try:
            cli("stop")
        finally:
            shutil.rmtree(state, ignore_errors=True)
    n = tasks * bursts
    result = {"driver_us": driver_cpu / n * 1e6,
              "nodes_us": (nodes_after - nodes_before) / n * 1e6,
              "total_us": (driver_cpu + nodes_after - nodes_before) / n * 1e6}
    if threads:
        result["threads"] = _per_thread(threads_before, threads_after, n)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="NAME=PATH of a checkout (give two or more)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--work", choices=("tasks", "actor-calls", "actor-sync"),
                        default="tasks", help="no-op tasks, or calls of a no-op actor "
                        "method on the node (not the head) in bursts, or one at a time")
    parser.add_argument("--threads", action="store_true",
                        help="also split the CPU by process and thread (main, libzmq's "
                        "I/O, others), with each one's wake-ups per item")
    args = parser.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree]
    runs: dict[str, list] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, path in (trees if r % 2 == 0 else trees[::-1]):
            result = run(os.path.abspath(path), args.tasks, args.bursts, args.cpus,
                         args.work, args.threads)
            result["load"] = os.getloadavg()[0]
            runs[name].append(result)
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()
                                                    if k != "threads"), flush=True)
    print(f"\nCPU microseconds per {args.work} item ({args.tasks} x {args.bursts} per run, head + "
          f"node of {args.cpus} CPU each), median of {args.rounds} runs")
    print(f"{'checkout':<12}{'driver':>10}{'nodes':>10}{'total':>10}")
    for name, results in runs.items():
        med = {k: statistics.median(x[k] for x in results)
               for k in ("driver_us", "nodes_us", "total_us")}
        print(f"{name:<12}{med['driver_us']:>10.1f}{med['nodes_us']:>10.1f}"
              f"{med['total_us']:>10.1f}")
    if args.threads:
        print(f"\nBy thread: CPU microseconds and wake-ups (voluntary switches) per item, "
              f"median of {args.rounds} runs")
        for name, results in runs.items():
            keys = sorted({k for x in results for k in x["threads"]})
            print(f"{name}:")
            for key in keys:
                cpu = statistics.median(x["threads"].get(key, (0.0, 0.0))[0] for x in results)
                woken = statistics.median(x["threads"].get(key, (0.0, 0.0))[1] for x in results)
                print(f"  {key:<28}{cpu:>8.1f} us{woken:>8.2f} wake-ups")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    day = datetime.date.today().isoformat()
    kind = "task" if args.work == "tasks" else args.work
    name = f"cluster-{kind}-cpu{'-threads' if args.threads else ''}-{day}.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

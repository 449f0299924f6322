#!/usr/bin/env python
"""Core workloads for any module with Ray's API: beamlet, Ray, or Dask (through a shim).

    python benchmarks/core_bench.py --module beamlet --init '{"num_cpus": 2}'
    python benchmarks/core_bench.py --module beamlet --init '{"backend": "inprocess"}'
    python benchmarks/core_bench.py --module ray --init '{"num_cpus": 2}' --json ray.json
    python benchmarks/core_bench.py --module dask          # benchmarks/dask_shim.py
    python benchmarks/core_bench.py --module ray --only task_sync,chain --repeat 3

Each workload reports the median over ``--repeat`` repeats (all samples are in the JSON).

How it runs (so a hung or crashing workload never hangs the run or leaves processes):
- ``cold_start`` and ``idle_memory`` come from fresh probe subprocesses
  (``--_probe``): import the module, ``init()``, run one trivial task (the cold
  start is the time from ``init()`` to that first result), warm up, then sum PSS and
  RSS from ``/proc/<pid>/smaps_rollup`` over the probe and all its descendants
  (found through the ppid chains in ``/proc/*/stat``; the probe is a child
  subreaper, so daemonised helpers are still counted), then ``shutdown()``.
- All other workloads run in one child process (``--_child``) that calls
  ``init()`` once and runs them in order, reporting each result as a JSON line.
  Each workload has a timeout: when it passes, the child's whole process tree is
  frozen and killed (only pids this run started), the workload is reported as
  ``timeout``, and a fresh child continues with the remaining workloads.
- The orchestrator is a child subreaper too, so any process that outlives its
  parent is found, reported as leftover, and killed.
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------- parameters
DEFAULT_PARAMS = {
    "repeat": 5,             # repeats per workload (median reported)
    "cold_repeat": 3,        # fresh probe processes for cold_start / idle_memory
    "timeout": 120.0,        # seconds per workload (all its repeats)
    "probe_timeout": 120.0,  # seconds per probe process
    "init_timeout": 120.0,   # seconds for the child's init()
    "settle_max_s": 5.0,     # at most this long after init() for the engine to go idle
    "settle_s": 1.0,         # idle time after the warm-up before memory is read
    "warmup_tasks": 20,      # trivial tasks run in the probe before reading memory
    "sync_n": 200,           # sync task calls per repeat
    "async_n": 1000,         # tasks submitted per repeat
    "nested_submitters": 4,  # outer tasks
    "nested_per": 250,       # inner tasks each outer task submits and gets
    "actor_sync_n": 500,
    "actor_async_n": 2000,
    "small_n": 1000,         # small puts (and gets) per repeat
    "small_bytes": 100,      # size of the small put value (a bytes object)
    "big_mb": 100,           # the large numpy array, in MB (float64)
    "chain_n": 1000,
    "seed_experiments": 2,
    "seed_simulations": 8,
    "seed_size": 200,
    "ps_workers": 4,
    "ps_rounds": 50,
}


def kill_lingering(log, label: str, grace: float = 3.0) -> list:
    """Kill (by pid, with their trees) the processes of this run still alive
    `grace` seconds after a child ended, saying so in the log; returns them."""
    left = lingering(grace=grace)
    if left:
        log(f"{label}: WARNING processes left behind: {left}; killing them")
        for pid, _ in left:
            kill_tree(pid)
        reap_orphans()
    return left


def portable(obj):
    """`obj` (a report to be written) with this machine's absolute paths made
    relative to the checkout's parent directory, so that a report kept in the
    repo names no path of one machine (the Ray venv is "../raybench-venv")."""
    base = os.path.dirname(os.path.dirname(HERE))  # the directory holding the checkout
    repo = os.path.dirname(HERE)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str):
        if obj.startswith(repo + os.sep) or obj == repo:
            return os.path.relpath(obj, repo)
        if obj.startswith(base + os.sep):
            return os.path.join("..", os.path.relpath(obj, base))
        if obj.startswith(_MACHINE_DIRS):  # (an interpreter, a temp dir: its name alone)
            return os.path.basename(obj.rstrip(os.sep))
    return obj


#: Where paths name what is one machine's own (an interpreter's install, a temp dir).
_MACHINE_DIRS = ("/tmp/", "/root/", "/home/", "/usr/", "/opt/", "/var/")


class Row:
    def __init__(self, name, title, unit, better):
        self.name, self.title, self.unit, self.better = name, title, unit, better


class Workload:
    def __init__(self, name, fn, rows, kind="child"):
        self.name, self.fn, self.rows, self.kind = name, fn, rows, kind


def _median(xs):
    return statistics.median(xs) if xs else None


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------- workloads
# Each takes (ray, params) and returns {row_name: {"samples": [...], ...extra}}.
# Remote functions are defined inside the workload (after init) and passed by value.

def w_task_sync(ray, P):
    @ray.remote
    def noop():
        return 1

    for _ in range(20):
        ray.get(noop.remote())
    samples = []
    for _ in range(P["repeat"]):
        n = P["sync_n"]
        dt, _ = _timed(lambda: [ray.get(noop.remote()) for _ in range(n)])
        samples.append(dt / n * 1e3)
    return {"task_sync": {"samples": samples}}


def w_task_async(ray, P):
    @ray.remote
    def noop():
        return 1

    ray.get([noop.remote() for _ in range(100)])
    samples = []
    for _ in range(P["repeat"]):
        n = P["async_n"]
        dt, out = _timed(lambda: ray.get([noop.remote() for _ in range(n)]))
        assert sum(out) == n
        samples.append(n / dt)
    return {"task_async": {"samples": samples}}


def w_task_nested(ray, P):
    @ray.remote
    def leaf():
        return 1

    @ray.remote
    def submitter(n):
        return sum(ray.get([leaf.remote() for _ in range(n)]))

    k, per = P["nested_submitters"], P["nested_per"]
    ray.get([submitter.remote(10) for _ in range(k)])
    samples = []
    for _ in range(P["repeat"]):
        dt, out = _timed(lambda: ray.get([submitter.remote(per) for _ in range(k)]))
        assert sum(out) == k * per
        samples.append(k * per / dt)
    return {"task_nested": {"samples": samples, "note": f"{k} submitters x {per} inner tasks; "
                                                        f"inner tasks/s"}}


def w_actor_sync(ray, P):
    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n

    a = Counter.remote()
    for _ in range(20):
        ray.get(a.inc.remote())
    samples = []
    for _ in range(P["repeat"]):
        n = P["actor_sync_n"]
        dt, _ = _timed(lambda: [ray.get(a.inc.remote()) for _ in range(n)])
        samples.append(dt / n * 1e3)
    _kill(ray, a)
    return {"actor_sync": {"samples": samples}}


def w_actor_async(ray, P):
    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n

    a = Counter.remote()
    ray.get([a.inc.remote() for _ in range(100)])
    samples = []
    for _ in range(P["repeat"]):
        n = P["actor_async_n"]
        dt, out = _timed(lambda: ray.get([a.inc.remote() for _ in range(n)]))
        assert out[-1] - out[0] == n - 1, "actor calls from one caller must run in order"
        samples.append(n / dt)
    _kill(ray, a)
    return {"actor_async": {"samples": samples}}


def _kill(ray, handle):
    try:
        ray.kill(handle)
    except Exception:
        pass


def w_small_objects(ray, P):
    value = b"x" * P["small_bytes"]
    warm = [ray.put(value) for _ in range(100)]
    [ray.get(r) for r in warm]
    del warm
    put_s, get_s = [], []
    for _ in range(P["repeat"]):
        n = P["small_n"]
        dt, refs = _timed(lambda: [ray.put(value) for _ in range(n)])
        put_s.append(n / dt)
        dt, out = _timed(lambda refs=refs: [ray.get(r) for r in refs])
        assert out[-1] == value
        get_s.append(n / dt)
        del refs, out
    note = f"{P['small_bytes']}-byte bytes value, one call per op"
    return {"put_small": {"samples": put_s, "note": note},
            "get_small": {"samples": get_s, "note": note}}


def _big_array(P):
    import numpy as np
    arr = np.ones(int(P["big_mb"] * 1e6) // 8, dtype=np.float64)
    return arr


def w_put_large(ray, P):
    arr = _big_array(P)
    gb = arr.nbytes / 1e9
    dt, ref = _timed(lambda: ray.put(arr))     # the first large put in this process: cold
    cold = gb / dt
    del ref
    _warm_puts(ray, arr)
    samples = []
    for _ in range(max(P["repeat"], 5)):
        dt, ref = _timed(lambda: ray.put(arr))
        samples.append(gb / dt)
        del ref
        _settle()
    return {"put_large": {"samples": samples, "note": f"{P['big_mb']} MB numpy, warm store"},
            "put_large_cold": {"samples": [cold], "note": "first large put of the process"}}


def _settle():
    """Let a store that frees asynchronously (Ray) take the last object back."""
    gc.collect()
    time.sleep(0.2)


def _warm_puts(ray, arr, n=6):
    """Warm the store: Ray's store only reuses its pre-faulted memory after about
    four rounds of put + free (measured: 2, 2, 1.3, 1, then 7-10 GB/s)."""
    for _ in range(n):
        ref = ray.put(arr)
        del ref
        _settle()


def w_get_large(ray, P):
    import numpy as np
    arr = _big_array(P)
    ref = ray.put(arr)
    out = ray.get(ref)                          # warm-up
    read_only = not out.flags.writeable
    view = not out.flags.owndata
    shares_driver_array = bool(np.shares_memory(out, arr))
    assert out.shape == arr.shape and out[-1] == arr[-1]
    del out
    samples = []
    for _ in range(max(P["repeat"], 5)):
        dt, out = _timed(lambda: ray.get(ref))
        samples.append(dt * 1e3)
        read_only = read_only and not out.flags.writeable
        view = view and not out.flags.owndata
        del out
    med = _median(samples)
    # A zero-copy read of 100 MB is a read-only view onto the store and takes far
    # less time than copying it would (memcpy is ~5-10 GB/s, i.e. >= 10 ms here).
    zero_copy = read_only and view and not shares_driver_array and med < arr.nbytes / 20e9 * 1e3
    mode = ("zero-copy" if zero_copy else "same buffer as put" if shares_driver_array
            else "copy")
    return {"get_large": {"samples": samples, "zero_copy": zero_copy, "read_only": read_only,
                          "view": view, "shares_put_array": shares_driver_array, "mode": mode,
                          "gbps": arr.nbytes / 1e9 / (med / 1e3),
                          "note": f"{P['big_mb']} MB numpy get; value is ms"}}


def w_arg_large(ray, P):
    arr = _big_array(P)
    gb = arr.nbytes / 1e9

    @ray.remote
    def first(a):
        return float(a[0])

    for _ in range(6):                          # warm-up, as for put_large
        assert ray.get(first.remote(arr)) == 1.0
        _settle()
    samples = []
    for _ in range(max(P["repeat"], 5)):
        dt, out = _timed(lambda: ray.get(first.remote(arr)))
        samples.append(gb / dt)
        _settle()
    return {"arg_large": {"samples": samples,
                          "note": f"{P['big_mb']} MB numpy passed by value; returns a[0]"}}


def w_chain(ray, P):
    @ray.remote
    def inc(x):
        return x + 1

    n = P["chain_n"]
    r = 0
    for _ in range(10):
        r = inc.remote(r)
    ray.get(r)
    samples = []
    for _ in range(P["repeat"]):
        def run():
            r = inc.remote(0)
            for _ in range(n - 1):
                r = inc.remote(r)
            return ray.get(r)
        dt, out = _timed(run)
        assert out == n, out
        samples.append(dt)
    return {"chain": {"samples": samples, "note": f"{n} tasks, each takes the previous ref"}}


def w_seed_nested(ray, P):
    size, nsim, nexp = P["seed_size"], P["seed_simulations"], P["seed_experiments"]

    @ray.remote
    def simulation(seed):
        import numpy as np
        rng = np.random.default_rng(seed)
        a, b = rng.random((size, size)), rng.random((size, size))
        return float(np.dot(a, b).sum())

    @ray.remote
    def experiment(index, num_simulations=nsim):
        refs = [simulation.remote(index * 100 + s) for s in range(num_simulations)]
        return sum(ray.get(refs))

    def run():
        return ray.get([experiment.remote(i) for i in range(nexp)])

    run()   # warm-up
    samples = []
    for _ in range(P["repeat"]):
        dt, out = _timed(run)
        assert len(out) == nexp
        samples.append(dt)
    return {"seed_nested": {"samples": samples,
                            "note": f"{nexp} experiments x {nsim} simulations of "
                                    f"{size}x{size} matmuls"}}


def w_param_server(ray, P):
    import numpy as np
    keys = ["key1", "key2", "key3"]
    rounds, nworkers = P["ps_rounds"], P["ps_workers"]

    @ray.remote
    class ParameterServer:
        def __init__(self, keys, values):
            values = [value.copy() for value in values]
            self.parameters = dict(zip(keys, values))

        def get(self, keys):
            return [self.parameters[key] for key in keys]

        def update(self, keys, values):
            for key, value in zip(keys, values):
                self.parameters[key] += value

    @ray.remote
    def worker_task(parameter_server, rounds):
        import numpy as np
        for _ in range(rounds):
            values = ray.get(parameter_server.get.remote(keys))
            updates = [np.ones_like(v) for v in values]
            parameter_server.update.remote(keys, updates)
        return ray.get(parameter_server.get.remote(keys))[0].sum()

    ps = ParameterServer.remote(keys, [np.zeros(10) for _ in keys])
    ray.get([worker_task.remote(ps, 2) for _ in range(nworkers)])   # warm-up
    samples = []
    for _ in range(P["repeat"]):
        dt, _ = _timed(lambda: ray.get([worker_task.remote(ps, rounds)
                                        for _ in range(nworkers)]))
        samples.append(nworkers * rounds / dt)
    final = ray.get(ps.get.remote(keys))
    expected = nworkers * (2 + rounds * P["repeat"])
    ok = all(float(v[0]) == expected for v in final)
    _kill(ray, ps)
    return {"param_server": {"samples": samples, "updates_correct": ok,
                             "note": f"{nworkers} worker tasks x {rounds} get+update rounds"}}


ROWS = [
    Row("cold_start", "init() to first result", "s", "lower"),
    Row("idle_memory", "idle memory (PSS, all processes)", "MB", "lower"),
    Row("task_sync", "sync task latency", "ms", "lower"),
    Row("task_async", "async task throughput", "tasks/s", "higher"),
    Row("task_nested", "nested multi-submitter throughput", "tasks/s", "higher"),
    Row("actor_sync", "actor sync latency", "ms", "lower"),
    Row("actor_async", "actor async throughput", "calls/s", "higher"),
    Row("put_small", "small put rate", "ops/s", "higher"),
    Row("get_small", "small get rate", "ops/s", "higher"),
    Row("put_large", "100 MB put (warm store)", "GB/s", "higher"),
    Row("put_large_cold", "100 MB put (cold, first)", "GB/s", "higher"),
    Row("get_large", "100 MB get", "ms", "lower"),
    Row("arg_large", "100 MB task argument", "GB/s", "higher"),
    Row("chain", "1,000-long dependency chain", "s", "lower"),
    Row("seed_nested", "seed nested example", "s", "lower"),
    Row("param_server", "parameter-server updates", "updates/s", "higher"),
]
ROW_BY_NAME = {r.name: r for r in ROWS}

WORKLOADS = [
    Workload("cold_start", None, ["cold_start", "idle_memory"], kind="probe"),
    Workload("task_sync", w_task_sync, ["task_sync"]),
    Workload("task_async", w_task_async, ["task_async"]),
    Workload("task_nested", w_task_nested, ["task_nested"]),
    Workload("actor_sync", w_actor_sync, ["actor_sync"]),
    Workload("actor_async", w_actor_async, ["actor_async"]),
    Workload("small_objects", w_small_objects, ["put_small", "get_small"]),
    Workload("put_large", w_put_large, ["put_large", "put_large_cold"]),
    Workload("get_large", w_get_large, ["get_large"]),
    Workload("arg_large", w_arg_large, ["arg_large"]),
    Workload("chain", w_chain, ["chain"]),
    Workload("seed_nested", w_seed_nested, ["seed_nested"]),
    Workload("param_server", w_param_server, ["param_server"]),
]
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}
# Row names accepted by --only as aliases of their workload.
ALIASES = {row: w.name for w in WORKLOADS for row in w.rows}


# --------------------------------------------------------------------------- processes
def set_child_subreaper():
    """Orphaned descendants get re-parented to us, so we can find and kill them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0     # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


def proc_table():
    """{pid: (ppid, comm, state)} for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rp = data.rfind(")")
        fields = data[rp + 2:].split()
        table[int(entry)] = (int(fields[1]), data[data.find("(") + 1:rp], fields[0])
    return table


def descendants(root, table=None):
    table = proc_table() if table is None else table
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), ()):
            out.append(c)
            stack.append(c)
    return out


def tree_cpu_s(root=None):
    """CPU seconds (user + system, with the reaped children's) used so far by
    `root` (default: this process) and every live descendant: the driver, the
    engine's daemons and its workers. Taken before and after a workload, the
    difference is the CPU that workload cost, which other programs on the
    machine inflate far less than its wall time."""
    root = os.getpid() if root is None else root
    ticks = 0
    for pid in [root] + descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        ticks += sum(int(x) for x in data[data.rfind(")") + 2:].split()[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_settled(max_s: float, window: float = 0.3, busy_s: float = 0.02) -> float:
    """Wait until this process tree used under `busy_s` CPU seconds in `window`
    seconds (at most `max_s` seconds); returns the seconds waited. What
    init() leaves running in the background (beamlet's zygote importing numpy
    for the workers it forks later, Ray's daemons starting up) then does not
    run inside the first workload's timed loop: the warm rows measure a
    settled engine; the start-up has rows of its own (cold start, from probes)."""
    start = time.perf_counter()
    last = tree_cpu_s()
    while time.perf_counter() - start < max_s:
        time.sleep(window)
        now = tree_cpu_s()
        if now - last < busy_s:
            break
        last = now
    return time.perf_counter() - start


def kill_tree(root, include_root=True):
    """SIGSTOP the whole tree (so nothing forks or respawns), then SIGKILL it.
    Only ever called on processes this run started (our children and theirs)."""
    stopped = set()
    for _ in range(20):
        tree = descendants(root) + ([root] if include_root else [])
        new = [p for p in tree if p not in stopped]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(p)
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(stopped)


def reap_orphans(own_children=()):
    """Reap zombie children that were re-parented to us (we are a subreaper)."""
    me = os.getpid()
    for pid, (ppid, _, state) in proc_table().items():
        if ppid == me and state == "Z" and pid not in own_children:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def live_descendants(root=None, exclude=()):
    root = os.getpid() if root is None else root
    table = proc_table()
    return [(p, table[p][1]) for p in descendants(root, table)
            if p not in exclude and table[p][2] != "Z"]


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def lingering(root=None, grace=3.0, benign=()):
    """Live descendants still there after ``grace`` seconds (reaping orphans meanwhile),
    as [(pid, cmdline)], leaving out those whose command line contains a ``benign`` part."""
    deadline = time.time() + grace
    while True:
        reap_orphans()
        left = [(p, cmdline(p)) for p, _ in live_descendants(root)]
        left = [(p, c) for p, c in left if not any(b in c for b in benign)]
        if not left or time.time() >= deadline:
            return left
        time.sleep(0.1)


# multiprocessing's resource tracker lives exactly as long as the process that started it
BENIGN = ("multiprocessing.resource_tracker",)


def memory_of(pids):
    """Sum of Pss and Rss (kB) from /proc/<pid>/smaps_rollup, with per-process detail."""
    pss = rss = 0
    procs = []
    table = proc_table()
    for pid in pids:
        vals = {}
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss"):
                        vals[key] = int(rest.split()[0])
        except OSError:
            continue
        if not vals:          # zombie or kernel thread
            continue
        pss += vals.get("Pss", 0)
        rss += vals.get("Rss", 0)
        procs.append({"pid": pid, "name": table.get(pid, (0, "?", ""))[1],
                      "pss_mb": round(vals.get("Pss", 0) / 1024, 1),
                      "rss_mb": round(vals.get("Rss", 0) / 1024, 1)})
    return pss / 1024, rss / 1024, procs


def shm_refs(pids):
    """Names of /dev/shm files that these processes map or hold open right now."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        names.add(line[i + 9:].strip().removesuffix(" (deleted)"))
        except OSError:
            pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    names.add(target[9:].removesuffix(" (deleted)"))
        except OSError:
            pass
    return names


def session_markers(pids):
    """Session-like tokens (>= 8 alphanumerics with a digit) from these processes' command
    lines, e.g. beamlet's session id; /dev/shm entries containing one are ours."""
    import re
    tokens = set()
    for pid in pids:
        for tok in re.split(r"[\s/@:=,_.-]+", cmdline(pid)):
            if len(tok) >= 8 and tok.isalnum() and any(c.isdigit() for c in tok) \
                    and any(c.isalpha() for c in tok):
                tokens.add(tok)
    return tokens


def _shm_prefix(name):
    return name.rsplit("-", 1)[0] + "-" if "-" in name else name


def split_shm_leftovers(new, refs, markers=()):
    """New /dev/shm entries that are ours (seen mapped by our processes, or sharing a
    name prefix such as a session with one that was) vs. unattributed ones (other
    programs on the machine may be creating segments while we run)."""
    prefixes = {_shm_prefix(r) for r in refs}
    ours = sorted(e for e in new if e in refs or _shm_prefix(e) in prefixes
                  or any(m in e for m in markers))
    return ours, sorted(set(new) - set(ours))


class ForeignLoad:
    """CPU time that other programs on the machine used while we ran (on a 2-core machine
    a concurrent test run skews every number, so the run reports it): the growth of
    utime+stime+cutime+cstime over user processes that are neither ours (descendants)
    nor our ancestors; processes that appeared meanwhile count in full, and short-lived
    ones show up in their parent's cutime. Kernel threads are left out."""

    def __init__(self):
        self.t0, self.start = time.time(), self._snapshot()

    @staticmethod
    def _snapshot():
        snap = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    data = f.read()
            except OSError:
                continue
            fields = data[data.rfind(")") + 2:].split()
            ppid = int(fields[1])
            if ppid == 2 or int(entry) == 2:      # kernel threads
                continue
            cpu = sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
            snap[int(entry)] = (int(fields[19]), ppid, cpu)   # starttime, ppid, cpu
        return snap

    def result(self):
        wall = time.time() - self.t0
        end = self._snapshot()
        me = os.getpid()
        ours = set(descendants(me)) | {me}
        pid = me
        while pid > 1:                    # our ancestors wait on us: not foreign load
            ours.add(pid)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    data = f.read()
                pid = int(data[data.rfind(")") + 2:].split()[1])
            except OSError:
                break
        ticks = 0
        for pid, (st, _, cpu) in end.items():
            if pid in ours:
                continue
            before = self.start.get(pid)
            ticks += cpu - before[2] if before and before[0] == st else cpu
        other = ticks / os.sysconf("SC_CLK_TCK")
        return {"wall_s": wall, "other_cpu_s": other,
                "other_cpu_share": other / (wall * (os.cpu_count() or 1)) if wall else 0.0}


def shm_entries():
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


# --------------------------------------------------------------------------- the Ray venv
# Ray and Dask are never dependencies of the project: they live in their own venv,
# by default ../raybench-venv next to the checkout.
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
RAY_PYTHON_ENV = "BEAMLET_BENCH_PYTHON"
RAY_VENV_HINT = "../raybench-venv/bin/python next to the checkout"
RAY_PIP = "ray==2.60.0 dask distributed numpy cloudpickle psutil"


RAY_VENV = os.path.join(os.path.dirname(REPO), "raybench-venv")


def default_ray_python():
    """The interpreter that has Ray (and Dask): ``$BEAMLET_BENCH_PYTHON`` if set, else
    ``raybench-venv/bin/python`` in the directory that holds the checkout."""
    return os.environ.get(RAY_PYTHON_ENV) or os.path.join(RAY_VENV, "bin", "python")


def missing_ray_python(path):
    """The message for a Ray interpreter that does not exist: how to create the venv."""
    bindir = os.path.dirname(path)
    venv = (os.path.dirname(bindir) if os.path.basename(bindir) == "bin"
            else RAY_VENV)
    return (f"{path} not found: create the venv with\n  python3 -m venv {venv} && "
            f"{venv}/bin/pip install {RAY_PIP}\nor pass --ray-python (or set "
            f"{RAY_PYTHON_ENV}), or --no-ray")


def git_info():
    """The checkout's commit, and whether beamlet/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "beamlet"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head, "beamlet_dirty": bool(dirty)}
    except Exception:
        return {}


def wait_for_quiet(max_wait, log, threshold=0.15, window=2.0):
    """Waits (up to max_wait s) until other programs use < threshold of the CPUs over a
    window: on a small machine a concurrent test run skews every figure."""
    t0 = time.time()
    while True:
        probe = ForeignLoad()
        time.sleep(window)
        share = probe.result()["other_cpu_share"]
        if share < threshold:
            return share
        if time.time() - t0 > max_wait:
            log(f"    machine still busy ({share:.0%} of CPU used by other programs) after "
                f"{max_wait:.0f} s; running anyway")
            return share
        log(f"    waiting for the machine to go quiet ({share:.0%} of CPU used by other "
            f"programs)")


# --------------------------------------------------------------------------- module loading
def load_module(name):
    """The module with Ray's API: for ``ray`` and ``dask`` a shim that imports
    the engine in ``init()`` (beamlet imports it there too, so every cold
    start counts it)."""
    if name in ("dask", "ray"):
        sys.path.insert(0, HERE)
        return importlib.import_module("dask_shim" if name == "dask" else "lazy_ray")
    return importlib.import_module(name)


def _version_of(mod):
    return getattr(mod, "__version__", None)


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cores": os.cpu_count(), "hostname": platform.node()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["memory_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except Exception:
        pass
    return info


# --------------------------------------------------------------------------- machine limits
def _pipe_rtt(n, parent_cpu, child_cpu, per=100):
    """Best per-round-trip time (us) of a 1-byte ping-pong over two pipes between two
    processes, optionally pinned to CPUs (in a VM a wake-up across vCPUs costs far
    more than a context switch on one)."""
    saved = os.sched_getaffinity(0)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:   # echo child
        try:
            os.close(w1)
            os.close(r2)
            if child_cpu is not None:
                os.sched_setaffinity(0, {child_cpu})
            while True:
                b = os.read(r1, 1)
                if not b:
                    break
                os.write(w2, b)
        finally:
            os._exit(0)
    os.close(r1)
    os.close(w2)
    try:
        if parent_cpu is not None:
            os.sched_setaffinity(0, {parent_cpu})
        for _ in range(200):
            os.write(w1, b"x")
            os.read(r2, 1)
        batches = []
        for _ in range(n // per):   # the best batch: the limit, not a busy machine's noise
            t = time.perf_counter()
            for _ in range(per):
                os.write(w1, b"x")
                os.read(r2, 1)
            batches.append((time.perf_counter() - t) / per * 1e6)
    finally:
        os.sched_setaffinity(0, saved)
        os.close(w1)
        os.close(r2)
        os.waitpid(pid, 0)
    return min(batches)


def machine_limits(big_mb=100, rtt_n=5000):
    """The physical floor the workloads are measured against: a pipe round trip between
    two processes and a memcpy of the large array (into warm memory and into fresh
    memory that pays its page faults)."""
    import numpy as np
    out = {}
    cpus = sorted(os.sched_getaffinity(0))
    rtt = {"pipe_rtt_us": _pipe_rtt(rtt_n, None, None)}
    if len(cpus) >= 2:
        rtt["pipe_rtt_same_core_us"] = _pipe_rtt(rtt_n, cpus[0], cpus[0])
        rtt["pipe_rtt_cross_core_us"] = _pipe_rtt(rtt_n, cpus[0], cpus[1])
    out.update(rtt)
    src = np.ones(int(big_mb * 1e6) // 8)
    dst = np.empty_like(src)
    dst.fill(0)
    warm, cold = [], []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        warm.append(src.nbytes / 1e9 / (time.perf_counter() - t))
        t = time.perf_counter()
        fresh = src.copy()
        cold.append(src.nbytes / 1e9 / (time.perf_counter() - t))
        del fresh
    out["memcpy_warm_gbps"] = max(warm)
    out["memcpy_cold_gbps"] = max(cold)
    # The same into shared memory (tmpfs): a cold segment pays its page faults.
    import mmap
    shm_cold, shm_warm = [], []
    for _ in range(3):
        path = f"/dev/shm/core_bench_limits_{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(path)
            os.ftruncate(fd, src.nbytes)
            m = mmap.mmap(fd, src.nbytes)
        finally:
            os.close(fd)
        view = np.frombuffer(m, dtype=src.dtype)
        t = time.perf_counter()
        np.copyto(view, src)
        shm_cold.append(src.nbytes / 1e9 / (time.perf_counter() - t))
        t = time.perf_counter()
        np.copyto(view, src)
        shm_warm.append(src.nbytes / 1e9 / (time.perf_counter() - t))
        del view
        m.close()
    out["shm_cold_gbps"] = max(shm_cold)
    out["shm_warm_gbps"] = max(shm_warm)
    out["note"] = (f"best of several trials; pipe_rtt: 1-byte ping-pong between two processes "
                   f"over os.pipe (unpinned, both on one core, on two cores); memcpy: "
                   f"{big_mb} MB numpy copy into touched memory (warm) and into a fresh "
                   f"allocation (cold, pays page faults); shm: the same into a /dev/shm "
                   f"mapping, fresh (cold) and already faulted (warm)")
    return out


# --------------------------------------------------------------------------- fresh child processes
# A child run by run_subprocess tells its phase and its result on stdout with these marks.
PHASE_MARK, RESULT_MARK = "@@PHASE@@", "@@PROBE@@"


def report_phase(name):
    """In a child process: tells run_subprocess which phase it is in (for phase timeouts
    and for the log when it hangs)."""
    sys.stdout.write(f"{PHASE_MARK} {name}\n")
    sys.stdout.flush()


def report_result(result):
    """In a child process: hands its JSON-able result to run_subprocess."""
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def shutdown_checked(ray, grace=5.0):
    """In a child process that is a subreaper: ``ray.shutdown()``, then kills whatever it
    started that is still alive ``grace`` seconds later. Returns (seconds shutdown()
    took, [(pid, cmdline)] left behind)."""
    report_phase("shutdown")
    t = time.perf_counter()
    ray.shutdown()
    took = time.perf_counter() - t
    report_phase("after shutdown")
    me = os.getpid()
    left = lingering(me, grace=grace, benign=BENIGN)
    if left:
        kill_tree(me, include_root=False)
        time.sleep(0.2)
        reap_orphans()
    return took, left


# --------------------------------------------------------------------------- probe (cold start + memory)
def probe_main(args):
    """Runs in a fresh interpreter: cold import + init + first result, then idle memory."""
    set_child_subreaper()
    P = dict(DEFAULT_PARAMS, **json.loads(args.params))
    # Dump every thread's stack shortly before the orchestrator would kill us.
    faulthandler.dump_traceback_later(max(1.0, P["probe_timeout"] - 3), exit=False)

    report_phase("import")
    t0 = time.perf_counter()
    ray = load_module(args.module)
    t1 = time.perf_counter()
    report_phase("init")
    ray.init(**json.loads(args.init))
    t2 = time.perf_counter()
    report_phase("first task")

    @ray.remote
    def one():
        return 1

    assert ray.get(one.remote()) == 1
    t3 = time.perf_counter()
    report_phase("warm-up")
    # warm-up: a few rounds of tasks and a put/get, then let it settle
    for _ in range(2):
        ray.get([one.remote() for _ in range(P["warmup_tasks"])])
    ray.get(ray.put(b"x" * 100))
    time.sleep(P["settle_s"])
    me = os.getpid()
    pids = [me] + descendants(me)
    pss, rss, procs = memory_of(pids)
    refs = shm_refs(pids)
    markers = session_markers(pids[1:])
    shutdown_s, left = shutdown_checked(ray)
    result = {"version": _version_of(ray), "import_s": t1 - t0, "init_s": t2 - t1,
              "init_to_first_result_s": t3 - t1,
              "first_task_s": t3 - t2, "shutdown_s": shutdown_s, "pss_mb": pss, "rss_mb": rss,
              "nprocs": len(procs), "procs": procs,
              "leftover_after_shutdown": [f"{p} {n}" for p, n in left],
              "shm_refs": sorted(refs), "markers": sorted(markers)}
    report_result(result)


def run_probes(args, P, log, versions, shm_seen, markers_seen):
    cold, mem, runs = [], [], []
    status = None
    for i in range(P["cold_repeat"]):
        cmd = [sys.executable, os.path.abspath(__file__), "--_probe", "--module", args.module,
               "--init", args.init, "--params", json.dumps(P)]
        res, err = run_subprocess(cmd, P["probe_timeout"], log)
        if res is None:
            status = err
            log(f"  probe {i + 1}: {err}")
            continue
        runs.append(res)
        shm_seen.update(res.get("shm_refs", ()))
        markers_seen.update(res.get("markers", ()))
        versions.append(res.get("version"))
        cold.append(res["init_to_first_result_s"])
        mem.append(res["pss_mb"])
        log(f"  probe {i + 1}: first result {res['init_to_first_result_s']:.3f} s after init() "
            f"(import {res['import_s']:.2f} s), PSS {res['pss_mb']:.0f} MB, RSS "
            f"{res['rss_mb']:.0f} MB in {res['nprocs']} processes"
            + (f", LEFTOVER {res['leftover_after_shutdown']}" if res["leftover_after_shutdown"]
               else ""))
    out = {}
    if cold:
        mid = sorted(runs, key=lambda r: r["pss_mb"])[len(runs) // 2]
        out["cold_start"] = {"samples": cold,
                             "import_s": _median([r["import_s"] for r in runs]),
                             "shutdown_s": _median([r["shutdown_s"] for r in runs]),
                             "note": "fresh process: init() to the first task result"}
        out["idle_memory"] = {"samples": mem,
                              "rss_mb": _median([r["rss_mb"] for r in runs]),
                              "nprocs": mid["nprocs"], "procs": mid["procs"],
                              "leftover_after_shutdown": [x for r in runs
                                                          for x in r["leftover_after_shutdown"]],
                              "note": "sum of PSS over driver + descendants after init and "
                                      "a warm-up"}
    else:
        out["cold_start"] = {"status": status or "error"}
        out["idle_memory"] = {"status": status or "error"}
    return out


def run_subprocess(cmd, timeout, log, phase_timeouts=None, on_phase=None, env=None,
                   what="probe"):
    """Runs ``cmd``, a child that speaks ``report_phase``/``report_result`` (its output
    goes to a temporary file, polled every 50 ms).

    ``timeout`` bounds the whole child; ``phase_timeouts`` ({phase: seconds}) bounds
    single phases. Past either, the child's whole tree is frozen and killed and its
    output's tail logged. ``on_phase(name, pid)`` is called from this thread with
    ``"start-up"`` once the child is started, then with each phase it reports.
    Returns (the child's result, None) or (None, ``"timeout (in <phase>)"`` or
    ``"error: ..."``)."""
    phase_timeouts = phase_timeouts or {}
    with tempfile.TemporaryFile("w+b") as outf:
        proc = subprocess.Popen(cmd, stdout=outf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        t0 = phase_t0 = time.perf_counter()
        phase, pos, buf = "start-up", 0, b""
        try:
            if on_phase:
                on_phase(phase, proc.pid)
            while True:
                try:
                    proc.wait(0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                chunk = os.pread(outf.fileno(), 1 << 20, pos)
                pos += len(chunk)
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    if line.startswith(PHASE_MARK.encode()):
                        phase = line.decode(errors="replace").split(" ", 1)[1]
                        phase_t0 = time.perf_counter()
                        if on_phase:
                            on_phase(phase, proc.pid)
                now = time.perf_counter()
                limit = phase_timeouts.get(phase)
                if now - t0 > timeout or (limit is not None and now - phase_t0 > limit):
                    spent = now - t0 if now - t0 > timeout else now - phase_t0
                    kill_tree(proc.pid)
                    proc.wait()
                    reap_orphans()
                    outf.seek(0)
                    text = outf.read().decode(errors="replace")
                    log(f"  {what} timed out after {spent:.0f} s in {phase}; its output ends "
                        f"with:\n" + _indent(_tail(text, 40)))
                    return None, f"timeout (in {phase})"
        except BaseException:       # Ctrl-C: leave nothing behind
            kill_tree(proc.pid)
            proc.wait()
            raise
        reap_orphans()
        outf.seek(0)
        text = outf.read().decode(errors="replace")
    for line in text.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), None
    tail = "\n".join(text.splitlines()[-15:])
    log(f"  {what} failed (rc {proc.returncode}):\n{tail}")
    return None, f"error: rc {proc.returncode}"


# --------------------------------------------------------------------------- child (warm workloads)
def child_main(args):
    P = dict(DEFAULT_PARAMS, **json.loads(args.params))
    events = open(args.events, "a", buffering=1)

    def emit(**kw):
        events.write(json.dumps(kw) + "\n")
        events.flush()

    faulthandler.dump_traceback_later(max(1.0, P["init_timeout"] - 2), exit=False)
    ray = load_module(args.module)
    t = time.perf_counter()
    ray.init(**json.loads(args.init))
    init_s = time.perf_counter() - t
    quiet_s = wait_settled(P["settle_max_s"])
    emit(event="init_done", s=init_s, quiet_s=quiet_s, version=_version_of(ray))
    for name in args.only.split(","):
        w = WORKLOAD_BY_NAME[name]
        # Dump the stacks shortly before the orchestrator would kill us for a timeout.
        faulthandler.dump_traceback_later(max(1.0, P["timeout"] - 2), exit=False)
        emit(event="start", name=name)
        t, cpu = time.perf_counter(), tree_cpu_s()
        try:
            rows = w.fn(ray, P)
        except BaseException as e:   # noqa: BLE001 - report and go on
            emit(event="error", name=name, error=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc())
        else:
            cpu_s = tree_cpu_s() - cpu
            for r in rows.values():   # (the whole workload's: warm-up and repeats)
                r["workload_cpu_s"] = cpu_s
            emit(event="result", name=name, rows=rows, wall_s=time.perf_counter() - t)
        gc.collect()
        me = os.getpid()
        pids = [me] + descendants(me)
        emit(event="shm", names=sorted(shm_refs(pids)), markers=sorted(session_markers(pids[1:])))
    faulthandler.dump_traceback_later(55, exit=False)
    emit(event="shutdown")
    t = time.perf_counter()
    ray.shutdown()
    faulthandler.cancel_dump_traceback_later()
    emit(event="done", shutdown_s=time.perf_counter() - t)
    events.close()


def run_children(args, P, names, log, versions, shm_seen, markers_seen):
    """Runs the warm workloads in child processes, restarting after a timeout or crash."""
    results = {}
    remaining = list(names)
    while remaining:
        fd, events_path = tempfile.mkstemp(prefix="core_bench_events_", suffix=".jsonl")
        os.close(fd)
        logf = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--module", args.module,
               "--init", args.init, "--params", json.dumps(P), "--events", events_path,
               "--only", ",".join(remaining)]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        current, started, pos = None, time.perf_counter(), 0
        init_done = done = False
        failure = None
        buf = ""
        try:
            while True:
                with open(events_path) as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    ev = json.loads(line)
                    kind = ev["event"]
                    if kind == "init_done":
                        init_done = True
                        versions.append(ev.get("version"))
                        log(f"  init() took {ev['s']:.2f} s, then {ev.get('quiet_s', 0):.2f} s "
                            f"until its processes were idle")
                    elif kind == "start":
                        current, started = ev["name"], time.perf_counter()
                    elif kind in ("result", "error"):
                        name = ev["name"]
                        remaining.remove(name)
                        if kind == "result":
                            for row, r in ev["rows"].items():
                                r["status"] = "ok"
                                results[row] = r
                            log(f"  {name}: " + ", ".join(
                                _fmt_row(row, r) for row, r in ev["rows"].items())
                                + f"  [{ev['wall_s']:.1f} s]")
                        else:
                            for row in WORKLOAD_BY_NAME[name].rows:
                                results[row] = {"status": "error", "error": ev["error"]}
                            log(f"  {name}: ERROR {ev['error']}\n" + _indent(ev["traceback"]))
                        current, started = None, time.perf_counter()
                    elif kind == "shm":
                        shm_seen.update(ev["names"])
                        markers_seen.update(ev["markers"])
                    elif kind == "shutdown":
                        current, started = "__shutdown__", time.perf_counter()
                    elif kind == "done":
                        done = True
                        log(f"  shutdown() took {ev['shutdown_s']:.2f} s")
                if done:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        log("  the child did not exit within 30 s of shutdown(); killing it")
                    break
                if proc.poll() is not None:
                    failure = f"error: child exited (rc {proc.returncode})"
                    break
                # a workload, shutdown(), or init() / the gap between workloads
                limit = (P["timeout"] if current not in (None, "__shutdown__")
                         else 60.0 if current == "__shutdown__" else P["init_timeout"])
                if time.perf_counter() - started > limit:
                    failure = "timeout"
                    killed = kill_tree(proc.pid)
                    proc.wait()
                    logf.seek(0)
                    log(f"  {current or 'init()'}: TIMEOUT after {limit:.0f} s; killed "
                        f"{len(killed)} processes; the child's output ends with:\n"
                        + _indent(_tail(logf.read(), 40)))
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
            reap_orphans()
            os.unlink(events_path)
        if failure and current is None and not init_done:
            # init() itself failed or hung: nothing else can run.
            logf.seek(0)
            log(f"  init() failed: {failure}\n" + _indent(_tail(logf.read())))
            for name in remaining:
                for row in WORKLOAD_BY_NAME[name].rows:
                    results[row] = {"status": failure, "error": "init() failed"}
            remaining = []
        elif failure and current == "__shutdown__":
            log(f"  shutdown(): {failure}")
        elif failure and current:
            if failure != "timeout":
                logf.seek(0)
                log(f"  {current}: {failure}\n" + _indent(_tail(logf.read())))
            for row in WORKLOAD_BY_NAME[current].rows:
                results[row] = {"status": failure}
            remaining.remove(current)
        elif failure or remaining:
            logf.seek(0)
            log(f"  child exited (rc {proc.returncode}) between workloads\n"
                + _indent(_tail(logf.read())))
            for name in remaining:
                for row in WORKLOAD_BY_NAME[name].rows:
                    results[row] = {"status": f"error: child exited rc {proc.returncode}"}
            remaining = []
        logf.close()
        left = lingering(grace=3.0)
        if left:
            log(f"  WARNING: processes left behind after the child exited: {left}; killing them")
            for pid, _ in left:
                kill_tree(pid)
            time.sleep(0.2)
            reap_orphans()
    return results


def _tail(text, n=20):
    return "\n".join(text.splitlines()[-n:])


def _indent(text):
    return "\n".join("      " + line for line in text.splitlines())


# --------------------------------------------------------------------------- output
def fmt_value(v, unit=None):
    if v is None:
        return "-"
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    elif abs(v) >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3g}"
    return s


def _fmt_row(row, r):
    v = r.get("value", _median(r.get("samples", [])))
    unit = ROW_BY_NAME[row].unit
    extra = ""
    if row == "get_large":
        extra = f" ({r.get('mode')}, read-only={r.get('read_only')}, {r.get('gbps', 0):.1f} GB/s)"
    return f"{row} {fmt_value(v)} {unit}{extra}"


def cell(r, row):
    """A short table cell for one result."""
    if r is None:
        return "-"
    if r.get("status", "ok") != "ok":
        return r["status"].split(":")[0]
    v = r.get("value")
    s = fmt_value(v)
    if row == "get_large":
        s = (f"{r.get('mode', 'copy')} {v:.2g} ms" if r.get("mode", "copy") != "copy"
             else f"copy {v:.3g} ms ({r.get('gbps', 0):.2f} GB/s)")
    elif row == "idle_memory":
        s += f" ({r.get('rss_mb', 0):,.0f} RSS, {r.get('nprocs', '?')} procs)"
    return s


def finalize(results):
    for row, r in results.items():
        if r.get("status", "ok") == "ok" and r.get("samples"):
            r["value"] = _median(r["samples"])
            r["unit"] = ROW_BY_NAME[row].unit
            r["better"] = ROW_BY_NAME[row].better
    return results


def print_table(results, title, out=sys.stdout):
    rows = [(ROW_BY_NAME[r].title, cell(results.get(r), r), ROW_BY_NAME[r].unit,
             _spread(results.get(r)))
            for r in [row.name for row in ROWS] if r in results]
    w0 = max(len("workload"), *(len(r[0]) for r in rows))
    w1 = max(len("median"), *(len(r[1]) for r in rows))
    w2 = max(len("unit"), *(len(r[2]) for r in rows))
    print(f"\n{title}", file=out)
    print(f"{'workload':<{w0}}  {'median':>{w1}}  {'unit':<{w2}}  samples (min..max, n)", file=out)
    print("-" * (w0 + w1 + w2 + 30), file=out)
    for name, c, unit, spread in rows:
        print(f"{name:<{w0}}  {c:>{w1}}  {unit:<{w2}}  {spread}", file=out)


def format_text(header, lines):
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w)
                     in enumerate(zip(header, widths)))]
    out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for line in lines:
        out.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                             for i, (x, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def format_markdown(header, lines):
    """The same table in Markdown."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for line in lines:
        out.append("| " + " | ".join(str(x) for x in line) + " |")
    return "\n".join(out)


def _spread(r):
    if not r or r.get("status", "ok") != "ok" or not r.get("samples"):
        return ""
    s = r["samples"]
    return f"{fmt_value(min(s))}..{fmt_value(max(s))}, n={len(s)}"


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="beamlet",
                   help="module with Ray's API: beamlet, ray, or dask (benchmarks/dask_shim.py)")
    p.add_argument("--init", default="{}", help="init() keyword arguments as JSON")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", help="comma-separated workloads (or row names) to run; default all: "
                   + ",".join(w.name for w in WORKLOADS))
    p.add_argument("--repeat", type=int, help="repeats per workload (default %d)"
                   % DEFAULT_PARAMS["repeat"])
    p.add_argument("--cold-repeat", type=int, help="fresh probe processes (default %d)"
                   % DEFAULT_PARAMS["cold_repeat"])
    p.add_argument("--timeout", type=float, help="seconds per workload (default %.0f)"
                   % DEFAULT_PARAMS["timeout"])
    p.add_argument("--params", default="{}",
                   help="JSON overrides of the sizes, e.g. '{\"async_n\": 5000}'; keys: "
                   + ", ".join(DEFAULT_PARAMS))
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._probe:
        return probe_main(args)
    if args._child:
        return child_main(args)

    P = dict(DEFAULT_PARAMS, **json.loads(args.params))
    for key in ("repeat", "cold_repeat", "timeout"):
        if getattr(args, key) is not None:
            P[key] = getattr(args, key)
    json.loads(args.init)   # fail early on bad JSON
    names = [w.name for w in WORKLOADS]
    if args.only:
        wanted = []
        for n in args.only.split(","):
            n = ALIASES.get(n.strip(), n.strip())
            if n not in WORKLOAD_BY_NAME:
                sys.exit(f"unknown workload {n!r}; choose from {', '.join(ALIASES)}")
            if n not in wanted:
                wanted.append(n)
        names = [n for n in names if n in wanted]

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    set_child_subreaper()
    shm_before = shm_entries()
    foreign = ForeignLoad()
    label = f"{args.module} {args.init}"
    log(f"[{label}] python {sys.executable}")
    t0 = time.perf_counter()
    results = {}
    versions = []
    shm_seen, markers_seen = set(), set()
    if "cold_start" in names:
        log(f"[{label}] cold start + idle memory: {P['cold_repeat']} fresh processes")
        results.update(run_probes(args, P, log, versions, shm_seen, markers_seen))
    child_names = [n for n in names if WORKLOAD_BY_NAME[n].kind == "child"]
    if child_names:
        log(f"[{label}] warm workloads: {', '.join(child_names)}")
        results.update(run_children(args, P, child_names, log, versions, shm_seen,
                                    markers_seen))
    finalize(results)
    load = foreign.result()
    if load["other_cpu_share"] > 0.05:
        log(f"[{label}] note: other programs used {load['other_cpu_s']:.0f} CPU-s "
            f"({load['other_cpu_share']:.0%} of the machine) during this run; numbers are "
            f"noisier than on an idle machine")
    limits = machine_limits(P["big_mb"])
    log(f"[machine] pipe round trip {limits['pipe_rtt_us']:.1f} us "
        f"(one core {limits.get('pipe_rtt_same_core_us', 0):.1f}, two cores "
        f"{limits.get('pipe_rtt_cross_core_us', 0):.1f}), memcpy "
        f"{limits['memcpy_warm_gbps']:.1f} GB/s warm, {limits['memcpy_cold_gbps']:.1f} GB/s cold; "
        f"into /dev/shm {limits['shm_warm_gbps']:.1f} GB/s warm, "
        f"{limits['shm_cold_gbps']:.1f} GB/s cold")
    leftover_shm, other_shm = split_shm_leftovers(shm_entries() - shm_before, shm_seen,
                                                 markers_seen)
    if leftover_shm:
        log(f"[{label}] WARNING: this run left entries in /dev/shm: {leftover_shm[:10]}"
            + (" ..." if len(leftover_shm) > 10 else ""))
    if other_shm:
        log(f"[{label}] note: new /dev/shm entries not attributable to this run (another "
            f"program?): {other_shm[:5]}")
    left = lingering(grace=3.0)
    if left:
        log(f"[{label}] WARNING: processes left behind: {left}; killing them")
        for pid, _ in left:
            kill_tree(pid)
        reap_orphans()
    report = {
        "module": args.module,
        "module_version": next((v for v in versions if v), None),
        "init": json.loads(args.init), "params": P, "python": sys.executable,
        "machine": machine_info(), "machine_limits": limits, "foreign_load": load, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s": time.perf_counter() - t0, "leftover_shm": leftover_shm,
        "unattributed_new_shm": other_shm,
        "leftover_processes": [f"{p} {n}" for p, n in left],
        "results": results,
    }
    print_table(results, f"{args.module} {args.init} (version {report['module_version']}, "
                         f"median of {P['repeat']}; cold start of {P['cold_repeat']})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(portable(report), f, indent=1)
    return report


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where the driver's time goes on the hot path, counted instead of timed.

    python benchmarks/hot_path_profile.py sync        # get(f.remote()), one at a time
    python benchmarks/hot_path_profile.py tput        # 1,000 tasks, then get of the list
    python benchmarks/hot_path_profile.py actor_sync  # get(a.inc.remote()), one at a time
    python benchmarks/hot_path_profile.py actor_tput  # 1,000 calls, then get of the list
    python benchmarks/hot_path_profile.py sync --cpu -n 20000   # CPU us per task instead
    python benchmarks/hot_path_profile.py actor_sync --latency -n 3000  # median round trip

With ``--cpu`` no tracer runs: the row runs ``-n`` times and the script prints
the CPU time (user + system) per task of the driver and of all its
descendant processes (the zygote and the workers, read with psutil before and
after), which load skews far less than wall-clock time does.

Counts the Python bytecodes each function of the driver runs per task (all
its threads: the caller's and the node's I/O thread), with a tracer installed
only around the timed loop. A count does not depend on what else the machine
runs, so before/after comparisons hold on a loaded machine where wall-clock
and CPU times do not (the tracer makes the run itself slow: the counts, not
its duration, are the result). C-level work (pickling, syscalls) is not
counted: pair it with ``valgrind --tool=callgrind`` instruction counts of the
driver for that (see benchmarks/README.md, "The hot path's profile").
"""
from __future__ import annotations

import argparse
import ast
import collections
import os
import shutil
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


#: The sitecustomize of the worker processes under ``--workers``: every frame is
#: traced, opcodes counted per function and thread between SIGUSR2 (start) and
#: SIGUSR1 (stop, and write the counts to BEAMLET_HOT_TRACE_DIR/<pid>.counts).
WORKER_TRACER = r"""
import collections, os, signal, sys, threading
_dir = os.environ.get("BEAMLET_HOT_TRACE_DIR")
if _dir:
    _counts = collections.Counter()
    _on = [False]

    def _tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        key = (code.co_filename, code.co_firstlineno, code.co_name)

        def local(frame, event, arg):
            if event == "opcode" and _on[0]:
                _counts[key + (threading.current_thread().name,)] += 1
            return local
        return local

    def _start(signum, frame):
        _counts.clear()
        _on[0] = True

    def _stop(signum, frame):
        _on[0] = False
        path = os.path.join(_dir, str(os.getpid()))
        with open(path + ".counts", "w") as f:
            f.write(repr(dict(_counts)))
        open(path + ".done", "w").close()

    signal.signal(signal.SIGUSR2, _start)
    signal.signal(signal.SIGUSR1, _stop)
    sys.settrace(_tracer)
    threading.settrace(_tracer)
"""


def _signal_workers(signum: int, pids=None) -> list:
    """Send `signum` to the worker processes (the zygote's children); their pids."""
    import psutil
    if pids is None:
        pids = [p.pid for child in psutil.Process().children()
                for p in child.children(recursive=True)]
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    return pids


def _targets(ray):
    """The rows' work: a no-op task, and an actor with a no-op method."""
    @ray.remote
    def noop():
        return 1

    @ray.remote
    class Counter:
        def inc(self):
            return 1

    return noop, Counter.remote()


def make_rows(ray, n: int) -> dict:
    """The four rows as callables running ``n`` tasks each, warmed up."""
    noop, actor = _targets(ray)
    for _ in range(100):  # warm: workers started, functions shipped
        ray.get(noop.remote())
        ray.get(actor.inc.remote())

    def tput(make):
        for start in range(0, n, 1000):  # 1,000 in flight, as the traced row
            ray.get([make() for _ in range(min(1000, n - start))])

    return {"sync": lambda: [ray.get(noop.remote()) for _ in range(n)],
            "tput": lambda: tput(noop.remote),
            "actor_sync": lambda: [ray.get(actor.inc.remote()) for _ in range(n)],
            "actor_tput": lambda: tput(actor.inc.remote)}


def latency_profile(ray, row: str, n: int) -> None:
    """Print the quartiles and the 90th percentile of the round trip of each
    sync call, timed one by one: the median holds at a load that the mean over
    many calls (core_bench) does not, whose stalls of milliseconds it takes in."""
    if row not in ("sync", "actor_sync"):
        raise SystemExit("--latency times the sync rows only (sync, actor_sync)")
    ray.init(num_cpus=2)
    noop, actor = _targets(ray)
    call = (lambda: ray.get(noop.remote())) if row == "sync" else \
        (lambda: ray.get(actor.inc.remote()))
    for _ in range(300):  # warm: workers started, functions shipped
        call()
    clock = time.perf_counter_ns
    times = []
    for _ in range(n):
        start = clock()
        call()
        times.append(clock() - start)
    ray.shutdown()
    times.sort()
    at = {q: times[min(n - 1, int(q * n))] / 1e3 for q in (0.25, 0.5, 0.75, 0.9)}
    print(f"{row}: round trip median {at[0.5]:.0f} us (quartiles {at[0.25]:.0f}-"
          f"{at[0.75]:.0f}, 90th percentile {at[0.9]:.0f}) over {n} calls, "
          f"load average {os.getloadavg()[0]:.2f}")


def cpu_profile(ray, row: str, n: int) -> None:
    """Print the CPU time per task of the driver and of its descendants."""
    import time

    import psutil
    ray.init(num_cpus=2)
    rows = make_rows(ray, n)
    me = psutil.Process()

    def tree():
        times = {}
        for proc in [me] + me.children(recursive=True):
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            times[proc.pid] = t.user + t.system
        return times

    before = tree()
    wall = time.perf_counter()
    rows[row]()
    wall = time.perf_counter() - wall
    after = tree()
    ray.shutdown()
    driver = after[me.pid] - before[me.pid]
    # a process absent before (a worker started during the row) counts from 0
    others = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != me.pid)
    print(f"{row}: CPU per task {1e6 * (driver + others) / n:.1f} us "
          f"(driver {1e6 * driver / n:.1f}, workers and zygote {1e6 * others / n:.1f}); "
          f"wall {1e6 * wall / n:.1f} us per task, load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("row", choices=["sync", "tput", "actor_sync", "actor_tput"])
    parser.add_argument("-n", type=int, default=1000, help="tasks or calls counted")
    parser.add_argument("--top", type=int, default=40, help="functions listed")
    parser.add_argument("--workers", action="store_true",
                        help="count the bytecodes of the worker processes instead")
    parser.add_argument("--latency", action="store_true",
                        help="print the median round trip of a sync call, no tracer")
    parser.add_argument("--cpu", action="store_true",
                        help="print CPU us per task (driver and descendants), no tracer")
    args = parser.parse_args()

    counts: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()  # Python function calls
    on = [False]

    def tracer(frame, event, arg):
        if not on[0]:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        key = (os.path.relpath(code.co_filename, ROOT) if code.co_filename.startswith(ROOT)
               else os.path.basename(code.co_filename),
               code.co_firstlineno, code.co_name, threading.current_thread().name)

        calls[key] += 1

        def local(frame, event, arg):
            if event == "opcode":
                counts[key] += 1
            return local
        return local

    import beamlet as ray
    # The zygote runs with -m, which puts its working directory first on its
    # path: from inside a checkout, the workers would import that checkout's
    # beamlet, not the one measured (PYTHONPATH).
    import tempfile
    os.chdir(tempfile.gettempdir())
    if args.cpu:
        cpu_profile(ray, args.row, args.n)
        return
    if args.latency:
        latency_profile(ray, args.row, args.n)
        return
    trace_dir = None
    if args.workers:
        # Workers fork from the zygote, a fresh interpreter: a sitecustomize on
        # its path installs the same counting there (see WORKER_TRACER).
        trace_dir = tempfile.mkdtemp(prefix="beamlet-hot-")
        with open(os.path.join(trace_dir, "sitecustomize.py"), "w") as f:
            f.write(WORKER_TRACER)
        sys.path.insert(0, trace_dir)  # (the zygote's path is the driver's)
        os.environ["BEAMLET_HOT_TRACE_DIR"] = trace_dir
    threading.settrace(tracer)  # (the node's threads start in init and inherit it)
    ray.init(num_cpus=2)
    n = args.n
    rows = make_rows(ray, n)
    workers = _signal_workers(signal.SIGUSR2) if trace_dir else []
    on[0] = True
    sys.settrace(tracer)
    rows[args.row]()
    sys.settrace(None)
    on[0] = False
    if trace_dir:
        _signal_workers(signal.SIGUSR1, workers)
        counts.clear()
        calls.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(
                [f for f in os.listdir(trace_dir) if f.endswith(".done")]) < len(workers):
            time.sleep(0.05)
        for name in os.listdir(trace_dir):
            if name.endswith(".counts"):
                with open(os.path.join(trace_dir, name)) as f:
                    for (path, line, name, thread), count in ast.literal_eval(f.read()).items():
                        path = (os.path.relpath(path, ROOT) if path.startswith(ROOT)
                                else os.path.basename(path))
                        counts[(path, line, name, thread)] += count
        shutil.rmtree(trace_dir, ignore_errors=True)
    ray.shutdown()

    by_thread: collections.Counter = collections.Counter()
    for key, count in counts.items():
        by_thread[key[3]] += count
    where = "the workers" if args.workers else "the driver"
    print(f"{args.row}: {sum(counts.values()) / n:.0f} bytecodes per task in {where} "
          f"({', '.join(f'{t}: {c / n:.0f}' for t, c in by_thread.most_common())})")
    if not args.workers:
        print(f"{sum(calls.values()) / n:.0f} Python function calls per task in the driver")
    print(f"{'per task':>9} {'calls':>6}  function [thread]")
    for key, count in counts.most_common(args.top):
        path, line, name, thread = key
        print(f"{count / n:9.1f} {calls[key] / n:6.2f}  {path}:{line} {name} [{thread}]")


if __name__ == "__main__":
    main()

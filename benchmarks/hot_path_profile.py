#!/usr/bin/env python
"""Where the driver's time goes on the hot path, counted instead of timed.

    python benchmarks/hot_path_profile.py sync        # get(f.remote()), one at a time
    python benchmarks/hot_path_profile.py tput        # 1,000 tasks, then get of the list
    python benchmarks/hot_path_profile.py actor_sync  # get(a.inc.remote()), one at a time
    python benchmarks/hot_path_profile.py actor_tput  # 1,000 calls, then get of the list

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
import collections
import os
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("row", choices=["sync", "tput", "actor_sync", "actor_tput"])
    parser.add_argument("-n", type=int, default=1000, help="tasks or calls counted")
    parser.add_argument("--top", type=int, default=40, help="functions listed")
    args = parser.parse_args()

    counts: collections.Counter = collections.Counter()
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

        def local(frame, event, arg):
            if event == "opcode":
                counts[key] += 1
            return local
        return local

    import beamlet as ray
    threading.settrace(tracer)  # (the node's threads start in init and inherit it)
    ray.init(num_cpus=2)

    @ray.remote
    def noop():
        return 1

    @ray.remote
    class Counter:
        def inc(self):
            return 1

    actor = Counter.remote()
    for _ in range(100):  # warm: workers started, functions shipped
        ray.get(noop.remote())
        ray.get(actor.inc.remote())
    n = args.n
    rows = {"sync": lambda: [ray.get(noop.remote()) for _ in range(n)],
            "tput": lambda: ray.get([noop.remote() for _ in range(n)]),
            "actor_sync": lambda: [ray.get(actor.inc.remote()) for _ in range(n)],
            "actor_tput": lambda: ray.get([actor.inc.remote() for _ in range(n)])}
    on[0] = True
    sys.settrace(tracer)
    rows[args.row]()
    sys.settrace(None)
    on[0] = False
    ray.shutdown()

    by_thread: collections.Counter = collections.Counter()
    for key, count in counts.items():
        by_thread[key[3]] += count
    print(f"{args.row}: {sum(counts.values()) / n:.0f} bytecodes per task in the driver "
          f"({', '.join(f'{t}: {c / n:.0f}' for t, c in by_thread.most_common())})")
    print(f"{'per task':>9}  function [thread]")
    for (path, line, name, thread), count in counts.most_common(args.top):
        print(f"{count / n:9.1f}  {path}:{line} {name} [{thread}]")


if __name__ == "__main__":
    main()

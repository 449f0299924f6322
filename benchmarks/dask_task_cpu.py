"""beamlet's dask backend against native Dask on one Dask cluster, per task, counted.

    python benchmarks/dask_task_cpu.py --rows sync,arg -n 1000 --rounds 4 --json out.json
    python benchmarks/dask_task_cpu.py --bytecodes --rows sync -n 300   # bytecodes per task

One driver starts beamlet's LocalCluster (``init(backend="dask", num_cpus=2)``:
the scheduler on the driver's event loop, two single-threaded worker
processes) and runs the same tasks through beamlet and through the driver's
own Dask client (``client.submit`` and ``client.gather``, as
``dask_shim.py`` does), in alternating blocks. Rows: ``sync``
(``get(f.remote())`` one at a time), ``tput`` (1,000, then one ``get``),
``arg`` (a 100 MB float64 array passed by value, ``float(a[0])`` returned),
``put`` (1,000 small ``put``s, one ``scatter`` each natively, then one task
given all their refs, so that they reach the cluster).

Default: CPU per task (user + system, psutil) of each process of the tree
(the driver, split into its caller's thread and the rest, mostly the event
loop that the client and the scheduler share, and each worker), less the
CPU the tree spends idle for the block's wall time (measured in an idle
block of ``--idle`` s between rounds): heartbeats and monitors run per second,
so without it a block that a loaded machine made slower would look dearer.
``--bytecodes``: Python bytecodes per task, counted per process, thread and
function by a tracer in the driver (all threads) and in both workers (their
event loop and task threads).

Native Dask's gather goes through the scheduler (``--native-direct``: straight
to the worker, as beamlet's client does): the default of a client of Dask's
own LocalCluster, which ``compare.py``'s native Dask rows use.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading
import time

import psutil

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=4)
p.add_argument("-n", type=int, default=1000, help="tasks per block (arg row: n // 50)")
p.add_argument("--rows", default="sync")
p.add_argument("--idle", type=float, default=3.0, help="seconds of the idle block per round")
p.add_argument("--bytecodes", action="store_true")
p.add_argument("--native-direct", action="store_true")
p.add_argument("--top", type=int, default=40)
p.add_argument("--no-periodic", action="store_true",
               help="stop the periodic callbacks (heartbeats, monitors, work stealing) of "
                    "the scheduler, the workers and the clients first: per-task work only")
p.add_argument("--json")
a = p.parse_args()

import numpy as np  # noqa: E402

import beamlet  # noqa: E402
from beamlet.core import runtime as _runtime  # noqa: E402

beamlet.init(backend="dask", num_cpus=2)
client = _runtime.current().backend.client
ARR = np.ones(100 * 1024 * 1024 // 8)


def noop():
    return 1


def first(arr):
    return float(arr[0])


bnoop = beamlet.remote(noop)
bfirst = beamlet.remote(first)
blen = beamlet.remote(len)


def native_get(fut):
    return client.gather(fut, direct=a.native_direct)


def run(row: str, fw: str, n: int) -> None:
    if row == "sync":
        if fw == "dask":
            for _ in range(n):
                assert native_get(client.submit(noop, pure=False)) == 1
        else:
            for _ in range(n):
                assert beamlet.get(bnoop.remote()) == 1
    elif row == "tput":
        for _ in range(0, n, 1000):
            if fw == "dask":
                assert sum(native_get([client.submit(noop, pure=False)
                                       for _ in range(1000)])) == 1000
            else:
                assert sum(beamlet.get([bnoop.remote() for _ in range(1000)])) == 1000
    elif row == "arg":
        for _ in range(n):
            if fw == "dask":
                assert native_get(client.submit(first, ARR, pure=False)) == 1.0
            else:
                assert beamlet.get(bfirst.remote(ARR)) == 1.0
    elif row == "put":
        for _ in range(0, n, 1000):
            if fw == "dask":
                futures = [client.scatter(i, hash=False) for i in range(1000)]
                assert native_get(client.submit(len, futures, pure=False)) == 1000
            else:
                refs = [beamlet.put(i) for i in range(1000)]
                assert beamlet.get(blen.remote(refs)) == 1000
    else:
        raise SystemExit(f"unknown row {row!r}")


def count_of(row: str) -> int:
    return max(1, a.n // 50) if row == "arg" else a.n


me = psutil.Process()
MAIN = threading.get_ident()


def snapshot() -> dict:
    """CPU seconds so far: 'caller' (this thread), 'driver-other', and one per worker pid."""
    out = {}
    native_main = threading.main_thread().native_id
    total = 0.0
    for th in me.threads():
        total += th.user_time + th.system_time
        if th.id == native_main:
            out["caller"] = th.user_time + th.system_time
    out["driver-other"] = total - out.get("caller", 0.0)
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            out[f"worker-{child.pid}"] = c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return out


def diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# -- bytecodes ------------------------------------------------------------------------
def _install_tracer():
    """(In any process.) Count bytecodes per (thread, file, function) in builtins._bc,
    in this thread and threads made later."""
    import builtins
    import collections
    import os
    import sys
    import threading
    counts = collections.Counter()
    builtins._bc = counts

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        key = (threading.current_thread().name,
               os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)

        def local(frame, event, arg):
            if event == "opcode":
                counts[key] += 1
            return local
        return local
    builtins._bc_tracer = tracer
    sys.settrace(tracer)
    threading.settrace(tracer)


def _uninstall_tracer():
    import builtins
    import sys
    import threading
    sys.settrace(None)
    threading.settrace(None)
    return dict(getattr(builtins, "_bc", {}))


def _trace_thread():
    """(A Dask task.) Trace the worker's task thread, which runs this."""
    import builtins
    import sys
    sys.settrace(builtins._bc_tracer)
    return os.getpid()


def _untrace_thread():
    import sys
    sys.settrace(None)
    return os.getpid()


def bytecodes(row: str) -> dict:
    workers = list(client.scheduler_info()["workers"])
    out = {}
    for fw in ("dask", "beamlet"):
        n = count_of(row)
        run(row, fw, 10)
        # Event loop threads: the driver's (client and scheduler) and each worker's.
        client.run(_install_tracer)
        done = threading.Event()
        client.loop.add_callback(lambda: (_install_tracer(), done.set()))
        done.wait(10)
        for w in workers:
            client.submit(_trace_thread, workers=[w], pure=False).result()
        sys.settrace(sys.modules["builtins"]._bc_tracer)
        run(row, fw, n)
        sys.settrace(None)
        for w in workers:
            client.submit(_untrace_thread, workers=[w], pure=False).result()
        got = client.run(_uninstall_tracer)
        local = {}
        done.clear()
        client.loop.add_callback(lambda: (local.update(_uninstall_tracer()), done.set()))
        done.wait(10)
        total = collections.Counter()
        per_part = collections.Counter()
        for where, counts in [("driver", local)] + [(f"worker{i}", c) for i, c in
                                                    enumerate(got.values())]:
            for (thread, file, fn), c in counts.items():
                part = f"{where}:{thread}"
                per_part[part] += c
                total[(where, thread, file, fn)] += c
        print(f"{row} {fw}: bytecodes/task {sum(total.values()) / n:.0f}")
        for part, c in sorted(per_part.items()):
            print(f"    {c / n:9.1f} {part}")
        for key, c in total.most_common(a.top):
            print(f"    {c / n:9.1f} {key}")
        out[fw] = {"per_task": sum(total.values()) / n,
                   "parts": {k: v / n for k, v in per_part.items()},
                   "counts": [[list(k), v / n] for k, v in total.most_common()]}
    return out


def _stop_periodic(dask_scheduler=None, dask_worker=None):
    """(In the scheduler or a worker.) Stop its periodic callbacks and its client's."""
    server = dask_scheduler or dask_worker
    stopped = 0
    clients = [getattr(server, "_client", None)]
    for pc in list(server.periodic_callbacks.values()):
        pc.stop()
        stopped += 1
    for c in clients:
        for pc in list(getattr(c, "_periodic_callbacks", {}).values()):
            pc.stop()
            stopped += 1
    return stopped


def stop_periodic() -> None:
    stopped = client.run_on_scheduler(_stop_periodic)
    stopped += sum(client.run(_stop_periodic).values())
    for pc in list(client._periodic_callbacks.values()):
        pc.stop()
        stopped += 1
    print(f"stopped {stopped} periodic callbacks", flush=True)


def main() -> dict:
    rows = a.rows.split(",")
    for row in rows:  # warm-up (each worker's beamlet job and client made)
        for fw in ("dask", "beamlet"):
            run(row, fw, max(1, count_of(row) // 5))
    if a.no_periodic:
        stop_periodic()
    if a.bytecodes:
        return {row: bytecodes(row) for row in rows}
    res = collections.defaultdict(list)
    for rnd in range(a.rounds):
        before, t0 = snapshot(), time.perf_counter()
        time.sleep(a.idle)
        idle = diff(snapshot(), before)
        idle_rate = sum(idle.values()) / (time.perf_counter() - t0)
        order = ("dask", "beamlet") if rnd % 2 == 0 else ("beamlet", "dask")
        for row in rows:
            n = count_of(row)
            for fw in order:
                before, t0 = snapshot(), time.perf_counter()
                run(row, fw, n)
                wall = time.perf_counter() - t0
                used = diff(snapshot(), before)
                total = sum(used.values())
                net = total - idle_rate * wall
                res[(row, fw)].append({"cpu_us": 1e6 * total / n, "net_us": 1e6 * net / n,
                                       "wall_us": 1e6 * wall / n, "idle_rate": idle_rate,
                                       "parts_us": {k: 1e6 * v / n for k, v in used.items()},
                                       "load": os.getloadavg()[0]})
                parts = " ".join(f"{k.split('-')[0] if k.startswith('w') else k}="
                                 f"{1e6 * v / n:.0f}" for k, v in sorted(used.items()))
                print(f"round {rnd} {row:4s} {fw:7s} CPU/task {1e6 * total / n:7.0f} us, "
                      f"less idle {1e6 * net / n:7.0f} (idle {1e3 * idle_rate:.0f} ms/s) "
                      f"wall {1e6 * wall / n:7.0f} [{parts}] load {os.getloadavg()[0]:.1f}",
                      flush=True)
    out = {}
    for row in rows:
        nat, bm = res[(row, "dask")], res[(row, "beamlet")]
        summary = {}
        for what in ("cpu_us", "net_us"):
            ratios = [b[what] / d[what] for b, d in zip(bm, nat)]
            summary[what] = {"dask": statistics.median(d[what] for d in nat),
                             "beamlet": statistics.median(b[what] for b in bm),
                             "ratios": ratios, "median_ratio": statistics.median(ratios)}
            print(f"{row} {what}: dask {summary[what]['dask']:.0f} us, beamlet "
                  f"{summary[what]['beamlet']:.0f} us, ratio per round "
                  f"{['%.2f' % r for r in ratios]}, median {summary[what]['median_ratio']:.2f}")
        out[row] = {"summary": summary, "dask": nat, "beamlet": bm}
    return out


try:
    result = main()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": result}, f, indent=1)
finally:
    beamlet.shutdown()

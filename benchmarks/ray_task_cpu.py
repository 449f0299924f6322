"""beamlet's ray backend against native Ray on one Ray instance, per task, counted.

    python benchmarks/ray_task_cpu.py --rows sync,tput,chain -n 2000 --rounds 4 --json out.json
    python benchmarks/ray_task_cpu.py --bytecodes          # driver bytecodes per task
    python benchmarks/ray_task_cpu.py --worker-bytecodes   # workers' bytecodes per task

One driver starts a local Ray (2 CPUs) and joins it with ``init(backend="ray")``,
then runs the same no-op tasks through both, in alternating blocks: CPU per
task of the whole process tree (driver, GCS, raylet, workers; psutil), or
Python bytecodes per task counted by a tracer in the driver (all threads) or
in the Ray workers (installed by a task in each). Rows: ``sync``
(``get(f.remote())`` one at a time), ``tput`` (1,000 then one ``get``),
``chain`` (``r = g.remote(r)``, $CHAIN long, default 200). Needs Ray in this
interpreter (``beamlet[ray]``).
"""
import argparse, collections, os, sys, threading, time, json
import psutil
p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=4)
p.add_argument("-n", type=int, default=4000)
p.add_argument("--rows", default="tput,sync")
p.add_argument("--bytecodes", action="store_true")
p.add_argument("--json")
p.add_argument("--worker-bytecodes", action="store_true")
a = p.parse_args()
import ray, beamlet, logging
import atexit, shutil, tempfile
_tmp = tempfile.mkdtemp(prefix="ray-task-cpu-")  # (Ray's session files, removed at the end)
atexit.register(shutil.rmtree, _tmp, True)
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=_tmp)
beamlet.init(backend="ray")

@ray.remote
def noop():
    return None

@beamlet.remote
def bnoop():
    return None

@ray.remote
def inc(x):
    return x + 1

@beamlet.remote
def binc(x):
    return x + 1

CH = int(os.environ.get("CHAIN", "200"))
def _end():
    """Stop both, remove Ray's session files, exit."""
    beamlet.shutdown()
    ray.shutdown()
    shutil.rmtree(_tmp, ignore_errors=True)
    sys.exit(0)


fw = {"ray": (ray, noop, inc), "beamlet": (beamlet, bnoop, binc)}

def row(name, mod, f, g, n):
    if name == "sync":
        for _ in range(n):
            mod.get(f.remote())
    elif name == "tput":
        for s in range(0, n, 1000):
            mod.get([f.remote() for _ in range(1000)])
    elif name == "chain":
        for s in range(0, n, CH):
            r = 0
            for _ in range(CH):
                r = g.remote(r)
            mod.get(r)

me = psutil.Process()
def tree():
    t = {}
    for proc in [me] + me.children(recursive=True):
        try:
            c = proc.cpu_times(); t[proc.pid] = c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return t

for k, (mod, f, g) in fw.items():  # warm-up
    for r in a.rows.split(","):
        row(r, mod, f, g, 1000)

def opcode_tracer(counts):
    """A sys.settrace function counting the bytecodes run per (file, function)."""
    import os

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        key = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)

        def local(frame, event, arg):
            if event == "opcode":
                counts[key] += 1
            return local
        return local
    return tracer


@ray.remote(num_cpus=1)
def install(pause):
    import collections, sys, os, time
    counts = collections.Counter()
    tracer = opcode_tracer(counts)
    import builtins
    builtins._hot_counts = counts
    time.sleep(pause)
    sys.settrace(tracer)
    return os.getpid()

@ray.remote(num_cpus=1)
def collect(pause):
    import sys, builtins, time, os
    sys.settrace(None)
    time.sleep(pause)
    c = getattr(builtins, "_hot_counts", None)
    builtins._hot_counts = None
    return os.getpid(), dict(c) if c else {}

if a.worker_bytecodes:
    for r in a.rows.split(","):
        for k, (mod, f, g) in fw.items():
            pids = ray.get([install.remote(1.0) for _ in range(2)])
            n = 1000
            row(r, mod, f, g, n)
            got = ray.get([collect.remote(1.0) for _ in range(2)])
            total = collections.Counter()
            for pid, c in got:
                total.update(c)
            # (the collect task's own frames, and install's return, are a constant few)
            print(f"{r} {k}: worker bytecodes/task {sum(total.values())/n:.0f} (workers {sorted(pids)} -> {sorted(p for p, _ in got)})")
            for key, c in total.most_common(20):
                print(f"    {c/n:8.1f} {key}")
    _end()

if a.bytecodes:
    for r in a.rows.split(","):
        for k, (mod, f, g) in fw.items():
            counts = collections.Counter()
            tracer = opcode_tracer(counts)
            n = 1000
            threading.settrace(tracer); sys.settrace(tracer)
            row(r, mod, f, g, n)
            sys.settrace(None); threading.settrace(None)
            print(f"{r} {k}: driver bytecodes/task {sum(counts.values())/n:.0f}")
            for key, c in counts.most_common(60):
                print(f"    {c/n:8.1f} {key}")
    _end()

res = collections.defaultdict(list)
for rnd in range(a.rounds):
    for r in a.rows.split(","):
        for k, (mod, f, g) in (fw.items() if rnd % 2 == 0 else reversed(fw.items())):
            before = tree(); t0 = time.perf_counter()
            row(r, mod, f, g, a.n)
            wall = time.perf_counter() - t0; after = tree()
            drv = after[me.pid] - before[me.pid]
            oth = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != me.pid)
            res[(r, k)].append((1e6 * (drv + oth) / a.n, 1e6 * drv / a.n))
            print(f"round {rnd} {r:5s} {k:8s} CPU/task {1e6*(drv+oth)/a.n:6.1f} us (driver {1e6*drv/a.n:5.1f}) wall {1e6*wall/a.n:6.1f} us load {os.getloadavg()[0]:.1f}", flush=True)
import statistics
out = {}
for r in a.rows.split(","):
    nat = [x[0] for x in res[(r, "ray")]]; bm = [x[0] for x in res[(r, "beamlet")]]
    ratios = [b / n for b, n in zip(bm, nat)]
    out[r] = {"ray_us": nat, "beamlet_us": bm, "ratios": ratios}
    print(f"{r}: median ray {statistics.median(nat):.1f} us, beamlet {statistics.median(bm):.1f} us, ratio per round {['%.2f' % x for x in ratios]}, median {statistics.median(ratios):.2f}")
if a.json:
    json.dump(out, open(a.json, "w"), indent=1)
_end()

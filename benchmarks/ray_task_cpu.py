"""beamlet's ray backend against native Ray on one Ray instance, per item, counted.

    python benchmarks/ray_task_cpu.py --rows all --rounds 6 --json out.json
    python benchmarks/ray_task_cpu.py --rows sync,tput,chain -n 2000 --rounds 4
    python benchmarks/ray_task_cpu.py --bytecodes          # driver bytecodes per task
    python benchmarks/ray_task_cpu.py --worker-bytecodes   # workers' bytecodes per task

One driver starts a local Ray (2 CPUs) and joins it with ``init(backend="ray")``,
then runs the same work through both, in alternating blocks (ABBA: each
round reverses the order): CPU per item of the whole process tree (driver,
GCS, raylet, workers; psutil), or Python bytecodes per task counted by a
tracer in the driver (all threads) or in the Ray workers (installed by a
task in each; for the actor rows, by a call in the actor's process). Other programs' load changes wall time much and CPU time
little; the rows of ``compare.py --on-ray`` are these workloads.

Rows (items per block: ``-n`` for the task rows, fixed for the others):
``sync`` (``get(f.remote())`` one at a time), ``tput`` (1,000 then one
``get``), ``chain`` (``r = g.remote(r)``, $CHAIN long, default 200),
``nested`` (4 tasks each submit n/4 tasks and ``get`` them; per inner task),
``actor_sync`` (``get(a.inc.remote())`` one at a time), ``actor_tput``
(1,000 calls then one ``get``), ``putget`` (1,000 puts of 100 bytes,
then a ``get`` of each; per put+get), ``put_large`` / ``get_large`` /
``arg_large`` (a 100 MB array: ``put``; ``get`` of a put one (a view);
``f.remote(arr)`` and its result; per operation). Each round first measures
the tree's idle CPU per second (Ray's daemons' timers); "less idle" is a
block's CPU less that rate times its wall time, which load stretches. The
summary is each row's median over the rounds and the median of the per-round
ratios, of the CPU, the CPU less idle, and the wall time, and the median
ratio of the rounds in which Ray started no process during either block
(a worker's start, about 1 CPU-s, lands on one side by chance; each block's
line says how many processes started and ended). Ray keeps up to
``--idle-workers`` idle worker processes (default 10), and each round warms
every row up again after its idle pause, so that few blocks pay for starting
workers Ray let go (it still ends a few after each nested burst). Needs Ray in
this interpreter (``beamlet[ray]``).
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
p.add_argument("--top", type=int, default=20, help="(--bytecodes, --worker-bytecodes) functions listed per row")
p.add_argument("--idle-workers", type=int, default=10,
               help="idle worker processes Ray keeps (its num_workers_soft_limit; 0: Ray's "
                    "default, one per CPU)")
a = p.parse_args()
import ray, beamlet, logging
import atexit, shutil, tempfile
_tmp = tempfile.mkdtemp(prefix="ray-task-cpu-")  # (Ray's session files, removed at the end)
atexit.register(shutil.rmtree, _tmp, True)
# Ray ends idle workers beyond its soft limit (by default one per CPU) after a
# second idle, and some more even within it. The nested row, whose blocked
# submitters need more processes than CPUs (16 at its peak), would start
# some again in a block: about 1 CPU-s each, falling on whichever side runs
# then (per item 1.4 or 2.0 ms, either side, by that alone). So Ray keeps more
# idle workers, and each round warms each row up again after its idle pause.
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=_tmp,
         _system_config={"num_workers_soft_limit": a.idle_workers} if a.idle_workers else None)
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


@ray.remote
def submitter(n):
    return sum(ray.get([noop2.remote() for _ in range(n)]))


@ray.remote
def noop2():
    return 1


@beamlet.remote
def bsubmitter(n):
    return sum(beamlet.get([bnoop2.remote() for _ in range(n)]))


@beamlet.remote
def bnoop2():
    return 1


@ray.remote
def first(arr):
    return float(arr[0])


@beamlet.remote
def bfirst(arr):
    return float(arr[0])


def opcode_tracer(counts):
    """A sys.settrace function counting the bytecodes run per (file, function)."""
    import os

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        # (the file with its directory: ray/actor.py and core/actor.py differ)
        key = (os.sep.join(frame.f_code.co_filename.split(os.sep)[-2:]), frame.f_code.co_name)

        def local(frame, event, arg):
            if event == "opcode":
                counts[key] += 1
            return local
        return local
    return tracer


class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n

    def trace(self, on):
        """(--worker-bytecodes) Count the bytecodes this actor's thread runs
        from now on (`on`: returns its pid), or stop and give them."""
        import builtins
        if on:
            builtins._hot_counts = collections.Counter()
            sys.settrace(opcode_tracer(builtins._hot_counts))
            return os.getpid()
        sys.settrace(None)
        counts, builtins._hot_counts = builtins._hot_counts, None
        return os.getpid(), dict(counts)


fw = {"ray": (ray, noop, inc), "beamlet": (beamlet, bnoop, binc)}
extra = {"ray": {"submitter": submitter, "first": first, "actor": ray.remote(Counter).remote()},
         "beamlet": {"submitter": bsubmitter, "first": bfirst,
                     "actor": beamlet.remote(Counter).remote()}}
#: items per block of the rows whose count is not -n
FIXED = {"putget": 2000, "put_large": 8, "get_large": 64, "arg_large": 8}
ALL_ROWS = "sync,tput,chain,nested,actor_sync,actor_tput,putget,put_large,get_large,arg_large"
_big = None


def big():
    global _big
    if _big is None:
        import numpy as np
        _big = np.ones(100_000_000 // 8, dtype=np.float64)
    return _big


def row(name, mod, f, g, n):
    kind = "ray" if mod is ray else "beamlet"
    x = extra[kind]
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
    elif name == "nested":
        assert sum(mod.get([x["submitter"].remote(n // 4) for _ in range(4)])) == n // 4 * 4
    elif name == "actor_sync":
        a = x["actor"]
        for _ in range(n):
            mod.get(a.inc.remote())
    elif name == "actor_tput":
        a = x["actor"]
        for s in range(0, n, 1000):
            out = mod.get([a.inc.remote() for _ in range(1000)])
            assert out[-1] - out[0] == 999
    elif name == "putget":
        value = b"x" * 100
        for s in range(0, n, 1000):
            refs = [mod.put(value) for _ in range(1000)]
            for r in refs:
                mod.get(r)
            del refs
    elif name == "put_large":
        arr = big()
        for _ in range(n):
            ref = mod.put(arr)
            del ref
    elif name == "get_large":
        ref = mod.put(big())
        for _ in range(n):
            out = mod.get(ref)
            del out
        del ref
    elif name == "arg_large":
        arr = big()
        for _ in range(n):
            assert mod.get(x["first"].remote(arr)) == 1.0
    else:
        raise SystemExit(f"unknown row {name!r}; rows: {ALL_ROWS}")


def count(r):
    return FIXED.get(r, a.n)


if a.rows == "all":
    a.rows = ALL_ROWS

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
        row(r, mod, f, g, min(1000, count(r)))

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
            actor = extra[k]["actor"] if r.startswith("actor") else None
            if actor is not None:  # (the actor's process, not the task workers)
                pids = [mod.get(actor.trace.remote(True))]
            else:
                pids = ray.get([install.remote(1.0) for _ in range(2)])
            n = 1000
            row(r, mod, f, g, n)
            if actor is not None:
                got = [mod.get(actor.trace.remote(False))]
            else:
                got = ray.get([collect.remote(1.0) for _ in range(2)])
            total = collections.Counter()
            for pid, c in got:
                total.update(c)
            # (the collect task's own frames, and install's return, are a constant few)
            print(f"{r} {k}: worker bytecodes/task {sum(total.values())/n:.0f} (workers {sorted(pids)} -> {sorted(p for p, _ in got)})")
            for key, c in total.most_common(a.top):
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
            for key, c in counts.most_common(a.top):
                print(f"    {c/n:8.1f} {key}")
    _end()

def idle_rate(seconds=2.0):
    """CPU seconds per second of the whole tree while nothing is asked of it
    (Ray's daemons' timers and polls): each block's share of it grows with
    its wall time, which other programs' load stretches."""
    before = tree(); t0 = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0; after = tree()
    return sum(t - before.get(pid, 0.0) for pid, t in after.items()) / wall


res = collections.defaultdict(list)
idle = []
for rnd in range(a.rounds):
    idle.append(idle_rate())
    print(f"round {rnd} idle tree CPU {1e3 * idle[-1]:.1f} ms/s", flush=True)
    for r in a.rows.split(","):
        # (Idle for a second or more, as in idle_rate, Ray ends some workers; a
        # round's first block would start them again: see ray.init above.)
        for k, (mod, f, g) in fw.items():
            row(r, mod, f, g, min(1000, count(r)))
        for k, (mod, f, g) in (fw.items() if rnd % 2 == 0 else reversed(fw.items())):
            before = tree(); t0 = time.perf_counter()
            n = count(r)
            row(r, mod, f, g, n)
            wall = time.perf_counter() - t0; after = tree()
            drv = after[me.pid] - before[me.pid]
            oth = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != me.pid)
            net = drv + oth - idle[-1] * wall
            started = len(after.keys() - before.keys())  # (Ray workers, mostly)
            ended = len(before.keys() - after.keys())  # (their CPU is not counted)
            res[(r, k)].append((1e6 * (drv + oth) / n, 1e6 * drv / n, 1e6 * net / n,
                                1e6 * wall / n, started, ended))
            print(f"round {rnd} {r:10s} {k:8s} CPU/item {1e6*(drv+oth)/n:8.1f} us (driver {1e6*drv/n:7.1f}, less idle {1e6*net/n:8.1f}) wall {1e6*wall/n:8.1f} us load {os.getloadavg()[0]:.1f} processes +{started} -{ended}", flush=True)
import statistics
med = statistics.median
out = {}
for r in a.rows.split(","):
    got = {}
    for i, what in enumerate(("us", "driver_us", "less_idle_us", "wall_us")):
        nat = [x[i] for x in res[(r, "ray")]]; bm = [x[i] for x in res[(r, "beamlet")]]
        ratios = [b / n if n > 0 else float("nan") for b, n in zip(bm, nat)]
        got[what] = {"ray": nat, "beamlet": bm, "ratios": ratios}
    for i, what in ((4, "processes_started"), (5, "processes_ended")):
        got[what] = {k: [x[i] for x in res[(r, k)]] for k in ("ray", "beamlet")}
    out[r] = dict(got, items=count(r))
    # A process Ray starts (about 1 CPU-s) falls on one side's block by chance;
    # the rounds where it started none on either side compare the two alone.
    calm = [x for x, a_, b_ in zip(got["us"]["ratios"], got["processes_started"]["ray"],
                                   got["processes_started"]["beamlet"]) if not a_ and not b_]
    out[r]["ratios_without_process_starts"] = calm
    t, li = got["us"], got["less_idle_us"]
    print(f"{r:10s}: CPU/item median ray {med(t['ray']):8.1f} us, beamlet {med(t['beamlet']):8.1f} us; median of per-round ratios {med(t['ratios']):.2f} (per round {' '.join('%.2f' % x for x in t['ratios'])}); less idle: {med(li['ratios']):.2f}; wall {med(got['wall_us']['ratios']):.2f}; rounds without process starts: {len(calm)}{', median %.2f' % med(calm) if calm else ''}")
if a.json:
    json.dump({"rows": out, "idle_cpu_per_s": idle,
               "args": dict(vars(a), json=os.path.basename(a.json)),
               "loadavg_end": os.getloadavg()}, open(a.json, "w"), indent=1)
_end()

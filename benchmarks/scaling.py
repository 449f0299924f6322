#!/usr/bin/env python
"""How the cost per task grows with the work: beamlet and Ray side by side, in one run.

    python benchmarks/scaling.py                               # every row, both frameworks
    python benchmarks/scaling.py --sizes 1000,10000 --big 0    # small sizes, no 1M row
    python benchmarks/scaling.py --only get,chain --no-ray
    python benchmarks/scaling.py --only wait_10000,actors --timeout 120

Rows (issue 6, part 1), each run with ``init(num_cpus=2)``:
- ``get_<N>``: N no-op tasks submitted, then one ``get`` of the list (``--sizes``).
- ``wait_<N>``: the same N consumed with ``wait(refs, num_returns=100)`` in a loop,
  each ready batch fetched with ``get``, until none is left.
- ``big``: ``--big`` (1,000,000) no-op tasks queued, then one ``get``; Ray's row is
  capped at 10 minutes (``timeout`` past it).
- ``chain``: ``r = inc.remote(r)`` 10,000 times, then ``get``.
- ``refs``: one task given a list of 10,000 refs (of finished tasks) that ``get``s them
  inside.
- ``puts``: 10,000 ``put``s, then one ``get`` of all.
- ``actors``: 1,000 actors with ``num_cpus=0``, each answering 10 calls (one round of
  one call each, ``get``; then the other 9 rounds, ``get``).

Each row runs in a fresh child process per framework (beamlet with this interpreter,
the checkout's beamlet first on its path; Ray with the venv's interpreter,
``--ray-python``), with core_bench's machinery: the child is a subreaper, tells its
phase, and past its timeout its whole process tree is frozen and killed and the row
says ``timeout``; whatever it leaves after ``shutdown()`` is reported and killed. A
thread here samples RSS and PSS of the child and all its descendants from ``/proc``
while the row runs; the child holds its results until a sample has been taken after
the timed part. The driver's peak RSS is its ``VmHWM``.

Prints a detail table and a comparison table (beamlet/Ray items/s, ahead?), the
per-task time at the largest ``--sizes`` relative to the smallest (target <= 1.5x at
100k vs 1k) and the driver memory per queued task of the ``big`` row, and writes
``benchmarks/results/scaling-<date>.json``, ``scaling-latest.json`` and
``scaling-latest.md``.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import core_bench as cb  # noqa: E402

RAY_BIG_CAP = 600.0       # Ray's 1M row counts if it ends within 10 minutes (issue 6)
SCALING_TARGET = 1.5      # per-task time at 100k within 1.5x of that at 1k (issue 6)
WAIT_BATCH = 100
KINDS = ("get", "wait", "big", "chain", "refs", "puts", "actors")
# Seconds for the phases around the timed one (the timed one gets --timeout).
PHASE_LIMITS = {"import": 120.0, "init": 180.0, "warm-up": 120.0, "hold": 60.0,
                "shutdown": 180.0, "after shutdown": 60.0}
SAMPLE_MIN_INTERVAL = 0.25  # seconds between memory samples (at least 4x a sample's cost)
# A row is stopped when the machine's available memory falls below this share of its RAM
# (1,000 Ray actors would need far more than a small machine has; the OOM killer could
# hit anything on it, including other people's processes).
MIN_AVAILABLE_SHARE = 0.10


# --------------------------------------------------------------------------- rows
class Spec:
    """One row: ``kind`` (one of KINDS) at size ``n``; ``label`` and ``unit`` for the
    tables; ``items`` the count that rates and per-item times divide by."""

    def __init__(self, kind, n, calls=None):
        self.kind, self.n, self.calls = kind, n, calls
        self.id = f"{kind}_{n}" if kind in ("get", "wait") else kind
        self.items = n * calls if kind == "actors" else n
        self.label, self.unit = {
            "get": (f"{n:,} no-op tasks, then get(list)", "tasks/s"),
            "wait": (f"{n:,} no-op tasks, wait(num_returns={WAIT_BATCH}) loop", "tasks/s"),
            "big": (f"{n:,} no-op tasks queued, then get(list)", "tasks/s"),
            "chain": (f"chain of {n:,} (r = inc.remote(r))", "tasks/s"),
            "refs": (f"1 task getting a list of {n:,} refs", "refs/s"),
            "puts": (f"{n:,} puts, then get(list)", "objects/s"),
            "actors": (f"{n:,} actors (num_cpus=0) x {calls} calls", "calls/s"),
        }[kind]

    def to_json(self):
        return {"kind": self.kind, "n": self.n, "calls": self.calls, "items": self.items,
                "label": self.label, "unit": self.unit}


def row_specs(args):
    specs = [Spec("get", n) for n in args.sizes] + [Spec("wait", n) for n in args.sizes]
    if args.big:
        specs.append(Spec("big", args.big))
    specs += [Spec("chain", args.chain), Spec("refs", args.refs), Spec("puts", args.puts),
              Spec("actors", args.actors, args.actor_calls)]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        known = set(KINDS) | {s.id for s in specs}
        unknown = sorted(wanted - known)
        if unknown:
            sys.exit(f"--only: unknown row(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(KINDS)} or a row id such as {specs[0].id}")
        specs = [s for s in specs if s.kind in wanted or s.id in wanted]
    return specs


# --------------------------------------------------------------------------- workloads (in the child)
# Each takes (ray, fns, spec) and returns (info, keep): info has "wall_s" (the timed part)
# and any extra figures; keep holds the results alive until memory has been sampled.

def define_remotes(ray):
    class Fns:
        pass

    @ray.remote
    def noop():
        return 1

    @ray.remote
    def ident(i):
        return i

    @ray.remote
    def inc(x):
        return x + 1

    @ray.remote
    def consume(refs):
        return sum(ray.get(refs))

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, i):
            return i

    fns = Fns()
    fns.noop, fns.ident, fns.inc, fns.consume, fns.Echo = noop, ident, inc, consume, Echo
    return fns


def warm_up(ray, fns):
    """Starts the workers and exports every function used by the timed parts."""
    ray.get([fns.noop.remote() for _ in range(100)])
    assert ray.get(fns.inc.remote(fns.ident.remote(1))) == 2
    assert ray.get(fns.consume.remote([fns.ident.remote(i) for i in range(10)])) == 45
    ray.get(ray.put(0))


def w_get(ray, fns, spec):
    n = spec.n
    t0 = time.perf_counter()
    refs = [fns.noop.remote() for _ in range(n)]
    t1 = time.perf_counter()
    out = ray.get(refs)
    t2 = time.perf_counter()
    assert len(out) == n and sum(out) == n, "wrong results"
    return {"wall_s": t2 - t0, "submit_s": t1 - t0}, (refs, out)


def w_wait(ray, fns, spec):
    n = spec.n
    t0 = time.perf_counter()
    refs = [fns.noop.remote() for _ in range(n)]
    t1 = time.perf_counter()
    pending, total, seen, calls = refs, 0, 0, 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(WAIT_BATCH, len(pending)))
        total += sum(ray.get(ready))
        seen += len(ready)
        calls += 1
    t2 = time.perf_counter()
    assert seen == n and total == n, f"wait returned {seen} refs for {n}"
    return {"wall_s": t2 - t0, "submit_s": t1 - t0, "wait_calls": calls}, refs


def w_chain(ray, fns, spec):
    t0 = time.perf_counter()
    r = fns.inc.remote(0)
    for _ in range(spec.n - 1):
        r = fns.inc.remote(r)
    t1 = time.perf_counter()
    out = ray.get(r)
    t2 = time.perf_counter()
    assert out == spec.n, out
    return {"wall_s": t2 - t0, "submit_s": t1 - t0}, r


def w_refs(ray, fns, spec):
    n = spec.n
    refs = [fns.ident.remote(i) for i in range(n)]
    ray.get(refs)                       # untimed: the refs are of finished tasks
    t0 = time.perf_counter()
    out = ray.get(fns.consume.remote(refs))
    t1 = time.perf_counter()
    assert out == n * (n - 1) // 2, out
    return {"wall_s": t1 - t0, "note": "refs made by finished tasks (untimed)"}, refs


def w_puts(ray, fns, spec):
    n = spec.n
    t0 = time.perf_counter()
    refs = [ray.put(i) for i in range(n)]
    t1 = time.perf_counter()
    out = ray.get(refs)
    t2 = time.perf_counter()
    assert out == list(range(n)), "wrong values"
    return {"wall_s": t2 - t0, "put_s": t1 - t0}, (refs, out)


def w_actors(ray, fns, spec):
    n, calls = spec.n, spec.calls
    t0 = time.perf_counter()
    actors = [fns.Echo.remote() for _ in range(n)]
    first = ray.get([a.echo.remote(i) for i, a in enumerate(actors)])
    t1 = time.perf_counter()
    rest = ray.get([a.echo.remote(i) for i, a in enumerate(actors) for _ in range(calls - 1)])
    t2 = time.perf_counter()
    assert first == list(range(n)) and sum(rest) == (calls - 1) * n * (n - 1) // 2
    return {"wall_s": t2 - t0, "first_round_s": t1 - t0,
            "note": "first round includes starting the actors"}, actors


WORKLOADS = {"get": w_get, "big": w_get, "wait": w_wait, "chain": w_chain, "refs": w_refs,
             "puts": w_puts, "actors": w_actors}


def _vm_kb(key):
    """VmRSS / VmHWM of this process, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child_main(args):
    """One row in a fresh process: import, init, warm-up, the timed part, hold until the
    orchestrator has sampled memory, shutdown; the result goes to cb.report_result."""
    cb.set_child_subreaper()
    spec = Spec(args.kind, args.n, args.actor_calls)
    cb.report_phase("import")
    ray = cb.load_module(args.module)
    cb.report_phase("init")
    ray.init(**json.loads(args.init))
    cb.report_phase("warm-up")
    fns = define_remotes(ray)
    warm_up(ray, fns)
    gc.collect()
    rss0 = _vm_kb("VmRSS")
    # Stacks of every thread shortly before the orchestrator would kill us.
    faulthandler.dump_traceback_later(max(1.0, args.workload_timeout - 3), exit=False)
    cb.report_phase("workload")
    t_start = time.time()
    try:
        info, keep = WORKLOADS[spec.kind](ray, fns, spec)
    except Exception as e:   # noqa: BLE001 - the row fails; shut down cleanly all the same
        traceback.print_exc()
        shutdown_s, left = cb.shutdown_checked(ray)
        cb.report_result({"error": f"{type(e).__name__}: {e}"[:300],
                          "leftover_after_shutdown": [f"{p} {c}" for p, c in left]})
        return
    t_end = time.time()
    faulthandler.cancel_dump_traceback_later()
    hwm = _vm_kb("VmHWM")
    cb.report_phase("hold")
    deadline = time.monotonic() + PHASE_LIMITS["hold"] / 2
    while not os.path.exists(args.ack) and time.monotonic() < deadline:
        time.sleep(0.01)
    me = os.getpid()
    pids = [me] + cb.descendants(me)
    shm, markers = cb.shm_refs(pids), cb.session_markers(pids[1:])
    del keep
    shutdown_s, left = cb.shutdown_checked(ray)
    cb.report_result({
        **info, "version": cb._version_of(ray), "module_file": getattr(ray, "__file__", None),
        "t_start": t_start, "t_end": t_end, "driver_rss_before_mb": rss0 / 1024,
        "driver_peak_rss_mb": hwm / 1024, "shutdown_s": shutdown_s,
        "leftover_after_shutdown": [f"{p} {c}" for p, c in left],
        "shm_refs": sorted(shm), "markers": sorted(markers)})


# --------------------------------------------------------------------------- memory sampling (here)
def _meminfo_mb(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


class MemorySampler:
    """Samples RSS and PSS of a child process and all its descendants from /proc, in a
    thread, from the child's start until ``stop()``: at most every SAMPLE_MIN_INTERVAL
    seconds and at least 4x a sample's own cost apart (a thousand processes take a
    while to read). When the child enters its ``hold`` phase, one more sample is taken
    at once and then ``ack_path`` is created, which lets the child go on. It also
    collects the session markers (core_bench.session_markers) of the child's
    descendants, so that /dev/shm entries of a child killed on timeout are known as ours.
    When the machine's available memory falls below ``min_available_mb``, it kills the
    child's whole tree and sets ``out_of_memory``."""

    def __init__(self, ack_path, min_available_mb):
        self.ack_path, self.pid, self.min_available_mb = ack_path, None, min_available_mb
        self.out_of_memory = None     # (available MB, our total RSS MB) when it stopped the child
        self.markers, self._seen = set(), set()
        self.samples = []             # (start, end, driver_rss_mb, rss_mb, pss_mb, nprocs)
        self.hold_since = self.acked_at = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def on_phase(self, phase, pid):
        if phase == "start-up":
            self.pid = pid
            self._thread.start()
        elif phase == "hold":
            self.hold_since = time.time()
            self._wake.set()

    def _run(self):
        while not self._stop.is_set():
            t0 = time.time()
            pids = [self.pid] + cb.descendants(self.pid)
            new = [p for p in pids[1:] if p not in self._seen]
            self._seen.update(new)
            self.markers |= cb.session_markers(new)
            _, _, procs = cb.memory_of(pids)
            t1 = time.time()
            if procs:
                driver = next((p["rss_mb"] for p in procs if p["pid"] == self.pid), 0.0)
                self.samples.append((t0, t1, driver, sum(p["rss_mb"] for p in procs),
                                     sum(p["pss_mb"] for p in procs), len(procs)))
                available = _meminfo_mb("MemAvailable")
                if available < self.min_available_mb and self.out_of_memory is None:
                    self.out_of_memory = (available, self.samples[-1][3])
                    cb.kill_tree(self.pid)
                    return
            if self.hold_since is not None and self.acked_at is None and t0 >= self.hold_since:
                with open(self.ack_path, "w"):
                    pass
                self.acked_at = t1
            self._wake.wait(max(SAMPLE_MIN_INTERVAL, 4 * (t1 - t0)))
            self._wake.clear()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def peaks(self, t_start, t_end):
        """Peaks over the samples taken from ``t_start`` up to the one after ``t_end``
        that released the child (or up to ``t_end`` when there was none)."""
        end = self.acked_at if self.acked_at is not None else t_end
        window = [s for s in self.samples if s[0] >= t_start and s[1] <= end]
        if not window:
            return {"memory_samples": 0}
        return {"memory_samples": len(window),
                "driver_peak_rss_sampled_mb": max(s[2] for s in window),
                "total_peak_rss_mb": max(s[3] for s in window),
                "total_peak_pss_mb": max(s[4] for s in window),
                "peak_procs": max(s[5] for s in window)}


# --------------------------------------------------------------------------- orchestration
def run_row(spec, fw, python, args, log):
    """One row of one framework in a fresh child; returns its result dict."""
    cap = args.timeout
    if fw == "ray" and spec.kind == "big":
        cap = min(cap, RAY_BIG_CAP)
    tmp = tempfile.mkdtemp(prefix="scaling_")
    ack = os.path.join(tmp, "ack")
    cmd = [python, os.path.abspath(__file__), "--_child", "--module", fw, "--init", args.init,
           "--kind", spec.kind, "--n", str(spec.n), "--actor-calls", str(args.actor_calls),
           "--ack", ack, "--workload-timeout", str(cap)]
    env = dict(os.environ)
    if fw == "beamlet":      # measure this checkout's beamlet, not an installed one
        env["PYTHONPATH"] = os.pathsep.join(
            [cb.REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    sampler = MemorySampler(ack, MIN_AVAILABLE_SHARE * _meminfo_mb("MemTotal"))
    load = cb.ForeignLoad()
    t = time.perf_counter()
    try:
        res, err = cb.run_subprocess(cmd, cap + sum(PHASE_LIMITS.values()), log,
                                     phase_timeouts=dict(PHASE_LIMITS, workload=cap),
                                     on_phase=sampler.on_phase, env=env,
                                     what=f"{fw} {spec.id}")
    finally:
        sampler.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    markers = sorted(sampler.markers | set((res or {}).get("markers", ())))
    other = load.result()["other_cpu_share"]
    left = cb.kill_lingering(log, f"  {fw} {spec.id}")
    if sampler.out_of_memory:
        available, ours = sampler.out_of_memory
        res, err = None, f"out of memory (> {ours / 1024:.1f} GB RSS)"
        log(f"  {fw} {spec.id}: stopped: {ours / 1024:.1f} GB RSS in "
            f"{sampler.samples[-1][5]} processes, {available / 1024:.1f} GB left on the machine")
    if res is not None and "error" in res:
        log(f"  {fw} {spec.id}: error: {res['error']}")
        res, err = None, f"error: {res['error']}"
    if res is None:
        status = err
        if err.startswith("timeout (in workload)"):
            status = f"timeout (> {cap:.0f} s)"
        return {"status": status, "cap_s": cap, "other_cpu_share": other,
                "child_s": time.perf_counter() - t, "markers": markers}
    res.update(sampler.peaks(res["t_start"], res["t_end"]))
    res.update(status="ok", cap_s=cap, other_cpu_share=other, child_s=time.perf_counter() - t,
               rate=spec.items / res["wall_s"], per_item_us=res["wall_s"] / spec.items * 1e6,
               driver_bytes_per_item=max(0.0, res["driver_peak_rss_mb"]
                                         - res["driver_rss_before_mb"]) * 2**20 / spec.items,
               leftover_processes=[f"{p} {c}" for p, c in left], markers=markers)
    return res


def fmt(v, digits=3):
    return "-" if v is None else cb.fmt_value(v) if abs(v) >= 1 else f"{v:.{digits}g}"


def status_cell(r):
    return (r["status"] if r["status"].startswith(("timeout", "out of memory"))
            else r["status"].split(":")[0])


def detail_table(specs, results, frameworks):
    header = ["row", "framework", "items/s", "wall s", "us/item", "driver peak RSS MB",
              "all procs peak RSS / PSS MB (procs)"]
    lines = []
    for spec in specs:
        for fw in frameworks:
            r = results[spec.id].get(fw)
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append([spec.label, fw, status_cell(r), "", "", "", ""])
                continue
            total = (f"{fmt(r.get('total_peak_rss_mb'))} / {fmt(r.get('total_peak_pss_mb'))} "
                     f"({r.get('peak_procs', '?')})" if r.get("memory_samples") else "-")
            lines.append([spec.label, fw, f"{fmt(r['rate'])} {spec.unit}", fmt(r["wall_s"]),
                          fmt(r["per_item_us"]), fmt(r["driver_peak_rss_mb"]), total])
    return header, lines


def ratio_of(spec_id, results):
    """beamlet items/s over Ray items/s for one row, or None."""
    b, r = results[spec_id].get("beamlet"), results[spec_id].get("ray")
    if not (b and r and b["status"] == "ok" and r["status"] == "ok"):
        return None
    return b["rate"] / r["rate"]


def beamlet_outlasted_ray(b, r):
    """beamlet finished a row on which Ray ran out of time or memory."""
    return bool(b and r and b["status"] == "ok"
                and r["status"].startswith(("timeout", "out of memory")))


def comparison_table(specs, results):
    header = ["row", "beamlet", "ray", "beamlet/ray (items/s)", "beamlet ahead?"]
    lines = []
    for spec in specs:
        cells = []
        for fw in ("beamlet", "ray"):
            r = results[spec.id].get(fw)
            cells.append("-" if r is None else status_cell(r) if r["status"] != "ok"
                         else f"{fmt(r['rate'])} {spec.unit}")
        ratio = ratio_of(spec.id, results)
        b, r = results[spec.id].get("beamlet"), results[spec.id].get("ray")
        if ratio is not None:
            ahead = "yes" if ratio > 1 else "NO"
        elif beamlet_outlasted_ray(b, r):
            ahead = f"yes (Ray {status_cell(r).split(' (')[0]})"
        elif b and b["status"] != "ok":
            ahead = "NO"
        else:
            ahead = "-"
        lines.append([spec.label, *cells, "-" if ratio is None else f"{ratio:.3g}x", ahead])
    return header, lines


def summary(specs, results, frameworks):
    """The issue's figures: per-task time at the largest size over the smallest, for the
    get and wait rows; driver bytes per queued task of the big row; rows ahead."""
    out = {"scaling": {}, "big_driver_bytes_per_task": {}, "rows_ahead": None}
    for kind in ("get", "wait"):
        rows = sorted((s for s in specs if s.kind == kind), key=lambda s: s.n)
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        for fw in frameworks:
            a, b = results[lo.id].get(fw), results[hi.id].get(fw)
            if a and b and a["status"] == "ok" and b["status"] == "ok":
                f = b["per_item_us"] / a["per_item_us"]
                out["scaling"][f"{fw} {kind}"] = {
                    "small": lo.n, "large": hi.n, "factor": f,
                    "target": SCALING_TARGET if (lo.n, hi.n) == (1000, 100000) else None,
                    "met": f <= SCALING_TARGET}
            else:
                out["scaling"][f"{fw} {kind}"] = {"small": lo.n, "large": hi.n, "factor": None}
    for spec in specs:
        if spec.kind == "big":
            for fw in frameworks:
                r = results[spec.id].get(fw)
                out["big_driver_bytes_per_task"][fw] = (
                    {"n": spec.n, "bytes": r["driver_bytes_per_item"],
                     "driver_peak_rss_mb": r["driver_peak_rss_mb"],
                     "driver_rss_before_mb": r["driver_rss_before_mb"]}
                    if r and r["status"] == "ok" else {"n": spec.n, "status": r and r["status"]})
    if "ray" in frameworks:
        compared = [s for s in specs if "beamlet" in results[s.id] and "ray" in results[s.id]]
        ahead = [s.id for s in compared if (ratio_of(s.id, results) or 0) > 1
                 or beamlet_outlasted_ray(results[s.id]["beamlet"], results[s.id]["ray"])]
        out["rows_ahead"] = {"ahead": len(ahead), "of": len(compared),
                             "behind_or_failed": [s.id for s in compared if s.id not in ahead]}
    return out


def summary_lines(summ):
    lines = []
    for key, s in summ["scaling"].items():
        if s.get("factor") is None:
            lines.append(f"per-task time, {key}: {s['large']:,} vs {s['small']:,}: - "
                         f"(a row failed)")
            continue
        target = (f" (target <= {s['target']}x: {'met' if s['met'] else 'NOT met'})"
                  if s.get("target") and key.startswith("beamlet") else "")
        lines.append(f"per-task time, {key}: {s['large']:,} vs {s['small']:,}: "
                     f"{s['factor']:.2f}x{target}")
    for fw, b in summ["big_driver_bytes_per_task"].items():
        if "bytes" in b:
            lines.append(f"driver memory per queued task, {fw}, {b['n']:,} tasks: "
                         f"{b['bytes']:,.0f} bytes (driver RSS {b['driver_rss_before_mb']:,.0f}"
                         f" -> peak {b['driver_peak_rss_mb']:,.0f} MB)")
        else:
            lines.append(f"driver memory per queued task, {fw}, {b['n']:,} tasks: - "
                         f"({b.get('status')})")
    if summ["rows_ahead"]:
        a = summ["rows_ahead"]
        lines.append(f"beamlet ahead of Ray on {a['ahead']} of {a['of']} rows"
                     + (f"; not on: {', '.join(a['behind_or_failed'])}"
                        if a["behind_or_failed"] else ""))
    return lines


def parse_sizes(text):
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers, got {text!r}")
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"--sizes takes positive integers, got {text!r}")
    return sorted(set(sizes))


def nonneg_int(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1000,10000,100000"),
                   help="N for the get and wait rows (default 1000,10000,100000)")
    p.add_argument("--big", type=nonneg_int, default=1_000_000,
                   help="tasks of the big-queue row (default %(default)s; 0 skips it)")
    p.add_argument("--chain", type=int, default=10_000, help="chain length (%(default)s)")
    p.add_argument("--refs", type=int, default=10_000,
                   help="refs passed in one list (%(default)s)")
    p.add_argument("--puts", type=int, default=10_000, help="puts (%(default)s)")
    p.add_argument("--actors", type=int, default=1000, help="actors (%(default)s)")
    p.add_argument("--actor-calls", type=int, default=10,
                   help="calls each actor answers (%(default)s)")
    p.add_argument("--only", help="comma-separated kinds (" + ", ".join(KINDS)
                   + ") or row ids (get_1000, wait_10000, ...)")
    p.add_argument("--no-ray", action="store_true", help="beamlet only")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for the timed part of each row (default %(default)s; "
                        f"Ray's big row at most {RAY_BIG_CAP:.0f})")
    p.add_argument("--ray-python", default=cb.default_ray_python(),
                   help=f"interpreter of the venv with ray==2.60.0 (default: "
                        f"${cb.RAY_PYTHON_ENV}, else {cb.RAY_VENV_HINT})")
    p.add_argument("--init", default='{"num_cpus": 2}',
                   help="init() keyword arguments as JSON, for both (default %(default)s)")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each child, wait up to this many seconds for other programs "
                        "to use < 15%% of the CPUs (0: don't wait; default %(default)s)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--module", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ack", help=argparse.SUPPRESS)
    p.add_argument("--workload-timeout", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("chain", "refs", "puts", "actors", "actor_calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        json.loads(args.init)
    except ValueError as e:
        p.error(f"--init is not JSON: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        return child_main(args)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if not args.no_ray and not os.path.exists(args.ray_python):
        sys.exit(cb.missing_ray_python(args.ray_python))
    cb.set_child_subreaper()
    specs = row_specs(args)
    pythons = {"beamlet": sys.executable}
    if not args.no_ray:
        pythons["ray"] = args.ray_python
    frameworks = list(pythons)
    shm_before = cb.shm_entries()
    shm_seen, markers_seen = set(), set()
    results = {s.id: {} for s in specs}
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        # alternate which framework goes first, so a drift in the machine's load is shared
        for fw in (frameworks if i % 2 == 0 else frameworks[::-1]):
            if args.wait_idle > 0:
                cb.wait_for_quiet(args.wait_idle, log)
            log(f"[{fw}] {spec.id}: {spec.label}")
            r = run_row(spec, fw, pythons[fw], args, log)
            results[spec.id][fw] = r
            shm_seen.update(r.pop("shm_refs", ()))
            markers_seen.update(r.pop("markers", ()))
            if r["status"] == "ok":
                log(f"  {fmt(r['rate'])} {spec.unit}, {r['wall_s']:.2f} s, "
                    f"{r['per_item_us']:.0f} us/item, driver peak {r['driver_peak_rss_mb']:.0f}"
                    f" MB, all {fmt(r.get('total_peak_rss_mb'))} MB RSS / "
                    f"{fmt(r.get('total_peak_pss_mb'))} MB PSS in {r.get('peak_procs', '?')} "
                    f"processes ({r.get('memory_samples', 0)} samples)")
            else:
                log(f"  {r['status']}")
    leftover_shm, other_shm = cb.split_shm_leftovers(cb.shm_entries() - shm_before, shm_seen,
                                                     markers_seen)
    versions = {fw: next((results[s.id][fw].get("version") for s in specs
                          if results[s.id].get(fw, {}).get("version")), None)
                for fw in frameworks}
    machine = dict(cb.machine_info(), **cb.git_info(), beamlet=versions.get("beamlet"),
                   ray=versions.get("ray"))
    summ = summary(specs, results, frameworks)
    notes = []
    for spec in specs:
        for fw in frameworks:
            r = results[spec.id].get(fw, {})
            share = r.get("other_cpu_share", 0)
            if share > 0.05:
                # (short rows over-count: a reaped child's whole CPU time lands at once)
                notes.append(f"{fw} {spec.id}: other programs used "
                             f"{'all' if share >= 1 else format(share, '.0%')} of the "
                             f"machine's CPU meanwhile; its figures are skewed")
            if r.get("leftover_after_shutdown") or r.get("leftover_processes"):
                notes.append(f"{fw} {spec.id}: processes alive after shutdown(): "
                             f"{(r.get('leftover_after_shutdown') or r['leftover_processes'])[:3]}")
    if leftover_shm:
        notes.append(f"/dev/shm entries left behind: {leftover_shm[:5]}")
    if other_shm:
        notes.append(f"new /dev/shm entries of other programs (not ours): {other_shm[:3]}")

    title = (f"Scaling: beamlet {versions.get('beamlet') or ''}".rstrip()
             + (f" vs Ray {versions.get('ray') or ''}".rstrip() if "ray" in frameworks else "")
             + f", init({', '.join(f'{k}={v}' for k, v in json.loads(args.init).items())}), "
               f"one fresh process per row and framework")
    mline = (f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
             f"{machine.get('memory_gb')} GB RAM; Python {machine.get('python')}; "
             f"commit {machine.get('commit')}"
             + (" (beamlet/ modified)" if machine.get("beamlet_dirty") else ""))
    dh, dl = detail_table(specs, results, frameworks)
    ch, cl = comparison_table(specs, results)
    slines = summary_lines(summ)
    print(f"\n{title}\n{mline}\n\n{cb.format_text(dh, dl)}")
    if "ray" in frameworks:
        print(f"\n{cb.format_text(ch, cl)}")
    if slines:
        print("\n" + "\n".join(slines))
    if notes:
        print("\nNotes:\n" + "\n".join("  " + n for n in notes))
    total_s = time.perf_counter() - t0
    print(f"\n(total {total_s:.0f} s)")

    os.makedirs(args.out_dir, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "title": title, "machine": machine,
              "args": {k: v for k, v in vars(args).items() if not k.startswith("_")
                       and k not in ("module", "kind", "n", "ack", "workload_timeout")},
              "pythons": pythons, "rows": {s.id: {**s.to_json(), **results[s.id],
                                                  "beamlet_over_ray": ratio_of(s.id, results)}
                                           for s in specs},
              "summary": summ, "notes": notes, "leftover_shm": leftover_shm,
              "wall_s": total_s}
    path = os.path.join(args.out_dir, f"scaling-{stamp}.json")
    for target in (path, os.path.join(args.out_dir, "scaling-latest.json")):
        with open(target, "w") as f:
            json.dump(cb.portable(report), f, indent=1, default=str)
    with open(os.path.join(args.out_dir, "scaling-latest.md"), "w") as f:
        f.write(f"{title}\n\n{mline}\n\n{cb.format_markdown(dh, dl)}\n")
        if "ray" in frameworks:
            f.write(f"\n{cb.format_markdown(ch, cl)}\n")
        if slines:
            f.write("\n" + "\n".join(f"- {s}" for s in slines) + "\n")
        if notes:
            f.write("\nNotes:\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    log(f"wrote {path}, scaling-latest.json and scaling-latest.md")
    return report


if __name__ == "__main__":
    main()

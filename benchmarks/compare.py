#!/usr/bin/env python
"""beamlet against Ray 2.60 (and Dask) on this machine, in one run.

    python benchmarks/compare.py
    python benchmarks/compare.py --beamlet-init '{"backend": "inprocess"}' --rounds 1
    python benchmarks/compare.py --only task_sync,chain --no-dask
    python benchmarks/compare.py --on-dask --no-ray   # beamlet's dask backend vs Dask
    python benchmarks/compare.py --on-ray --no-dask   # beamlet's ray backend vs Ray

Runs ``core_bench.py`` for beamlet (with this interpreter) and for Ray (with the
interpreter of a separate venv, ``--ray-python``; Ray and Dask are never
dependencies of the project), alternately over ``--rounds`` rounds, each run in
its own subprocess; Dask (``benchmarks/dask_shim.py``, also from the Ray venv)
runs in the first ``--dask-rounds`` rounds. Samples from all rounds are pooled
and the median reported. Prints
``workload | beamlet | ray | dask | beamlet/ray | target | met?`` (the targets
are the floors of issue 3) and writes ``benchmarks/results/compare-<date>.json``,
``latest.json`` and ``latest.md`` (the table in Markdown, with the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import core_bench as cb  # noqa: E402

# The floors of issue 3, as beamlet/Ray ratios of each row's value in its unit.
TARGETS = {
    "cold_start": ("<=", 0.1, "≤0.1x (10x sooner)"),
    "idle_memory": ("<=", 0.25, "≤0.25x"),
    "task_sync": ("<=", 0.5, "≤0.5x"),
    "task_async": (">=", 1.5, "≥1.5x"),
    "task_nested": (">=", 1.5, "≥1.5x"),
    "actor_sync": ("<=", 0.5, "≤0.5x"),
    "actor_async": (">=", 1.5, "≥1.5x"),
    "put_small": (">=", 1.5, "≥1.5x"),
    "get_small": (">=", 1.0, "≥1.0x"),
    "put_large": (">=", 1.0, "≥1.0x"),
    "get_large": ("zero-copy", None, "zero-copy"),
    "arg_large": (">=", 1.0, "≥1.0x"),
    "chain": ("<=", 0.5, "≤0.5x"),
    "param_server": (">=", 1.5, "≥1.5x"),
}

# Ray 2.60's medians as stated in issue 3 (same machine type, num_cpus=2).
ISSUE_RAY = {
    "cold_start": 5.0, "idle_memory": 847, "task_sync": 3.0, "task_async": 1073,
    "task_nested": 858, "actor_sync": 1.0, "actor_async": 2008, "put_small": 1352,
    "get_small": 6359, "put_large": 7.5, "get_large": "zero-copy", "arg_large": 3.7,
    "chain": 2.9, "param_server": 118,
}


def run_core_bench(label, python, module, init, args, log):
    """One core_bench run in its own subprocess; returns its JSON report (or None)."""
    fd, out = tempfile.mkstemp(prefix=f"compare_{module}_", suffix=".json")
    os.close(fd)
    cmd = [python, os.path.join(HERE, "core_bench.py"), "--module", module, "--init", init,
           "--json", out, "--repeat", str(args.repeat), "--cold-repeat", str(args.cold_repeat)]
    if args.only:
        cmd += ["--only", args.only]
    if args.timeout:
        cmd += ["--timeout", str(args.timeout)]
    if args.params:
        cmd += ["--params", args.params]
    log(f"\n=== {label}: {' '.join(cmd[:1] + [os.path.basename(cmd[1])] + cmd[2:])}")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, stdin=subprocess.DEVNULL)
    try:
        proc.wait(args.run_timeout)
    except subprocess.TimeoutExpired:
        killed = cb.kill_tree(proc.pid)
        proc.wait()
        log(f"=== {label}: whole run timed out after {args.run_timeout:.0f} s; "
            f"killed {len(killed)} processes")
    except BaseException:           # Ctrl-C: leave nothing behind
        cb.kill_tree(proc.pid)
        proc.wait()
        raise
    cb.reap_orphans()
    cb.kill_lingering(log, f"=== {label}")
    try:
        with open(out) as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = None
    finally:
        os.unlink(out)
    log(f"=== {label}: {time.perf_counter() - t:.0f} s, rc {proc.returncode}")
    return report


def merge(reports):
    """Pools the samples of several runs of one framework; median over all of them."""
    merged = {}
    for rep in reports:
        if rep is None:
            continue
        for row, r in rep["results"].items():
            m = merged.setdefault(row, {"samples": [], "runs": 0, "failed_runs": []})
            m["runs"] += 1
            if r.get("status", "ok") != "ok":
                m["failed_runs"].append(r["status"])
                continue
            m["samples"].extend(r["samples"])
            m["big_mb"] = rep["params"]["big_mb"]
            for k, v in r.items():
                if k in ("samples", "value", "status"):
                    continue
                if k == "workload_cpu_s":
                    m.setdefault("workload_cpu_s_runs", []).append(v)
                    m[k] = cb._median(m["workload_cpu_s_runs"])
                    continue
                if k in ("zero_copy", "read_only", "view", "updates_correct"):
                    m[k] = m.get(k, True) and v
                elif k == "leftover_after_shutdown":
                    m[k] = m.get(k, []) + v
                else:
                    m[k] = v
    for row, m in merged.items():
        if m["samples"]:
            m["status"] = "ok"
            m["value"] = cb._median(m["samples"])
            if row == "get_large":
                m["gbps"] = m["big_mb"] / 1e3 / (m["value"] / 1e3)
        else:
            m["status"] = m["failed_runs"][0] if m["failed_runs"] else "error"
    return merged


def ratio_and_verdict(row, b, r):
    ok = lambda x: x is not None and x.get("status") == "ok"  # noqa: E731
    if not (ok(b) and ok(r)):
        return None, "-"
    ratio = b["value"] / r["value"] if r["value"] else None
    target = TARGETS.get(row)
    if target is None:
        return ratio, ""
    op, floor, _ = target
    if op == "zero-copy":
        return ratio, "yes" if b.get("zero_copy") else "no"
    if ratio is None:
        return None, "-"
    met = ratio <= floor if op == "<=" else ratio >= floor
    return ratio, "yes" if met else "NO"


def cell(r, row):
    if r is None:
        return "-"
    if r.get("status") != "ok" or row == "get_large":
        return cb.cell(r, row)
    if row == "idle_memory":
        return f"{r['value']:,.0f} MB ({r.get('rss_mb', 0):,.0f} RSS, {r.get('nprocs')} procs)"
    return f"{cb.fmt_value(r['value'])} {cb.ROW_BY_NAME[row].unit}"


#: The engine backends' target (issue 10): beamlet on an engine within 10% of
#: the engine itself on every row.
ENGINE_OVERHEAD_LIMIT = 1.10


def engine_overhead(row, on_engine, native):
    """How much worse beamlet-on-an-engine is than the engine itself on `row`
    (1.0 = the same; a time's ratio, or a rate's inverse ratio), and whether
    that is within ENGINE_OVERHEAD_LIMIT. (None, "-") when not comparable."""
    ok = lambda x: x is not None and x.get("status") == "ok" and x.get("value")  # noqa: E731
    target = TARGETS.get(row)
    if not (ok(on_engine) and ok(native)) or target is None or target[0] not in ("<=", ">="):
        return None, "-"
    if target[0] == "<=":  # a time: lower is better
        overhead = on_engine["value"] / native["value"]
    else:  # a rate: higher is better
        overhead = native["value"] / on_engine["value"]
    return overhead, "yes" if overhead <= ENGINE_OVERHEAD_LIMIT else "NO"


def build_table(frameworks, merged):
    # (beamlet on an engine, the engine itself): each pair present adds two columns.
    engines = [(f"beamlet-on-{e}", e) for e in ("dask", "ray")
               if f"beamlet-on-{e}" in frameworks and e in frameworks]
    header = ["workload", *frameworks, "beamlet/ray", "target", "met?"]
    for _, native in engines:
        header += [f"on-{native} overhead", "within 10%?"]
    lines = []
    for row in [r.name for r in cb.ROWS]:
        if not any(row in merged[f] for f in frameworks):
            continue
        b, r = merged.get("beamlet", {}).get(row), merged.get("ray", {}).get(row)
        ratio, met = ratio_and_verdict(row, b, r)
        target = TARGETS.get(row, (None, None, ""))[2]
        line = [cb.ROW_BY_NAME[row].title,
                *[cell(merged[f].get(row), row) for f in frameworks],
                "-" if ratio is None else f"{ratio:.3g}x", target or "", met]
        for on_engine, native in engines:
            overhead, within = engine_overhead(row, merged[on_engine].get(row),
                                               merged[native].get(row))
            line += ["-" if overhead is None else f"{overhead:.3g}x", within]
        lines.append(line)
    return header, lines


def cpu_table(frameworks, merged):
    """The CPU seconds each workload cost (all its processes; median over the
    runs), and beamlet-on-an-engine's over the engine's: the same work done, so
    this ratio is the adapter's overhead in CPU, which load from other programs
    skews far less than the wall-time rows."""
    engines = [(f"beamlet-on-{e}", e) for e in ("dask", "ray")
               if f"beamlet-on-{e}" in frameworks and e in frameworks]
    header = ["workload", *[f"{f} CPU s" for f in frameworks]]
    header += [f"on-{native} CPU overhead" for _, native in engines]
    lines = []
    for row in [r.name for r in cb.ROWS]:
        cpus = [merged[f].get(row, {}).get("workload_cpu_s") for f in frameworks]
        if all(c is None for c in cpus):
            continue
        line = [cb.ROW_BY_NAME[row].title, *["-" if c is None else f"{c:.2f}" for c in cpus]]
        for on_engine, native in engines:
            a = merged[on_engine].get(row, {}).get("workload_cpu_s")
            b = merged[native].get(row, {}).get("workload_cpu_s")
            line.append(f"{a / b:.3g}x" if a and b else "-")
        lines.append(line)
    return header, lines


def ray_vs_issue(merged):
    lines = []
    for row, issue_v in ISSUE_RAY.items():
        r = merged.get("ray", {}).get(row)
        if r is None:
            continue
        here = cell(r, row)
        if isinstance(issue_v, str) or r.get("status") != "ok":
            rel = ""
        else:
            rel = f"{r['value'] / issue_v:.2f}x"
        unit = cb.ROW_BY_NAME[row].unit
        issue_cell = issue_v if isinstance(issue_v, str) else f"{cb.fmt_value(issue_v)} {unit}"
        lines.append([cb.ROW_BY_NAME[row].title, here, issue_cell, rel])
    return ["workload", "ray here", "ray (issue 3)", "here/issue"], lines


def limits_table(merged, limits):
    """beamlet against the physical floor of the machine, where there is a simple one."""
    rtt_us = limits.get("pipe_rtt_cross_core_us", limits["pipe_rtt_us"])
    what = (f"a pipe round trip across cores (one core: "
            f"{limits.get('pipe_rtt_same_core_us', rtt_us):.0f} us)")
    rows = [("task_sync", rtt_us / 1e3, "ms", what),
            ("actor_sync", rtt_us / 1e3, "ms", what),
            ("put_large", limits["shm_warm_gbps"], "GB/s", "memcpy into faulted shm"),
            ("put_large_cold", limits["shm_cold_gbps"], "GB/s", "memcpy into fresh shm"),
            ("arg_large", limits["shm_warm_gbps"], "GB/s", "one memcpy into faulted shm")]
    lines = []
    for row, limit, unit, what in rows:
        b = merged.get("beamlet", {}).get(row)
        if not b or b.get("status") != "ok":
            continue
        v = b["value"]
        frac = v / limit if cb.ROW_BY_NAME[row].better == "higher" else limit / v
        lines.append([cb.ROW_BY_NAME[row].title, f"{cb.fmt_value(v)} {unit}",
                      f"{cb.fmt_value(limit)} {unit}", what, f"{frac:.0%}"])
    return ["workload", "beamlet", "machine limit", "limit is", "beamlet at % of limit"], lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ray-python", default=cb.default_ray_python(),
                   help="interpreter of the venv with ray==2.60.0, dask, distributed "
                        f"(default: ${cb.RAY_PYTHON_ENV}, else {cb.RAY_VENV_HINT})")
    p.add_argument("--beamlet-python", default=sys.executable)
    p.add_argument("--beamlet-init", default='{"num_cpus": 2}')
    p.add_argument("--ray-init", default='{"num_cpus": 2}')
    p.add_argument("--dask-init", default='{"processes": true, "n_workers": 2, '
                                          '"threads_per_worker": 1}')
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--on-dask", action="store_true",
                   help="also run beamlet on its dask backend (this interpreter needs "
                        "'beamlet[dask]') and report its overhead over native Dask")
    p.add_argument("--on-ray", action="store_true",
                   help="also run beamlet on its ray backend (this interpreter needs "
                        "'beamlet[ray]') and report its overhead over native Ray")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating rounds of beamlet and Ray (default %(default)s)")
    p.add_argument("--dask-rounds", type=int, default=1,
                   help="how many of the rounds include Dask (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="repeats per workload per round")
    p.add_argument("--cold-repeat", type=int, default=2,
                   help="fresh-process cold-start probes per round")
    p.add_argument("--only", help="comma-separated workloads (see core_bench.py --help)")
    p.add_argument("--params", help="JSON size overrides passed to core_bench")
    p.add_argument("--timeout", type=float, help="seconds per workload (core_bench default 120)")
    p.add_argument("--run-timeout", type=float, default=1800.0,
                   help="seconds for one whole core_bench run")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="before each run, wait up to this many seconds for other programs to "
                        "use < 15%% of the CPUs (0: don't wait; default %(default)s)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cb.set_child_subreaper()
    if not args.no_ray and not os.path.exists(args.ray_python):
        sys.exit(cb.missing_ray_python(args.ray_python))
    runs = {"beamlet": (args.beamlet_python, "beamlet", args.beamlet_init)}
    if not args.no_ray:
        runs["ray"] = (args.ray_python, "ray", args.ray_init)
        if args.on_ray:
            init = dict(json.loads(args.beamlet_init), backend="ray")
            runs["beamlet-on-ray"] = (args.beamlet_python, "beamlet", json.dumps(init))
    if not args.no_dask:
        runs["dask"] = (args.ray_python, "dask", args.dask_init)
        if args.on_dask:
            init = dict(json.loads(args.beamlet_init), backend="dask")
            runs["beamlet-on-dask"] = (args.beamlet_python, "beamlet", json.dumps(init))
    frameworks = list(runs)
    reports = {f: [] for f in frameworks}
    t0 = time.perf_counter()
    if args.wait_idle > 0:
        cb.wait_for_quiet(args.wait_idle, log)
    limits = cb.machine_limits()
    log(f"machine limits: {json.dumps({k: round(v, 3) for k, v in limits.items() if k != 'note'})}")
    for rnd in range(args.rounds):
        order = [f for f in ("beamlet", "ray", "beamlet-on-ray") if f in runs]
        if rnd % 2:
            order.reverse()
        if "dask" in runs and rnd < args.dask_rounds:
            order.append("dask")
            if "beamlet-on-dask" in runs:
                order.append("beamlet-on-dask")
        for f in order:
            if args.wait_idle > 0:
                cb.wait_for_quiet(args.wait_idle, log)
            python, module, init = runs[f]
            reports[f].append(run_core_bench(f"{f} round {rnd + 1}/{args.rounds}", python,
                                             module, init, args, log))
    merged = {f: merge(reports[f]) for f in frameworks}

    def first(f, key, default=None):
        for rep in reports.get(f, []):
            if rep and rep.get(key) is not None:
                return rep[key]
        return default

    machine = cb.machine_info()
    versions = {f: first(f, "module_version") for f in frameworks}
    ray_machine = first("ray", "machine", {}) or {}
    machine.update({"numpy_beamlet_python": machine.pop("numpy", None),
                    "numpy_ray_python": ray_machine.get("numpy"),
                    "python_ray": ray_machine.get("python"),
                    "beamlet": versions.get("beamlet"), "ray": versions.get("ray"),
                    "dask_distributed": versions.get("dask"), **cb.git_info()})
    header, lines = build_table(frameworks, merged)
    title = (f"beamlet {args.beamlet_init} vs Ray {versions.get('ray')} {args.ray_init}"
             + (f" vs Dask {versions.get('dask')}" if "dask" in frameworks else "")
             + f"; medians of {args.rounds} alternating rounds x {args.repeat} repeats "
               f"(cold start: {args.rounds} x {args.cold_repeat} fresh processes)")
    mline = (f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
             f"{machine.get('memory_gb')} GB RAM, {machine.get('platform')}; Python "
             f"{machine.get('python')}, numpy {machine.get('numpy_beamlet_python')}")
    text = cb.format_text(header, lines)
    ih, il = ray_vs_issue(merged)
    ch, cl = cpu_table(frameworks, merged)
    print(f"\n{title}\n{mline}\n\n{text}")
    if cl:
        print(f"\nCPU seconds per workload (driver and all its descendants):\n"
              f"{cb.format_text(ch, cl)}")
    if il:
        print(f"\nRay measured here vs the Ray medians stated in issue 3:\n"
              f"{cb.format_text(ih, il)}")
    notes = []
    for f in frameworks:
        for row, m in merged[f].items():
            if m.get("failed_runs"):
                notes.append(f"{f} {row}: {len(m['failed_runs'])} of {m['runs']} runs failed "
                             f"({', '.join(sorted(set(m['failed_runs'])))})")
            if m.get("leftover_after_shutdown"):
                notes.append(f"{f}: processes still alive after shutdown(): "
                             f"{m['leftover_after_shutdown'][:3]}")
        for rep in reports[f]:
            if rep and rep.get("leftover_shm"):
                notes.append(f"{f}: /dev/shm entries left behind: {rep['leftover_shm'][:5]}")
            fl = (rep or {}).get("foreign_load") or {}
            if fl.get("other_cpu_share", 0) > 0.05:
                notes.append(f"{f} run: other programs on the machine used "
                             f"{fl['other_cpu_s']:.0f} CPU-s ({fl['other_cpu_share']:.0%} of "
                             f"the machine's CPU) during it; its numbers are skewed")
            if rep and rep.get("unattributed_new_shm"):
                notes.append(f"{f} run: new /dev/shm entries from some other program during "
                             f"the run (not counted as ours): "
                             f"{rep['unattributed_new_shm'][:3]}")
            if rep and rep.get("leftover_processes"):
                notes.append(f"{f}: processes left behind: {rep['leftover_processes'][:5]}")
    lh, ll = limits_table(merged, limits)
    lim_line = (f"Machine limits (best of several trials): 1-byte pipe round trip between two "
                f"processes {limits.get('pipe_rtt_same_core_us', 0):.1f} us on one core, "
                f"{limits.get('pipe_rtt_cross_core_us', 0):.1f} us across two cores, "
                f"{limits['pipe_rtt_us']:.1f} us unpinned; 100 MB memcpy "
                f"{limits['memcpy_warm_gbps']:.1f} GB/s (warm), {limits['memcpy_cold_gbps']:.1f}"
                f" GB/s (fresh anonymous memory); into /dev/shm {limits['shm_warm_gbps']:.1f} "
                f"GB/s (faulted), {limits['shm_cold_gbps']:.1f} GB/s (fresh)")
    print(f"\n{lim_line}")
    if ll:
        print(cb.format_text(lh, ll))
    if notes:
        print("\nNotes:\n" + "\n".join("  " + n for n in notes))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")

    os.makedirs(args.out_dir, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "title": title, "machine": machine,
              "args": vars(args), "targets": {k: v[2] for k, v in TARGETS.items()},
              "issue_ray_medians": ISSUE_RAY, "machine_limits": limits, "table": {"header": header, "rows": lines},
              "cpu_table": {"header": ch, "rows": cl},
              "merged": merged, "runs": reports, "notes": notes}
    path = os.path.join(args.out_dir, f"compare-{stamp}.json")
    for target in (path, os.path.join(args.out_dir, "latest.json")):
        with open(target, "w") as f:
            json.dump(cb.portable(result), f, indent=1, default=str)
    with open(os.path.join(args.out_dir, "latest.md"), "w") as f:
        f.write(f"{title}\n\n{mline}\n\n{cb.format_markdown(header, lines)}\n")
        if cl:
            f.write(f"\nCPU seconds per workload (driver and all its descendants):\n\n"
                    f"{cb.format_markdown(ch, cl)}\n")
        if il:
            f.write(f"\nRay measured here vs the Ray medians stated in issue 3:\n\n"
                    f"{cb.format_markdown(ih, il)}\n")
        f.write(f"\n{lim_line}\n")
        if ll:
            f.write(f"\n{cb.format_markdown(lh, ll)}\n")
    print(f"wrote {path}, latest.json and latest.md", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

"""``beamlet tune status|plot`` (added to ``beamlet`` through the
``beamlet_cli_commands`` hook). Both read an experiment directory as it is
on disk, running or finished, and start no backend.

    beamlet tune status DIR [--metric M]
    beamlet tune plot DIR --metric M [--out FILE]

``status`` prints a table: each trial, its status, iterations and latest
metrics (a running trial's from the last row of its ``result.json``).
``plot`` draws each trial's metric per iteration as a PNG, marking where each
trial ended (an x for those stopped before the longest ran, a dot for the
others; errored ones in red); without matplotlib (an optional extra, not a
dependency) it writes the same curves as CSV (``trial_name,status,
training_iteration,METRIC``) and says so. Importing this module is cheap:
the rest of beamlet.tune is imported when a command runs.
"""
from __future__ import annotations

import csv
import os
import sys

from beamlet.core.plugins import hookimpl

__all__ = ["add_commands", "load_trials", "write_curves"]


@hookimpl
def beamlet_cli_commands(subparsers):
    add_commands(subparsers)


def add_commands(subparsers) -> None:
    tune = subparsers.add_parser("tune", help="look at beamlet.tune experiments",
                                 description="Show or plot a beamlet.tune experiment from "
                                             "its directory (no backend is started).")
    sub = tune.add_subparsers(title="tune commands", metavar="COMMAND")
    tune.set_defaults(func=lambda args: (tune.print_help(), 2)[1])

    status = sub.add_parser("status", help="print the table of an experiment's trials")
    status.add_argument("dir", metavar="DIR", help="the experiment directory")
    status.add_argument("--metric", default=None, help="a metric to show first")
    status.set_defaults(func=_cmd_status)

    plot = sub.add_parser("plot", help="draw each trial's metric per iteration (PNG, "
                                       "or CSV without matplotlib)")
    plot.add_argument("dir", metavar="DIR", help="the experiment directory")
    plot.add_argument("--metric", required=True, help="the metric to draw, e.g. loss or a/b")
    plot.add_argument("--out", default=None,
                      help="the file to write (default: DIR/METRIC.png, or .csv)")
    plot.set_defaults(func=_cmd_plot)


def load_trials(path: str) -> list:
    """The experiment's trials, each with its latest result: from the state
    log or table, and a trial not finished from its ``result.json``.
    Raises ValueError if `path` is not an experiment directory."""
    from .analysis import ExperimentAnalysis, _read_results

    trials = ExperimentAnalysis(path).trials
    if not trials:
        raise ValueError(f"no beamlet.tune experiment in {path} (no trials in it)")
    for trial in trials:
        trial.evaluated_params = trial.evaluated_params or {}
        if not trial.is_finished():
            results = _read_results(trial.path)
            if results:
                trial.last_result = results[-1]
    return trials


def _cmd_status(args) -> int:
    from collections import Counter

    from .progress import ProgressReporter

    try:
        trials = load_trials(args.dir)
    except ValueError as err:
        print(f"beamlet tune status: {err}", file=sys.stderr)
        return 1
    counts = Counter(t.status for t in trials)
    print(f"{os.path.abspath(args.dir)}: {len(trials)} trials: " +
          ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    print(ProgressReporter(verbose=0, metric=args.metric).table(trials, max_rows=None))
    return 0


def write_curves(path: str, metric: str, out: str | None = None) -> tuple[str, str]:
    """Draw each trial's `metric` per training iteration into `out`; returns
    ``(file, "png" or "csv")``: CSV (to `out` with a .csv suffix) if matplotlib
    is not installed. Raises ValueError if no result holds `metric`."""
    from .analysis import _read_results
    from .result import flatten_dict, is_number

    curves = []
    for trial in load_trials(path):
        points = []
        for row in _read_results(trial.path):
            flat = flatten_dict(row)
            if is_number(flat.get(metric)):
                points.append((flat.get("training_iteration", len(points) + 1),
                               float(flat[metric])))
        curves.append((trial, points))
    if not any(points for _, points in curves):
        raise ValueError(f"no result of the experiment in {path} holds the metric {metric!r}")
    stem = os.path.splitext(out)[0] if out else \
        os.path.join(path, metric.replace("/", "_"))
    try:
        import matplotlib
    except ImportError:
        return _write_csv(stem + ".csv", metric, curves), "csv"
    matplotlib.use("Agg")
    from matplotlib import pyplot

    longest = max(points[-1][0] for _, points in curves if points)
    fig, ax = pyplot.subplots(figsize=(8, 5))
    for trial, points in curves:
        if not points:
            continue
        xs, ys = zip(*points)
        line, = ax.plot(xs, ys, linewidth=1, label=str(trial),
                        color="red" if trial.status == "ERROR" else None)
        ax.plot(xs[-1], ys[-1], "x" if xs[-1] < longest else "o", color=line.get_color())
    ax.set_xlabel("training_iteration")
    ax.set_ylabel(metric)
    ax.set_title(f"{os.path.basename(os.path.abspath(path))}: {metric} "
                 f"(x: stopped early)")
    if len(curves) <= 12:
        ax.legend(fontsize="small")
    file = out if out else stem + ".png"
    fig.savefig(file)
    pyplot.close(fig)
    return file, "png"


def _write_csv(file: str, metric: str, curves: list) -> str:
    with open(file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_name", "status", "training_iteration", metric])
        for trial, points in curves:
            for iteration, value in points:
                writer.writerow([str(trial), trial.status, iteration, value])
    return file


def _cmd_plot(args) -> int:
    try:
        file, kind = write_curves(args.dir, args.metric, args.out)
    except ValueError as err:
        print(f"beamlet tune plot: {err}", file=sys.stderr)
        return 1
    if kind == "csv":
        print(f"matplotlib is not installed: wrote the curves of {args.metric} as CSV "
              f"to {file} instead (pip install matplotlib for a PNG)")
    else:
        print(f"wrote {file}")
    return 0

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
    from .plot import default_file, draw_png, have_matplotlib, trial_curves, write_csv

    try:
        curves = trial_curves(load_trials(path), metric)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    stem = os.path.splitext(out)[0] if out else default_file(path, metric, "")
    if not have_matplotlib():
        return write_csv(curves, metric, stem + ".csv"), "csv"
    title = os.path.basename(os.path.abspath(path))
    return draw_png(curves, metric, out if out else stem + ".png", title), "png"


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

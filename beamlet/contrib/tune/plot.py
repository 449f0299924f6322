"""Each trial's metric per training iteration: drawn as a PNG (matplotlib, an
optional extra: ``pip install 'beamlet[plot]'``) or written as CSV. Behind
``ExperimentAnalysis.plot()``, ``ResultGrid.plot()`` and ``beamlet tune plot``.

In the PNG each trial's curve ends in a mark: an x where a trial stopped
before the longest-running one (a scheduler or stopper ended it early), a dot
for the others; errored trials are red."""
from __future__ import annotations

import csv
import importlib.util
import os

from .result import flatten_dict, is_number

__all__ = ["trial_curves", "draw_png", "write_csv", "have_matplotlib", "default_file"]


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def trial_curves(trials: list, metric: str) -> list[tuple]:
    """``[(trial, [(training_iteration, value), ...]), ...]`` from each trial's
    ``result.json``; raises ValueError if no result holds `metric`."""
    from .analysis import _read_results

    curves = []
    for trial in trials:
        points = []
        for row in _read_results(trial.path):
            flat = flatten_dict(row)
            if is_number(flat.get(metric)):
                points.append((flat.get("training_iteration", len(points) + 1),
                               float(flat[metric])))
        curves.append((trial, points))
    if not any(points for _, points in curves):
        raise ValueError(f"no result of the {len(curves)} trial(s) holds the metric "
                         f"{metric!r}")
    return curves


def draw_png(curves: list[tuple], metric: str, file: str, title: str) -> str:
    """Draw `curves` (see :func:`trial_curves`) into PNG `file`; raises
    ImportError, saying how to install it, without matplotlib."""
    if not have_matplotlib():
        raise ImportError("plotting needs matplotlib, which beamlet does not install: "
                          "pip install 'beamlet[plot]' (or matplotlib); without it, "
                          "`beamlet tune plot DIR --metric M` writes the curves as CSV")
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    longest = max(points[-1][0] for _, points in curves if points)
    fig, ax = pyplot.subplots(figsize=(8, 5))
    try:
        for trial, points in curves:
            if not points:
                continue
            xs, ys = zip(*points)
            line, = ax.plot(xs, ys, linewidth=1, label=str(trial),
                            color="red" if trial.status == "ERROR" else None)
            ax.plot(xs[-1], ys[-1], "x" if xs[-1] < longest else "o", color=line.get_color())
        ax.set_xlabel("training_iteration")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric} (x: stopped early)")
        if len(curves) <= 12:
            ax.legend(fontsize="small")
        fig.savefig(file)
    finally:
        pyplot.close(fig)
    return file


def write_csv(curves: list[tuple], metric: str, file: str) -> str:
    """`curves` as CSV rows ``trial_name,status,training_iteration,METRIC``."""
    with open(file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_name", "status", "training_iteration", metric])
        for trial, points in curves:
            for iteration, value in points:
                writer.writerow([str(trial), trial.status, iteration, value])
    return file


def default_file(experiment_path: str, metric: str, suffix: str) -> str:
    return os.path.join(experiment_path, metric.replace("/", "_") + suffix)

"""The live progress output of a run (``verbose``):

* 0: nothing;
* 1: a status line while it runs (rewritten in place on a terminal, every few
  seconds otherwise), a line per failed trial, and a table of all trials at
  the end;
* 2: also a line when each trial ends;
* 3: also a line per result.
"""
from __future__ import annotations

import sys
import time
from collections import Counter

from .result import AUTO_FIELDS, TIME_TOTAL_S, TRAINING_ITERATION, flatten_dict, is_number

__all__ = ["ProgressReporter"]

_STATUS_ORDER = ("RUNNING", "PENDING", "PAUSED", "TERMINATED", "ERROR")
_MAX_ROWS = 30
_MAX_PARAM_COLUMNS = 6
_MAX_METRIC_COLUMNS = 4


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) or (is_number(value) and not isinstance(value, int)):
        return f"{float(value):.5g}"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _user_metrics(result: dict) -> dict:
    flat = flatten_dict({k: v for k, v in result.items()
                         if k not in AUTO_FIELDS and k != TIME_TOTAL_S})
    return {k: v for k, v in flat.items() if is_number(v)}


class ProgressReporter:
    """Prints a run's progress to `out` (stdout by default)."""

    def __init__(self, verbose: int = 1, metric: str | None = None, mode: str | None = None,
                 out=None, interval: float | None = None):
        self.verbose = int(verbose)
        self.metric = metric
        self.mode = mode
        self._out = out
        tty = self._stream().isatty() if hasattr(self._stream(), "isatty") else False
        self._tty = bool(tty)
        self._interval = interval if interval is not None else (0.5 if self._tty else 5.0)
        self._start = time.monotonic()
        self._last_print = 0.0
        self._last_counts: tuple = ()
        self._inline = False

    def _stream(self):
        return self._out if self._out is not None else sys.stdout

    def _print(self, text: str) -> None:
        stream = self._stream()
        if self._inline:
            stream.write("\r\x1b[K")
            self._inline = False
        stream.write(text + "\n")
        stream.flush()

    # -- events ------------------------------------------------------------------
    def start(self, experiments: list, total: int) -> None:
        self._start = time.monotonic()
        if self.verbose >= 1:
            names = ", ".join(f"{e.name} -> {e.path}" for e in experiments)
            self._print(f"== beamlet.tune: {total} trial{'s' if total != 1 else ''} "
                        f"({names}) ==")

    def on_trial_result(self, trial, result: dict) -> None:
        if self.verbose >= 3:
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in
                                list(_user_metrics(result).items())[:_MAX_METRIC_COLUMNS])
            self._print(f"Trial {trial} iter {result.get(TRAINING_ITERATION)}: {metrics}")

    def on_trial_complete(self, trial) -> None:
        if self.verbose >= 2:
            result = trial.last_result
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in
                                list(_user_metrics(result).items())[:_MAX_METRIC_COLUMNS])
            self._print(f"Trial {trial} completed after {result.get(TRAINING_ITERATION, 0)} "
                        f"iterations: {metrics}")

    def on_trial_error(self, trial) -> None:
        if self.verbose >= 1:
            last = (trial.error_msg or "").strip().splitlines()
            self._print(f"Trial {trial} errored: {last[-1] if last else 'unknown error'}"
                        f"{f' (see {trial.error_file})' if trial.error_file else ''}")

    # -- status ------------------------------------------------------------------
    def status_line(self, trials: list) -> str:
        counts = Counter(t.status for t in trials)
        parts = ", ".join(f"{counts[s]} {s}" for s in _STATUS_ORDER if counts[s])
        line = (f"== Status == {len(trials)} trials: {parts} | "
                f"{time.monotonic() - self._start:.1f} s")
        best = self._best(trials)
        if best is not None:
            line += f" | best {self.metric}={_fmt(best[1])} ({best[0]})"
        return line

    def _best(self, trials: list):
        if not self.metric or self.mode not in ("min", "max"):
            return None
        scored = [(t, flatten_dict(t.last_result).get(self.metric)) for t in trials]
        scored = [(t, v) for t, v in scored if is_number(v)]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda tv: tv[1])

    def maybe_report(self, trials: list) -> None:
        if self.verbose < 1:
            return
        now = time.monotonic()
        since = now - self._last_print
        if since < self._interval:
            return
        counts = tuple(sorted(Counter(t.status for t in trials).items()))
        if not self._tty and counts == self._last_counts and since < 6 * self._interval:
            return
        self._last_print = now
        self._last_counts = counts
        line = self.status_line(trials)
        if self._tty:
            stream = self._stream()
            stream.write("\r\x1b[K" + line)
            stream.flush()
            self._inline = True
        else:
            self._print(line)

    def finish(self, trials: list) -> None:
        if self.verbose < 1:
            return
        self._print(self.status_line(trials))
        self._print(self.table(trials))
        errored = [t for t in trials if t.status == "ERROR"]
        if errored:
            self._print(f"{len(errored)} trial(s) errored:")
            for t in errored:
                self._print(f"  {t}: {t.error_file or (t.error_msg or '').strip()[-200:]}")

    # -- the table ---------------------------------------------------------------
    def table(self, trials: list, max_rows: int | None = _MAX_ROWS) -> str:
        """The table of `trials` (the first ones and a count of the others
        beyond `max_rows`; all of them with None)."""
        params: list[str] = []
        for t in trials:
            for name in t.evaluated_params:
                if name not in params and len(params) < _MAX_PARAM_COLUMNS:
                    params.append(name)
        metrics: list[str] = [self.metric] if self.metric else []
        for t in trials:
            for name in _user_metrics(t.last_result):
                if name not in metrics and len(metrics) < _MAX_METRIC_COLUMNS:
                    metrics.append(name)
        header = ["Trial name", "status", *params, "iter", "total time (s)", *metrics]
        rows = []
        shown = trials if max_rows is None or len(trials) <= max_rows \
            else trials[:max_rows - 5]
        for t in shown:
            flat = flatten_dict(t.last_result) if t.last_result else {}
            rows.append([str(t), t.status, *(_fmt(t.evaluated_params.get(p)) for p in params),
                         _fmt(flat.get(TRAINING_ITERATION)), _fmt(flat.get(TIME_TOTAL_S)),
                         *(_fmt(flat.get(m)) for m in metrics)])
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        if len(shown) < len(trials):
            lines.append(f"... {len(trials) - len(shown)} more trials")
        return "\n".join(lines)

"""The Ray side of the corpus in one Ray: ``python ray_batch.py OUT.json PROGRAM...``.

Starting Ray takes seconds per program, and on a loaded machine more than
Ray's own 30 s start-up limit. Here Ray starts once (``num_cpus=2``, what the
programs ask for); each program then runs as ``__main__`` in this process with
``ray.init``/``ray.shutdown`` made no-ops and its stdout captured. A program
that raises "prints" ``EXIT 1: <exception type>`` after its output, as
``run.py`` records a failing process. Programs whose first lines say
``# agreement: own-ray`` (they test init/shutdown themselves) do not belong
here: ``run.py`` runs those in a process of their own.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import signal
import sys
import time

import ray


#: Seconds a program may take before it is stopped (it "prints" EXIT 1: Timeout).
PROGRAM_TIMEOUT = 90


class Timeout(BaseException):
    """A program ran past PROGRAM_TIMEOUT."""


def _alarm(signum, frame):
    raise Timeout()


def _wait_idle(limit: float = 60.0) -> None:
    """Wait (up to `limit` s) until every CPU is free again: what a program left
    running (a cancelled task still ending) must not starve the next one."""
    until = time.monotonic() + limit
    while time.monotonic() < until and \
            ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        time.sleep(0.2)


def main(out: str, paths: list[str]) -> None:
    signal.signal(signal.SIGALRM, _alarm)
    for attempt in range(3):  # (on a loaded machine Ray may miss its own start-up limit)
        try:
            ray.init(num_cpus=2, include_dashboard=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for it
            if attempt == 2:
                raise
            ray.shutdown()
    plain_init, plain_shutdown = ray.init, ray.shutdown
    ray.init = lambda *args, **kwargs: None
    ray.shutdown = lambda *args, **kwargs: None
    results = {}
    try:
        for path in paths:
            buffer = io.StringIO()
            start = time.monotonic()
            with contextlib.redirect_stdout(buffer):
                signal.alarm(PROGRAM_TIMEOUT)
                try:
                    sys.argv = [path]
                    runpy.run_path(path, run_name="__main__")
                    failure = ""
                except BaseException as err:  # noqa: BLE001 - the program's outcome
                    failure = f"\nEXIT 1: {type(err).__name__}"
                finally:
                    signal.alarm(0)
            output = (buffer.getvalue().rstrip("\n") + failure).strip("\n")
            from run import normalise
            output = normalise(output)
            results[os.path.basename(path)] = {"output": output, "stderr_tail": "",
                                               "seconds": round(time.monotonic() - start, 2)}
            print(f"ray: {os.path.basename(path)} done", file=sys.stderr, flush=True)
            _wait_idle()
            with open(out, "w") as f:  # (after each: a crash keeps what ran)
                json.dump(results, f)
    finally:
        ray.init, ray.shutdown = plain_init, plain_shutdown
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

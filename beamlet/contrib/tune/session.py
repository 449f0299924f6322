"""The session of a running function trainable: ``tune.report`` and the
``reporter`` of the seed's ``(config, reporter)`` trainables.

A function trainable runs in a thread of its trial actor. Each report hands
one result to the actor's ``step()`` (which returns it to the driver) and
then waits for the driver's decision: continue, or stop; or, when the
driver has said it will always continue (``run_ahead``: no scheduler or
stopper of its decides per result), goes on at once, at most
``_MAX_AHEAD`` results ahead of what the actor has handed on. The reporter itself
checks the dict stop criteria; when a result meets one (or is ``done``) the
reporter ends the trainable at once by raising :class:`StopTrial`, which the
trial catches. So a ``while True:`` trainable ends on every backend,
including ``inprocess`` where all of this runs inside one ``.remote()`` call
at a time.
"""
from __future__ import annotations

import queue
import threading
from typing import Any

from .checkpoint import Checkpoint, read_metadata, save_into
from .result import ResultBuilder
from .stopper import criteria_met

__all__ = ["StopTrial", "TrialSession", "StatusReporter", "report", "get_session",
           "get_checkpoint",
           "get_trial_id", "get_trial_name", "get_trial_dir"]

_local = threading.local()
_active: set["TrialSession"] = set()
_active_lock = threading.Lock()

CONTINUE = "continue"
STOP = "stop"
#: How many results a trainable that runs ahead may have reported that the
#: actor has not handed on yet (then its next report waits).
_MAX_AHEAD = 256


class StopTrial(BaseException):
    """Raised inside a trainable (by its reporter) to end it; the trial catches it.

    A BaseException, so a trainable's ``except Exception:`` does not swallow it."""


class TrialSession:
    """One trial's channel between its trainable's thread and the actor's ``step()``."""

    def __init__(self, trial_info: dict, config: dict, stop_criteria: dict | None = None,
                 restore_path: str | None = None, run_ahead: bool = False):
        self.trial_id = trial_info["trial_id"]
        self.trial_name = trial_info.get("trial_name", self.trial_id)
        self.trial_dir = trial_info.get("logdir")
        self.stop_criteria = dict(stop_criteria or {})
        self.builder = ResultBuilder(self.trial_id, config, trial_info.get("experiment_tag", ""))
        self.events: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self.stop_requested = False
        self.finished = False
        #: Released once per result handed on (run_ahead): the room ahead.
        self.room = threading.Semaphore(_MAX_AHEAD) if run_ahead else None
        self.checkpoint = Checkpoint(restore_path) if restore_path else None
        if restore_path:
            self.builder.restore(read_metadata(restore_path))

    # -- trainable side (its own thread) ---------------------------------------
    def report(self, metrics: dict, final: bool = False, checkpoint=None) -> None:
        if self.stop_requested or self.finished:
            raise StopTrial()
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"tune.report(checkpoint=...) takes a tune.Checkpoint, got "
                            f"{type(checkpoint).__name__}")
        room = self.room
        if room is not None:
            room.acquire()
            if self.stop_requested:
                raise StopTrial()
        result = self.builder.build(metrics)
        if final or criteria_met(self.stop_criteria, result):
            result["done"] = True
        event = {"kind": "result", "result": result}
        if checkpoint is not None:
            if not self.trial_dir:
                raise RuntimeError("this trial has no directory to keep checkpoints in")
            path = save_into(self.trial_dir, self.builder.state(), source=checkpoint.path)
            self.checkpoint = Checkpoint(path)
            event["checkpoint"] = path
        self.events.put(event)
        if result["done"]:
            self.finished = True
            raise StopTrial()
        if room is not None:
            return  # (and the clock runs on: no wait to leave out of the next iteration)
        command = self._commands.get()
        if command == STOP:
            self.stop_requested = True
            raise StopTrial()
        self.builder.restart_clock()

    # -- actor side -----------------------------------------------------------
    def resume(self) -> None:
        self._commands.put(CONTINUE)

    def request_stop(self) -> None:
        self.stop_requested = True
        self._commands.put(STOP)
        if self.room is not None:
            self.room.release(_MAX_AHEAD)  # (a report waiting for room: it ends)

    def activate(self) -> None:
        _local.session = self
        with _active_lock:
            _active.add(self)

    def deactivate(self) -> None:
        _local.session = None
        with _active_lock:
            _active.discard(self)


def get_session() -> TrialSession | None:
    """The session of the trainable running in this thread (or the only one in
    this process, for threads a trainable started itself)."""
    session = getattr(_local, "session", None)
    if session is not None:
        return session
    with _active_lock:
        if len(_active) == 1:
            return next(iter(_active))
    return None


def _require_session(what: str) -> TrialSession:
    session = get_session()
    if session is None:
        raise RuntimeError(f"{what} can only be called inside a function trainable that "
                           f"tune.run() or run_experiments() is running")
    return session


def _merge(metrics: Any, kwargs: dict, what: str) -> tuple[dict, Any]:
    """``(metrics, checkpoint)`` from the positional dict and the keywords."""
    kwargs = dict(kwargs)
    checkpoint = None
    if "checkpoint" in kwargs and (kwargs["checkpoint"] is None or
                                   isinstance(kwargs["checkpoint"], Checkpoint)):
        checkpoint = kwargs.pop("checkpoint")
    if metrics is None and isinstance(kwargs.get("metrics"), dict):
        metrics = kwargs.pop("metrics")  # report(metrics={...}), Ray 2's keyword form
    if metrics is None:
        return kwargs, checkpoint
    if not isinstance(metrics, dict):
        raise TypeError(f"{what} takes a dict of metrics and/or metrics as keyword "
                        f"arguments, got {type(metrics).__name__}")
    merged = dict(metrics)
    merged.update(kwargs)
    return merged, checkpoint


def report(metrics: dict | None = None, /, **kwargs) -> None:
    """Report one result from a function trainable: ``tune.report({"loss": 0.1})``
    or ``tune.report(loss=0.1)`` (both forms may be combined). May end the
    trainable, if the trial should stop. ``checkpoint=tune.Checkpoint.from_directory(d)``
    saves a copy of directory ``d`` with this result (the trainable may delete
    ``d`` afterwards); a restarted trial gets it back from :func:`get_checkpoint`."""
    metrics, checkpoint = _merge(metrics, kwargs, "tune.report()")
    _require_session("tune.report()").report(metrics, checkpoint=checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint this trial should resume from (after a pause, a failure,
    or PBT's exploit), or its latest reported one; None on a fresh start."""
    return _require_session("tune.get_checkpoint()").checkpoint


def get_trial_id() -> str:
    return _require_session("tune.get_trial_id()").trial_id


def get_trial_name() -> str:
    return _require_session("tune.get_trial_name()").trial_name


def get_trial_dir() -> str | None:
    """The trial's directory (on the driver's machine), where its logs go."""
    return _require_session("tune.get_trial_dir()").trial_dir


class StatusReporter:
    """The seed's ``reporter``: ``reporter(mean_accuracy=0.9, timesteps_total=100)``."""

    def __init__(self, session: TrialSession):
        self._session = session

    def __call__(self, metrics: dict | None = None, /, **kwargs) -> None:
        metrics, checkpoint = _merge(metrics, kwargs, "reporter()")
        self._session.report(metrics, checkpoint=checkpoint)

    @property
    def trial_id(self) -> str:
        return self._session.trial_id

    @property
    def trial_name(self) -> str:
        return self._session.trial_name

    @property
    def logdir(self) -> str | None:
        return self._session.trial_dir

    def __repr__(self) -> str:
        return f"<StatusReporter of trial {self._session.trial_name}>"

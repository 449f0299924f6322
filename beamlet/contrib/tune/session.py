"""The session of a running function trainable: ``tune.report`` and the
``reporter`` of the seed's ``(config, reporter)`` trainables.

A function trainable runs in a thread of its trial actor. Each report hands
one result to the actor's ``step()`` (which returns it to the driver) and
then waits for the driver's decision: continue, or stop. The reporter itself
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

from .result import ResultBuilder
from .stopper import criteria_met

__all__ = ["StopTrial", "TrialSession", "StatusReporter", "report", "get_session",
           "get_trial_id", "get_trial_name", "get_trial_dir"]

_local = threading.local()
_active: set["TrialSession"] = set()
_active_lock = threading.Lock()

CONTINUE = "continue"
STOP = "stop"


class StopTrial(BaseException):
    """Raised inside a trainable (by its reporter) to end it; the trial catches it.

    A BaseException, so a trainable's ``except Exception:`` does not swallow it."""


class TrialSession:
    """One trial's channel between its trainable's thread and the actor's ``step()``."""

    def __init__(self, trial_info: dict, config: dict, stop_criteria: dict | None = None):
        self.trial_id = trial_info["trial_id"]
        self.trial_name = trial_info.get("trial_name", self.trial_id)
        self.trial_dir = trial_info.get("logdir")
        self.stop_criteria = dict(stop_criteria or {})
        self.builder = ResultBuilder(self.trial_id, config, trial_info.get("experiment_tag", ""))
        self.events: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self.stop_requested = False
        self.finished = False

    # -- trainable side (its own thread) ---------------------------------------
    def report(self, metrics: dict, final: bool = False) -> None:
        if self.stop_requested or self.finished:
            raise StopTrial()
        result = self.builder.build(metrics)
        if final or criteria_met(self.stop_criteria, result):
            result["done"] = True
        self.events.put({"kind": "result", "result": result})
        if result["done"]:
            self.finished = True
            raise StopTrial()
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


def _merge(metrics: Any, kwargs: dict, what: str) -> dict:
    if metrics is None and isinstance(kwargs.get("metrics"), dict):
        kwargs = dict(kwargs)
        metrics = kwargs.pop("metrics")  # report(metrics={...}), Ray 2's keyword form
    if metrics is None:
        if "checkpoint" in kwargs and not isinstance(kwargs["checkpoint"], (int, float)):
            raise NotImplementedError("checkpoints are not supported by beamlet.tune yet")
        return dict(kwargs)
    if not isinstance(metrics, dict):
        raise TypeError(f"{what} takes a dict of metrics and/or metrics as keyword "
                        f"arguments, got {type(metrics).__name__}")
    if "checkpoint" in kwargs:
        raise NotImplementedError("checkpoints are not supported by beamlet.tune yet")
    merged = dict(metrics)
    merged.update(kwargs)
    return merged


def report(metrics: dict | None = None, /, **kwargs) -> None:
    """Report one result from a function trainable: ``tune.report({"loss": 0.1})``
    or ``tune.report(loss=0.1)`` (both forms may be combined). May end the
    trainable, if the trial should stop."""
    _require_session("tune.report()").report(_merge(metrics, kwargs, "tune.report()"))


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
        self._session.report(_merge(metrics, kwargs, "reporter()"))

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

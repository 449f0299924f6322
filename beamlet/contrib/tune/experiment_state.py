"""The experiment's state on disk, for ``resume`` after the driver was killed.

``experiment_state.jsonl`` is an append-only log of JSON lines, the only
state ``resume`` reads:

* ``{"trial": record}``: a change of a trial (added, checkpointed, paused,
  ended); the latest line of a trial wins;
* ``{"scheduler": state}``: the whole state of a scheduler that logs it so
  (HyperBand, PBT; see ``TrialScheduler.state_changes``); the latest wins;
* ``{"scheduler_update": [op, ...]}``: changes of a scheduler that logs
  them one by one (ASHA's rung records, the median rule's results; see
  ``TrialScheduler.pop_state_updates``), applied in order over the latest
  whole state: constant work per change, however many trials there are;
* ``{"search": base64 pickle}``: the search algorithm's (and its
  searcher's) state; the latest wins.

A state line is written before the trial lines it concerns, in the same
``write`` (on a file opened for appending) when it comes with them, so a
trial line is never on disk without the state that made it. A driver killed
in the middle of a write leaves a cut-off last line, which reading skips.
Nothing is rewritten in full per change, so the cost per event is constant.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
from typing import NamedTuple

from .result import json_default

__all__ = ["ExperimentStateLog", "LoggedState", "STATE_LOG"]

STATE_LOG = "experiment_state.jsonl"


class LoggedState(NamedTuple):
    """What a log holds: the latest record of each trial (in the order trials
    were added), the latest whole scheduler state (or None), the scheduler
    updates logged after it, and the latest search state, still pickled (see
    :meth:`ExperimentStateLog.load_search`), or None."""
    records: list
    scheduler: dict | None
    scheduler_updates: list
    search: str | None


class ExperimentStateLog:
    """The log of one experiment directory."""

    def __init__(self, experiment_path: str):
        self.path = os.path.join(experiment_path, STATE_LOG)
        self._fd: int | None = None

    def exists(self) -> bool:
        return os.path.exists(self.path)

    @staticmethod
    def trial_entry(trial) -> dict:
        return {"trial": trial.to_record()}

    @staticmethod
    def scheduler_entry(state: dict) -> dict:
        """The scheduler's whole state (JSON data: trial ids, not trials)."""
        return {"scheduler": state}

    @staticmethod
    def scheduler_update_entry(ops: list) -> dict:
        """Changes of the scheduler's state since the last line (JSON data)."""
        return {"scheduler_update": ops}

    @staticmethod
    def search_entry(state: dict) -> dict:
        """The search algorithm's state (anything picklable: Optuna's study...)."""
        return {"search": base64.b64encode(pickle.dumps(state)).decode("ascii")}

    @staticmethod
    def load_search(logged: str) -> dict:
        """The search state of a ``search`` line (unpickling may import the
        searcher's module: only the run that resumes does it)."""
        return pickle.loads(base64.b64decode(logged))

    def trial(self, trial) -> None:
        """Append the trial's current record."""
        self.append([self.trial_entry(trial)])

    def scheduler(self, state: dict) -> None:
        self.append([self.scheduler_entry(state)])

    def append(self, entries: list[dict]) -> None:
        """Append `entries`, one line each, in a single ``write``."""
        data = "".join(json.dumps(e, default=json_default) + "\n" for e in entries).encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(experiment_path: str) -> list[dict]:
        """The latest record of each trial, in the order trials were added."""
        return ExperimentStateLog.read_log(experiment_path).records

    @staticmethod
    def read_all(experiment_path: str) -> tuple[list[dict], dict | None]:
        """``(records, scheduler_state)``: the latest record of each trial and
        the latest whole scheduler state (or None)."""
        logged = ExperimentStateLog.read_log(experiment_path)
        return logged.records, logged.scheduler

    @staticmethod
    def read_log(experiment_path: str) -> LoggedState:
        """Everything the log holds (see :class:`LoggedState`)."""
        records: dict[str, dict] = {}
        scheduler, updates, search = None, [], None
        try:
            f = open(os.path.join(experiment_path, STATE_LOG))
        except OSError:
            return LoggedState([], None, [], None)
        with f:
            for line in f:
                try:
                    entry = json.loads(line)
                    if "trial" in entry:
                        record = entry["trial"]
                        records[record["trial_id"]] = record
                    elif "scheduler_update" in entry:
                        updates.extend(entry["scheduler_update"])
                    elif "scheduler" in entry:
                        scheduler, updates = entry["scheduler"], []
                    elif "search" in entry:
                        search = entry["search"]
                except (ValueError, KeyError, TypeError):
                    continue  # the cut-off last line of a killed driver
        return LoggedState(list(records.values()), scheduler, updates, search)

"""The experiment's state on disk, for ``resume`` after the driver was killed.

``experiment_state.jsonl`` is an append-only log: one JSON line per change
of a trial (added, checkpointed, paused, ended), each written with a single
``write`` on a file opened for appending, so a line is either all there or,
if the driver died in the middle of it, a cut-off last line that reading
skips. The latest line of a trial wins. A scheduler whose decisions depend
on what it saw (HyperBand's brackets and rungs, PBT's perturbation times)
appends its state as a ``{"scheduler": ...}`` line each time that state
changes, before the lines of the trials the change concerns; the latest
such line wins on resume. The search algorithm's state is a
separate small pickle, replaced atomically (written aside, then renamed).
Nothing is rewritten in full per change, so the cost per event is constant.
"""
from __future__ import annotations

import json
import os
import pickle

from .result import json_default

__all__ = ["ExperimentStateLog", "STATE_LOG", "SEARCH_STATE"]

STATE_LOG = "experiment_state.jsonl"
SEARCH_STATE = "search_state.pkl"


class ExperimentStateLog:
    """The log of one experiment directory."""

    def __init__(self, experiment_path: str):
        self.path = os.path.join(experiment_path, STATE_LOG)
        self.search_path = os.path.join(experiment_path, SEARCH_STATE)
        self._fd: int | None = None

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def trial(self, trial) -> None:
        """Append the trial's current record."""
        self._append({"trial": trial.to_record()})

    def scheduler(self, state: dict) -> None:
        """Append the scheduler's state (JSON data: trial ids, not trials)."""
        self._append({"scheduler": state})

    def _append(self, entry: dict) -> None:
        line = json.dumps(entry, default=json_default) + "\n"
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, line.encode())

    def search_state(self, state: dict) -> None:
        tmp = self.search_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, self.search_path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(experiment_path: str) -> list[dict]:
        """The latest record of each trial, in the order trials were added."""
        return ExperimentStateLog.read_all(experiment_path)[0]

    @staticmethod
    def read_all(experiment_path: str) -> tuple[list[dict], dict | None]:
        """``(records, scheduler_state)``: the latest record of each trial, in
        the order trials were added, and the latest scheduler state (or None)."""
        records: dict[str, dict] = {}
        scheduler = None
        try:
            with open(os.path.join(experiment_path, STATE_LOG)) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        if "scheduler" in entry:
                            scheduler = entry["scheduler"]
                            continue
                        record = entry["trial"]
                        records[record["trial_id"]] = record
                    except (ValueError, KeyError, TypeError):
                        continue  # the cut-off last line of a killed driver
        except OSError:
            return [], None
        return list(records.values()), scheduler

    @staticmethod
    def read_search_state(experiment_path: str) -> dict | None:
        try:
            with open(os.path.join(experiment_path, SEARCH_STATE), "rb") as f:
                return pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

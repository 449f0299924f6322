"""Checkpoints: a directory of files a trial saves and can restart from.

A trainable hands a checkpoint over with
``tune.report(metrics, checkpoint=Checkpoint.from_directory(d))`` (or a class
trainable's ``save_checkpoint(dir)``). Tune copies it at once, inside the
trial's process, into the trial's directory as ``checkpoint_<iteration>``
(so the trainable may delete its own directory after the report), together
with a small metadata file that lets a restored trial go on counting
``training_iteration`` where the checkpoint left off. The trial directory
must therefore be reachable from the trial's process (true on one machine;
on a cluster, a shared file system), as Ray's storage path is.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from typing import Any, Iterator

__all__ = ["Checkpoint", "CHECKPOINT_PREFIX", "METADATA_FILE", "save_into", "read_metadata",
           "checkpoint_dirname"]

CHECKPOINT_PREFIX = "checkpoint_"
METADATA_FILE = ".tune_metadata.json"
_DICT_FILE = "_dict_checkpoint.pkl"


def checkpoint_dirname(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:06d}"


class Checkpoint:
    """A checkpoint: a directory (``path``). Made with :meth:`from_directory`
    (or :meth:`from_dict` for small state); read with :meth:`as_directory`,
    :meth:`to_directory` or :meth:`to_dict`."""

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"a checkpoint's path must be a string, got {type(path).__name__}")
        self.path = os.fspath(path)

    @classmethod
    def from_directory(cls, path: str) -> "Checkpoint":
        """A checkpoint of the files in directory `path` (which must exist)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Checkpoint.from_directory({path!r}): not a directory")
        return cls(path)

    @classmethod
    def from_dict(cls, data: dict, path: str) -> "Checkpoint":
        """A checkpoint holding the picklable dict `data`, written into directory `path`."""
        if not isinstance(data, dict):
            raise TypeError(f"Checkpoint.from_dict() takes a dict, got {type(data).__name__}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, _DICT_FILE), "wb") as f:
            pickle.dump(data, f)
        return cls(path)

    def to_dict(self) -> dict:
        """The dict of a checkpoint made by :meth:`from_dict` (or a class
        trainable's ``save_checkpoint`` returning a dict)."""
        file = os.path.join(self.path, _DICT_FILE)
        if not os.path.exists(file):
            raise ValueError(f"checkpoint {self.path} holds files, not a dict")
        with open(file, "rb") as f:
            return pickle.load(f)

    def is_dict(self) -> bool:
        return os.path.exists(os.path.join(self.path, _DICT_FILE))

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """``with ckpt.as_directory() as d:`` reads the checkpoint's files in place."""
        yield self.path

    def to_directory(self, path: str | None = None) -> str:
        """Copy the checkpoint's files into `path` (a new temporary directory if
        None) and return it."""
        if path is None:
            import tempfile
            path = tempfile.mkdtemp(prefix="beamlet-checkpoint-")
        shutil.copytree(self.path, path, dirs_exist_ok=True)
        return path

    def __fspath__(self) -> str:
        return self.path

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Checkpoint) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint(path={self.path!r})"


def save_into(trial_dir: str, metadata: dict, source: str | None = None, fill=None) -> str:
    """Make ``trial_dir/checkpoint_<iteration>`` from a copy of directory
    `source`, or by ``fill(directory)``, plus `metadata`; return its path.
    Written under a temporary name and renamed, so a checkpoint directory
    that exists is complete."""
    final = os.path.join(trial_dir, checkpoint_dirname(int(metadata.get("iteration", 0))))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if source is not None:
        shutil.copytree(source, tmp)
    else:
        os.makedirs(tmp)
        if fill is not None:
            fill(tmp)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(metadata, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_metadata(path: str) -> dict:
    """The metadata tune wrote with a checkpoint (``{}`` for a foreign directory)."""
    try:
        with open(os.path.join(path, METADATA_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

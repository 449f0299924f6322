"""TensorBoard event files through tensorboardX's ``RecordWriter`` (the
record framing and CRCs under its ``EventsWriter``): one ``Event`` protocol
buffer (tensorboardX's) per result, holding its scalars.

tensorboardX's ``SummaryWriter`` starts a writer thread and a queue per
writer, and its ``EventsWriter`` fsyncs at every flush, close included; a
Tune driver keeps a writer per trial, so that cost would be paid per trial
(an fsync waits for the disk: milliseconds each, more when it is busy, which
at 1,000 short trials was most of the run). Here a result is one event
written in the caller's thread, flushed (with an fsync) at most every few
seconds, and the file is closed without one: the data is in the page cache
for any reader, and a machine crash is not what the logs must survive.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import socket
import sys
import time

__all__ = ["EventFileWriter", "available", "event_file_name", "load_tensorboardx"]

_FLUSH_INTERVAL_S = 5.0


def load_tensorboardx():
    """tensorboardX's ``(RecordWriter, Event, Summary)``; ImportError without it.

    tensorboardX's record writer imports boto3, when installed, only to offer
    ``s3://`` log paths (about 1.4 s here, once per driver); trial directories
    are local, so boto3 is hidden from that first import."""
    hide = "boto3" not in sys.modules
    if hide:
        sys.modules["boto3"] = None  # (makes `import boto3` raise ImportError)
    try:
        from tensorboardX.record_writer import RecordWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
    finally:
        if hide and sys.modules.get("boto3", 0) is None:
            del sys.modules["boto3"]
    return RecordWriter, Event, Summary


_count = itertools.count(1)
_host: str | None = None
_available: bool | None = None


def available() -> bool:
    """Whether tensorboardX is installed (without importing it)."""
    global _available
    if _available is None:
        _available = importlib.util.find_spec("tensorboardX") is not None
    return _available


def event_file_name() -> str:
    """A new ``events.out.tfevents.<time>.<host>.<pid>.<n>`` (the name
    tensorboardX's EventsWriter gives a file)."""
    global _host
    if _host is None:
        _host = socket.gethostname()
    return f"events.out.tfevents.{str(time.time())[:10]}.{_host}.{os.getpid()}.{next(_count)}"


class EventFileWriter:
    """One event file in `logdir`, named `name` (by default a new
    :func:`event_file_name`). Raises ImportError when tensorboardX is not installed."""

    def __init__(self, logdir: str, name: str | None = None):
        record_writer, self._event, self._summary = load_tensorboardx()
        now = time.time()
        name = name or event_file_name()
        self._writer = record_writer(os.path.join(logdir, name))
        self._writer.write(self._event(wall_time=now, file_version="brain.Event:2")
                           .SerializeToString())
        self._flushed = time.monotonic()

    def add_scalars(self, step: int, scalars: list[tuple[str, float]]) -> None:
        """One event holding `scalars` (``(tag, value)``) at `step`; flushed to
        the file at most every few seconds, and on close."""
        value = self._summary.Value
        summary = self._summary(value=[value(tag=tag, simple_value=v) for tag, v in scalars])
        self._writer.write(self._event(wall_time=time.time(), step=int(step),
                                       summary=summary).SerializeToString())
        now = time.monotonic()
        if now - self._flushed >= _FLUSH_INTERVAL_S:
            self._writer.flush()
            self._flushed = now

    def close(self) -> None:
        """Close the file (no fsync: see the module's docstring)."""
        self._writer.close()

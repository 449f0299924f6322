"""TensorBoard event files through tensorboardX's synchronous ``EventsWriter``:
one ``Event`` protocol buffer (tensorboardX's) per result, holding its scalars.

tensorboardX's ``SummaryWriter`` starts a writer thread and a queue per
writer and fsyncs at every flush; a Tune driver keeps a writer per running
trial, so that cost is paid per trial. Here a result is one event written in
the caller's thread, and the file is flushed at most every few seconds and
on close.
"""
from __future__ import annotations

import os
import sys
import time

__all__ = ["EventFileWriter", "load_tensorboardx"]

_FLUSH_INTERVAL_S = 5.0


def load_tensorboardx():
    """tensorboardX's ``(EventsWriter, Event, Summary)``; ImportError without it.

    tensorboardX's record writer imports boto3, when installed, only to offer
    ``s3://`` log paths (about 1.4 s here, once per driver); trial directories
    are local, so boto3 is hidden from that first import."""
    hide = "boto3" not in sys.modules
    if hide:
        sys.modules["boto3"] = None  # (makes `import boto3` raise ImportError)
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
    finally:
        if hide and sys.modules.get("boto3", 0) is None:
            del sys.modules["boto3"]
    return EventsWriter, Event, Summary


class EventFileWriter:
    """One ``events.out.tfevents.<time>.<host>.<pid>.<n>`` file in `logdir`.
    Raises ImportError when tensorboardX is not installed."""

    _count = 0

    def __init__(self, logdir: str):
        events_writer, self._event, self._summary = load_tensorboardx()
        EventFileWriter._count += 1
        self._writer = events_writer(os.path.join(logdir, "events"),
                                     f".{os.getpid()}.{EventFileWriter._count}")
        self._flushed = time.monotonic()

    def add_scalars(self, step: int, scalars: list[tuple[str, float]]) -> None:
        """One event holding `scalars` (``(tag, value)``) at `step`; flushed to
        the file at most every few seconds, and on close."""
        value = self._summary.Value
        summary = self._summary(value=[value(tag=tag, simple_value=v) for tag, v in scalars])
        self._writer.write_event(self._event(wall_time=time.time(), step=int(step),
                                             summary=summary))
        now = time.monotonic()
        if now - self._flushed >= _FLUSH_INTERVAL_S:
            self._writer.flush()
            self._flushed = now

    def close(self) -> None:
        self._writer.close()

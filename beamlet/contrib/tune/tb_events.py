"""TensorBoard event files: tensorboardX's ``Event`` protocol buffers in
TFRecord framing (length, masked CRC-32C, record, masked CRC-32C), one event
per result, written by this module in the caller's thread.

tensorboardX's ``SummaryWriter`` starts a writer thread and a queue per
writer, and its ``EventsWriter`` fsyncs at every flush and on close; a Tune
driver keeps a writer per running trial, so those costs were paid per trial
(the fsync was most of a short trial's time in the driver on a busy disk).
Here events are kept in memory and appended to the file, without fsync
(these are logs, not the state ``resume`` reads), at most every few seconds
and on close.
"""
from __future__ import annotations

import os
import socket
import struct
import sys
import time

__all__ = ["EventFileWriter", "load_tensorboardx"]

_FLUSH_INTERVAL_S = 5.0


def load_tensorboardx():
    """tensorboardX's ``(masked_crc32c, Event, Summary)``; ImportError without it.

    tensorboardX's record writer imports boto3, when installed, only to offer
    ``s3://`` log paths (about 1.4 s here, once per driver); trial directories
    are local, so boto3 is hidden from that first import."""
    hide = "boto3" not in sys.modules
    if hide:
        sys.modules["boto3"] = None  # (makes `import boto3` raise ImportError)
    try:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c
    finally:
        if hide and sys.modules.get("boto3", 0) is None:
            del sys.modules["boto3"]
    return masked_crc32c, Event, Summary


class EventFileWriter:
    """One ``events.out.tfevents.<time>.<host>.<pid>.<n>`` file in `logdir`,
    created at the first flush. Raises ImportError when tensorboardX is not
    installed."""

    _count = 0
    _hostname = socket.gethostname()

    def __init__(self, logdir: str):
        self._crc, self._event, self._summary = load_tensorboardx()
        EventFileWriter._count += 1
        now = time.time()
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.{self._hostname}"
                                         f".{os.getpid()}.{EventFileWriter._count}")
        self._pending: list[bytes] = []
        self._flushed = time.monotonic()
        self._add(self._event(wall_time=now, file_version="brain.Event:2"))

    def _add(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        crc = self._crc
        self._pending.append(b"".join((header, struct.pack("<I", crc(header)), data,
                                       struct.pack("<I", crc(data)))))

    def add_scalars(self, step: int, scalars: list[tuple[str, float]]) -> None:
        """One event holding `scalars` (``(tag, value)``) at `step`; in the file
        within a few seconds, and at close."""
        value = self._summary.Value
        summary = self._summary(value=[value(tag=tag, simple_value=v) for tag, v in scalars])
        self._add(self._event(wall_time=time.time(), step=int(step), summary=summary))
        if time.monotonic() - self._flushed >= _FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Append the events not written yet to the file (one write)."""
        self._flushed = time.monotonic()
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            try:
                f = open(self.path, "ab")
            except FileNotFoundError:  # (the trial's directory is made by the runner)
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                f = open(self.path, "ab")
            with f:
                f.write(data)

    def close(self) -> None:
        self.flush()

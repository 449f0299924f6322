"""TensorBoard event files, written by this module: TFRecord framing (length,
masked CRC-32C, record, masked CRC-32C) around ``Event`` protocol buffers
(TensorFlow's ``event.proto``/``summary.proto``) holding scalar summaries,
one event per result.

Only the few fields Tune writes are encoded (``Event.wall_time``, ``step``,
``file_version``, ``summary``; ``Summary.Value.tag``, ``simple_value``), by
hand: importing tensorboardX (it imports numpy and its writer) cost the
driver a quarter to half a second, and its ``EventsWriter`` fsyncs at every
flush and on close, which was most of a short trial's time in the driver on
a busy disk. Events are kept in memory and appended to the file, without
fsync (logs, not the state ``resume`` reads), at most every few seconds and
on close.
"""
from __future__ import annotations

import math
import os
import socket
import struct
import time

__all__ = ["EventFileWriter", "encode_event", "masked_crc32c"]

_FLUSH_INTERVAL_S = 5.0


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli) of `data`, rotated and offset."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # (int64: two's complement, ten bytes)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(data)) + data


_pack_f32 = struct.Struct("<f").pack
_value_heads: dict[str, bytes] = {}   # tag -> a Summary.Value's bytes before its float


def _value_head(tag: str) -> bytes:
    head = _value_heads.get(tag)
    if head is None:
        body = _length_delimited(0x0A, tag.encode()) + b"\x15"
        head = bytes((0x0A,)) + _varint(len(body) + 4) + body
        if len(_value_heads) < 10_000:  # (metric names are few; bounded all the same)
            _value_heads[tag] = head
    return head


def _float32(value: float) -> bytes:
    try:
        return _pack_f32(value)
    except OverflowError:  # (beyond float32, as protobuf stores it: infinite)
        return _pack_f32(math.copysign(math.inf, value))


def encode_event(wall_time: float, step: int = 0, scalars=None,
                 file_version: str | None = None) -> bytes:
    """One serialized ``Event``: `scalars` (``(tag, value)`` pairs) as its
    summary, or the `file_version` record that starts a file. The bytes are
    protobuf's own (zero ``wall_time``/``step`` left out, as proto3 does)."""
    parts = []
    if wall_time:
        parts.append(b"\x09" + struct.pack("<d", wall_time))
    if step:
        parts.append(b"\x10" + _varint(int(step)))
    if file_version is not None:
        parts.append(_length_delimited(0x1A, file_version.encode()))
    if scalars is not None:
        values = b"".join([_value_head(tag) + _float32(value) for tag, value in scalars])
        parts.append(_length_delimited(0x2A, values))
    return b"".join(parts)


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                     struct.pack("<I", masked_crc32c(data))))


class EventFileWriter:
    """One ``events.out.tfevents.<time>.<host>.<pid>.<n>`` file in `logdir`,
    created at the first flush."""

    _count = 0
    _hostname = socket.gethostname()

    def __init__(self, logdir: str):
        EventFileWriter._count += 1
        now = time.time()
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.{self._hostname}"
                                         f".{os.getpid()}.{EventFileWriter._count}")
        self._pending = [_record(encode_event(now, file_version="brain.Event:2"))]
        self._flushed = time.monotonic()

    def add_scalars(self, step: int, scalars: list[tuple[str, float]]) -> None:
        """One event holding `scalars` (``(tag, value)``) at `step`; in the file
        within a few seconds, and at close."""
        self._pending.append(_record(encode_event(time.time(), step, scalars)))
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

"""TensorBoard event files, written directly: the TFRecord framing (length,
masked CRC-32C, an ``Event`` protocol buffer, its masked CRC-32C) of
``Event`` messages that each hold the scalars of one result.

Only what scalars need is encoded (``Event.wall_time``, ``step``,
``file_version``, ``summary.value[].tag`` / ``simple_value``), by hand: no
tensorboardX, protobuf or numpy import, and no writer thread per trial, so
a trial's events cost a few microseconds per result in the driver.
"""
from __future__ import annotations

import os
import socket
import struct
import time

__all__ = ["EventFileWriter", "crc32c"]

_FLUSH_INTERVAL_S = 5.0
_table: list[int] | None = None


def _crc_table() -> list[int]:
    global _table
    if _table is None:
        table = []
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
        _table = table
    return _table


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord files use."""
    table = _crc_table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64, two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
           scalars: list[tuple[str, float]] = ()) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time)                 # 1: wall_time (double)
    if step is not None:
        out += b"\x10" + _varint(int(step))                      # 2: step (int64)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())            # 3: file_version
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) +     # Value.tag
                         b"\x15" + struct.pack("<f", value))     # Value.simple_value
            for tag, value in scalars)
        out += _field_bytes(5, values)                           # 5: summary
    return out


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + _masked(header) + data + _masked(data)


class EventFileWriter:
    """One ``events.out.tfevents.<time>.<host>.<pid>.<n>`` file in `logdir`."""

    _count = 0

    def __init__(self, logdir: str):
        EventFileWriter._count += 1
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{EventFileWriter._count}")
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._flushed = time.monotonic()

    def add_scalars(self, step: int, scalars: list[tuple[str, float]]) -> None:
        """One event holding `scalars` (``(tag, value)``) at `step`; flushed to
        the file at most every few seconds, and on close."""
        self._file.write(_record(_event(time.time(), step, scalars=scalars)))
        now = time.monotonic()
        if now - self._flushed >= _FLUSH_INTERVAL_S:
            self._file.flush()
            self._flushed = now

    def close(self) -> None:
        self._file.close()

"""A work counter that the workers of one host advance themselves.

``WorkerSet.claimed`` hands every worker the whole list of items and a
`ClaimCounter`'s ticket; each worker takes the next unclaimed item when it is
free, so the workers end within one item of each other without the driver
handing out slices (a round trip each, which on 2 cores takes CPU from the
workers). The counter is 32 bytes in an anonymous memory file of the driver
(``memfd_create``: nothing is left behind whatever way the driver ends) that
a worker on the same host opens through ``/proc/<pid>/fd/<fd>``; a random
token in the file's name and in its first bytes makes sure it opened that
very file. Claims are taken under ``flock``, one at a time; a ticket carries
the counter's generation, and a claim against another generation (a call of
an earlier round still running) gets nothing. Where the file cannot be opened
(a worker on another host or in another pid namespace, a system without
memfd), `attach` returns None and the caller runs the items otherwise.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import struct
import time
import weakref

__all__ = ["ClaimCounter", "attach"]

_LAYOUT = struct.Struct("<16sqq")   # token, generation, next index
_NAME = "beamlet-claims-"
#: Seconds the driver waits for the counter's lock to start a new round: a
#: worker holds it for one read and one write, so only a worker that is
#: stopped (SIGSTOP, a debugger) holds it longer. (Workers wait for it without
#: a deadline: a blocking ``flock`` hands it over at once, where polling would
#: let one worker take every claim; a stopped worker holds its round up anyway.)
LOCK_TIMEOUT = 30.0


def _lock_within_timeout(fd: int) -> None:
    """Take the counter's lock, waiting at most `LOCK_TIMEOUT` seconds."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    until = time.monotonic() + LOCK_TIMEOUT
    pause = 0.0001
    while True:
        time.sleep(pause)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > until:
                raise TimeoutError(f"the claim counter's lock was held for over {LOCK_TIMEOUT} s "
                                   f"(a worker holding it is stopped?)") from None
            pause = min(pause * 2, 0.01)


class ClaimCounter:
    """The driver's side: ``ticket()`` starts a new round (the next claim is
    item 0) and returns what a worker needs to `attach` to it. Raises OSError
    where memory files are not available."""

    def __init__(self):
        if not hasattr(os, "memfd_create"):
            raise OSError("memfd_create is not available here")
        self.token = secrets.token_bytes(16)
        self.fd = os.memfd_create(_NAME + self.token.hex(), os.MFD_CLOEXEC)
        self._close = weakref.finalize(self, os.close, self.fd)
        self.generation = 0
        self._write(0)

    def _write(self, next_index: int) -> None:
        _lock_within_timeout(self.fd)
        try:
            os.pwrite(self.fd, _LAYOUT.pack(self.token, self.generation, next_index), 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def ticket(self) -> tuple:
        """A new round: ``(pid, fd, token, generation)``, picklable."""
        if not self._close.alive:
            raise ValueError("the claim counter is closed")
        self.generation += 1
        self._write(0)
        return (os.getpid(), self.fd, self.token, self.generation)

    def close(self) -> None:
        self._close()


class _Attached:
    """A worker's side of a ticket (a descriptor of its own, so that ``flock``
    excludes threads of one process too): ``claim()`` is the next item's
    index, or None once the ticket's round is over (the driver started
    another). A context manager that closes the descriptor."""

    def __init__(self, fd: int, token: bytes, generation: int):
        self.fd, self.token, self.generation = fd, token, generation

    def claim(self) -> int | None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            token, generation, index = _LAYOUT.unpack(os.pread(self.fd, _LAYOUT.size, 0))
            if token != self.token or generation != self.generation:
                return None
            os.pwrite(self.fd, _LAYOUT.pack(token, generation, index + 1), 0)
            return index
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def indices(self, count: int):
        """Claimed indices below `count`, one at a time, until none is left."""
        while True:
            index = self.claim()
            if index is None or index >= count:
                return
            yield index

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def attach(ticket: tuple) -> _Attached | None:
    """The counter of `ticket` (`ClaimCounter.ticket`) opened in this process,
    or None if it cannot be reached from here."""
    pid, fd, token, generation = ticket
    path = f"/proc/{int(pid)}/fd/{int(fd)}"
    try:
        # (The name first: /proc/<pid> may be another process here.)
        if not os.readlink(path).startswith("/memfd:" + _NAME + token.hex()):
            return None
        mine = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.pread(mine, 16, 0) == token:
            return _Attached(mine, token, generation)
    except OSError:
        pass
    os.close(mine)
    return None

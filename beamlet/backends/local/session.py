"""A local-backend session's claim on the machine, and the sweep of what dead
sessions left behind.

Each session holds an exclusive ``flock`` on ``/dev/shm/beamlet-{session}.lock``
(mode 0600, created before any segment of the session, holding the path of its
private temp dir). The driver holds it, and so does its zygote, which inherits
the descriptor (workers close it): the lock is free only once every process
that would clean up after the session is gone. Both remove the lock file last,
after the session's segments and temp dir.

`sweep` (run by ``init()``) removes, for this user only, the segments, temp
dirs and lock files of sessions whose lock it can take: their processes all
died without cleaning up (an OOM or cgroup kill). It lists /dev/shm once and
never touches a live session.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
import tempfile
import time

from ... import exceptions as exc
from . import shm

_PREFIX = "beamlet-"
LOCK_SUFFIX = ".lock"
#: A lock file still empty after this many seconds belongs to a session that
#: died while starting (its creator writes it while holding the lock).
EMPTY_LOCK_GRACE = 60.0


def lock_path(session: str) -> str:
    return os.path.join(shm.SHM_DIR, f"{_PREFIX}{session}{LOCK_SUFFIX}")


class SessionLock:
    """A new session: a random id, a private temp dir (``tempfile.mkdtemp``,
    0700, never an existing one) and the session's lock, held."""

    def __init__(self):
        for _ in range(shm.NAME_ATTEMPTS):
            session = secrets.token_hex(8)
            temp_dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{session}-")
            try:
                fd = os.open(lock_path(session), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC,
                             0o600)
            except FileExistsError:
                os.rmdir(temp_dir)
                continue
            break
        else:
            raise exc.BackendError(f"no free session lock name in {shm.SHM_DIR} after "
                                   f"{shm.NAME_ATTEMPTS} attempts")
        # A sweep may hold it for a moment (it saw the file empty and leaves it be).
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, temp_dir.encode())
        self.session = session
        self.temp_dir = temp_dir
        self.path = lock_path(session)
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and let the lock go (call it after the cleanup)."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def sweep() -> list[str]:
    """Remove what dead sessions of this user left behind; returns their ids.

    A session is dead when its lock file can be locked. A segment whose session
    has no lock file is removed too, unless a process listens at the session's
    socket (sessions of beamlet versions before the lock file)."""
    try:
        names = os.listdir(shm.SHM_DIR)
    except OSError:
        return []
    locks: set[str] = set()
    segments: dict[str, list[str]] = {}
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        rest = name[len(_PREFIX):]
        if rest.endswith(LOCK_SUFFIX):
            locks.add(rest[:-len(LOCK_SUFFIX)])
        else:
            session, dash, _ = rest.partition("-")
            if dash:
                segments.setdefault(session, []).append(name)
    uid = os.getuid()
    swept = []
    for session in locks:
        if _sweep_if_dead(session, segments.pop(session, ()), uid):
            swept.append(session)
    # A session makes its lock before any segment: look again (a direct lookup, not
    # the listing) so that one that started during the listing is left alone.
    orphans = [s for s in segments if not os.path.lexists(lock_path(s))]
    if orphans:
        listening = _listening_sockets()
        for session in orphans:
            if listening is not None and f"@{_PREFIX}{session}" not in listening:
                for name in segments[session]:
                    _unlink_own(os.path.join(shm.SHM_DIR, name), uid)
                swept.append(session)
    return swept


def _sweep_if_dead(session: str, segment_names, uid: int) -> bool:
    path = lock_path(session)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False  # gone meanwhile, or not ours to read
    try:
        st = os.fstat(fd)
        if st.st_uid != uid or not stat.S_ISREG(st.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # alive
        try:
            if os.lstat(path).st_ino != st.st_ino:
                return False  # swept by another process, a new file in its place
        except FileNotFoundError:
            return False
        temp_dir = os.read(fd, 4096).decode(errors="replace")
        if not temp_dir:
            # Its creator writes it under the lock: empty and unlocked means it is
            # starting right now (leave it) or died starting (then nothing else exists).
            if time.time() - st.st_mtime > EMPTY_LOCK_GRACE:
                os.unlink(path)
                return True
            return False
        for name in segment_names:
            _unlink_own(os.path.join(shm.SHM_DIR, name), uid)
        _remove_temp_dir(session, temp_dir, uid)
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _unlink_own(path: str, uid: int) -> None:
    try:
        if os.lstat(path).st_uid == uid:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_temp_dir(session: str, path: str, uid: int) -> None:
    """Remove the temp dir a dead session's lock names, if it is what it should be."""
    if not os.path.isabs(path) or not os.path.basename(path).startswith(f"{_PREFIX}{session}-"):
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
        shutil.rmtree(path, ignore_errors=True)


def _listening_sockets() -> set[str] | None:
    """The abstract Unix socket names bound on this machine, or None if unknown."""
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            return {parts[-1] for parts in (line.split() for line in f) if len(parts) >= 8}
    except OSError:
        return None

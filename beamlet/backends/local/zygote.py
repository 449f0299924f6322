"""The zygote: a process that has already imported beamlet (and numpy with
numpy.random, once the first workers are out) and forks a worker in about a
millisecond when asked.

Started by the driver in its own session (so a Ctrl-C in the driver's
terminal reaches only the driver). The first line on its stdin is the
session's secret (hex): workers prove they hold it when they connect, and
inherit it by fork; it is never in a command line, which any user can read.
Then it reads commands from stdin, one per line:

    fork WORKER_ID     fork a worker that connects back to the driver
    import MODULE      import MODULE now, so that the workers forked after have
                       it (a library about to make many workers, e.g. beamlet.tune;
                       a module that fails to import is left to the workers)
    exit               wait briefly for the workers to leave, then clean up

SIGTERM (sent by the driver right after ``exit``) means the same, and is
acted on even while the zygote is loading numpy, which can take a good part
of a second that `shutdown()` would otherwise spend waiting. It is blocked
except while the zygote is idle (waiting on stdin, or loading numpy), so it
never interrupts a fork or the reaping of a child.

End of file on stdin means the driver is gone (even if it was SIGKILLed): the
zygote kills the workers it forked, removes the session's shared-memory
segments, temp dir and lock file, and exits. The workers also notice the
driver's socket closing and exit on their own.

The zygote holds the session's lock (an inherited descriptor, see
session.py) until its cleanup is done; workers close it, so that a worker
that outlives the zygote does not keep a dead session looking alive.
"""
from __future__ import annotations

import importlib
import os
import select
import shutil
import signal
import sys
import time


class _Stop(Exception):
    """SIGTERM arrived: stop serving and clean up."""


_stopping = False  # a SIGTERM arrived (see the numpy preload in _serve)


def _on_sigterm(signum, frame):
    global _stopping
    _stopping = True
    raise _Stop


class _interruptible:
    """Lets a blocked SIGTERM through (raising `_Stop`) for the duration of the block."""

    def __enter__(self):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def __exit__(self, *exc_info):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


def _cleanup(children: set[int], session: str, temp_dir: str, grace: float,
             remove_lock: bool) -> None:
    from .session import lock_path
    from .shm import remove_session_segments
    until = time.monotonic() + grace
    while children and time.monotonic() < until:
        _reap(children)
        time.sleep(0.01)
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    until = time.monotonic() + 5
    while children and time.monotonic() < until:
        _reap(children)
        time.sleep(0.005)
    remove_session_segments(session)
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if remove_lock:  # (the driver, when alive, removes it last itself)
        try:
            os.unlink(lock_path(session))
        except FileNotFoundError:
            pass


def _fork_worker(address: str, worker_id: str, secret: bytes, lock_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    # In the child: become a worker. Never return into the zygote's loop.
    code = 0
    try:
        os.close(lock_fd)
        os.close(0)
        os.open(os.devnull, os.O_RDONLY)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # (inherited blocked)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Forked children would share one state. (Only a numpy.random loaded
        # here: asking numpy for it imports it, some 15 ms of CPU in each worker,
        # and one imported later seeds itself from the OS.)
        random = sys.modules.get("numpy.random")
        if random is not None:
            random.seed()
        from .worker import main
        main(address, worker_id, secret)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _read_secret(fd: int) -> tuple[bytes | None, bytes]:
    """The secret from the first line on `fd`, and what came after it; (None,
    b"") at end of file."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 4096)
        if not chunk:
            return None, b""
        data += chunk
    line, rest = data.split(b"\n", 1)
    try:
        return bytes.fromhex(line.decode()), rest
    except ValueError:
        # (e.g. started by a driver of another beamlet version)
        raise SystemExit("beamlet zygote: the first line on stdin must be the session's "
                         "secret, in hex") from None


def main() -> None:
    session, address, temp_dir, lock_fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, _on_sigterm)
    children: set[int] = set()
    try:
        grace, remove_lock = _serve(session, address, lock_fd, children)
    except _Stop:
        grace, remove_lock = 2.0, False  # (from the driver, which removes the lock itself)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _cleanup(children, session, temp_dir, grace=grace, remove_lock=remove_lock)


def _serve(session: str, address: str, lock_fd: int, children: set[int]) -> tuple[float, bool]:
    """Fork workers on request until told to stop; returns how long to give them
    to leave and whether to remove the session's lock file (the driver, when
    alive, removes it last itself)."""
    with _interruptible():
        secret, pending = _read_secret(sys.stdin.buffer.fileno())
    if secret is None:  # the driver died before it could tell us
        return 0.0, True
    # Warm the imports every worker needs, once, before any fork: also beamlet's
    # API (its names load on first use), which a task's module reaches as soon
    # as it is imported in the worker (`@ray.remote` at its top): else each of
    # many workers imports it anew (some 9 ms of CPU each, measured).
    from . import worker  # noqa: F401
    from ...core import execution  # noqa: F401
    import beamlet
    for name in beamlet.__all__:
        getattr(beamlet, name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    numpy_loaded = False
    while True:
        *lines, pending = pending.split(b"\n")
        for line in lines:
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "fork":
                children.add(_fork_worker(address, words[1], secret, lock_fd))
            elif words[0] == "import" and len(words) == 2:
                try:
                    importlib.import_module(words[1])
                except BaseException:  # noqa: BLE001 - the worker that needs it reports it
                    pass
            elif words[0] == "exit":
                return 2.0, False
        # The first workers (asked for at init) are forked before numpy is loaded,
        # which saves its ~70 ms from the time to the first result; it is loaded at
        # the first idle moment, so later workers share its pages, numpy.random's
        # too (each worker re-seeds it, see _fork_worker).
        with _interruptible():
            ready, _, _ = select.select([stdin], [], [], 0 if not numpy_loaded else 0.5)
        _reap(children)
        if not ready:
            if not numpy_loaded:
                try:
                    with _interruptible():
                        import numpy  # noqa: F401
                        import numpy.random  # noqa: F401 - (numpy 2 loads it on first use)
                except Exception as err:  # noqa: BLE001
                    # A SIGTERM landing inside numpy's C import comes out as another
                    # error (numpy's ImportError: our _Stop swallowed on the way): stop
                    # as asked, without a traceback. A numpy that does not import:
                    # workers that need it import it themselves, and say so.
                    if _stopping:
                        raise _Stop from None
                    if not isinstance(err, ImportError):
                        raise
                numpy_loaded = True
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the driver is gone
            return 0.5, True
        pending += chunk


if __name__ == "__main__":
    main()
    # Everything is cleaned up: skip the interpreter's teardown, which takes a
    # good part of a second with numpy loaded (and `shutdown()` waits for it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

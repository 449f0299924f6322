"""Starting worker processes: a zygote that forks them on request.

Forking from a process that has already imported beamlet (and numpy) makes
a new worker ready in milliseconds instead of the ~100 ms a fresh
interpreter takes; workers keep running when the zygote dies, since they
belong to the node that awaits them, not to the zygote.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from ... import exceptions as exc

MAX_ZYGOTE_FAILURES = 3  # zygote deaths in a row (no worker connecting) before giving up


class WorkerLauncher:
    """Starts the zygote and asks it to fork workers; starts a new zygote if the
    one it had died (workers it forked live on: they belong to the driver).

    The session's secret reaches the zygote as the first line on its stdin
    (never in its command line or environment, which other users can read);
    the workers inherit it by fork. A zygote that dies `MAX_ZYGOTE_FAILURES`
    times in a row without a worker of it connecting in between, or that
    cannot be started at all, makes the launcher give up: `error` says why,
    and `fork` raises it."""

    def __init__(self, session: str, address: str, temp_dir: str, secret: bytes,
                 lock_fd: int):
        # The zygote inherits the session's lock (see session.py), and holds it
        # until it has cleaned up.
        self._argv = [sys.executable, "-m", "beamlet.backends.local.zygote", session, address,
                      temp_dir, str(lock_fd)]
        self._lock_fd = lock_fd
        self._secret_line = secret.hex().encode() + b"\n"
        env = dict(os.environ)
        # The zygote (and so every worker) imports what the driver can import.
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        # One BLAS/OpenMP thread per worker unless the user chose (as Ray does): with
        # a thread per core in every worker, numpy's threads fight over the cores
        # and small matrix products run ~10x slower. It must be set before the
        # zygote loads numpy, which reads it once.
        env.setdefault("OMP_NUM_THREADS", "1")
        self._env = env
        self._lock = threading.Lock()
        self._failures = 0  # zygotes that died since a worker last connected
        self._preloaded: list[str] = []  # modules the zygote imports (see preload)
        self.error: exc.BackendError | None = None
        self._spawn()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, env=self._env,
                                     start_new_session=True, close_fds=True,
                                     pass_fds=(self._lock_fd,))
        try:
            self.proc.stdin.write(self._secret_line +
                                  b"".join(f"import {m}\n".encode() for m in self._preloaded))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died at once: seen as dead like any other

    def _respawn(self) -> None:
        """Start a new zygote in place of the dead one, or give up. Lock held."""
        self._failures += 1
        if self._failures > MAX_ZYGOTE_FAILURES:
            self.error = exc.BackendError(
                f"cannot start worker processes: the zygote that forks them exited "
                f"{self._failures} times in a row (last exit status {self.proc.returncode})")
            return
        try:
            self._spawn()
        except OSError as err:
            self.error = exc.BackendError(f"cannot start worker processes: starting the "
                                          f"zygote failed: {err}")

    def worker_started(self) -> None:
        """A worker connected: the zygote works."""
        self._failures = 0

    def relaunch_if_dead(self) -> bool:
        """Start a new zygote if the current one died; True if it did."""
        with self._lock:
            if self.error is not None or self.proc.poll() is None:
                return False
            self._respawn()
            return self.error is None

    def preload(self, modules: list[str]) -> None:
        """Have the zygote (and any that replaces it) import `modules`, so that
        the workers it forks from then on have them (see zygote.py)."""
        with self._lock:
            new = [m for m in modules if m not in self._preloaded]
            for name in new:
                if not name.replace(".", "").replace("_", "").isalnum():
                    raise ValueError(f"not a module name: {name!r}")
            self._preloaded.extend(new)
            if new and self.error is None:
                try:
                    self.proc.stdin.write(b"".join(f"import {m}\n".encode() for m in new))
                    self.proc.stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    pass  # dead: the next fork respawns it, with the modules

    def fork(self, worker_id: str) -> None:
        """Ask for a worker; BackendError if the launcher gave up."""
        with self._lock:
            while self.error is None:
                try:
                    self.proc.stdin.write(f"fork {worker_id}\n".encode())
                    self.proc.stdin.flush()
                    return
                except (BrokenPipeError, ValueError, OSError):
                    try:
                        self.proc.wait(5)  # it is dead (or its stdin is): reap it
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(5)
                    self._respawn()
            raise self.error

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            try:
                self.proc.stdin.write(b"exit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
            if self.proc.poll() is None:
                # (The same as "exit", but heard even while it is loading numpy.)
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

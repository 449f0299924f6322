"""Helpers for tests that look at real processes, shared memory and files.

The only signals sent from here are `Driver.kill()` and `Driver.stop()`, to a
driver subprocess the test itself started; tests signal nothing else but pids the backend reports as
its own. Everything polls with a deadline instead of
sleeping a fixed time, so a leak fails with a clear message rather than a hang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHM_DIR = "/dev/shm"
REPO = Path(__file__).resolve().parent.parent


# -- processes -----------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0]), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells pid reuse apart)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def proc_id(pid: int) -> tuple[int, int | None]:
    """(pid, start time): identifies one process even if its pid is reused later."""
    return (pid, start_time(pid))


def alive(proc: tuple[int, int | None]) -> bool:
    """True while the process `proc` (from proc_id) exists and is not a zombie."""
    pid, started = proc
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc, no signal sent)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; its last value."""
    until = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > until:
            return bool(predicate())
        time.sleep(interval)


def eventually(predicate, what: str = "the condition", timeout: float = 20.0,
               interval: float = 0.02):
    """Poll `predicate` until it gives a true value, and return that value; fail
    the test, naming `what`, once `timeout` seconds have passed."""
    until = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait up to `timeout` s for the processes `pids` to end (a zombie counts
    as ended); the pids still alive then."""
    procs = [proc_id(pid) for pid in pids]
    wait_until(lambda: not any(alive(p) for p in procs), timeout, interval=0.1)
    return [p[0] for p in procs if alive(p)]


# -- the local backend's footprint -----------------------------------------------------
def segments(session: str) -> list[str]:
    """Names of the shared-memory segments of a local-backend session."""
    prefix = f"beamlet-{session}-"
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def segment_bytes(session: str) -> int:
    """Bytes of the session's segment files (a file seen under two names while
    it is being renamed counts once)."""
    sizes = {}
    for name in segments(session):
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue
        sizes[st.st_ino] = st.st_size
    return sum(sizes.values())


def lock_file(session: str) -> str:
    """The lock file that marks a local-backend session as alive while locked."""
    return os.path.join(SHM_DIR, f"beamlet-{session}.lock")


def footprint(backend) -> dict:
    """What a LocalBackend made, to check later that all of it is gone:
    its session, temp dir, lock file, and zygote and worker processes (as
    proc_ids; "zygote" is the zygote's)."""
    zygote = backend.node.launcher.proc.pid
    pids = {zygote}
    pids.update(w.pid for w in list(backend.scheduler.workers.values()) if w.pid)
    pids.update(children_of(zygote))  # also workers still starting
    return {"session": backend.session, "temp_dir": backend.temp_dir,
            "lock": lock_file(backend.session), "zygote": proc_id(zygote),
            "procs": [proc_id(p) for p in sorted(pids)]}


def leftovers(fp: dict) -> list[str]:
    """What of footprint `fp` still exists (empty when all is gone)."""
    out = [f"process {pid} is alive" for pid, st in fp["procs"] if alive((pid, st))]
    out += [f"segment {name} exists" for name in segments(fp["session"])]
    if os.path.exists(fp["temp_dir"]):
        out.append(f"temp dir {fp['temp_dir']} exists")
    if os.path.exists(fp["lock"]):
        out.append(f"lock file {fp['lock']} exists")
    return out


def assert_all_gone(fp: dict, timeout: float = 10.0) -> None:
    wait_until(lambda: not leftovers(fp), timeout, 0.05)
    left = leftovers(fp)
    assert not left, f"left behind after {timeout}s: {left}"


def assert_store_matches_shm(backend, timeout: float = 10.0) -> None:
    """The session's segment files are exactly the live objects plus the warm
    pool, and nothing is being written (unsealed).

    Objects whose last ref just went are freed by the I/O thread a moment
    later (and a freed segment moves to the pool in two steps), so the store's
    figures and /dev/shm may disagree for that moment: they must agree once
    it has passed."""
    store = backend.object_store
    last = {}

    def agree() -> bool:
        stats = store.stats()
        on_disk = segment_bytes(backend.session)
        last["seen"] = (stats, on_disk)
        return (stats.get("unsealed_bytes", 0) == 0
                and stats["pool_bytes"] <= store.pool.capacity
                and on_disk == stats["shm_bytes"] + stats["pool_bytes"]
                and store.stats() == stats)  # (nothing moved meanwhile)

    assert wait_until(agree, timeout), f"store figures and /dev/shm disagree: {last['seen']}"


# -- memory -------------------------------------------------------------------------
def mapping_of(address: int) -> str | None:
    """The path of the mapping of this process that holds `address` ("" if anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return None


def shm_mapping_of(array) -> str | None:
    """The /dev/shm/beamlet-* file that the data of numpy `array` lives in, or None.

    Works in any process (tasks call it to look at their arguments)."""
    address = array.__array_interface__["data"][0]
    path = mapping_of(address)
    if path and path.startswith(f"{SHM_DIR}/beamlet-"):
        return path
    return None


def describe_array(array) -> dict:
    """How a task sees an array: writable? in a beamlet segment? (JSON-friendly)."""
    return {"writeable": bool(array.flags.writeable), "segment": shm_mapping_of(array),
            "pid": os.getpid(), "sum": float(array.sum())}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


_SYS_PIDFD_GETFD = 438  # (the same number on every architecture)


def hold_file_of(pid: int, path: str) -> int:
    """A descriptor in this process for the open file that process `pid` has on
    `path` (a copy of its descriptor, taken with pidfd_getfd, Linux 5.6+): a flock
    the process holds on it stays held while this copy is open, whatever happens
    to `pid`. The caller closes it (os.close)."""
    import ctypes
    import errno
    fds = [fd for fd in os.listdir(f"/proc/{pid}/fd")
           if os.path.realpath(f"/proc/{pid}/fd/{fd}") == os.path.realpath(path)]
    assert fds, f"process {pid} has no descriptor open on {path}"
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fds[0]), 0)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"pidfd_getfd of {pid}'s {path}: {os.strerror(code)}"
                          + (" (Linux 5.6 or later needed)" if code == errno.ENOSYS else ""))
        return fd
    finally:
        os.close(pidfd)


# -- files as cross-process counters and logs -------------------------------------------------
def touch_new(directory: str, prefix: str = "a") -> int:
    """Create a new file in `directory`; returns how many such files existed before."""
    before = len([n for n in os.listdir(directory) if n.startswith(prefix)])
    fd, _ = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.close(fd)
    return before


def count(directory: str, prefix: str = "a") -> int:
    return len([n for n in os.listdir(directory) if n.startswith(prefix)])


def barrier(directory: str, n: int, timeout: float = 20.0) -> bool:
    """Arrive at a barrier of `n` parties kept as files in `directory`; True if
    all `n` arrived within `timeout` (so they were running at the same time)."""
    touch_new(directory, "b")
    return wait_until(lambda: count(directory, "b") >= n, timeout, 0.01)


# -- subprocess drivers --------------------------------------------------------------------
def driver_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("BEAMLET_BACKEND", None)
    return env


class Driver:
    """A driver program run as a subprocess; threads collect its stdout and stderr
    line by line, so a test can wait for a line and still get all output at the end."""

    def __init__(self, script: str, tmp_path: Path, args=(), stdin: str | None = None,
                 cwd: Path | None = None):
        """Run `script` (written to `tmp_path`) with `args`, in `cwd` (default
        `tmp_path`); `stdin` (e.g. a secret, never in argv) is written to its
        standard input, which is then closed."""
        # Each driver its own file: rewriting a shared one could truncate it under
        # an earlier driver still starting (which then runs an empty program).
        fd, name = tempfile.mkstemp(prefix="driver-", suffix=".py", dir=tmp_path)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        path = Path(name)
        self.proc = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=driver_env(),
                                     cwd=str(cwd or tmp_path),
                                     stdin=None if stdin is None else subprocess.PIPE)
        if stdin is not None:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.pid = self.proc.pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self._out),
                                          daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self._err),
                                          daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, lines: list) -> None:
        for line in stream:
            with self._cond:
                lines.append(line)
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    def wait_line(self, marker: str, timeout: float = 60.0) -> str:
        """Wait for a stdout line starting with `marker`; return the rest of it."""
        until = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._out:
                    if line.startswith(marker):
                        return line[len(marker):].rstrip("\n")
                left = until - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._readers[0].is_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(f"the driver printed no {marker.strip()!r} line within {timeout}s; "
                             f"stdout: {self.stdout!r}; stderr: {self.stderr[-3000:]!r}")

    def footprint(self, timeout: float = 60.0) -> dict:
        """The footprint the driver printed (see PRINT_FOOTPRINT)."""
        info = json.loads(self.wait_line("FOOTPRINT ", timeout))
        return dict(info, procs=[tuple(p) for p in info["procs"]], zygote=tuple(info["zygote"]))

    def finish(self, timeout: float) -> int:
        """Wait for the driver to exit (killing it after `timeout`); its return code."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the driver did not exit within {timeout}s; "
                                 f"stdout: {self.stdout!r}; stderr: {self.stderr[-3000:]!r}")
        for t in self._readers:
            t.join(10)
        return self.proc.returncode

    def stop(self) -> None:
        """SIGSTOP the driver (our own child): it runs no more until killed."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL the driver (our own child) if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# Code a subprocess driver runs to print its footprint (see `footprint`).
PRINT_FOOTPRINT = """
import json as _json
from beamlet.core import runtime as _rt
import procs as _procs
print("FOOTPRINT " + _json.dumps(_procs.footprint(_rt.current().backend)), flush=True)
"""

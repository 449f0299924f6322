"""What ``beamlet start`` leaves on this machine for the commands after it.

One private directory per user (``~/.beamlet``, or ``$BEAMLET_STATE_DIR``),
0700 and owned by the user, or it is refused. In it:

- ``cluster.json`` (0600): the address and token of the cluster whose head
  runs here (what ``init(address="auto")``, ``beamlet status`` and
  ``beamlet stop`` use when not told otherwise);
- ``processes/<pid>.json`` (0600): one record per daemon ``beamlet start``
  started (its pid, its start time as the kernel counts it, its role and
  address), so that ``beamlet stop`` ends exactly those processes: a pid
  reused by another program since has another start time and is left alone;
- ``logs/``: each daemon's output.
"""
from __future__ import annotations

import json
import os
import stat

from ... import exceptions as exc

STATE_DIR_ENV = "BEAMLET_STATE_DIR"
CLUSTER_FILE = "cluster.json"


def _private_dir(path: str) -> str:
    """Make `path` (0700) or check an existing one is ours and private."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise exc.BackendError(f"cannot create beamlet's state directory {path}: {err}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise exc.BackendError(f"{path} is not a directory of this user: beamlet will not keep "
                               f"its cluster token there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise exc.BackendError(f"{path} is readable by other users (mode "
                               f"{stat.S_IMODE(st.st_mode):o}); make it private with "
                               f"chmod 700 {path}")
    return path


def _write_private(path: str, data: dict) -> None:
    """Write JSON to `path` as a 0600 file, atomically (a reader never sees half)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise exc.BackendError(f"cannot read {path}: {err}") from None


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (the state is
    [0], the start time [19]), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return data[data.rindex(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot, from /proc), or None
    if there is no such process: with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def process_running(pid: int, start_time: int | None) -> bool:
    """True while the process `pid` that started at `start_time` (None: any)
    runs. A zombie has ended: it holds no socket, memory or file any more, and
    its parent (for a daemon, the machine's init, which may take seconds) has
    only to reap it."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return False
    return start_time is None or int(fields[19]) == start_time


class StateDir:
    """This user's beamlet state directory (see the module docstring)."""

    def __init__(self, path: str | None = None):
        path = path or os.environ.get(STATE_DIR_ENV) or os.path.join(
            os.path.expanduser("~"), ".beamlet")
        self.path = _private_dir(path)
        self.processes_dir = _private_dir(os.path.join(self.path, "processes"))
        self.logs_dir = _private_dir(os.path.join(self.path, "logs"))

    # -- the cluster whose head runs here ------------------------------------------
    def write_cluster(self, address: str, token: str) -> None:
        _write_private(os.path.join(self.path, CLUSTER_FILE),
                       {"address": address, "token": token})

    def cluster(self) -> dict | None:
        """``{"address", "token"}`` of the cluster started here, or None."""
        return _read(os.path.join(self.path, CLUSTER_FILE))

    def forget_cluster(self) -> None:
        try:
            os.unlink(os.path.join(self.path, CLUSTER_FILE))
        except FileNotFoundError:
            pass

    # -- the daemons started here -------------------------------------------------
    def record_process(self, pid: int, role: str, address: str) -> None:
        start = process_start_time(pid)
        if start is None:
            raise exc.BackendError(f"the {role} process (pid {pid}) exited at once")
        _write_private(os.path.join(self.processes_dir, f"{pid}.json"),
                       {"pid": pid, "start_time": start, "role": role, "address": address})

    def processes(self) -> list[dict]:
        """The records of daemons started here that still run (records of
        processes that are gone, or whose pid now names another process, are
        removed)."""
        out = []
        for name in sorted(os.listdir(self.processes_dir)):
            path = os.path.join(self.processes_dir, name)
            record = _read(path) if name.endswith(".json") else None
            if record is None:
                continue
            if process_start_time(record["pid"]) != record["start_time"]:
                self.forget_process(record["pid"])
                continue
            out.append(record)
        return out

    def forget_process(self, pid: int) -> None:
        try:
            os.unlink(os.path.join(self.processes_dir, f"{pid}.json"))
        except FileNotFoundError:
            pass

    def log_path(self, role: str, pid_hint: str) -> str:
        return os.path.join(self.logs_dir, f"{role}-{pid_hint}.log")

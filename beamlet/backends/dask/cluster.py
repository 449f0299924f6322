"""The LocalCluster that ``init(backend="dask")`` starts when given no address.

It runs in a child process of the driver (``python -m
beamlet.backends.dask.cluster``), not in the driver itself: Dask starts its
worker processes with ``spawn``, which re-runs the parent's main module, and a
beamlet program's main module is rarely guarded by ``if __name__ ==
"__main__"``. The child prints the scheduler's address on its first line of
output and stops the cluster when its standard input closes, which the driver
does at shutdown (or the kernel does, when the driver dies). Its workers'
scratch dir is swept at a later start if the child is killed before removing
it (see `main`).

Every connection into that cluster (``beamlet://``, see ``comm.py``) proves
first that it holds a key made for this session alone: a process without it
cannot connect, submit work or read objects. The driver passes the key to
the child on its standard input, never on the command line (which other
users can read).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from ... import exceptions as exc

_START_TIMEOUT = 60.0
_SCHEME = "beamlet"  # (comm.SCHEME: not imported here, which would import Dask)
_STOP_TIMEOUT = 20.0


class ClusterProcess:
    """A LocalCluster in a child process: ``address`` once its scheduler listens;
    `ready()` once its workers do; `stop()`."""

    def __init__(self, n_workers: int, resources: dict, dashboard: bool = False,
                 wait: bool = True):
        """`wait`: return once the workers are up (else the caller calls `ready`
        when it needs them, having connected to the scheduler meanwhile)."""
        # (Started first: it imports Dask while this process does, and makes the key.)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "beamlet.backends.dask.cluster"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            from .comm import KeyedSecurity, new_key
            key = new_key()
            #: What a client needs to connect (it holds the session's key).
            self.security = KeyedSecurity(key)
        except BaseException:
            self._proc.stdin.close()  # (it exits at once, unstarted)
            self._proc.wait(_STOP_TIMEOUT)
            self._proc.stdout.close()
            raise
        spec = {"n_workers": n_workers, "resources": resources, "dashboard": dashboard,
                "key": key.hex()}
        try:
            self._proc.stdin.write(json.dumps(spec) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # (it died at once: _read_address says so)
        self.address = self._read_address()
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until every worker has joined; BackendError if they do not
        within the start timeout (the cluster is then stopped)."""
        import threading
        said: list = []
        reader = threading.Thread(target=lambda: said.append(self._proc.stdout.readline()),
                                  name="beamlet-dask-ready", daemon=True)
        reader.start()
        reader.join(_START_TIMEOUT)
        line = said[0].strip() if said else None
        if line != "ready":
            self.stop()
            reader.join(_STOP_TIMEOUT)
            raise exc.BackendError(
                f"the Dask LocalCluster's workers did not start within {_START_TIMEOUT:.0f} s"
                if line is None else f"the Dask LocalCluster's workers failed to start (it "
                f"said {line!r}; its errors are above)")

    def _read_address(self) -> str:
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(_START_TIMEOUT):
                self.stop()
                raise exc.BackendError(f"the Dask LocalCluster did not start within "
                                       f"{_START_TIMEOUT:.0f} s")
        line = self._proc.stdout.readline().strip()
        if not line.startswith(_SCHEME + "://"):
            self.stop()
            raise exc.BackendError(f"the Dask LocalCluster failed to start (it said "
                                   f"{line!r}; its errors are above)")
        return line

    def stop(self) -> None:
        """Stop the cluster and wait for its processes (killed if they linger)."""
        proc = self._proc
        if proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    import logging

    from distributed import LocalCluster

    from ..local.session import SessionLock, sweep
    from .comm import SCHEME, KeyedSecurity
    line = sys.stdin.readline()
    if not line:
        return  # (the driver gave up before sending the spec)
    spec = json.loads(line)
    security = KeyedSecurity(bytes.fromhex(spec["key"]))
    # The workers' scratch space (Dask's default is a shared /tmp/dask-scratch-space):
    # private to this cluster and removed with it. It is a local-backend session's
    # temp dir, under that session's lock, which this process holds: if it is
    # killed before its cleanup, the next start (ours or the local backend's)
    # finds the lock free and sweeps the dir.
    sweep()
    session = SessionLock()
    scratch = session.temp_dir
    import dask
    dask.config.set({"temporary-directory": scratch})
    try:
        # (Its address first, then its workers: the driver connects meanwhile.)
        cluster = LocalCluster(n_workers=0, threads_per_worker=1,
                               processes=True, resources=spec["resources"], host="127.0.0.1",
                               protocol=SCHEME + "://", security=security, local_directory=scratch,
                               silence_logs=logging.ERROR,
                               # (Dask's scheduler serves HTTP even without its
                               # dashboard, on port 8787, which another Dask may
                               # hold, and for ":0" on every interface: here on a
                               # free loopback port.)
                               scheduler_kwargs={"dashboard": spec["dashboard"],
                                                 "dashboard_address": "127.0.0.1:0"})
        try:
            print(cluster.scheduler_address, flush=True)
            cluster.scale(spec["n_workers"])
            cluster.wait_for_workers(spec["n_workers"], timeout=_START_TIMEOUT)
            print("ready", flush=True)
            sys.stdin.read()  # until the driver closes it, or dies
        finally:
            cluster.close(timeout=_STOP_TIMEOUT)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        session.release()


if __name__ == "__main__":
    main()

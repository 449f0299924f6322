"""The LocalCluster that ``init(backend="dask")`` starts when given no address.

Its scheduler runs in the driver, on an event loop thread that the driver's
Dask client shares, as in Dask's own ``LocalCluster``. Its workers are not
started by Dask's nannies, though: a nanny starts its worker with
multiprocessing's ``spawn``, which re-runs the parent's main module, and a
beamlet program's main module is rarely guarded by ``if __name__ ==
"__main__"`` (Dask's own LocalCluster fails to start in such a script: "Nanny
failed to start"). Each worker is a process of its own (``python -m
beamlet.backends.dask.cluster``, started with ``subprocess``), and the driver
does the nanny's part: it sets the environment Dask's nanny sets for its
worker (``distributed.nanny.pre-spawn-environ`` and ``environ``) and starts a
worker process again when one dies while the cluster runs, so Dask
reschedules the dead worker's tasks as with a nanny.

A worker is started before the driver imports Dask (both import it at once),
reads its spec on its standard input once the scheduler listens (the
scheduler's address and the session key: never on the command line, which
other users can read), and stops when its standard input closes: at
`Cluster.stop`, or when the driver dies. Every connection into the cluster
(``beamlet://``, see ``comm.py``) proves first that it holds that key: a
process without it cannot connect, submit work or read objects. Everything
listens on 127.0.0.1 only.

The workers' scratch dir is a local-backend session's temp dir, under that
session's lock, which the driver holds and its workers inherit: if they are
all killed before removing it, the next start (ours or the local backend's)
finds the lock free and sweeps the dir.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

from ... import exceptions as exc

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_RESTART_GAP = 1.0  # seconds between two starts of one worker at least
_SCHEME = "beamlet"  # (comm.SCHEME: not imported before the workers start)

#: Dask's defaults for ``distributed.nanny.pre-spawn-environ`` (distributed.yaml):
#: the worker's environment is made before this process imports distributed,
#: which brings them; a user's own setting of the key (read through dask.config,
#: which does not import distributed) overrides each.
_PRE_SPAWN_DEFAULTS = {"MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": 1,
                       "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


def worker_environ() -> dict:
    """The environment of a worker process: this one's, with what Dask's nanny
    sets for its worker (an existing variable wins, as with the nanny)."""
    import dask.config
    wanted = dict(_PRE_SPAWN_DEFAULTS)
    for key in ("distributed.nanny.pre-spawn-environ", "distributed.nanny.environ"):
        wanted.update(dask.config.get(key, None) or {})
    env = dict(os.environ)
    for name, value in wanted.items():
        if value is not None:
            env.setdefault(name, str(value))
    if env.get("PYTHONHASHSEED") in (None, "0"):  # (the nanny's: the same hashes everywhere)
        env["PYTHONHASHSEED"] = "6640"
    return env


class Cluster:
    """A Dask scheduler in this process and `n_workers` single-threaded worker
    processes, each with `resources`: ``address`` and ``security`` (what a
    client needs) once the scheduler listens; `ready()` once the workers have
    joined; `stop()`."""

    def __init__(self, n_workers: int, resources: dict, dashboard: bool = False,
                 wait: bool = True, spare: bool = False):
        """`wait`: return once the workers are up (else the caller calls `ready`
        when it needs them, having connected to the scheduler meanwhile).
        `spare`: keep one more worker process started (Dask imported, waiting
        for its spec), so that a worker that ends is replaced at once rather
        than after a new process's imports (seconds): for a cluster whose
        workers are restarted often (`restart_workers`), at the cost of an
        idle process."""
        from ..local.session import SessionLock, sweep
        sweep()
        self._session = SessionLock()
        self._n = n_workers
        self._resources = resources
        # Dask's workers sample their threads' stacks every 10 ms for the
        # dashboard's profile page (some 2.5% of a core each, idle or not):
        # without a dashboard nobody reads them.
        self._profile = dashboard
        self._lock = threading.Lock()
        self._stopping = False
        self._ready = False
        self._procs: list[subprocess.Popen | None] = [None] * n_workers
        self._spare: subprocess.Popen | None = None
        self._watchers: list[threading.Thread] = []
        self._scheduler = None
        self._loop_runner = None
        self._quiet = None
        try:
            self._env = worker_environ()
            # (Started first: each imports Dask while this process does.)
            for i in range(n_workers):
                self._procs[i] = self._popen()
            if spare:
                self._spare = self._popen()
            self.security = self._start_scheduler(dashboard)
            self.address = self._scheduler.address
            for i, proc in enumerate(self._procs):
                self._send_spec(i, proc)
                watcher = threading.Thread(target=self._watch, args=(i,), daemon=True,
                                           name=f"beamlet-dask-nanny-{i}")
                watcher.start()
                self._watchers.append(watcher)
        except BaseException:
            self.stop()
            raise
        if wait:
            self.ready()

    # -- the scheduler ---------------------------------------------------------------
    def _start_scheduler(self, dashboard: bool):
        """Start the scheduler on an event loop thread of its own (shared by the
        driver's client: `loop`); returns the session's KeyedSecurity."""
        from contextlib import ExitStack

        import dask.config
        from distributed import Scheduler
        from distributed.utils import LoopRunner, silence_logging_cmgr, sync

        from .comm import SCHEME, KeyedSecurity, new_key
        self._key = new_key()
        security = KeyedSecurity(self._key)
        # (As a LocalCluster does: Dask's own INFO lines, a worker joining or
        # leaving, would otherwise go to the program's stderr.)
        self._quiet = ExitStack()
        self._quiet.enter_context(silence_logging_cmgr(logging.ERROR))
        self._loop_runner = LoopRunner(asynchronous=False)
        self._loop_runner.start()
        #: The event loop the scheduler runs on.
        self.loop = self._loop_runner.loop

        # (Dask's scheduler serves HTTP even without its dashboard, on port
        # 8787, which another Dask may hold, and for ":0" on every interface:
        # here on a free loopback port. Without the dashboard it serves no
        # page at all: Dask's default routes need no key, and tell any local
        # user the cluster's logs and its running tasks' stacks.)
        routes = {} if dashboard else {"distributed.scheduler.http.routes": []}

        async def start():
            # (Its scratch dir, which Dask also puts first on this process's
            # sys.path while it runs, is the cluster's, not a shared
            # /tmp/dask-scratch-space.)
            with dask.config.set(routes):  # (read as the Scheduler is made)
                scheduler = Scheduler(host="127.0.0.1", port=0, protocol=SCHEME + "://",
                                      security=security, dashboard=dashboard,
                                      dashboard_address="127.0.0.1:0",
                                      local_directory=self._session.temp_dir)
            return await scheduler
        self._scheduler = sync(self.loop, start, callback_timeout=_START_TIMEOUT)
        #: The scheduler's own dir (on this process's sys.path while it runs).
        self.local_directory = self._scheduler.local_directory
        return security

    # -- the workers -----------------------------------------------------------------
    def _popen(self) -> subprocess.Popen:
        # (The session lock's descriptor is inherited: the lock is free, and the
        # scratch dir swept by a later start, only once every worker is gone too.)
        return subprocess.Popen([sys.executable, "-m", "beamlet.backends.dask.cluster"],
                                stdin=subprocess.PIPE, env=self._env,
                                pass_fds=(self._session.fd,))

    def _send_spec(self, index: int, proc: subprocess.Popen) -> None:
        spec = {"address": self.address, "key": self._key.hex(), "name": f"beamlet-{index}",
                "resources": self._resources, "scratch": self._session.temp_dir,
                "profile": self._profile}
        try:
            proc.stdin.write((json.dumps(spec) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            pass  # (it died at once: ready() or its watcher sees to it)

    def _watch(self, index: int) -> None:
        """(A thread per worker: the nanny's part.) Start the worker again when
        its process ends while the cluster runs (once the cluster was ready:
        before, `ready` reports the failure)."""
        while True:
            proc = self._procs[index]
            started = time.monotonic()
            proc.wait()
            with self._lock:
                if self._stopping or not self._ready:
                    return
            time.sleep(max(0.0, started + _RESTART_GAP - time.monotonic()))
            with self._lock:  # (stop() closes no new worker's stdin before its spec is in)
                if self._stopping:
                    return
                _close(proc)
                spare = self._spare
                if spare is not None:
                    self._spare = self._popen()
                if spare is None or spare.poll() is not None:
                    if spare is not None:
                        _close(spare)
                    spare = self._popen()
                proc = self._procs[index] = spare
                self._send_spec(index, proc)

    @property
    def scheduler(self):
        """The Dask ``Scheduler`` object, running on `loop` (None once stopped)."""
        return self._scheduler

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (a restarted worker's, once it was)."""
        with self._lock:
            return [p.pid for p in self._procs if p is not None]

    def restart_workers(self, addresses, timeout: float = _START_TIMEOUT) -> None:
        """Kill the worker processes at these Dask addresses (Dask's
        ``restart_workers`` needs nannies) and wait until as many new ones have
        joined; BackendError if they do not within `timeout` s."""
        addresses = set(addresses)
        pids = {pid for address, pid in self._on_loop(
            lambda: [(address, ws.pid) for address, ws in self._scheduler.workers.items()])
            if address in addresses}
        with self._lock:
            doomed = [p for p in self._procs if p is not None and p.pid in pids]
        for proc in doomed:
            proc.kill()
        until = time.monotonic() + timeout
        while True:
            workers = self._on_loop(lambda: list(self._scheduler.workers))
            if len(workers) >= self._n and not addresses.intersection(workers):
                return
            if time.monotonic() > until:
                raise exc.BackendError(f"the restarted Dask workers did not join within "
                                       f"{timeout:.0f} s")
            time.sleep(0.05)

    def _on_loop(self, read):
        """`read()`, called on the scheduler's event loop (where its state
        changes: iterating it from another thread may see it change size)."""
        from distributed.utils import sync

        async def call():
            return read()
        return sync(self.loop, call, callback_timeout=_STOP_TIMEOUT)

    def ready(self) -> None:
        """Wait until every worker has joined; BackendError if they do not
        within the start timeout, or one exits first (the cluster is then
        stopped)."""
        until = time.monotonic() + _START_TIMEOUT
        problem = None
        while len(self._scheduler.workers) < self._n:  # (read from here: a len is atomic)
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                problem = (f"the Dask LocalCluster's worker process exited with status "
                           f"{dead[0].returncode} before joining (its errors are above)")
            elif time.monotonic() > until:
                problem = (f"the Dask LocalCluster's workers did not start within "
                           f"{_START_TIMEOUT:.0f} s")
            if problem:
                self.stop()
                raise exc.BackendError(problem)
            time.sleep(0.01)
        with self._lock:
            self._ready = True
            dead = [i for i, p in enumerate(self._procs) if p.poll() is not None]
        for i in dead:  # (died just now, while its watcher let it be: start it again)
            threading.Thread(target=self._watch, args=(i,), daemon=True,
                             name=f"beamlet-dask-nanny-{i}").start()

    def stop(self) -> None:
        """Stop the workers (they close when their standard input does; killed if
        they linger), then the scheduler, and remove the scratch dir."""
        with self._lock:
            self._stopping = True
            procs = [p for p in self._procs + [self._spare] if p is not None]
            self._spare = None
        for proc in procs:
            _close(proc)
        for proc in procs:
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT)
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            from distributed.utils import sync
            try:
                sync(self.loop, scheduler.close, callback_timeout=_STOP_TIMEOUT)
            except Exception:  # noqa: BLE001 - stopping anyway: the loop goes next
                pass
        if self._loop_runner is not None:
            self._loop_runner.stop()
            self._loop_runner = None
        if self._quiet is not None:
            self._quiet.close()
            self._quiet = None
        if self._session.fd >= 0:
            shutil.rmtree(self._session.temp_dir, ignore_errors=True)
            self._session.release()


def _close(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass


# -- a worker process ---------------------------------------------------------------------
def main() -> None:
    """A worker of the cluster: read the spec, join the scheduler, serve until
    standard input closes."""
    import asyncio

    # (Imported while the driver starts the scheduler: what a worker runs of
    # beamlet's, its tasks and actor hosts, and the beamlet:// scheme.)
    import dask

    from . import comm, worker  # noqa: F401
    line = sys.stdin.readline()
    if not line:
        return  # (the driver gave up before sending the spec)
    spec = json.loads(line)
    dask.config.set({"temporary-directory": spec["scratch"]})
    if not spec["profile"]:
        dask.config.set({"distributed.worker.profile.enabled": False})
    asyncio.run(_serve(spec))


async def _serve(spec: dict) -> None:
    import asyncio

    from distributed import Worker

    from .comm import SCHEME, KeyedSecurity
    loop = asyncio.get_running_loop()
    closing = asyncio.Event()

    def until_eof():
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(closing.set)
        # (A close that hangs, say on a scheduler gone with its driver, ends here.)
        time.sleep(_STOP_TIMEOUT / 2)
        os._exit(0)
    threading.Thread(target=until_eof, name="beamlet-dask-stdin", daemon=True).start()
    worker = await Worker(spec["address"], name=spec["name"], nthreads=1,
                          resources=spec["resources"] or None, host="127.0.0.1",
                          protocol=SCHEME + "://",
                          security=KeyedSecurity(bytes.fromhex(spec["key"])),
                          local_directory=spec["scratch"], memory_limit="auto",
                          dashboard=False, silence_logs=logging.ERROR)
    finished = asyncio.ensure_future(worker.finished())
    asked = asyncio.ensure_future(closing.wait())
    await asyncio.wait((finished, asked), return_when=asyncio.FIRST_COMPLETED)
    if not finished.done():
        await worker.close(timeout=_STOP_TIMEOUT / 4)
    asked.cancel()


if __name__ == "__main__":
    main()

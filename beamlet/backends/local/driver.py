"""The ``local`` backend (the default): worker processes and a shared-memory
object store on one machine.

`LocalBackend` is the driver's side: it owns the objects, the control store
and the scheduler, forks workers through a zygote process, and runs one I/O
thread that reads every worker's messages and answers them. Submitting from
the driver goes straight to the scheduler (no thread hop); results wake the
driver's `get` through the object store's condition variable.
"""
from __future__ import annotations

import collections
import math
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from ... import exceptions as exc
from ...core.control_store import open_control_store
from ...core.interfaces import Backend
from ...core.options import check_backend_options
from ...core.resources import ResourcePool
from ...core.runtime import Runtime
from . import protocol as P
from . import shm
from .object_store import LocalObjectStore
from .scheduler import LocalScheduler, WorkerInfo
from .transport import SocketConnection, UnixSocketTransport

#: The ControlStore methods a worker may call through a "control" request.
CONTROL_OPS = frozenset({"put", "compare_and_set", "get", "delete", "keys", "publish"})

DEFAULT_STORE_FRACTION = 0.3
IDLE_WORKER_TIMEOUT = 2.0  # seconds before a surplus idle worker is let go
WORKER_START_TIMEOUT = 30.0  # seconds before a worker that never said hello is given up


class WorkerLauncher:
    """Starts the zygote and asks it to fork workers; starts a new zygote if the
    one it had died (workers it forked live on: they belong to the driver)."""

    def __init__(self, session: str, address: str, temp_dir: str):
        self._argv = [sys.executable, "-m", "beamlet.backends.local.zygote", session, address,
                      temp_dir]
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
        self._spawn()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, env=self._env,
                                     start_new_session=True, close_fds=True)

    def relaunch_if_dead(self) -> bool:
        """Start a new zygote if the current one died; True if it did."""
        with self._lock:
            if self.proc.poll() is None:
                return False
            self._spawn()
            return True

    def fork(self, worker_id: str) -> None:
        with self._lock:
            for attempt in range(2):
                try:
                    self.proc.stdin.write(f"fork {worker_id}\n".encode())
                    self.proc.stdin.flush()
                    return
                except (BrokenPipeError, ValueError, OSError) as err:
                    if attempt:
                        raise exc.BackendError(f"cannot start workers: {err}") from None
                    self.proc.wait(5)  # it is dead (or its stdin is): reap it, start another
                    self._spawn()

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            try:
                self.proc.stdin.write(b"exit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _default_capacity() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        st = os.statvfs(shm.SHM_DIR)
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = total
    return int(min(total * DEFAULT_STORE_FRACTION, shm_free * 0.8))


class LocalBackend(Backend):
    """Worker processes plus a shared-memory object store, on this machine."""

    name = "local"
    parallel = True
    isolated = True
    zero_copy = True

    #: init() keywords of this backend, beyond the common ones.
    accepted_options = frozenset({"object_store_memory", "max_workers", "prestart_workers"})

    def __init__(self, config: dict, runtime: Runtime):
        # Everything that can reject the config comes before anything is started.
        check_backend_options(config, self.accepted_options, self.name)
        capacity = config.get("object_store_memory") or _default_capacity()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"object_store_memory must be a positive number of bytes, "
                             f"got {capacity!r}")
        for key in ("max_workers", "prestart_workers"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (1 if key == "max_workers" else 0)):
                raise ValueError(f"{key} must be a whole number >= "
                                 f"{1 if key == 'max_workers' else 0}, got {value!r}")
        self.control_store = open_control_store(config.get("control_store"))
        self.runtime = runtime
        self.session = os.urandom(5).hex()
        self.node_id = f"local-{self.session}"
        self.worker_id = f"driver-{os.getpid()}"
        self.temp_dir = os.path.join(tempfile.gettempdir(), f"beamlet-{self.session}")
        self.transport = UnixSocketTransport()
        self.listener = self.transport.listen(f"@beamlet-{self.session}")
        self.object_store = LocalObjectStore(runtime.refs, self.session, capacity,
                                             self.inline_threshold, self._spill_dir)
        pool = ResourcePool(config.get("num_cpus"), config.get("num_gpus"), config.get("resources"))
        cpus = max(1, math.ceil(pool.total()["CPU"]))
        max_workers = config.get("max_workers") or 4 * cpus
        self._keep_workers = cpus
        self.launcher = WorkerLauncher(self.session, self.listener.address, self.temp_dir)
        self.scheduler = LocalScheduler(self, pool, max_workers)
        self._closed = False
        self._released: collections.deque[bytes] = collections.deque()
        self._release_pending = False
        self.object_store.reclaim = self._free_released
        self._wake_r, self._wake_w = os.pipe()
        self._io = threading.Thread(target=self._io_loop, name="beamlet-io", daemon=True)
        self._io.start()
        with self.scheduler.lock:
            self.scheduler._start_workers(config.get("prestart_workers", cpus))

    def _spill_dir(self) -> str:
        path = os.path.join(self.temp_dir, "spill")
        os.makedirs(path, exist_ok=True)
        return path

    # -- the I/O thread -----------------------------------------------------------
    def _io_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener.sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_reap = 0.0
        while not self._closed:
            now = time.monotonic()
            if now >= next_reap:
                self.scheduler.reap_idle(self._keep_workers, IDLE_WORKER_TIMEOUT)
                relaunched = self.launcher.relaunch_if_dead()
                if relaunched or self.scheduler.starting:
                    self.scheduler.restart_lost_forks(relaunched, WORKER_START_TIMEOUT)
                next_reap = now + 0.5
            for key, _ in sel.select(timeout=0.5):
                if key.data is None:
                    try:
                        conn = self.listener.accept(0)
                    except (exc.GetTimeoutError, OSError):
                        continue
                    sel.register(conn.sock, selectors.EVENT_READ, [conn, None])
                elif key.data == "wake":
                    os.read(self._wake_r, 4096)
                    self._free_released()
                else:
                    self._read(sel, key.data)
        sel.close()

    def _read(self, sel, slot: list) -> None:
        conn, worker = slot
        try:
            messages = conn.recv_all()
        except EOFError:
            sel.unregister(conn.sock)
            conn.close()
            if worker is not None:
                self.scheduler.worker_died(worker)
            return
        for message in messages:
            try:
                if worker is None:
                    worker = slot[1] = self._hello(conn, message)
                    if worker is None:
                        sel.unregister(conn.sock)
                        conn.close()
                        return
                else:
                    self._handle(worker, message)
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the I/O thread
                if self._closed:
                    return
                print(f"beamlet: error handling {message[0]} from a worker: {err!r}",
                      file=sys.stderr)

    def _hello(self, conn: SocketConnection, message) -> WorkerInfo | None:
        if message[0] != P.HELLO:
            return None
        _, worker_id, pid = message
        conn.send((P.WELCOME, {
            "session": self.session, "node_id": self.node_id, "job_id": self.runtime.job_id,
            "namespace": self.runtime.namespace, "inline_threshold": self.inline_threshold,
            "sys_path": list(sys.path), "cwd": os.getcwd(),
            "resources": self.scheduler.total_resources()}))
        return self.scheduler.worker_connected(worker_id, pid, conn)

    def _handle(self, worker: WorkerInfo, message) -> None:
        tag = message[0]
        if tag == P.DONE:
            self.scheduler.task_done(worker, message[1], message[2], message[3])
        elif tag == P.REFS:
            self.scheduler.record_borrow(worker, message[1], message[2])
        elif tag == P.REQUEST:
            self._request(worker, message[1], message[2], message[3])
        elif tag == P.SUBMIT:
            spec = message[1]
            try:
                self.runtime.accept(spec)
            except Exception as err:  # noqa: BLE001 - the submitter gets it from get()
                self.scheduler._fail(spec, exc.TaskError.from_exception(err, spec.display_name))
        elif tag == P.PUT:
            self.object_store.put_from_worker(message[1], message[2], worker.worker_id)
        elif tag == P.CANCEL:
            try:
                self.scheduler.cancel(message[1], message[2])
            except ValueError:
                pass
        elif tag == P.KILL_ACTOR:
            self.scheduler.kill_actor(message[1], message[2])
        elif tag == P.FORGET:
            self.scheduler.worker_unblocked(worker, message[1])

    def _reply(self, worker: WorkerInfo, req_id: int, ok: bool, payload) -> None:
        try:
            worker.conn.send((P.REPLY, req_id, ok, payload))
        except exc.BackendError:
            pass  # it died; its EOF is being handled

    def _request(self, worker: WorkerInfo, req_id: int, op: str, args) -> None:
        store = self.object_store
        if op == "get":
            ids, blocking = args  # blocking: the worker's thread waits (its CPU is free)
            missing = [i for i in dict.fromkeys(ids) if not store.contains(i)]
            if not missing:
                self._reply(worker, req_id, True, [store.wire_entry(i) for i in ids])
                return
            if blocking:
                self.scheduler.worker_blocked(worker, req_id)
            left = [len(missing)]
            lock = threading.Lock()

            def arrived(_id):
                with lock:
                    left[0] -= 1
                    if left[0]:
                        return
                if blocking:
                    self.scheduler.worker_unblocked(worker, req_id)
                try:
                    entries = [store.wire_entry(i) for i in ids]
                    if any(e is None for e in entries):
                        raise exc.ObjectLostError("an object was freed before it could be read")
                except Exception as err:  # noqa: BLE001
                    self._reply(worker, req_id, False, err)
                    return
                self._reply(worker, req_id, True, entries)

            for object_id in missing:
                store.on_ready(object_id, arrived)
        elif op == "wait":
            ids, num_returns = args
            ready = {i for i in ids if store.contains(i)}
            if len(ready) >= num_returns:
                self._reply(worker, req_id, True, ready)
                return
            state = {"done": False}
            lock = threading.Lock()

            def arrived(object_id):
                with lock:
                    if state["done"]:
                        return
                    ready.add(object_id)
                    if len(ready) < num_returns:
                        return
                    state["done"] = True
                self._reply(worker, req_id, True, set(ready))

            for object_id in ids:
                if object_id not in ready:
                    store.on_ready(object_id, arrived)
        elif op == "control":
            name, call_args = args
            try:
                if name not in CONTROL_OPS:
                    raise ValueError(f"unknown control store operation {name!r}")
                result = getattr(self.control_store, name)(*call_args)
            except Exception as err:  # noqa: BLE001
                self._reply(worker, req_id, False, err)
                return
            self._reply(worker, req_id, True, result)
        elif op == "resources":
            which = args[0]
            result = (self.scheduler.total_resources() if which == "total"
                      else self.scheduler.available_resources())
            self._reply(worker, req_id, True, result)
        else:
            self._reply(worker, req_id, False, ValueError(f"unknown request {op!r}"))

    # -- Backend ------------------------------------------------------------------
    def object_released(self, object_id: bytes) -> None:
        # Called from ObjectRef.__del__, which the cyclic GC may run in any thread
        # at any allocation, even one holding the scheduler's or the store's lock:
        # so only queue the id here (a deque append takes no lock) and free it on
        # the I/O thread, or at once in a put that needs the room.
        self._released.append(object_id)
        if not self._release_pending:
            self._release_pending = True
            try:
                os.write(self._wake_w, b"r")
            except OSError:
                pass  # shut down: nothing left to free

    def _free_released(self) -> None:
        """Free the objects whose last reference went away (see object_released)."""
        self._release_pending = False
        released = self._released
        while released:
            try:
                object_id = released.popleft()
            except IndexError:
                break
            if self.runtime.refs.count(object_id):
                continue  # referenced again meanwhile (e.g. get_actor made a new handle)
            self.object_store.delete([object_id])
            self.scheduler.token_released(object_id)

    def nodes(self) -> list[dict]:
        return [{"NodeID": self.node_id, "Alive": True, "NodeManagerAddress": "127.0.0.1",
                 "Resources": self.scheduler.total_resources(),
                 "ObjectStoreMemory": self.object_store.capacity}]

    def shutdown(self) -> None:
        if self._closed:
            return
        self.scheduler.shutdown()
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._io.join(5)
        with self.scheduler.lock:
            workers = list(self.scheduler.workers.values())
        for worker in workers:
            if worker.conn is not None:
                worker.conn.close()
        self.listener.close()
        self.launcher.close()
        self.object_store.close()
        shm.remove_session_segments(self.session)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

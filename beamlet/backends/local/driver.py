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
import threading
import time
import traceback

from ... import exceptions as exc
from ...core import auth
from ...core.control_store import open_control_store
from ...core.interfaces import Backend
from ...core.options import check_backend_options
from ...core.resources import ResourcePool
from ...core.runtime import Runtime
from . import protocol as P
from . import shm
from .object_store import LocalObjectStore
from .scheduler import LocalScheduler, WorkerInfo
from .session import SessionLock, sweep
from .transport import (PendingConnection, ProtocolError, SocketConnection, UnixSocketTransport,
                        describe_peer, log_refused)

#: The ControlStore methods a worker may call through a "control" request.
CONTROL_OPS = frozenset({"put", "compare_and_set", "get", "delete", "keys", "publish"})

DEFAULT_STORE_FRACTION = 0.3
IDLE_WORKER_TIMEOUT = 2.0  # seconds before a surplus idle worker is let go
WORKER_START_TIMEOUT = 30.0  # seconds before a worker that never said hello is given up
MAX_ZYGOTE_FAILURES = 3  # zygote deaths in a row (no worker connecting) before giving up
MAX_PENDING_HANDSHAKES = 64  # connections not yet authenticated; the oldest goes beyond


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
        self.error: exc.BackendError | None = None
        self._spawn()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, env=self._env,
                                     start_new_session=True, close_fds=True,
                                     pass_fds=(self._lock_fd,))
        try:
            self.proc.stdin.write(self._secret_line)
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
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: the driver holds a
    socket per worker, and a thousand actors are a thousand workers (a common
    default soft limit is 1024)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # not allowed here: keep what we have


def _log_error(what: str, err: BaseException | None = None) -> None:
    """Log an unexpected error (with its traceback) that beamlet survives."""
    detail = ("".join(traceback.format_exception(err)) if err is not None
              else traceback.format_exc())
    print(f"beamlet: error {what}:\n{detail}", file=sys.stderr, end="", flush=True)


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
        _raise_open_files_limit()
        self.runtime = runtime
        sweep()  # what sessions that died without cleaning up left behind
        self._session_lock = SessionLock()  # before any segment or file of the session
        self.session = self._session_lock.session
        self.node_id = f"local-{self.session}"
        self.worker_id = f"driver-{os.getpid()}"
        self.temp_dir = self._session_lock.temp_dir
        #: Every process of the session proves it holds this before it is heard
        #: (core/auth.py); workers get it from the zygote, which gets it on stdin.
        self.secret = auth.new_secret()
        self.transport = UnixSocketTransport(self.secret, P.VERSION)
        self.listener = self.transport.listen(f"@beamlet-{self.session}")
        self.object_store = LocalObjectStore(runtime.refs, self.session, capacity,
                                             self.inline_threshold, self._spill_dir)
        pool = ResourcePool(config.get("num_cpus"), config.get("num_gpus"), config.get("resources"))
        cpus = max(1, math.ceil(pool.total()["CPU"]))
        max_workers = config.get("max_workers") or 4 * cpus
        self._keep_workers = cpus
        self.launcher = WorkerLauncher(self.session, self.listener.address, self.temp_dir,
                                       self.secret, self._session_lock.fd)
        self.scheduler = LocalScheduler(self, self.object_store, self.control_store, pool,
                                        max_workers)
        self._closed = False
        #: Why the backend cannot go on (its I/O thread died), once it cannot.
        self.failure: exc.BackendError | None = None
        self._released: collections.deque[bytes] = collections.deque()
        self._release_pending = False
        self.object_store.reclaim = self._free_released
        self._awaiting: dict[tuple, object] = {}  # (worker id, request id) -> store Waiter
        self._handlers = self._dispatch_table()
        self._wake_r, self._wake_w = os.pipe()
        self._io = threading.Thread(target=self._io_loop, name="beamlet-io", daemon=True)
        self._io.start()
        with self.scheduler.lock:
            self.scheduler._start_workers(config.get("prestart_workers", cpus))

    def _spill_dir(self) -> str:
        path = os.path.join(self.temp_dir, "spill")
        os.makedirs(path, mode=0o700, exist_ok=True)  # (inside the private temp dir)
        return path

    # -- the I/O thread -----------------------------------------------------------
    # It accepts connections (authenticating each without blocking on it), reads
    # every worker's messages and does the periodic chores. Whatever goes wrong
    # in handling one connection or message is logged and the loop goes on; a
    # peer that breaks the protocol loses its connection. Should the loop itself
    # ever die, every waiter is failed (see _io_died) instead of left hanging.
    def _io_loop(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # noqa: BLE001 - whatever it was, nobody may hang
            if not self._closed:
                self._io_died(err)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        pending: dict[PendingConnection, None] = {}  # handshakes under way, oldest first
        sel.register(self.listener.sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_chores = 0.0
        try:
            while not self._closed:
                now = time.monotonic()
                if now >= next_chores:
                    next_chores = now + 0.5
                    try:
                        self._chores(sel, pending, now)
                    except Exception:  # noqa: BLE001
                        _log_error("in the I/O thread's periodic chores")
                for key, _ in sel.select(timeout=0.5):
                    try:
                        self._ready(sel, pending, key.data)
                    except Exception:  # noqa: BLE001
                        if self._closed:
                            return
                        _log_error("in the I/O thread")
        finally:
            for handshake in pending:
                handshake.refuse()
            sel.close()

    def _chores(self, sel, pending: dict, now: float) -> None:
        for handshake in [h for h in pending if h.deadline <= now]:
            self._refuse(sel, pending, handshake, auth.AuthenticationError(
                f"it did not complete the handshake within {auth.HANDSHAKE_TIMEOUT}s"))
        self.scheduler.reap_idle(self._keep_workers, IDLE_WORKER_TIMEOUT)
        relaunched = self.launcher.relaunch_if_dead()
        if self.launcher.error is not None:
            if self.scheduler.launch_error is None or self.scheduler.starting:
                self.scheduler.launcher_failed(self.launcher.error)
        elif relaunched or self.scheduler.starting:
            self.scheduler.restart_lost_forks(relaunched, WORKER_START_TIMEOUT)

    def _ready(self, sel, pending: dict, data) -> None:
        if data is None:
            try:
                handshake = self.listener.accept_pending()
            except OSError:
                return
            try:
                handshake.start()
            except auth.AuthenticationError as err:
                log_refused(handshake.peer, err)
                handshake.refuse(err)
                return
            if len(pending) >= MAX_PENDING_HANDSHAKES:
                self._refuse(sel, pending, next(iter(pending)), auth.AuthenticationError(
                    f"more than {MAX_PENDING_HANDSHAKES} connections were authenticating"))
            pending[handshake] = None
            sel.register(handshake.sock, selectors.EVENT_READ, handshake)
        elif data == "wake":
            os.read(self._wake_r, 4096)
            self._free_released()
        elif isinstance(data, PendingConnection):
            try:
                conn = data.advance()
            except auth.AuthenticationError as err:
                self._refuse(sel, pending, data, err)
                return
            if conn is not None:
                del pending[data]
                slot = [conn, None]
                sel.modify(conn.sock, selectors.EVENT_READ, slot)
                if conn.buffered:
                    self._read(sel, slot)
        else:
            self._read(sel, data)

    @staticmethod
    def _refuse(sel, pending: dict, handshake: PendingConnection,
                err: auth.AuthenticationError) -> None:
        log_refused(handshake.peer, err)
        del pending[handshake]
        sel.unregister(handshake.sock)
        handshake.refuse(err)

    def _read(self, sel, slot: list) -> None:
        conn, worker = slot
        try:
            messages = conn.recv_all()
        except EOFError:
            self._drop(sel, slot, None)
            return
        except ProtocolError as err:
            self._drop(sel, slot, err)
            return
        for message in messages:
            if type(message) not in P.FROM_WORKER:
                self._drop(sel, slot, ProtocolError(
                    f"a message that is not one of the protocol's: {P.describe(message)}"))
                return
            try:
                if worker is None:
                    worker = slot[1] = self._hello(conn, message)
                    if worker is None:
                        self._drop(sel, slot, None)
                        return
                else:
                    self._handle(worker, message)
            except ProtocolError as err:
                self._drop(sel, slot, err)
                return
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the I/O thread
                if self._closed:
                    return
                _log_error(f"handling {type(message).__name__} from worker "
                           f"{getattr(worker, 'pid', '?')}", err)

    def _drop(self, sel, slot: list, error: BaseException | None) -> None:
        """Close a connection (`error`: why, logged; None: the peer left); its
        worker, if it had said hello, is dead to the scheduler."""
        conn, worker = slot
        if error is not None:
            who = (f"worker {worker.worker_id} ({describe_peer(conn.sock)})" if worker is not None
                   else describe_peer(conn.sock))
            print(f"beamlet: closed the connection of {who}: {error}", file=sys.stderr,
                  flush=True)
        sel.unregister(conn.sock)
        conn.close()
        if worker is not None:
            self._forget_worker(worker)
            self.object_store.writer_died(worker.worker_id)
            self.scheduler.worker_died(worker)

    def _hello(self, conn: SocketConnection, message) -> WorkerInfo | None:
        """The first message of an authenticated connection: a worker's HELLO.
        None for a worker that is not awaited (a duplicate fork, or given up)."""
        if type(message) is not P.Hello:
            raise ProtocolError(f"the first message was not HELLO: {P.describe(message)}")
        worker_id, pid = message
        if type(worker_id) is not str or type(pid) is not int:
            raise ProtocolError(f"a malformed HELLO: {P.describe(message)}")
        if not self.scheduler.awaits_worker(worker_id):
            return None
        conn.send(P.Welcome({
            "session": self.session, "node_id": self.node_id, "job_id": self.runtime.job_id,
            "namespace": self.runtime.namespace, "inline_threshold": self.inline_threshold,
            "sys_path": list(sys.path), "cwd": os.getcwd(),
            "resources": self.scheduler.total_resources()}))
        worker = self.scheduler.worker_connected(worker_id, pid, conn)
        if worker is not None:
            self.launcher.worker_started()
        return worker

    def _io_died(self, err: BaseException) -> None:
        """The I/O thread is dying: nothing will be read or answered any more,
        so fail every waiter (driver get/wait, futures, later submits) with a
        clear error, and close the workers' connections (they exit)."""
        _log_error("the I/O thread died", err)
        self.failure = exc.BackendError(
            f"the local backend's I/O thread died ({err!r}), so no result can arrive any "
            f"more; call beamlet.shutdown() and init() again")
        self.scheduler.fail(self.failure)
        self.object_store.fail(self.failure)
        with self.scheduler.lock:
            workers = list(self.scheduler.workers.values())
        for worker in workers:
            if worker.conn is not None:
                worker.conn.close()

    def _handle(self, worker: WorkerInfo, message) -> None:
        self._handlers[type(message)](worker, message)

    # -- the dispatch table: one handler per message a worker may send -------------
    def _dispatch_table(self) -> dict:
        return {
            P.Hello: self._on_second_hello, P.Done: self._on_done, P.Refs: self._on_refs,
            P.Submit: self._on_submit, P.Put: self._on_put, P.CancelTask: self._on_cancel,
            P.KillActor: self._on_kill_actor, P.Forget: self._on_forget,
            P.GetRequest: self._on_get, P.WaitRequest: self._on_wait,
            P.AllocRequest: self._on_alloc, P.AbandonRequest: self._on_abandon,
            P.ControlRequest: self._on_control, P.ResourcesRequest: self._on_resources,
        }

    def _on_second_hello(self, worker: WorkerInfo, message: P.Hello) -> None:
        raise ProtocolError("a second HELLO on one connection")

    def _on_done(self, worker: WorkerInfo, message: P.Done) -> None:
        self.scheduler.task_done(worker, message.task_id, message.entries, message.retryable)
        self.object_store.drop_unreported(worker.worker_id, message.entries)

    def _on_refs(self, worker: WorkerInfo, message: P.Refs) -> None:
        self.scheduler.record_borrow(worker, message.added, message.released)

    def _on_submit(self, worker: WorkerInfo, message: P.Submit) -> None:
        spec = message.spec
        try:
            self.runtime.accept(spec)
        except Exception as err:  # noqa: BLE001 - the submitter gets it from get()
            self.scheduler._fail(spec, exc.TaskError.from_exception(err, spec.display_name))

    def _on_put(self, worker: WorkerInfo, message: P.Put) -> None:
        self.object_store.put_from_worker(message.object_id, message.entry, worker.worker_id,
                                          worker.worker_id)

    def _on_cancel(self, worker: WorkerInfo, message: P.CancelTask) -> None:
        try:
            self.scheduler.cancel(message.object_id, message.force)
        except ValueError:
            pass  # (the same call in the driver raises; a task cannot be told)

    def _on_kill_actor(self, worker: WorkerInfo, message: P.KillActor) -> None:
        self.scheduler.kill_actor(message.actor_id, message.no_restart)

    def _on_forget(self, worker: WorkerInfo, message: P.Forget) -> None:
        self._forget(worker, message.req_id)

    def _await(self, worker: WorkerInfo, req_id: int, blocking: bool, ids, count: int,
               answer) -> None:
        """Run `answer()` once `count` of `ids` exist. While it waits, a `blocking`
        request's worker lends out its CPUs (its thread is stuck in get or wait),
        and the worker may give up on it (FORGET)."""
        store = self.object_store
        if blocking and not store.has_at_least(ids, count):
            self.scheduler.worker_blocked(worker, req_id)
        else:
            blocking = False
        key = (worker.worker_id, req_id)

        def arrived():
            self._awaiting.pop(key, None)
            if blocking:
                self.scheduler.worker_unblocked(worker, req_id)
            answer()

        waiter = store.notify_when(ids, count, arrived)
        if waiter is not None:
            self._awaiting[key] = waiter
            if waiter.done:  # it ran in another thread before we noted it
                self._awaiting.pop(key, None)

    def _forget_worker(self, worker: WorkerInfo) -> None:
        """A worker died: withdraw the requests it was waiting on."""
        for key in [k for k in self._awaiting if k[0] == worker.worker_id]:
            self.object_store.cancel_waiter(self._awaiting.pop(key, None))

    def _forget(self, worker: WorkerInfo, req_id: int) -> None:
        """The worker stopped waiting for request `req_id` (it timed out)."""
        waiter = self._awaiting.pop((worker.worker_id, req_id), None)
        if waiter is not None:
            self.object_store.cancel_waiter(waiter)
        self.scheduler.worker_unblocked(worker, req_id)

    def _reply(self, worker: WorkerInfo, req_id: int, ok: bool, payload) -> None:
        try:
            worker.conn.send(P.Reply(req_id, ok, payload))
        except exc.BackendError:
            pass  # it died; its EOF is being handled

    def _on_get(self, worker: WorkerInfo, message: P.GetRequest) -> None:
        store, req_id, ids = self.object_store, message.req_id, message.ids

        def answer_get():
            try:
                entries = [store.wire_entry(i) for i in ids]
                if any(e is None for e in entries):
                    raise exc.ObjectLostError("an object was freed before it could be read")
            except Exception as err:  # noqa: BLE001
                self._reply(worker, req_id, False, err)
                return
            self._reply(worker, req_id, True, entries)

        self._await(worker, req_id, message.blocking, ids, len(set(ids)), answer_get)

    def _on_wait(self, worker: WorkerInfo, message: P.WaitRequest) -> None:
        store, req_id, ids, num_returns = (self.object_store, message.req_id, message.ids,
                                           message.num_returns)
        self._await(worker, req_id, message.blocking, ids, num_returns,
                    lambda: self._reply(worker, req_id, True, store.wait(ids, num_returns, 0)))

    def _on_alloc(self, worker: WorkerInfo, message: P.AllocRequest) -> None:
        sizes, req_id = message.sizes, message.req_id
        if not isinstance(sizes, list) or not sizes or \
                not all(type(n) is int and n > 0 for n in sizes):
            self._reply(worker, req_id, False, ValueError(f"bad segment sizes {sizes!r}"))
            return
        self.object_store.allocate(worker.worker_id, sizes,
                                   lambda ok, payload: self._reply(worker, req_id, ok, payload))

    def _on_abandon(self, worker: WorkerInfo, message: P.AbandonRequest) -> None:
        self.object_store.drop_unsealed(worker.worker_id, message.names)
        self._reply(worker, message.req_id, True, None)

    def _on_control(self, worker: WorkerInfo, message: P.ControlRequest) -> None:
        try:
            if message.op not in CONTROL_OPS:
                raise ValueError(f"unknown control store operation {message.op!r}")
            result = getattr(self.control_store, message.op)(*message.args)
        except Exception as err:  # noqa: BLE001 - the asker raises it
            self._reply(worker, message.req_id, False, err)
            return
        self._reply(worker, message.req_id, True, result)

    def _on_resources(self, worker: WorkerInfo, message: P.ResourcesRequest) -> None:
        result = (self.scheduler.total_resources() if message.which == "total"
                  else self.scheduler.available_resources())
        self._reply(worker, message.req_id, True, result)

    # -- SchedulerHost (scheduler.py): what the scheduler may ask of this node ----------
    def start_worker(self, worker_id: str) -> None:
        self.launcher.fork(worker_id)

    def pin(self, object_ids) -> None:
        self.runtime.refs.incr_all(object_ids)

    def unpin(self, object_ids) -> None:
        self.runtime.refs.decr_all(object_ids)

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
        self._session_lock.release()
        os.close(self._wake_r)
        os.close(self._wake_w)

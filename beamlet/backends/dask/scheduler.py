"""DaskScheduler: beamlet TaskSpecs as Dask tasks and actors.

- A task is ``Client.submit(run_task, ...)`` under the key of its return id
  (with several returns, under a task key, plus one ``getitem`` per return).
  Its ref arguments go as Futures in a dict, which Dask resolves on the worker
  that runs it once they exist: waiting for dependencies holds no worker.
- CPUs are Dask's worker threads: a task occupies one while it runs, and a
  task blocked in ``get`` or ``wait`` secedes and so lends it (as Ray lends a
  blocked task's CPU). A request for more CPUs than a task can hold (more
  than one) is accepted when the cluster has that many in all, but holds one
  thread. GPUs and custom resources become Dask worker resources, held for
  the task's whole run (Dask keeps them while a task is seceded).
  ``memory`` is not modelled. A request no worker could meet raises
  ``ValueError`` at submission, naming the resource.
- An actor is an ``ActorHost`` (a Dask actor) under ``beamlet-actor-<id>``,
  plus its creation ref, which resolves once the constructor ran. A method
  call is one Dask actor call (``actor_execute``, the message Dask's own
  ``actor.method()`` sends), from this process straight to the worker
  holding the host, whose answer is the call's values: the Dask scheduler
  never hears of it. Its refs are call results in this process's object
  store, published as Dask keys only if they leave it (``objects.py``).
  Each call carries this process's sequence number for that actor, and the
  host starts them in that order; its ref arguments (published first) the
  host reads from Dask before the call's turn ends, so the calls behind it
  wait for them as in Ray.
  An actor ends when killed, when it calls ``exit_actor``, when its job ends,
  or when the process that created it drops its last handle, no other Dask
  client holds its creation ref (asked of the scheduler: handles travel
  between processes as bare ids, which the receiver holds once its task ends)
  and the calls in flight to it have run.
- ``cancel`` cancels the task's Dask future (its work runs on: Dask cannot
  stop a thread) and, recursively, the unfinished tasks it submitted, which
  the workers running them remember.

Retries of user exceptions (``retry_exceptions``) happen inside the task, as
on every backend; a worker that dies is Dask's to recover from (it reruns
the task elsewhere, up to its ``allowed-failures``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import operator
import threading
import time

from ...core import plugins
from ...core.interfaces import Scheduler
from ...core.scheduling import CANCELLED, RETRYING
from ...core.tables import ActorState
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, TaskSpec
from .objects import carry_args, key_of
from .worker import ActorHost, actor_created, cancel_children, died_of, note_child, run_task

ACTOR_PREFIX = "beamlet-actor-"
TASK_PREFIX = "beamlet-task-"
_HOST_TIMEOUT = 60.0
_SENDING = 8  # calls to one actor in flight from one process (see _send_call)
_SLOT_HOLD = 0.5  # seconds a call in flight keeps its sending slot at most
_UNKNOWN_GRACE = 10.0  # seconds an actor's host may be unknown to the scheduler at first


def _wanted_elsewhere(key: str, client_id: str, dask_scheduler=None) -> bool:
    """(Runs in the Dask scheduler.) Whether a client other than `client_id`
    holds `key`, or a task still to run depends on it."""
    ts = dask_scheduler.tasks.get(key)
    if ts is None:
        return False
    return any(cs.client_key != client_id for cs in ts.who_wants) or \
        any(dep.state not in ("memory", "erred", "forgotten") for dep in ts.dependents)


def _host_location(key: str, dask_scheduler=None) -> tuple:
    """(Runs in the Dask scheduler.) The state of an actor host's key and, once
    it is in memory, the address of the worker holding it."""
    ts = dask_scheduler.tasks.get(key)
    if ts is None:
        return None, None
    if ts.state == "memory":
        # (Not any worker in who_has: one that ran a task taking the host as
        # an argument, actor_created's, holds a proxy to it under its key too.)
        for ws in ts.who_has:
            if ts in ws.actors:
                return ts.state, ws.address
    return ts.state, None


def _key_state(key: str, dask_scheduler=None) -> str | None:
    """(Runs in the Dask scheduler.) The key's task's state, None if unknown."""
    ts = dask_scheduler.tasks.get(key)
    return None if ts is None else ts.state


def _resources_in_use(dask_scheduler) -> dict:
    """(Runs in the Dask scheduler.) What running tasks hold, summed over workers."""
    used = {"CPU": 0.0}
    for ws in dask_scheduler.workers.values():
        busy = len(ws.processing) - len(ws.long_running)  # (includes tasks queued there)
        used["CPU"] += float(min(ws.nthreads, busy))
        for name, amount in (ws.used_resources or {}).items():
            used[name] = used.get(name, 0.0) + float(amount)
    return used


class DaskScheduler(Scheduler):
    def __init__(self, backend):
        self._backend = backend
        self._client = backend.client
        self._store = backend.object_store
        self._lock = threading.Lock()
        self._seq: dict[bytes, int] = {}           # actor id -> next call number from here
        self._hosts: dict[bytes, object] = {}      # actor id -> Future of its ActorHost
        self._workers: dict | None = None          # address -> resources, cached
        self._tokens: dict[bytes, bytes] = {}      # creation ref id -> actor id, made here
        self._inflight: dict[bytes, set] = {}      # actor id -> results of calls from here
        self._addresses: dict[bytes, str] = {}     # actor id -> its Dask worker's address
        self._slots: dict[bytes, asyncio.Semaphore] = {}  # actor id -> sending slots (loop's)
        #: (Only while the driver's plugins observe attempts: job["task_events"].)
        #: Task id -> its spec, for each task submitted here that has not ended.
        self._observed: dict[bytes, TaskSpec] = {}

    # -- resources -------------------------------------------------------------------
    def _worker_resources(self, refresh: bool = False) -> dict:
        """Each worker's resources, its threads counted as ``CPU``."""
        if self._workers is None or refresh:
            info = self._client.scheduler_info()
            self._workers = {addr: {"CPU": float(w.get("nthreads", 1)),
                                    **(w.get("resources") or {})}
                             for addr, w in info.get("workers", {}).items()}
        return self._workers

    def _resources(self, spec: TaskSpec) -> dict | None:
        """The Dask resource restriction of `spec` (None: none), checked feasible."""
        request = {k: float(v) for k, v in (spec.resources or {}).items()
                   if k != "memory" and v}
        cpus = request.pop("CPU", 0.0)
        if cpus:
            total = sum(w["CPU"] for w in self._worker_resources().values())
            if cpus > total:
                total = sum(w["CPU"] for w in self._worker_resources(True).values())
            if cpus > total:
                raise ValueError(f"{spec.display_name} requests {cpus:g} CPU, but the Dask "
                                 f"cluster only has {total:g} worker threads: it could never run")
        if not request:
            return None
        for refresh in (False, True):
            workers = self._worker_resources(refresh)
            if any(all(have.get(k, 0.0) >= v for k, v in request.items())
                   for have in workers.values()):
                return request
        known = sorted({k for have in workers.values() for k in have})
        missing = [k for k in request if k not in known]
        if missing:
            raise ValueError(f"{spec.display_name} requests resource {missing[0]!r} "
                             f"({request[missing[0]]}), which no Dask worker has; known "
                             f"resources: {', '.join(known) or 'none'}")
        raise ValueError(f"{spec.display_name} requests {request}, but no single Dask worker "
                         f"has that much (each worker's resources: "
                         f"{sorted(workers.values(), key=str)[:4]}): it could never run")

    # -- submission --------------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        plugins.notify("beamlet_task_submitted", spec=spec)
        if spec.args or spec.kwargs:
            deps = spec.dependencies()
            leaving = deps + spec.contained_refs()
            if leaving:  # (call results held here alone become Dask keys)
                self._store.publish(leaving)
            carry_args(spec)
        else:
            deps = ()
        if spec.kind == ACTOR_METHOD:
            self._store.flush()  # (its ref arguments' tasks are known before it runs)
            self._submit_call(spec)
            return
        deps = {d: self._store.future(d) for d in deps}
        if spec.kind == ACTOR_CREATION:
            self._submit_actor(spec, deps)
        else:
            resources = self._resources(spec)
            if self._backend.job.get("task_events") and self._backend._is_driver:
                with self._lock:
                    self._observed[spec.task_id] = spec
            self._submit(run_task, (self._backend.job, spec, deps), spec, resources)
            if not self._backend._is_driver:
                note_child(self._store, spec)

    def task_event(self, message: bytes) -> None:
        """(The driver's plugins observe attempts.) A worker reports the end of
        an attempt of a task submitted here: tell them."""
        task_hex, attempt, status, duration, pid = message.decode().split(",")
        task_id = bytes.fromhex(task_hex)
        with self._lock:
            spec = self._observed.get(task_id) if status == RETRYING else \
                self._observed.pop(task_id, None)
        if spec is not None:
            spec.attempt = int(attempt)
            plugins.notify("beamlet_task_finished", spec=spec, status=status,
                           duration=float(duration), pid=int(pid))

    def _submit(self, fn, args: tuple, spec: TaskSpec, resources: dict | None):
        """Submit ``fn(*args)``, its value stored under the spec's return ids."""
        client = self._client
        rids = spec.return_ids
        if len(rids) == 1 and self._backend._is_driver:
            # (Not in a worker: Dask ranks a task submitted from a task's thread
            # above that task, which a batch sent from elsewhere would lose.)
            self._store.submit_batched(rids[0], fn, args, resources)
            return
        self._store.flush()
        if len(rids) == 1:
            fut = client.submit(fn, *args, key=key_of(rids[0]), resources=resources,
                                pure=False)
            self._store.adopt(rids[0], fut)
            return [fut]
        whole = client.submit(fn, *args, key=TASK_PREFIX + spec.task_id.hex(),
                              resources=resources, pure=False)
        futures = []
        for i, rid in enumerate(rids):
            fut = client.submit(operator.getitem, whole, i, key=key_of(rid), pure=False)
            self._store.adopt(rid, fut)
            futures.append(fut)
        return futures

    def _submit_actor(self, spec: TaskSpec, deps: dict) -> None:
        resources = self._resources(spec)
        self._store.flush()
        host = self._client.submit(ActorHost, self._backend.job, spec, deps,
                                   key=ACTOR_PREFIX + spec.actor_id.hex(), actor=True,
                                   resources=resources, pure=False)
        detached = bool((spec.actor_options or {}).get("detached"))
        with self._lock:
            self._hosts[spec.actor_id] = host
            if not detached:
                self._tokens[spec.return_ids[0]] = spec.actor_id
        # Recorded for the driver's shutdown, which ends the job's actors' names.
        self._backend.runtime.tables.note_job_actor(self._backend.job["job_id"], spec.actor_id,
                                                    detached)
        token = self._client.submit(actor_created, host, spec.function_name,
                                    key=key_of(spec.return_ids[0]), pure=False)
        self._store.adopt(spec.return_ids[0], token)

    def _host(self, actor_id: bytes):
        """The Future of the actor's host (borrowed by key if made elsewhere).
        (Never borrowed under the lock: a borrow waits on the client's event
        loop, whose call answers take the lock.)"""
        with self._lock:
            host = self._hosts.get(actor_id)
        if host is not None:
            return host
        borrowed = self._store.borrow_key(ACTOR_PREFIX + actor_id.hex())
        with self._lock:
            host = self._hosts.setdefault(actor_id, borrowed)
        if host is not borrowed:
            borrowed.release()
        return host

    def _submit_call(self, spec: TaskSpec) -> None:
        """One Dask actor call to the host, sent from the client's event loop."""
        actor_id = spec.actor_id
        host = self._host(actor_id)
        results = [self._store.expect(rid) for rid in spec.return_ids]
        with self._lock:
            seq = self._seq.get(actor_id, 0)
            self._seq[actor_id] = seq + 1
            calls = self._inflight.get(actor_id)
            if calls is None:
                calls = self._inflight[actor_id] = set()
            calls.add(results[0])
        results[0].add_done_callback(lambda done: self._call_ended(actor_id, done))
        self._client.loop.add_callback(self._send_call, host, seq, spec, results)

    async def _send_call(self, host, seq: int, spec: TaskSpec, results: list) -> None:
        """(On the client's event loop.) Send the call and set its results.

        Each call in flight holds a connection to the host's worker (Dask's
        rpc pool), so calls to one actor take one of `_SENDING` slots: a burst
        of thousands would otherwise open as many connections at once (their
        handshakes enough to time out). A call holds its slot for at most
        `_SLOT_HOLD` s, so that calls blocked in the actor until later calls
        from here arrive cannot keep those from being sent."""
        from distributed.core import send_recv
        from distributed.protocol import to_serialize
        slots = self._slots.get(spec.actor_id)
        if slots is None:
            slots = self._slots[spec.actor_id] = asyncio.Semaphore(_SENDING)
        await slots.acquire()
        held = True

        def free() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()
        freeing = asyncio.get_running_loop().call_later(_SLOT_HOLD, free)
        try:
            address = self._addresses.get(spec.actor_id)
            if address is None:
                address = await self._locate(spec.actor_id, host)
            pool = self._client.rpc
            comm = await self._connect(pool, address, host.key)
            try:
                answer = await send_recv(
                    comm=comm, op="actor_execute", serializers=pool.serializers,
                    deserializers=pool.deserializers, actor=host.key, function="call",
                    args=[to_serialize(spec.caller_id), seq, to_serialize(spec)])
            finally:
                pool.reuse(address, comm)
            if answer["status"] != "OK":
                raise answer["exception"]
            values = answer["result"]
        except Exception as err:  # noqa: BLE001 - the host or its worker is gone
            values = [died_of(spec.function_name, err)] * len(results)
        finally:
            freeing.cancel()
            free()
        for result, value in zip(results, values):
            if not result.done():  # (cancelled meanwhile: that stands)
                try:
                    result.set_result(value)
                except Exception:  # noqa: BLE001 - InvalidStateError: cancelled just now
                    pass

    async def _connect(self, pool, address: str, key: str):
        """(On the client's event loop.) A connection to the worker at `address`
        from the client's pool. A worker slow to accept it (a loaded machine)
        is tried again for as long as the scheduler says it holds the actor
        (`_HOST_TIMEOUT` s at most): nothing was sent, so nothing runs twice."""
        until = time.monotonic() + _HOST_TIMEOUT
        while True:
            try:
                return await pool.connect(address)
            except OSError:
                _, where = await self._client._run_on_scheduler(_host_location, key)
                if where != address or time.monotonic() > until:
                    raise

    async def _locate(self, actor_id: bytes, host) -> str:
        """(On the client's event loop.) The address of the worker holding the
        actor's host, once Dask has placed it (it may wait for its arguments or
        for resources meanwhile); RuntimeError if its key is gone or failed."""
        delay = 0.005
        unknown_since = None
        while True:
            state, address = await self._client._run_on_scheduler(_host_location, host.key)
            if address is not None:
                self._addresses[actor_id] = address
                return address
            if state in ("erred", "forgotten"):
                raise RuntimeError(f"its Dask actor is {state}")
            if state in (None, "released"):
                # (Also a host just submitted: the submission and this question
                # reach the scheduler on different connections.)
                now = time.monotonic()
                unknown_since = unknown_since or now
                if now - unknown_since > _UNKNOWN_GRACE:
                    raise RuntimeError(f"its Dask actor is "
                                       f"{state or 'unknown to the scheduler'}")
            else:
                unknown_since = None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)

    def _call_ended(self, actor_id: bytes, result) -> None:
        with self._lock:
            calls = self._inflight.get(actor_id)
            if calls is not None:
                calls.discard(result)
                if not calls:
                    del self._inflight[actor_id]

    # -- control -----------------------------------------------------------------------
    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True) -> None:
        """Dask cannot interrupt a running task: cancelling one (``force`` too)
        makes its result the cancellation error, and its work runs on.
        `recursive`: so are the unfinished tasks it submitted, theirs, and so on
        (each worker knows what its running tasks submitted; asked level by level).
        `force` on an unfinished actor call is a ValueError, as in Ray."""
        if force and self._store.running_call(object_id):
            raise ValueError("force=True is not supported for actor calls; use kill()")
        cancelled = self._store.cancel(object_id)
        if cancelled and self._observed:
            with self._lock:
                spec = next((s for s in self._observed.values()
                             if object_id in s.return_ids), None)
                if spec is not None:
                    del self._observed[spec.task_id]
            if spec is not None:  # (its attempt runs on, unreported: Dask cannot stop it)
                # (Told after the ends of the results read before, which the
                # control store's delivery thread may still be telling.)
                from .backend import SETTLE_TIMEOUT
                self._backend.control_store.delivered(SETTLE_TIMEOUT)
                plugins.notify("beamlet_task_finished", spec=spec, status=CANCELLED,
                               duration=0.0, pid=0)
        parents = [object_id]
        while recursive and parents:
            try:
                found = self._client.run(cancel_children, parents,
                                         callback_timeout=_HOST_TIMEOUT)
            except Exception:  # noqa: BLE001 - a worker left meanwhile: what was found stands
                return
            parents = [child for children in found.values() for child in children]

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        self.end_actor(actor_id, "it was killed by beamlet.kill()")

    def end_actor(self, actor_id: bytes, reason: str) -> None:
        """End the actor: when this returns its record says DEAD (its name is
        free) and, if its host exists, every call to it fails with
        ActorDiedError, the running ones included. It never waits for the
        actor's code, nor for a host still to be made (waiting for its arguments
        or a free worker thread): that host finds the record when it starts and
        never runs the constructor, and is stopped once it exists in case it
        read the record first. Its calls wait for it to exist, then fail."""
        try:
            self._backend.runtime.tables.set_actor_state(actor_id, ActorState.DEAD, reason)
        except Exception:  # noqa: BLE001 - the cluster (or this client) is going away
            pass
        try:
            host = self._host(actor_id)
            exists = host.done() or self._client.run_on_scheduler(
                _key_state, host.key) in ("memory", "erred")
        except Exception:  # noqa: BLE001 - the cluster is going away
            return
        if exists:
            self._stop(host, reason)
        else:
            host.add_done_callback(lambda fut: threading.Thread(
                target=self._stop, args=(fut, reason), name="beamlet-dask-kill",
                daemon=True).start())

    @staticmethod
    def _stop(host, reason: str) -> None:
        try:
            proxy = host.result(timeout=_HOST_TIMEOUT)
            proxy.stop(reason).result(timeout=_HOST_TIMEOUT)
        except Exception:  # noqa: BLE001 - already gone with its worker
            pass

    def token_released(self, object_id: bytes) -> None:
        """This process dropped its last handle to an actor it created: end the
        actor unless another client still holds a handle (from a thread: the
        scheduler is asked)."""
        with self._lock:
            actor_id = self._tokens.pop(object_id, None)
        if actor_id is None or self._store.is_pinned(object_id):
            return  # (a handle in a task's result: it lives until the job ends)

        def end_if_unreferenced():
            # As in Ray, the calls in flight run first (their handle is gone,
            # their refs may not be): the end waits for them, round by round.
            client = self._client
            try:
                with self._lock:
                    mine = list(self._inflight.get(actor_id, ()))
                while mine:
                    concurrent.futures.wait(mine, _HOST_TIMEOUT)
                    mine = [call for call in mine if not call.done()]
                proxy = None
                while True:
                    if client.run_on_scheduler(_wanted_elsewhere, key_of(object_id), client.id):
                        return
                    # (Calls from other processes: only the host has seen them.)
                    if proxy is None:
                        proxy = self._host(actor_id).result(timeout=_HOST_TIMEOUT)
                    if proxy.quiesce(_HOST_TIMEOUT).result(timeout=2 * _HOST_TIMEOUT):
                        break
            except Exception:  # noqa: BLE001 - the cluster is going away
                return
            self.end_actor(actor_id, "all handles to it went out of scope")

        threading.Thread(target=end_if_unreferenced, name="beamlet-dask-actor-gc",
                         daemon=True).start()

    def end_job_actors(self) -> None:
        """(The driver, at shutdown.) The job's actors' records outlive it here
        (in the engine): mark them dead so that their names are free again."""
        self._backend.runtime.tables.end_job_actors(self._backend.job["job_id"])

    def total_resources(self) -> dict[str, float]:
        totals: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
        for have in self._worker_resources(refresh=True).values():
            for name, amount in have.items():
                totals[name] = totals.get(name, 0.0) + amount
        return totals

    def available_resources(self) -> dict[str, float]:
        """The totals, less what running tasks hold, as the Dask scheduler sees
        it now: a thread per running task that has not seceded, and the
        resources its restriction holds."""
        used = self._client.run_on_scheduler(_resources_in_use)
        free = self.total_resources()
        for name, amount in used.items():
            free[name] = max(0.0, free.get(name, 0.0) - amount)
        return free

    def shutdown(self) -> None:
        self._store.flush()
        with self._lock:
            hosts, self._hosts = self._hosts, {}
        for fut in hosts.values():
            fut.release()

"""RayBackend: the ``ray`` backend, in the driver and in every Ray worker.

In the driver: ``init(backend="ray")`` starts a local Ray (``num_cpus``,
``num_gpus`` and ``resources`` given to ``init`` become the node's), with its
session files in a private temp directory, and stops it at ``shutdown``
(the directory is a local-backend session's, under its lock: if the driver
is killed, Ray's processes die with it and the next ``init()`` on the
machine sweeps the directory);
``init(backend="ray", address="HOST:PORT")`` connects to a running Ray and
only disconnects at ``shutdown``; if this process is already connected to Ray
(the user called ``ray.init`` first), that connection is used and left as it
is. In a Ray worker (``worker.py``) the same class runs on the worker's own
connection, so every process owns the objects it creates, as in Ray.

This module imports Ray only inside `RayBackend.__init__`: ``beamlet
backends`` reads the class's flags without importing Ray.
"""
from __future__ import annotations

import collections
import os
import shutil
import sys

from ... import exceptions as exc
from ...core.generators import stream_prefix
from ...core.interfaces import Backend
from ...core.options import check_backend_options


class RayBackend(Backend):
    name = "ray"
    parallel = True
    isolated = True
    # Large buffers are Ray's: stored by Ray's serializer, read back as read-only
    # views of its object store (objects.py), and large arguments go by ref.
    zero_copy = True
    multi_node = True
    # Ray runs the workers, by the rules beamlet copies from it: a crashed
    # worker's task is retried per max_retries, a crashed actor restarted per
    # max_restarts, cancel(force=True) ends the task's process, and tasks and
    # actors hold the resources they ask for.
    manages_workers = True
    # Ray's ownership: a task's children's results die with the task's worker.
    owner_fate_sharing = True
    # Ray's rules: a blocked actor keeps its CPUs (only a blocked task lends
    # them), and what the GCS and owners tell (resources taken, an actor's
    # crash, an owner's death) reaches other processes a little later.
    actors_lend_cpus = False
    # Ray keeps a submitted task's ref arguments alive until it ends (its own
    # reference counting), so beamlet does not pin them again.
    engine_keeps_arguments = True
    prompt_state = False
    # Ray's own placement groups and concurrency groups (groups.py, scheduler.py).
    placement_groups = True
    concurrency_groups = True
    # Generator calls are Ray generator tasks (worker.py, objects.py).
    streaming_generators = True
    # The driver hears its own submissions; Ray workers send theirs, and each
    # attempt's start and end, to it (events.py). Off unless asked for,
    # ``init(backend="ray", task_events=True)``: it costs some 10% more CPU per
    # task (measured against the same runs without it); off, nothing is
    # recorded or sent, and the state API says it is not there.
    task_events = True

    accepted_options = frozenset({"dashboard", "task_events"})

    def __init__(self, config: dict, runtime):
        import ray as _ray

        from .control import RayControlStore
        from .objects import RayObjectStore
        from .scheduler import RayScheduler
        self.runtime = runtime
        self._ray = _ray
        self._connected = False   # this backend called ray.init (so calls ray.shutdown)
        self._temp_dir: str | None = None
        self._session = None  # the lock on _temp_dir (a local-backend SessionLock)
        self._is_driver = not config.get("ray_worker")
        #: item prefix -> the items a generator call running here made (stream_out)
        self._stream_out: dict[bytes, collections.deque] = {}
        #: (The driver, with task events.) Takes the events the workers send.
        self.events = None
        if self._is_driver:
            check_backend_options(config, self.accepted_options, self.name)
            self.task_events = bool(config.get("task_events", False))
            self._connect(config)
            self.job = {"job_id": runtime.job_id, "namespace": runtime.namespace,
                        "job_metadata": runtime.job_metadata,
                        "sys_path": [os.getcwd()] + [p for p in sys.path if p],
                        "task_events": self.task_events}
        else:
            self.task_events = False  # (a worker's runtime keeps no record: it sends)
            self.job = config["job"]
        context = _ray.get_runtime_context()
        #: The Ray cluster's address (its GCS), for other drivers' ``init(address=...)``.
        self.address = context.gcs_address
        self.node_id = context.get_node_id()
        self.worker_id = context.get_worker_id()
        try:
            self.object_store = RayObjectStore(runtime.refs, self._death_of,
                                               in_worker=not self._is_driver)
            if config.get("control_store"):
                from ...core.control_store import open_control_store
                self.control_store = open_control_store(config["control_store"])
            else:
                self.control_store = RayControlStore(in_worker=not self._is_driver)
            self.scheduler = RayScheduler(self)
            # (The Runtime calls it per ref let go of: one step less than the method.)
            self.object_released = self.object_store.release
            if self._is_driver and self.task_events:
                from .events import EventReceiver
                self.events = EventReceiver(self)
        except BaseException:
            self._disconnect()
            raise

    def _connect(self, config: dict) -> None:
        ray = self._ray
        address = config.get("address")
        if address or ray.is_initialized():
            given = [k for k in ("num_cpus", "num_gpus", "resources") if config.get(k)]
            if given:  # (as Ray refuses them when it joins a cluster)
                raise ValueError(f"init(backend='ray') joins a running Ray here, whose "
                                 f"resources are its own: {', '.join(given)} cannot be given")
        if ray.is_initialized():
            return  # the user's own connection: theirs to close
        import logging
        options = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            if not isinstance(address, str):
                raise TypeError(f"address must be a str like 'HOST:PORT' (Ray's GCS), got "
                                f"{type(address).__name__}")
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise exc.BackendError(f"could not connect to Ray at {address!r}: "
                                       f"{type(err).__name__}: {err}") from None
        else:
            resources = dict(config.get("resources") or {})
            from ..local.session import SessionLock, sweep
            sweep()
            self._session = SessionLock()
            self._temp_dir = self._session.temp_dir
            try:
                ray.init(address="local", num_cpus=config.get("num_cpus"),
                         num_gpus=config.get("num_gpus"), resources=resources or None,
                         include_dashboard=bool(config.get("dashboard")),
                         _temp_dir=self._temp_dir, **options)
            except BaseException:
                ray.shutdown()  # (whatever it started before failing)
                self._remove_temp_dir()
                raise
        self._connected = True

    # -- generator calls running here (worker.py) ----------------------------------------
    def stream_out(self, stream_id: bytes) -> collections.deque:
        """Where `put_stream_item` leaves the items of the generator call with
        `stream_id` that runs in this process, for its Ray generator to yield
        (Ray, not this process, then owns them: the caller does)."""
        out = collections.deque()
        self._stream_out[stream_prefix(stream_id)] = out
        return out

    def stream_done(self, stream_id: bytes) -> None:
        self._stream_out.pop(stream_prefix(stream_id), None)

    def put_stream_item(self, object_id: bytes, value) -> None:
        out = self._stream_out.get(object_id[:-8])  # (an item id: the stream's prefix, index)
        if out is None:
            raise exc.BackendError(f"item {object_id.hex()} of a generator call that is not "
                                   f"running in this Ray worker")
        out.append(value.detached())

    def _death_of(self, actor_id: bytes) -> str | None:
        """That the actor is dead and why, as beamlet recorded it (None: not
        recorded dead)."""
        from ...core.tables import ActorState
        info = self.runtime.tables.actor(actor_id)
        if info is None or info.state is not ActorState.DEAD:
            return None
        return f"the actor {info.class_name} is dead: {info.reason}"

    def settle_task_events(self) -> None:
        if self.events is not None:
            self.events.settle()

    def workers(self) -> list[dict]:
        """The driver, and the Ray worker processes that told of this job's tasks
        (alive: checked for those on the driver's node; elsewhere, while their
        node is)."""
        from ..local.inprocess import driver_worker_row
        rows = [driver_worker_row(self.worker_id)]
        if self.events is None:
            return rows
        nodes = None
        for info in list(self.events.workers.values()):
            if info["node_id"] == self.node_id:
                alive = _pid_alive(info["pid"])
            else:
                if nodes is None:
                    nodes = {n["NodeID"]: bool(n["Alive"]) for n in self._ray.nodes()}
                alive = nodes.get(info["node_id"], False)
            rows.append({"worker_id": info["worker_id"], "pid": info["pid"], "is_alive": alive,
                         "worker_type": "WORKER", "state": "ALIVE" if alive else "DEAD",
                         "actor_id": info["actor_id"]})
        return rows

    def nodes(self) -> list[dict]:
        from .scheduler import _visible
        return [{"NodeID": n["NodeID"], "Alive": bool(n["Alive"]),
                 "Resources": _visible(n.get("Resources") or {}),
                 "NodeManagerAddress": n.get("NodeManagerAddress", "")}
                for n in self._ray.nodes()]

    def shutdown(self) -> None:
        """Drop this process's Ray refs and handles; in the driver also remove
        the placement groups it made and free the names of the job's actors,
        then disconnect from Ray (stopping it if this
        backend started it)."""
        if self._is_driver:
            try:
                self.scheduler.groups.remove_made()
                self.scheduler.end_job_actors()
            except Exception:  # noqa: BLE001 - Ray is gone already
                pass
            if self.events is not None:
                self.events.close()
        self.object_store.close()
        self.control_store.close()
        if self._is_driver:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._connected:
            self._connected = False
            self._ray.shutdown()
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        if self._session is not None:
            self._session.release()
            self._session = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""DaskBackend: the ``dask`` backend, in the driver and in every Dask worker.

In the driver it connects to the cluster: ``init(backend="dask",
address="tcp://host:8786")``, ``init(backend="dask", client=client)`` (a
``distributed.Client`` the user made and keeps), or a ``LocalCluster`` it
starts itself (one worker process per CPU, one thread each, with an equal
share of the GPUs and custom resources given to ``init``) and stops at ``shutdown``. In a worker (``worker.py``) the same
class runs on the worker's own client, so every process owns the objects it
creates and Dask's reference counting spans them all.
"""
from __future__ import annotations

import os
import sys
import threading

from ... import exceptions as exc
from ...core import ids, plugins
from ...core.interfaces import Backend
from ...core.options import check_backend_options

_CONNECT_TIMEOUT = 10.0
_END_JOB_TIMEOUT = 30.0
#: Seconds `shutdown` waits for the observers to be told the ends of the tasks
#: whose results this driver has (a hook of theirs that blocks is not waited out).
SETTLE_TIMEOUT = 10.0


def task_events_channel(job_id: str) -> str:
    """The control-store channel on which a job's workers report its attempts."""
    return "task-events-" + job_id


def node_of(address: str) -> str:
    """The node id of the machine at a Dask address (``tls://127.0.0.1:8786`` ->
    ``dask-127.0.0.1``): a node is a machine, as in Ray, not a Dask worker."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return "dask-" + host


class DaskBackend(Backend):
    name = "dask"
    parallel = True
    isolated = True
    zero_copy = False
    multi_node = True
    manages_workers = False  # (Dask's nanny restarts workers; Dask retries their tasks)
    #: A large argument is scattered at the call (to a worker, which Dask then
    #: runs the task on), rather than copied here and sent with the task
    #: through the scheduler: a copy and a hop fewer (objects.py, `put`).
    large_arguments_by_ref = True

    accepted_options = frozenset({"client", "dashboard"})

    def __init__(self, config: dict, runtime):
        from .control import DaskControlStore
        from .objects import DaskObjectStore
        from .scheduler import DaskScheduler
        self.runtime = runtime
        self._cluster = None
        self._own_client = False
        self._is_driver = not config.get("dask_worker")
        if not self._is_driver:
            from distributed import get_client
            self.client = get_client()
            self.job = config["job"]
            from distributed import get_worker
            self.node_id = node_of(get_worker().address)
        else:
            check_backend_options(config, self.accepted_options, self.name)
            self.client = self._connect(config)
            # (Not the scheduler's scratch dir, which Dask put on this process's path.)
            own = self._cluster.local_directory if self._cluster is not None else None
            self.job = {"job_id": runtime.job_id, "namespace": runtime.namespace,
                        "sys_path": [os.getcwd()] + [p for p in sys.path if p and p != own],
                        "job_metadata": runtime.job_metadata,
                        "default_actor_lifetime": runtime.default_actor_lifetime,
                        # Whether the workers send each attempt's end here (the
                        # driver's plugins observe them): see worker._Job.
                        "task_events": plugins.observer("beamlet_task_finished") is not None}
            self.node_id = node_of(self.client.scheduler.address)
        self.worker_id = f"dask-{os.getpid()}"
        self._borrowed: set[bytes] = set()
        self._borrowed_lock = threading.Lock()
        self.object_store = DaskObjectStore(self.client, runtime.refs)
        if self._cluster is not None:  # (its scheduler shares this client's event loop)
            self.object_store.local_scheduler = self._cluster.scheduler
        self.control_store = DaskControlStore(self.client)
        self.scheduler = DaskScheduler(self)
        if self._is_driver and self.job["task_events"]:
            self.control_store.subscribe(task_events_channel(self.job["job_id"]),
                                         self.scheduler.task_event)
        if self._cluster is not None:  # (its workers started while this connected)
            try:
                self._cluster.ready()
            except BaseException:
                self.client.close()
                raise

    def _connect(self, config: dict):
        if config.get("client") is not None:
            from distributed import Client
            client = config["client"]
            if not isinstance(client, Client):
                raise TypeError(f"init(backend='dask', client=...) needs a distributed.Client, "
                                f"got {type(client).__name__}")
            return client
        address = config.get("address")
        self._own_client = True
        if address:
            from distributed import Client
            if not isinstance(address, str):
                raise TypeError(f"address must be a str like 'tcp://host:8786', got "
                                f"{type(address).__name__}")
            try:
                return Client(address, timeout=_CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise exc.BackendError(f"no Dask scheduler answered at {address!r} within "
                                       f"{_CONNECT_TIMEOUT:.0f} s: {err}") from None
        n = int(config.get("num_cpus") or os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"backend 'dask' needs num_cpus >= 1 to start its LocalCluster, "
                             f"got {config.get('num_cpus')!r}")
        resources = {}
        if config.get("num_gpus"):
            resources["GPU"] = float(config["num_gpus"]) / n
        for name, amount in (config.get("resources") or {}).items():
            resources[name] = float(amount) / n
        from .cluster import Cluster
        self._cluster = Cluster(n, resources, bool(config.get("dashboard")),
                                wait=False)  # (see __init__'s end)
        try:
            from distributed import Client
            # (Its workers are on this machine: values are fetched from them
            # directly, not relayed by the scheduler. On the scheduler's event
            # loop, as a client of Dask's own LocalCluster.)
            return Client(self._cluster.address, security=self._cluster.security,
                          timeout=_CONNECT_TIMEOUT, direct_to_workers=True,
                          loop=self._cluster.loop)
        except BaseException:
            self._cluster.stop()
            raise

    # -- references ---------------------------------------------------------------------
    def object_referenced(self, object_id: bytes) -> None:
        # Held lazily (hold_borrowed), and only ids from other processes: an id
        # made here is one this process submits or puts, whose Future the
        # submission makes. Were hold_borrowed (run by another task or actor
        # call in this process) to make it first, between the ref's creation
        # and its submission, Dask would take the submission for a duplicate of
        # a key this client has and drop it: the task would never run.
        if ids.minted_here(object_id):
            return
        with self._borrowed_lock:
            self._borrowed.add(object_id)

    def object_released(self, object_id: bytes) -> None:
        with self._borrowed_lock:
            self._borrowed.discard(object_id)
        self.object_store.delete([object_id])
        self.scheduler.token_released(object_id)

    def hold_borrowed(self) -> None:
        """Hold a Future for every ref this process still has but never used (a
        worker keeping refs it was passed beyond the task that passed them)."""
        if not self._borrowed:  # (the usual case, without the lock)
            return
        with self._borrowed_lock:
            borrowed, self._borrowed = self._borrowed, set()
        if borrowed:
            self.object_store.hold_all(borrowed)

    def nodes(self) -> list[dict]:
        """One entry per machine running Dask workers, their resources summed."""
        machines: dict[str, dict] = {}
        for address, resources in self.scheduler._worker_resources(refresh=True).items():
            total = machines.setdefault(node_of(address), {})
            for name, amount in resources.items():
                total[name] = total.get(name, 0.0) + amount
        return [{"NodeID": node, "Alive": True, "Resources": resources,
                 "NodeManagerAddress": node.removeprefix("dask-")}
                for node, resources in machines.items()]

    def shutdown(self) -> None:
        """Release this process's objects; in the driver also end the job on every
        worker (its actors stop, what it held is released), then close the
        client and the LocalCluster if this backend made them.

        Where the driver's plugins observe attempts (``job["task_events"]``),
        they have been told, when this returns, the end of every task whose
        result this driver has: a worker reports an end before it returns the
        result, but the report reaches the observers through the control
        store's delivery thread, which may be behind (``control.py``). It is
        waited for, up to `SETTLE_TIMEOUT` s."""
        if self._is_driver:
            try:
                self.scheduler.end_job_actors()
            except Exception:  # noqa: BLE001 - the scheduler is gone already
                pass
        self.scheduler.shutdown()
        self.object_store.close()
        if self._is_driver and self.job["task_events"]:
            self.control_store.delivered(SETTLE_TIMEOUT)
        self.control_store.close()
        if not self._is_driver:
            return
        from .worker import end_job
        try:
            # (callback_timeout is Client.sync's: run() passes it on.)
            self.client.run(end_job, self.job["job_id"], callback_timeout=_END_JOB_TIMEOUT)
        except Exception:  # noqa: BLE001 - the workers are gone already, or stuck
            pass
        if self._own_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.stop()

"""The ``local`` backend (the default): worker processes and a shared-memory
object store on one machine.

`LocalBackend` is the driver's side, and thin: it checks the settings and
runs a `Node` (``node.py``: workers, store, scheduler, I/O thread) inside
the driver's process, as the owner of the job's objects (`JobOwner`).
Submitting from the driver goes straight to the node's scheduler (no thread
hop); results wake the driver's `get` through the node's object store.
"""
from __future__ import annotations

import os
import sys

from ...core.control_store import open_control_store
from ...core.interfaces import Backend
from ...core.options import check_backend_options
from ...core.resources import ResourcePool
from ...core.runtime import Runtime
from ...core.task_spec import TaskSpec
from .inprocess import driver_worker_row
from .node import Node, default_store_capacity


class LocalBackend(Backend):
    """Worker processes plus a shared-memory object store, on this machine."""

    name = "local"
    parallel = True
    isolated = True
    zero_copy = True
    task_events = True
    placement_groups = True
    concurrency_groups = True
    streaming_generators = True

    #: init() keywords of this backend, beyond the common ones.
    accepted_options = frozenset({"object_store_memory", "max_workers", "prestart_workers"})

    def __init__(self, config: dict, runtime: Runtime):
        # Everything that can reject the config comes before anything is started.
        check_backend_options(config, self.accepted_options, self.name)
        capacity = config.get("object_store_memory") or default_store_capacity()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"object_store_memory must be a positive number of bytes, "
                             f"got {capacity!r}")
        for key in ("max_workers", "prestart_workers"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (1 if key == "max_workers" else 0)):
                raise ValueError(f"{key} must be a whole number >= "
                                 f"{1 if key == 'max_workers' else 0}, got {value!r}")
        pool = ResourcePool(config.get("num_cpus"), config.get("num_gpus"), config.get("resources"))
        self.control_store = open_control_store(config.get("control_store"))
        self.runtime = runtime
        self.refs = runtime.refs  # (JobOwner)
        self.worker_id = f"driver-{os.getpid()}"
        self.node = Node(self, self.control_store, pool, capacity, self.inline_threshold,
                         config.get("max_workers"), config.get("prestart_workers"),
                         direct_calls=True)
        self.node_id = self.node.node_id
        self.session = self.node.session
        self.temp_dir = self.node.temp_dir
        self.transport = self.node.transport
        self.object_store = self.node.object_store
        self.scheduler = self.node.scheduler
        # Called from ObjectRef.__del__, perhaps by the cyclic GC holding a lock:
        # the node only queues it (see Node.release). Bound here: one call less
        # per freed object than the method below.
        self.object_released = self.node.release
        # Small values' refs let go of their count off the caller's path (the
        # node settles it at its next chance: see Node.drop_ref).
        self.refs.drop = self.node.drop_ref

    @property
    def failure(self):
        """Why the backend cannot go on (its node's I/O thread died), once it cannot."""
        return self.node.failure

    # -- JobOwner (node.py): what the node asks of the driver -----------------------
    def job_config(self) -> dict:
        return {"job_id": self.runtime.job_id, "namespace": self.runtime.namespace,
                "sys_path": list(sys.path), "cwd": os.getcwd(),
                "runtime_env": self.runtime.runtime_env,
                "job_metadata": self.runtime.job_metadata,
                "default_actor_lifetime": self.runtime.default_actor_lifetime,
                "streaming_generators": self.streaming_generators}

    def accept(self, spec: TaskSpec) -> None:
        self.runtime.accept(spec)

    # -- Backend ------------------------------------------------------------------
    def object_released(self, object_id: bytes) -> None:
        self.node.release(object_id)  # (replaced per instance in __init__)

    def nodes(self) -> list[dict]:
        return [self.node.describe()]

    def preload(self, modules: list[str]) -> None:
        self.node.launcher.preload(modules)

    def workers(self) -> list[dict]:
        return [driver_worker_row(self.worker_id)] + self.scheduler.describe_workers()

    def shutdown(self) -> None:
        self.node.close()
        self.control_store.close()  # (a Redis store's connections and listener thread)

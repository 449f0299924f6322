"""RayScheduler: beamlet TaskSpecs as Ray tasks and actors.

- A task is a call of the job's Ray task (``worker.task_function``), its
  spec one bytes argument (``worker.wire``), with Ray's options from the spec:
  ``num_cpus``/``num_gpus``/``memory``/custom ``resources`` from its request,
  ``num_returns``, ``max_retries`` (a crashed worker; Ray retries), and its
  display name as the Ray task's name (the dashboard shows it). Its ref
  arguments go as top-level Ray ObjectRefs, which Ray resolves where it runs;
  waiting for them holds no worker. User exceptions are retried inside the
  task (``retry_exceptions``), as on every backend.
- An actor is an ``ActorHost`` Ray actor named ``beamlet-actor-<id hex>`` in
  the Ray namespace ``beamlet`` (so any process can find it by id), with
  ``max_restarts``, ``max_task_retries``, ``max_concurrency`` and ``lifetime``
  passed to Ray; its creation ref is the host's ``created()`` call. Method
  calls are Ray actor calls, in order per caller as Ray runs them. Beamlet's
  own names and namespaces for actors stay in the control store's tables.
- ``cancel`` is ``ray.cancel``, ``kill`` is ``ray.kill``.
- A request no Ray node could ever meet raises ``ValueError`` at submission
  (Ray would leave it pending, warning), naming the resource.
"""
from __future__ import annotations


import ray as _ray

from ... import exceptions as exc
from ...core import plugins
from ...core.interfaces import Scheduler
from ...core.scheduling import ActorLifecycle
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, TaskSpec
from .control import NAMESPACE
from .worker import ray_actor_host, ray_async_actor_host, task_function, wire

ACTOR_PREFIX = "beamlet-actor-"
_HIDDEN = ("node:", "accelerator_type:")


def _visible(resources: dict) -> dict:
    return {k: float(v) for k, v in resources.items()
            if not k.startswith(_HIDDEN) and k != "object_store_memory"}


class RayScheduler(Scheduler):
    def __init__(self, backend):
        self._backend = backend
        self._store = backend.object_store
        self._nodes: list[dict] | None = None  # each live node's resources, cached
        # Ray's .options() builds and checks a new wrapper each call: one per kind of task.
        self._task_kinds: dict[tuple, object] = {}
        self._run_task = task_function(backend.job)

    # -- resources -------------------------------------------------------------------
    def _node_resources(self, refresh: bool = False) -> list[dict]:
        if self._nodes is None or refresh:
            self._nodes = [_visible(n.get("Resources") or {}) for n in _ray.nodes()
                           if n.get("Alive")]
        return self._nodes

    def _options(self, spec: TaskSpec) -> dict:
        """Ray's resource options for `spec`, checked feasible on some node."""
        request = {k: float(v) for k, v in (spec.resources or {}).items() if v}
        for refresh in (False, True):
            nodes = self._node_resources(refresh)
            if any(all(have.get(k, 0.0) >= v for k, v in request.items()) for have in nodes):
                break
        else:
            known = sorted({k for have in nodes for k in have})
            missing = [k for k in request if k not in known]
            if missing:
                raise ValueError(f"{spec.display_name} requests resource {missing[0]!r} "
                                 f"({request[missing[0]]:g}), which no Ray node has; known "
                                 f"resources: {', '.join(known) or 'none'}")
            raise ValueError(f"{spec.display_name} requests {request}, but no Ray node has "
                             f"that much (each node's resources: {nodes[:4]}): it could "
                             f"never run")
        options = {"num_cpus": request.pop("CPU", 0.0), "num_gpus": request.pop("GPU", 0.0)}
        if "memory" in request:
            options["memory"] = request.pop("memory")
        if request:
            options["resources"] = request
        return options

    # -- submission --------------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        plugins.notify("beamlet_task_submitted", spec=spec)
        if spec.has_ref_args():
            dep_ids = list(dict.fromkeys(spec.dependencies()))
            dep_refs = [self._store.ray_ref(d) for d in dep_ids]
        else:
            dep_ids = dep_refs = []
        contained = spec.contained_refs()
        # (Ray refs and handles go as Ray values, so that Ray counts them as borrowed.)
        carried = self._store.carried(contained) if contained else None
        payload = wire(spec, dep_ids)
        # (The fewer arguments, the less Ray serializes: the common call has one.)
        args = (payload,) if carried is None and not dep_refs else (payload, carried, *dep_refs)
        n = len(spec.return_ids)
        if spec.kind == ACTOR_METHOD:
            host = self.actor(spec.actor_id)
            if host is None:
                self._store.fail(spec.return_ids, exc.ActorDiedError(
                    f"the actor {spec.function_name} is dead (no Ray actor has its id)"))
                return
            refs = host.call.options(num_returns=n, name=spec.display_name).remote(*args)
        elif spec.kind == ACTOR_CREATION:
            self._create_actor(spec, payload, carried, dep_refs)
            return
        else:
            refs = self._task_kind(spec).remote(*args)
        self._store.adopt(spec.return_ids, [refs] if n == 1 else refs,
                          spec.actor_id if spec.kind == ACTOR_METHOD else None)

    def _task_kind(self, spec: TaskSpec):
        """The job's Ray task with the spec's Ray options (made once per kind of task)."""
        key = (spec.display_name, len(spec.return_ids), spec.max_retries,
               tuple(sorted((spec.resources or {}).items())))
        kind = self._task_kinds.get(key)
        if kind is None:
            kind = self._task_kinds[key] = self._run_task.options(
                num_returns=key[1], max_retries=spec.max_retries, retry_exceptions=False,
                name=spec.display_name, **self._options(spec))
        return kind

    def _create_actor(self, spec: TaskSpec, payload, carried, dep_refs) -> None:
        options = spec.actor_options or {}
        host_class = ray_async_actor_host if options.get("is_async") else ray_actor_host
        detached = bool(options.get("detached"))
        host = host_class.options(
            name=ACTOR_PREFIX + spec.actor_id.hex(), namespace=NAMESPACE,
            lifetime="detached" if detached else None,
            max_restarts=options.get("max_restarts", 0),
            max_task_retries=options.get("max_task_retries", 0),
            max_concurrency=options.get("max_concurrency") or 1,
            **self._options(spec)).remote(self._backend.job, payload, carried, *dep_refs)
        # Recorded for the driver's shutdown, which frees the job's actors' names.
        self._backend.runtime.tables.note_job_actor(self._backend.job["job_id"], spec.actor_id,
                                                    detached)
        token = spec.return_ids[0]
        self._store.adopt_actor(spec.actor_id, token, host)
        self._store.adopt([token], [host.created.remote()])

    def actor(self, actor_id: bytes):
        """The Ray handle of the actor: held here, or found by its Ray name (then
        held while this process holds a handle to it). None if there is none."""
        handle = self._store.actors.get(actor_id)
        if handle is not None:
            return handle
        try:
            handle = _ray.get_actor(ACTOR_PREFIX + actor_id.hex(), namespace=NAMESPACE)
        except ValueError:
            return None
        info = self._backend.runtime.tables.actor(actor_id)
        if info is not None:
            self._store.adopt_actor(actor_id, info.ready_id, handle)
        return handle

    # -- control -----------------------------------------------------------------------
    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True) -> None:
        ref = self._store.ray_ref(object_id)
        try:
            _ray.cancel(ref, force=force, recursive=recursive)
        except ValueError:  # (Ray: force is not for actor calls) as on other backends: no force
            _ray.cancel(ref, force=False, recursive=recursive)

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        handle = self.actor(actor_id)
        if handle is None:
            return
        _ray.kill(handle, no_restart=no_restart)
        if no_restart:
            self._backend.runtime.tables.set_actor_state(
                actor_id, ActorLifecycle.DEAD.recorded, "it was killed by beamlet.kill()")

    def end_job_actors(self) -> None:
        """(The driver, at shutdown.) The job's actors' records outlive it here
        (in the engine): mark them dead so that their names are free again."""
        self._backend.runtime.tables.end_job_actors(self._backend.job["job_id"])

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 0.0, "GPU": 0.0, **_visible(_ray.cluster_resources())}

    def available_resources(self) -> dict[str, float]:
        return {"CPU": 0.0, "GPU": 0.0, **_visible(_ray.available_resources())}

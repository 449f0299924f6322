"""RayScheduler: beamlet TaskSpecs as Ray tasks and actors.

- A task is a call of the job's Ray task for its function
  (``worker.task_function``, which carries the function's code to the
  workers: control.py), its
  spec one bytes argument (``worker.wire``), with Ray's options from the spec:
  ``num_cpus``/``num_gpus``/``memory``/custom ``resources`` from its request,
  ``num_returns``, ``max_retries`` (a crashed worker; Ray retries), and its
  display name as the Ray task's name (the dashboard shows it). Its ref
  arguments go as top-level Ray ObjectRefs, which Ray resolves where it runs;
  waiting for them holds no worker. User exceptions are retried inside the
  task (``retry_exceptions``), as on every backend.
- An actor is a Ray actor of its class's host class (``worker.actor_class``)
  named ``beamlet-actor-<id hex>`` in
  the Ray namespace ``beamlet`` (so any process can find it by id), with
  ``max_restarts``, ``max_task_retries``, ``max_concurrency`` and ``lifetime``
  passed to Ray; its creation ref is the host's ``created()`` call. Method
  calls are Ray actor calls, in order per caller as Ray runs them: a plain
  one (`_submit_direct`) is a call of the Ray method of the same name with
  the call's arguments, as in Ray; the others a call of the host's ``call``
  or ``call_stream`` with the spec. Beamlet's
  own names and namespaces for actors stay in the control store's tables.
- ``cancel`` is ``ray.cancel``, ``kill`` is ``ray.kill``.
- A request no Ray node could ever meet raises ``ValueError`` at submission
  (Ray would leave it pending, warning), naming the resource.
"""
from __future__ import annotations

import json
import threading
import time

import ray as _ray

from ... import exceptions as exc
from ...core import plugins
from ...core.interfaces import Scheduler
from ...core.scheduling import ActorLifecycle
from ...core.tables import FUNCTIONS
from ...core.task_events import PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT, SUBMITTED_TO_WORKER
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, ARG_REF, ARG_VALUE, TASK, TaskSpec
from .control import NAMESPACE, CarriedCode
from .worker import actor_class, direct, plain_function, stream_function, task_function, wire

ACTOR_PREFIX = "beamlet-actor-"
#: actor id -> its concurrency groups' names, one a line (in the control store)
_GROUPS_TABLE = "ray_concurrency_groups"
_ASYNC = frozenset({None})  # (among an async actor's group names: see _note_groups)
_HIDDEN = ("node:", "accelerator_type:")


def _stream_options(spec: TaskSpec) -> dict:
    """Ray's options for a generator call: Ray holds the producer back."""
    mode, limit = spec.generator[0], spec.generator[1]
    options = {"num_returns": mode}
    if mode == "streaming" and limit > 0:
        options["_generator_backpressure_num_objects"] = limit
    return options


def _visible(resources: dict) -> dict:
    return {k: float(v) for k, v in resources.items()
            if not k.startswith(_HIDDEN) and k != "object_store_memory"}


def _finished(ref) -> bool:
    """Whether the task of `ref` has ended as this process sees it (its result
    is here), so that cancelling it must do nothing, and must not reach Ray.

    Ray 2.60's owner stores a task's results (waking ``ray.get``) a moment
    before it finishes its own record of the task; a ``ray.cancel`` in that
    moment (``get(ref)`` then ``cancel(ref)``, at once) fails the task a second
    time, and the owner's process dies on Ray's internal check ("Tried to
    complete task that was not pending"): exit code 1, without a word from
    Python. Seen under load in test_cancel."""
    ready, _ = _ray.wait([ref], timeout=0, fetch_local=False)
    return bool(ready)


class RayScheduler(Scheduler):
    def __init__(self, backend):
        self._backend = backend
        self._store = backend.object_store
        self._nodes: list[dict] | None = None  # each live node's resources, cached
        # Ray's .options() builds and checks a new wrapper each call: one per kind of task.
        self._task_kinds: dict[tuple, object] = {}
        #: The same for plain calls (`_plain_kind`): by their contents, and the
        #: last one of each function by the identity of its spec's shared parts.
        self._plain_kinds: dict[tuple, object] = {}
        self._plain: dict[tuple, tuple] = {}
        #: function id -> the job's Ray task (generator task) carrying its code
        self._run_tasks: dict[bytes, object] = {}
        self._run_streams: dict[bytes, object] = {}
        from .groups import RayPlacementGroups
        self.groups = RayPlacementGroups(backend, self._node_resources)
        #: actor id -> the names of its concurrency groups (those this process knows)
        self._concurrency_groups: dict[bytes, frozenset] = {}
        #: Whether submissions made here are told to the job's task record
        #: (events.py): by the driver's receiver, or a worker's sender.
        self._events_on = bool(backend.job.get("task_events"))
        if not self._events_on:  # (else each call is told to the task record: `submit`)
            self.submit_plain_call = self._submit_plain_call
        self._sender = None
        if self._events_on and backend.events is None:
            from .events import sender
            self._sender = sender()

    # -- resources -------------------------------------------------------------------
    def _node_resources(self, refresh: bool = False) -> list[dict]:
        if self._nodes is None or refresh:
            self._nodes = [_visible(n.get("Resources") or {}) for n in _ray.nodes()
                           if n.get("Alive")]
        return self._nodes

    def _options(self, spec: TaskSpec) -> dict:
        """Ray's resource and placement options for `spec`, checked feasible on
        some node (in its placement group: in a bundle it may use)."""
        if spec.placement_group is not None:
            request, strategy = self.groups.options(spec)
            options = self._resource_options({k: float(v) for k, v in request.items() if v})
            options["scheduling_strategy"] = strategy
            return options
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
        return self._resource_options(request)

    @staticmethod
    def _resource_options(request: dict) -> dict:
        request = dict(request)
        options = {"num_cpus": request.pop("CPU", 0.0), "num_gpus": request.pop("GPU", 0.0)}
        if "memory" in request:
            options["memory"] = request.pop("memory")
        if request:
            options["resources"] = request
        return options

    # -- submission --------------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        if spec.kind == TASK and spec.generator is None and spec.placement_group is None \
                and not self._events_on and len(spec.return_ids) == 1 and not spec.kwargs:
            refs = self._args_by_ref(spec.args) if spec.args else ()
            if refs is not None:
                # (A request no node could meet raises here, before the hooks hear of it.)
                remote = self._plain_kind(spec, bool(refs))
                plugins.notify("beamlet_task_submitted", spec=spec)
                self._store.adopt_one(spec.return_ids[0], remote.remote(*refs))
                return
        elif spec.kind == ACTOR_METHOD and spec.actor_options is None and \
                spec.generator is None and not self._events_on and \
                len(spec.return_ids) == 1 and not spec.kwargs and not spec.env_vars and \
                not spec.max_retries and not spec.retry_exceptions and \
                self._submit_direct(spec):
            return
        # A request no node could meet raises here, before the hooks hear of it.
        if spec.kind == ACTOR_CREATION:
            placed = self._options(spec)
        elif spec.kind == ACTOR_METHOD:
            placed = None
        else:
            if spec.placement_group is not None:
                self.groups.options(spec)  # (its group may be gone: the kind is cached)
            placed = self._task_kind(spec)
        plugins.notify("beamlet_task_submitted", spec=spec)
        if spec.has_ref_args():
            dep_ids = list(dict.fromkeys(spec.dependencies()))
            dep_refs = [self._store.ray_ref(d) for d in dep_ids]
        else:
            dep_ids = dep_refs = []
        if not self._events_on:
            self._submit(spec, dep_ids, dep_refs, placed)
            return
        self._tell_submitted(spec, dep_refs)
        try:
            self._submit(spec, dep_ids, dep_refs, placed)
        except BaseException as err:
            self._told_failed(spec, err)
            raise
        if self._backend.events is not None and spec.return_ids:
            self._backend.events.submitted_ref(spec.task_id,
                                               self._store.held_ref(spec.return_ids[0]))

    def _submit(self, spec: TaskSpec, dep_ids: list, dep_refs: list, placed) -> None:
        """Hand the spec to Ray (`placed`: a task's Ray remote function with its
        options, or an actor's Ray options)."""
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
                self._fail(spec, exc.ActorDiedError(
                    f"the actor {spec.function_name} is dead (no Ray actor has its id)"))
                return
            group = (spec.actor_options or {}).get("concurrency_group")
            method, options = host.call, {"num_returns": n, "name": spec.display_name}
            if spec.generator is not None:
                method = host.call_stream
                options.update(_stream_options(spec))
            if group is None:
                refs = method.options(**options).remote(*args)
            elif group in (names := self._groups_of(spec.actor_id)):
                # (An async actor's host keeps its groups itself: see worker.py.)
                if not names & _ASYNC:
                    options["concurrency_group"] = group
                refs = method.options(**options).remote(*args)
            else:
                # (Ray would crash the actor's process on a group it lacks.)
                self._fail(spec, ValueError(
                    f"{spec.display_name} was called in concurrency group {group!r}, which "
                    f"the actor does not define; its concurrency_groups are: "
                    f"{sorted(names - _ASYNC) or 'none'}"))
                return
        elif spec.kind == ACTOR_CREATION:
            self._create_actor(spec, payload, carried, dep_refs, placed)
            return
        else:
            refs = placed.remote(*args)
            if spec.placement_group is not None:
                self.groups.note_task(spec, [refs] if n == 1 else list(refs))
        if spec.generator is not None and spec.generator[0] == "streaming":
            # (The stream's own id stands for the task's end; its items come from
            # Ray's generator as the consumer asks for them: objects.py.)
            self._store.adopt_stream(spec.return_ids[0], refs)
            return
        self._store.adopt(spec.return_ids, [refs] if n == 1 else refs,
                          spec.actor_id if spec.kind == ACTOR_METHOD else None)

    def _submit_direct(self, spec: TaskSpec) -> bool:
        """Submit a plain call (the caller checked: one return, no generator, no
        group, keywords, env_vars, retries or task events) as a call of its
        Ray method (``worker.actor_class``), with its arguments as Ray's
        (`_direct_call`); False (and nothing done) if it cannot go so."""
        call = self._direct_call(spec.actor_id, spec.method_name, spec.args)
        if call is None:
            return False
        plugins.notify("beamlet_task_submitted", spec=spec)
        method, values = call
        self._store.adopt_call(spec.return_ids[0], method.remote(*values), spec.actor_id)
        return True

    def _submit_plain_call(self, actor_id: bytes, method_name: str, args: list,
                           return_id: bytes) -> bool:
        """``Scheduler.submit_plain_call``: `_submit_direct` without a spec."""
        store = self._store
        methods = store.methods.get(actor_id)
        method = methods.get(method_name) if methods is not None else None
        if method is None or args:  # (the common call of a known method without: here)
            call = self._direct_call(actor_id, method_name, args)
            if call is None:
                return False
            method, values = call
            store.adopt_call(return_id, method.remote(*values), actor_id)
        else:
            store.adopt_call(return_id, method.remote(), actor_id)
        return True

    def _direct_call(self, actor_id: bytes, method_name: str, args: list):
        """``(Ray method, Ray arguments)`` of a plain call (``worker.actor_class``):
        its refs' Ray refs, its inline values packed (``store.pack``); None if
        it cannot go so: a value containing refs, a method without a Ray
        method of its own, an actor this process cannot find."""
        store = self._store
        methods = store.methods.get(actor_id)
        method = methods.get(method_name) if methods is not None else None
        if method is None:
            if not direct(method_name):
                return None
            handle = self.actor(actor_id)
            if handle is None:
                return None
            method = getattr(handle, method_name, None)
            if method is None:  # (no Ray method of that name: see worker.actor_class)
                return None
            store.note_method(actor_id, handle, method_name, method)
        if not args:
            return method, ()
        values = []
        for kind, value in args:
            if kind == ARG_VALUE:
                if value.refs:
                    return None  # (their Ray refs travel beside them: `_submit`)
                values.append(store.pack(value))
            else:
                values.append(store.ray_ref(value))
        return method, values

    # -- task events (events.py) -------------------------------------------------------
    def _tell_submitted(self, spec: TaskSpec, dep_refs: list) -> None:
        """Tell the task record of a submission made here, and how far it is:
        waiting for arguments not ready yet, then (an actor call) sent to its actor."""
        backend = self._backend
        if backend.events is not None:
            backend.events.submitted(spec)
        else:
            self._sender.submitted(backend.job["job_id"], spec)
        task_id, attempt = spec.task_id, spec.attempt
        state = SUBMITTED_TO_WORKER if spec.kind == ACTOR_METHOD else None
        if dep_refs:
            _, waiting = _ray.wait(dep_refs, num_returns=len(dep_refs), timeout=0,
                                   fetch_local=False)
            if waiting:
                self._progress(task_id, attempt, PENDING_ARGS_AVAIL)
                after = state or PENDING_NODE_ASSIGNMENT
                left = [len(waiting)]
                lock = threading.Lock()

                # (Runs on Ray's I/O thread: it holds no spec, whose refs it might drop.)
                def arrived(_future):
                    with lock:
                        left[0] -= 1
                        done = left[0] == 0
                    if done:
                        self._progress(task_id, attempt, after)
                for ref in waiting:
                    ref.future().add_done_callback(arrived)
                return
        if state is not None:
            self._progress(task_id, attempt, state)

    def _progress(self, task_id: bytes, attempt: int, state: str) -> None:
        backend = self._backend
        if backend.events is not None:
            tell = self.task_progress
            if tell is not None:
                tell((task_id, attempt, state, None, time.perf_counter()))
        else:
            self._sender.progress(backend.job["job_id"], task_id, attempt, state)

    def _fail(self, spec: TaskSpec, error: BaseException) -> None:
        """Fail a submission that cannot reach Ray: its results are `error`."""
        self._store.fail(spec.return_ids, error)
        if self._events_on:
            self._told_failed(spec, error)

    def _told_failed(self, spec: TaskSpec, error: BaseException) -> None:
        """Tell the task record that a submission made here failed before Ray ran it."""
        if self._backend.events is not None:
            self._backend.events.failed_here(spec, error)
        else:
            self._sender.finished(self._backend.job["job_id"], spec, "FAILED", 0.0, None)

    def _args_by_ref(self, args: list) -> list | None:
        """The Ray refs of `args` if every one is a ref (`worker.plain_function`
        takes them), else None."""
        refs = []
        for kind, value in args:
            if kind != ARG_REF:
                return None
            refs.append(self._store.ray_ref(value))
        return refs

    def _plain_kind(self, spec: TaskSpec, takes_args: bool):
        """The Ray remote function with Ray's options for plain calls like `spec`
        (`worker.plain_function`): found by the identity of the spec's shared
        parts (a plain call's spec shares them with the function's earlier
        ones: see Runtime.plain_calls), else by their contents."""
        known = self._plain.get((spec.function_id, takes_args))
        if known is not None and known[0] is spec.resources and known[1] is spec.env_vars \
                and known[2] == spec.max_retries and known[3] is spec.retry_exceptions:
            return known[4]
        env = tuple(sorted(spec.env_vars.items())) if spec.env_vars else None
        key = (spec.function_id, takes_args, spec.function_name,
               tuple(sorted((spec.resources or {}).items())), spec.max_retries,
               spec.retry_exceptions, env, spec.caller_id)
        kind = self._plain_kinds.get(key)
        if kind is None:
            template = (spec.function_id, spec.function_name, spec.resources, spec.max_retries,
                        spec.retry_exceptions, spec.env_vars, spec.caller_id)
            kind = plain_function(self._backend.job, template, takes_args,
                                  self._code(spec.function_id)).options(
                num_returns=1, max_retries=spec.max_retries, retry_exceptions=False,
                name=spec.display_name, **self._options(spec))
            self._plain_kinds[key] = kind
        self._plain[spec.function_id, takes_args] = (
            spec.resources, spec.env_vars, spec.max_retries, spec.retry_exceptions, kind)
        return kind

    def _task_kind(self, spec: TaskSpec):
        """The job's Ray task with the spec's Ray options (made once per kind of task)."""
        key = (spec.function_id, spec.display_name, len(spec.return_ids), spec.max_retries,
               tuple(sorted((spec.resources or {}).items())),
               spec.placement_group and spec.placement_group[1], spec.generator)
        kind = self._task_kinds.get(key)
        if kind is None:
            if spec.generator is not None:
                run = self._run_streams.get(spec.function_id)
                if run is None:
                    run = self._run_streams[spec.function_id] = stream_function(
                        self._backend.job, self._code(spec.function_id))
                kind = run.options(
                    max_retries=spec.max_retries, retry_exceptions=False,
                    name=spec.display_name, **_stream_options(spec), **self._options(spec))
            else:
                run = self._run_tasks.get(spec.function_id)
                if run is None:
                    run = self._run_tasks[spec.function_id] = task_function(
                        self._backend.job, self._code(spec.function_id))
                kind = run.options(
                    num_returns=len(spec.return_ids), max_retries=spec.max_retries,
                    retry_exceptions=False, name=spec.display_name, **self._options(spec))
            self._task_kinds[key] = kind
        return kind

    def _code(self, function_id: bytes) -> CarriedCode | None:
        """The code of a function or class registered here, to travel with the
        Ray function or actor that runs it (control.py): read from this
        process's control store (the Ray one keeps the ``functions`` table in
        the process: no call)."""
        blob = self._backend.control_store.get(FUNCTIONS, function_id)
        return None if blob is None else CarriedCode(function_id, blob)

    def _create_actor(self, spec: TaskSpec, payload, carried, dep_refs, placed: dict) -> None:
        options = spec.actor_options or {}
        groups = options.get("concurrency_groups") or {}
        is_async = bool(options.get("is_async"))
        concurrency = options.get("max_concurrency") or 1
        if groups:
            self._note_groups(spec.actor_id, groups, is_async)
            if is_async:  # (its host holds each group to its limit)
                concurrency += sum(groups.values())
        host_class = actor_class(spec.function_id, spec.function_name,
                                 options.get("methods") or (), is_async, groups)
        detached = bool(options.get("detached"))
        host = host_class.options(
            name=ACTOR_PREFIX + spec.actor_id.hex(), namespace=NAMESPACE,
            lifetime="detached" if detached else None,
            max_restarts=options.get("max_restarts", 0),
            max_task_retries=options.get("max_task_retries", 0),
            max_concurrency=concurrency,
            **placed).remote(self._backend.job, self._code(spec.function_id), payload, carried,
                             *dep_refs)
        # Recorded for the driver's shutdown, which frees the job's actors' names.
        self._backend.runtime.tables.note_job_actor(self._backend.job["job_id"], spec.actor_id,
                                                    detached)
        if spec.placement_group is not None:
            self.groups.note_actor(spec, host)
        token = spec.return_ids[0]
        self._store.adopt_actor(spec.actor_id, token, host)
        self._store.adopt([token], [host.created.remote()])

    # -- concurrency groups ------------------------------------------------------------
    def _note_groups(self, actor_id: bytes, groups: dict, is_async: bool) -> None:
        """Record the actor's concurrency groups where every process finds them
        (with `_ASYNC` among them for an async actor)."""
        names = frozenset(groups) | (_ASYNC if is_async else frozenset())
        self._concurrency_groups[actor_id] = names
        self._backend.control_store.put(_GROUPS_TABLE, actor_id, json.dumps(
            {"groups": sorted(groups), "async": is_async}).encode())

    def _groups_of(self, actor_id: bytes) -> frozenset:
        """The names of the actor's concurrency groups (none: it has none)."""
        names = self._concurrency_groups.get(actor_id)
        if names is None:
            raw = self._backend.control_store.get(_GROUPS_TABLE, actor_id)
            record = json.loads(raw) if raw else {"groups": [], "async": False}
            names = frozenset(record["groups"]) | (_ASYNC if record["async"] else frozenset())
            self._concurrency_groups[actor_id] = names
        return names

    # -- placement groups --------------------------------------------------------------
    def create_placement_group(self, info) -> None:
        self.groups.create(info)

    def remove_placement_group(self, pg_id: bytes) -> None:
        self.groups.remove(pg_id)

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
        if _finished(ref):
            return
        try:
            _ray.cancel(ref, force=force, recursive=recursive)
        except ValueError as err:  # (Ray's refusal of force for an actor call)
            raise ValueError(f"force=True is not supported for actor calls; use kill() "
                             f"(Ray: {err})") from None

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        handle = self.actor(actor_id)
        if handle is None:
            return
        _ray.kill(handle, no_restart=no_restart)
        if no_restart:
            reason = "it was killed by beamlet.kill()"
            self._backend.runtime.tables.set_actor_state(
                actor_id, ActorLifecycle.DEAD.recorded, reason)
            if self._events_on:
                info = self._backend.runtime.tables.actor(actor_id)
                name = info.class_name if info is not None else "?"
                if self._backend.events is not None:
                    plugins.notify("beamlet_actor_state", actor_id=actor_id, class_name=name,
                                   state="DEAD", reason=reason)
                else:
                    self._sender.actor_state(self._backend.job["job_id"], actor_id, name,
                                             "DEAD", reason)

    def end_job_actors(self) -> None:
        """(The driver, at shutdown.) The job's actors' records outlive it here
        (in the engine): mark them dead so that their names are free again."""
        self._backend.runtime.tables.end_job_actors(self._backend.job["job_id"])

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 0.0, "GPU": 0.0, **_visible(_ray.cluster_resources())}

    def available_resources(self) -> dict[str, float]:
        return {"CPU": 0.0, "GPU": 0.0, **_visible(_ray.available_resources())}

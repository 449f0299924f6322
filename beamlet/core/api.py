"""The public API functions (re-exported by ``beamlet``)."""
from __future__ import annotations

import atexit
import inspect
import os
from typing import Any, Sequence

from . import plugins
from . import runtime as _runtime
from .actor import ActorClass, ActorHandle, get_actor, method  # noqa: F401 - re-exported
from .object_ref import ObjectRef
from .options import check_runtime_env
from .remote_function import RemoteFunction

DEFAULT_BACKEND = "local"
BACKEND_ENV_VAR = "BEAMLET_BACKEND"
ADDRESS_ENV_VAR = "BEAMLET_ADDRESS"  # the cluster a plain init() connects to


def init(backend: str | None = None, address: str | None = None, num_cpus: float | None = None,
         num_gpus: float | None = None, resources: dict | None = None, local_mode: bool = False,
         namespace: str | None = None, ignore_reinit_error: bool = False,
         runtime_env: dict | None = None, job_config=None, **backend_options):
    """Start (or connect to) a backend and make it the current one.

    ``backend`` defaults to ``$BEAMLET_BACKEND``, then ``"local"``; ``local_mode=True``
    means ``"inprocess"``. ``address`` (default ``$BEAMLET_ADDRESS``, or for a
    backend whose factory names one, its own variable: ``$RAY_ADDRESS`` for
    ``ray``) joins a running cluster (``address="local"`` means start one here,
    as in Ray). ``runtime_env``
    (only ``env_vars``; other fields raise ValueError) applies to every task and
    actor of the job, under their own. ``job_config`` (a
    ``beamlet.job_config.JobConfig``) supplies the runtime_env and namespace
    not given here, the job's metadata and its default actor lifetime.
    Extra keyword arguments are the backend's
    own options (e.g. ``object_store_memory``).
    Returns an InitContext: a dict describing what started, which, like Ray's
    context, also works as ``with init(...):`` and has ``disconnect()``.
    """
    with _runtime._init_lock:
        if _runtime.current_or_none() is not None:
            if ignore_reinit_error:
                return _context_info(_runtime.current())
            raise RuntimeError("beamlet.init() was already called; call shutdown() first, "
                               "or pass ignore_reinit_error=True")
        if local_mode:
            if backend not in (None, "inprocess"):
                raise ValueError(f"local_mode=True means backend='inprocess', not {backend!r}")
            backend = "inprocess"
        if backend is None:
            backend = os.environ.get(BACKEND_ENV_VAR) or DEFAULT_BACKEND
        factories = plugins.backend_factories()
        if address is None and backend == DEFAULT_BACKEND and os.environ.get(ADDRESS_ENV_VAR):
            address = os.environ[ADDRESS_ENV_VAR]  # as in Ray: a plain init() joins it
        if address is None:  # (e.g. the ray backend's $RAY_ADDRESS, as ray.init() reads it)
            env_var = getattr(factories.get(backend), "address_env_var", None)
            if env_var and os.environ.get(env_var):
                address = os.environ[env_var]
        if address == "local":  # Ray: start a new local instance, never connect
            address = None
        if address is not None and backend == DEFAULT_BACKEND and not os.environ.get(BACKEND_ENV_VAR):
            backend = "cluster"
        if backend == "cluster" and backend not in factories:
            raise ValueError(f"init(address={address!r}) needs the cluster backend, which is "
                             f"not available yet; installed backends: "
                             f"{', '.join(sorted(factories))}")
        if backend not in factories:
            raise ValueError(f"unknown backend {backend!r}; installed backends: "
                             f"{', '.join(sorted(factories))}")
        _check_resources(num_cpus, num_gpus, resources)
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError(f"namespace must be a string, got {namespace!r}")
        job = _job_options(job_config, namespace)
        if runtime_env is None:
            runtime_env = job.get("runtime_env")
        namespace = namespace if namespace is not None else job.get("namespace")
        runtime_env = check_runtime_env(runtime_env) if runtime_env is not None else {}
        config = dict(backend_options)
        if job_config is not None:
            config.update(job_metadata=job["metadata"],
                          default_actor_lifetime=job["default_actor_lifetime"])
        config.update(backend=backend, address=address, num_cpus=num_cpus, num_gpus=num_gpus,
                      resources=dict(resources or {}), namespace=namespace,
                      runtime_env=runtime_env)
        rt = _runtime.Runtime(factories[backend], config)
        _runtime.set_current(rt)
        hook = plugins.observer("beamlet_init")
        if hook is not None:
            hook(backend_name=backend, config=config)
        return _context_info(rt)


def _job_options(job_config, namespace) -> dict:
    """What init takes from a JobConfig (nothing from None)."""
    if job_config is None:
        return {}
    from ..job_config import JobConfig
    if not isinstance(job_config, JobConfig):
        raise TypeError(f"job_config must be a beamlet.job_config.JobConfig, got {job_config!r}")
    job = job_config._init_options()
    if namespace is not None and job["namespace"] is not None and namespace != job["namespace"]:
        raise ValueError(f"init(namespace={namespace!r}) and its JobConfig(ray_namespace="
                         f"{job['namespace']!r}) disagree")
    return job


def _check_resources(num_cpus, num_gpus, resources) -> None:
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    for name, value in (resources or {}).items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"use num_{name.lower()}s= instead of resources={{{name!r}: ...}}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"resource {name!r} must be a number >= 0, got {value!r}")


class InitContext(dict):
    """What `init()` returns: a dict (``backend``, ``namespace``, ``node_id``,
    ``resources``) that also behaves like Ray's context object: ``with
    init(...):`` shuts down at the end of the block, ``disconnect()`` shuts
    down, ``address_info`` is the dict itself and ``dashboard_url`` is None
    (there is no dashboard)."""

    dashboard_url = None

    @property
    def address_info(self) -> dict:
        return dict(self)

    def disconnect(self) -> None:
        shutdown()

    def __enter__(self) -> "InitContext":
        return self

    def __exit__(self, *exc_info) -> None:
        shutdown()


def _context_info(rt) -> InitContext:
    return InitContext(backend=rt.backend.name, namespace=rt.namespace,
                       node_id=rt.backend.node_id,
                       resources=rt.backend.scheduler.total_resources())


def shutdown() -> None:
    """Stop the current backend: every process, segment and temp file it made. Idempotent."""
    with _runtime._init_lock:
        rt = _runtime.current_or_none()
        if rt is None:
            return
        hook = plugins.observer("beamlet_shutdown")
        if hook is not None:
            hook(backend_name=rt.backend.name)
        _runtime.set_current(None)
        rt.shutdown()
        path = os.environ.get(TIMELINE_ENV_VAR)
        if path and rt.task_events is not None:
            _write_timeline(rt.task_events, path)


atexit.register(shutdown)

#: A file the driver writes its timeline to when it shuts down (see `timeline`;
#: ``beamlet timeline FILE PROGRAM`` sets it).
TIMELINE_ENV_VAR = "BEAMLET_TIMELINE"


def timeline(filename: str | None = None) -> list[dict] | None:
    """The job's task attempts so far as Chrome trace events (load the file in
    chrome://tracing or https://ui.perfetto.dev): returned as a list, or, given
    `filename`, written there as JSON (as Ray's ``ray.timeline``). Needs a
    backend with the ``task_events`` flag; the newest 100,000 attempts are kept."""
    rt = _runtime.current_or_none()
    if rt is None:
        raise RuntimeError("timeline(): beamlet is not initialized; call beamlet.init() first")
    if rt.task_events is None:
        raise NotImplementedError(f"timeline() needs a backend whose driver sees every task "
                                  f"(task_events); the {rt.backend.name!r} backend does not")
    rt.backend.settle_task_events()
    if filename is None:
        from .task_events import chrome_trace
        return chrome_trace(rt.task_events.spans())
    _write_timeline(rt.task_events, filename)
    return None


def _write_timeline(task_events, filename: str) -> None:
    import json

    from .task_events import chrome_trace
    with open(filename, "w") as f:
        json.dump(chrome_trace(task_events.spans()), f)


def is_initialized() -> bool:
    return _runtime.current_or_none() is not None


def remote(*args, **options):
    """Make a function a remote function or a class an actor class.

    ``@remote``, or ``@remote(num_cpus=..., num_returns=..., ...)``; ``@remote()``
    with empty parentheses is an error, as in Ray (the AssertionError Ray raises,
    here raised explicitly, so also under ``python -O``). An ``async def`` function is
    refused (ValueError, as in Ray): async code belongs in actors."""
    if len(args) == 1 and not options and (inspect.isfunction(args[0]) or inspect.isclass(args[0])
                                           or callable(args[0])):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@remote takes a function or class, or only keyword options: "
                        "@remote(num_cpus=1)")
    if not options:
        raise AssertionError(
            "the @remote decorator must be applied either with no arguments and no "
            "parentheses, as '@remote', or with some options, as '@remote(num_cpus=1)'")
    return lambda fn_or_cls: _make_remote(fn_or_cls, options)


def _make_remote(obj, options: dict):
    if inspect.isclass(obj):
        return ActorClass(obj, options)
    if inspect.iscoroutinefunction(obj) or inspect.isasyncgenfunction(obj):
        raise ValueError(f"'async def' cannot be a remote task ({_qualname(obj)}): wrap it, "
                         f"as in 'def f(): return asyncio.run(g())', or make it a method of "
                         f"an actor (async actors run it on their event loop)")
    if callable(obj):
        return RemoteFunction(obj, options)
    raise TypeError(f"@remote needs a function or class, got {obj!r}")


def _qualname(obj) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def _check_refs(object_refs, what: str) -> None:
    if set(map(type, object_refs)) <= {ObjectRef}:
        return  # (one C-level pass; the loop below finds the culprit to name)
    for ref in object_refs:
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"{what} takes ObjectRefs, got {type(ref).__name__} ({ref!r:.60})")


def get(object_refs, *, timeout: float | None = None):
    """The value of a ref, or the list of values of a list of refs.

    Blocks until they exist; raises the task's error if it failed, and
    ``GetTimeoutError`` after `timeout` seconds."""
    rt = _runtime.current()
    if isinstance(object_refs, ObjectRef):
        if timeout is not None:
            _runtime._check_timeout(timeout)
        return rt.get_one(object_refs, timeout)
    if not isinstance(object_refs, (list, tuple)):
        from .generators import ObjectRefGenerator
        if isinstance(object_refs, ObjectRefGenerator):
            raise TypeError("get() of an ObjectRefGenerator is not allowed (as in Ray): get "
                            "the refs it gives (for ref in gen: get(ref)), or "
                            "gen.completed() to wait for its task")
        # (ValueError, as Ray raises here; a list holding a non-ref: TypeError)
        raise ValueError("get() expects an ObjectRef or a list of ObjectRefs, got "
                         f"{type(object_refs).__name__} ({object_refs!r:.60})")
    _check_refs(object_refs, "get()")
    return rt.get(list(object_refs), timeout)


def put(value: Any) -> ObjectRef:
    """Store a value in the object store; return its ref."""
    return _runtime.current().put(value)


def wait(object_refs: Sequence[ObjectRef], *, num_returns: int = 1,
         timeout: float | None = None, fetch_local: bool = True):
    """``(ready, not_ready)``: at most `num_returns` ready refs, once that many are
    ready or `timeout` passed; both lists keep the input order. An empty list
    gives ``([], [])`` at once. The list may hold ObjectRefGenerators too: one
    is ready when ``next`` on it would not block (its next item, or its end, is
    there)."""
    if isinstance(object_refs, ObjectRef) or not isinstance(object_refs, (list, tuple)):
        raise TypeError("wait() expects a list of ObjectRefs, got "
                        f"{type(object_refs).__name__}")
    generators = None
    if set(map(type, object_refs)) - {ObjectRef}:
        from . import generators
        if not all(map(generators.is_waitable, object_refs)):
            generators = None
    if generators is None:
        _check_refs(object_refs, "wait()")
    if not object_refs:
        return [], []  # (as Ray: before the num_returns checks)
    if not isinstance(num_returns, int) or num_returns < 1:
        raise ValueError(f"num_returns must be an integer >= 1, got {num_returns!r}")
    if num_returns > len(object_refs):
        raise ValueError(f"num_returns ({num_returns}) cannot exceed the number of refs "
                         f"({len(object_refs)})")
    if generators is not None:
        ids = [getattr(w, "_ref", w).id for w in object_refs]
        if len(set(ids)) != len(ids):
            raise ValueError("wait() got duplicate ObjectRefs or generators")
        _runtime._check_timeout(timeout)
        return generators.wait(_runtime.current(), list(object_refs), num_returns, timeout)
    ids = list(map(_runtime._ID_OF, object_refs))
    if len(set(ids)) != len(ids):
        raise ValueError("wait() got duplicate ObjectRefs")
    return _runtime.current().wait(list(object_refs), num_returns, timeout, ids)


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes `object_ref` (see Scheduler.cancel); `get` then raises
    TaskCancelledError. `recursive` (the default, as in Ray): the tasks it submitted
    that are still queued or running are cancelled too. An ObjectRefGenerator
    cancels its generator task: its next item is then the cancellation error."""
    from .generators import ObjectRefGenerator
    if isinstance(object_ref, ObjectRefGenerator):
        object_ref = object_ref.completed()
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(object_ref).__name__}")
    _runtime.current().cancel(object_ref, force, recursive)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill an actor at once; its calls then raise ActorDiedError."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an ActorHandle, got {type(actor).__name__}")
    _runtime.current().kill_actor(actor._actor_id, no_restart)


def nodes() -> list[dict]:
    return _runtime.current().backend.nodes()


def cluster_resources() -> dict:
    return dict(_runtime.current().backend.scheduler.total_resources())


def available_resources() -> dict:
    """What is free now; as in Ray, a resource with nothing free is left out."""
    return {name: amount for name, amount in
            _runtime.current().backend.scheduler.available_resources().items() if amount > 0}


class RuntimeContext:
    """What `get_runtime_context()` returns: ids of the job, node, worker, task, actor."""

    def __init__(self, rt):
        self._rt = rt
        self._task = _runtime.task_context.get()

    def get_job_id(self) -> str:
        return self._rt.job_id

    def get_job_metadata(self) -> dict:
        """The job's metadata (``JobConfig(metadata=...)``); {} without any."""
        return dict(self._rt.job_metadata)

    def get_node_id(self) -> str:
        return self._rt.backend.node_id

    def get_worker_id(self) -> str:
        return self._rt.backend.worker_id

    def get_task_id(self) -> str | None:
        return self._task.task_id.hex() if self._task and self._task.task_id else None

    def get_actor_id(self) -> str | None:
        return self._task.actor_id.hex() if self._task and self._task.actor_id else None

    def get_assigned_resources(self) -> dict:
        return dict(self._task.resources) if self._task else {}

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        """``{"GPU": [ids as strings]}`` for the running task or actor (Ray's form)."""
        return {"GPU": [str(i) for i in get_gpu_ids()]}

    @property
    def current_actor(self) -> ActorHandle:
        """A handle to the actor this is called in; RuntimeError outside an actor."""
        from .actor import current_actor_handle
        return current_actor_handle()

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether the actor this is called in was restarted (its process died
        or was killed with ``no_restart=False``); False outside an actor."""
        from .execution import reconstructed_actors
        return bool(self._task and self._task.actor_id in reconstructed_actors)

    def get_actor_name(self) -> str | None:
        """The name of the actor this is called in ("" if it has none), None outside
        an actor."""
        if not self._task or not self._task.actor_id:
            return None
        info = self._rt.tables.actor(self._task.actor_id)
        return (info.name if info is not None else None) or ""

    @property
    def namespace(self) -> str:
        return self._rt.namespace

    def get_namespace(self) -> str:
        return self._rt.namespace

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def backend(self) -> str:
        return self._rt.backend.name


def get_gpu_ids() -> list[int]:
    """The GPU ids assigned to the running task or actor (from CUDA_VISIBLE_DEVICES);
    in the driver, every GPU visible to it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        if _runtime.task_context.get() is not None:
            return []
        count = int(_runtime.current().backend.scheduler.total_resources().get("GPU", 0))
        return list(range(count))
    return [int(x) for x in visible.split(",") if x.strip().isdigit()]


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext(_runtime.current())


__all__ = ["init", "shutdown", "is_initialized", "remote", "get", "put", "wait", "cancel",
           "kill", "get_actor", "method", "nodes", "cluster_resources", "available_resources",
           "get_runtime_context", "get_gpu_ids", "ObjectRef", "ActorHandle"]

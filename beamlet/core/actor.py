"""Actors: what `@remote` makes of a class, and handles to running actors."""
from __future__ import annotations

import inspect
from typing import Any

from .. import exceptions as exc
from . import ids
from . import runtime as _runtime
from .object_ref import ObjectRef
from .options import (ACTOR_OPTIONS, DYNAMIC, METHOD_OPTIONS, STREAMING, env_vars_of,
                      resource_request, validate)
from .placement import placement_request
from .plugins import observed
from .serialization import dumps
from .signature import ArgSpec
from .task_spec import ACTOR_CREATION, ACTOR_METHOD, TaskSpec

DEFAULT_ASYNC_CONCURRENCY = 1000
_METHOD_OPTIONS_ATTR = "__beamlet_method_options__"

# Methods every actor has, as in Ray, whatever its class defines (see
# `execution._actor_method`): ``__ray_ready__`` returns True once the actor is
# up; ``__ray_terminate__`` ends the actor after the calls submitted before it.
SPECIAL_METHODS = ("__ray_ready__", "__ray_terminate__")


def method(**options):
    """Decorate an actor method with per-method options, e.g. ``@method(num_returns=2)``."""
    validate(options, METHOD_OPTIONS, "@method")

    def decorate(fn):
        setattr(fn, _METHOD_OPTIONS_ATTR, options)
        return fn

    return decorate


def _method_table(cls: type) -> dict[str, dict]:
    """name -> {"num_returns", "is_async", "params", "backpressure"} for every
    public method of the class (a generator method streams unless its
    ``num_returns`` says otherwise, as in Ray)."""
    from .remote_function import num_returns_of
    table = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") and name != "__call__":
            continue
        if not (inspect.isfunction(member) or inspect.ismethod(member)):
            continue
        opts = getattr(member, _METHOD_OPTIONS_ATTR, {})
        bound = inspect.ismethod(member) or isinstance(inspect.getattr_static(cls, name, None),
                                                       staticmethod)
        argspec = ArgSpec.of(member, skip_first=not bound)
        table[name] = {"num_returns": num_returns_of(opts, member),
                       "backpressure": opts.get("_generator_backpressure_num_objects", -1),
                       "is_async": inspect.iscoroutinefunction(member) or
                       inspect.isasyncgenfunction(member),
                       # (plain tuples: the table is stored in the control store)
                       "params": None if argspec is None else argspec.params,
                       "concurrency_group": opts.get("concurrency_group")}
    return table


def _constructor_argspec(cls: type) -> "ArgSpec | None":
    if cls.__init__ is object.__init__:
        return None if cls.__new__ is not object.__new__ else ArgSpec(())
    return ArgSpec.of(cls.__init__, skip_first=True)


_SUBMITTED = "beamlet_task_submitted"


class ActorClass:
    """A class whose instances run as actors: ``Cls.remote(*args)`` returns an ActorHandle."""

    def __init__(self, cls: type, options: dict):
        self._cls = cls
        self._name = cls.__qualname__
        self._options = validate(options, ACTOR_OPTIONS, f"actor class {self._name}")
        self._methods = _method_table(cls)
        self._init_argspec = _constructor_argspec(cls)
        self._blob: bytes | None = None
        self._class_id: bytes | None = None
        self.__doc__ = cls.__doc__
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__module__ = cls.__module__

    def __mro_entries__(self, bases):
        raise TypeError(f"cannot subclass the actor class {self._name}: inheriting from "
                        f"actor classes is not allowed (as in Ray); subclass the plain class "
                        f"and decorate the subclass with @remote instead")

    def __getattr__(self, name: str):
        # Class attributes, static and class methods of the class, through the
        # decorated name (``Counter.LIMIT``, ``Counter.helper()``), as in Ray.
        cls = self.__dict__.get("_cls")
        if cls is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        if inspect.isfunction(inspect.getattr_static(cls, name, None)):
            # An instance method runs on an actor, never on the class. Not handing
            # the plain function out also keeps cloudpickle from pickling the
            # methods by reference (as ``module.Cls.method``), which would make
            # every actor's process import the defining module.
            raise AttributeError(f"{name!r} is a method of the actor class {self._name}: call "
                                 f"it on an actor, {self._name}.remote().{name}.remote(...)")
        try:
            return getattr(cls, name)
        except AttributeError:
            raise AttributeError(f"actor class {self._name} has no attribute {name!r}") from None

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actors cannot be instantiated directly. Instead of "
                        f"'{self._name}()', use '{self._name}.remote()'.")

    def options(self, **options) -> "_ActorClassWithOptions":
        merged = dict(self._options)
        merged.update(validate(options, ACTOR_OPTIONS, f"{self._name}.options()"))
        return _ActorClassWithOptions(self, merged)

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._create(args, kwargs, self._options)

    def _code(self) -> tuple[bytes, bytes]:
        if self._class_id is None:
            self._blob = dumps(self._cls)
            self._class_id = ids.function_id(self._blob)
        return self._class_id, self._blob

    def _create(self, args, kwargs, options: dict) -> "ActorHandle":
        from .tables import ActorInfo
        groups = options.get("concurrency_groups") or {}
        for method_name, entry in self._methods.items():
            group = entry["concurrency_group"]
            if group is not None and group not in groups:
                raise ValueError(f"method {self._name}.{method_name} is in concurrency group "
                                 f"{group!r}, which the actor does not define; its "
                                 f"concurrency_groups are: {sorted(groups) or 'none'}")
        if self._init_argspec is not None:
            self._init_argspec.check(args, kwargs, f"{self._name}.remote()")
        rt = _runtime.current()
        if groups and not rt.backend.concurrency_groups:
            raise ValueError(f"{self._name}: the {rt.backend.name!r} backend does not support "
                             f"concurrency_groups (refused rather than ignored); use "
                             f"max_concurrency, or a backend with the concurrency_groups flag")
        name = options.get("name")
        namespace = options.get("namespace") or rt.namespace
        get_if_exists = name is not None and options.get("get_if_exists")
        if get_if_exists:
            try:
                return get_actor(name, namespace)
            except ValueError:
                pass
        if name is not None and not name:
            raise ValueError("actor name must be a non-empty string")
        class_id, blob = self._code()
        rt.register_function(class_id, blob)
        is_async = any(m["is_async"] for m in self._methods.values())
        concurrency = options.get("max_concurrency") or (DEFAULT_ASYNC_CONCURRENCY if is_async else 1)
        actor_id = ids.new_id()
        actor_options = {
            "name": name, "namespace": namespace, "class_name": self._name,
            "max_restarts": options.get("max_restarts", 0),
            "max_task_retries": options.get("max_task_retries", 0),
            "max_concurrency": concurrency, "is_async": is_async,
            "detached": (options.get("lifetime") or rt.default_actor_lifetime) == "detached",
            "methods": self._methods,
            "concurrency_groups": options.get("concurrency_groups") or {},
        }
        # Actors hold no CPU while idle unless asked to (Ray's default).
        resources, placed = placement_request(resource_request(options, 0.0),
                                              options.get("scheduling_strategy"))
        spec, _keep = rt.make_spec(ACTOR_CREATION, class_id, self._name, args, kwargs, 1,
                                   resources, actor_id=actor_id, actor_options=actor_options,
                                   env_vars=env_vars_of(options), placement_group=placed)
        try:
            rt.tables.create_actor(ActorInfo(actor_id, self._name, name, namespace,
                                             spec.return_ids[0], self._methods))
        except exc.ActorAlreadyExistsError:
            if get_if_exists:  # created elsewhere since the lookup above: that one it is
                return get_actor(name, namespace)
            raise
        try:
            token = rt.submit(spec)[0]
        except BaseException:
            # Rejected at the call site (e.g. resources no node has): no actor
            # exists, so its name must not stay taken.
            rt.tables.forget_actor(actor_id)
            raise
        return ActorHandle(actor_id, self._name, self._methods, token)

    def __repr__(self) -> str:
        return f"<beamlet actor class {self._name}>"


class _ActorClassWithOptions:
    def __init__(self, actor_class: ActorClass, options: dict):
        self._actor_class = actor_class
        self._options = options

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._actor_class._create(args, kwargs, self._options)

    def options(self, **options):
        merged = dict(self._options)
        merged.update(validate(options, ACTOR_OPTIONS, f"{self._actor_class._name}.options()"))
        return _ActorClassWithOptions(self._actor_class, merged)


class ActorHandle:
    """A handle to a running actor: ``handle.method.remote(...)`` returns refs.

    Handles can be passed to tasks and other actors. The actor lives while any
    handle to it exists anywhere (unless it was created with
    ``lifetime="detached"``, or is killed).
    """

    def __init__(self, actor_id: bytes, class_name: str, methods: dict, token: ObjectRef):
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._token = token  # a ref to the creation result; keeps the actor alive

    def __getattr__(self, name: str) -> "ActorMethod":
        methods = self.__dict__.get("_methods")
        if methods is not None and name in SPECIAL_METHODS and name not in methods:
            return ActorMethod(self, name, 1)
        if methods is None or name not in methods:
            raise AttributeError(f"actor {self.__dict__.get('_class_name', '?')} has no "
                                 f"method {name!r}")
        entry = methods[name]
        backpressure = entry.get("backpressure", -1)
        # Kept in the handle's __dict__, so that the next ``handle.name`` is a
        # plain attribute: the kept one refers to a copy of this handle (the
        # same actor and token), not to this one, which it would keep alive
        # in a cycle (and the actor with it) until a garbage collection.
        method = self.__dict__[name] = ActorMethod(
            ActorHandle(self._actor_id, self._class_name, methods, self._token), name,
            entry["num_returns"], {"_generator_backpressure_num_objects": backpressure}
            if backpressure != -1 else None)
        return method

    def _argspec(self, name: str) -> "ArgSpec | None":
        """The ArgSpec of method `name` (None: unchecked), made once per handle."""
        specs = self.__dict__.get("_argspecs")
        if specs is None:
            specs = self._argspecs = {}
        spec = specs.get(name, specs)
        if spec is specs:
            entry = self._methods.get(name)
            params = entry.get("params") if entry is not None else None
            spec = specs[name] = None if params is None else ArgSpec(params)
        return spec

    def __reduce__(self):
        return (ActorHandle, (self._actor_id, self._class_name, self._methods, self._token))

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __repr__(self) -> str:
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    @property
    def actor_id(self) -> str:
        return self._actor_id.hex()


class ActorMethod:
    """``handle.method``: call ``.remote(...)`` or ``.options(num_returns=k).remote(...)``."""

    def __init__(self, handle: ActorHandle, name: str, num_returns: int, options: dict | None = None):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns
        self._options = options or {}

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'{self._name}()', try '{self._name}.remote()'.")

    def options(self, **options) -> "ActorMethod":
        opts = dict(self._options)
        opts.update(validate(options, METHOD_OPTIONS, f"{self._name}.options()"))
        return ActorMethod(self._handle, self._name, opts.get("num_returns", self._num_returns),
                           opts)

    def remote(self, *args, **kwargs):
        handle = self._handle
        rt = _runtime._current
        if rt is not None and not self._options:
            fast = rt.plain_calls.get((handle._actor_id, self._name))
            if fast is not None:
                # A plain call (see below, where `fast` is made): the spec in one step,
                # or none where the scheduler takes the call without (`direct`).
                argspec, what, submit, owns, actor_options, env_vars, direct = fast
                if args or kwargs:
                    if argspec is not None:
                        argspec.check(args, kwargs, what)
                    packed, packed_kw, _keep = rt.pack_args(args, kwargs, handle._class_name)
                    if owns:
                        submit = rt.accept
                else:
                    if argspec is not None and not argspec.takes_nothing:
                        argspec.check(args, kwargs, what)  # (raises)
                    packed, packed_kw = [], {}
                return_id = ids.new_id()
                if direct is not None and not packed_kw and not observed(_SUBMITTED):
                    ref = ObjectRef(return_id)
                    if direct(handle._actor_id, self._name, packed, return_id):
                        return ref
                spec = TaskSpec(ids.new_id(), ACTOR_METHOD, b"", handle._class_name, packed,
                                packed_kw, (return_id,), {}, 0, False, handle._actor_id,
                                self._name, actor_options, rt.caller_id, 0, env_vars, None,
                                None)
                ref = ObjectRef(return_id)
                submit(spec)
                return ref
        argspec = handle._argspec(self._name)
        if argspec is not None:
            argspec.check(args, kwargs, f"{handle._class_name}.{self._name}.remote()")
        rt = _runtime.current()
        n = self._num_returns
        group = self._options.get("concurrency_group")
        if group is None:
            group = (handle._methods.get(self._name) or {}).get("concurrency_group")
        generator = None
        if n in (STREAMING, DYNAMIC):
            generator = (n, self._options.get("_generator_backpressure_num_objects", -1))
            n = 1
        spec, _keep = rt.make_spec(
            ACTOR_METHOD, b"", handle._class_name, args, kwargs, n, {},
            max_retries=self._options.get("max_task_retries", 0),
            actor_id=handle._actor_id, method_name=self._name,
            # (a method call's actor_options carry only its concurrency group)
            actor_options=None if group is None else {"concurrency_group": group},
            generator=generator)
        refs = rt.submit(spec)
        if not self._options and n == 1 and generator is None:
            # What every later plain call of this method of this actor in this
            # runtime puts in its spec (the Runtime's `plain_calls`).
            scheduler = rt.backend.scheduler
            rt.remember_plain_call((handle._actor_id, self._name), (
                argspec, f"{handle._class_name}.{self._name}.remote()",
                scheduler.submit, rt.pins_arguments, spec.actor_options, spec.env_vars,
                None if rt.pins_arguments or spec.actor_options is not None or spec.env_vars
                else getattr(scheduler, "submit_plain_call", None)))
        if generator is not None and generator[0] == STREAMING:
            from .generators import ObjectRefGenerator
            return ObjectRefGenerator(refs[0], generator[1])
        if n == 0:
            return None  # (as in Ray: it runs for its effects)
        return refs[0] if n == 1 else refs


def concurrency_group_of(spec, actor_options: dict) -> str | None:
    """The concurrency group a method call runs in: the one it was called with
    (``.options(concurrency_group=)``) or its method's (``@method``); None for
    the default group. ValueError if the actor (created with `actor_options`)
    has no such group."""
    group = (spec.actor_options or {}).get("concurrency_group")
    if group is not None and group not in (actor_options.get("concurrency_groups") or {}):
        raise ValueError(f"{spec.display_name} was called in concurrency group {group!r}, "
                         f"which the actor does not define; its concurrency_groups are: "
                         f"{sorted(actor_options.get('concurrency_groups') or {}) or 'none'}")
    return group


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor called `name`; ValueError if there is none."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_actor needs a non-empty actor name, got {name!r}")
    rt = _runtime.current()
    namespace = rt.namespace if namespace is None else namespace
    info = rt.tables.named_actor(name, namespace)
    if info is None:
        raise ValueError(f"Failed to look up actor with name {name!r} in namespace "
                         f"{namespace!r}: no live actor has that name")
    return ActorHandle(info.actor_id, info.class_name, info.methods, ObjectRef(info.ready_id))


def exit_actor() -> None:
    """End the actor this is called in, gracefully (Ray's ``ray.actor.exit_actor()``).

    Only valid inside an actor method (or constructor): elsewhere it raises
    TypeError, as in Ray. It raises (``ActorExit``, a SystemExit, or in an async
    actor ``AsyncioActorExit``) to unwind the method; the call then fails with
    ActorDiedError saying the actor called exit_actor(), as do the calls queued
    behind it, and the actor is not restarted. Before its process ends the
    actor's ``__ray_shutdown__`` runs, then (on backends that give actors a
    process of their own) the ``atexit`` handlers.
    """
    ctx = _runtime.task_context.get()
    if ctx is None or ctx.actor_id is None:
        raise TypeError("exit_actor() can only be called inside an actor; use "
                        "kill(handle) to end an actor from outside")
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise exc.ActorExit(0) from None
    raise exc.AsyncioActorExit("exit_actor() is called")


EXIT_REASON = "it called exit_actor()"


def current_actor_handle() -> ActorHandle:
    """A handle to the actor this runs in (``get_runtime_context().current_actor``);
    RuntimeError outside an actor."""
    ctx = _runtime.task_context.get()
    if ctx is None or ctx.actor_id is None:
        raise RuntimeError("current_actor is only available inside an actor")
    info = _runtime.current().tables.actor(ctx.actor_id)
    if info is None:
        raise RuntimeError("this actor is not known to the control store")
    return ActorHandle(ctx.actor_id, info.class_name, info.methods, ObjectRef(info.ready_id))


def is_actor_class(obj: Any) -> bool:
    return isinstance(obj, (ActorClass, _ActorClassWithOptions))

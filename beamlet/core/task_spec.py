"""TaskSpec: everything a scheduler needs to run one task, actor creation or
actor method call, as plain data that pickles fast and means the same in every
process and on every node."""
from __future__ import annotations

import operator
from typing import Any

# What a spec asks for.
TASK = 0
ACTOR_CREATION = 1
ACTOR_METHOD = 2

# How an argument travels: its serialized value inline, or an ObjectRef's id
# that the executor resolves to the value (only for top-level arguments).
ARG_VALUE = 0
ARG_REF = 1


class TaskSpec:
    """One unit of work.

    ``args`` is a list of ``(ARG_VALUE, SerializedObject)`` or
    ``(ARG_REF, object_id)`` pairs, ``kwargs`` maps names to the same pairs.
    ``return_ids`` are the ids of the objects the task will produce (one per
    return value). ``resources`` is the request, e.g. ``{"CPU": 1.0}``; a
    scheduler holds it while the task runs. For an actor creation,
    ``actor_options`` carries name, namespace, restarts and concurrency; for a
    method call ``actor_id`` and ``method_name`` say where it runs. ``caller_id``
    identifies the submitting process: calls from one caller to one actor run
    in the order they were submitted. ``env_vars`` (from the ``runtime_env``
    option) are set in the environment while the task runs, or for the
    actor's life. ``placement_group`` is ``(PlacementGroup, bundle index,
    capture child tasks)`` for a call scheduled in a placement group (its
    ``resources`` are then the group's own, see core/placement.py), else None.
    ``generator`` is None, or for a generator call
    ``(num_returns, backpressure)``: ``"streaming"`` or ``"dynamic"``, and the
    most items the producer may be ahead of its consumer (-1: no limit); its
    one return id is then the stream's (see ``core/generators.py``). A retried
    streaming call has a third element: how many items (counting an error or
    the end marker) its earlier attempts delivered; the retry makes them again
    without storing them, as Ray ignores items already reported, since the
    consumer may have taken and freed them.
    """

    __slots__ = ("task_id", "kind", "function_id", "function_name", "args", "kwargs",
                 "return_ids", "resources", "max_retries", "retry_exceptions",
                 "actor_id", "method_name", "actor_options", "caller_id", "attempt", "env_vars",
                 "placement_group", "generator")

    def __init__(self, task_id: bytes, kind: int, function_id: bytes, function_name: str,
                 args: list, kwargs: dict, return_ids: tuple, resources: dict,
                 max_retries: int = 0, retry_exceptions: Any = False,
                 actor_id: bytes | None = None, method_name: str | None = None,
                 actor_options: dict | None = None, caller_id: bytes = b"",
                 attempt: int = 0, env_vars: dict | None = None,
                 placement_group: tuple | None = None, generator: tuple | None = None):
        self.task_id = task_id
        self.kind = kind
        self.function_id = function_id
        self.function_name = function_name
        self.args = args
        self.kwargs = kwargs
        self.return_ids = return_ids
        self.resources = resources
        self.max_retries = max_retries
        self.retry_exceptions = retry_exceptions
        self.actor_id = actor_id
        self.method_name = method_name
        self.actor_options = actor_options
        self.caller_id = caller_id
        self.attempt = attempt
        self.env_vars = env_vars
        self.placement_group = placement_group
        self.generator = generator

    def __reduce__(self):
        return (TaskSpec, self.fields())

    def fields(self) -> tuple:
        """The arguments that make this spec again (``TaskSpec(*fields)``):
        `generator` only when set, so every other spec keeps its shape."""
        fields = _FIELDS(self)  # (one C-level step)
        if self.generator is not None:
            fields += (self.generator,)
        return fields

    def dependencies(self) -> list[bytes]:
        """Ids of the objects that must exist before the task can run (a new list)."""
        if not self.args and not self.kwargs:
            return []  # (the common no-argument call, without a comprehension)
        deps = [value for kind, value in self.args if kind == ARG_REF]
        if self.kwargs:
            deps.extend(value for kind, value in self.kwargs.values() if kind == ARG_REF)
        return deps

    def has_ref_args(self) -> bool:
        """Whether any top-level argument is a ref (cheaper than dependencies())."""
        for kind, _ in self.args:
            if kind == ARG_REF:
                return True
        return any(kind == ARG_REF for kind, _ in self.kwargs.values()) if self.kwargs else False

    def contained_refs(self) -> list[bytes]:
        """Ids of refs nested inside inline argument values (kept alive, not resolved)."""
        out = []
        if not self.args and not self.kwargs:
            return out
        for kind, value in self.args:
            if kind == ARG_VALUE and value.refs:
                out.extend(value.refs)
        if self.kwargs:
            for kind, value in self.kwargs.values():
                if kind == ARG_VALUE and value.refs:
                    out.extend(value.refs)
        return out

    @property
    def is_actor_task(self) -> bool:
        return self.kind == ACTOR_METHOD

    @property
    def display_name(self) -> str:
        """The name used in errors and log prefixes."""
        if self.kind == ACTOR_METHOD:
            return f"{self.function_name}.{self.method_name}"
        if self.kind == ACTOR_CREATION:
            return f"{self.function_name}.__init__"
        return self.function_name

    def __repr__(self) -> str:
        return f"TaskSpec({self.display_name}, id={self.task_id.hex()[-12:]})"


#: A spec's fields but `generator`, in TaskSpec's order (see TaskSpec.fields).
_FIELDS = operator.attrgetter(*TaskSpec.__slots__[:-1])

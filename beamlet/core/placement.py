"""Placement groups and scheduling strategies (Ray's ``ray.util.placement_group``
and ``ray.util.scheduling_strategies``), as the caller sees them.

A placement group reserves bundles of resources atomically; a task or actor
scheduled in it (``scheduling_strategy=PlacementGroupSchedulingStrategy(pg)``)
takes its resources from a bundle rather than from the node's free pool. As in
Ray this is done with resource names: a reserved group adds
``CPU_group_<i>_<id>`` (bundle `i`), ``CPU_group_<id>`` (any bundle) and
``bundle_group_...`` to the node's resources (`ResourcePool.reserve_group`),
and `placement_request` renames a task's request to them, so a scheduler needs
nothing else to run it in the group. The spec also carries
``(group id, bundle index, capture child tasks)`` for the task's own use
(`get_current_placement_group`, capturing the tasks it submits).
"""
from __future__ import annotations

from typing import Any

from . import runtime as _runtime
from .object_ref import ObjectRef
from .resources import BUNDLE_SHARE, group_resource

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementGroup:
    """A handle to a placement group: its id and bundles. Pickles by value, so
    it can be passed to tasks and actors."""

    def __init__(self, pg_id: bytes, bundles: list[dict], ready_id: bytes):
        self.id = pg_id
        self.bundle_specs = [dict(b) for b in bundles]
        self._ready_id = ready_id

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> ObjectRef:
        """A ref whose value is this placement group once its bundles are
        reserved; ``get`` of it waits until then (it raises if the group is
        removed first). As in Ray, a backend that places bundles lost with a
        node again (its scheduler's ``placement_group_ready``) gives a fresh
        ref per call: one asked for meanwhile resolves once they are placed
        again, and an earlier one keeps its value."""
        rt = _runtime.current_or_none()
        fresh = getattr(getattr(rt.backend, "scheduler", None), "placement_group_ready",
                        None) if rt is not None else None
        if fresh is not None:
            return fresh(self._ready_id)
        return ObjectRef(self._ready_id)

    def wait(self, timeout_seconds: float = 30) -> bool:
        """Wait up to `timeout_seconds` for the bundles to be reserved; whether they are."""
        from .api import wait
        ready, _ = wait([self.ready()], num_returns=1, timeout=timeout_seconds)
        return bool(ready)

    @property
    def key(self) -> str:
        return self.id.hex()

    def __reduce__(self):
        return (PlacementGroup, (self.id, self.bundle_specs, self._ready_id))

    def __eq__(self, other) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.key}, bundles={self.bundle_specs})"


class PlacementGroupSchedulingStrategy:
    """Run a task or actor in `placement_group`: in bundle
    `placement_group_bundle_index` (-1: any bundle). With
    `placement_group_capture_child_tasks`, the tasks and actors it submits
    without a strategy of their own go into the same group."""

    def __init__(self, placement_group: PlacementGroup, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks: bool | None = None):
        if placement_group is None:  # (outside any group, even a capturing one)
            self.placement_group = None
            self.placement_group_bundle_index = -1
            self.placement_group_capture_child_tasks = False
            return
        if not isinstance(placement_group, PlacementGroup):
            raise TypeError(f"placement_group must be a PlacementGroup (from "
                            f"placement_group()), got {placement_group!r}")
        index = placement_group_bundle_index
        if isinstance(index, bool) or not isinstance(index, int) \
                or not -1 <= index < placement_group.bundle_count:
            raise ValueError(f"placement_group_bundle_index must be -1 or an index below the "
                             f"group's {placement_group.bundle_count} bundles, got {index!r}")
        self.placement_group = placement_group
        self.placement_group_bundle_index = index
        self.placement_group_capture_child_tasks = bool(placement_group_capture_child_tasks)

    def __repr__(self) -> str:
        return (f"PlacementGroupSchedulingStrategy({self.placement_group!r}, "
                f"bundle_index={self.placement_group_bundle_index}, "
                f"capture_child_tasks={self.placement_group_capture_child_tasks})")


class NodeAffinitySchedulingStrategy:
    """Run a task or actor on node `node_id` (a hex id from ``nodes()`` or
    ``get_runtime_context().get_node_id()``). With `soft`, another node will
    do if that one is gone; without, the call fails if it is."""

    def __init__(self, node_id: str, soft: bool, _spill_on_unavailable: bool = False,
                 _fail_on_unavailable: bool = False):
        if not isinstance(node_id, str) or not node_id:
            raise TypeError(f"node_id must be a node's id (a str), got {node_id!r}")
        self.node_id = node_id
        self.soft = bool(soft)

    def __repr__(self) -> str:
        return f"NodeAffinitySchedulingStrategy({self.node_id!r}, soft={self.soft})"


def check_strategy(strategy: Any) -> Any:
    """A valid ``scheduling_strategy`` option (None, "DEFAULT", "SPREAD" or a
    strategy object); TypeError/ValueError naming the problem."""
    if strategy is None or isinstance(strategy, (PlacementGroupSchedulingStrategy,
                                                 NodeAffinitySchedulingStrategy)):
        return strategy
    if isinstance(strategy, str):
        if strategy not in ("DEFAULT", "SPREAD"):
            raise ValueError(f"scheduling_strategy must be 'DEFAULT', 'SPREAD' or a strategy "
                             f"object, got {strategy!r}")
        return strategy
    raise TypeError(f"scheduling_strategy must be 'DEFAULT', 'SPREAD', a "
                    f"PlacementGroupSchedulingStrategy or a NodeAffinitySchedulingStrategy, "
                    f"got {strategy!r}")


def placement_request(resources: dict, strategy: Any) -> tuple[dict, tuple | None]:
    """The resource request and the spec's placement of a call with
    `resources` and ``scheduling_strategy=strategy``: unchanged outside a
    group; renamed to the group's resources inside one. A call without a
    strategy (or "DEFAULT"), made inside a task whose group captures child
    tasks, goes into that group (``PlacementGroupSchedulingStrategy(None)``
    keeps it out). Raises where the backend cannot honour the strategy."""
    if strategy is None or strategy == "DEFAULT":
        ctx = _runtime.task_context.get()
        placed = getattr(ctx, "placement_group", None) if ctx is not None else None
        if placed is None or not placed[2]:
            return resources, None
        pg, index, capture = placed[0], -1, True
    elif isinstance(strategy, PlacementGroupSchedulingStrategy):
        if strategy.placement_group is None:  # (Ray's way out of a capturing group)
            return resources, None
        pg = strategy.placement_group
        index = strategy.placement_group_bundle_index
        capture = strategy.placement_group_capture_child_tasks
    elif isinstance(strategy, NodeAffinitySchedulingStrategy):
        pins = bool(getattr(_runtime.current().backend, "node_affinity", False))
        _check_node(strategy, pins)
        if pins:
            return {**resources, node_affinity_key(strategy.node_id, strategy.soft): 1.0}, None
        return resources, None
    else:  # "SPREAD": a hint; every place is as good on the nodes beamlet sees
        return resources, None
    backend = _runtime.current().backend
    if not getattr(backend, "placement_groups", False):
        raise ValueError(f"the {backend.name!r} backend does not support placement groups")
    key = pg.key
    # A call in bundle i takes from the group's total too, so that calls in
    # any bundle (index -1) and in particular ones never share more than it has.
    request = {group_resource(name, key): amount for name, amount in resources.items()}
    request[group_resource("bundle", key)] = BUNDLE_SHARE
    if index != -1:
        request.update({group_resource(name, key, index): amount
                        for name, amount in resources.items()})
        request[group_resource("bundle", key, index)] = BUNDLE_SHARE
    return request, (pg, index, capture)


#: How a request names the node a call must (``!``) or should (``?``) run on,
#: for a backend with the ``node_affinity`` flag.
NODE_AFFINITY_PREFIX = "node_affinity"


def node_affinity_key(node_id: str, soft: bool) -> str:
    """The resource key that pins a call to `node_id` (`soft`: if it is alive)."""
    return f"{NODE_AFFINITY_PREFIX}{'?' if soft else '!'}{node_id}"


def split_node_affinity(resources: dict) -> tuple[dict, str | None, bool]:
    """(`resources` without a node-affinity key, the node it names or None,
    soft?): for a scheduler with the ``node_affinity`` flag."""
    for key in resources:
        if key.startswith(NODE_AFFINITY_PREFIX):
            rest = {k: v for k, v in resources.items() if k != key}
            marker = key[len(NODE_AFFINITY_PREFIX)]
            return rest, key[len(NODE_AFFINITY_PREFIX) + 1:], marker == "?"
    return resources, None, False


def _check_node(strategy: NodeAffinitySchedulingStrategy, pins: bool) -> None:
    from .api import nodes
    if strategy.soft:
        return
    alive = {n["NodeID"] for n in nodes() if n.get("Alive")}
    if strategy.node_id not in alive:
        raise ValueError(f"NodeAffinitySchedulingStrategy(soft=False): node "
                         f"{strategy.node_id!r} is not an alive node; alive nodes: "
                         f"{', '.join(sorted(alive))}")
    if len(alive) > 1 and not pins:
        raise ValueError(f"the {_runtime.current().backend.name!r} backend cannot pin tasks "
                         f"to a node (NodeAffinitySchedulingStrategy with soft=False)")


def current_placement_group() -> PlacementGroup | None:
    """The placement group the running task or actor is in (None: none, or
    not in a task)."""
    ctx = _runtime.task_context.get()
    placed = getattr(ctx, "placement_group", None) if ctx is not None else None
    return placed[0] if placed is not None else None


def ready_value(info):
    """What a scheduler stores under ``info.ready_id`` (`info`: a
    ``tables.PlacementGroupInfo``) once the group is reserved: the group."""
    from .serialization import serialize
    return serialize(PlacementGroup(info.pg_id, list(info.bundles), info.ready_id))


def removed_value(info):
    """What ``info.ready_id`` holds if the group is removed before it was reserved."""
    from .. import exceptions as exc
    from .serialization import serialize
    return serialize(exc.TaskPlacementGroupRemoved(
        f"placement group {info.pg_id.hex()} was removed before it was ready"), is_error=True)


def may_be_captured(strategy: Any) -> bool:
    """Whether a call with this strategy goes into its caller's group when
    that group captures child tasks (decided per call: see `placement_request`)."""
    return strategy is None or strategy == "DEFAULT"


def in_group(resources: dict, key: str) -> bool:
    """Whether a request (as `placement_request` renamed it) is in group `key`."""
    suffix = "_" + key
    return any(name.endswith(suffix) and "_group_" in name for name in resources)

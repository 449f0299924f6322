"""Placement groups (Ray's ``ray.util.placement_group``): reserve bundles of
resources atomically, then schedule tasks and actors into them with
``scheduling_strategy=PlacementGroupSchedulingStrategy(pg)``.

On one machine every bundle lands on that machine: a group is reserved once
the sum of its bundles is free, and waits (PENDING, ``ready()`` unresolved)
until then; one that could never fit (or ``STRICT_SPREAD`` over more bundles
than there are nodes) raises ValueError at once. Groups are created and
removed by the driver. Only on backends whose ``placement_groups`` flag is set
(``inprocess`` and ``local``).
"""
from __future__ import annotations

import numbers

from ..core import ids
from ..core import runtime as _runtime
from ..core.placement import STRATEGIES, PlacementGroup, current_placement_group
from ..core.tables import PlacementGroupInfo

__all__ = ["PlacementGroup", "placement_group", "remove_placement_group",
           "get_placement_group", "placement_group_table", "get_current_placement_group"]


def _check_bundles(bundles) -> list[dict]:
    if not isinstance(bundles, (list, tuple)) or not bundles:
        raise ValueError(f"bundles must be a non-empty list of resource dicts, got {bundles!r}")
    out = []
    for i, bundle in enumerate(bundles):
        if not isinstance(bundle, dict) or not bundle:
            raise ValueError(f"bundle {i} must be a non-empty dict of resource -> amount, "
                             f"got {bundle!r}")
        for name, amount in bundle.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"bundle {i}: resource names must be non-empty strings, "
                                 f"got {name!r}")
            if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or amount < 0:
                raise ValueError(f"bundle {i}: {name} must be a number >= 0, got {amount!r}")
        if not any(bundle.values()):
            raise ValueError(f"bundle {i} ({bundle}) asks for no resources at all")
        out.append({name: float(amount) for name, amount in bundle.items() if amount})
    return out


def placement_group(bundles: list[dict], strategy: str = "PACK", name: str = "",
                    lifetime: str | None = None, **_ray_only) -> PlacementGroup:
    """Ask for `bundles` (e.g. ``[{"CPU": 1}, {"CPU": 1, "GPU": 1}]``) to be
    reserved atomically with `strategy` (PACK, SPREAD, STRICT_PACK,
    STRICT_SPREAD); returns at once. ``pg.ready()`` is a ref that resolves
    once the reservation holds; ``pg.wait(timeout)`` waits for it. `name`
    makes it findable with `get_placement_group`. The group lasts until
    `remove_placement_group` or the end of the session (`lifetime` is
    accepted: every group here ends with its driver's session)."""
    bundles = _check_bundles(bundles)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    rt = _runtime.current()
    backend = rt.backend
    if not backend.placement_groups:
        raise ValueError(f"the {backend.name!r} backend does not support placement groups")
    if strategy == "STRICT_SPREAD" and len(bundles) > 1:
        nodes = [n for n in backend.nodes() if n.get("Alive")]
        if len(bundles) > len(nodes):
            raise ValueError(f"placement group strategy STRICT_SPREAD needs a node per "
                             f"bundle: {len(bundles)} bundles, but there are only "
                             f"{len(nodes)} nodes; it could never be placed")
    info = PlacementGroupInfo(ids.new_id(), name or None, tuple(bundles), strategy,
                              "PENDING", ids.new_id())
    rt.tables.create_placement_group(info)
    try:
        backend.scheduler.create_placement_group(info)
    except BaseException:
        rt.tables.set_placement_group_state(info.pg_id, "REMOVED")
        raise
    rt.refs.incr(info.ready_id)  # the ready value lives as long as the group
    return PlacementGroup(info.pg_id, bundles, info.ready_id)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Free the group's reservation: the actors in it are killed, its queued
    tasks fail, and tasks running in it finish. Removing it again does nothing."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"remove_placement_group needs a PlacementGroup, got "
                        f"{placement_group!r}")
    rt = _runtime.current()
    info = rt.tables.placement_group(placement_group.id)
    if info is None or info.state == "REMOVED":
        return
    rt.backend.scheduler.remove_placement_group(placement_group.id)
    rt.tables.set_placement_group_state(placement_group.id, "REMOVED")
    rt.refs.decr(info.ready_id)


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live group called `placement_group_name`; ValueError if there is none."""
    if not isinstance(placement_group_name, str) or not placement_group_name:
        raise ValueError(f"get_placement_group needs a non-empty name, got "
                         f"{placement_group_name!r}")
    info = _runtime.current().tables.named_placement_group(placement_group_name)
    if info is None:
        raise ValueError(f"Failed to look up placement group with name "
                         f"{placement_group_name!r}: no live placement group has that name")
    return PlacementGroup(info.pg_id, list(info.bundles), info.ready_id)


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict:
    """What the control store knows of a group (or of every group, by id):
    ``placement_group_id``, ``name``, ``bundles`` (index -> dict),
    ``strategy``, ``state`` (PENDING, CREATED, REMOVED, or, on a cluster,
    RESCHEDULING: bundles lost with a dead node wait to be placed again)."""
    tables = _runtime.current().tables
    if placement_group is not None:
        info = tables.placement_group(placement_group.id)
        return _row(info) if info is not None else {}
    return {info.pg_id.hex(): _row(info) for info in tables.placement_groups()}


def _row(info: PlacementGroupInfo) -> dict:
    return {"placement_group_id": info.pg_id.hex(), "name": info.name or "",
            "bundles": dict(enumerate(dict(b) for b in info.bundles)),
            "strategy": info.strategy, "state": info.state}


def get_current_placement_group() -> PlacementGroup | None:
    """The placement group the calling task or actor runs in; None outside one."""
    return current_placement_group()


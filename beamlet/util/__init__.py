"""Utilities on top of the public API (Ray's ``ray.util``)."""
from __future__ import annotations

from .actor_pool import ActorPool
from . import scheduling_strategies
from .helpers import as_completed, map_unordered
from .placement_group import (get_current_placement_group, get_placement_group, placement_group,
                              placement_group_table, remove_placement_group)

__all__ = ["ActorPool", "as_completed", "map_unordered", "list_named_actors",
           "get_node_ip_address", "placement_group", "remove_placement_group",
           "get_placement_group", "placement_group_table", "get_current_placement_group",
           "scheduling_strategies"]


def list_named_actors(all_namespaces: bool = False) -> list:
    """Names of the live named actors in the current namespace, or with
    ``all_namespaces=True`` a ``{"namespace": ..., "name": ...}`` dict for each
    live named actor anywhere (Ray's ``ray.util.list_named_actors``)."""
    from ..core import runtime as _runtime
    rt = _runtime.current()
    out = []
    for info in rt.tables.named_actors():
        if all_namespaces:
            out.append({"namespace": info.namespace, "name": info.name})
        elif info.namespace == rt.namespace:
            out.append(info.name)
    return out


def get_node_ip_address() -> str:
    """The address of the node this process runs on (Ray's
    ``ray.util.get_node_ip_address``): the ``NodeManagerAddress`` that
    ``nodes()`` reports for it, "127.0.0.1" on single-machine backends."""
    from ..core import api, runtime as _runtime
    node_id = _runtime.current().backend.node_id
    for node in api.nodes():
        if node.get("NodeID") == node_id and node.get("NodeManagerAddress"):
            return node["NodeManagerAddress"]
    return "127.0.0.1"


def __getattr__(name: str):
    # ray.util.queue / ray.util.multiprocessing / ray.util.joblib, loaded on first use.
    if name in ("queue", "multiprocessing", "joblib"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

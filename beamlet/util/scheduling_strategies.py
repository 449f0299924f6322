"""Scheduling strategies (Ray's ``ray.util.scheduling_strategies``), passed
as ``scheduling_strategy=`` to tasks and actors; see core/placement.py."""
from ..core.placement import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

__all__ = ["PlacementGroupSchedulingStrategy", "NodeAffinitySchedulingStrategy"]

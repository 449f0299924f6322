"""Placement groups on Ray: each beamlet placement group is a Ray placement group.

A beamlet group ``pg`` is the Ray group named ``beamlet-pg-<pg id hex>`` in the
job's Ray namespace (so every process of the job finds it by id), with the
same bundles and strategy: Ray reserves the bundles atomically (its two-phase
commit), and a task or actor scheduled in the group runs with Ray's
``PlacementGroupSchedulingStrategy`` and its own resource request (beamlet's
request renamed to the group's resources, `core/placement.py`, is renamed
back: Ray renames it again, the same way).

What beamlet promises beyond what Ray does, done here:

- ``pg.ready()`` is a zero-CPU Ray task in the group (as Ray's own
  ``PlacementGroup.ready()`` is) that records the group CREATED in the
  control store before it returns the beamlet ``PlacementGroup``: whoever
  ``get``\\s the ready ref then reads CREATED in ``placement_group_table``.
- Removal: Ray leaves the tasks queued in a removed group pending for ever
  and retries the ones it killed; beamlet fails them with
  ``TaskPlacementGroupRemoved``. So the process that submits into a group
  remembers those tasks and actors (`_Group`), and `remove` cancels the
  unfinished tasks (``force``) and stores that error as their results, kills
  the actors (recorded dead "because its placement group was removed"), fails
  a ready ref still pending, then waits until Ray's view of the cluster's
  resources no longer holds the group (Ray gives them back asynchronously).
  Tasks submitted into the group by other processes are cancelled by Ray's
  own removal only as Ray does it.
- The driver removes the groups its session made when it shuts down: on a
  Ray that outlives the session they would otherwise hold their resources
  until the Ray job ends.
"""
from __future__ import annotations

import threading
import time

import ray as _ray
from ray.util.placement_group import (get_placement_group as _get_ray_pg,
                                      placement_group as _ray_placement_group,
                                      remove_placement_group as _remove_ray_pg)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ... import exceptions as exc
from ...core.placement import ready_value, removed_value
from ...core.task_spec import TaskSpec

#: How long `remove` waits for Ray to give the group's resources back.
_RELEASE_TIMEOUT = 10.0
_PRUNE_EVERY = 1024


def ray_name(pg_id: bytes) -> str:
    return f"beamlet-pg-{pg_id.hex()}"


class _Group:
    """What this process knows of one placement group."""

    __slots__ = ("ray_pg", "bundles", "removed", "tasks", "actors", "info", "ready")

    def __init__(self, ray_pg, bundles: list[dict]):
        self.ray_pg = ray_pg
        self.bundles = bundles
        self.removed = False
        self.tasks: list[tuple] = []    # (return ids, Ray refs) of tasks submitted here
        self.actors: list = []          # (actor id, Ray handle) of actors created here
        self.info = None                # (the creator's) its PlacementGroupInfo
        self.ready = None               # (the creator's) the ready task's Ray ref


def original_request(resources: dict, key: str) -> dict:
    """A request renamed into group `key` (`core.placement.placement_request`),
    named as it was asked."""
    suffix = "_group_" + key
    return {name[:-len(suffix)]: amount for name, amount in resources.items()
            if name.endswith(suffix) and not name.startswith("bundle_group_")}


class RayPlacementGroups:
    """The placement groups one process (driver or Ray worker) creates, removes
    and schedules into."""

    def __init__(self, backend, node_resources):
        self._backend = backend
        self._node_resources = node_resources
        self._lock = threading.Lock()
        self._groups: dict[bytes, _Group] = {}
        self._made: list[bytes] = []  # groups made by this process, in order
        self._added = 0

    # -- creation and removal ------------------------------------------------------------
    def create(self, info) -> None:
        bundles = [dict(b) for b in info.bundles]
        self._check_fits(bundles, info.strategy)
        ray_pg = _ray_placement_group(bundles, strategy=info.strategy,
                                         name=ray_name(info.pg_id))
        group = _Group(ray_pg, bundles)
        group.info = info
        from .worker import ray_placement_group_ready
        store = self._backend.object_store
        group.ready = ray_placement_group_ready.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(ray_pg, 0),
            name=f"placement group {info.pg_id.hex()[:12]} ready").remote(
            self._backend.job, info.pg_id, store.pack(ready_value(info)))
        store.adopt([info.ready_id], [group.ready])
        with self._lock:
            self._groups[info.pg_id] = group
            self._made.append(info.pg_id)

    def _check_fits(self, bundles: list[dict], strategy: str) -> None:
        """ValueError, naming the resource, if no placement of the bundles on
        Ray's nodes could ever hold them."""
        nodes = self._node_resources(True)
        for i, bundle in enumerate(bundles):
            if not any(all(have.get(k, 0.0) >= v for k, v in bundle.items()) for have in nodes):
                name = next((k for k in bundle if not any(k in have for have in nodes)), None)
                if name is not None:
                    raise ValueError(f"placement group bundle {i} ({bundle}) asks for resource "
                                     f"{name!r}, which no Ray node has")
                raise ValueError(f"placement group bundle {i} ({bundle}) fits on no Ray node "
                                 f"(each node's resources: {nodes[:4]}): it could never be "
                                 f"placed")
        total: dict[str, float] = {}
        for bundle in bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        if strategy == "STRICT_PACK":
            if not any(all(have.get(k, 0.0) >= v for k, v in total.items()) for have in nodes):
                raise ValueError(f"placement group bundles {bundles} (STRICT_PACK) need "
                                 f"{total} on one node, which no Ray node has: it could "
                                 f"never be placed")
            return
        for k, v in total.items():
            have = sum(node.get(k, 0.0) for node in nodes)
            if v > have:
                raise ValueError(f"placement group bundles {bundles} need {v:g} {k} "
                                 f"together, but the Ray cluster has {have:g} {k}: it could "
                                 f"never be placed")

    def remove(self, pg_id: bytes) -> None:
        group = self._known(pg_id)
        if group is None or group.removed:
            return
        group.removed = True
        before = _ray.available_resources()
        # (Whether Ray had reserved it: its ready task ran. Ray's view of the
        # cluster's resources, `before`, may not show that yet.)
        reserved = any(group.ray_pg.id.hex() in name for name in before) or (
            group.ready is not None and
            bool(_ray.wait([group.ready], timeout=0, fetch_local=False)[0]))
        _remove_ray_pg(group.ray_pg)
        store = self._backend.object_store
        # Tasks: cancelled where they still run or wait, their results the error.
        with self._lock:
            tasks, group.tasks = group.tasks, []
            actors, group.actors = group.actors, []
        refs = [ref for _, ray_refs in tasks for ref in ray_refs]
        done = set(_ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) \
            if refs else set()
        error = exc.TaskPlacementGroupRemoved(
            f"placement group {pg_id.hex()} was removed before the task finished")
        for return_ids, ray_refs in tasks:
            if all(ref in done for ref in ray_refs):
                continue
            for ref in ray_refs[:1]:
                try:
                    _ray.cancel(ref, force=True, recursive=True)
                except Exception:  # noqa: BLE001 - it ended meanwhile
                    pass
            store.fail(return_ids, error)
        from ...core.scheduling import ActorLifecycle
        tables = self._backend.runtime.tables
        for actor_id, handle in actors:
            tables.set_actor_state(actor_id, ActorLifecycle.DEAD.recorded,
                                   "its placement group was removed")
            _ray.kill(handle, no_restart=True)
        if group.ready is not None and group.info is not None and \
                not _ray.wait([group.ready], timeout=0, fetch_local=False)[0]:
            _ray.cancel(group.ready, force=True)
            store.adopt([group.info.ready_id], [_ray.put(removed_value(group.info))])
        self._await_release(group, before, reserved)

    @staticmethod
    def _await_release(group: _Group, before: dict, reserved: bool) -> None:
        """Until Ray's view of the available resources shows the group's given
        back: its own resources gone and, if it was `reserved`, the free pool
        grown by its bundles from `before` (at most to the cluster's total).
        Ray gives them back after `remove_placement_group` returns, and
        reports them later still. At most `_RELEASE_TIMEOUT` s (what others
        take meanwhile can keep the second condition from ever holding: then
        the wait ends there)."""
        key = group.ray_pg.id.hex()
        target: dict[str, float] = {}
        if reserved:
            total = _ray.cluster_resources()
            for bundle in group.bundles:
                for name, amount in bundle.items():
                    target[name] = target.get(name, before.get(name, 0.0)) + amount
            target = {name: min(amount, total.get(name, 0.0)) for name, amount in target.items()}
        deadline = time.monotonic() + _RELEASE_TIMEOUT
        pause = 0.005
        while time.monotonic() < deadline:
            now = _ray.available_resources()
            if not any(key in name for name in now) and all(
                    now.get(name, 0.0) >= amount - 1e-6 for name, amount in target.items()):
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def remove_made(self) -> None:
        """(The driver, at shutdown.) Remove the groups this session made, and
        record them removed."""
        with self._lock:
            made, self._made = self._made, []
        tables = self._backend.runtime.tables
        for pg_id in made:
            group = self._groups.get(pg_id)
            if group is None or group.removed:
                continue
            try:
                self.remove(pg_id)
                tables.set_placement_group_state(pg_id, "REMOVED")
            except Exception:  # noqa: BLE001 - Ray is going away: it ends them itself
                pass

    # -- scheduling into a group -------------------------------------------------------
    def _known(self, pg_id: bytes) -> _Group | None:
        group = self._groups.get(pg_id)
        if group is not None:
            return group
        info = self._backend.runtime.tables.placement_group(pg_id)
        if info is None or info.state == "REMOVED":
            return None
        try:
            ray_pg = _get_ray_pg(ray_name(pg_id))
        except ValueError:
            return None
        with self._lock:
            return self._groups.setdefault(pg_id, _Group(ray_pg, [dict(b) for b in info.bundles]))

    def options(self, spec: TaskSpec) -> tuple[dict, object]:
        """(The request as asked, Ray's scheduling strategy) for a spec placed in
        a group; ValueError if the group was removed or the request fits in none
        of the bundles it may use."""
        pg, index, _capture = spec.placement_group
        group = self._known(pg.id)
        if group is None or group.removed:
            raise ValueError(f"{spec.display_name} is scheduled in a placement group that "
                             f"was removed (or never existed here): it could never run")
        request = original_request(spec.resources or {}, pg.key)
        candidates = group.bundles if index == -1 else [group.bundles[index]]
        if not any(all(b.get(k, 0.0) >= v for k, v in request.items()) for b in candidates):
            where = "any bundle" if index == -1 else f"bundle {index}"
            raise ValueError(f"{spec.display_name} requests {request}, more than {where} of "
                             f"its placement group holds ({candidates}): it could never run")
        # (Capturing child tasks is beamlet's: the tasks it submits carry the group.)
        return request, PlacementGroupSchedulingStrategy(group.ray_pg, index, False)

    def note_task(self, spec: TaskSpec, ray_refs: list) -> None:
        group = self._groups.get(spec.placement_group[0].id)
        if group is None:
            return
        with self._lock:
            group.tasks.append((spec.return_ids, ray_refs))
            self._added += 1
            prune = self._added % _PRUNE_EVERY == 0
        if prune:
            self._prune()

    def note_actor(self, spec: TaskSpec, handle) -> None:
        group = self._groups.get(spec.placement_group[0].id)
        if group is not None:
            with self._lock:
                group.actors.append((spec.actor_id, handle))

    def _prune(self) -> None:
        """Forget the tasks that have finished (they need no cancelling)."""
        with self._lock:
            groups = list(self._groups.values())
        for group in groups:
            with self._lock:
                tasks = list(group.tasks)
            refs = [r for _, rs in tasks for r in rs[:1]]
            if not refs:
                continue
            done = set(_ray.wait(refs, num_returns=len(refs), timeout=0,
                                 fetch_local=False)[0])
            with self._lock:
                group.tasks = [t for t in group.tasks if t[1][:1] and t[1][0] not in done]


__all__ = ["RayPlacementGroups", "original_request", "ray_name"]

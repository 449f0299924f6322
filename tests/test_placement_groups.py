"""Placement groups and scheduling strategies (Ray's ``ray.util.placement_group``
and ``ray.util.scheduling_strategies``): bundles are reserved atomically from
the node's resources, a group that does not fit stays pending until resources
free, tasks and actors in a group take their resources from its bundles,
removing a group frees them and ends what runs in it. On every backend whose
``placement_groups`` flag is set (num_cpus=2)."""
from __future__ import annotations

import pytest

import beamlet as ray
from beamlet.util import (get_current_placement_group, get_placement_group, placement_group,
                          placement_group_table, remove_placement_group)
from beamlet.util.placement_group import PlacementGroup
from beamlet.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                PlacementGroupSchedulingStrategy)

T = 30


@pytest.fixture
def pgs(backend):
    backend.require("placement_groups")
    return backend


def _in(pg, index=-1, capture=False):
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=capture)


@ray.remote
def where():
    pg = get_current_placement_group()
    return None if pg is None else pg.id


@ray.remote
def parent():
    # (No CPU: outside the group none is free, the group holds both.)
    return ray.get(where.options(num_cpus=0).remote(), timeout=T)


@ray.remote
class Holder:
    def group(self):
        pg = get_current_placement_group()
        return None if pg is None else pg.id


def _free_cpus() -> float:
    return ray.available_resources().get("CPU", 0)


def test_bundles_are_reserved_and_tasks_run_from_them(pgs):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert ray.get(pg.ready(), timeout=T) == pg and pg.wait(T)
    assert _free_cpus() == 0  # both CPUs reserved...
    # ...and tasks in the group run on them, in any bundle or a given one.
    assert ray.get([where.options(scheduling_strategy=_in(pg)).remote(),
                    where.options(scheduling_strategy=_in(pg, 1)).remote()],
                   timeout=T) == [pg.id, pg.id]
    assert ray.get(where.options(num_cpus=0).remote(), timeout=T) is None  # (outside it)
    assert placement_group_table(pg)["state"] == "CREATED"
    remove_placement_group(pg)
    assert _free_cpus() == 2
    assert not any("_group_" in name for name in ray.available_resources())
    assert placement_group_table(pg)["state"] == "REMOVED"
    remove_placement_group(pg)  # (again: nothing)


def test_a_group_that_does_not_fit_waits_until_resources_free(pgs):
    first = placement_group([{"CPU": 1}])
    assert first.wait(T)
    both = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD", name="both")
    assert not both.wait(0)
    assert placement_group_table(both)["state"] == "PENDING"
    assert _free_cpus() == 1  # atomic: the one free CPU is not taken for half the group
    remove_placement_group(first)
    assert ray.get(both.ready(), timeout=T) == both
    assert placement_group_table(both)["state"] == "CREATED" and _free_cpus() == 0
    assert get_placement_group("both") == both


def test_a_pending_group_is_placed_when_a_blocking_actor_is_killed(pgs):
    pgs.require("parallel")  # (inprocess actors hold no resources between calls)

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    assert ray.get(hog.ping.remote(), timeout=T) == 1
    pg = placement_group([{"CPU": 1}])
    assert not pg.wait(0)
    ray.kill(hog)
    assert ray.get(pg.ready(), timeout=T) == pg


def test_removing_a_pending_group_fails_its_ready_ref(pgs):
    blocker = placement_group([{"CPU": 2}])
    assert blocker.wait(T)
    pending = placement_group([{"CPU": 1}])
    ready = pending.ready()
    remove_placement_group(pending)
    with pytest.raises(ray.exceptions.TaskPlacementGroupRemoved):
        ray.get(ready, timeout=T)


def test_actors_run_in_a_group_and_die_with_it(pgs):
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(T)
    holder = Holder.options(num_cpus=1, scheduling_strategy=_in(pg, 0)).remote()
    assert ray.get(holder.group.remote(), timeout=T) == pg.id
    assert ray.get(Holder.remote().group.remote(), timeout=T) is None
    remove_placement_group(pg)
    with pytest.raises(ray.exceptions.ActorDiedError, match="placement group was removed"):
        ray.get(holder.group.remote(), timeout=T)


def test_a_queued_task_fails_when_its_group_is_removed(pgs):
    pgs.require("parallel")
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(T)
    holder = Holder.options(num_cpus=1, scheduling_strategy=_in(pg)).remote()
    assert ray.get(holder.group.remote(), timeout=T) == pg.id  # it holds the bundle's CPU
    queued = where.options(scheduling_strategy=_in(pg)).remote()
    assert ray.wait([queued], timeout=0)[0] == []
    remove_placement_group(pg)
    with pytest.raises(ray.exceptions.TaskPlacementGroupRemoved):
        ray.get(queued, timeout=T)
    with pytest.raises(ValueError, match="placement group that was removed"):
        where.options(scheduling_strategy=_in(pg)).remote()


def test_child_tasks_are_captured_only_when_asked(pgs):
    pg = placement_group([{"CPU": 2}])
    assert pg.wait(T)
    assert ray.get(parent.options(scheduling_strategy=_in(pg, capture=True)).remote(),
                   timeout=T) == pg.id
    assert ray.get(parent.options(scheduling_strategy=_in(pg)).remote(), timeout=T) is None
    assert get_current_placement_group() is None  # (the driver is in none)


def test_what_could_never_be_placed_is_an_error(pgs):
    with pytest.raises(ValueError, match="CPU"):
        placement_group([{"CPU": 1}, {"CPU": 2}])  # more than the node has, together
    with pytest.raises(ValueError, match="'GPU'|GPU"):
        placement_group([{"GPU": 1}])
    with pytest.raises(ValueError, match="STRICT_SPREAD"):
        placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    for bad in ([], [{}], [{"CPU": 0}], [{"CPU": -1}], "CPU"):
        with pytest.raises(ValueError, match="bundle"):
            placement_group(bad)
    with pytest.raises(ValueError, match="strategy"):
        placement_group([{"CPU": 1}], strategy="TIGHT")
    pg = placement_group([{"CPU": 1}], name="solo")
    with pytest.raises(ValueError, match="already exists"):
        placement_group([{"CPU": 1}], name="solo")
    with pytest.raises(ValueError, match="bundle_index"):
        _in(pg, 1)
    with pytest.raises(ValueError, match="CPU"):  # more than its bundle holds
        where.options(num_cpus=2, scheduling_strategy=_in(pg)).remote()
    with pytest.raises(ValueError, match="no live placement group"):
        get_placement_group("nobody")
    assert set(placement_group_table()) >= {pg.id.hex()}


@ray.remote
def node_of_task():
    return ray.get_runtime_context().get_node_id()


def test_node_affinity_named_strategies_and_backends_without_groups(backend):
    # (a node that runs tasks: on a cluster, the driver's head may have no CPUs)
    node = ray.get(node_of_task.remote(), timeout=T)
    assert ray.get(where.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(),
        timeout=T) is None
    assert ray.get(where.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy("f" * 56, soft=True)).remote(),
        timeout=T) is None
    with pytest.raises(ValueError, match="not an alive node"):
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy("f" * 56, soft=False))
    for name in ("SPREAD", "DEFAULT"):
        assert ray.get(where.options(scheduling_strategy=name).remote(), timeout=T) is None
        assert ray.get(Holder.options(scheduling_strategy=name).remote().group.remote(),
                       timeout=T) is None
    with pytest.raises(ValueError, match="scheduling_strategy"):
        where.options(scheduling_strategy="TIGHT")
    if not backend.placement_groups:  # (here: a backend without them says so)
        with pytest.raises(ValueError, match="does not support placement groups"):
            placement_group([{"CPU": 1}])


def test_a_placement_group_pickles_by_value():
    import pickle
    pg = PlacementGroup(b"\x01" * 16, [{"CPU": 1.0}], b"\x02" * 16)
    assert pickle.loads(pickle.dumps(pg)) == pg and pg.bundle_count == 1


@ray.remote
class Greeter:
    def hi(self):
        return "hi"


def test_what_is_scheduled_in_a_pending_group_waits_for_it(pgs):
    blocker = placement_group([{"CPU": 2}])
    assert blocker.wait(T)
    pending = placement_group([{"CPU": 2}])
    task = where.options(scheduling_strategy=_in(pending)).remote()  # (returns at once)
    actor = Greeter.options(num_cpus=1, scheduling_strategy=_in(pending)).remote()
    call = actor.hi.remote()
    assert ray.wait([task, call], num_returns=2, timeout=0.2)[0] == []
    remove_placement_group(blocker)  # frees the CPUs: the group is placed, they run
    assert ray.get([task, call], timeout=T) == [pending.id, "hi"]
    never = placement_group([{"CPU": 2}])
    assert ray.get(pending.ready(), timeout=T) == pending  # (holds both CPUs)
    task = where.options(scheduling_strategy=_in(never)).remote()
    actor = Greeter.options(scheduling_strategy=_in(never)).remote()
    call = actor.hi.remote()
    remove_placement_group(never)
    with pytest.raises(ray.exceptions.TaskPlacementGroupRemoved):
        ray.get(task, timeout=T)
    with pytest.raises(ray.exceptions.ActorDiedError, match="placement group was removed"):
        ray.get(call, timeout=T)


@ray.remote(max_retries=3)
def runs_until_killed(path):
    import os
    import time
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(T)
    return "not killed"


def test_removing_a_group_kills_the_tasks_running_in_it(pgs, tmp_path):
    pgs.require("parallel", "isolated")
    import os

    from procs import proc_id, wait_gone, wait_until
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(T)
    path = str(tmp_path / "pid")
    ref = runs_until_killed.options(scheduling_strategy=_in(pg)).remote(path)
    assert wait_until(lambda: os.path.exists(path), T)
    pid = int(open(path).read())
    remove_placement_group(pg)
    with pytest.raises(ray.exceptions.TaskPlacementGroupRemoved):  # (not retried)
        ray.get(ref, timeout=T)
    assert wait_gone([proc_id(pid)], T) == []
    assert ray.available_resources()["CPU"] == 2


@ray.remote(num_gpus=1, num_cpus=0)
def visible_devices():
    import os
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_bundles_reserve_devices(start_backend):
    start_backend("local", num_cpus=2, num_gpus=3)
    pg = placement_group([{"GPU": 1}, {"GPU": 2}])
    assert pg.wait(T)
    assert ray.get(visible_devices.options(scheduling_strategy=_in(pg, 0)).remote(),
                   timeout=T) == "0"
    two = visible_devices.options(num_gpus=2, scheduling_strategy=_in(pg, 1)).remote()
    half = visible_devices.options(num_gpus=0.5, scheduling_strategy=_in(pg, 1)).remote()
    assert ray.get(two, timeout=T) == "1,2" and ray.get(half, timeout=T) in ("1", "2")
    assert ray.available_resources().get("GPU", 0) == 0
    remove_placement_group(pg)
    assert ray.get(visible_devices.options(num_gpus=3).remote(), timeout=T) == "0,1,2"

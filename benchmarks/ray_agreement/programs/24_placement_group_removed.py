"""Ray program: placement group removed."""
import ray
ray.init(num_cpus=2)
import time
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
pg = placement_group([{"CPU": 1}])
ray.get(pg.ready(), timeout=30)
@ray.remote(num_cpus=1)
def slow():
    time.sleep(30)
r = slow.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote()
time.sleep(2)
remove_placement_group(pg)
try:
    ray.get(r, timeout=30)
except ray.exceptions.TaskPlacementGroupRemoved:
    print("TaskPlacementGroupRemoved")
except Exception as e:
    print(type(e).__name__)
@ray.remote(num_cpus=1)
class A:
    def ping(self):
        return 1
pg2 = placement_group([{"CPU": 1}])
ray.get(pg2.ready(), timeout=30)
a = A.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg2)).remote()
print(ray.get(a.ping.remote(), timeout=30))
remove_placement_group(pg2)
try:
    ray.get(a.ping.remote(), timeout=30)
except ray.exceptions.RayActorError as e:
    print(type(e).__name__)

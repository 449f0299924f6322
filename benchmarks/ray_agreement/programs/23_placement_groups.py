"""Ray program: placement groups."""
import ray
ray.init(num_cpus=2)
from ray.util.placement_group import placement_group, remove_placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
print(ray.get(pg.ready(), timeout=30) == pg, pg.wait(10))
print(placement_group_table(pg)["state"], pg.bundle_count)
@ray.remote(num_cpus=1)
def f():
    from ray.util import get_current_placement_group
    return get_current_placement_group() is not None
print(ray.get([f.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in range(2)]))
print(ray.available_resources().get("CPU", 0))
big = placement_group([{"CPU": 2}])
print(big.wait(1))
remove_placement_group(pg)
print(big.wait(30))
remove_placement_group(big)
import time
time.sleep(1)
print(placement_group_table(big)["state"])

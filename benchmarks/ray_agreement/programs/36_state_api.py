"""Ray program: state api."""
import ray
ray.init(num_cpus=2)
from ray.util.state import list_tasks, list_actors, summarize_tasks
import time
@ray.remote
def f():
    return 1
ray.get([f.remote() for _ in range(3)])
@ray.remote
class A:
    def ping(self):
        return 1
a = A.options(name="sa").remote()
ray.get(a.ping.remote())
time.sleep(3)
rows = list_tasks(filters=[("name", "=", "f")])
print(len(rows), sorted(set(r.state for r in rows)))
acts = list_actors(filters=[("class_name", "=", "A")])
print(len(acts), acts[0].state, acts[0].name)

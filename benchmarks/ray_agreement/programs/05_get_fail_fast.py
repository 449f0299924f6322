"""Ray program: get fail fast."""
import ray
ray.init(num_cpus=2)
import time
@ray.remote
def bad():
    raise KeyError("k")
@ray.remote
def slow():
    time.sleep(20)
s = slow.remote()
t = time.time()
try:
    ray.get([s, bad.remote()], timeout=60)
except KeyError:
    print("KeyError fast:", time.time() - t < 15)
ray.cancel(s, force=True)

"""Ray program: wait basic."""
import ray
ray.init(num_cpus=2)
import time
@ray.remote
def f(x, d):
    time.sleep(d)
    return x
refs = [f.remote(0, 0), f.remote(1, 30)]
ready, rest = ray.wait(refs, num_returns=1, timeout=20)
print(len(ready), len(rest), ray.get(ready))
print(ray.wait([]))
ready, rest = ray.wait(refs, num_returns=2, timeout=0.5)
print(len(ready), len(rest))
try:
    ray.wait(refs, num_returns=3)
except ValueError:
    print("ValueError")
try:
    ray.wait([refs[0], refs[0]])
except ValueError:
    print("ValueError dup")
ray.cancel(refs[1], force=True)

"""Ray program: large objects."""
import ray
ray.init(num_cpus=2)
import numpy as np
@ray.remote
def make(n):
    return np.ones(n, dtype=np.float64)
@ray.remote
def total(a):
    return float(a.sum())
r = make.remote(2_000_000)
print(ray.get(total.remote(r)))
a = ray.get(r)
print(a.shape, a.flags.writeable)

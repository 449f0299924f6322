"""Ray program: put get."""
import ray
ray.init(num_cpus=2)
import numpy as np
a = np.arange(100000, dtype=np.int64)
ref = ray.put(a)
print(int(ray.get(ref).sum()))
print(ray.get([ray.put(1), ray.put("x"), ray.put(None)]))
inner = ray.put(3)
outer = ray.put([inner])
got = ray.get(outer)
print(type(got[0]).__name__, ray.get(got[0]))
print(isinstance(ref, ray.ObjectRef))

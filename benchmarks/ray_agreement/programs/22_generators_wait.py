"""Ray program: generators wait."""
import ray
ray.init(num_cpus=2)
import time
@ray.remote
def gen():
    yield 1
    time.sleep(30)
    yield 2
g = gen.remote()
ready, rest = ray.wait([g], timeout=20)
print(len(ready), len(rest))
print(ray.get(next(g)))
ready, rest = ray.wait([g], timeout=0.5)
print(len(ready), len(rest))
r = g._next_sync(0.2)
print(r.is_nil())
ray.cancel(g)

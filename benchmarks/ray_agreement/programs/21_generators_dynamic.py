"""Ray program: generators dynamic."""
import ray
ray.init(num_cpus=2)
@ray.remote(num_returns="dynamic")
def gen(n):
    for i in range(n):
        yield i
ref = gen.remote(3)
dyn = ray.get(ref)
print(type(dyn).__name__, [ray.get(r) for r in dyn])

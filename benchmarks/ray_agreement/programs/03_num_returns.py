"""Ray program: num returns."""
import ray
ray.init(num_cpus=2)
@ray.remote(num_returns=2)
def two():
    return 1, 2
a, b = two.remote()
print(ray.get(a), ray.get(b))
@ray.remote
def three():
    return 1, 2, 3
x = three.options(num_returns=3).remote()
print(len(x), ray.get(x))
@ray.remote(num_returns=0)
def none():
    return None
print(none.remote())

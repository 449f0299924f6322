"""Ray program: nested tasks."""
import ray
ray.init(num_cpus=2)
@ray.remote
def leaf(x):
    return x + 1
@ray.remote
def mid(x):
    return sum(ray.get([leaf.remote(x), leaf.remote(x * 2)]))
@ray.remote
def top():
    return ray.get([mid.remote(i) for i in range(3)])
print(ray.get(top.remote()))
@ray.remote
def returns_ref():
    return leaf.remote(1)
r = ray.get(returns_ref.remote())
print(type(r).__name__, ray.get(r))

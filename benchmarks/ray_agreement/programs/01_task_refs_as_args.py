"""Ray program: task refs as args."""
import ray
ray.init(num_cpus=2)
@ray.remote
def add(a, b):
    return a + b
@ray.remote
def kind(x):
    return type(x).__name__, [type(v).__name__ for v in x]
r = add.remote(1, 2)
print(ray.get(add.remote(r, 10)))
print(ray.get(kind.remote([r, 5])))  # nested refs are not resolved
print(ray.get(ray.get(kind.remote([r]))[1][0] == "ObjectRef"))

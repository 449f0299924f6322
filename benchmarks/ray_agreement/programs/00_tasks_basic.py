"""Ray program: tasks basic."""
import ray
ray.init(num_cpus=2)
@ray.remote
def sq(x):
    return x * x
print(ray.get([sq.remote(i) for i in range(6)]))
print(ray.get(sq.remote(7)))

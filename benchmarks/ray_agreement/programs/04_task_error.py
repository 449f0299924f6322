"""Ray program: task error."""
import ray
ray.init(num_cpus=2)
@ray.remote
def bad():
    raise ValueError("boom")
try:
    ray.get(bad.remote())
except ValueError as e:
    print("caught ValueError", isinstance(e, ray.exceptions.RayTaskError), "boom" in str(e))
try:
    ray.get(bad.remote())
except ray.exceptions.RayTaskError as e:
    print("RayTaskError", type(e.cause).__name__)
@ray.remote
def dep(x):
    return x
try:
    ray.get(dep.remote(bad.remote()))
except ValueError:
    print("propagated")

"""Ray program: actor errors."""
import ray
ray.init(num_cpus=2)
@ray.remote
class A:
    def bad(self):
        raise RuntimeError("m")
    def ok(self):
        return "ok"
a = A.remote()
try:
    ray.get(a.bad.remote())
except RuntimeError as e:
    print("RuntimeError", isinstance(e, ray.exceptions.RayTaskError))
print(ray.get(a.ok.remote()))
@ray.remote
class B:
    def __init__(self):
        raise ValueError("ctor")
    def ok(self):
        return 1
b = B.remote()
try:
    ray.get(b.ok.remote(), timeout=30)
except ray.exceptions.ActorDiedError as e:
    print("ActorDiedError", "ctor" in str(e))

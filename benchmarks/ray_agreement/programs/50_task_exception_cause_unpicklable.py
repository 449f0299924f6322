"""Ray program: task exception cause unpicklable."""
import ray
ray.init(num_cpus=2)
class Weird(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.b = b
@ray.remote
def f():
    raise Weird("x", 2)
try:
    ray.get(f.remote())
except Weird as e:
    print("Weird caught")
except ray.exceptions.RayTaskError as e:
    print("RayTaskError only")

"""Ray program: threaded actor."""
import ray
ray.init(num_cpus=2)
import threading
@ray.remote(max_concurrency=2)
class A:
    def __init__(self):
        self.b = threading.Barrier(2)
    def meet(self):
        self.b.wait(timeout=30)
        return "met"
a = A.remote()
print(ray.get([a.meet.remote(), a.meet.remote()], timeout=60))

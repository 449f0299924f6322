"""Ray program: concurrency groups."""
import ray
ray.init(num_cpus=2)
import threading
@ray.remote(concurrency_groups={"io": 2})
class A:
    def __init__(self):
        self.b = threading.Barrier(2)
    @ray.method(concurrency_group="io")
    def meet(self):
        self.b.wait(timeout=30)
        return "met"
    def plain(self):
        return "plain"
a = A.remote()
print(ray.get([a.meet.remote(), a.meet.remote()], timeout=60), ray.get(a.plain.remote()))

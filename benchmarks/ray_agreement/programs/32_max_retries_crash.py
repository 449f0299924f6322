"""Ray program: max retries crash."""
import ray
ray.init(num_cpus=2)
import os
@ray.remote
class Count:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n
@ray.remote(max_retries=2)
def crashy(c):
    if ray.get(c.incr.remote()) < 3:
        os._exit(1)
    return "survived"
c = Count.remote()
print(ray.get(crashy.remote(c), timeout=60))
@ray.remote(max_retries=0)
def dies():
    os._exit(1)
try:
    ray.get(dies.remote(), timeout=60)
except ray.exceptions.WorkerCrashedError:
    print("WorkerCrashedError")

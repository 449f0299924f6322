"""Ray program: kill restart."""
import ray
ray.init(num_cpus=2)
@ray.remote(max_restarts=1)
class A:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n
a = A.remote()
print(ray.get(a.incr.remote()))
ray.kill(a, no_restart=False)
import time
for _ in range(200):
    try:
        print("restarted", ray.get(a.incr.remote(), timeout=30))
        break
    except ray.exceptions.RayActorError:
        time.sleep(0.1)

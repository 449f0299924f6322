"""Ray program: actor restart."""
import ray
ray.init(num_cpus=2)
import os
@ray.remote(max_restarts=1, max_task_retries=0)
class A:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n
    def die(self):
        os._exit(1)
a = A.remote()
print(ray.get([a.incr.remote(), a.incr.remote()]))
try:
    ray.get(a.die.remote(), timeout=30)
except ray.exceptions.RayActorError as e:
    print("died", type(e).__name__ in ("ActorDiedError", "ActorUnavailableError", "RayActorError"))
import time
for _ in range(200):
    try:
        print("after restart", ray.get(a.incr.remote(), timeout=30))
        break
    except ray.exceptions.RayActorError:
        time.sleep(0.1)
try:
    ray.get(a.die.remote(), timeout=30)
except ray.exceptions.RayActorError:
    print("died again")
try:
    ray.get(a.incr.remote(), timeout=30)
except ray.exceptions.ActorDiedError:
    print("dead for good")

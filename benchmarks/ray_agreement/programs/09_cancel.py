"""Ray program: cancel."""
import ray
ray.init(num_cpus=2)
import time
@ray.remote
def loop():
    while True:
        time.sleep(0.05)
r = loop.remote()
time.sleep(1)
ray.cancel(r)
try:
    ray.get(r, timeout=30)
except ray.exceptions.TaskCancelledError:
    print("TaskCancelledError")
except ray.exceptions.RayTaskError as e:
    print("RayTaskError", type(e.cause).__name__)
@ray.remote(num_cpus=2)
def hog():
    time.sleep(30)
h = hog.remote()
q = loop.options(num_cpus=2).remote()
time.sleep(0.5)
ray.cancel(q)
try:
    ray.get(q, timeout=30)
except ray.exceptions.TaskCancelledError:
    print("queued cancelled")
ray.cancel(h, force=True)
try:
    ray.get(h, timeout=30)
except ray.exceptions.TaskCancelledError:
    print("force cancelled")
@ray.remote
def quick():
    return 1
d = quick.remote()
ray.get(d)
ray.cancel(d)
print(ray.get(d))

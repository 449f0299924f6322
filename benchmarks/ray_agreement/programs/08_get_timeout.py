"""Ray program: get timeout."""
import ray
ray.init(num_cpus=2)
import time
@ray.remote
def slow():
    time.sleep(30)
r = slow.remote()
try:
    ray.get(r, timeout=0.5)
except ray.exceptions.GetTimeoutError as e:
    print("GetTimeoutError", isinstance(e, TimeoutError))
ray.cancel(r, force=True)
try:
    ray.get(r, timeout=20)
except ray.exceptions.TaskCancelledError:
    print("cancelled")

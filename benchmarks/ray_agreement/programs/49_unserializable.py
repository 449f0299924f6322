"""Ray program: unserializable."""
import ray
ray.init(num_cpus=2)
import threading
lock = threading.Lock()
@ray.remote
def f(x):
    return 1
try:
    f.remote(lock)
    print("accepted")
except TypeError:
    print("TypeError")
try:
    ray.put(lock)
    print("accepted")
except TypeError:
    print("TypeError")

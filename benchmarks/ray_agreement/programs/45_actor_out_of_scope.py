"""Ray program: actor out of scope."""
import ray
ray.init(num_cpus=2)
import time
@ray.remote
class A:
    def pid(self):
        import os
        return os.getpid()
def make():
    a = A.remote()
    return ray.get(a.pid.remote())
pid = make()
import os
for _ in range(100):
    try:
        os.kill(pid, 0)
        time.sleep(0.1)
    except ProcessLookupError:
        print("actor process gone")
        break
else:
    print("still alive")

"""Ray program: named actors."""
import ray
ray.init(num_cpus=2)
@ray.remote
class A:
    def ping(self):
        return "pong"
a = A.options(name="alpha").remote()
print(ray.get(ray.get_actor("alpha").ping.remote()))
try:
    A.options(name="alpha").remote()
except ValueError:
    print("ValueError duplicate")
b = A.options(name="alpha", get_if_exists=True).remote()
print(ray.get(b.ping.remote()))
try:
    ray.get_actor("nope")
except ValueError:
    print("ValueError missing")
c = A.options(name="alpha", namespace="other").remote()
print(ray.get(ray.get_actor("alpha", namespace="other").ping.remote()))
ray.kill(a)
import time
for _ in range(100):
    try:
        ray.get_actor("alpha")
        time.sleep(0.1)
    except ValueError:
        print("gone after kill")
        break

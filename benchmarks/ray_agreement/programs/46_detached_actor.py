"""Ray program: detached actor."""
import ray
ray.init(num_cpus=2)
@ray.remote
class A:
    def ping(self):
        return "pong"
a = A.options(name="d1", lifetime="detached").remote()
print(ray.get(a.ping.remote()))
del a
print(ray.get(ray.get_actor("d1").ping.remote()))
ray.kill(ray.get_actor("d1"))
